// Hopper (sm_90a) forward kernel: TMA loads into an mbarrier ring, wgmma on both products,
// warp specialisation. One CTA per (128-row query tile, query head, batch):
//   warpgroup 0   producer: one thread issues the TMA loads (Q once, then K and V tiles into a
//                 STAGES-deep ring); the warpgroup gives its registers away (setmaxnreg).
//   warpgroups 1-2 consumers, 64 query rows each: S = Q K^T as an SS wgmma (both operands in
//                 smem), softmax in registers, O += P V as an RS wgmma (P from registers).
// The two consumer warpgroups take turns issuing wgmmas (pingpong). Cosine-sim pipelining: on
// the fixed-shift path O is never rescaled, so the PV wgmma of tile j stays in flight while the
// QK^T of tile j+1 is issued and its exponentials are computed; only the P registers and the
// smem stage wait for it. The running-max path (unbounded inputs, a bias, or a logit bound too
// wide for the P dtype) rescales O once that PV has landed.
// Bias and dense masks (the sm_80 kernel's semantics) are a separate instantiation, kBiasMask, so
// that the plain kernel stays as it is. A bias forces the running-max path and is loaded straight
// into registers. A mask makes every tile take the checked softmax; it is staged in smem one tile
// ahead (cp.async): with the accumulators resident, too few registers are left to batch its
// loads, and ptxas serialised them.
#pragma once
#include "common_sm90.cuh"
#include "../softmax_shift.cuh"

namespace jca::sm90 {
using namespace cute;

template <int D_, int BC_, int STAGES_, typename T_>
struct FwdTraits {
  using T = T_;
  using Element = typename CuteType<T>::type;
  static constexpr int D = D_, BC = BC_, STAGES = STAGES_;
  static constexpr int kConsumerWGs = 2;
  static constexpr int BR = 64 * kConsumerWGs;
  static constexpr int kThreads = 128 * (1 + kConsumerWGs);
  static constexpr int kConsumerWarps = 4 * kConsumerWGs;
  // setmaxnreg budgets: 40 * 128 + 232 * 256 <= 64K registers per SM; the bias / mask
  // instantiation moves 16 more to the consumers (24 * 128 + 240 * 256).
  static constexpr int kProducerRegs = 40, kConsumerRegs = 232;
  static constexpr int kProducerRegsBM = 24, kConsumerRegsBM = 240;

  using TileQK = Shape<Int<BR>, Int<BC>, Int<D>>;  // (M, N, K)
  using TilePV = Shape<Int<BR>, Int<D>, Int<BC>>;
  using AtomLayout = Layout<Shape<Int<kConsumerWGs>, _1, _1>>;
  using MmaQK = decltype(make_tiled_mma(GMMA::ss_op_selector<Element, Element, float, TileQK>(),
                                        AtomLayout{}));
  using MmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, TilePV, GMMA::Major::K, GMMA::Major::MN>(),
      AtomLayout{}));

  // 128-byte swizzled K-major tiles (rows of 64 elements), as TMA writes them and wgmma reads them.
  using SmemAtom = GMMA::Layout_K_SW128_Atom<Element>;
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<BR>, Int<D>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemAtom{}, Shape<Int<BC>, Int<D>, Int<STAGES>>{}));
  // V^T (D x BC per stage) over the same bytes: the B operand of O += P V, MN-major.
  using SmemLayoutVt = decltype(composition(
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
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutKV>> k;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutKV>> v;
    alignas(8) uint64_t q_full;
    uint64_t k_full[STAGES], v_full[STAGES], k_empty[STAGES], v_empty[STAGES];
    uint64_t q_empty;  // kPersistent: the consumers are done with Q
  };
  static constexpr size_t kSmem = sizeof(SharedStorage);
  // kBiasMask: after SharedStorage, the mask bytes of one key tile per query row, as the aligned
  // words that cover them (up to 33); rows 36 words apart keep copies and reads conflict-free.
  static constexpr int kMaskRowBytes = 144;
  static constexpr size_t kMaskSmem = size_t(BR) * kMaskRowBytes;
};

template <class Tr>
struct KernelArgs {
  typename Tr::TmaQ tma_q;
  typename Tr::TmaKV tma_k, tma_v;
  Params p;
};

