// Hopper (sm_90a) dK/dV kernel of the backward. One CTA per (128-key tile, kv head, batch) loops
// over the query heads of its GQA group and their query tiles (128 rows at D = 64, else 64);
// dK and dV stay in registers and are stored once.
//   warpgroup 0    producer warp: TMA of K and V once, then Q and dO tiles into a 2-stage ring;
//                  its lanes stage the tile's lse2 and delta rows next to them in smem.
//   warpgroups 1-2 64 keys each. Per query tile:
//                  S^T = K Q^T and dP^T = V dO^T (SS wgmma), P^T = 2^(S^T c - lse2),
//                  dS^T = P^T (dP^T - delta); dV += P^T dO and dK += (scale dS^T) Q (RS wgmma,
//                  P and dS from registers; a scale shared by the GQA group is applied to dK
//                  once at the end).
//                  With FuseDq (FA3's 5-product backward) each also stores its dS half to smem;
//                  after a barrier of both, dQ = dS K (SS wgmma, the warpgroups split D) is
//                  staged in smem and each warp TMA reduce-adds its 16 x D/2 block into the
//                  zeroed dq_acc (opt-in: Params::sm90_fused_dq). Without it (the default,
//                  and always in deterministic mode) dQ is the separate, forward-shaped kernel
//                  of bwd_dq_kernel_sm90.cuh and nothing uses atomics.
// With Params::k_raw (kNorm, never with FuseDq) the raw k tile arrives by TMA with K and V and
// the epilogue writes d/d k_raw (the l2norm backward of each key row) instead of dK.
// Scope (the dispatcher sends the rest to the sm_80 kernels): head dims 64 and 128, no bias, no
// dense mask. Lengths, causal with T != S, GQA and rows without keys (lse = -inf -> lse2 = +inf
// -> P = 0) are handled.
#pragma once
#include "common_sm90.cuh"

namespace jca::sm90 {

template <int D_, typename T_, bool FuseDq_ = false>
struct BwdDkvTraits {
  static constexpr bool kFuseDq = FuseDq_;
  using T = T_;
  using Element = typename CuteType<T>::type;
  static constexpr int D = D_;
  static constexpr int BN = 128;  // keys per CTA: two consumer warpgroups x 64
  // Query rows per step: 128 at D = 64 (S^T, dP^T as m64n128 products, half the steps: -15 %
  // bwd time measured against 64; the accumulators do not fit at D = 128, nor with FuseDq).
  static constexpr int BM = (D <= 64 && !FuseDq_) ? 128 : 64;
  static constexpr int STAGES = 2;
  static constexpr int kThreads = 128 * 3;
  static constexpr int kConsumerThreads = 256;
  // 24*128 + 240*256 = what the launch's 168*384 frees and takes: setmaxnreg.inc of the consumers
  // spins forever unless the producer gives back at least that much (32 here hangs the CTA).
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;

