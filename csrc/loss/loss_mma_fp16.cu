// The tensor-core loss kernels for fp16 inputs (one storage type per translation unit: they compile in parallel).
#include "loss/loss_mma.cuh"

CM3LEON_LOSS_MMA_ENTRY_POINTS(fp16, cutlass::half_t)
