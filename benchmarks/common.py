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

import ml_dtypes
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


def write_checkpoint(out: Path, config: dict, shard_bytes: int = 500 * 1024**2, seed: int = 0) -> Path:
    """Write a random bf16 checkpoint in HF's multimodal layout, one tensor in memory at a time."""
    from l4export.names import canonical_shapes
    from l4export.outputs import PendingTensor, write_sharded
    from l4export.spec import spec_from_config

    if (out / "config.json").is_file():
        return out
    spec = spec_from_config(config)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    pending = []
    for name, shape in canonical_shapes(spec).items():
        src = "language_model." + name
        if name.endswith("experts.up_proj"):
            continue
        if name.endswith("experts.gate_proj"):
            e, i, h = shape
            src, shape = src.replace("gate_proj", "gate_up_proj"), (e, h, 2 * i)
        elif name.endswith("experts.down_proj"):
            e, h, i = shape
            shape = (e, i, h)

        def load(shape=shape, name=name):
            rng = np.random.default_rng(abs(hash(name)) % 2**32 + seed)
            return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(bf16)

        pending.append(PendingTensor(src, shape, bf16, load))
    out.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(exist_ok=True)
    write_sharded(tmp, pending, shard_bytes)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    out.rmdir()
    tmp.rename(out)
    return out


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
