// Host-side checks of the CuTe layouts that the tensor-core loss kernels (csrc/loss/loss_mma.cuh) rely on,
// runnable without a GPU (CuTe layouts are host/device code). Prints "mismatches: N" and exits 1 when N > 0.
#include <cstdio>
#include <vector>

#include "loss/loss_mma.cuh"

using namespace cute;

template <typename T>
int check_type() {
  using Config = cm3leon::loss::mma::Tile<T>;
  using Layouts = cm3leon::loss::mma::GradientLayouts<T>;
  constexpr int kTokens = Config::kRows, kVocab = Config::kCols, kDepth = Config::kDepth;
  int bad = 0;
  // The transposed views of the staged operands are their transposes; stages are stacked.
  const typename Config::SmemLayoutA h{};
  const typename Config::SmemLayoutB w{};
  const typename Layouts::Ht ht{};
  const typename Layouts::Wt wt{};
  for (int s = 0; s < Config::kStages; ++s)
    for (int r = 0; r < kTokens; ++r)
      for (int d = 0; d < kDepth; ++d) {
        bad += h(r, d, s) != ht(d, r, s) || h(r, d, s) != s * kTokens * kDepth + h(r, d, 0);
        bad += w(r, d, s) != wt(d, r, s);
      }
  // G covers its tile once; Gt is its transpose.
  const typename Layouts::G g{};
  const typename Layouts::Gt gt{};
  std::vector<int> hits(kTokens * kVocab, 0);
  for (int t = 0; t < kTokens; ++t)
    for (int v = 0; v < kVocab; ++v) {
      bad += g(t, v) != gt(v, t);
      ++hits[g(t, v)];
    }
  for (int x : hits) bad += x != 1;
  // Accumulators: values 2j, 2j + 1 are columns c, c + 1 (c even) of one row (atomic_add_tile's pairs); in the
  // forward's 128 x 128 fragment value c + 2h of (m, n) lies on row slot (m, h); each row has 8 holders, the 4
  // lanes of a quad hold the same rows, and a row's quads are one in warps 0-3 and one in warps 4-7.
  typename Config::TiledMma mma;
  std::vector<int> holders(kTokens, 0), upper_warps(kTokens, 0);
  for (int tid = 0; tid < Config::kThreads; ++tid) {
    const auto pairs = mma.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<kTokens>, Int<kDepth>>{}));
    for (int i = 0; i < size(pairs); i += 2)
      bad += get<0>(pairs(i)) != get<0>(pairs(i + 1)) || get<1>(pairs(i)) + 1 != get<1>(pairs(i + 1)) ||
             get<1>(pairs(i)) % 2 != 0;
    const auto acc = mma.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<kTokens>, Int<kVocab>>{}));
    const auto quad = mma.get_thread_slice(tid - tid % 4).partition_C(
        make_identity_tensor(Shape<Int<kTokens>, Int<kVocab>>{}));
    for (int m = 0; m < size<1>(acc); ++m)
      for (int hh = 0; hh < 2; ++hh) {
        const int row = get<0>(acc(2 * hh, m, 0));
        ++holders[row];
        upper_warps[row] += tid / 32 / 4;
        bad += row != get<0>(quad(2 * hh, m, 0));
        for (int n = 0; n < size<2>(acc); ++n)
          for (int c = 0; c < 2; ++c) bad += get<0>(acc(c + 2 * hh, m, n)) != row;
      }
  }
  for (int r = 0; r < kTokens; ++r) bad += holders[r] != 8 || upper_warps[r] != 4;
  return bad;
}

int main() {
  const int bad = check_type<cutlass::bfloat16_t>() + check_type<cutlass::half_t>();
  std::printf("mismatches: %d\n", bad);
  return bad == 0 ? 0 : 1;
}