  using SplitM = Layout<Shape<_2, _1, _1>>;  // warpgroups own 64 key rows each
  // S^T = K Q^T, dP^T = V dO^T: (keys, queries, D), both operands K-major in smem.
  using MmaSdP = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<Int<BN>, Int<BM>, Int<D>>>(), SplitM{}));
  // dV += P^T dO, dK += dS^T Q: (keys, D, queries), A from registers, B = dO / Q MN-major.
  using MmaKV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<Int<BN>, Int<D>, Int<BM>>,
                           GMMA::Major::K, GMMA::Major::MN>(),
      SplitM{}));

  using AtomK = GMMA::Layout_K_SW128_Atom<Element>;
  using SmemLayoutKV = decltype(tile_to_shape(AtomK{}, Shape<Int<BN>, Int<D>>{}));
  using SmemLayoutQ = decltype(tile_to_shape(AtomK{}, Shape<Int<BM>, Int<D>, Int<STAGES>>{}));
  using SmemLayoutQt = decltype(composition(
      SmemLayoutQ{},
      make_ordered_layout(Shape<Int<D>, Int<BM>, Int<STAGES>>{}, Step<_2, _1, _3>{})));

  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, GTensor<Element, D>{},
                                      take<0, 2>(SmemLayoutQ{}), Shape<Int<BM>, Int<D>>{}, _1{}));
  using TmaKV = decltype(make_tma_copy(SM90_TMA_LOAD{}, GTensor<Element, D>{}, SmemLayoutKV{},
                                       Shape<Int<BN>, Int<D>>{}, _1{}));

  static constexpr uint32_t kQBytes = BM * D * sizeof(Element);
  static constexpr uint32_t kKVBytes = BN * D * sizeof(Element);

  // FuseDq: dQ (queries, D, keys) = dS K, the two warpgroups splitting D; dS stored query-major
  // (the S^T accumulators hold consecutive queries in register pairs), double-buffered by step
  // parity so one warpgroup's next dS never overwrites what the other's dQ product still reads.
  using MmaDq = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<Int<BM>, Int<D / 2>, Int<BN>>,
                           GMMA::Major::MN, GMMA::Major::MN>(),
      Layout<Shape<_1, _2, _1>>{}));
  using SmemLayoutdS =
      decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Element>{}, Shape<Int<BM>, Int<BN>, _2>{}));
  using SmemLayoutdSt = decltype(composition(
      SmemLayoutdS{}, make_ordered_layout(Shape<Int<BN>, Int<BM>, _2>{}, Step<_2, _1, _3>{})));
  using SmemLayoutKt = decltype(composition(
      SmemLayoutKV{}, make_ordered_layout(Shape<Int<D>, Int<BN>>{}, Step<_2, _1>{})));
  // Each consumer warp owns 16 rows x D/2 columns of the dQ tile (wgmma accumulator layout) and
  // reduce-adds them into dq_acc with one TMA, from a 128B-swizzled f32 staging tile.
  using SmemLayoutdQw =
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<float>{}, Shape<_16, Int<D / 2>>{}));
  static constexpr int kDqWarpFloats = 16 * (D / 2);
  using TmaDq = decltype(make_tma_copy(SM90_TMA_REDUCE_ADD{}, GTensor<float, D>{},
                                       SmemLayoutdQw{}, Shape<_16, Int<D / 2>>{}, _1{}));
  struct DqStorage {
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutdS>> ds;
    alignas(1024) cute::array_aligned<float, 8 * kDqWarpFloats> dq;  // 8 consumer warps
  };
  struct RawKStorage {
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutKV>> k;
  };
  struct NoStorage {  // the plain kernel: placeholders that are never accessed
    cute::array_aligned<Element, 8> ds;
    cute::array_aligned<float, 4> dq;
  };

  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutKV>> k;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutKV>> v;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> q;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> dout;
    std::conditional_t<kFuseDq, DqStorage, NoStorage> fused;
    // the raw k rows for the fused l2norm backward (Params::k_raw; never with FuseDq)
    std::conditional_t<kFuseDq, NoStorage, RawKStorage> raw;
    float lse2[STAGES][BM], delta[STAGES][BM];
    alignas(8) uint64_t kv_full, raw_full;
    uint64_t q_full[STAGES], q_empty[STAGES];
  };
  static constexpr size_t kSmem = sizeof(SharedStorage);
};

template <class Tr>
struct BwdDkvArgs {
  typename Tr::TmaQ tma_q, tma_do;
  typename Tr::TmaKV tma_k, tma_v, tma_k_raw;  // tma_k_raw: Params::k_raw (else unused)
  typename Tr::TmaDq tma_dq;  // read by the FuseDq kernel only
  Params p;
};

