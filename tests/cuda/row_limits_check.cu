// Host check (no GPU): RowLimits::first_seeing_row, the per-key bound the sm_90a dK/dV kernel
// masks with, against the per-row limit key < L(t) that every other kernel uses, over small
// shapes with lengths, causal T != S, rows and keys past the limits.
// Built and run by scripts/ci_cuda_compile.sh.
#include <cstdio>

#include "kernel_common.cuh"

int main() {
  long checked = 0, bad = 0;
  for (int T = 1; T <= 12; ++T)
    for (int S = 1; S <= 12; ++S)
      for (int qlen = 0; qlen <= T; ++qlen)
        for (int kvlen = 0; kvlen <= S; ++kvlen)
          for (int causal = 0; causal < 2; ++causal) {
            const jca::RowLimits L{T, S, qlen, kvlen, causal != 0};
            for (int key = 0; key < S + 3; ++key)
              for (int t = 0; t < T + 3; ++t) {
                const bool want = key < L(t);
                const bool got = t >= L.first_seeing_row(key) && t < qlen;
                ++checked;
                if (want != got && bad++ < 5)
                  std::printf("T=%d S=%d qlen=%d kvlen=%d causal=%d key=%d t=%d: L %d, bound %d\n",
                              T, S, qlen, kvlen, causal, key, t, want, got);
              }
          }
  std::printf("row limits: %ld cases, %ld mismatches\n", checked, bad);
  return bad != 0;
}
