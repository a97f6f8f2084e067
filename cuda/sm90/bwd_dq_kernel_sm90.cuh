// Hopper (sm_90a) dQ kernel of the backward. Shaped like the forward: one CTA per (128-row query
// tile, query head, batch) loops over 64-key tiles, so dq_acc is written once with plain stores
// (no reductions: deterministic, and no atomic traffic):
//   warpgroup 0    producer: TMA of Q and dO once, K and V tiles into STAGES-deep rings.
//   warpgroups 1-2 64 query rows each: S = Q K^T and dP = dO V^T (SS wgmma; at D = 64 S is RS,
//                  with the warpgroup's Q rows held in registers),
//                  dS = 2^(S c - lse2) (dP - delta), dQ += dS K (RS wgmma, dS from registers).
// As in the forward, the products of tile j+1 are issued before dQ(j), whose wait is deferred
// until the elementwise work of tile j+1 is done, and the two warpgroups take turns issuing.
// With Params::q_raw (kNorm) the epilogue applies the l2norm backward instead of storing dq_acc:
// the raw q tile arrives by TMA during the main loop, each row's sums are reduced over the quad
// that holds it, and dq (q's dtype) and rowdot are written.
#pragma once
#include "common_sm90.cuh"

namespace jca::sm90 {

template <int D_, typename T_>
struct BwdDqTraits {
  // At D = 64 the warpgroup's Q rows are loaded into registers once and S = Q K^T is an RS
  // product, so each step reads only the K tile from shared memory for it (measured -9 % bwd
  // time at D = 64, nothing at D = 128; dO in registers as well spills).
  static constexpr bool kQInRegs = D_ <= 64;
  using T = T_;
  using Element = typename CuteType<T>::type;
  static constexpr int D = D_;
  // 64-key tiles at D = 128 (registers: S, dP and dQ accumulators), 128 at D = 64.
  static constexpr int BR = 128, BC = (D <= 64 ? 128 : 64), STAGES = 3;
  static constexpr int kThreads = 128 * 3;
  static constexpr int kConsumerWarps = 8;
  static constexpr int kProducerRegs = kQInRegs ? 24 : 40, kConsumerRegs = kQInRegs ? 240 : 232;

  using SplitM = Layout<Shape<_2, _1, _1>>;
  using MmaSS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<Int<BR>, Int<BC>, Int<D>>>(), SplitM{}));
  using MmaRS = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<Int<BR>, Int<BC>, Int<D>>>(), SplitM{}));
  using MmaS = std::conditional_t<kQInRegs, MmaRS, MmaSS>;  // S = Q K^T; dP = dO V^T is SS
  using MmaDq = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<Int<BR>, Int<D>, Int<BC>>,
                           GMMA::Major::K, GMMA::Major::MN>(),
      SplitM{}));

  using AtomK = GMMA::Layout_K_SW128_Atom<Element>;
  using SmemLayoutQ = decltype(tile_to_shape(AtomK{}, Shape<Int<BR>, Int<D>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(AtomK{}, Shape<Int<BC>, Int<D>, Int<STAGES>>{}));
  using SmemLayoutKt = decltype(composition(
      SmemLayoutKV{},
      make_ordered_layout(Shape<Int<D>, Int<BC>, Int<STAGES>>{}, Step<_2, _1, _3>{})));

  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, GTensor<Element, D>{}, SmemLayoutQ{},
                                      Shape<Int<BR>, Int<D>>{}, _1{}));
  using TmaKV = decltype(make_tma_copy(SM90_TMA_LOAD{}, GTensor<Element, D>{},
                                       take<0, 2>(SmemLayoutKV{}), Shape<Int<BC>, Int<D>>{}, _1{}));

  static constexpr uint32_t kQBytes = BR * D * sizeof(Element);
  static constexpr uint32_t kKVBytes = BC * D * sizeof(Element);

  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> q;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> dout;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutKV>> k;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutKV>> v;
    // the raw q rows for the fused l2norm backward (Params::q_raw), read by the epilogue only
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> q_raw;
    alignas(8) uint64_t q_full;
    uint64_t k_full[STAGES], v_full[STAGES], empty[STAGES], raw_full;
  };
  static constexpr size_t kSmem = sizeof(SharedStorage);
};

