// Throughput of the warpgroup products the sm_90a backward is made of, alone on the card (no
// loads, no elementwise work): is an SS product with N = 64 (both operands read from shared
// memory, 128 B/clk at the full MMA rate) slower per MAC than N = 128 or an RS product?
//
// One CTA per SM with two warpgroups (as the backward's consumers); each repeats one product
// of M = 64 rows, N columns and K = D = 128 (8 k-blocks, as S^T = K Q^T at D = 128) or the RS
// shape of dV += P^T dO (N = 128, K = 64). `inflight` products are kept in flight per
// warpgroup (1: issue, wait, issue ...; 2: two accumulators, wait until one is left).
// `wgs` = 1 lets only the first warpgroup issue: can one warpgroup alone keep the tensor pipe
// busy with these shapes? (A pingpong of the two, as the forward runs, assumes it can; the
// dK/dV kernel's pingpong lost, #40 of NOTES.)
//   scripts/gpu_wgmma_rate.sh OUTDIR   (or: nvcc -std=c++17 -arch=sm_90a --expt-relaxed-constexpr \
//        -I$CUTLASS_INCLUDE -Icuda benchmarks/wgmma_rate.cu -o /tmp/wgmma_rate)
// Prints one JSON line per configuration: TFLOP/s (2 flops per MAC) of the whole card.

// Without this CuTe's ss_op_selector builds an N = 80 product out of m64n16 atoms (#36 of
// NOTES measured exactly that); with it, N = 80 is one m64n80 instruction.
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#include <cstdio>

#include "best_time.cuh"
#include "sm90/common_sm90.cuh"

namespace jca::sm90 {

using E = cutlass::bfloat16_t;

// B of the product: SS, (N, K) K-major; RS, (N, K) MN-major, as dO^T / Q^T in the dK/dV kernel.
// (A specialisation, so that only the chosen layout is instantiated.)
template <int N, int K, bool kRS>
struct LayoutBOf {
  using type = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<E>{}, Shape<Int<N>, Int<K>>{}));
};
template <int N, int K>
struct LayoutBOf<N, K, true> {
  using type = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<E>{}, Shape<Int<N>, Int<K>>{}));
};

template <int N, int K, bool kRS>
struct Shape_ {
  using Tile = Shape<_128, Int<N>, Int<K>>;  // two warpgroups of 64 rows (W = 2)
  using Mma = std::conditional_t<
      kRS,
      decltype(make_tiled_mma(GMMA::rs_op_selector<E, E, float, Tile, GMMA::Major::K,
                                                   GMMA::Major::MN>(),
                              Layout<Shape<_2, _1, _1>>{})),
      decltype(make_tiled_mma(GMMA::ss_op_selector<E, E, float, Tile>(),
                              Layout<Shape<_2, _1, _1>>{}))>;
  // (K = 80 only for RS, where A's layout just sizes the register fragment)
  using AtomA = std::conditional_t<K % 64 == 0, GMMA::Layout_K_SW128_Atom<E>,
                                   GMMA::Layout_K_SW32_Atom<E>>;
  using LayoutA = decltype(tile_to_shape(AtomA{}, Shape<_128, Int<K>>{}));
  using LayoutB = typename LayoutBOf<N, K, kRS>::type;
  static constexpr size_t kSmem = (cosize_v<LayoutA> + cosize_v<LayoutB>) * sizeof(E);
};

