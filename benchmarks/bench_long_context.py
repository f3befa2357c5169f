"""Long prompts on the synthetic 1 GB Llama 4 (bench_decode.py's model): time to first token, prefill and decode
speed, peak memory and KV bytes against context length (CPU, 2 threads).

    python benchmarks/bench_long_context.py [--lengths 1024,2048,4096,16384,32768,131072] [--budget 900]

Engines, each prompt length in its own process: l4export ONNX int4 (float and int8 KV cache), l4export MLX int4,
mlx-lm on the same MLX export, and llama.cpp Q4_0 / Q4_K_M through its own llama-bench (-fa 1, f16 cache; prefill
as pp LENGTH, decode as tg 16 at depth LENGTH; bench_decode.LLAMA_BIN). ``--chunk 8192``: the model with Llama 4's
chunk, which llama.cpp hard-codes. An engine stops at the first length whose prefill is predicted (from its rate at the
previous length) to take longer than ``--budget`` seconds; that is said in the table. The 1 GB model: 8 layers, 2 of
them global (NoPE), 6 chunked with attention_chunk_size 256, so KV grows with the prompt in 2 layers only.

Writes benchmarks/results/long-context-<date>.{json,png} (tok/s and memory against context length).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decode  # noqa: E402
from bench_decode import bandwidth_gbs, engine_model, l4_bytes_per_token  # noqa: E402
from common import measure, save_result, table  # noqa: E402

ENGINES = ("onnx-int4", "onnx-int4-kv8", "mlx-int4", "mlx-lm-on-l4-int4", "llama-bench-Q4_0", "llama-bench-Q4_K_M")
NEW = 16  # decode steps timed after each prompt


def run(engine: str, model: Path, length: int) -> dict:
    """Prefill ``length`` random ids (time to first token includes the first logits), then NEW greedy steps."""
    ids = np.random.default_rng(0).integers(300, 30000, length).tolist()
    if engine.startswith("mlx-lm"):
        import mlx.core as mx
        from mlx_lm import load
        from mlx_lm.models.cache import make_prompt_cache

        m, _ = load(str(model))
        cache = make_prompt_cache(m)
        t = time.perf_counter()
        for a in range(0, length, 2048):  # mlx-lm's own prefill step
            out = m(mx.array([ids[a:a + 2048]]), cache=cache)
            mx.eval([c.state for c in cache])
        logits = out[0, -1]
        mx.eval(logits)
        ttft = time.perf_counter() - t
        times, tok = [], int(np.argmax(np.array(logits)))
        for _ in range(NEW):
            t = time.perf_counter()
            o = m(mx.array([[tok]]), cache=cache)[0, -1]
            mx.eval(o)
            times.append(time.perf_counter() - t)
            tok = int(np.argmax(np.array(o)))
        kv = sum(sum(getattr(a, "nbytes", 0) for a in c.state) for c in cache)
    elif engine.startswith("llama-bench"):  # llama.cpp's own: pp LENGTH, then tg NEW at depth LENGTH (f16 cache)
        pp = bench_decode.llama_bench(model, 2, length, 0, 0)
        ttft, times = length / pp, [1 / bench_decode.llama_bench(model, 2, 0, NEW, length)]
        kv = 0  # (not reported)
    else:
        from l4export.runtimes import load_runtime

        rt = load_runtime(model, kv_dtype="int8" if engine.endswith("kv8") else None)
        rt.reset()
        rt.reserve(length + NEW + 1)
        t = time.perf_counter()
        logits = rt.forward(ids, last_only=True)[-1]
        ttft = time.perf_counter() - t
        times, tok = [], int(np.argmax(logits))
        for _ in range(NEW):
            t = time.perf_counter()
            tok = int(np.argmax(rt.forward([tok])[-1]))
            times.append(time.perf_counter() - t)
        kv = rt.cache_bytes
    return {"length": length, "ttft_s": ttft, "prefill_tok_s": length / ttft, "decode_tok_s": 1 / float(np.median(times)),
            "kv_bytes": int(kv), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,2048,4096,16384,32768,131072")
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help="Comma-separated; ENGINE:N runs that engine up to N tokens only (e.g. onnx-int4-kv8:32768).")
    ap.add_argument("--budget", type=float, default=900.0, help="Largest predicted prefill time (s) an engine is run.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=256, help="the model's attention_chunk_size (8192: Llama 4's, and "
                    "what llama.cpp hard-codes)")
    ap.add_argument("--tag", default="", help="results/long-context[-TAG]-DATE.json")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    bench_decode.CHUNK = args.chunk
    bench_decode.MODEL = bench_decode.WORK / ("decode-1g" if args.chunk == 256 else f"decode-1g-c{args.chunk}")
    if args.worker:
        print(json.dumps(run(args.worker, Path(args.model), args.length)))
        return
    bench_decode.build_model(bench_decode.MODEL)
    name = "long-context" + (f"-{args.tag}" if args.tag else "")
    lengths = [int(n) for n in args.lengths.split(",")]
    env = {"OMP_NUM_THREADS": str(args.threads)}
    results: dict[str, list[dict]] = {}
    for item in [e for e in args.engines.split(",") if e]:
        engine, _, cap = item.partition(":")
        model = engine_model(engine.removesuffix("-kv8"))
        results[engine] = []
        for n in [n for n in lengths if not cap or n <= int(cap)]:
            prev = results[engine][-1] if results[engine] else None
            if prev and "prefill_tok_s" in prev and n / prev["prefill_tok_s"] * (n / prev["length"]) ** 0.5 > args.budget:
                results[engine].append({"length": n, "skipped": f"predicted prefill over {args.budget:.0f} s"})
                print(f"{engine} {n}: skipped (predicted over {args.budget:.0f} s)")
                continue
            m = measure([sys.executable, __file__, "--chunk", str(args.chunk), "--worker", engine, "--model", str(model),
                         "--length", str(n)], env=env)
            r = json.loads(m["output_tail"].strip().splitlines()[-1])
            r["process_peak_rss_mb"] = m["peak_rss_mb"]
            results[engine].append(r)
            save_result(name, {"partial": True, "results": results})  # a long run keeps what it measured
            print(f"{engine} {n}: ttft {r['ttft_s']:.1f} s ({r['prefill_tok_s']:.0f} tok/s), decode "
                  f"{r['decode_tok_s']:.1f} tok/s, peak RSS {r['process_peak_rss_mb']:.0f} MB, KV {r['kv_bytes'] / 1e6:.1f} MB")
    report(results, args, name)


def kv_read_bytes(length: int, itemsize: int) -> int:
    """KV bytes one decode step reads after ``length`` tokens: every global layer all length + 1 keys and values,
    every chunked layer those of its current chunk ((length % C) + 1)."""
    from l4export.spec import load_spec

    s = load_spec(bench_decode.MODEL)
    keys = sum((length % s.attention_chunk_size) + 1 if la.chunked and s.attention_chunk_size else length + 1
               for la in s.layers)
    return 2 * keys * s.num_kv_heads * s.head_dim * itemsize


def add_bandwidth(results: dict, bw: float) -> None:
    """Bytes a decode step reads (active weights + KV, ONNX engines) and the share of the bandwidth ceiling that
    decode reaches; ``ceiling_tok_s`` is the decode speed at 100% of it."""
    for e, rs in results.items():
        if not e.startswith("onnx"):
            continue
        weights = l4_bytes_per_token(engine_model(e.removesuffix("-kv8")))
        for r in rs:
            if "ttft_s" in r:
                b = weights + kv_read_bytes(r["length"], 1 if e.endswith("kv8") else 4)
                r.update(bytes_per_token=b, ceiling_tok_s=bw * 1e9 / b, bandwidth_share=r["decode_tok_s"] * b / (bw * 1e9))


def report(results: dict, args, name: str) -> None:
    bw = bandwidth_gbs(args.threads)
    add_bandwidth(results, bw)
    rows = []
    for e, rs in results.items():
        for r in rs:
            rows.append({"engine": e, "prompt": r["length"], "TTFT s": f"{r['ttft_s']:.1f}" if "ttft_s" in r else "",
                         "MB/token": f"{r['bytes_per_token'] / 1e6:.0f}" if "bytes_per_token" in r else "",
                         "% bandwidth": f"{100 * r['bandwidth_share']:.0f}" if "bandwidth_share" in r else "",
                         "prefill tok/s": f"{r['prefill_tok_s']:.0f}" if "ttft_s" in r else r.get("skipped", ""),
                         "decode tok/s": f"{r['decode_tok_s']:.1f}" if "ttft_s" in r else "",
                         "peak RSS MB": f"{r['process_peak_rss_mb']:.0f}" if "ttft_s" in r else "",
                         "KV MB": f"{r['kv_bytes'] / 1e6:.1f}" if r.get("kv_bytes") else ""})
    print()
    print(table(rows, ["engine", "prompt", "TTFT s", "prefill tok/s", "decode tok/s", "MB/token", "% bandwidth",
                       "peak RSS MB", "KV MB"]))
    print(f"bandwidth ceiling (2-thread copy): {bw:.1f} GB/s")
    goals = long_goals(results)
    for k, v in goals.items():
        print(f"{'MET   ' if v['met'] else 'MISSED'} {k}: {v['value']}")
    path = save_result(name, {"threads": args.threads, "decode_steps": NEW, "bandwidth_gbs": bw, "results": results,
                              "goals": goals}, png=lambda png: plot(results, png))
    print(f"\nwrote {path} and {path.with_suffix('.png')}")


def long_goals(results: dict) -> dict:
    g: dict = {}
    at = {r["length"]: r for r in results.get("onnx-int4", []) if "ttft_s" in r}
    if 32768 in at:
        rss = at[32768]["process_peak_rss_mb"]
        g["32k prompt, ONNX int4: peak RSS <= 2 GB"] = {"value": f"{rss:.0f} MB", "met": rss <= 2048}
        if 2048 in at:
            q = at[32768]["prefill_tok_s"] / at[2048]["prefill_tok_s"]
            g["32k prompt, ONNX int4: prefill rate >= 0.25x the rate at 2k"] = {
                "value": f"{at[32768]['prefill_tok_s']:.0f} / {at[2048]['prefill_tok_s']:.0f} = {q:.2f}x", "met": q >= 0.25}
        if 1024 in at:
            q = at[32768]["decode_tok_s"] / at[1024]["decode_tok_s"]
            g["decode with 32k of context >= 0.5x decode with 1k (ONNX int4)"] = {
                "value": f"{at[32768]['decode_tok_s']:.1f} / {at[1024]['decode_tok_s']:.1f} = {q:.2f}x", "met": q >= 0.5}
            if "bytes_per_token" in at[32768]:  # what the bandwidth allows: both at 100% of the ceiling
                c = at[1024]["bytes_per_token"] / at[32768]["bytes_per_token"]
                g["decode with 32k of context >= 0.5x decode with 1k (ONNX int4)"]["value"] += (
                    f"; at the bandwidth ceiling at most {c:.2f}x ({at[1024]['bytes_per_token'] / 1e6:.0f} vs "
                    f"{at[32768]['bytes_per_token'] / 1e6:.0f} MB read per token; shares of the ceiling "
                    f"{100 * at[1024]['bandwidth_share']:.0f}% and {100 * at[32768]['bandwidth_share']:.0f}%)")
    if 131072 in at:
        r = at[131072]
        g["128k prompt, ONNX int4: completes in bounded memory"] = {
            "value": f"{r['ttft_s']:.0f} s, peak RSS {r['process_peak_rss_mb']:.0f} MB, KV {r['kv_bytes'] / 1e6:.0f} MB",
            "met": r["process_peak_rss_mb"] <= 4096}
    kv8 = {r["length"]: r for r in results.get("onnx-int4-kv8", []) if "ttft_s" in r}
    both = sorted(set(at) & set(kv8))
    if both:
        n = both[-1]
        ratio = kv8[n]["kv_bytes"] / (at[n]["kv_bytes"] / 2)  # the float cache is float32: fp16 is half of it
        g["int8 KV: cache bytes <= 0.5x fp16"] = {"value": f"{ratio:.3f}x fp16 at {n} tokens", "met": ratio <= 0.5}
    return g


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for e, rs in results.items():
        rs = [r for r in rs if "ttft_s" in r]
        if not rs:
            continue
        x = [r["length"] for r in rs]
        axes[0].plot(x, [r["decode_tok_s"] for r in rs], "o-", label=e)
        axes[1].plot(x, [r["prefill_tok_s"] for r in rs], "o-", label=e)
        axes[2].plot(x, [r["process_peak_rss_mb"] for r in rs], "o-", label=e)
    for ax, title in zip(axes, ("decode tokens/s", "prefill tokens/s", "peak RSS (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Long prompts on a synthetic 1 GB Llama 4 MoE (2 threads)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)


if __name__ == "__main__":
    main()
