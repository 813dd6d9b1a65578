// at::Tensor glue of the CUDA samplers (registered in ops.cpp). Same checks and errors as the CPU launcher.
//
// Errors: the kernel records the first bad row in a one-element device status tensor; reading it back is the
// op's only device->host synchronisation (one 8-byte copy after the kernel). While the stream is being
// captured into a CUDA graph the read is skipped, so the op stays capturable; bad rows then come out as
// token -1 with logprob NaN instead of an exception.
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "common/tensor_checks.h"
#include "sampling/sampling_checks.h"
#include "sampling/sampling_cuda.h"
#include "sampling/sampling_launch.h"

namespace cm3leon::sampling {
namespace {

constexpr int64_t kNoError = std::numeric_limits<int64_t>::max();

void check_device(const std::optional<at::Tensor>& t, const at::Device& device, const char* name) {
  if (t) TORCH_CHECK_VALUE(t->device() == device, name, " must be on ", device, ", got ", t->device());
}

// Seeds stay on the device; a CUDA step tensor is read by the kernel (captured graphs advance it), a CPU one
// here (a host read, no synchronisation).
DeviceSeeds device_seeds(int64_t batch, int64_t seed, const std::optional<at::Tensor>& seeds, int64_t step,
                         const std::optional<at::Tensor>& step_tensor, const at::Device& device) {
  check_seed_tensors(batch, seeds, step, step_tensor);
  check_device(seeds, device, "seed tensor");
  DeviceSeeds s{nullptr, seed, uint64_t(step), nullptr};
  if (seeds) s.per_row = seeds->data_ptr<int64_t>();
  if (step_tensor) {
    if (step_tensor->is_cpu()) {
      s.step = host_step(*step_tensor);
    } else {
      check_device(step_tensor, device, "step tensor");
      s.step_ptr = step_tensor->data_ptr<int64_t>();
    }
  }
  return s;
}

// What both samplers check and allocate on the logits' device before their launch.
struct RowLaunch {
  Vocab allowed;
  DeviceSeeds seeds;
  at::Tensor tokens, logprobs, status;
};

RowLaunch prepare_rows(const at::Tensor& logits, int64_t batch, int64_t vocab, int64_t range_lo, int64_t range_hi,
                       const std::optional<at::Tensor>& allowed_mask, int64_t seed,
                       const std::optional<at::Tensor>& seeds, int64_t step,
                       const std::optional<at::Tensor>& step_tensor) {
  check_device(allowed_mask, logits.device(), "allowed_mask");
  const Vocab allowed = check_vocab(batch, vocab, range_lo, range_hi, allowed_mask);
  const DeviceSeeds seed_spec = device_seeds(batch, seed, seeds, step, step_tensor, logits.device());
  TORCH_CHECK_VALUE(batch < (int64_t(1) << 31), "batch must be < 2^31 rows, got ", batch);
  const auto options = logits.options();
  return {allowed, seed_spec, at::empty({batch}, options.dtype(at::kLong)),
          at::empty({batch}, options.dtype(at::kFloat)), at::full({1}, kNoError, options.dtype(at::kLong))};
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, " CUDA launch failed: ", cudaGetErrorString(err));
}

// Raises for the first bad row, unless the stream is being captured (see the top of this file).
void raise_first_bad_row(const RowLaunch& r, cudaStream_t stream, const char* input) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  check_launch(cudaStreamIsCapturing(stream, &capture), "cudaStreamIsCapturing");
  if (capture != cudaStreamCaptureStatusNone) return;
  const int64_t first = r.status.item<int64_t>();
  if (first == kNoError) return;
  raise_row_error(RowError{first / kStatusRows, RowStatus(first % kStatusRows)}, input);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cfg_sample_cuda_launch(CM3LEON_CFG_SAMPLE_PARAMS) {
  const CfgOptions options = check_cfg_args(logits, guidance_scale, temperature, top_k, top_p, min_p);
  const int64_t batch = logits.size(0), vocab = logits.size(2);
  const DType dtype = float_dtype(logits, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const RowLaunch r =
      prepare_rows(logits, batch, vocab, range_lo, range_hi, allowed_mask, seed, seeds, step, step_tensor);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(cfg_sample_cuda(dtype, logits.data_ptr(), batch, logits.stride(0), logits.stride(1), options,
                               min_p > 0 ? std::log(min_p) : 0.0, r.allowed, r.seeds, r.tokens.data_ptr<int64_t>(),
                               r.logprobs.data_ptr<float>(),
                               reinterpret_cast<long long*>(r.status.data_ptr<int64_t>()), stream),
               "cfg_sample");
  raise_first_bad_row(r, stream, "logits");
  return {r.tokens, r.logprobs};
}

std::tuple<at::Tensor, at::Tensor> contrastive_sample_cuda_launch(CM3LEON_CONTRASTIVE_SAMPLE_PARAMS) {
  const ContrastiveOptions options =
      check_contrastive_args(expert, amateur, alpha, k, temperature, amateur_temperature);
  const int64_t batch = expert.size(0), vocab = expert.size(1);
  const DType dtype = float_dtype(expert, "expert_logits");
  TORCH_CHECK_VALUE(amateur.device() == expert.device(), "amateur_logits must be on ", expert.device(), ", got ",
                    amateur.device());
  const c10::cuda::CUDAGuard guard(expert.device());
  const RowLaunch r =
      prepare_rows(expert, batch, vocab, range_lo, range_hi, allowed_mask, seed, seeds, step, step_tensor);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(contrastive_sample_cuda(dtype, expert.data_ptr(), amateur.data_ptr(), batch, expert.stride(0),
                                       amateur.stride(0), options, alpha > 0 ? std::log(alpha) : 0.0, r.allowed,
                                       r.seeds, r.tokens.data_ptr<int64_t>(), r.logprobs.data_ptr<float>(),
                                       reinterpret_cast<long long*>(r.status.data_ptr<int64_t>()), stream),
               "contrastive_sample");
  raise_first_bad_row(r, stream, "expert_logits/amateur_logits");
  return {r.tokens, r.logprobs};
}

}  // namespace cm3leon::sampling