template <int N, int K, bool kRS, int kInflight, int kWGs>
__global__ void __launch_bounds__(256, 1) rate_kernel(int iters, float* sink) {
  using S = Shape_<N, K, kRS>;
  extern __shared__ __align__(1024) unsigned char smem[];
  E* a_ptr = reinterpret_cast<E*>(smem);
  E* b_ptr = a_ptr + cosize_v<typename S::LayoutA>;
  for (int i = threadIdx.x; i < int(S::kSmem / sizeof(E)); i += blockDim.x)
    a_ptr[i] = E(float((i * 37) % 17) * 0.01f);
  __syncthreads();
  if (threadIdx.x >= 128 * kWGs) return;
  Tensor sA = make_tensor(make_smem_ptr(a_ptr), typename S::LayoutA{});
  Tensor sB = make_tensor(make_smem_ptr(b_ptr), typename S::LayoutB{});
  typename S::Mma mma;
  auto thr = mma.get_thread_slice(threadIdx.x);
  Tensor tA = thr.partition_fragment_A(sA);  // registers for RS, descriptors for SS
  Tensor tB = thr.partition_fragment_B(sB);
  if constexpr (kRS) {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(tA); ++i) tA(i) = E(float((threadIdx.x + i) % 7) * 0.01f);
  }
  Tensor acc0 = partition_fragment_C(mma, Shape<_128, Int<N>>{});
  Tensor acc1 = partition_fragment_C(mma, Shape<_128, Int<N>>{});
  clear(acc0);
  clear(acc1);
  for (int it = 0; it < iters; ++it) {
    wg_gemm<false, kRS>(mma, tA, tB, acc0);
    if constexpr (kInflight == 2) {
      wg_gemm<false, kRS>(mma, tA, tB, acc1);
      warpgroup_wait<1>();
    } else {
      warpgroup_wait<0>();
    }
  }
  warpgroup_wait<0>();
  float s = 0.f;
  CUTLASS_PRAGMA_UNROLL
  for (int i = 0; i < size(acc0); ++i) s += acc0(i) + acc1(i);
  if (s == 1234.5f) sink[threadIdx.x] = s;  // keeps the products alive
}

template <int N, int K, bool kRS, int kInflight, int kWGs = 2>
void run(const char* name, int sms, float* sink) {
  using S = Shape_<N, K, kRS>;
  auto kernel = rate_kernel<N, K, kRS, kInflight, kWGs>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(S::kSmem));
  const int iters = 4000;
  const float best = best_time_ms([&] { kernel<<<sms, 256, S::kSmem>>>(iters, sink); });
  const double macs = double(sms) * iters * kInflight * 64.0 * kWGs * N * K;
  std::printf(
      "{\"product\": \"%s\", \"rs\": %s, \"N\": %d, \"K\": %d, \"inflight\": %d, "
      "\"wgs\": %d, \"ms\": %.3f, \"tflops\": %.1f, \"err\": \"%s\"}\n",
      name, kRS ? "true" : "false", N, K, kInflight, kWGs, best, tflops(macs, best),
      cudaGetErrorString(cudaGetLastError()));
}

}  // namespace jca::sm90

int main() {
  using namespace jca::sm90;
  const Card card;
  const int sms = card.sms;
  float* sink = card.sink;
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  std::printf("{\"device\": \"%s\", \"sms\": %d}\n", prop.name, sms);
  // S^T = K Q^T at D = 128 as the dK/dV kernel runs it (N = 64 queries), and with N = 128
  run<64, 128, false, 1>("SS m64n64 K128 (S^T, dP^T now)", sms, sink);
  run<64, 128, false, 2>("SS m64n64 K128 (S^T, dP^T now)", sms, sink);
  // FA3's non-causal D = 128 tile (80 queries; #36 of NOTES lost 30 % with it) and 96
  run<80, 128, false, 1>("SS m64n80 K128", sms, sink);
  run<96, 128, false, 1>("SS m64n96 K128", sms, sink);
  run<128, 128, false, 1>("SS m64n128 K128", sms, sink);
  run<128, 128, false, 2>("SS m64n128 K128", sms, sink);
  run<256, 128, false, 1>("SS m64n256 K128", sms, sink);
  // the same products with A (K, V rows) held in registers
  run<64, 128, true, 1>("RS m64n64 K128", sms, sink);
  run<64, 128, true, 2>("RS m64n64 K128", sms, sink);
  // dV += P^T dO, dK += dS^T Q at D = 128 (N = D, K = 64 queries)
  run<128, 64, true, 1>("RS m64n128 K64 (dV, dK now)", sms, sink);
  run<128, 64, true, 2>("RS m64n128 K64 (dV, dK now)", sms, sink);
  run<128, 80, true, 1>("RS m64n128 K80 (dV, dK at 80 queries)", sms, sink);
  // one warpgroup issuing, the other idle (a pingpong's phases)
  run<64, 128, false, 1, 1>("SS m64n64 K128, one warpgroup", sms, sink);
  run<64, 128, false, 2, 1>("SS m64n64 K128, one warpgroup", sms, sink);
  run<128, 128, false, 1, 1>("SS m64n128 K128, one warpgroup", sms, sink);
  run<128, 64, true, 1, 1>("RS m64n128 K64, one warpgroup", sms, sink);
  run<128, 64, true, 2, 1>("RS m64n128 K64, one warpgroup", sms, sink);
  return 0;
}