// kPersistent (plain kernel without a causal mask): one CTA per SM walks the tiles blockIdx.x,
// blockIdx.x + gridDim.x, ... in the grid's order (query tiles fastest); the K/V ring and the
// pingpong turns run on across tiles, and the next tile's Q (once the consumers release it after
// their last QK^T) and first K/V stages load while the consumers finish the previous tile's PV and
// epilogue. Causal grids stay one CTA per tile: their longest-first order is kept by the hardware's
// dispatch, where a static stride lets the CTAs drift apart over heads (measured +8-16 % at
// N = 16384); equal-cost pairs of tiles (j, ntq - 1 - j) as persistent units kept them in step
// but measured no gain (benchmarks/NOTES.md, session 12, #45-#46).
template <class Tr, bool kBiasMask, bool kPersistent = false>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    fwd_kernel_sm90(CUTE_GRID_CONSTANT const KernelArgs<Tr> args) {
  using T = typename Tr::T;
  using Element = typename Tr::Element;
  using FullBar = cutlass::arch::ClusterTransactionBarrier;
  using EmptyBar = cutlass::arch::ClusterBarrier;
  constexpr int D = Tr::D, BC = Tr::BC, BR = Tr::BR, STAGES = Tr::STAGES;
  const Params& p = args.p;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  auto& ss = *reinterpret_cast<typename Tr::SharedStorage*>(smem_raw);

  static_assert(!(kPersistent && kBiasMask));
  // The CTA's work items: its grid cell, or (kPersistent) every gridDim.x-th tile of the problem.
  const int ntq = (p.T + BR - 1) / BR;
  const int work_begin = kPersistent ? int(blockIdx.x) : 0;
  const int work_end = kPersistent ? ntq * p.N * p.B : 1;
  const int work_step = kPersistent ? int(gridDim.x) : 1;
  struct Work {
    int n, b;
    RowLimits L;
    QueryTile tile;
  };
  auto work_at = [&](int w) {
    const int x = kPersistent ? w % ntq : int(blockIdx.x);
    const int n = kPersistent ? (w / ntq) % p.N : int(blockIdx.y);
    const int b = kPersistent ? w / (ntq * p.N) : int(blockIdx.z);
    const RowLimits L = make_limits(p, b);
    return Work{n, b, L, query_tile(p, L, BR, BC, x, kPersistent ? ntq : int(gridDim.x))};
  };
  // The last work item with key tiles (its last turn is not passed): scanned from the CTA's last
  // item down, so the usual case (that item has keys) costs one look-up.
  int last_busy = -1;
  if (work_begin < work_end)
    for (int w = work_begin + (work_end - 1 - work_begin) / work_step * work_step;
         w >= work_begin; w -= work_step)
      if (work_at(w).tile.ntiles > 0) {
        last_busy = w;
        break;
      }
  const int wg = uniform_warpgroup();

  if (threadIdx.x == 0) {
    FullBar::init(&ss.q_full, 1);
    EmptyBar::init(&ss.q_empty, Tr::kConsumerWarps);
    CUTLASS_PRAGMA_UNROLL
    for (int s = 0; s < STAGES; ++s) {
      FullBar::init(&ss.k_full[s], 1);
      FullBar::init(&ss.v_full[s], 1);
      EmptyBar::init(&ss.k_empty[s], Tr::kConsumerWarps);
      EmptyBar::init(&ss.v_empty[s], Tr::kConsumerWarps);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Tr::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Tr::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename Tr::SmemLayoutKV{});

  // ------------------------------------------------------------------ producer
  if (wg == 0) {
    cutlass::arch::warpgroup_reg_dealloc<kBiasMask ? Tr::kProducerRegsBM : Tr::kProducerRegs>();
    if (threadIdx.x / 32 == 0 && cute::elect_one_sync()) {
      Tensor mQ = args.tma_q.get_tma_tensor(make_shape(p.T, Int<D>{}, p.N, p.B));
      Tensor mK = args.tma_k.get_tma_tensor(make_shape(p.S, Int<D>{}, p.KH, p.B));
      Tensor mV = args.tma_v.get_tma_tensor(make_shape(p.S, Int<D>{}, p.KH, p.B));
      auto tq = args.tma_q.get_slice(_0{});
      auto tk = args.tma_k.get_slice(_0{});
      auto tv = args.tma_v.get_slice(_0{});
      Tensor tQs = tq.partition_D(sQ);
      Tensor tKs = tk.partition_D(sK);  // (TMA, TMA_M, TMA_K, STAGES)
      Tensor tVs = tv.partition_D(sV);
      int pos = 0, q_loads = 0;  // K/V ring position and Q tiles loaded, over the work items
      for (int w = work_begin; w < work_end; w += work_step) {
        const Work wk = work_at(w);
        const int ntiles = wk.tile.ntiles, kh = wk.n / p.hpk;
        if (ntiles == 0) continue;
        Tensor gQ = local_tile(mQ(_, _, wk.n, wk.b), Shape<Int<BR>, Int<D>>{},
                               make_coord(wk.tile.index, _0{}));
        Tensor gK = local_tile(mK(_, _, kh, wk.b), Shape<Int<BC>, Int<D>>{}, make_coord(_, _0{}));
        Tensor gV = local_tile(mV(_, _, kh, wk.b), Shape<Int<BC>, Int<D>>{}, make_coord(_, _0{}));
        Tensor tQg = tq.partition_S(gQ);
        Tensor tKg = tk.partition_S(gK);  // (TMA, TMA_M, TMA_K, tiles)
        Tensor tVg = tv.partition_S(gV);

        // K and V have their own rings: K of tile j+1 goes out before V of tile j (the consumers
        // need it first), and a K stage is free as soon as its QK^T has run.
        auto load_k = [&](int it) {
          const int r = pos + it, st = r % STAGES;
          if (r >= STAGES) EmptyBar::wait(&ss.k_empty[st], ((r / STAGES) - 1) & 1);
          FullBar::arrive_and_expect_tx(&ss.k_full[st], Tr::kKVBytes);
          copy(args.tma_k.with(ss.k_full[st], 0), tKg(_, _, _, it), tKs(_, _, _, st));
        };
        if (q_loads > 0) EmptyBar::wait(&ss.q_empty, (q_loads - 1) & 1);
        FullBar::arrive_and_expect_tx(&ss.q_full, Tr::kQBytes);
        copy(args.tma_q.with(ss.q_full, 0), tQg, tQs);
        ++q_loads;
        load_k(0);
        for (int it = 0; it < ntiles; ++it) {
          if (it + 1 < ntiles) load_k(it + 1);
          const int r = pos + it, st = r % STAGES;
          if (r >= STAGES) EmptyBar::wait(&ss.v_empty[st], ((r / STAGES) - 1) & 1);
          FullBar::arrive_and_expect_tx(&ss.v_full[st], Tr::kKVBytes);
          copy(args.tma_v.with(ss.v_full[st], 0), tVg(_, _, _, it), tVs(_, _, _, st));
        }
        pos += ntiles;
      }
    }
    return;
  }

  // ------------------------------------------------------------------ consumers
  cutlass::arch::warpgroup_reg_alloc<kBiasMask ? Tr::kConsumerRegsBM : Tr::kConsumerRegs>();
  const int ctid = threadIdx.x - 128;
  const int lane = threadIdx.x % 32;
  typename Tr::MmaQK mma_qk;
  typename Tr::MmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(ctid);
  auto thr_pv = mma_pv.get_thread_slice(ctid);
  Tensor sVt = make_tensor(make_smem_ptr(ss.v.data()), typename Tr::SmemLayoutVt{});
  // descriptors of the shared-memory operands: from the warpgroup's slice (uniform registers)
  auto wg_qk = mma_qk.get_slice((wg - 1) * 128);
  auto wg_pv = mma_pv.get_slice((wg - 1) * 128);
  Tensor tSrQ = wg_qk.partition_fragment_A(sQ);   // (MMA, MMA_M, MMA_K) descriptors
  Tensor tSrK = wg_qk.partition_fragment_B(sK);   // (MMA, MMA_N, MMA_K, STAGES)
  Tensor tOrV = wg_pv.partition_fragment_B(sVt);  // (MMA, MMA_N, MMA_K, STAGES)
  // S accumulators are declared per tile (fresh registers, as FA3): a loop-carried accumulator
  // read by the softmax makes ptxas serialise the wgmma pipeline.
  auto new_s = [&]() { return partition_fragment_C(mma_qk, Shape<Int<BR>, Int<BC>>{}); };
  using STensor = decltype(new_s());
  STensor tSrP = new_s();  // layout reference only (the softmax works in place on S)
  Tensor tOrO = partition_fragment_C(mma_pv, Shape<Int<BR>, Int<D>>{});
  Tensor tScS = thr_qk.partition_C(make_identity_tensor(Shape<Int<BR>, Int<BC>>{}));
  Tensor tOcO = thr_pv.partition_C(make_identity_tensor(Shape<Int<BR>, Int<D>>{}));
  // Element i of an accumulator sits in row half (i >> 1) & 1 of the thread's two rows.
  static_assert(decltype(size<0, 0>(tSrP))::value == 2 && decltype(size<0, 1>(tSrP))::value == 2);
  static_assert(decltype(size<1>(tSrP))::value == 1 && decltype(size<2>(tSrP))::value == 1);
  static_assert(decltype(size<0, 0>(tOrO))::value == 2 && decltype(size<0, 1>(tOrO))::value == 2);

  // Pingpong (FA3): one warpgroup's softmax runs under the other's products; the turns run on
  // across work items.
  const Pingpong turn(wg, last_busy >= 0);
  int pos = 0, q_loads = 0;  // as the producer's
  for (int w = work_begin; w < work_end; w += work_step) {
    const Work wk = work_at(w);
    const int n = wk.n, b = wk.b;
    const RowLimits& L = wk.L;
    const int t0 = wk.tile.t0, ntiles = wk.tile.ntiles;
    auto stage = [&](int it) { return (pos + it) % STAGES; };
    auto phase = [&](int it) { return ((pos + it) / STAGES) & 1; };

    int rows[2], lims[2];
    CUTLASS_PRAGMA_UNROLL
    for (int h = 0; h < 2; ++h) {
      rows[h] = t0 + get<0>(tScS(2 * h));
      lims[h] = L(rows[h]);
    }
    // Keys below wg_min_lim are valid for every row of this warpgroup (rows beyond qlen: none).
    const int wg_r0 = t0 + 64 * (wg - 1);
    const int wg_min_lim = min(L(wg_r0), L(wg_r0 + 63));

    // Bias / mask of this thread's two rows (kBiasMask), key stride 1: 64-bit row bases once (rows
    // past T clamped). The thread's keys in a tile are kt + dk(i), dk(i) a compile-time constant,
    // so elements sit at immediate offsets from a row pointer. A mask broadcast along S (stride 0)
    // is a per-row value: a row it masks out gets limit 0. A bias broadcast along S goes to the
    // sm_80 kernel (UsesSm90Fwd).
    const bool has_bias = kBiasMask && p.bias != nullptr;
    const bool has_mask = kBiasMask && p.mask != nullptr;
    const bool mask_keys = has_mask && p.mask_ss != 0;
    const int kt = get<1>(tScS(0));
    auto dk = [&](int i) { return get<1>(tScS(i)) - kt; };
    const float* bias_r[2];    // + kt
    const uint8_t* mask_r[2];  // row base in global memory
    uint8_t* mask_k[2];        // + kt in the staged row (which starts at its first word)
    CUTLASS_PRAGMA_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int t = min(rows[h], p.T - 1);
      bias_r[h] = has_bias ? p.bias + b * p.bias_sb + n * p.bias_sn + t * p.bias_st + kt : nullptr;
      mask_r[h] = has_mask ? p.mask + b * p.mask_sb + n * p.mask_sn + t * p.mask_st : nullptr;
      if constexpr (kBiasMask) {
        mask_k[h] = smem_raw + Tr::kSmem + (rows[h] - t0) * Tr::kMaskRowBytes +
                    (reinterpret_cast<uintptr_t>(mask_r[h]) & 3) + kt;
        if (has_mask && !mask_keys && *mask_r[h] == 0) lims[h] = 0;
      }
    }

    const float sc = p.scale[n];
    const float c2 = sc * kLog2e;
    const bool fixed =
        !has_bias && p.bounded && fabsf(sc) * p.norm_groups <= ShiftCfg<T>::kMaxBound;
    const float shift2 = fixed ? (ShiftCfg<T>::kDelta - fabsf(sc) * p.norm_groups) * kLog2e : 0.f;

    float lsum[2][2] = {{0.f, 0.f}, {0.f, 0.f}};  // [row half][two chains]
    float mrow[2] = {-INFINITY, -INFINITY};       // running max (log2 units), online path only
    clear(tOrO);

    auto release = [&](uint64_t* bar) {
      __syncwarp();
      if (lane == 0) EmptyBar::arrive(bar);
    };

    // kBiasMask (else a no-op): stages the mask of key tile j for this quad's two rows (lanes
    // 4g..4g+3 share their rows): the words covering bytes j*BC .. j*BC+BC-1 of each row, 9 per row
    // and thread, zero-filled past the row's end.
    auto stage_mask = [&](int j) {
      if constexpr (kBiasMask) {
        __syncwarp();  // the quad is done reading the previous tile
        if (mask_keys && j < ntiles) {
          CUTLASS_PRAGMA_UNROLL
          for (int h = 0; h < 2; ++h) {
            const int lead = int(reinterpret_cast<uintptr_t>(mask_r[h]) & 3);
            const uint8_t* src = mask_r[h] + j * BC - lead;
            uint8_t* dst = mask_k[h] - kt - lead;
            const int left = p.S - j * BC + lead;  // bytes from src to the row's end
            CUTLASS_PRAGMA_UNROLL
            for (int q = 0; q < Tr::kMaskRowBytes / 16; ++q) {
              const int o = 4 * (lane % 4) + 16 * q;  // byte offset of this thread's word
              const int len = min(max(left - o, 0), 4);
              cp_async4_n(dst + o, src + (len > 0 ? o : 0), len);  // a valid address even if empty
            }
          }
        }
      }
    };

    // Softmax of the S tile with keys s0.. into tSrP (f32). Only reads the S accumulator, so it may
    // run while the previous PV wgmma is in flight. Online path: returns the factor O must be
    // rescaled by once that PV has landed.
    float alpha[2] = {1.f, 1.f};
    auto softmax = [&](STensor& tSrS, int s0) {
      const bool check = s0 + BC > wg_min_lim || has_mask;
      if constexpr (kBiasMask) {  // the quad's staged mask words of this tile
        cp_async_wait_all();
        __syncwarp();
      }
      auto key_ok = [&](int i) {
        const int h = (i >> 1) & 1;
        if constexpr (kBiasMask) {  // the smem byte is read either way: no branch
          return (dk(i) < lims[h] - s0 - kt) & (!mask_keys | (mask_k[h][dk(i)] != 0));
        } else {
          return s0 + get<1>(tScS(i)) < lims[h];
        }
      };
      // Bias of element i: guarded by the row limit in checked tiles. A tile without checks has
      // no key past S (rows are clamped), and no mask, so a bias: plain loads.
      auto bias_at = [&](int i, auto chk) {
        const int h = (i >> 1) & 1;
        if constexpr (decltype(chk)::value)
          return ldg_if(has_bias && dk(i) < lims[h] - s0 - kt, bias_r[h] + s0 + dk(i), 0.f);
        else
          return __ldg(bias_r[h] + s0 + dk(i));
      };
      if (fixed) {
        auto body = [&](auto chk) {
          CUTLASS_PRAGMA_UNROLL
          for (int i = 0; i < size(tSrP); ++i) {
            float pv = ex2(fmaf(tSrS(i), c2, shift2));
            if constexpr (decltype(chk)::value) pv = key_ok(i) ? pv : 0.f;
            tSrS(i) = pv;
            lsum[(i >> 1) & 1][(i >> 2) & 1] += pv;  // two independent chains per row
          }
        };
        if (check) body(BoolC<true>{});
        else body(BoolC<false>{});
        return;
      }
      float tmax[2] = {-INFINITY, -INFINITY};
      auto logits = [&](auto chk) {  // chk: bool, or std::bool_constant for a compile-time check
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < size(tSrP); ++i) {
          float x = tSrS(i) * c2;
          if constexpr (kBiasMask) x = fmaf(bias_at(i, chk), kLog2e, x);
          if (chk && !key_ok(i)) x = -INFINITY;
          tSrS(i) = x;
          tmax[(i >> 1) & 1] = fmaxf(tmax[(i >> 1) & 1], x);
        }
      };
      if constexpr (kBiasMask) {  // loads: the check is resolved at compile time
        if (check) logits(std::true_type{});
        else logits(std::false_type{});
      } else {
        logits(check);
      }
      CUTLASS_PRAGMA_UNROLL
      for (int h = 0; h < 2; ++h) {
        const float mnew = fmaxf(mrow[h], quad_max(tmax[h]));
        // -inf old max: nothing accumulated yet (alpha 0 also clears the zero-initialised O).
        alpha[h] = (mrow[h] == -INFINITY) ? 0.f : ex2(mrow[h] - mnew);
        lsum[h][0] *= alpha[h];
        lsum[h][1] *= alpha[h];
        mrow[h] = mnew;
        tmax[h] = (mnew == -INFINITY) ? 0.f : mnew;
      }
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(tSrP); ++i) {
        const float pv = ex2(tSrS(i) - tmax[(i >> 1) & 1]);  // -inf -> 0
        tSrS(i) = pv;
        lsum[(i >> 1) & 1][(i >> 2) & 1] += pv;
      }
    };
    Tensor rP = make_tensor_like<Element>(tSrP);
    Tensor tOrP = make_tensor(rP.data(), acc_as_a_operand(rP.layout()));
    auto pack_p = [&](STensor const& tSrP) {
      uint32_t* dst = reinterpret_cast<uint32_t*>(raw_pointer_cast(rP.data()));
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < size(tSrP) / 2; ++j)
        dst[j] = MmaOp<T>::pack(tSrP(2 * j), tSrP(2 * j + 1));
    };

    if (ntiles > 0) {
      stage_mask(0);
      FullBar::wait(&ss.q_full, q_loads & 1);
      FullBar::wait(&ss.k_full[stage(0)], phase(0));
      STensor tSrS = new_s();
      turn.wait();
      wg_gemm<true, false>(mma_qk, tSrQ, tSrK(_, _, _, stage(0)), tSrS);
      turn.pass();
      warpgroup_wait<0>();
      release(&ss.k_empty[stage(0)]);
      softmax(tSrS, 0);
      stage_mask(1);
      pack_p(tSrS);
    }
    // Per tile (FA3's intra-warpgroup overlap): issue QK^T of the next tile, then PV of this one;
    // wait for the QK^T only and compute the next softmax while PV runs. The last tile is peeled
    // so that no wait sits behind a branch (ptxas would serialise the wgmma pipeline).
    for (int it = 0; it + 1 < ntiles; ++it) {
      const int st = stage(it), st1 = stage(it + 1);
      STensor tSrS = new_s();
      FullBar::wait(&ss.k_full[st1], phase(it + 1));
      FullBar::wait(&ss.v_full[st], phase(it));
      turn.wait();
      wg_gemm<true, false>(mma_qk, tSrQ, tSrK(_, _, _, st1), tSrS);
      wg_gemm<false, true>(mma_pv, tOrP, tOrV(_, _, _, st), tOrO);
      turn.pass();
      warpgroup_wait<1>();
      release(&ss.k_empty[st1]);
      softmax(tSrS, (it + 1) * BC);
      stage_mask(it + 2);
      warpgroup_wait<0>();
      release(&ss.v_empty[st]);
      if (!fixed) {
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < size(tOrO); ++i) tOrO(i) *= alpha[(i >> 1) & 1];
      }
      pack_p(tSrS);
    }
    if (ntiles > 0) {
      if constexpr (kPersistent) release(&ss.q_empty);  // every QK^T of this tile has run
      const int st = stage(ntiles - 1);
      FullBar::wait(&ss.v_full[st], phase(ntiles - 1));
      turn.wait();
      wg_gemm<false, true>(mma_pv, tOrP, tOrV(_, _, _, st), tOrO);
      turn.pass_unless_last(w == last_busy);
      warpgroup_wait<0>();
      release(&ss.v_empty[st]);
      pos += ntiles;
      ++q_loads;
    }

    // ------------------------------------------------------------------ epilogue: O / l, lse
    float inv[2], l[2];
    CUTLASS_PRAGMA_UNROLL
    for (int h = 0; h < 2; ++h) {
      l[h] = quad_sum(lsum[h][0] + lsum[h][1]);
      inv[h] = l[h] > 0.f ? 1.f / l[h] : 0.f;
    }
    const int64_t qrow = int64_t(p.N) * D;
    T* ob = static_cast<T*>(p.o) + (int64_t(b) * p.T + t0) * qrow + int64_t(n) * D;
    store_acc_pairs(ob, qrow, p.T - t0, tOcO, [&](int j) {
      return MmaOp<T>::pack(tOrO(2 * j) * inv[j & 1], tOrO(2 * j + 1) * inv[j & 1]);
    });
    if (lane % 4 == 0) {
      CUTLASS_PRAGMA_UNROLL
      for (int h = 0; h < 2; ++h) {
        if (rows[h] < p.T) {
          const float off = fixed ? -shift2 : mrow[h];
          p.lse[(int64_t(b) * p.N + n) * p.T + rows[h]] =
              l[h] > 0.f ? (off + log2f(l[h])) * kLn2 : -INFINITY;
        }
      }
    }
  }  // work items
}

}  // namespace jca::sm90
