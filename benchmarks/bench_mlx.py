"""Benchmark: ``l4export convert --format mlx`` vs ``mlx_lm convert``, and decode speed vs mlx-lm's generate.

    python benchmarks/bench_mlx.py [--gb 1.05] [--decode-tokens 64]

1. Writes a Scout-shaped bf16 checkpoint of about ``--gb`` GB (multimodal layout, fused HF experts, sharded,
   random weights from numpy) under benchmarks/work/ (git-ignored), then converts it with both tools, each in
   its own subprocess, in the same run: wall time and peak RSS (the process and its children, polled).
2. Converts a smaller Scout-shaped checkpoint to a float32 MLX export (mlx on a CPU runs GatherMM in float32
   only) and measures decode tokens/s of the l4export MLX runtime and of mlx-lm's ``generate_step`` on it.

Prints a table and writes benchmarks/results/mlx-<date>.json.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_result, write_checkpoint as common_write  # noqa: E402
from l4export.demo import demo_config

log = logging.getLogger("bench_mlx")
HERE = Path(__file__).parent
WORK = HERE / "work"


def scout_config(hidden: int, layers: int, experts: int, inter: int, vocab: int) -> dict:
    cfg = demo_config()
    cfg["text_config"].update(hidden_size=hidden, num_hidden_layers=layers, num_local_experts=experts,
                              intermediate_size=inter, intermediate_size_mlp=2 * inter, vocab_size=vocab,
                              num_attention_heads=8, num_key_value_heads=2, head_dim=hidden // 8)
    return cfg


def write_checkpoint(out: Path, config: dict, shard_bytes: int, seed: int = 0) -> int:
    """A bf16 checkpoint in the hub's multimodal layout (common.write_checkpoint); returns its bytes on disk."""
    common_write(out, config, shard_bytes, seed)
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def measure(cmd: list[str]) -> dict:
    """Wall time and peak RSS (process + children, polled every 20 ms) of one command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    out = proc.stdout.read().decode(errors="replace")
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-2000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_gb": round(peak / 1e9, 3)}


def decode_speed(export: Path, prompt_len: int, n: int) -> dict:
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    from l4export.runtimes.mlx import MlxRuntime

    ids = np.random.default_rng(0).integers(0, 256, prompt_len).tolist()
    rt = MlxRuntime(export)
    list(rt.generate(ids, 4, stop=[]))  # warm-up
    gen = rt.generate(ids, n, stop=[])
    next(gen)  # prefill + first token
    t0 = time.perf_counter()
    ours = 1 + sum(1 for _ in gen)
    ours_tps = (ours - 1) / (time.perf_counter() - t0)

    model, _ = load_model(export)
    list(generate_step(mx.array(ids), model, max_tokens=4))  # warm-up
    gen = generate_step(mx.array(ids), model, max_tokens=n)
    next(gen)
    t0 = time.perf_counter()
    theirs = 1 + sum(1 for _ in gen)
    theirs_tps = (theirs - 1) / (time.perf_counter() - t0)
    return {"prompt_tokens": prompt_len, "new_tokens": n, "l4export_tok_s": round(ours_tps, 1),
            "mlx_lm_tok_s": round(theirs_tps, 1), "ratio": round(ours_tps / theirs_tps, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.05, help="Size of the conversion checkpoint (GB, bf16).")
    ap.add_argument("--decode-tokens", type=int, default=64)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    WORK.mkdir(exist_ok=True)

    # ~67 M parameters per layer at hidden 1024, 16 experts of width 1024; embeddings + head 65 M.
    hidden, experts, inter, vocab = 1024, 16, 1024, 32000
    per_layer = 2 * hidden * hidden + 2 * hidden * hidden // 4 + 3 * (experts + 1) * hidden * inter + experts * hidden
    layers = max(1, round((args.gb * 1e9 / 2 - 2 * vocab * hidden) / per_layer))
    big = WORK / "scout-big"
    t0 = time.perf_counter()
    size = write_checkpoint(big, scout_config(hidden, layers, experts, inter, vocab), shard_bytes=256 * 1024**2)
    log.info("wrote %s: %.2f GB bf16, %d layers (%.0f s)", big, size / 1e9, layers, time.perf_counter() - t0)

    ours_out, theirs_out = WORK / "out-l4export", WORK / "out-mlx-lm"
    for p in (ours_out, theirs_out):
        shutil.rmtree(p, ignore_errors=True)
    ours = measure([sys.executable, "-m", "l4export.cli", "convert", str(big), "-o", str(ours_out), "--format", "mlx",
                    "--dtype", "bfloat16"])
    theirs = measure([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(big), "--mlx-path", str(theirs_out)])

    small = WORK / "scout-small"
    write_checkpoint(small, scout_config(512, 4, 16, 512, 32000), shard_bytes=1024**3)
    small_out = WORK / "out-small-f32"
    shutil.rmtree(small_out, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "l4export.cli", "convert", str(small), "-o", str(small_out), "--format", "mlx",
                    "--dtype", "float32"], check=True, capture_output=True)
    decode = decode_speed(small_out, 16, args.decode_tokens)

    result = {
        "checkpoint": {"bytes": size, "layers": layers, "hidden": hidden, "experts": experts, "dtype": "bfloat16"},
        "convert": {"l4export": ours, "mlx_lm": theirs,
                    "wall_ratio": round(ours["wall_s"] / theirs["wall_s"], 3),
                    "rss_ratio": round(ours["peak_rss_gb"] / theirs["peak_rss_gb"], 3)},
        "decode": decode,
    }
    path = save_result("mlx", result)
    print(f"checkpoint: {size / 1e9:.2f} GB bf16, {layers} layers, {experts} experts, hidden {hidden}")
    print(f"{'':28}{'l4export':>12}{'mlx_lm':>12}{'ratio':>8}")
    print(f"{'convert wall (s)':28}{ours['wall_s']:>12}{theirs['wall_s']:>12}{result['convert']['wall_ratio']:>8}")
    print(f"{'convert peak RSS (GB)':28}{ours['peak_rss_gb']:>12}{theirs['peak_rss_gb']:>12}{result['convert']['rss_ratio']:>8}")
    print(f"{'decode tok/s (fp32, CPU)':28}{decode['l4export_tok_s']:>12}{decode['mlx_lm_tok_s']:>12}{decode['ratio']:>8}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
