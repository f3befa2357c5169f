"""Server overhead: streamed tokens/s through ``l4export serve`` (the official openai client, /v1/completions,
stream=True) against ``rt.generate`` in a process of its own, on the demo and on the 1 GB benchmark model (int4 ONNX);
and a conversation's turn 2: its time to first token with a --history token history cached against the same request
cold (issue 28's goal: <= 0.1x). ``--peers``: our server beside llama-cpp-python's (``python -m llama_cpp.server``)
on the same 1 GB model (chunk 8192) as GGUF Q4_0 / Q4_K_M: one stream, four at once, turn 2's first token.
``--batching``: continuous batching (``serve --parallel 8``) on that model: aggregate tokens/s of 1, 2, 4 and 8
streamed clients, beside the serial server (``--parallel 1``) and llama.cpp's ``llama-server -np 8`` (continuous
batching) on the Q4_0 GGUF, and whether each client's greedy text is its solo text; below the servers, the engines
alone: our ``BatchEngine`` in-process against ``llama-batched-bench`` (decode tokens/s of 1-8 sequences of a
64-token prompt); and, in our engine, a sequence's longest gap between tokens while a 1024-token prompt arrives, run
in the server's 256-token pieces or whole.

    python benchmarks/bench_serve.py [--runs 3] [--new 128] [--history 4096] [--turn2-only] [--peers] [--batching]

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


def streamed(url: str, new: int, prompt: str = PROMPT, text: list | None = None) -> tuple[int, float]:
    """Tokens of one streamed completion (events with a choice: one token each for both servers; ours also says
    usage) and its seconds; its text appended to ``text``."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=600)
    t0, events, usage, pieces = time.perf_counter(), 0, None, []
    for chunk in client.completions.create(model="m", prompt=prompt, max_tokens=new, temperature=0, stream=True):
        events += bool(chunk.choices)
        pieces += [c.text for c in chunk.choices]
        usage = chunk.usage.completion_tokens if chunk.usage is not None else usage
    if text is not None:
        text.append("".join(pieces))
    return usage or events, time.perf_counter() - t0


def client_prompt(i: int) -> str:
    return f"{PROMPT}# client {i}\n    "


def concurrent(url: str, clients: int, new: int, texts: dict | None = None) -> float:
    """Aggregate tokens/s of ``clients`` streams at once (different prompts); their texts into ``texts`` by client."""
    from concurrent.futures import ThreadPoolExecutor

    out = [[] for _ in range(clients)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        got = list(pool.map(lambda i: streamed(url, new, client_prompt(i), out[i])[0], range(clients)))
    if texts is not None:
        texts.update({i: t[0] for i, t in enumerate(out)})
    return sum(got) / (time.perf_counter() - t0)


def _direct_batch_worker(model: Path, new: int, rows: list[int]) -> None:
    """Aggregate decode tokens/s of ``rows`` sequences in our BatchEngine (64-token prompts; timed from the moment
    every sequence has its first token, as llama-batched-bench's S_TG)."""
    import json

    from l4export.runtimes import load_runtime
    from l4export.runtimes.batch import BatchEngine, Job

    rt = load_runtime(model)
    engine = BatchEngine(rt, max(rows), 1024)
    rng, out = np.random.default_rng(0), {}
    list(engine.submit(Job(rt.encode(PROMPT), 8)).tokens())  # warm-up
    for d in rows:
        jobs = [engine.submit(Job(rng.integers(0, rt.spec.vocab_size, 64).tolist(), new)) for _ in range(d)]
        streams = [j.tokens() for j in jobs]
        for it in streams:
            next(it)
        t0 = time.perf_counter()
        n = sum(1 for it in streams for _ in it)
        out[d] = n / (time.perf_counter() - t0)
    print(json.dumps(out))


def engines_alone(model: Path, gguf: Path, rows: list[int], new: int) -> dict:
    """Decode tokens/s of 1..8 sequences: our engine (a process of its own) and llama-batched-bench (Q4_0)."""
    import json

    import bench_decode

    ours = subprocess.run([sys.executable, __file__, "--direct-batch", str(model), "--new", str(new), "--rows",
                           ",".join(map(str, rows))], check=True, capture_output=True, text=True).stdout
    theirs = subprocess.run([str(bench_decode.LLAMA_BIN / "llama-batched-bench"), "-m", str(gguf), "-c", "4096", "-b",
                             "2048", "-ub", "512", "-npp", "64", "-ntg", str(new), "-npl", ",".join(map(str, rows)),
                             "-t", "2", "-fa", "on"], check=True, capture_output=True, text=True).stdout
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in theirs.splitlines() if line.startswith("|")]
    head = cells[0]
    tg = {int(r[head.index("B")]): float(r[head.index("S_TG t/s")]) for r in cells[2:]}
    return {"l4export BatchEngine": {int(k): v for k, v in json.loads(ours.strip().splitlines()[-1]).items()},
            "llama-batched-bench Q4_0": tg}