// Epilogue with the l2norm backward fused: this thread's dq_acc elements (two rows, columns
// spread over the lanes of a quad) -> dq_norm = l2norm_bwd(q_raw row, scale * dq_acc row) in q's
// dtype and rowdot = <q, dq_acc> per row. sq, sqr: shared addresses of the normalised and the
// raw q tile; `loaded` is false when the CTA had no key tile (nothing in smem, dq_acc zero:
// zeros are written).
template <class Tr, class Acc, class Coord>
__device__ __forceinline__ void store_dq_l2norm_bwd(const Params& p, const Acc& acc,
                                                    const Coord& coord, uint32_t sq, uint32_t sqr,
                                                    bool loaded, int t0, int n, int b) {
  using T = typename Tr::T;
  using Layout = typename Tr::SmemLayoutQ;
  constexpr int D = Tr::D, kPairs = decltype(size(acc))::value / 2;
  const float sc = p.scale[n];
  // Pair j holds columns (c, c + 1) of row (j & 1): the accumulator's ((2, 2, N/8)) order.
  uint32_t x2[kPairs], q2[kPairs];
  // dq = a dq_acc - bx x per row (dy = sc dq_acc); nothing loaded: dq_acc is zero, so is dq
  // (also with eps = 0, where coefficients of the zero rows would be infinite)
  float a[2] = {0.f, 0.f}, bx[2] = {0.f, 0.f};
  if (loaded) {
    load_acc_pairs<Layout>(sqr, coord, x2);
    load_acc_pairs<Layout>(sq, coord, q2);
    l2norm_bwd_coeffs<T>(acc, x2, sc, p.norm_eps * p.norm_eps, a, bx);
  } else {
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < kPairs; ++j) x2[j] = q2[j] = 0u;
  }
  float q_acc[2] = {0.f, 0.f};  // rowdot = <q, dq_acc> per row
  CUTLASS_PRAGMA_UNROLL
  for (int j = 0; j < kPairs; ++j) {
    const float2 q = MmaOp<T>::unpack(q2[j]);
    q_acc[j & 1] += q.x * acc(2 * j) + q.y * acc(2 * j + 1);
  }
  CUTLASS_PRAGMA_UNROLL
  for (int h = 0; h < 2; ++h) {
    const int t = t0 + get<0>(coord(2 * h));
    const float rd = quad_sum(q_acc[h]);
    if (t < p.T && threadIdx.x % 4 == 0)  // one lane per row
      p.rowdot[(int64_t(b) * p.N + n) * p.T + t] = rd;
  }
  const int64_t row_stride = int64_t(p.N) * D;
  T* dx = static_cast<T*>(p.dq_norm) + (int64_t(b) * p.T + t0) * row_stride + int64_t(n) * D;
  store_acc_pairs(dx, row_stride, p.T - t0, coord,
                  [&](int j) { return l2norm_bwd_pair<T>(acc, x2, a, bx, j); });
}

template <class Tr>
struct BwdDqArgs {
  typename Tr::TmaQ tma_q, tma_do, tma_q_raw;  // tma_q_raw: Params::q_raw (else unused)
  typename Tr::TmaKV tma_k, tma_v;
  Params p;
};

