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

int main() {
  const int bad = check_dim<64, __nv_bfloat16>("dQ q tile D64 bf16", "dK/dV k tile D64 bf16") +
                  check_dim<128, __nv_bfloat16>("dQ q tile D128 bf16", "dK/dV k tile D128 bf16") +
                  check_dim<64, __half>("dQ q tile D64 f16", "dK/dV k tile D64 f16") +
                  check_dim<128, __half>("dQ q tile D128 f16", "dK/dV k tile D128 f16");
  return bad == 0 ? 0 : 1;
}
