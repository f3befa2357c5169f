"""Where an ONNX decode step goes: ONNX Runtime's profile of our runtime's decode steps on bench_decode's 1 GB model
(int4 export), by op type, with the share of the small nodes (everything but MatMulNBits, QMoE and attention; issue
27's goal: <= 15 %).

    python -m benchmarks profile-decode [--steps 64] [--export onnx-int4]

One process, 2 threads; the profiler's own overhead is in the times (shares are what it is for). Writes
results/decode-profile-DATE.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import build_model, l4_export  # noqa: E402
from common import WORK, save_result, table  # noqa: E402

BIG = ("MatMulNBits", "QMoE", "MoE", "GroupQueryAttention", "MatMulBlockQuantizedFp8Weight")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--export", default="onnx-int4", help="an export bench_decode makes (onnx-int4, onnx-mixed3.0, ...)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    import onnxruntime as ort

    build_model()
    quant = {"onnx-int4": "int4", "onnx-fp8": "fp8"}.get(args.export, f"mixed:{args.export.removeprefix('onnx-mixed')}")
    export = l4_export(args.export, "onnx", *([] if args.export == "onnx-fp32" else ["--quant", quant]))
    real = ort.InferenceSession

    def profiled(path, sess_options=None, providers=None):
        sess_options.enable_profiling = True
        sess_options.profile_file_prefix = str(WORK / "decode-profile")
        return real(path, sess_options=sess_options, providers=providers)

    ort.InferenceSession = profiled
    from l4export.runtimes import load_runtime

    rt = load_runtime(export)
    rt.reset()
    rt.reserve(args.steps + 2)
    for t in range(args.steps + 1):  # the first step's profile (session warm-up) is counted too
        rt.forward([300 + t], last_only=True)
    events = json.loads(Path(rt.session.end_profiling()).read_text())
    time_by, nodes = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            time_by[e["args"]["op_name"]] += e["dur"]
            nodes[e["args"]["op_name"]] += 1
    total = sum(time_by.values())
    small = sum(v for k, v in time_by.items() if k not in BIG)
    steps = args.steps + 1
    rows = [{"op": k, "ms per step": f"{v / 1e3 / steps:.3f}", "share": f"{100 * v / total:.1f}%",
             "nodes per step": f"{nodes[k] / steps:.0f}"} for k, v in time_by.most_common()]
    print(table(rows, ["op", "ms per step", "share", "nodes per step"]))
    print(f"\nsmall nodes (all but {', '.join(BIG)}): {100 * small / total:.1f}% of the kernel time, "
          f"{sum(n for k, n in nodes.items() if k not in BIG) / steps:.0f} nodes per step")
    result = {"export": args.export, "steps": steps, "kernel_ms_per_step": total / 1e3 / steps,
              "small_share": small / total, "by_op_ms": {k: v / 1e3 / steps for k, v in time_by.most_common()},
              "nodes_per_step": {k: n / steps for k, n in nodes.items()}}
    print(f"wrote {save_result('decode-profile', result)}")


if __name__ == "__main__":
    main()
