// Torch-free CPU parallelism. OpenMP is the runtime torch itself uses on Linux (its libgomp is already
// loaded when the extension is imported). The thread count is not read from OpenMP here: the launchers pass
// at::get_num_threads() down, because OpenMP's per-thread setting in a new Python thread keeps its default
// until a torch op syncs it, while torch.set_num_threads is process-wide.
#pragma once
#include "common/isa.h"
#include <algorithm>
#include <cstdint>
#include <omp.h>

namespace cm3leon {
CM3LEON_ISA_BEGIN

// The threads a kernel may use out of the caller's budget: 1 inside a parallel region (no nested teams).
inline int usable_threads(int budget) { return omp_in_parallel() ? 1 : std::max(budget, 1); }

// Runs body(item) for item in [0, n) on up to `threads` threads with dynamic scheduling (uneven items).
template <typename Body>
void parallel_items(int threads, int64_t n, const Body& body) {
  if (n <= 0) return;
  const int team = int(std::min<int64_t>(n, usable_threads(threads)));
  if (team == 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(team)
  for (int64_t i = 0; i < n; ++i) body(i);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

CM3LEON_ISA_END
}  // namespace cm3leon
