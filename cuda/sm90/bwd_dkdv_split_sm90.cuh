// Hopper (sm_90a) dK/dV kernel with the consumer warpgroups split by role (D = 128, 64-query
// steps). The one-role-per-warpgroup layout of bwd_dkdv_kernel_sm90.cuh gives each warpgroup a
// serial chain per step (products -> exponentials -> dS -> products -> wait) whose elementwise
// phases the other warpgroup only partly hides. Here both warpgroups cover all 128 keys, in two
// 64-key halves, and each overlaps its own elementwise work with its own products:
//   warpgroup 1 (P side):  S^T_h = K_h Q^T (SS), P^T_h = 2^(S^T_h c - lse2) -> f32 to smem for
//                          warpgroup 2, dV_h += P^T_h dO (RS); the exponentials of half 0 run
//                          under S^T_1, those of half 1 under dV_0.
//   warpgroup 2 (dS side): dP^T_h = V_h dO^T (SS), dS^T_h = P^T_h (dP^T_h - delta) with P^T_h
//                          from smem, dK_h += dS^T_h Q (RS); the same overlap.
// P^T travels as f32 (the numbers are those of the one-role kernel), double-buffered by step
// parity; named barriers hand each half over (full) and each buffer back (empty). Producer warp,
// ring, lse2 / delta staging and the fused l2norm epilogue (kNorm) as in the one-role kernel.
#pragma once
#include "bwd_dkdv_kernel_sm90.cuh"

namespace jca::sm90 {

template <int D_, typename T_>
struct BwdDkvSplitTraits : BwdDkvTraits<D_, T_, false> {
  using Base = BwdDkvTraits<D_, T_, false>;
  using typename Base::Element;
  using typename Base::SmemLayoutKV;
  using typename Base::SmemLayoutQ;
  static constexpr int D = D_, BN = Base::BN, BM = Base::BM, STAGES = Base::STAGES;
  static_assert(BN == 128 && BM == 64, "two 64-key halves, 64-query steps");
  static constexpr bool kSplitRoles = true;
  // One warpgroup's products over one 64-key half.
  using MmaSdP = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<BM>, Int<D>>>()));
  using MmaKV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<D>, Int<BM>>,
                           GMMA::Major::K, GMMA::Major::MN>()));
  static constexpr int kPFloats = 64 * BM;  // P^T of one half
  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutKV>> k;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutKV>> v;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> q;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> dout;
    typename Base::RawKStorage raw;
    alignas(16) float p[2][2][kPFloats];  // [step parity][half]: thread-major pairs
    float lse2[STAGES][BM], delta[STAGES][BM];
    alignas(8) uint64_t kv_full, raw_full;
    uint64_t q_full[STAGES], q_empty[STAGES];
  };
  static constexpr size_t kSmem = sizeof(SharedStorage);
  static_assert(kSmem <= 227 * 1024, "over the sm_90 shared-memory opt-in");
};

