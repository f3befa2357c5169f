"""ONNX Runtime CPU's GroupQueryAttention, one decode step (one query token) over a cache of D keys, by the cache's
dtype: float32, float16 and int8 (per-channel scales), at the 1 GB benchmark model's attention shape (16 query heads,
4 KV heads, head_dim 64). Which cache dtype ORT's CPU kernel runs fast (issue 27: "a 16-bit cache by default where the
kernels run it fast"): the cache is bound in place, as our runtime binds it.

    python -m benchmarks gqa-cache [--depths 1024,8192,32768] [--steps 30]

Medians of ``--steps`` calls per dtype and depth, 2 threads, one process. Writes results/gqa-cache-DATE.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_result, table  # noqa: E402

HQ, HKV, D = 16, 4, 64


def session(dtype: str):
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper as h

    ft = T.FLOAT16 if dtype == "float16" else T.FLOAT
    ct = {"float32": T.FLOAT, "float16": T.FLOAT16, "int8": T.INT8}[dtype]
    vi = h.make_tensor_value_info
    ins = ["q", "k", "v", "past_k", "past_v", "seqlens_k", "total"]
    inputs = [vi("q", ft, [1, None, HQ * D]), vi("k", ft, [1, None, HKV * D]), vi("v", ft, [1, None, HKV * D]),
              vi("past_k", ct, [1, HKV, None, D]), vi("past_v", ct, [1, HKV, None, D]), vi("seqlens_k", T.INT32, [1]),
              vi("total", T.INT32, [])]
    attrs = {"num_heads": HQ, "kv_num_heads": HKV}
    if dtype == "int8":
        ins += ["", "", "", "", "", "k_scale", "v_scale"]
        inputs += [vi("k_scale", T.FLOAT, [1, HKV, 1, D]), vi("v_scale", T.FLOAT, [1, HKV, 1, D])]
        attrs |= {"k_quant_type": "PER_CHANNEL", "v_quant_type": "PER_CHANNEL", "kv_cache_bit_width": 8}
    node = h.make_node("GroupQueryAttention", ins, ["out", "pk", "pv"], domain="com.microsoft", **attrs)
    g = h.make_graph([node], "gqa", inputs, [vi("out", ft, None), vi("pk", ct, None), vi("pv", ct, None)])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21), h.make_opsetid("com.microsoft", 1)], ir_version=10)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 2, 1
    return ort, ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def step_ms(dtype: str, depth: int, steps: int) -> float:
    ort, s = session(dtype)
    rng = np.random.default_rng(0)
    act = np.float16 if dtype == "float16" else np.float32
    cache = {"float32": np.float32, "float16": np.float16, "int8": np.int8}[dtype]
    kb = (rng.integers(-100, 100, (1, HKV, depth + 8, D)) if dtype == "int8"
          else rng.standard_normal((1, HKV, depth + 8, D))).astype(cache)
    bufs = [ort.OrtValue.ortvalue_from_numpy(kb), ort.OrtValue.ortvalue_from_numpy(kb.copy())]
    feeds = {"q": rng.standard_normal((1, 1, HQ * D)).astype(act), "k": rng.standard_normal((1, 1, HKV * D)).astype(act),
             "v": rng.standard_normal((1, 1, HKV * D)).astype(act), "seqlens_k": np.array([depth], np.int32),
             "total": np.array(depth + 1, np.int32)}
    if dtype == "int8":
        feeds |= {"k_scale": np.full((1, HKV, 1, D), 0.02, np.float32), "v_scale": np.full((1, HKV, 1, D), 0.02, np.float32)}
    times = []
    for _ in range(steps + 3):
        io = s.io_binding()
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        io.bind_ortvalue_input("past_k", bufs[0])
        io.bind_ortvalue_input("past_v", bufs[1])
        io.bind_output("out", "cpu")
        io.bind_ortvalue_output("pk", bufs[0])
        io.bind_ortvalue_output("pv", bufs[1])
        t = time.perf_counter()
        s.run_with_iobinding(io)
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times[3:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", default="1024,8192,32768")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    res = {dt: {d: step_ms(dt, d, args.steps) for d in depths} for dt in ("float32", "float16", "int8")}
    rows = [{"cache": dt, **{f"depth {d} ms": f"{ms:.3f}" for d, ms in r.items()},
             **{f"vs float32 at {d}": f"{ms / res['float32'][d]:.2f}x" for d, ms in r.items()}} for dt, r in res.items()]
    print(table(rows, list(rows[0])))
    print(f"wrote {save_result('gqa-cache', {'shape': {'heads': HQ, 'kv_heads': HKV, 'head_dim': D}, 'steps': args.steps, 'ms_per_step': res})}")


if __name__ == "__main__":
    main()
