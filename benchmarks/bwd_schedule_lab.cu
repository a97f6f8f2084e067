// The dK/dV step of the sm_90a backward (D = 128) with its loads taken away: the same products,
// register layouts and elementwise work as cuda/sm90/bwd_dkdv_kernel_sm90.cuh, on tiles that
// stay in shared memory, under different schedules of the two consumer warpgroups. It answers
// two questions cheaply: does the schedule alone reproduce the kernel's ≈ 60 % of peak (then the
// loads and barriers are not the problem), and which schedule keeps the tensor pipe busier?
//   0  as built: S^T, dP^T; wait S^T, exponentials; wait dP^T, dS^T; dV, dK; wait
//   1  pingpong: the warpgroups take turns to issue (named barriers), so one's exponentials and
//      dS^T run under the other's products
//   2  as 0 without the elementwise math (the bound the products alone allow)
//   3  as 0, dV and dK issued separately: dV right after P^T is packed (#15 of NOTES, in the
//      lab), dK after dS^T
//   4  S^T of step j+1 issued right behind dV, dK of step j; dP^T of a step issued after the
//      wait for its S^T, so the exponentials run under dP^T (one extra S^T per CTA: ≈ 1/(2
//      steps) more work, not counted)
//   5  4 with the pingpong turns of 1 around its two issue points
// One CTA per SM; warpgroup 0 gives its registers away as the kernel's producer does (24 / 240).
//   scripts/gpu_wgmma_rate.sh OUTDIR builds and runs it next to benchmarks/wgmma_rate.cu.
// ptxas spills a few registers per step here (schedule 0: 28 B, 3: 88 B, 4: 40 B; 5: none)
// where the kernels (main, and benchmarks/experiments/dkdv-lookahead.diff for 4) have none:
// read small gaps between schedules with that in mind.
// Prints one JSON line per schedule: TFLOP/s of the four products over the whole card.
#include <cstdio>

#include "best_time.cuh"
#include "sm90/common_sm90.cuh"

namespace jca::sm90 {

struct Lab {
  using E = cutlass::bfloat16_t;
  static constexpr int D = 128, BN = 128, BM = 64;
  using SplitM = Layout<Shape<_2, _1, _1>>;
  using MmaSdP = decltype(make_tiled_mma(
      GMMA::ss_op_selector<E, E, float, Shape<Int<BN>, Int<BM>, Int<D>>>(), SplitM{}));
  using MmaKV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<E, E, float, Shape<Int<BN>, Int<D>, Int<BM>>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      SplitM{}));
  using AtomK = GMMA::Layout_K_SW128_Atom<E>;
  using SmemLayoutKV = decltype(tile_to_shape(AtomK{}, Shape<Int<BN>, Int<D>>{}));
  using SmemLayoutQ = decltype(tile_to_shape(AtomK{}, Shape<Int<BM>, Int<D>, _2>{}));
  using SmemLayoutQt = decltype(composition(
      SmemLayoutQ{}, make_ordered_layout(Shape<Int<D>, Int<BM>, _2>{}, Step<_2, _1, _3>{})));
  struct Smem {
    alignas(1024) cute::array_aligned<E, cosize_v<SmemLayoutKV>> k, v;
    alignas(1024) cute::array_aligned<E, cosize_v<SmemLayoutQ>> q, dout;
    float lse2[2][BM], delta[2][BM];
  };
};

