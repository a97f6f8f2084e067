"""FLOPs of one training step for a train.py configuration, without running it.

  python examples/estimate_flops.py --d-model 512 --layers 8 --heads 8 --seq-len 1024 \
      --batch-size 32 --attention softmax

Prints XLA's cost analysis of the compiled train step (on whatever backend is present — CPU is
fine) and an analytic count (6 x matmul params x tokens + attention), and the step time implied
by an assumed sustained throughput (--tflops, default 250).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

from lm import parallel  # noqa: E402
from lm.config import build_parser, config_from_args  # noqa: E402
from lm.steps import Steps, example_batch  # noqa: E402


def analytic_flops(cfg):
    D, L, T, B = cfg.d_model, cfg.layers, cfg.seq_len, cfg.batch_size
    N, K, H = cfg.heads, cfg.kv_heads, cfg.head_dim
    per_layer = D * H * (2 * N + 2 * K) + 2 * cfg.mlp_ratio * D * D
    matmul = 6 * (L * per_layer + 256 * D) * B * T
    attn_fwd = 4 * B * N * T * T * H * L * 0.5           # causal: half the blocks
    return matmul + 3.5 * attn_fwd                         # bwd ~ 2.5x fwd (recompute)


def main():
    p = build_parser()
    p.add_argument("--tflops", type=float, default=250.0)
    args = p.parse_args()
    cfg = config_from_args(args)
    mesh = parallel.make_mesh(cfg.tensor_parallel)
    parallel.set_mesh(mesh)
    steps = Steps(cfg, mesh)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         steps.state_shape, steps.state_sharding)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=steps.batch_sharding[k])
             for k, v in example_batch(cfg, cfg.batch_size).items()}
    cost = steps.train_step.lower(state, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla = float(cost.get("flops", float("nan")))
    ana = analytic_flops(cfg)
    print(f"params {steps.n_params / 1e6:.2f}M, tokens/step {cfg.batch_size * cfg.seq_len}")
    print(f"XLA cost analysis: {xla / 1e12:.2f} TFLOP/step; analytic: {ana / 1e12:.2f} TFLOP/step")
    print(f"at {args.tflops:.0f} TFLOP/s sustained: {ana / args.tflops / 1e12 * 1e3:.1f} ms/step, "
          f"{cfg.steps} steps = {cfg.steps * ana / args.tflops / 1e12:.0f} s")


if __name__ == "__main__":
    main()
