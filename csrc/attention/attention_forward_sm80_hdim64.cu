// sm80 forward instantiations for head dim 64 (and smaller dims padded up to it), one file per head dim so
// they compile in parallel.
#include "attention/attention_forward_sm80.cuh"

namespace cm3leon::attention::cuda {

template cudaError_t run_forward_sm80<cutlass::bfloat16_t, 64>(const AttnParams&, cudaStream_t);
template cudaError_t run_forward_sm80<cutlass::half_t, 64>(const AttnParams&, cudaStream_t);

}  // namespace cm3leon::attention::cuda