template <class Tr, bool kNorm>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    bwd_dkdv_split_kernel_sm90(CUTE_GRID_CONSTANT const BwdDkvArgs<Tr> args) {
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
  const bool any_key = s0 < L.kvlen;
  const int m_begin = any_key ? L.first_row(s0) / BM : 0;
  const int m_end = any_key ? (L.qlen + BM - 1) / BM : 0;
  const int mtiles = max(0, m_end - m_begin);
  const int steps = p.hpk * mtiles;
  const QuerySteps walk{m_begin * BM, m_end * BM, BM};  // (the producer divides: 64-query steps)
  auto divided = [&](int step) {
    return QueryStep{kh * p.hpk + step / mtiles, (m_begin + step % mtiles) * BM};
  };
  const int wg = uniform_warpgroup();

  if (threadIdx.x == 0) {
    FullBar::init(&ss.kv_full, 1);
    FullBar::init(&ss.raw_full, 1);
    CUTLASS_PRAGMA_UNROLL
    for (int s = 0; s < STAGES; ++s) {
      FullBar::init(&ss.q_full[s], 32);
      EmptyBar::init(&ss.q_empty[s], Tr::kConsumerThreads);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  if (wg == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Tr::kProducerRegs>();
    if (threadIdx.x / 32 == 0 && steps > 0)
      dkdv_producer<Tr, kNorm>(args, ss, kh, b, steps, walk, divided);
    return;
  }

  // ------------------------------------------------------------------ consumers
  cutlass::arch::warpgroup_reg_alloc<Tr::kConsumerRegs>();
  const bool p_side = wg == 1;
  const int wtid = threadIdx.x % 128;
  // Named barriers: P^T half h of buffer parity par is in smem (full); buffer par may be
  // rewritten (empty). Warpgroup 1 arrives / syncs on them with warpgroup 2: 256 threads.
  auto bar_full = [](int par, int h) { return 1 + 2 * par + h; };
  auto bar_empty = [](int par) { return 5 + par; };

  // Each role compiled on its own: with the role a run-time value, ptxas kept both roles'
  // accumulators apart and serialised every wgmma (C7512).
  auto consume = [&](auto role) __attribute__((always_inline)) {
    constexpr bool kP = decltype(role)::value;
    typename Tr::MmaSdP mma_sdp;
    typename Tr::MmaKV mma_kv;
    auto thr_sdp = mma_sdp.get_thread_slice(wtid);
    auto thr_kv = mma_kv.get_thread_slice(wtid);
    auto wg_sdp = mma_sdp.get_slice(0);  // shared-memory descriptors: the same for a warpgroup
    auto wg_kv = mma_kv.get_slice(0);
    // P side: S^T = K Q^T, dV += P^T dO. dS side: dP^T = V dO^T, dK += dS^T Q.
    Tensor sA = make_tensor(make_smem_ptr(kP ? ss.k.data() : ss.v.data()),
                            typename Tr::SmemLayoutKV{});
    Tensor sB = make_tensor(make_smem_ptr(kP ? ss.q.data() : ss.dout.data()),
                            typename Tr::SmemLayoutQ{});
    Tensor sBt = make_tensor(make_smem_ptr(kP ? ss.dout.data() : ss.q.data()),
                             typename Tr::SmemLayoutQt{});
    Tensor tSrA0 = wg_sdp.partition_fragment_A(local_tile(sA, Shape<_64, Int<D>>{}, make_coord(0, 0)));
    Tensor tSrA1 = wg_sdp.partition_fragment_A(local_tile(sA, Shape<_64, Int<D>>{}, make_coord(1, 0)));
    Tensor tSrB = wg_sdp.partition_fragment_B(sB);     // (MMA, N, K, STAGES)
    Tensor tKVrBt = wg_kv.partition_fragment_B(sBt);   // (MMA, N, K, STAGES)
    Tensor tScS = thr_sdp.partition_C(make_identity_tensor(Shape<_64, Int<BM>>{}));
    auto new_s = [&]() { return partition_fragment_C(mma_sdp, Shape<_64, Int<BM>>{}); };
    using STensor = decltype(new_s());
    static_assert(decltype(size<0, 0>(STensor{}))::value == 2 &&
                  decltype(size<0, 1>(STensor{}))::value == 2);
    constexpr int kAcc = decltype(size(STensor{}))::value;
    // dV (P side) or dK (dS side) of each half
    Tensor acc0 = partition_fragment_C(mma_kv, Shape<_64, Int<D>>{});
    Tensor acc1 = partition_fragment_C(mma_kv, Shape<_64, Int<D>>{});
    clear(acc0);
    clear(acc1);
    // P^T (P side) or scaled dS^T (dS side) of each half, packed: the A operands of dV / dK
    Tensor r0 = make_tensor_like<Element>(new_s());
    Tensor r1 = make_tensor_like<Element>(new_s());
    Tensor tKVr0 = make_tensor(r0.data(), acc_as_a_operand(r0.layout()));
    Tensor tKVr1 = make_tensor(r1.data(), acc_as_a_operand(r1.layout()));

    // Query rows seeing this thread's keys (rows 2 (i >> 1) & 1 of each half): [first_seen, qlen).
    int first_seen[2][2];
    CUTLASS_PRAGMA_UNROLL
    for (int h = 0; h < 2; ++h)
      CUTLASS_PRAGMA_UNROLL
      for (int r = 0; r < 2; ++r)
        first_seen[h][r] = L.first_seeing_row(s0 + 64 * h + get<0>(tScS(2 * r)));
    const bool one_scale = group_shares_scale(p, kh);  // dK scaled once in the epilogue

    // Steps run in pairs: the first step of a pair ends without a wait, so the second step's
    // first products queue behind its dV / dK and the warpgroup's queue does not drain; only the
    // pair ends with a full wait. (Carried across the loop's back edge, products in flight or
    // their A operands made ptxas serialise every wgmma: C7512 / C7514.)
    // kAfterOpen: the step before ended without a wait (its stage is released here).
    auto run_step = [&](int step, auto after_open, auto end_wait) __attribute__((always_inline)) {
      constexpr bool kAfterOpen = decltype(after_open)::value;
      constexpr bool kEndWait = decltype(end_wait)::value;
      const QueryStep at = divided(step);
      const int st = step % STAGES, par = step & 1;
      const int n = at.n, t0 = at.tq0;
      const float sc = p.scale[n];
      const int st_prev = (step + STAGES - 1) % STAGES;
      FullBar::wait(&ss.q_full[st], (step / STAGES) & 1);
      STensor s0acc = new_s();  // S^T_h (P side) or dP^T_h (dS side)
      STensor s1acc = new_s();
      wg_gemm<true, false>(mma_sdp, tSrA0, tSrB(_, _, _, st), s0acc);
      wg_gemm<true, false>(mma_sdp, tSrA1, tSrB(_, _, _, st), s1acc);
      // lse2 (P side) or delta (dS side) of an accumulator column, read where used (held in
      // registers across the step, they left too few for the products in flight)
      const float* stat_row = kP ? ss.lse2[st] : ss.delta[st];
      auto stat = [&](int i) { return stat_row[get<1>(tScS(i))]; };
      float2* pbuf0 = reinterpret_cast<float2*>(ss.p[par][0]) + wtid;  // pair j at [j * 128]
      float2* pbuf1 = reinterpret_cast<float2*>(ss.p[par][1]) + wtid;
      warpgroup_wait<1>();  // S^T_0 / dP^T_0, and the products of the step before
      warpgroup_fence_operand(s0acc);
      if constexpr (kAfterOpen) EmptyBar::arrive(&ss.q_empty[st_prev]);
      if constexpr (kP) {
        const float c2 = sc * kLog2e;
        // Every (key, query) of the tile is valid unless it crosses a row limit.
        const bool check = s0 + BN > min(L(t0), L(t0 + BM - 1));
        if (step >= 2) named_bar_sync(bar_empty(par), 256);  // P^T of step - 2 has been read
        auto half = [&](auto& acc, auto& r, float2* buf, const int (&lo)[2], auto chk) {
          uint32_t* packed = reinterpret_cast<uint32_t*>(raw_pointer_cast(r.data()));
          CUTLASS_PRAGMA_UNROLL
          for (int i = 0; i < kAcc; i += 2) {
            float x[2];
            CUTLASS_PRAGMA_UNROLL
            for (int e = 0; e < 2; ++e) {
              x[e] = ex2(fmaf(acc(i + e), c2, -stat(i + e)));
              if constexpr (decltype(chk)::value) {
                const int q = get<1>(tScS(i + e));
                x[e] = q >= lo[(i >> 1) & 1] - t0 && q < L.qlen - t0 ? x[e] : 0.f;
              }
            }
            buf[(i / 2) * 128] = make_float2(x[0], x[1]);
            packed[i / 2] = MmaOp<T>::pack(x[0], x[1]);
          }
        };
        if (check) half(s0acc, r0, pbuf0, first_seen[0], BoolC<true>{});
        else half(s0acc, r0, pbuf0, first_seen[0], BoolC<false>{});
        named_bar_arrive(bar_full(par, 0), 256);
        wg_gemm<false, true>(mma_kv, tKVr0, tKVrBt(_, _, _, st), acc0);
        warpgroup_wait<1>();  // S^T_1 (dV_0 in flight)
        warpgroup_fence_operand(s1acc);
        if (check) half(s1acc, r1, pbuf1, first_seen[1], BoolC<true>{});
        else half(s1acc, r1, pbuf1, first_seen[1], BoolC<false>{});
        named_bar_arrive(bar_full(par, 1), 256);
        wg_gemm<false, true>(mma_kv, tKVr1, tKVrBt(_, _, _, st), acc1);
      } else {
        auto half = [&](auto& acc, auto& r, const float2* buf, auto scaled) {
          uint32_t* packed = reinterpret_cast<uint32_t*>(raw_pointer_cast(r.data()));
          CUTLASS_PRAGMA_UNROLL
          for (int i = 0; i < kAcc; i += 2) {
            const float2 pv = buf[(i / 2) * 128];
            float d0 = pv.x * (acc(i) - stat(i)), d1 = pv.y * (acc(i + 1) - stat(i + 1));
            if constexpr (decltype(scaled)::value) {
              d0 *= sc;
              d1 *= sc;
            }
            packed[i / 2] = MmaOp<T>::pack(d0, d1);
          }
        };
        named_bar_sync(bar_full(par, 0), 256);
        if (one_scale) half(s0acc, r0, pbuf0, BoolC<false>{});
        else half(s0acc, r0, pbuf0, BoolC<true>{});
        wg_gemm<false, true>(mma_kv, tKVr0, tKVrBt(_, _, _, st), acc0);
        warpgroup_wait<1>();  // dP^T_1 (dK_0 in flight)
        warpgroup_fence_operand(s1acc);
        named_bar_sync(bar_full(par, 1), 256);
        if (one_scale) half(s1acc, r1, pbuf1, BoolC<false>{});
        else half(s1acc, r1, pbuf1, BoolC<true>{});
        if (step + 2 < steps) named_bar_arrive(bar_empty(par), 256);  // warpgroup 1 rewrites it
        wg_gemm<false, true>(mma_kv, tKVr1, tKVrBt(_, _, _, st), acc1);
      }
      if constexpr (kEndWait) {
        warpgroup_wait<0>();
        EmptyBar::arrive(&ss.q_empty[st]);
      } else {
        warpgroup_wait<1>();  // dV_0 / dK_0: r0 is free (with it in flight too, the registers
                              // of the next step's products did not fit)
      }
    };
    if (steps > 0) FullBar::wait(&ss.kv_full, 0);
    int step = 0;
    for (; step + 1 < steps; step += 2) {
      run_step(step, BoolC<false>{}, BoolC<false>{});
      run_step(step + 1, BoolC<true>{}, BoolC<true>{});
    }
    if (step < steps) run_step(step, BoolC<false>{}, BoolC<true>{});

    // ------------------------------------------------------------------ epilogue: dV or dK
    // accumulator coordinates of half h within the CTA's 128 x D tile
    Tensor cKV = make_identity_tensor(Shape<Int<BN>, Int<D>>{});
    Tensor c0 = thr_kv.partition_C(local_tile(cKV, Shape<_64, Int<D>>{}, make_coord(0, 0)));
    Tensor c1 = thr_kv.partition_C(local_tile(cKV, Shape<_64, Int<D>>{}, make_coord(1, 0)));
    const int64_t krow = int64_t(p.KH) * D;
    const int64_t tile0 = (int64_t(b) * p.S + s0) * krow + int64_t(kh) * D;  // row s0
    constexpr int kPairs = decltype(size(acc0))::value / 2;
    if constexpr (kP) {
      T* dvb = static_cast<T*>(p.dv) + tile0;
      store_acc_pairs(dvb, krow, p.S - s0, c0,
                      [&](int j) { return MmaOp<T>::pack(acc0(2 * j), acc0(2 * j + 1)); });
      store_acc_pairs(dvb, krow, p.S - s0, c1,
                      [&](int j) { return MmaOp<T>::pack(acc1(2 * j), acc1(2 * j + 1)); });
    } else {
      if (one_scale) {
        const float sc0 = p.scale[kh * p.hpk];
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < size(acc0); ++i) {
          acc0(i) *= sc0;
          acc1(i) *= sc0;
        }
      }
      auto l2norm_bwd = [&](auto& acc, const auto& coord) {
        // dk = d/d k_raw: the l2norm backward of each key row (see the one-role kernel)
        uint32_t x2[kPairs];
        load_acc_pairs<typename Tr::SmemLayoutKV>(smem_u32(ss.raw.k.data()), coord, x2);
        float sumsq[2] = {0.f, 0.f}, x_dk[2] = {0.f, 0.f};
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < kPairs; ++j) {
          const int h = j & 1;
          const float2 x = MmaOp<T>::unpack(x2[j]);
          sumsq[h] += x.x * x.x + x.y * x.y;
          x_dk[h] += x.x * acc(2 * j) + x.y * acc(2 * j + 1);
        }
        float a[2], bx[2];
        CUTLASS_PRAGMA_UNROLL
        for (int h = 0; h < 2; ++h)
          bwd_coeffs(quad_sum(sumsq[h]), quad_sum(x_dk[h]), p.norm_eps * p.norm_eps, a[h], bx[h]);
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < kPairs; ++j) {
          const int h = j & 1;
          const float2 x = MmaOp<T>::unpack(x2[j]);
          acc(2 * j) = a[h] * acc(2 * j) - bx[h] * x.x;
          acc(2 * j + 1) = a[h] * acc(2 * j + 1) - bx[h] * x.y;
        }
      };
      if constexpr (kNorm) {
        if (steps > 0) {  // without steps dK is zero, so is dk, and nothing was loaded
          FullBar::wait(&ss.raw_full, 0);
          l2norm_bwd(acc0, c0);
          l2norm_bwd(acc1, c1);
        }
      }
      T* dkb = static_cast<T*>(p.dk) + tile0;
      store_acc_pairs(dkb, krow, p.S - s0, c0,
                      [&](int j) { return MmaOp<T>::pack(acc0(2 * j), acc0(2 * j + 1)); });
      store_acc_pairs(dkb, krow, p.S - s0, c1,
                      [&](int j) { return MmaOp<T>::pack(acc1(2 * j), acc1(2 * j + 1)); });
    }
  };
  if (p_side) consume(BoolC<true>{});
  else consume(BoolC<false>{});
  // Launched to overlap the dQ kernel (launch_dkdv): see the one-role kernel.
  wait_for_previous_grid();
}

}  // namespace jca::sm90