def _direct_stall_worker(model: Path, long_tokens: int, piece: int) -> None:
    """One sequence decoding in our BatchEngine while a ``long_tokens``-token prompt arrives: the running sequence's
    longest gap between tokens meanwhile (its median gap before, for scale) and the prompt's time to first token.
    ``piece`` 0: the whole prompt in one step (what a batching engine without split prefill does)."""
    import json

    from l4export.runtimes import load_runtime
    from l4export.runtimes.batch import BatchEngine, Job

    rt = load_runtime(model)
    engine = BatchEngine(rt, 2, 2048, piece=piece or long_tokens)
    rng = np.random.default_rng(0)
    list(engine.submit(Job(rt.encode(PROMPT), 8)).tokens())  # warm-up
    times: list[float] = []
    running = engine.submit(Job(rt.encode(PROMPT), 400))
    it = running.tokens()
    for _ in range(60):
        next(it)
        times.append(time.perf_counter())
    t0 = time.perf_counter()
    long = engine.submit(Job(rng.integers(0, rt.spec.vocab_size, long_tokens).tolist(), 1))
    first = long.tokens()
    for _ in it:
        times.append(time.perf_counter())
        if long.made and len(times) > 80:
            break
    next(first)
    t1 = time.perf_counter()
    running.cancel.set()
    list(it)  # (ends at the cancel: the engine is idle, not inside ORT, when the process exits)
    gaps = np.diff(np.array(times))
    during = [g for t, g in zip(times[1:], gaps) if t >= t0]
    print(json.dumps({"long_prompt_tokens": long_tokens, "piece": piece, "long_ttft_s": t1 - t0,
                      "max_gap_s": float(max(during)), "median_gap_before_s": float(np.median(gaps[:50]))}))


def stalls(model: Path, runs: int, long_tokens: int = 1024) -> dict:
    """``_direct_stall_worker`` with the server's 256-token pieces and with the whole prompt at once, interleaved."""
    import json

    out: dict = {256: [], 0: []}
    for _ in range(runs):
        for piece in out:
            line = subprocess.run([sys.executable, __file__, "--direct-stall", str(model), "--rows", str(piece),
                                   "--new", str(long_tokens)], check=True, capture_output=True, text=True).stdout
            out[piece].append(json.loads(line.strip().splitlines()[-1]))
    return {("pieces of 256" if p else "whole prompt"): {k: float(np.median([x[k] for x in v])) for k in v[0]}
            for p, v in out.items()}


def start_llama_server(gguf: Path, parallel: int) -> tuple[subprocess.Popen, str]:
    """llama.cpp's own server with continuous batching: ``parallel`` slots of 1024 tokens, 2 threads, flash attention."""
    import bench_decode

    return _started(lambda port: [str(bench_decode.LLAMA_BIN / "llama-server"), "-m", str(gguf), "-a", "m", "-np",
                                  str(parallel), "-c", str(1024 * parallel), "-t", "2", "-tb", "2", "-fa", "on",
                                  "--host", "127.0.0.1", "--port", str(port)], f"llama-server for {gguf}")


