// Host-side check of the fragment-coordinate assumptions the sm80 attention kernels rely on (runs without a
// GPU: CuTe layouts are host-evaluable). For every thread of each forward tile configuration
// (ForwardSm80Traits): the (row, key) of each S accumulator element equals the formulas the causal/length
// mask uses; the accumulator viewed as the A operand of O += P V holds the same (row, key) as partition_A;
// O accumulator rows equal S rows (so one rescale factor per row is right). Exit status 0 when all hold.
// Built and run by tests/test_attention_cuda_layouts.py.
#include <cstdio>
#include "attention/attention_forward_sm80.cuh"
using namespace cute;
using namespace cm3leon::attention::cuda;

template <class T>
int check() {
  constexpr int BM = T::kBlockM, BN = T::kBlockN, HD = T::kHeadDim, NW = T::kNWarps;
  typename T::TiledMma mma;
  int bad = 0;
  for (int tidx = 0; tidx < T::kNThreads; ++tidx) {
    auto thr = mma.get_thread_slice(tidx);
    const int lane = tidx % 32, warp = tidx / 32, row0 = warp * 16 + lane / 4, col0 = (lane % 4) * 2;
    // S accumulator coordinates
    Tensor cS = make_identity_tensor(Shape<Int<BM>, Int<BN>>{});
    Tensor tScS = thr.partition_C(cS);
    Tensor rc = make_tensor(tScS.data(), acc_rowcol_layout(tScS.layout()));
    for (int r = 0; r < size<0>(rc); ++r)
      for (int c = 0; c < size<1>(rc); ++c) {
        auto co = rc(r, c);
        int er = row0 + (r % 2) * 8 + (r / 2) * 16 * NW, ec = col0 + (c % 2) + (c / 2) * 8;
        if (get<0>(co) != er || get<1>(co) != ec) {
          if (bad < 5) printf("S mismatch t%d r%d c%d got (%d,%d) want (%d,%d)\n", tidx, r, c, int(get<0>(co)),
                              int(get<1>(co)), er, ec);
          ++bad;
        }
      }
    // P as the A operand of O += P V: same (row, key) at every index as partition_A of a (BM, BN) identity
    Tensor tPcP = make_tensor(tScS.data(), acc_as_a_layout(tScS.layout()));
    Tensor tAcA = thr.partition_A(cS);
    if (size(tPcP) != size(tAcA)) { printf("size mismatch %d %d\n", int(size(tPcP)), int(size(tAcA))); ++bad; }
    for (int i = 0; i < size(tAcA); ++i) {
      if (!(tPcP(i) == tAcA(i))) { if (bad < 5) printf("A mismatch t%d i%d\n", tidx, i); ++bad; }
    }
    if (rank(tPcP) != 3 || size<1>(tPcP) != size<1>(tAcA) || size<2>(tPcP) != size<2>(tAcA)) {
      printf("A shape mismatch\n");
      ++bad;
    }
    for (int m = 0; m < size<1>(tAcA); ++m)
      for (int k = 0; k < size<2>(tAcA); ++k)
        for (int v = 0; v < size<0>(tAcA); ++v)
          if (!(tPcP(v, m, k) == tAcA(v, m, k))) {
            if (bad < 5) printf("A(v,m,k) mismatch t%d\n", tidx);
            ++bad;
          }
    // O accumulator rows equal S rows (same rescale factors)
    Tensor cO = make_identity_tensor(Shape<Int<BM>, Int<HD>>{});
    Tensor tOcO = thr.partition_C(cO);
    Tensor orc = make_tensor(tOcO.data(), acc_rowcol_layout(tOcO.layout()));
    for (int r = 0; r < size<0>(orc); ++r)
      for (int c = 0; c < size<1>(orc); ++c)
        if (get<0>(orc(r, c)) != get<0>(rc(r, 0))) { if (bad < 5) printf("O row mismatch\n"); ++bad; }
  }
  printf("HD=%d BM=%d BN=%d warps=%d: %s\n", HD, BM, BN, NW, bad ? "FAIL" : "ok");
  return bad;
}

int main() {
  int bad = 0;
  bad += check<ForwardSm80Traits<64, cutlass::half_t>>();
  bad += check<ForwardSm80Traits<128, cutlass::bfloat16_t>>();
  bad += check<ForwardSm80Traits<256, cutlass::bfloat16_t>>();
  return bad != 0;
}
