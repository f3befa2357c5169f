"""MLX's quantized kernels by width: one decode row through the 1 GB benchmark model's matrices ([1024, 1024] linears,
16 stacked [1024, 1024] experts gathered, lm_head [32000, 1024]) at every width x group mlx-lm writes, on the
default device (here: mlx's CPU backend). Why MLX mixed:B is as fast as the kernels of the widths it picks, not as
its bytes: on a CPU backend the kernels are compute-bound, so a width's speed is its unpacking, not its bytes.

    python -m benchmarks mlx-widths [--repeats 200] [--dtype float32|bfloat16|float16]

Medians of 5 rounds of ``--repeats`` calls each (one mx.eval per call). Writes results/mlx-widths-DTYPE-DATE.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_result, table  # noqa: E402

SHAPES = {"linear [1024, 1024]": (1024, 1024, 0), "experts 16 x [1024, 1024], one gathered": (1024, 1024, 16),
          "lm_head [32000, 1024]": (32000, 1024, 0)}


def per_call(fn, repeats: int) -> float:
    import mlx.core as mx

    mx.eval(fn())
    rounds = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(repeats):
            mx.eval(fn())
        rounds.append((time.perf_counter() - t) / repeats)
    return statistics.median(rounds)


def main() -> None:
    import mlx.core as mx

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--dtype", default="float32", help="activations, scales and biases (bfloat16: mlx's CPU backend "
                    "runs it far slower)")
    args = ap.parse_args()
    mx.random.seed(0)
    rows, out = [], {}
    for label, (n, k, experts) in SHAPES.items():
        dt = getattr(mx, args.dtype)
        w = mx.random.normal((experts or 1, n, k)).astype(dt)
        x = mx.random.normal((1, 1, 1, k)).astype(dt)
        idx = mx.array([[3]], dtype=mx.uint32)
        for bits in (2, 3, 4, 5, 6, 8):
            for g in (32, 64, 128):
                wq, s, b = mx.quantize(w if experts else w[0], group_size=g, bits=bits)
                if experts:
                    fn = lambda: mx.gather_qmm(x, wq, s, b, rhs_indices=idx, transpose=True, group_size=g, bits=bits)  # noqa: E731
                else:
                    fn = lambda: mx.quantized_matmul(x[0, 0], wq, s, b, transpose=True, group_size=g, bits=bits)  # noqa: E731
                us = per_call(fn, args.repeats if n < 4096 else max(20, args.repeats // 10)) * 1e6
                out[f"{label} int{bits} g{g}"] = round(us, 2)
                rows.append({"matrix": label, "width": f"int{bits} g{g}", "us per call": f"{us:.1f}",
                             "GB/s": f"{(n * k * bits / 8 + 2 * n * k / g * 2) / us / 1e3:.2f}"})
    print(f"device: {mx.default_device()}, {args.dtype}\n")
    print(table(rows, ["matrix", "width", "us per call", "GB/s"]))
    print(f"\nwrote {save_result(f'mlx-widths-{args.dtype}', {'device': str(mx.default_device()), 'dtype': args.dtype, 'us_per_call': out})}")


if __name__ == "__main__":
    main()