// kNorm: the l2norm backward of k fused into the epilogue (Params::k_raw set; never with
// FuseDq); a separate instantiation, so the plain kernel carries none of it.
template <class Tr, bool kNorm>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    bwd_dkdv_kernel_sm90(CUTE_GRID_CONSTANT const BwdDkvArgs<Tr> args) {
  static_assert(!(kNorm && Tr::kFuseDq));
  using T = typename Tr::T;
  using Element = typename Tr::Element;
  using FullBar = cutlass::arch::ClusterTransactionBarrier;
  using EmptyBar = cutlass::arch::ClusterBarrier;
  constexpr int D = Tr::D, BN = Tr::BN, BM = Tr::BM, STAGES = Tr::STAGES;
  const Params& p = args.p;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  auto& ss = *reinterpret_cast<typename Tr::SharedStorage*>(smem_raw);

  const int kh = blockIdx.y, b = blockIdx.z;
  const int s0 = blockIdx.x * BN;
  const RowLimits L = make_limits(p, b);
  // Query tiles that can see a key of this tile (causal: from the first row reaching s0).
  const bool any_key = s0 < L.kvlen;
  const int m_begin = any_key ? L.first_row(s0) / BM : 0;
  const int m_end = any_key ? (L.qlen + BM - 1) / BM : 0;
  const int mtiles = max(0, m_end - m_begin);
  const int steps = p.hpk * mtiles;
  // (head, query tile) of each step. With 128-query steps (D = 64) walked without the per-step
  // integer division that sat on the consumers' chain before each step's first product (ncu: 6 %
  // of the warp samples; measured -4 % dK/dV time). With 64-query steps (D = 128) the same walk
  // measured +5 %, so there the division stays (benchmarks/NOTES.md, session 11, #41).
  const QuerySteps walk{m_begin * BM, m_end * BM, BM};
  constexpr bool kWalk = BM == 128;
  auto divided = [&](int step) {
    return QueryStep{kh * p.hpk + step / mtiles, (m_begin + step % mtiles) * BM};
  };
  const int wg = uniform_warpgroup();
  const int64_t rows_total = int64_t(p.B) * p.N * p.T;
  const float* delta_g = static_cast<const float*>(p.workspace);
  const float* lse2_g = delta_g + rows_total;

  if (threadIdx.x == 0) {
    FullBar::init(&ss.kv_full, 1);
    FullBar::init(&ss.raw_full, 1);
    CUTLASS_PRAGMA_UNROLL
    for (int s = 0; s < STAGES; ++s) {
      // Every thread that writes or reads the staged lse2 / delta rows arrives itself (its own
      // release), so the hand-over needs no reasoning across lanes.
      FullBar::init(&ss.q_full[s], 32);
      EmptyBar::init(&ss.q_empty[s], Tr::kConsumerThreads);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Tr::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename Tr::SmemLayoutKV{});
  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Tr::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(ss.dout.data()), typename Tr::SmemLayoutQ{});

  // ------------------------------------------------------------------ producer warp
  constexpr int kBarPdS = 1;  // fused dQ: both warpgroups' dS halves are in smem

  if (wg == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Tr::kProducerRegs>();
    if (threadIdx.x / 32 != 0 || steps == 0) return;
    const int lane = threadIdx.x % 32;
    const bool leader = lane == 0;
    Tensor mQ = args.tma_q.get_tma_tensor(make_shape(p.T, Int<D>{}, p.N, p.B));
    Tensor mdO = args.tma_do.get_tma_tensor(make_shape(p.T, Int<D>{}, p.N, p.B));
    Tensor mK = args.tma_k.get_tma_tensor(make_shape(p.S, Int<D>{}, p.KH, p.B));
    Tensor mV = args.tma_v.get_tma_tensor(make_shape(p.S, Int<D>{}, p.KH, p.B));
    auto tq = args.tma_q.get_slice(_0{});
    auto tdo = args.tma_do.get_slice(_0{});
    if (leader) {
      auto tk = args.tma_k.get_slice(_0{});
      auto tv = args.tma_v.get_slice(_0{});
      const auto kv_tile = make_coord(int(blockIdx.x), _0{});
      Tensor gK = local_tile(mK(_, _, kh, b), Shape<Int<BN>, Int<D>>{}, kv_tile);
      Tensor gV = local_tile(mV(_, _, kh, b), Shape<Int<BN>, Int<D>>{}, kv_tile);
      FullBar::arrive_and_expect_tx(&ss.kv_full, 2 * Tr::kKVBytes);
      copy(args.tma_k.with(ss.kv_full, 0), tk.partition_S(gK), tk.partition_D(sK));
      copy(args.tma_v.with(ss.kv_full, 0), tv.partition_S(gV), tv.partition_D(sV));
      if constexpr (kNorm) {  // raw k rows for the epilogue: land while the main loop runs
        Tensor mKr = args.tma_k_raw.get_tma_tensor(make_shape(p.S, Int<D>{}, p.KH, p.B));
        Tensor gKr = local_tile(mKr(_, _, kh, b), Shape<Int<BN>, Int<D>>{}, kv_tile);
        Tensor sKr = make_tensor(make_smem_ptr(ss.raw.k.data()), typename Tr::SmemLayoutKV{});
        auto tkr = args.tma_k_raw.get_slice(_0{});
        FullBar::arrive_and_expect_tx(&ss.raw_full, Tr::kKVBytes);
        copy(args.tma_k_raw.with(ss.raw_full, 0), tkr.partition_S(gKr), tkr.partition_D(sKr));
      }
    }
    Tensor tQs = tq.partition_D(sQ);    // (TMA, TMA_M, TMA_K, STAGES)
    Tensor tdOs = tdo.partition_D(sdO);
    QueryStep at = walk.first(kh * p.hpk);
    for (int step = 0; step < steps; ++step, at = walk.next(at)) {
      if constexpr (!kWalk) at = divided(step);
      const int st = step % STAGES;
      const int n = at.n, m = at.tq0 / BM;
      if (step >= STAGES) EmptyBar::wait(&ss.q_empty[st], ((step / STAGES) - 1) & 1);
      // lse2 / delta of the tile's rows (rows past T: lse2 = +inf -> P = 0)
      const int64_t row0 = (int64_t(b) * p.N + n) * p.T;
      for (int r = lane; r < BM; r += 32) {
        const int t = m * BM + r;
        ss.lse2[st][r] = t < p.T ? lse2_g[row0 + t] : INFINITY;
        ss.delta[st][r] = t < p.T ? delta_g[row0 + t] : 0.f;
      }
      if (!leader) FullBar::arrive(&ss.q_full[st]);
      if (leader) {
        Tensor gQ = local_tile(mQ(_, _, n, b), Shape<Int<BM>, Int<D>>{}, make_coord(m, _0{}));
        Tensor gdO = local_tile(mdO(_, _, n, b), Shape<Int<BM>, Int<D>>{}, make_coord(m, _0{}));
        FullBar::arrive_and_expect_tx(&ss.q_full[st], 2 * Tr::kQBytes);
        copy(args.tma_q.with(ss.q_full[st], 0), tq.partition_S(gQ), tQs(_, _, _, st));
        copy(args.tma_do.with(ss.q_full[st], 0), tdo.partition_S(gdO), tdOs(_, _, _, st));
      }
    }
    return;
  }

  // ------------------------------------------------------------------ consumers
  cutlass::arch::warpgroup_reg_alloc<Tr::kConsumerRegs>();
  const int ctid = threadIdx.x - 128;
  typename Tr::MmaSdP mma_sdp;
  typename Tr::MmaKV mma_kv;
  typename Tr::MmaDq mma_dq;
  auto thr_sdp = mma_sdp.get_thread_slice(ctid);
  auto thr_kv = mma_kv.get_thread_slice(ctid);
  [[maybe_unused]] auto thr_dq = mma_dq.get_thread_slice(ctid);
  // descriptors of the shared-memory operands: from the warpgroup's slice (uniform registers)
  auto wg_sdp = mma_sdp.get_slice((wg - 1) * 128);
  auto wg_kv = mma_kv.get_slice((wg - 1) * 128);
  [[maybe_unused]] auto wg_dq = mma_dq.get_slice((wg - 1) * 128);
  Tensor sQt = make_tensor(make_smem_ptr(ss.q.data()), typename Tr::SmemLayoutQt{});
  Tensor sdOt = make_tensor(make_smem_ptr(ss.dout.data()), typename Tr::SmemLayoutQt{});

  Tensor tSrK = wg_sdp.partition_fragment_A(sK);
  Tensor tSrV = wg_sdp.partition_fragment_A(sV);
  Tensor tSrQ = wg_sdp.partition_fragment_B(sQ);     // (MMA, N, K, STAGES)
  Tensor tSrdO = wg_sdp.partition_fragment_B(sdO);
  Tensor tVrdOt = wg_kv.partition_fragment_B(sdOt);  // (MMA, N, K, STAGES)
  Tensor tKrQt = wg_kv.partition_fragment_B(sQt);
  Tensor tdVrdV = partition_fragment_C(mma_kv, Shape<Int<BN>, Int<D>>{});
  Tensor tdKrdK = partition_fragment_C(mma_kv, Shape<Int<BN>, Int<D>>{});
  Tensor tScS = thr_sdp.partition_C(make_identity_tensor(Shape<Int<BN>, Int<BM>>{}));
  Tensor tKVc = thr_kv.partition_C(make_identity_tensor(Shape<Int<BN>, Int<D>>{}));
  auto new_s = [&]() { return partition_fragment_C(mma_sdp, Shape<Int<BN>, Int<BM>>{}); };
  using STensor = decltype(new_s());
  static_assert(decltype(size<0, 0>(STensor{}))::value == 2 &&
                decltype(size<0, 1>(STensor{}))::value == 2);
  clear(tdVrdV);
  clear(tdKrdK);

  // Keys of this warpgroup: s0 + 64 * (wg - 1) + [0, 64); this thread's two key rows.
  const int wg_key0 = s0 + 64 * (wg - 1);
  // Query rows seeing each of them: [first_seen[h], qlen).
  int first_seen[2];
  CUTLASS_PRAGMA_UNROLL
  for (int h = 0; h < 2; ++h) first_seen[h] = L.first_seeing_row(s0 + get<0>(tScS(2 * h)));

  Tensor rP = make_tensor_like<Element>(new_s());
  Tensor rdS = make_tensor_like<Element>(new_s());
  Tensor tKVrP = make_tensor(rP.data(), acc_as_a_operand(rP.layout()));
  Tensor tKVrdS = make_tensor(rdS.data(), acc_as_a_operand(rdS.layout()));

  const bool one_scale = group_shares_scale(p, kh);  // dK scaled once in the epilogue

  if (steps > 0) FullBar::wait(&ss.kv_full, 0);
  QueryStep at = walk.first(kh * p.hpk);
  for (int step = 0; step < steps; ++step, at = walk.next(at)) {
    if constexpr (!kWalk) at = divided(step);
    const int st = step % STAGES;
    const int n = at.n, t0 = at.tq0;
    const float sc = p.scale[n];
    const float c2 = sc * kLog2e;
    // Every (key, query) of this warpgroup's block is valid unless the block crosses a row limit.
    const bool check = wg_key0 + 64 > min(L(t0), L(t0 + BM - 1));

    FullBar::wait(&ss.q_full[st], (step / STAGES) & 1);
    STensor tSrS = new_s();
    STensor tSrdP = new_s();
    wg_gemm<true, false>(mma_sdp, tSrK, tSrQ(_, _, _, st), tSrS);
    wg_gemm<true, false>(mma_sdp, tSrV, tSrdO(_, _, _, st), tSrdP);
    // Where the registers allow (64-query steps, D = 128), this thread's lse2 and delta values
    // (one per accumulator column; repeated columns share a load) are read while the products
    // run: read after the waits, the first exponentials stalled on them every step (ncu: 14 % of
    // the warp samples). The 128-query steps at D = 64 would spill 500+ bytes, and FuseDq's dQ
    // accumulators leave no room for them (with them it spilled in the loop; without, -5 %).
    constexpr int kAcc = decltype(size(tSrS))::value;
    constexpr bool kStatsInRegs = kAcc <= 32 && !Tr::kFuseDq;
    // With 128-query steps the packed P^T, born while S^T and dP^T are live, pushed the peak past
    // the register budget (spills): there P^T is packed next to dS^T, as S^T dies.
    constexpr bool kPackPLate = !kStatsInRegs;
    float lse_r[kStatsInRegs ? kAcc : 1], delta_r[kStatsInRegs ? kAcc : 1];
    auto stage_stats = [&](float(&dst)[kStatsInRegs ? kAcc : 1], const float* row) {
      if constexpr (kStatsInRegs) {
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < kAcc; ++i) dst[i] = row[get<1>(tScS(i))];
      }
    };
    stage_stats(lse_r, ss.lse2[st]);

    {
      uint32_t* dp_ = reinterpret_cast<uint32_t*>(raw_pointer_cast(rP.data()));
      uint32_t* dds = reinterpret_cast<uint32_t*>(raw_pointer_cast(rdS.data()));
      // FuseDq: this thread's dS elements in smem, in the accumulator's order (queries in pairs)
      Tensor sdSt = make_tensor(make_smem_ptr(ss.fused.ds.data()), typename Tr::SmemLayoutdSt{});
      Tensor tSsdS = thr_sdp.partition_C(sdSt(_, _, step & 1));
      // P^T (kept in the S^T registers) while dP^T is still in flight: the exponentials overlap
      // the second product.
      warpgroup_wait<1>();
      warpgroup_fence_operand(tSrS);
      // the tile's columns q that see this thread's keys: [row_lo[h], row_hi)
      const int row_lo[2] = {first_seen[0] - t0, first_seen[1] - t0}, row_hi = L.qlen - t0;
      auto exps = [&](auto chk) {
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < size(tSrS); i += 2) {
          CUTLASS_PRAGMA_UNROLL
          for (int e = 0; e < 2; ++e) {
            const int q = get<1>(tScS(i + e));
            float x = ex2(fmaf(tSrS(i + e), c2, -(kStatsInRegs ? lse_r[i + e] : ss.lse2[st][q])));
            if constexpr (decltype(chk)::value)
              x = q >= row_lo[(i >> 1) & 1] && q < row_hi ? x : 0.f;
            tSrS(i + e) = x;
          }
          if constexpr (!kPackPLate) dp_[i / 2] = MmaOp<T>::pack(tSrS(i), tSrS(i + 1));
        }
      };
      if constexpr (kPackPLate) {  // one body for the exponentials, the mask as its own pass
        exps(BoolC<false>{});
        if (check) {
          CUTLASS_PRAGMA_UNROLL
          for (int i = 0; i < size(tSrS); ++i) {
            const int q = get<1>(tScS(i));
            tSrS(i) = q >= row_lo[(i >> 1) & 1] && q < row_hi ? tSrS(i) : 0.f;
          }
        }
      } else if (check) {
        exps(BoolC<true>{});
      } else {
        exps(BoolC<false>{});
      }
      stage_stats(delta_r, ss.delta[st]);  // while dP^T is still in flight
      warpgroup_wait<0>();
      warpgroup_fence_operand(tSrdP);
      auto make_ds = [&](auto scaled) {
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < size(tSrS); i += 2) {
          float dsv[2];
          CUTLASS_PRAGMA_UNROLL
          for (int e = 0; e < 2; ++e)
            dsv[e] = tSrS(i + e) * (tSrdP(i + e) - (kStatsInRegs ? delta_r[i + e]
                                                                 : ss.delta[st][get<1>(tScS(i + e))]));
          if constexpr (kPackPLate) dp_[i / 2] = MmaOp<T>::pack(tSrS(i), tSrS(i + 1));
          if constexpr (decltype(scaled)::value)
            dds[i / 2] = MmaOp<T>::pack(dsv[0] * sc, dsv[1] * sc);
          else
            dds[i / 2] = MmaOp<T>::pack(dsv[0], dsv[1]);
          // dq_acc is unscaled: per pair here where dK's dS^T is scaled, else by stmatrix below
          if constexpr (Tr::kFuseDq && decltype(scaled)::value)
            *reinterpret_cast<uint32_t*>(&tSsdS(i)) = MmaOp<T>::pack(dsv[0], dsv[1]);
        }
      };
      if (one_scale) make_ds(BoolC<false>{});
      else make_ds(BoolC<true>{});
      if constexpr (Tr::kFuseDq) {
        if (one_scale) {  // the packed dS^T as it is: 4 stmatrix.x4 instead of 16 st.shared
          auto stsm = make_tiled_copy_C(Copy_Atom<SM90_U32x4_STSM_N, Element>{}, mma_sdp);
          auto thr_stsm = stsm.get_thread_slice(ctid);
          copy(stsm, thr_stsm.retile_S(rdS), thr_stsm.partition_D(sdSt(_, _, step & 1)));
        }
      }
    }
    if constexpr (Tr::kFuseDq) cutlass::arch::fence_view_async_shared();  // dS -> wgmma
    wg_gemm<false, true>(mma_kv, tKVrP, tVrdOt(_, _, _, st), tdVrdV);
    wg_gemm<false, true>(mma_kv, tKVrdS, tKrQt(_, _, _, st), tdKrdK);
    if constexpr (Tr::kFuseDq) {
      named_bar_sync(kBarPdS, Tr::kConsumerThreads);  // both warpgroups' dS halves are in smem
      Tensor sdS = make_tensor(make_smem_ptr(ss.fused.ds.data()), typename Tr::SmemLayoutdS{});
      Tensor sKt = make_tensor(make_smem_ptr(ss.k.data()), typename Tr::SmemLayoutKt{});
      Tensor tQrdS = wg_dq.partition_fragment_A(sdS);  // (MMA, M, K, 2)
      Tensor tQrKt = wg_dq.partition_fragment_B(sKt);
      Tensor tdQrdQ = partition_fragment_C(mma_dq, Shape<Int<BM>, Int<D>>{});
      wg_gemm<true, false>(mma_dq, tQrdS(_, _, _, step & 1), tQrKt, tdQrdQ);
      warpgroup_wait<0>();
      EmptyBar::arrive(&ss.q_empty[st]);
      // Each warp owns 16 rows of its warpgroup's D-half of the tile (rows lane/4 + 8h, columns
      // 8j + 2 (lane%4) + e of the accumulator): staged in smem, one TMA reduce-add per warp.
      const int lane = ctid % 32, wi = (ctid % 128) / 32, half = ctid / 128;
      Tensor sW = make_tensor(
          make_smem_ptr(ss.fused.dq.data() + (half * 4 + wi) * Tr::kDqWarpFloats),
          typename Tr::SmemLayoutdQw{});
      if (lane == 0) tma_store_wait<0>();  // the warp's last reduce has read the staging tile
      __syncwarp();
      {
        // &sW(row, col) by hand (CuTe's version keeps 16 addresses live and spills): 8 x 32-float
        // swizzle atoms, atom rows first; 16-byte chunk index XOR row % 8 (checked against the
        // addresses of CuTe's swizzled smem tensor on the host).
        float* w = ss.fused.dq.data() + (half * 4 + wi) * Tr::kDqWarpFloats;
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < size(tdQrdQ); i += 2) {
          const int h = (i >> 1) & 1, j = i >> 2;
          const int chunk = (2 * (j % 4) + (lane % 4) / 2) ^ (lane / 4);
          float* dst = w + h * 256 + (j / 4) * 512 + (lane / 4) * 32 + chunk * 4 + 2 * (lane % 2);
          *reinterpret_cast<float2*>(dst) = make_float2(tdQrdQ(i), tdQrdQ(i + 1));
        }
      }
      cutlass::arch::fence_view_async_shared();  // st.shared -> the TMA (async proxy)
      __syncwarp();
      if (lane == 0) {
        Tensor mDq = args.tma_dq.get_tma_tensor(make_shape(p.T, Int<D>{}, p.N, p.B));
        Tensor gW = local_tile(mDq(_, _, n, b), Shape<_16, Int<D / 2>>{},
                               make_coord(t0 / 16 + wi, half));
        auto tma = args.tma_dq.get_slice(_0{});
        copy(args.tma_dq, tma.partition_S(sW), tma.partition_D(gW));
        tma_store_arrive();
      }
    } else {
      warpgroup_wait<0>();
      EmptyBar::arrive(&ss.q_empty[st]);
    }
  }

  if constexpr (Tr::kFuseDq) bulk_wait_all();  // staging tiles stay valid until read

  // ------------------------------------------------------------------ epilogue: dK, dV
  if (one_scale) {
    const float sc0 = p.scale[kh * p.hpk];
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(tdKrdK); ++i) tdKrdK(i) *= sc0;
  }
  const int64_t krow = int64_t(p.KH) * D;
  T* dkb = static_cast<T*>(p.dk) + (int64_t(b) * p.S + s0) * krow + int64_t(kh) * D;  // row s0
  T* dvb = static_cast<T*>(p.dv) + (int64_t(b) * p.S + s0) * krow + int64_t(kh) * D;
  if constexpr (kNorm) {
    // dV first: its registers are free for the l2norm backward of dK below.
    store_acc_pairs(dvb, krow, p.S - s0, tKVc,
                    [&](int j) { return MmaOp<T>::pack(tdVrdV(2 * j), tdVrdV(2 * j + 1)); });
    // dk = d/d k_raw. Without steps dK is zero, so is dk, and nothing was loaded.
    constexpr int kPairs = decltype(size(tdKrdK))::value / 2;
    uint32_t x2[kPairs];  // the raw k elements at this thread's dK ones, in pairs
    float a[2] = {0.f, 0.f}, bx[2] = {0.f, 0.f};  // dk = a dK - bx k per key row
    if (steps > 0) {  // (rows past S: zero-filled, dK zero)
      FullBar::wait(&ss.raw_full, 0);
      load_acc_pairs<typename Tr::SmemLayoutKV>(smem_u32(ss.raw.k.data()), tKVc, x2);
      l2norm_bwd_coeffs<T>(tdKrdK, x2, 1.f, p.norm_eps * p.norm_eps, a, bx);
    } else {
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < kPairs; ++j) x2[j] = 0u;
    }
    store_acc_pairs(dkb, krow, p.S - s0, tKVc,
                    [&](int j) { return l2norm_bwd_pair<T>(tdKrdK, x2, a, bx, j); });
  } else {  // dK and dV pair by pair: stored one after the other, dK/dV spilled in the main loop
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(tdKrdK); i += 2) {
      const int s = get<0>(tKVc(i));
      if (s < p.S - s0) {
        const int64_t off = int64_t(s) * krow + get<1>(tKVc(i));
        *reinterpret_cast<uint32_t*>(dkb + off) = MmaOp<T>::pack(tdKrdK(i), tdKrdK(i + 1));
        *reinterpret_cast<uint32_t*>(dvb + off) = MmaOp<T>::pack(tdVrdV(i), tdVrdV(i + 1));
      }
    }
  }
  // Launched to overlap the dQ kernel (launch_dkdv): this CTA may not complete before it, or the
  // work after this kernel could read an unfinished dq.
  wait_for_previous_grid();
}

}  // namespace jca::sm90