// kNorm: the l2norm backward fused into the epilogue (Params::q_raw set); a separate
// instantiation, so the plain kernel carries none of it.
template <class Tr, bool kNorm>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    bwd_dq_kernel_sm90(CUTE_GRID_CONSTANT const BwdDqArgs<Tr> args) {
  using T = typename Tr::T;
  using Element = typename Tr::Element;
  using FullBar = cutlass::arch::ClusterTransactionBarrier;
  using EmptyBar = cutlass::arch::ClusterBarrier;
  constexpr int D = Tr::D, BC = Tr::BC, BR = Tr::BR, STAGES = Tr::STAGES;
  const Params& p = args.p;
  allow_dependent_launch();  // the dK/dV kernel after this one does not read its outputs

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  auto& ss = *reinterpret_cast<typename Tr::SharedStorage*>(smem_raw);

  const int n = blockIdx.y, b = blockIdx.z;
  const int kh = n / p.hpk;
  const RowLimits L = make_limits(p, b);
  const QueryTile tile = query_tile(p, L, BR, BC);
  const int qtile = tile.index, t0 = tile.t0, ntiles = tile.ntiles;
  const int wg = uniform_warpgroup();

  if (threadIdx.x == 0) {
    FullBar::init(&ss.q_full, 1);
    FullBar::init(&ss.raw_full, 1);
    CUTLASS_PRAGMA_UNROLL
    for (int s = 0; s < STAGES; ++s) {
      FullBar::init(&ss.k_full[s], 1);
      FullBar::init(&ss.v_full[s], 1);
      EmptyBar::init(&ss.empty[s], Tr::kConsumerWarps);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Tr::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(ss.dout.data()), typename Tr::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Tr::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename Tr::SmemLayoutKV{});

  // ------------------------------------------------------------------ producer
  if (wg == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Tr::kProducerRegs>();
    if (threadIdx.x / 32 == 0 && cute::elect_one_sync() && ntiles > 0) {
      Tensor mQ = args.tma_q.get_tma_tensor(make_shape(p.T, Int<D>{}, p.N, p.B));
      Tensor mdO = args.tma_do.get_tma_tensor(make_shape(p.T, Int<D>{}, p.N, p.B));
      Tensor mK = args.tma_k.get_tma_tensor(make_shape(p.S, Int<D>{}, p.KH, p.B));
      Tensor mV = args.tma_v.get_tma_tensor(make_shape(p.S, Int<D>{}, p.KH, p.B));
      Tensor gQ = local_tile(mQ(_, _, n, b), Shape<Int<BR>, Int<D>>{}, make_coord(qtile, _0{}));
      Tensor gdO = local_tile(mdO(_, _, n, b), Shape<Int<BR>, Int<D>>{}, make_coord(qtile, _0{}));
      Tensor gK = local_tile(mK(_, _, kh, b), Shape<Int<BC>, Int<D>>{}, make_coord(_, _0{}));
      Tensor gV = local_tile(mV(_, _, kh, b), Shape<Int<BC>, Int<D>>{}, make_coord(_, _0{}));
      auto tq = args.tma_q.get_slice(_0{});
      auto tdo = args.tma_do.get_slice(_0{});
      auto tk = args.tma_k.get_slice(_0{});
      auto tv = args.tma_v.get_slice(_0{});
      Tensor tKg = tk.partition_S(gK);  // (TMA, TMA_M, TMA_K, tiles)
      Tensor tKs = tk.partition_D(sK);  // (TMA, TMA_M, TMA_K, STAGES)
      Tensor tVg = tv.partition_S(gV);
      Tensor tVs = tv.partition_D(sV);
      FullBar::arrive_and_expect_tx(&ss.q_full, 2 * Tr::kQBytes);
      copy(args.tma_q.with(ss.q_full, 0), tq.partition_S(gQ), tq.partition_D(sQ));
      copy(args.tma_do.with(ss.q_full, 0), tdo.partition_S(gdO), tdo.partition_D(sdO));
      if constexpr (kNorm) {  // raw q rows for the epilogue: land while the main loop runs
        Tensor sQr = make_tensor(make_smem_ptr(ss.q_raw.data()), typename Tr::SmemLayoutQ{});
        Tensor mQr = args.tma_q_raw.get_tma_tensor(make_shape(p.T, Int<D>{}, p.N, p.B));
        Tensor gQr = local_tile(mQr(_, _, n, b), Shape<Int<BR>, Int<D>>{}, make_coord(qtile, _0{}));
        auto tqr = args.tma_q_raw.get_slice(_0{});
        FullBar::arrive_and_expect_tx(&ss.raw_full, Tr::kQBytes);
        copy(args.tma_q_raw.with(ss.raw_full, 0), tqr.partition_S(gQr), tqr.partition_D(sQr));
      }
      for (int it = 0; it < ntiles; ++it) {
        const int st = it % STAGES;
        if (it >= STAGES) EmptyBar::wait(&ss.empty[st], ((it / STAGES) - 1) & 1);
        FullBar::arrive_and_expect_tx(&ss.k_full[st], Tr::kKVBytes);
        copy(args.tma_k.with(ss.k_full[st], 0), tKg(_, _, _, it), tKs(_, _, _, st));
        FullBar::arrive_and_expect_tx(&ss.v_full[st], Tr::kKVBytes);
        copy(args.tma_v.with(ss.v_full[st], 0), tVg(_, _, _, it), tVs(_, _, _, st));
      }
    }
    return;
  }

  // ------------------------------------------------------------------ consumers
  cutlass::arch::warpgroup_reg_alloc<Tr::kConsumerRegs>();
  const int ctid = threadIdx.x - 128;
  const int lane = threadIdx.x % 32;
  typename Tr::MmaS mma_s;
  typename Tr::MmaSS mma_sdp;  // dP; the S accumulator has the same layout for SS and RS
  typename Tr::MmaDq mma_dq;
  auto thr_sdp = mma_sdp.get_thread_slice(ctid);
  auto thr_dq = mma_dq.get_thread_slice(ctid);
  Tensor sKt = make_tensor(make_smem_ptr(ss.k.data()), typename Tr::SmemLayoutKt{});
  auto thr_s = mma_s.get_thread_slice(ctid);
  // descriptors of the shared-memory operands: from the warpgroup's slice (uniform registers)
  auto wg_s = mma_s.get_slice((wg - 1) * 128);
  auto wg_sdp = mma_sdp.get_slice((wg - 1) * 128);
  auto wg_dq = mma_dq.get_slice((wg - 1) * 128);
  Tensor tSrQ = [&] {  // registers with kQInRegs
    if constexpr (Tr::kQInRegs) return thr_s.partition_fragment_A(sQ);
    else return wg_s.partition_fragment_A(sQ);
  }();
  Tensor tSrdO = wg_sdp.partition_fragment_A(sdO);
  Tensor tSrK = wg_s.partition_fragment_B(sK);     // (MMA, N, K, STAGES)
  Tensor tSrV = wg_sdp.partition_fragment_B(sV);
  Tensor tQrKt = wg_dq.partition_fragment_B(sKt);  // (MMA, N, K, STAGES)
  Tensor tdQrdQ = partition_fragment_C(mma_dq, Shape<Int<BR>, Int<D>>{});
  Tensor tScS = thr_sdp.partition_C(make_identity_tensor(Shape<Int<BR>, Int<BC>>{}));
  Tensor tdQc = thr_dq.partition_C(make_identity_tensor(Shape<Int<BR>, Int<D>>{}));
  auto new_s = [&]() { return partition_fragment_C(mma_sdp, Shape<Int<BR>, Int<BC>>{}); };
  using STensor = decltype(new_s());
  static_assert(decltype(size<0, 0>(STensor{}))::value == 2 &&
                decltype(size<0, 1>(STensor{}))::value == 2);

  int rows[2], lims[2];
  float lse2[2], delta[2];
  const int64_t rows_total = int64_t(p.B) * p.N * p.T;
  const float* delta_g = static_cast<const float*>(p.workspace);
  const float* lse2_g = delta_g + rows_total;
  CUTLASS_PRAGMA_UNROLL
  for (int h = 0; h < 2; ++h) {
    rows[h] = t0 + get<0>(tScS(2 * h));
    lims[h] = L(rows[h]);
    const int64_t ri = (int64_t(b) * p.N + n) * p.T + min(rows[h], p.T - 1);
    lse2[h] = rows[h] < p.T ? lse2_g[ri] : INFINITY;  // +inf -> P = 0
    delta[h] = rows[h] < p.T ? delta_g[ri] : 0.f;
  }
  const int wg_r0 = t0 + 64 * (wg - 1);
  const int wg_min_lim = min(L(wg_r0), L(wg_r0 + 63));
  const float c2 = p.scale[n] * kLog2e;

  const Pingpong turn(wg, ntiles > 0);
  auto release = [&](int st) {
    __syncwarp();
    if (lane == 0) EmptyBar::arrive(&ss.empty[st]);
  };

  // P of key tile s0.. in place of the S accumulator (while dP may still be in flight), then
  // dS = P (dP - delta) in place of the dP accumulator.
  auto make_p = [&](STensor& tSrS, int s0) {
    warpgroup_fence_operand(tSrS);
    auto body = [&](auto chk) {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(tSrS); ++i) {
        const int h = (i >> 1) & 1;
        float pv = ex2(fmaf(tSrS(i), c2, -lse2[h]));
        if constexpr (decltype(chk)::value) pv = s0 + get<1>(tScS(i)) < lims[h] ? pv : 0.f;
        tSrS(i) = pv;
      }
    };
    if (s0 + BC > wg_min_lim) body(BoolC<true>{});
    else body(BoolC<false>{});
  };
  auto make_ds = [&](STensor const& tSrP, STensor& tSrdP) {
    warpgroup_fence_operand(tSrdP);
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(tSrP); ++i) tSrdP(i) = tSrP(i) * (tSrdP(i) - delta[(i >> 1) & 1]);
  };
  Tensor rdS = make_tensor_like<Element>(new_s());
  Tensor tQrdS = make_tensor(rdS.data(), acc_as_a_operand(rdS.layout()));
  auto pack_ds = [&](STensor const& ds) {
    uint32_t* dst = reinterpret_cast<uint32_t*>(raw_pointer_cast(rdS.data()));
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < size(ds) / 2; ++j) dst[j] = MmaOp<T>::pack(ds(2 * j), ds(2 * j + 1));
  };
  clear(tdQrdQ);

  if (ntiles > 0) {
    FullBar::wait(&ss.q_full, 0);
    FullBar::wait(&ss.k_full[0], 0);
    FullBar::wait(&ss.v_full[0], 0);
    if constexpr (Tr::kQInRegs) {
      auto ldsm = make_tiled_copy_A(Copy_Atom<SM75_U32x4_LDSM_N, Element>{}, mma_s);
      auto thr_ldsm = ldsm.get_thread_slice(ctid);
      copy(ldsm, thr_ldsm.partition_S(as_position_independent_swizzle_tensor(sQ)),
           thr_ldsm.retile_D(tSrQ));
    }
    STensor tSrS = new_s();
    STensor tSrdP = new_s();
    turn.wait();
    wg_gemm<true, Tr::kQInRegs>(mma_s, tSrQ, tSrK(_, _, _, 0), tSrS);
    wg_gemm<true, false>(mma_sdp, tSrdO, tSrV(_, _, _, 0), tSrdP);
    turn.pass();
    warpgroup_wait<1>();
    make_p(tSrS, 0);
    warpgroup_wait<0>();
    make_ds(tSrS, tSrdP);
    pack_ds(tSrdP);
  }
  // Issue S, dP of tile j+1 and dQ(j); P(j+1) runs under dP(j+1) and dQ(j), dS(j+1) under dQ(j).
  for (int it = 0; it + 1 < ntiles; ++it) {
    const int st = it % STAGES, st1 = (it + 1) % STAGES;
    STensor tSrS = new_s();
    STensor tSrdP = new_s();
    FullBar::wait(&ss.k_full[st1], ((it + 1) / STAGES) & 1);
    FullBar::wait(&ss.v_full[st1], ((it + 1) / STAGES) & 1);
    turn.wait();
    wg_gemm<true, Tr::kQInRegs>(mma_s, tSrQ, tSrK(_, _, _, st1), tSrS);
    wg_gemm<true, false>(mma_sdp, tSrdO, tSrV(_, _, _, st1), tSrdP);
    wg_gemm<false, true>(mma_dq, tQrdS, tQrKt(_, _, _, st), tdQrdQ);
    turn.pass();
    warpgroup_wait<2>();
    make_p(tSrS, (it + 1) * BC);
    warpgroup_wait<1>();
    make_ds(tSrS, tSrdP);
    warpgroup_wait<0>();
    release(st);
    pack_ds(tSrdP);
  }
  if (ntiles > 0) {
    const int st = (ntiles - 1) % STAGES;
    turn.wait();
    wg_gemm<false, true>(mma_dq, tQrdS, tQrKt(_, _, _, st), tdQrdQ);
    turn.pass_unless_last(true);
    warpgroup_wait<0>();
    release(st);
  }

  if constexpr (kNorm) {  // the l2norm backward fused (Params::q_raw)
    // No key tile: dq_acc is zero, so are dq and rowdot, and nothing was loaded.
    if (ntiles > 0) FullBar::wait(&ss.raw_full, 0);
    store_dq_l2norm_bwd<Tr>(p, tdQrdQ, tdQc, smem_u32(ss.q.data()), smem_u32(ss.q_raw.data()),
                            ntiles > 0, t0, n, b);
    return;
  }
  // dq_acc rows (unscaled, f32): plain stores, every row of the tile (zeros where no key).
  const int64_t row_stride = int64_t(p.N) * D;
  float* dq = p.dq_acc + (int64_t(b) * p.T + t0) * row_stride + int64_t(n) * D;
  store_acc_pairs(dq, row_stride, p.T - t0, tdQc,
                  [&](int j) { return make_float2(tdQrdQ(2 * j), tdQrdQ(2 * j + 1)); });
}

}  // namespace jca::sm90
