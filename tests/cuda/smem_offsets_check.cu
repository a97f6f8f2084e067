// Host check (no GPU): smem_byte_offset, which the sm_90a l2norm epilogues use to read their
// tiles with 32-bit shared loads, against CuTe's own addressing of the same swizzled tiles
// (a CuTe tensor on a 1024-byte aligned buffer), for every element of every tile they read.
// Built and run by scripts/ci_cuda_compile.sh.
#include <cstdio>

#include "sm90/launch_bwd_sm90.cuh"

using namespace jca::sm90;

template <class Layout, class E>
int mismatches(const char* name) {
  constexpr int R = size<0>(Layout{}), C = size<1>(Layout{});
  alignas(1024) static E buf[cosize_v<Layout>];
  Tensor t = make_tensor(make_smem_ptr(buf), Layout{});
  int bad = 0;
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      const long want = long(raw_pointer_cast(&t(r, c)) - buf) * long(sizeof(E));
      const long got = long(smem_byte_offset<Layout>(r, c));
      if (want != got && bad++ < 3)
        std::printf("%s (%d, %d): CuTe %ld bytes, smem_byte_offset %ld\n", name, r, c, want, got);
    }
  std::printf("%s %dx%d: %d mismatches\n", name, R, C, bad);
  return bad;
}

template <int D, class T>
int check_dim(const char* dq, const char* dkv) {
  using Dq = BwdDqTraits<D, T>;
  using Dkv = BwdDkvTraits<D, T, false>;
  return mismatches<typename Dq::SmemLayoutQ, typename Dq::Element>(dq) +
         mismatches<typename Dkv::SmemLayoutKV, typename Dkv::Element>(dkv);
}

// The D = 128 dK/dV kernel stores a thread's dS^T pairs at pair 0's offset + 1024 (j & 1),
// XOR 16 (j >> 1): pair j of an m64 accumulator is at rows r0 + 8 (j & 1), columns c0 + 8 (j >> 1),
// where r0 % 16 < 8 and c0 is even and below 8. Checked against smem_byte_offset (itself checked
// against CuTe above) for every such thread position.
template <class T>
int check_ds_pairs(const char* name) {
  using Dkv = BwdDkvTraits<128, T, false>;
  using L = typename Dkv::SmemLayoutdStTile;
  int bad = mismatches<L, typename Dkv::Element>(name);
  int pair_bad = 0;
  for (int r0 = 0; r0 < size<0>(L{}); ++r0) {
    if (r0 % 16 >= 8) continue;
    for (int c0 = 0; c0 < 8; c0 += 2)
      for (int j = 0; j < 16; ++j) {
        const uint32_t want = smem_byte_offset<L>(r0 + 8 * (j & 1), c0 + 8 * (j >> 1));
        const uint32_t got = (smem_byte_offset<L>(r0, c0) + 1024 * (j & 1)) ^ ((j >> 1) << 4);
        if (want != got && pair_bad++ < 3)
          std::printf("%s pair %d at (%d, %d): %u, by the pair rule %u\n", name, j, r0, c0, want,
                      got);
      }
  }
  std::printf("%s pair rule: %d mismatches\n", name, pair_bad);
  return bad + pair_bad;
}

int main() {
  const int bad = check_dim<64, __nv_bfloat16>("dQ q tile D64 bf16", "dK/dV k tile D64 bf16") +
                  check_dim<128, __nv_bfloat16>("dQ q tile D128 bf16", "dK/dV k tile D128 bf16") +
                  check_dim<64, __half>("dQ q tile D64 f16", "dK/dV k tile D64 f16") +
                  check_dim<128, __half>("dQ q tile D128 f16", "dK/dV k tile D128 f16") +
                  check_ds_pairs<__nv_bfloat16>("dK/dV dS^T tile D128 bf16") +
                  check_ds_pairs<__half>("dK/dV dS^T tile D128 f16");
  return bad == 0 ? 0 : 1;
}
