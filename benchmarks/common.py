"""Shared benchmark helpers: synthetic large checkpoints (numpy only), peak-RSS measurement of subprocesses, and
``save_result``, the one way a benchmark writes its result (with the run record: commit, command, machine)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "work"  # git-ignored
RESULTS = ROOT / "results"
REPO = ROOT.parent

# When this process started (common is imported at a benchmark's start); the result file is named by this date.
_STARTED = datetime.now().astimezone()
_LOAD_AT_START = os.getloadavg() if hasattr(os, "getloadavg") else None
_GIT_AT_START: dict | None = None  # set by mark_start() (python -m benchmarks calls it before the script runs)


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


def _git(*args: str) -> str | None:
    try:
        p = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.decode(errors="replace") if p.returncode == 0 else None


def git_state() -> dict:
    """HEAD, and the working tree's changes against it: ``changes`` (``git status --porcelain`` lines, untracked
    files included, benchmarks/results/ left out) and ``diff_sha256`` (of ``git diff HEAD``: two runs with the same
    value ran the same tracked code)."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "note": "not a git checkout (or git is missing)"}
    status = _git("status", "--porcelain", "--untracked-files=normal", "--", ".", ":(exclude)benchmarks/results") or ""
    changes = [line for line in status.splitlines() if line.strip()]
    diff = subprocess.run(["git", "-C", str(REPO), "diff", "HEAD"], capture_output=True).stdout
    out = {"commit": commit.strip(), "dirty": bool(changes), "changes": changes[:100],
           "diff_sha256": hashlib.sha256(diff).hexdigest()[:16]}
    if len(changes) > 100:
        out["changes_left_out"] = len(changes) - 100
    return out


def mark_start() -> None:
    """Take the git state now, at the start of the run (else it is taken when the result is written)."""
    global _GIT_AT_START, _STARTED, _LOAD_AT_START
    _STARTED = datetime.now().astimezone()
    _LOAD_AT_START = os.getloadavg() if hasattr(os, "getloadavg") else None
    _GIT_AT_START = git_state()


def _cpu_model() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                have = set(value.split())
                flags = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                                     "avx_vnni", "amx_tile", "amx_int8", "amx_bf16") if f in have]
    except OSError:
        pass
    return model, flags


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
    except (ValueError, OSError, AttributeError):
        return None


# Installed versions of what the benchmarks run (read from package metadata: nothing is imported).
PACKAGES = ("l4export", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "mlx", "mlx-lm",
            "mlx-vlm", "torch", "transformers", "safetensors", "llama-cpp-python", "ray", "openai", "psutil")


def versions() -> dict:
    from importlib import metadata
    from importlib.util import find_spec

    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    spec = find_spec("l4export")
    if spec is not None and spec.origin:
        out["l4export_from"] = os.path.relpath(Path(spec.origin).parent, REPO)
    return out


def machine() -> dict:
    """The machine: platform, CPU model and the flags the kernels care about, cores, memory, Python, versions."""
    cpu, flags = _cpu_model()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"date": _STARTED.date().isoformat(), "platform": platform.platform(), "cpu": cpu, "cpu_flags": flags,
            "cpus": os.cpu_count(), "cpus_usable": usable, "memory_gb": _memory_gb(), "python": sys.version.split()[0],
            "versions": versions()}


def run_record() -> dict:
    """What a result needs to be trusted and rerun: the commit and whether the tree differed from it, the command
    line, when it ran (and the load average at its start: was the machine otherwise idle?), and the machine."""
    now = datetime.now().astimezone()
    git = git_state()
    rec: dict = {
        **git,
        "command": shlex.join(["python", *getattr(sys, "orig_argv", [sys.executable, *sys.argv])[1:]]),
        "argv": sys.argv,
        "cwd": os.getcwd(),
        "started": _STARTED.isoformat(timespec="seconds"),
        "written": now.isoformat(timespec="seconds"),
        "elapsed_s": round((now - _STARTED).total_seconds(), 1),
        "load_at_start": None if _LOAD_AT_START is None else [round(x, 2) for x in _LOAD_AT_START],
        "machine": machine(),
    }
    if _GIT_AT_START is not None:
        if _GIT_AT_START != git:
            rec["git_at_start"] = _GIT_AT_START
            rec["note"] = "the commit or the working tree changed while this ran: see git_at_start"
    elif git.get("commit"):
        # Without mark_start, the state is read at the end; flag a HEAD that moved since the run started.
        at = _git("rev-list", "-1", f"--before={_STARTED.isoformat()}", "HEAD")
        if at and at.strip() != git["commit"]:
            rec["note"] = f"HEAD moved while this ran (HEAD at the start: {at.strip()}); git is the state at the end"
    return rec


def save_result(name: str, data: dict, png: Callable[[Path], object] | None = None) -> Path:
    """Write ``benchmarks/results/NAME-DATE.json`` (DATE: the day the run started) as ``{"run": run_record(),
    **data}``; with ``png``, call ``png(path.with_suffix(".png"))`` to draw its figure beside it. Returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{_STARTED.date().isoformat()}.json"
    rec = run_record()
    rec["files"] = [path.name] + ([path.with_suffix(".png").name] if png else [])
    path.write_text(json.dumps({"run": rec, **{k: v for k, v in data.items() if k != "run"}}, indent=2, default=str))
    if png is not None:
        png(path.with_suffix(".png"))
    return path


def table(rows: list[dict], cols: list[str]) -> str:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    body = ["  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join([line, "  ".join("-" * w for w in widths), *body])
