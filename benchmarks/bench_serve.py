"""Server overhead: streamed tokens/s through ``l4export serve`` (the official openai client, /v1/completions,
stream=True) against ``rt.generate`` in a process of its own, on the demo and on the 1 GB benchmark model (int4 ONNX);
and a conversation's turn 2: its time to first token with a --history token history cached against the same request
cold (issue 28's goal: <= 0.1x). ``--peers``: our server beside llama-cpp-python's (``python -m llama_cpp.server``)
on the same 1 GB model (chunk 8192) as GGUF Q4_0 / Q4_K_M: one stream, four at once, turn 2's first token.

    python benchmarks/bench_serve.py [--runs 3] [--new 128] [--history 4096] [--turn2-only] [--peers]

Rate = tokens / (time of the last token - time the request was made), prefill included on both sides (the server
streams a token only once its text is whole UTF-8, and the 1 GB model's random tokens often decode to nothing, so
the first streamed event is not the first token); the server side counts the final event's usage.completion_tokens.
Both run to max_tokens (ignore_eos). Runs interleaved, medians; the goal is server >= 0.9x.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, save_result, table  # noqa: E402

PROMPT = "def fibonacci(n):\n    "


def models() -> dict[str, Path]:
    from l4export.convert import ExportOptions, convert
    from l4export.demo import write_demo_checkpoint

    demo = WORK / "serve-demo"
    if not (demo / "config.json").is_file():
        write_demo_checkpoint(demo)
    out = {"demo-onnx": WORK / "serve-demo-onnx", "1g-onnx-int4": WORK / "decode-onnx-int4"}
    if not (out["demo-onnx"] / "l4export.json").is_file():
        convert(demo, out["demo-onnx"], ExportOptions(format="onnx"))
    return {k: v for k, v in out.items() if (v / "l4export.json").is_file()}


def direct(model: Path, new: int) -> float:
    """tokens/s of rt.generate (run as a worker process)."""
    out = subprocess.run([sys.executable, __file__, "--direct", str(model), "--new", str(new)], capture_output=True,
                         text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _direct_worker(model: Path, new: int) -> None:
    from l4export.runtimes import load_runtime

    rt = load_runtime(model)
    ids = rt.encode(PROMPT)
    list(rt.generate(ids, 8, temperature=0.0, stop=[]))  # warm-up, as the server's
    t0, n = time.perf_counter(), 0
    for _ in rt.generate(ids, new, temperature=0.0, stop=[]):
        n += 1
    print(n / (time.perf_counter() - t0))


def served(url: str, new: int) -> float:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=600)
    t0, tokens = time.perf_counter(), 0
    stream = client.completions.create(model="m", prompt=PROMPT, max_tokens=new, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens / (time.perf_counter() - t0)


def history(tokens: int) -> list[dict]:
    """A conversation of about ``tokens`` tokens of byte-level text (the models' tokenizers are byte-level), ending
    with a user turn."""
    turn = "The quick brown fox jumps over the lazy dog; then it rests by the river and counts the stars. "
    msgs, size = [], 0
    while size < tokens:
        msgs += [{"role": "user", "content": turn * 4}, {"role": "assistant", "content": turn * 4}]
        size += 2 * len(turn) * 4 + 8
    return msgs + [{"role": "user", "content": "And then?"}]


def ttft(url: str, messages: list[dict]) -> tuple[float, int]:
    """Seconds to the first streamed chunk with content or usage (one token), and the cached prompt tokens."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    first, cached = None, 0
    for chunk in client.chat.completions.create(model="m", messages=messages, max_tokens=1, temperature=0, stream=True,
                                                stream_options={"include_usage": True}):
        first = first or time.perf_counter()
        if chunk.usage is not None and chunk.usage.prompt_tokens_details is not None:
            cached = chunk.usage.prompt_tokens_details.cached_tokens or 0
    return first - t0, cached


def turn_two(url: str, tokens: int, runs: int) -> dict:
    """Time to first token of a conversation's next turn (its history cached by the previous turn) against the same
    request cold (another conversation ran in between, and the prompt cache is off: --prompt-cache 0)."""
    conv = history(tokens)
    other = [{"role": "user", "content": "Something else entirely, " * 40}]
    cold, warm, cached = [], [], 0
    for _ in range(runs):  # interleaved
        ttft(url, other)  # the cache now holds another sequence: the next request is cold
        cold.append(ttft(url, conv)[0])
        t, cached = ttft(url, conv[:-1] + [{"role": "user", "content": "And after that?"}])
        warm.append(t)
    return {"history_tokens": tokens, "cold_s": float(np.median(cold)), "turn2_s": float(np.median(warm)),
            "cached_tokens": cached, "ratio": float(np.median(warm) / np.median(cold)), "runs": {"cold": cold, "turn2": warm}}


def start_server(model: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    return _started(lambda port: [sys.executable, "-m", "l4export.cli", "serve", str(model), "--port", str(port),
                                  "--name", "m", *extra], f"the server for {model}")


def _started(command, what: str) -> tuple[subprocess.Popen, str]:
    """Start ``command(port)`` on a free local port; return it and its URL once /v1/models answers."""
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            urllib.request.urlopen(f"{url}/v1/models", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{what} did not start")


# ---- against llama-cpp-python's OpenAI-compatible server (issue 28) ---------------------------------------------
PEERS = ("llama.cpp-Q4_0", "llama.cpp-Q4_K_M")


def start_peer(gguf: Path) -> tuple[subprocess.Popen, str]:
    """``python -m llama_cpp.server`` on a GGUF, set as llama-bench runs: 2 threads, flash attention, f16 cache."""
    return _started(lambda port: [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "m",
                                  "--n_threads", "2", "--n_threads_batch", "2", "--n_ctx", "8192", "--flash_attn",
                                  "true", "--host", "127.0.0.1", "--port", str(port)], f"llama_cpp.server for {gguf}")


def streamed(url: str, new: int, prompt: str = PROMPT) -> tuple[int, float]:
    """Tokens of one streamed completion (events with a choice: one token each for both servers; ours also says
    usage) and its seconds."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=600)
    t0, events, usage = time.perf_counter(), 0, None
    for chunk in client.completions.create(model="m", prompt=prompt, max_tokens=new, temperature=0, stream=True):
        events += bool(chunk.choices)
        usage = chunk.usage.completion_tokens if chunk.usage is not None else usage
    return usage or events, time.perf_counter() - t0


def concurrent(url: str, clients: int, new: int) -> float:
    """Aggregate tokens/s of ``clients`` streams at once (different prompts)."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        got = list(pool.map(lambda i: streamed(url, new, f"{PROMPT}# client {i}\n    ")[0], range(clients)))
    return sum(got) / (time.perf_counter() - t0)


def peers(args) -> dict:
    """Our server on the chunk-8192 int4 export against llama-cpp-python's on the same model's GGUF Q4_0 / Q4_K_M:
    single-stream and 4-client tokens/s, turn-2 time to first token. All servers up at once (idle ones cost no CPU),
    requests interleaved, medians."""
    import bench_decode

    bench_decode.CHUNK, bench_decode.MODEL = 8192, WORK / "decode-1g-c8192"
    bench_decode.build_model(bench_decode.MODEL)
    models = {"l4export int4": bench_decode.l4_export("onnx-int4", "onnx", "--quant", "int4")}
    models |= {p: bench_decode.llama_cpp_gguf(p.split("-", 1)[1]) for p in PEERS}
    procs, urls = [], {}
    try:
        for name, m in models.items():
            proc, urls[name] = start_server(m) if name.startswith("l4export") else start_peer(m)
            procs.append(proc)
            streamed(urls[name], 8)  # warm-up
        runs: dict = {n: {"single": [], "four": [], "cold": [], "turn2": []} for n in urls}
        conv, other = history(args.history), [{"role": "user", "content": "Something else entirely, " * 40}]
        for r in range(args.runs):
            for name, url in urls.items():
                n, t = streamed(url, args.new)
                runs[name]["single"].append(n / t)
                runs[name]["four"].append(concurrent(url, 4, args.new))
                ttft(url, other)
                runs[name]["cold"].append(ttft(url, conv)[0])
                runs[name]["turn2"].append(ttft(url, conv[:-1] + [{"role": "user", "content": "And after that?"}])[0])
                print(f"run {r + 1}/{args.runs} {name}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in runs[name].items()))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
    med = {n: {k: float(np.median(v)) for k, v in r.items()} for n, r in runs.items()}
    rows = [{"server": n, "1 stream tok/s": f"{m['single']:.1f}", "4 streams tok/s": f"{m['four']:.1f}",
             "cold TTFT s": f"{m['cold']:.2f}", "turn-2 TTFT s": f"{m['turn2']:.3f}"} for n, m in med.items()]
    print(table(rows, list(rows[0])))
    goals = peer_goals(med)
    for k, v in goals.items():
        print(f"{'MET   ' if v['met'] else 'MISSED'} {k}: {v['value']}")
    return {"history_tokens": args.history, "new_tokens": args.new, "runs": args.runs, "medians": med, "all_runs": runs,
            "goals": goals}


def peer_goals(med: dict) -> dict:
    ours, goals = med["l4export int4"], {}
    for p in [p for p in PEERS if p in med]:
        for key, label, higher in (("single", "single-stream tok/s >= 1.0x", True), ("four", "4-client tok/s >= 1.0x", True),
                                   ("turn2", "turn-2 time to first token <= 1.0x", False)):
            ratio = ours[key] / med[p][key]
            goals[f"{label} llama-cpp-python {p.split('-', 1)[1]}"] = {
                "value": f"{ours[key]:.3f} / {med[p][key]:.3f} = {ratio:.2f}x", "met": ratio >= 1 if higher else ratio <= 1}
    return goals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--direct", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--history", type=int, default=4096, help="tokens of conversation before turn 2")
    ap.add_argument("--turn2-only", action="store_true", help="only the turn-2 time-to-first-token measurement")
    ap.add_argument("--peers", action="store_true", help="only the comparison with llama-cpp-python's server "
                    "(the chunk-8192 1 GB model; bench_decode makes the GGUFs)")
    args = ap.parse_args()
    if args.direct:
        return _direct_worker(args.direct, args.new)
    if args.peers:
        print(f"wrote {save_result('serve-peers', peers(args))}")
        return
    rows, result = [], {}
    for name, model in models().items():  # issue 28: the next turn reuses the cached history
        proc, url = start_server(model, "--prompt-cache", "0")
        try:
            ttft(url, [{"role": "user", "content": "warm up"}])
            from l4export.spec import load_spec

            room = load_spec(model).max_position_embeddings - 300  # (the demo holds 4096 positions)
            result[f"{name} turn 2"] = r = turn_two(url, min(args.history, room), args.runs)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        print(f"{'MET   ' if r['ratio'] <= 0.1 else 'MISSED'} {name}: turn 2 after {r['history_tokens']} tokens: first token "
              f"{1000 * r['turn2_s']:.0f} ms vs cold {1000 * r['cold_s']:.0f} ms = {r['ratio']:.3f}x (goal <= 0.1x), "
              f"{r['cached_tokens']} tokens cached")
    if args.turn2_only:
        print(f"wrote {save_result('serve-turn2', {'runs': args.runs, 'results': result})}")
        return
    for name, model in models().items():
        proc, url = start_server(model)
        try:
            served(url, 8)  # warm-up
            d, s = [], []
            for _ in range(args.runs):  # interleaved
                d.append(direct(model, args.new))
                s.append(served(url, args.new))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        result[name] = {"direct_tok_s": float(np.median(d)), "served_tok_s": float(np.median(s)), "runs": {"direct": d,
                        "served": s}, "ratio": float(np.median(s) / np.median(d))}
        rows.append({"model": name, "rt.generate tok/s": round(result[name]["direct_tok_s"], 1),
                     "served tok/s": round(result[name]["served_tok_s"], 1), "served / direct": f"{result[name]['ratio']:.2f}x"})
    print(table(rows, list(rows[0])))
    for name, r in result.items():
        print(f"{'MET   ' if r['ratio'] >= 0.9 else 'MISSED'} {name}: served >= 0.9x rt.generate: {r['ratio']:.2f}x")
    print(f"wrote {save_result('serve', {'new_tokens': args.new, 'runs': args.runs, 'results': result})}")


if __name__ == "__main__":
    main()
