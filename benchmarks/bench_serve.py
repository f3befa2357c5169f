"""Server overhead: streamed tokens/s through ``l4export serve`` (the official openai client, /v1/completions,
stream=True) against ``rt.generate`` in a process of its own, on the demo and on the 1 GB benchmark model (int4 ONNX);
and a conversation's turn 2: its time to first token with a --history token history cached against the same request
cold (issue 28's goal: <= 0.1x).

    python benchmarks/bench_serve.py [--runs 3] [--new 128] [--history 4096] [--turn2-only]

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
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "l4export.cli", "serve", str(model), "--port", str(port), "--name", "m",
                             *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            urllib.request.urlopen(f"{url}/v1/models", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the server for {model} did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--direct", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--history", type=int, default=4096, help="tokens of conversation before turn 2")
    ap.add_argument("--turn2-only", action="store_true", help="only the turn-2 time-to-first-token measurement")
    args = ap.parse_args()
    if args.direct:
        return _direct_worker(args.direct, args.new)
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
