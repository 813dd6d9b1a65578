#include "vq/vq_launch.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "common/tensor_checks.h"
#include "vq/vq_cpu.h"

namespace cm3leon::vq {

namespace {
void check_codebook(const at::Tensor& codebook) {
  TORCH_CHECK_VALUE(codebook.dim() == 2, "codebook must be 2-D [K, D], got ", codebook.sizes());
  TORCH_CHECK_VALUE(codebook.size(0) > 0, "codebook is empty (K = 0)");
  check_contiguous(codebook, "codebook");
}
}  // namespace

Metric check_nearest_args(const at::Tensor& z, const at::Tensor& codebook, c10::string_view metric) {
  check_codebook(codebook);
  TORCH_CHECK_VALUE(z.dim() == 2 && z.size(1) == codebook.size(1), "z must be [N, D] with D = ",
                    codebook.size(1), " (the codebook's), got ", z.sizes());
  TORCH_CHECK_TYPE(z.scalar_type() == codebook.scalar_type(), "z and codebook must share a dtype, got ",
                   z.scalar_type(), " and ", codebook.scalar_type());
  TORCH_CHECK_VALUE(z.device() == codebook.device(), "z and codebook must be on the same device");
  check_contiguous(z, "z");
  TORCH_CHECK_VALUE(metric == "l2" || metric == "cosine", "metric must be 'l2' or 'cosine', got '", metric, "'");
  return metric == "l2" ? Metric::L2 : Metric::Cosine;
}

std::tuple<at::Tensor, at::Tensor> nearest_cpu_launch(const at::Tensor& z, const at::Tensor& codebook,
                                                      c10::string_view metric) {
  const Metric kind = check_nearest_args(z, codebook, metric);
  const int64_t n = z.size(0);
  at::Tensor indices = at::empty({n}, z.options().dtype(at::kLong));
  at::Tensor distance = at::empty({n}, z.options().dtype(at::kFloat));
  const int64_t bad = nearest_cpu(float_dtype(z, "z"), z.data_ptr(), codebook.data_ptr(), n, codebook.size(0),
                                  codebook.size(1), kind,
                                  indices.data_ptr<int64_t>(), distance.data_ptr<float>(), at::get_num_threads());
  TORCH_CHECK_VALUE(bad == 0, "z or codebook holds NaN/inf: ", bad, " row(s) of z have no finite distance");
  return {indices, distance};
}

at::Tensor embed_cpu_launch(const at::Tensor& indices, const at::Tensor& codebook) {
  check_codebook(codebook);
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, "indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(indices.dim() == 1, "indices must be 1-D, got ", indices.sizes());
  TORCH_CHECK_VALUE(indices.device() == codebook.device(), "indices and codebook must be on the same device, got ",
                    indices.device(), " and ", codebook.device());
  check_contiguous(indices, "indices");
  at::Tensor out = at::empty({indices.size(0), codebook.size(1)}, codebook.options());
  const int64_t bad = embed_cpu(float_dtype(codebook, "codebook"), indices.data_ptr<int64_t>(),
                                codebook.data_ptr(), indices.size(0), codebook.size(0), codebook.size(1),
                                out.data_ptr(), at::get_num_threads());
  TORCH_CHECK_INDEX(bad < 0, "indices out of range: indices[", bad, "] = ",
                    bad < 0 ? 0 : indices.data_ptr<int64_t>()[bad], " is not in [0, ", codebook.size(0), ")");
  return out;
}

}  // namespace cm3leon::vq
