// The tensor-core loss kernels for bf16 inputs (one storage type per translation unit: they compile in parallel).
#include "loss/loss_mma.cuh"

CM3LEON_LOSS_MMA_ENTRY_POINTS(bf16, cutlass::bfloat16_t)
