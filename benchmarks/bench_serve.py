"""Server overhead: streamed tokens/s through ``l4export serve`` (the official openai client, /v1/completions,
stream=True) against ``rt.generate`` in a process of its own, on the demo and on the 1 GB benchmark model (int4 ONNX).

    python benchmarks/bench_serve.py [--runs 3] [--new 128]

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


def start_server(model: Path) -> tuple[subprocess.Popen, str]:
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "l4export.cli", "serve", str(model), "--port", str(port), "--name", "m"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    args = ap.parse_args()
    if args.direct:
        return _direct_worker(args.direct, args.new)
    rows, result = [], {}
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
