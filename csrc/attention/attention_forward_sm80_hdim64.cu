// sm80 forward instantiation for head dim 64 (and smaller dims padded up to it).
#include "attention/attention_forward_sm80.cuh"
#include "attention/attention_forward_sm80.h"

namespace cm3leon::attention::cuda {

template <typename Element, int kHeadDim>
cudaError_t run_forward_sm80(const AttnParams& p, cudaStream_t stream) {
  return launch_forward_sm80<Sm80Traits<kHeadDim, 128, 64, 8, Element>>(p, stream);
}

template cudaError_t run_forward_sm80<cutlass::bfloat16_t, 64>(const AttnParams&, cudaStream_t);
template cudaError_t run_forward_sm80<cutlass::half_t, 64>(const AttnParams&, cudaStream_t);

}  // namespace cm3leon::attention::cuda
