// Hopper (sm_90a) dK/dV kernel for 64-query steps (D = 128), with the products of the next step
// issued ahead. The one-role kernel of bwd_dkdv_kernel_sm90.cuh runs each warpgroup's step as a
// chain (S^T, dP^T -> exponentials -> dS^T -> dV, dK -> wait), so its tensor pipe idles whenever
// the two warpgroups' elementwise phases meet. Here a warpgroup issues S^T, dP^T of step j+1
// ahead of dV, dK of step j; the in-order wgmma queue completes S^T first, so the exponentials
// and dS^T of j+1 run under the warpgroup's own dP^T(j+1), dV(j), dK(j).
//   registers: dK, dV (128), the packed P^T, dS^T of j (32, read by dV, dK of j) and S^T, dP^T
//   of j+1 (64) are all live: ptxas needs ≈ 256 registers a thread, which a producer warpgroup
//   (setmaxnreg: 24 + 2 x 240) does not leave. So the CTA is the two consumer warpgroups only,
//   and warp 0 issues the loads (TMA for Q and dO, cp.async for the rows' lse2 / delta, one
//   mbarrier): once per step it loads every stage that all eight warps have released, without
//   waiting for one, and drains the rest after its own last step.
//   stages: step j+1's operands are read while step j's are still in flight, so the ring has
//   three stages (two in use, one loading).
// Everything else (scope, masks, lengths, GQA, kNorm epilogue) is the one-role kernel's.
#pragma once
#include "bwd_dkdv_kernel_sm90.cuh"

namespace jca::sm90 {

__device__ __forceinline__ void cp_async_mbarrier_arrive_noinc(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_u32(bar))
               : "memory");
}

