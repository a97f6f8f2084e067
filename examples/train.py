"""Train a byte-level transformer with cosine-sim or softmax attention, or compare runs.

  python examples/train.py --out runs/cos --attention cosine            # decoder-only LM
  python examples/train.py --out runs/ed --model encdec --norm normformer
  python examples/train.py --compare runs/cos runs/soft --compare-out cmp.png

See examples/README.md for every option. Runs from any directory (it puts its own folder on
sys.path); jax_cosine_attention must be importable (installed, or PYTHONPATH=repo root).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lm.config import build_parser, config_from_args  # noqa: E402


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.compare:
        from lm.compare import compare
        compare(args.compare, args.compare_out, labels=args.labels)
        return
    from lm.train_loop import train
    summary = train(config_from_args(args))
    print("summary:", " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in summary.items()))


if __name__ == "__main__":
    main()
