// bf16 / fp16 attention backward for head dims up to 256 (own translation unit: buckets compile in parallel).
#include "attention/attention_backward_sm80.cuh"

namespace cm3leon::attention::bwd {
template cudaError_t backward_sm80<256>(const BackwardParams&, cudaStream_t);
}  // namespace cm3leon::attention::bwd
