"""Where an int8 KV cache's prefill time goes (issue 27): our ONNX runtime on the 1 GB int4 model (bench_decode's),
float32 cache against ``kv_dtype="int8"``, one prompt: prefill tok/s, the steps rerun because new keys/values
outgrew the int8 scales, and ONNX Runtime's profile by op type.

    python -m benchmarks kv-prefill [--tokens 8192] [--profile-tokens 4096] [--chunk 8192] [--runs 3]

Each cache in its own process, runs interleaved, medians (2 threads). ``--chunk 8192``: bench_decode's model with
Llama 4's attention chunk (the issue's). The profile is a second, shorter run with ORT's profiler on (its own overhead
included: shares, not times, are what it is for). Writes results/kv-prefill[-cCHUNK]-DATE.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decode  # noqa: E402
from common import WORK, save_result, table  # noqa: E402


def worker(kv: str, tokens: int, profile: bool) -> dict:
    import onnxruntime as ort

    if profile:  # every session the runtime opens writes a profile
        real = ort.InferenceSession

        def profiled(path, sess_options=None, providers=None):
            sess_options.enable_profiling = True
            sess_options.profile_file_prefix = str(WORK / f"kv-prefill-{kv}")
            return real(path, sess_options=sess_options, providers=providers)

        ort.InferenceSession = profiled
    from l4export.runtimes import load_runtime

    rt = load_runtime(bench_decode.l4_export("onnx-int4", "onnx", "--quant", "int4"), kv_dtype=None if kv == "float" else kv)
    reruns = [0]
    if kv != "float":
        grow = rt._rescale

        def counted(new):
            again = grow(new)
            reruns[0] += again
            return again

        rt._rescale = counted
    ids = np.random.default_rng(0).integers(300, 30000, tokens).tolist()
    rt.reset()
    rt.reserve(tokens + 1)
    t = time.perf_counter()
    rt.forward(ids, last_only=True)
    out = {"seconds": time.perf_counter() - t, "steps": len(rt.steps(tokens)), "reruns": reruns[0]}
    if profile:
        events = json.loads(Path(rt.session.end_profiling()).read_text())
        by: collections.Counter = collections.Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                by[e["args"]["op_name"]] += e["dur"]
        out["ops_s"] = {k: v / 1e6 for k, v in by.most_common()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--profile-tokens", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=256, help="the model's attention_chunk_size (8192: Llama 4's)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--worker", nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    bench_decode.CHUNK = args.chunk
    bench_decode.MODEL = WORK / ("decode-1g" if args.chunk == 256 else f"decode-1g-c{args.chunk}")
    if args.worker:
        kv, tokens, profile = args.worker
        print(json.dumps(worker(kv, int(tokens), profile == "1")))
        return
    bench_decode.build_model(bench_decode.MODEL)
    env = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}

    def child(kv: str, tokens: int, profile: str) -> dict:
        out = subprocess.run([sys.executable, __file__, "--chunk", str(args.chunk), "--worker", kv, str(tokens), profile],
                             capture_output=True, text=True, check=True, env={**__import__("os").environ, **env})
        return json.loads(out.stdout.strip().splitlines()[-1])

    res: dict = {kv: {"all": []} for kv in ("float", "int8")}
    for r in range(args.runs):  # interleaved, the order swapped every run
        for kv in (("float", "int8") if r % 2 == 0 else ("int8", "float")):
            res[kv]["all"].append(child(kv, args.tokens, "0"))
            print(f"run {r + 1}/{args.runs} {kv}: {args.tokens / res[kv]['all'][-1]['seconds']:.0f} tok/s")
    for kv in res:
        res[kv]["prefill"] = {**res[kv]["all"][0], "seconds": float(np.median([a["seconds"] for a in res[kv]["all"]]))}
        res[kv]["profile"] = child(kv, args.profile_tokens, "1")
    rows = []
    for kv, r in res.items():
        ops = r["profile"]["ops_s"]
        total = sum(v for k, v in ops.items() if k != "If")  # an If's time is its branch nodes'
        rows.append({"cache": kv, "prefill tok/s": f"{args.tokens / r['prefill']['seconds']:.0f}",
                     "steps": r["prefill"]["steps"], "reruns": r["prefill"]["reruns"],
                     "GQA s (profile)": f"{ops.get('GroupQueryAttention', 0):.2f}",
                     "GQA share": f"{100 * ops.get('GroupQueryAttention', 0) / total:.0f}%",
                     "QMoE s": f"{ops.get('QMoE', 0):.2f}", "all ops s": f"{total:.2f}"})
    print(table(rows, list(rows[0])))
    ratio = res["float"]["prefill"]["seconds"] / res["int8"]["prefill"]["seconds"]
    gqa = res["int8"]["profile"]["ops_s"]["GroupQueryAttention"] / res["float"]["profile"]["ops_s"]["GroupQueryAttention"]
    print(f"\nint8 cache prefill = {ratio:.2f}x the float cache's ({args.tokens} tokens; goal >= 0.8x at 32k); "
          f"its GroupQueryAttention takes {gqa:.1f}x the float one's")
    name = "kv-prefill" + ("" if args.chunk == 256 else f"-c{args.chunk}")
    print(f"wrote {save_result(name, {'tokens': args.tokens, 'profile_tokens': args.profile_tokens, 'chunk': args.chunk, 'runs': res, 'ratio': ratio, 'gqa_ratio': gqa})}")


if __name__ == "__main__":
    main()