def batching(args) -> dict:
    """``serve --parallel 8`` against ``serve --parallel 1`` on the chunk-8192 int4 export: aggregate tokens/s of 1,
    2, 4, 8 clients (both servers up at once, requests interleaved, medians), and each batched client's greedy text
    against the text that prompt gets alone from the same server."""
    import bench_decode

    bench_decode.CHUNK, bench_decode.MODEL = 8192, WORK / "decode-1g-c8192"
    bench_decode.build_model(bench_decode.MODEL)
    model = bench_decode.l4_export("onnx-int4", "onnx", "--quant", "int4")
    gguf = bench_decode.llama_cpp_gguf("Q4_0")
    servers = {"parallel 8": ("--parallel", "8", "--ctx-size", "1024"), "serial": (), "llama-server Q4_0 -np 8": None}
    counts = {"parallel 8": (1, 2, 4, 8), "serial": (1, 4), "llama-server Q4_0 -np 8": (1, 2, 4, 8)}
    procs, urls, alone = [], {}, []
    try:
        for name, extra in servers.items():
            proc, urls[name] = start_server(model, *extra) if extra is not None else start_llama_server(gguf, 8)
            procs.append(proc)
            streamed(urls[name], 8)  # warm-up
        solo: dict = {}
        for i in range(8):  # each prompt alone: the text every batched run must give
            streamed(urls["parallel 8"], args.new, client_prompt(i), solo.setdefault(i, []))
        runs = {n: {c: [] for c in counts[n]} for n in servers}
        same = {c: True for c in counts["parallel 8"]}
        for r in range(args.runs):
            for c in (1, 2, 4, 8):  # each client count on every server that runs it, one after another
                for name, url in urls.items():
                    if c in counts[name]:
                        texts: dict = {}
                        runs[name][c].append(concurrent(url, c, args.new, texts))
                        if name == "parallel 8":
                            same[c] &= all(texts[i] == solo[i][0] for i in texts)
            for name in urls:
                print(f"run {r + 1}/{args.runs} {name}: " + ", ".join(f"{c} clients {v[-1]:.1f}" for c, v in runs[name].items()))
            alone.append(engines_alone(model, gguf, [1, 2, 4, 8], args.new))
            print(f"run {r + 1}/{args.runs} engines alone: {alone[-1]}")

    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
    med = {n: {c: float(np.median(v)) for c, v in r.items()} for n, r in runs.items()}
    engines = {e: {d: float(np.median([a[e][d] for a in alone])) for d in alone[0][e]} for e in alone[0]}
    rows = [{"server": n, **{f"{c} clients tok/s": f"{v:.1f} ({v / m[1]:.2f}x)" for c, v in m.items()}}
            for n, m in (med | engines).items()]
    print(table(rows, sorted({k for row in rows for k in row}, key=lambda k: (k != "server", k))))
    one = med["parallel 8"][1]
    goals = {"4 clients >= 2.0x one client's": {"value": f"{med['parallel 8'][4] / one:.2f}x", "met": med["parallel 8"][4] >= 2 * one},
             "8 clients >= 2.5x one client's": {"value": f"{med['parallel 8'][8] / one:.2f}x", "met": med["parallel 8"][8] >= 2.5 * one},
             "each client's greedy text equals its solo text": {"value": str(same), "met": all(same.values())}}
    for k, v in goals.items():
        print(f"{'MET   ' if v['met'] else 'MISSED'} {k}: {v['value']}")
    stall = stalls(model, args.runs)
    for n, v in stall.items():
        print(f"{n}: a {v['long_prompt_tokens']:.0f}-token prompt arriving: the running sequence's longest gap "
              f"{1000 * v['max_gap_s']:.0f} ms (median {1000 * v['median_gap_before_s']:.1f} ms before); the prompt's "
              f"first token after {v['long_ttft_s']:.2f} s")
    return {"new_tokens": args.new, "runs": args.runs, "medians": med, "all_runs": runs, "goals": goals,
            "stall": stall,
            "solo_texts_equal": same, "engines_alone": engines, "engines_alone_runs": alone,
            "note": "engines alone: decode tokens/s of N sequences after their 64-token prompts (S_TG)"}


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
    ap.add_argument("--direct-batch", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--direct-stall", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--rows", default="1,2,4,8", help=argparse.SUPPRESS)
    ap.add_argument("--history", type=int, default=4096, help="tokens of conversation before turn 2")
    ap.add_argument("--turn2-only", action="store_true", help="only the turn-2 time-to-first-token measurement")
    ap.add_argument("--peers", action="store_true", help="only the comparison with llama-cpp-python's server "
                    "(the chunk-8192 1 GB model; bench_decode makes the GGUFs)")
    ap.add_argument("--batching", action="store_true", help="only continuous batching: 1-8 clients on serve --parallel 8")
    args = ap.parse_args()
    if args.direct:
        return _direct_worker(args.direct, args.new)
    if args.direct_stall:
        return _direct_stall_worker(args.direct_stall, args.new, int(args.rows))
    if args.direct_batch:
        return _direct_batch_worker(args.direct_batch, args.new, [int(r) for r in args.rows.split(",")])
    if args.peers:
        print(f"wrote {save_result('serve-peers', peers(args))}")
        return
    if args.batching:
        print(f"wrote {save_result('serve-batching', batching(args))}")
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
