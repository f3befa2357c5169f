"""Shared benchmark helpers: synthetic large checkpoints (numpy only), peak-RSS measurement of subprocesses."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "work"  # git-ignored
RESULTS = ROOT / "results"


def scout_like_config(hidden: int, inter: int, layers: int, experts: int = 16, vocab: int = 32768,
                      heads: int = 16, kv_heads: int = 4, step: int = 1) -> dict:
    """A Scout-shaped (multimodal layout, hub style) config at a chosen size."""
    from l4export.demo import demo_config

    cfg = demo_config()
    cfg["text_config"].update(hidden_size=hidden, intermediate_size=inter, intermediate_size_mlp=2 * inter,
                              num_hidden_layers=layers, num_local_experts=experts, vocab_size=vocab,
                              num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                              interleave_moe_layer_step=step, attention_chunk_size=8192,
                              rope_scaling={"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 1.0, "original_max_position_embeddings": 8192})
    return cfg


def write_checkpoint(out: Path, config: dict, shard_bytes: int = 500 * 1024**2, seed: int = 0,
                     scale: float = 0.02) -> Path:
    """A random bf16 checkpoint in HF's multimodal layout with the byte-level tokenizer (l4export.demo.write_checkpoint:
    one source tensor in memory at a time), deterministic in ``seed``; kept if ``out`` already holds one."""
    from l4export.demo import write_checkpoint as write

    if (out / "config.json").is_file():
        return out
    rng = np.random.default_rng(seed)

    def make(name: str, shape: tuple[int, ...]) -> np.ndarray:
        a = rng.standard_normal(shape, dtype=np.float32)
        if name.endswith("norm.weight"):
            return 1.0 + 0.1 * a
        return a * np.float32(scale)

    out.parent.mkdir(parents=True, exist_ok=True)
    return write(out, config, make, max_shard_bytes=shard_bytes)


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run a command in a fresh process; return wall seconds and that process tree's peak RSS (MB).

    Peak RSS comes from wait4's rusage of the child (ru_maxrss: the largest RSS of the child or its waited-for
    descendants), so it is exact rather than sampled.
    """
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}):\n{out[-2000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "output_tail": out[-300:]}


def machine() -> dict:
    return {"date": date.today().isoformat(), "platform": platform.platform(), "python": sys.version.split()[0],
            "cpus": os.cpu_count()}


def save(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{date.today().isoformat()}.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def table(rows: list[dict], cols: list[str]) -> str:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    body = ["  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join([line, "  ".join("-" * w for w in widths), *body])
