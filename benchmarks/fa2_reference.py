"""FlashAttention-2 on this card, as a same-card reference for the portable (mma.sync) kernels.

PyTorch's `scaled_dot_product_attention` with the FLASH_ATTENTION backend runs FlashAttention-2's
sm80 kernels (no Hopper instructions), the design issue 3's targets are set against. Run it in the
same device call as `bench.py --paths kernel_sm80`; it needs PyTorch, which the GPU machine's
image has and this library never imports. Plain softmax attention on l2-normalised q, k (scale
10): the same FLOPs as ours; FA2 also keeps a running row max, which our fixed shift drops.

    python benchmarks/fa2_reference.py --out OUTDIR [--dims 64 128] [--seqs 4096] [--causal]
    python benchmarks/fa2_reference.py --profile-step D   # one fwd+bwd after warm-up, for ncu
"""
import argparse
import json
import os
import statistics
import sys


def make_inputs(torch, b, n, h, d, dtype):
    q, k, v, do = (torch.randn(b, n, h, d, device="cuda", dtype=dtype) for _ in range(4))
    q = torch.nn.functional.normalize(q.float(), dim=-1).to(dtype) * 10.0  # scale folded into q
    k = torch.nn.functional.normalize(k.float(), dim=-1).to(dtype)
    # [B, N, H, D] viewed as [B, H, N, D]: FA2 takes the strides, no copy
    return [x.transpose(1, 2).requires_grad_(x is not do) for x in (q, k, v, do)]


def run_step(torch, F, q, k, v, do, causal, backward):
    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=1.0)
    if backward:
        torch.autograd.grad(o, (q, k, v), do)
    return o


def time_ms(torch, F, shape, dtype, causal, backward, iters, input_sets=3):
    inputs = [make_inputs(torch, *shape, dtype) for _ in range(input_sets)]
    for q, k, v, do in inputs:  # warm-up
        run_step(torch, F, q, k, v, do, causal, backward)
    times = []
    for i in range(iters):
        q, k, v, do = inputs[i % input_sets]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run_step(torch, F, q, k, v, do, causal, backward)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--seqs", type=int, nargs="+", default=[4096])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--profile-step", type=int, metavar="D")
    args = ap.parse_args()
    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as e:
        sys.exit(f"fa2_reference: PyTorch is not installed here ({e})")
    dtype = torch.bfloat16
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        if args.profile_step:
            q, k, v, do = make_inputs(torch, args.batch, args.seqs[0], args.heads,
                                      args.profile_step, dtype)
            for _ in range(3):
                run_step(torch, F, q, k, v, do, args.causal, True)
            torch.cuda.synchronize()
            print("profile run done")
            return
        rows = []
        card = torch.cuda.get_device_name()
        for d in args.dims:
            for n in args.seqs:
                shape = (args.batch, n, args.heads, d)
                flops = 4.0 * args.batch * args.heads * n * n * d / (2 if args.causal else 1)
                fwd = time_ms(torch, F, shape, dtype, args.causal, False, args.iters)
                both = time_ms(torch, F, shape, dtype, args.causal, True, args.iters)
                row = dict(path="fa2_torch", card=card, torch=torch.__version__, D=d, N=n,
                           B=args.batch, H=args.heads, causal=args.causal, fwd_ms=fwd,
                           fwd_bwd_ms=both, fwd_tflops=flops / fwd / 1e9,
                           fwd_bwd_tflops=3.5 * flops / both / 1e9)
                rows.append(row)
                print(f"FA2 (torch {torch.__version__}) {card} D={d} N={n} causal={args.causal}: "
                      f"fwd {fwd:.3f} ms ({row['fwd_tflops']:.0f} TFLOP/s), fwd+bwd {both:.3f} ms "
                      f"({row['fwd_bwd_tflops']:.0f})", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        name = f"fa2_reference{'_causal' if args.causal else ''}.json"
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