template <int kSched>
__global__ void __launch_bounds__(384, 1) lab_kernel(int steps, float* sink) {
  using E = Lab::E;
  constexpr int BN = Lab::BN, BM = Lab::BM;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  auto& ss = *reinterpret_cast<Lab::Smem*>(smem_raw);
  // small values: the logits stay far below lse2, nothing overflows
  for (int i = threadIdx.x; i < int(cosize_v<Lab::SmemLayoutKV>); i += blockDim.x) {
    ss.k[i] = E(float((i * 13) % 11) * 0.002f);
    ss.v[i] = E(float((i * 7) % 5) * 0.003f);
  }
  for (int i = threadIdx.x; i < int(cosize_v<Lab::SmemLayoutQ>); i += blockDim.x) {
    ss.q[i] = E(float((i * 5) % 9) * 0.002f);
    ss.dout[i] = E(float((i * 3) % 7) * 0.003f);
  }
  for (int i = threadIdx.x; i < 2 * BM; i += blockDim.x) {
    (&ss.lse2[0][0])[i] = 4.f + 0.01f * (i % 13);
    (&ss.delta[0][0])[i] = 0.001f * (i % 17);
  }
  __syncthreads();
  const int wg = threadIdx.x / 128;
  if (wg == 0) {  // the kernel's producer warpgroup: registers given back, no work here
    cutlass::arch::warpgroup_reg_dealloc<24>();
    return;
  }
  cutlass::arch::warpgroup_reg_alloc<240>();
  const int ctid = threadIdx.x - 128;
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), Lab::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), Lab::SmemLayoutKV{});
  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), Lab::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(ss.dout.data()), Lab::SmemLayoutQ{});
  Tensor sQt = make_tensor(make_smem_ptr(ss.q.data()), Lab::SmemLayoutQt{});
  Tensor sdOt = make_tensor(make_smem_ptr(ss.dout.data()), Lab::SmemLayoutQt{});
  Lab::MmaSdP mma_sdp;
  Lab::MmaKV mma_kv;
  auto thr_sdp = mma_sdp.get_thread_slice(ctid);
  auto thr_kv = mma_kv.get_thread_slice(ctid);
  Tensor tSrK = thr_sdp.partition_fragment_A(sK);
  Tensor tSrV = thr_sdp.partition_fragment_A(sV);
  Tensor tSrQ = thr_sdp.partition_fragment_B(sQ);
  Tensor tSrdO = thr_sdp.partition_fragment_B(sdO);
  Tensor tVrdOt = thr_kv.partition_fragment_B(sdOt);
  Tensor tKrQt = thr_kv.partition_fragment_B(sQt);
  Tensor tdVrdV = partition_fragment_C(mma_kv, Shape<Int<BN>, Int<Lab::D>>{});
  Tensor tdKrdK = partition_fragment_C(mma_kv, Shape<Int<BN>, Int<Lab::D>>{});
  Tensor tScS = thr_sdp.partition_C(make_identity_tensor(Shape<Int<BN>, Int<BM>>{}));
  auto new_s = [&]() { return partition_fragment_C(mma_sdp, Shape<Int<BN>, Int<BM>>{}); };
  using STensor = decltype(new_s());
  Tensor rP = make_tensor_like<E>(new_s());
  Tensor rdS = make_tensor_like<E>(new_s());
  Tensor tKVrP = make_tensor(rP.data(), acc_as_a_operand(rP.layout()));
  Tensor tKVrdS = make_tensor(rdS.data(), acc_as_a_operand(rdS.layout()));
  clear(tdVrdV);
  clear(tdKrdK);
  const float c2 = 10.f * kLog2e;
  const Pingpong turn(wg, (kSched == 1 || kSched == 5) && steps > 0);
  constexpr int kAcc = decltype(size(STensor{}))::value;
  // The step's elementwise work, as in the kernel (schedule 2 leaves out the math).
  auto load_stats = [&](float(&dst)[kAcc], const float* row) {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kAcc; ++i) dst[i] = row[get<1>(tScS(i))];
  };
  auto make_p = [&](STensor& tSrS, const float(&lse_r)[kAcc]) {  // P^T in place, packed to rP
    uint32_t* dp_ = reinterpret_cast<uint32_t*>(raw_pointer_cast(rP.data()));
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kAcc; i += 2) {
      CUTLASS_PRAGMA_UNROLL
      for (int e = 0; e < 2; ++e)
        if constexpr (kSched != 2) tSrS(i + e) = ex2(fmaf(tSrS(i + e), c2, -lse_r[i + e]));
      dp_[i / 2] = MmaOp<__nv_bfloat16>::pack(tSrS(i), tSrS(i + 1));
    }
  };
  auto make_ds = [&](const STensor& tSrS, const STensor& tSrdP, const float(&delta_r)[kAcc]) {
    uint32_t* dds = reinterpret_cast<uint32_t*>(raw_pointer_cast(rdS.data()));
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kAcc; i += 2) {
      float dsv[2];
      CUTLASS_PRAGMA_UNROLL
      for (int e = 0; e < 2; ++e)
        dsv[e] = kSched == 2 ? tSrdP(i + e) : tSrS(i + e) * (tSrdP(i + e) - delta_r[i + e]);
      dds[i / 2] = MmaOp<__nv_bfloat16>::pack(dsv[0], dsv[1]);
    }
  };

  if constexpr (kSched == 4 || kSched == 5) {
    constexpr bool kTurns = kSched == 5;
    // S^T of step j+1 queued right behind dV, dK of step j. ptxas (CUDA 13.0) keeps the wgmmas
    // asynchronous only if an accumulator in flight across the loop's back edge is read after a
    // full wait: with dP^T(j+1) issued first and a wait<1> it serialises every wgmma (C7514).
    STensor tSrS = new_s();
    STensor tSrdP = new_s();
    wg_gemm<true, false>(mma_sdp, tSrK, tSrQ(_, _, _, 0), tSrS);
    for (int step = 0; step < steps; ++step) {
      const int st = step & 1;
      warpgroup_wait<0>();  // S^T of this step, dV and dK of the previous one
      warpgroup_fence_operand(tSrS);
      if constexpr (kTurns) turn.wait();
      wg_gemm<true, false>(mma_sdp, tSrV, tSrdO(_, _, _, st), tSrdP);
      if constexpr (kTurns) turn.pass();
      // read here, not before the wait: P, dS of the previous step are live until then
      float lse_r[kAcc], delta_r[kAcc];
      load_stats(lse_r, ss.lse2[st]);
      make_p(tSrS, lse_r);
      load_stats(delta_r, ss.delta[st]);
      warpgroup_wait<0>();
      warpgroup_fence_operand(tSrdP);
      make_ds(tSrS, tSrdP, delta_r);
      if constexpr (kTurns) turn.wait();
      wg_gemm<false, true>(mma_kv, tKVrP, tVrdOt(_, _, _, st), tdVrdV);
      wg_gemm<false, true>(mma_kv, tKVrdS, tKrQt(_, _, _, st), tdKrdK);
      // (the last step's extra S^T reads a valid tile here; the kernel would peel it)
      wg_gemm<true, false>(mma_sdp, tSrK, tSrQ(_, _, _, st ^ 1), tSrS);
      if constexpr (kTurns) turn.pass_unless_last(step + 1 == steps);
    }
    warpgroup_wait<0>();
  } else
  for (int step = 0; step < steps; ++step) {
    const int st = step & 1;
    STensor tSrS = new_s();
    STensor tSrdP = new_s();
    if constexpr (kSched == 1) turn.wait();
    wg_gemm<true, false>(mma_sdp, tSrK, tSrQ(_, _, _, st), tSrS);
    wg_gemm<true, false>(mma_sdp, tSrV, tSrdO(_, _, _, st), tSrdP);
    if constexpr (kSched == 1) turn.pass();
    float lse_r[kAcc], delta_r[kAcc];
    load_stats(lse_r, ss.lse2[st]);
    warpgroup_wait<1>();
    warpgroup_fence_operand(tSrS);
    make_p(tSrS, lse_r);
    if constexpr (kSched == 3) wg_gemm<false, true>(mma_kv, tKVrP, tVrdOt(_, _, _, st), tdVrdV);
    load_stats(delta_r, ss.delta[st]);
    warpgroup_wait<kSched == 3 ? 1 : 0>();
    warpgroup_fence_operand(tSrdP);
    make_ds(tSrS, tSrdP, delta_r);
    if constexpr (kSched == 1) turn.wait();
    if constexpr (kSched != 3) wg_gemm<false, true>(mma_kv, tKVrP, tVrdOt(_, _, _, st), tdVrdV);
    wg_gemm<false, true>(mma_kv, tKVrdS, tKrQt(_, _, _, st), tdKrdK);
    if constexpr (kSched == 1) turn.pass_unless_last(step + 1 == steps);
    warpgroup_wait<0>();
  }
  float s = 0.f;
  CUTLASS_PRAGMA_UNROLL
  for (int i = 0; i < size(tdVrdV); ++i) s += tdVrdV(i) + tdKrdK(i);
  if (s == 1234.5f) sink[threadIdx.x] = s;  // keeps the products alive
}

template <int kSched>
void run(const char* name, int sms, float* sink) {
  auto kernel = lab_kernel<kSched>;
  const int smem = int(sizeof(Lab::Smem));
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  const int steps = 2000;
  const float best = best_time_ms([&] { kernel<<<sms, 384, smem>>>(steps, sink); });
  // four products of 128 keys x 64 queries x 128 per CTA step
  const double macs = double(sms) * steps * 4.0 * Lab::BN * Lab::BM * Lab::D;
  std::printf(
      "{\"schedule\": %d, \"name\": \"%s\", \"ms\": %.3f, \"tflops\": %.1f, \"err\": \"%s\"}\n",
      kSched, name, best, tflops(macs, best),
      cudaGetErrorString(cudaGetLastError()));
}

}  // namespace jca::sm90

int main() {
  using namespace jca::sm90;
  const Card card;
  run<0>("as built", card.sms, card.sink);
  run<1>("pingpong", card.sms, card.sink);
  run<2>("no elementwise math", card.sms, card.sink);
  run<3>("dV issued after P^T", card.sms, card.sink);
  run<4>("next S^T behind dV, dK", card.sms, card.sink);
  run<5>("4 with pingpong turns", card.sms, card.sink);
  return 0;
}