template <class Tr, bool kNorm>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    bwd_dkdv_ahead_kernel_sm90(CUTE_GRID_CONSTANT const BwdDkvArgs<Tr> args) {
  static_assert(Tr::kIssueAhead && Tr::kThreads == 256);
  using T = typename Tr::T;
  using Element = typename Tr::Element;
  using FullBar = cutlass::arch::ClusterTransactionBarrier;
  using EmptyBar = cutlass::arch::ClusterBarrier;
  constexpr int D = Tr::D, BN = Tr::BN, BM = Tr::BM, STAGES = Tr::STAGES;
  constexpr int kWarps = Tr::kThreads / 32;
  const Params& p = args.p;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  auto& ss = *reinterpret_cast<typename Tr::SharedStorage*>(smem_raw);

  const int kh = blockIdx.y, b = blockIdx.z;
  const int s0 = blockIdx.x * BN;
  const RowLimits L = make_limits(p, b);
  const bool any_key = s0 < L.kvlen;
  const int m_begin = any_key ? L.first_row(s0) / BM : 0;
  const int m_end = any_key ? (L.qlen + BM - 1) / BM : 0;
  const int mtiles = max(0, m_end - m_begin);
  const int steps = p.hpk * mtiles;
  // (head, first query row) of a step: GQA heads outer, query tiles inner.
  auto step_at = [&](int step) {
    if (p.hpk == 1) return QueryStep{kh, (m_begin + step) * BM};
    return QueryStep{kh * p.hpk + step / mtiles, (m_begin + step % mtiles) * BM};
  };
  const int wg = uniform_warpgroup();
  const int lane = threadIdx.x % 32;

  if (threadIdx.x == 0) {
    FullBar::init(&ss.kv_full, 1);
    FullBar::init(&ss.raw_full, 1);
    CUTLASS_PRAGMA_UNROLL
    for (int s = 0; s < STAGES; ++s) {
      FullBar::init(&ss.q_full[s], 33);  // 32 lanes' cp.async arrivals + the TMA's expect_tx
      EmptyBar::init(&ss.q_empty[s], kWarps);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Tr::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename Tr::SmemLayoutKV{});
  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Tr::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(ss.dout.data()), typename Tr::SmemLayoutQ{});

  // Q, dO and the rows' lse2 / delta of `step` into stage st; called by a whole warp. Rows past
  // T arrive as zeros (TMA bounds, cp.async zero-fill): L(t) = 0 there, so they are masked.
  auto load_step = [&](int step, int st) {
    const QueryStep at = step_at(step);
    const float* delta_g = static_cast<const float*>(p.workspace);
    const float* lse2_g = delta_g + int64_t(p.B) * p.N * p.T;
    const int64_t row0 = (int64_t(b) * p.N + at.n) * p.T;
    for (int r = lane; r < BM; r += 32) {
      const int t = at.tq0 + r;
      const int64_t ri = row0 + min(t, p.T - 1);
      cp_async4(&ss.lse2[st][r], lse2_g + ri, t < p.T);
      cp_async4(&ss.delta[st][r], delta_g + ri, t < p.T);
    }
    cp_async_mbarrier_arrive_noinc(&ss.q_full[st]);
    if (lane == 0) {
      Tensor mQ = args.tma_q.get_tma_tensor(make_shape(p.T, Int<D>{}, p.N, p.B));
      Tensor mdO = args.tma_do.get_tma_tensor(make_shape(p.T, Int<D>{}, p.N, p.B));
      const auto tile = make_coord(at.tq0 / BM, _0{});
      Tensor gQ = local_tile(mQ(_, _, at.n, b), Shape<Int<BM>, Int<D>>{}, tile);
      Tensor gdO = local_tile(mdO(_, _, at.n, b), Shape<Int<BM>, Int<D>>{}, tile);
      auto tq = args.tma_q.get_slice(_0{});
      auto tdo = args.tma_do.get_slice(_0{});
      FullBar::arrive_and_expect_tx(&ss.q_full[st], 2 * Tr::kQBytes);
      copy(args.tma_q.with(ss.q_full[st], 0), tq.partition_S(gQ), tq.partition_D(sQ)(_, _, _, st));
      copy(args.tma_do.with(ss.q_full[st], 0), tdo.partition_S(gdO),
           tdo.partition_D(sdO)(_, _, _, st));
    }
  };
  // After this warp's last read of `step`'s stage.
  auto release = [&](int step) {
    __syncwarp();
    if (lane == 0) EmptyBar::arrive(&ss.q_empty[step % STAGES]);
  };
  // Warp 0: the loads of the steps whose stage is free, in order; `block`: wait for each.
  auto load_free_stages = [&](bool block) {
    int next_load = ss.next_load;
    for (; next_load < steps; ++next_load) {
      const int st = next_load % STAGES;
      const uint32_t parity = ((next_load / STAGES) - 1) & 1;
      if (block) {
        EmptyBar::wait(&ss.q_empty[st], parity);
      } else {
        const int free = lane == 0 ? EmptyBar::test_wait(&ss.q_empty[st], parity, 1) : 0;
        if (!__shfl_sync(0xffffffffu, free, 0)) break;
      }
      load_step(next_load, st);
    }
    __syncwarp();
    if (lane == 0) ss.next_load = next_load;
  };

  if (threadIdx.x < 32 && steps > 0) {
    if (lane == 0) {
      Tensor mK = args.tma_k.get_tma_tensor(make_shape(p.S, Int<D>{}, p.KH, p.B));
      Tensor mV = args.tma_v.get_tma_tensor(make_shape(p.S, Int<D>{}, p.KH, p.B));
      auto tk = args.tma_k.get_slice(_0{});
      auto tv = args.tma_v.get_slice(_0{});
      const auto kv_tile = make_coord(int(blockIdx.x), _0{});
      Tensor gK = local_tile(mK(_, _, kh, b), Shape<Int<BN>, Int<D>>{}, kv_tile);
      Tensor gV = local_tile(mV(_, _, kh, b), Shape<Int<BN>, Int<D>>{}, kv_tile);
      FullBar::arrive_and_expect_tx(&ss.kv_full, 2 * Tr::kKVBytes);
      copy(args.tma_k.with(ss.kv_full, 0), tk.partition_S(gK), tk.partition_D(sK));
      copy(args.tma_v.with(ss.kv_full, 0), tv.partition_S(gV), tv.partition_D(sV));
    }
    for (int s = 0; s < min(STAGES, steps); ++s) load_step(s, s);
    if (lane == 0) ss.next_load = min(STAGES, steps);
    if (kNorm && lane == 0) {  // raw k rows for the epilogue: land while the main loop runs
      Tensor mKr = args.tma_k_raw.get_tma_tensor(make_shape(p.S, Int<D>{}, p.KH, p.B));
      Tensor gKr = local_tile(mKr(_, _, kh, b), Shape<Int<BN>, Int<D>>{},
                              make_coord(int(blockIdx.x), _0{}));
      Tensor sKr = make_tensor(make_smem_ptr(ss.raw.k.data()), typename Tr::SmemLayoutKV{});
      auto tkr = args.tma_k_raw.get_slice(_0{});
      FullBar::arrive_and_expect_tx(&ss.raw_full, Tr::kKVBytes);
      copy(args.tma_k_raw.with(ss.raw_full, 0), tkr.partition_S(gKr), tkr.partition_D(sKr));
    }
  }

  typename Tr::MmaSdP mma_sdp;
  typename Tr::MmaKV mma_kv;
  auto thr_sdp = mma_sdp.get_thread_slice(threadIdx.x);
  auto thr_kv = mma_kv.get_thread_slice(threadIdx.x);
  // descriptors of the shared-memory operands: from the warpgroup's slice (uniform registers)
  auto wg_sdp = mma_sdp.get_slice(wg * 128);
  auto wg_kv = mma_kv.get_slice(wg * 128);
  Tensor sQt = make_tensor(make_smem_ptr(ss.q.data()), typename Tr::SmemLayoutQt{});
  Tensor sdOt = make_tensor(make_smem_ptr(ss.dout.data()), typename Tr::SmemLayoutQt{});
  Tensor tSrK = wg_sdp.partition_fragment_A(sK);
  Tensor tSrV = wg_sdp.partition_fragment_A(sV);
  Tensor tSrQ = wg_sdp.partition_fragment_B(sQ);  // (MMA, N, K, STAGES)
  Tensor tSrdO = wg_sdp.partition_fragment_B(sdO);
  Tensor tVrdOt = wg_kv.partition_fragment_B(sdOt);
  Tensor tKrQt = wg_kv.partition_fragment_B(sQt);
  Tensor tdVrdV = partition_fragment_C(mma_kv, Shape<Int<BN>, Int<D>>{});
  Tensor tdKrdK = partition_fragment_C(mma_kv, Shape<Int<BN>, Int<D>>{});
  Tensor tScS = thr_sdp.partition_C(make_identity_tensor(Shape<Int<BN>, Int<BM>>{}));
  Tensor tKVc = thr_kv.partition_C(make_identity_tensor(Shape<Int<BN>, Int<D>>{}));
  auto new_s = [&]() { return partition_fragment_C(mma_sdp, Shape<Int<BN>, Int<BM>>{}); };
  using STensor = decltype(new_s());
  clear(tdVrdV);
  clear(tdKrdK);

  // Keys of this warpgroup: s0 + 64 wg + [0, 64); the query rows seeing this thread's two keys
  // are [first_seen[h], qlen).
  const int wg_key0 = s0 + 64 * wg;
  int first_seen[2];
  CUTLASS_PRAGMA_UNROLL
  for (int h = 0; h < 2; ++h) first_seen[h] = L.first_seeing_row(s0 + get<0>(tScS(2 * h)));

  Tensor rP = make_tensor_like<Element>(new_s());
  Tensor rdS = make_tensor_like<Element>(new_s());
  Tensor tKVrP = make_tensor(rP.data(), acc_as_a_operand(rP.layout()));
  Tensor tKVrdS = make_tensor(rdS.data(), acc_as_a_operand(rdS.layout()));
  const bool one_scale = group_shares_scale(p, kh);  // dK scaled once in the epilogue

  struct StepCtx {  // what a step's elementwise work needs
    int st, t0;
    float sc, c2;
    bool check;  // the warpgroup's block crosses a row limit
  };
  auto ctx_of = [&](int step) {
    const QueryStep at = step_at(step);
    StepCtx c;
    c.st = step % STAGES;
    c.t0 = at.tq0;
    c.sc = p.scale[at.n];
    c.c2 = c.sc * kLog2e;
    c.check = wg_key0 + 64 > min(L(at.tq0), L(at.tq0 + BM - 1));
    return c;
  };
  auto issue_sdp = [&](int st, STensor& s, STensor& dp) {
    wg_gemm<true, false>(mma_sdp, tSrK, tSrQ(_, _, _, st), s);
    wg_gemm<true, false>(mma_sdp, tSrV, tSrdO(_, _, _, st), dp);
  };
  auto issue_kv = [&](int st) {
    wg_gemm<false, true>(mma_kv, tKVrP, tVrdOt(_, _, _, st), tdVrdV);
    wg_gemm<false, true>(mma_kv, tKVrdS, tKrQt(_, _, _, st), tdKrdK);
  };
  // P^T = 2^(S^T c - lse2) in place; zero where the query does not see the key.
  auto make_p = [&](STensor& s, const StepCtx& c) {
    warpgroup_fence_operand(s);
    const float* lse2 = ss.lse2[c.st];
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(s); ++i) s(i) = ex2(fmaf(s(i), c.c2, -lse2[get<1>(tScS(i))]));
    if (c.check) {
      const int row_lo[2] = {first_seen[0] - c.t0, first_seen[1] - c.t0};
      const int row_hi = L.qlen - c.t0;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(s); ++i) {
        const int q = get<1>(tScS(i));
        s(i) = q >= row_lo[(i >> 1) & 1] && q < row_hi ? s(i) : 0.f;
      }
    }
  };
  // dS^T = P^T (dP^T - delta) in place of dP^T.
  auto make_ds = [&](const STensor& s, STensor& dp, const StepCtx& c) {
    warpgroup_fence_operand(dp);
    const float* delta = ss.delta[c.st];
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(s); ++i) dp(i) = s(i) * (dp(i) - delta[get<1>(tScS(i))]);
  };
  // The A operands of dV, dK: P^T and dS^T (times the head's scale unless the group shares it)
  // in 16 bits.
  auto pack = [&](const STensor& s, const STensor& ds, const StepCtx& c) {
    uint32_t* dp_ = reinterpret_cast<uint32_t*>(raw_pointer_cast(rP.data()));
    uint32_t* dds = reinterpret_cast<uint32_t*>(raw_pointer_cast(rdS.data()));
    auto body = [&](auto scaled) {
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < size(s) / 2; ++j) {
        dp_[j] = MmaOp<T>::pack(s(2 * j), s(2 * j + 1));
        if constexpr (decltype(scaled)::value)
          dds[j] = MmaOp<T>::pack(ds(2 * j) * c.sc, ds(2 * j + 1) * c.sc);
        else
          dds[j] = MmaOp<T>::pack(ds(2 * j), ds(2 * j + 1));
      }
    };
    if (one_scale) body(BoolC<false>{});
    else body(BoolC<true>{});
  };

  if (steps > 0) FullBar::wait(&ss.kv_full, 0);
  if (steps > 0) {
    const StepCtx c = ctx_of(0);
    STensor s = new_s();
    STensor dp = new_s();
    FullBar::wait(&ss.q_full[0], 0);
    issue_sdp(0, s, dp);
    warpgroup_wait<1>();
    make_p(s, c);
    warpgroup_wait<0>();
    make_ds(s, dp, c);
    pack(s, dp, c);
  }
  for (int step = 0; step + 1 < steps; ++step) {
    const StepCtx c = ctx_of(step + 1);
    STensor s = new_s();
    STensor dp = new_s();
    FullBar::wait(&ss.q_full[c.st], ((step + 1) / STAGES) & 1);
    issue_sdp(c.st, s, dp);
    issue_kv(step % STAGES);
    warpgroup_wait<3>();
    make_p(s, c);
    warpgroup_wait<2>();
    make_ds(s, dp, c);
    warpgroup_wait<0>();
    release(step);
    pack(s, dp, c);
    if (threadIdx.x < 32) load_free_stages(false);
  }
  if (steps > 0) {
    issue_kv((steps - 1) % STAGES);
    warpgroup_wait<0>();
    if (threadIdx.x < 32) load_free_stages(true);
  }

  store_dkdv<Tr, kNorm>(p, ss, tdKrdK, tdVrdV, tKVc, s0, kh, b, steps > 0, one_scale);
  // Launched to overlap the dQ kernel (launch_dkdv): this CTA may not complete before it, or the
  // work after this kernel could read an unfinished dq.
  wait_for_previous_grid();
}

}  // namespace jca::sm90
