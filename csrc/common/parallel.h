// Torch-free CPU parallelism. OpenMP is the runtime torch itself uses on Linux (its libgomp is already
// loaded when the extension is imported), so torch.set_num_threads governs our kernels too.
#pragma once
#include <algorithm>
#include <cstdint>
#include <omp.h>

namespace cm3leon {

inline int num_threads() { return omp_in_parallel() ? 1 : omp_get_max_threads(); }

// Runs body(item) for item in [0, n) on all threads with dynamic scheduling (items have uneven cost).
template <typename Body>
void parallel_items(int64_t n, const Body& body) {
  if (n <= 0) return;
  if (n == 1 || num_threads() == 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(int(std::min<int64_t>(n, num_threads())))
  for (int64_t i = 0; i < n; ++i) body(i);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cm3leon
