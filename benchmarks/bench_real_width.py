"""Real widths: Scout- and Maverick-width checkpoints (2 decoder layers each) converted on this machine, measured,
and extrapolated to whole models.

    python benchmarks/bench_real_width.py [--runs scout-onnx-int4,...] [--maverick-experts 32] [--gptq]

Checkpoints are written straight to safetensors with numpy (``l4export.demo.write_synthetic``: random bf16 bits,
nothing like a model in memory). Scout: its real text config with 2 layers (layer 0 chunked RoPE MoE, layer 1
global NoPE MoE), real vocab (202,048), the multimodal layout with the real vision width but 2 of its 34 layers.
Maverick: hidden 5120, one dense layer and one MoE layer with ``--maverick-experts`` routed experts of real width
(128 in the model; fewer when the disk does not hold them, said in the output).

Each conversion runs in a process of its own. Measured: wall time, peak RSS (the largest of the process tree's
processes, from wait4, and the peak of their sum, sampled every 0.2 s: with --ray the workers are processes of
their own), peak extra disk (sampled: output + spill + temporary files) and the output's size. ``--gptq`` times
GPTQ on one expert's projections at real width (gate/up [8192, 5120], down [5120, 8192]) and lm_head's
[202048, 5120] from a slice. Results: JSON in results/real-width-DATE.json; the extrapolation is printed with its
formula and inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, save_result, table  # noqa: E402

GB = 1e9


def scout_config(layers: int = 2, vision_layers: int = 2, experts: int = 16) -> dict:
    """Llama-4-Scout-17B-16E's config.json with ``layers`` decoder layers (every 2nd NoPE; the model: every 4th)
    and ``vision_layers`` vision layers (the model: 34)."""
    text = {
        "model_type": "llama4_text", "vocab_size": 202048, "hidden_size": 5120, "intermediate_size": 8192,
        "intermediate_size_mlp": 16384, "num_hidden_layers": layers, "num_attention_heads": 40,
        "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 10485760,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192},
        "num_local_experts": experts, "num_experts_per_tok": 1, "interleave_moe_layer_step": 1, "use_qk_norm": True,
        "attention_chunk_size": 8192, "attn_temperature_tuning": True, "floor_scale": 8192, "attn_scale": 0.1,
        "no_rope_layers": [0 if i % 2 else 1 for i in range(layers)], "attention_bias": False,
        "tie_word_embeddings": False, "bos_token_id": 200000, "eos_token_id": [200001, 200007, 200008],
        "pad_token_id": 200018, "torch_dtype": "bfloat16",
    }
    cfg = {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "text_config": text,
           "torch_dtype": "bfloat16", "tie_word_embeddings": False, "image_token_index": 200092,
           "boi_token_index": 200080, "eoi_token_index": 200081}
    if vision_layers:
        cfg["vision_config"] = {
            "model_type": "llama4_vision_model", "hidden_size": 1408, "image_size": 336, "intermediate_size": 5632,
            "num_attention_heads": 16, "num_hidden_layers": vision_layers, "patch_size": 14, "num_channels": 3,
            "pixel_shuffle_ratio": 0.5, "projector_input_dim": 4096, "projector_output_dim": 4096,
            "vision_output_dim": 4096, "rope_theta": 10000, "norm_eps": 1e-5, "hidden_act": "gelu",
            "multi_modal_projector_bias": False, "vision_feature_layer": -1,
            "vision_feature_select_strategy": "default", "projector_dropout": 0.0, "attention_dropout": 0.0,
        }
    return cfg


def maverick_config(experts: int = 128) -> dict:
    """Llama-4-Maverick-17B-128E's widths, 2 layers: layer 0 dense (MLP 16384), layer 1 MoE; text only."""
    cfg = scout_config(2, vision_layers=0, experts=experts)
    cfg["text_config"].update({"interleave_moe_layer_step": 2, "use_qk_norm": False})
    return cfg


# ---- measuring one run ---------------------------------------------------------------------------------------
def _tree_rss(pid: int, children: bool = True) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)] if children else [p]
    except psutil.Error:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


def run(cmd: list[str], disk: Path, env: dict | None = None) -> dict:
    """wall, peak RSS (largest process; sum of the tree, sampled), peak extra disk used under ``disk``'s device."""
    used0 = shutil.disk_usage(disk).used
    peak = {"sum": 0, "disk": 0, "driver": 0}
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            peak["sum"] = max(peak["sum"], _tree_rss(proc.pid))
            peak["driver"] = max(peak["driver"], _tree_rss(proc.pid, children=False))
            peak["disk"] = max(peak["disk"], shutil.disk_usage(disk).used - used0)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    th.join()
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    return {"wall_s": round(wall, 1), "peak_rss_gb": round(usage.ru_maxrss * 1024 / GB, 2),
            "peak_rss_sum_gb": round(peak["sum"] / GB, 2), "peak_rss_driver_gb": round(peak["driver"] / GB, 2), "peak_extra_disk_gb": round(peak["disk"] / GB, 2),
            "log": [line for line in out.splitlines() if "INFO" in line][-12:]}


def du(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / GB, 2)


def sha(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.suffix in (".data", ".safetensors"):
            with open(p, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
    return h.hexdigest()[:16]


RUNS = {  # name -> (checkpoint, convert arguments)
    "scout-onnx-fp32": ("scout", ["--format", "onnx"]),
    "scout-onnx-int4": ("scout", ["--format", "onnx", "--quant", "int4"]),
    "scout-onnx-int4-ray": ("scout", ["--format", "onnx", "--quant", "int4", "--ray", "local"]),
    "scout-mlx-bf16": ("scout", ["--format", "mlx", "--dtype", "bfloat16"]),
    "scout-mlx-int4": ("scout", ["--format", "mlx", "--quant", "int4"]),
    "scout2e-onnx-calib": ("scout2e", ["--format", "onnx", "--quant", "EXPERTS_RECIPE", "--calib", "CALIB",
                                       "--calib-samples", "8", "--calib-seqlen", "128"]),
    "scout2e-onnx-calib-ray": ("scout2e", ["--format", "onnx", "--quant", "EXPERTS_RECIPE", "--calib", "CALIB",
                                           "--calib-samples", "8", "--calib-seqlen", "128", "--ray", "local"]),
    "scout2e-mlx-bf16": ("scout2e", ["--format", "mlx", "--dtype", "bfloat16"]),
    "scout2e-mlx-calib": ("scout2e", ["--format", "mlx", "--quant", "EXPERTS_RECIPE_MLX", "--calib", "CALIB",
                                      "--calib-samples", "8", "--calib-seqlen", "128"]),
    "scout2e-onnx-calib-16k": ("scout2e", ["--format", "onnx", "--quant", "EXPERTS_RECIPE", "--calib", "CALIB_16K",
                                           "--calib-samples", "64", "--calib-seqlen", "256"]),
    # issue 26: mixed:3.0 placed on calibration (a float pass measuring every width of every unit), then GPTQ at the
    # chosen widths: its peak RSS against the largest slice read + 1 GB
    "scout2e-onnx-mixed3-calib": ("scout2e", ["--format", "onnx", "--quant", "mixed:3.0", "--calib", "CALIB",
                                              "--calib-samples", "8", "--calib-seqlen", "128"]),
    "maverick-onnx-int4": ("maverick", ["--format", "onnx", "--quant", "int4"]),
    "maverick-onnx-int4-ray": ("maverick", ["--format", "onnx", "--quant", "int4", "--ray", "local"]),
    "maverick-onnx-calib": ("maverick", ["--format", "onnx", "--quant", "DENSE_RECIPE", "--calib", "CALIB",
                                         "--calib-samples", "8", "--calib-seqlen", "128"]),
    "maverick-onnx-calib-ray": ("maverick", ["--format", "onnx", "--quant", "DENSE_RECIPE", "--calib", "CALIB",
                                             "--calib-samples", "8", "--calib-seqlen", "128", "--ray", "local"]),
}


def calib_file(samples: int = 8, length: int = 128) -> Path:
    """``samples`` samples of ``length`` random token ids (the synthetic checkpoints have no real tokenizer)."""
    import numpy as np

    p = WORK / ("rw-calib.jsonl" if (samples, length) == (8, 128) else f"rw-calib-{samples}x{length}.jsonl")
    rng = np.random.default_rng(0)
    p.write_text("\n".join(json.dumps({"input_ids": rng.integers(0, 200000, length).tolist()}) for _ in range(samples)))
    return p


def convert_run(name: str, ckpts: dict[str, Path]) -> dict:
    src, args = RUNS[name]
    recipes = {"EXPERTS_RECIPE": "real_width_experts.toml", "EXPERTS_RECIPE_MLX": "real_width_experts_mlx.toml",
               "DENSE_RECIPE": "real_width_dense.toml"}
    calib = {"CALIB": lambda: calib_file(), "CALIB_16K": lambda: calib_file(64, 256)}
    args = [str(Path(__file__).with_name(recipes[a])) if a in recipes else str(calib[a]()) if a in calib else a
            for a in args]
    out = WORK / f"rw-out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    r = run([sys.executable, "-m", "l4export.cli", "-v", "convert", str(ckpts[src]), "-o", str(out), *args], WORK)
    r.update(output_gb=du(out), weights_sha=sha(out), checkpoint=src, args=" ".join(args))
    r["split"] = [line for line in r["log"] if "calibrated layer" in line or "quantized in" in line
                  or "calibration done" in line]
    shutil.rmtree(out, ignore_errors=True)
    return r


# ---- GPTQ at real width ------------------------------------------------------------------------------------
def gptq_times() -> dict:
    """Seconds of GPTQ (int4 g64, as the int4 preset's experts) per projection of one real-width expert, and per
    2048 rows of lm_head (int8 g128, K 5120), on random weights and a Hessian of 4096 random tokens, in the working
    dtype calibration uses at that width (float32 beyond K 4096)."""
    import numpy as np
    import torch

    from l4export.quant.gptq import gptq, working_dtype
    from l4export.quant.schemes import Int

    rng = np.random.default_rng(0)
    out = {}
    for name, (n, k, scheme) in {"gate_or_up [8192, 5120]": (8192, 5120, Int(4, 64, True, 4)),
                                 "down [5120, 8192]": (5120, 8192, Int(4, 64, True, 4)),
                                 "lm_head rows [2048, 5120]": (2048, 5120, Int(8, 128, True, 4))}.items():
        w = (rng.standard_normal((1, n, k), dtype=np.float32) * 0.01)
        x = torch.tensor(rng.standard_normal((4096, k), dtype=np.float32), dtype=working_dtype(k))  # as calibrate
        h = (x.T @ x)[None]
        t = time.perf_counter()
        gptq(w, h, scheme)
        out[name] = round(time.perf_counter() - t, 1)
        print(f"GPTQ {name}: {out[name]} s", flush=True)
    return out


def extrapolate(res: dict) -> list[str]:
    """Whole models from the measured parts: lines with their formula and inputs (this 2-core machine)."""
    g = res.get("gptq_s")
    if not g:
        return []
    expert = 2 * g["gate_or_up [8192, 5120]"] + g["down [5120, 8192]"]  # one 8192-wide SwiGLU at hidden 5120
    head = g["lm_head rows [2048, 5120]"] * 202048 / 2048
    dense = 4 * expert  # Maverick's dense MLPs: 16384 wide, 2x the parameters, down's K 2x (GPTQ ~ N*K^2): ~4x
    scout = 48 * 16 * expert + 48 * expert + head
    maverick = 24 * 128 * expert + 24 * expert + 24 * dense + head
    per_param = expert / (3 * 8192 * 5120)
    behemoth = 2.0e12 * per_param
    lines = [
        f"one Scout/Maverick expert (3 projections, int4 g64): {expert:.0f} s; lm_head (int8 g128, 202048 rows): "
        f"{head:.0f} s ({g['lm_head rows [2048, 5120]']} s per 2048 rows)",
        f"Scout: 48 MoE layers x 16 experts x {expert:.0f} s + 48 shared experts x {expert:.0f} s + lm_head {head:.0f} s"
        f" = {scout / 3600:.1f} h",
        f"Maverick: 24 x 128 experts x {expert:.0f} s + 24 shared x {expert:.0f} s + 24 dense MLPs x ~{dense:.0f} s "
        f"+ lm_head {head:.0f} s = {maverick / 3600:.1f} h",
        f"Behemoth (widths unpublished; at this machine's {per_param * 1e9:.0f} s per 1e9 expert parameters at K "
        f"5120-8192, larger K costs more): 2e12 x {per_param * 1e9:.0f} s/1e9 = {behemoth / 3600:.0f} h",
        "with --ray on N machines like this one, the routed experts' share (Scout 96%, Maverick 97%) divides by the "
        "cluster's workers times their single-thread speed relative to this 2-thread process (measured: "
        "scout2e-onnx-calib vs -ray)",
    ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="scout-onnx-int4,scout-onnx-int4-ray,scout-mlx-int4,scout-onnx-fp32")
    ap.add_argument("--maverick-experts", type=int, default=32)
    ap.add_argument("--gptq", action="store_true", help="time GPTQ at real width")
    ap.add_argument("--tag", default="", help="results/real-width[-TAG]-DATE.json")
    args = ap.parse_args()
    from l4export.demo import write_synthetic

    WORK.mkdir(parents=True, exist_ok=True)
    res: dict = {"runs": {}}
    runs = [r for r in args.runs.split(",") if r]
    ckpts: dict[str, Path] = {}
    for kind, cfg in (("scout", scout_config()), ("scout2e", scout_config(experts=2)),
                      ("maverick", maverick_config(args.maverick_experts))):
        if not any(RUNS[r][0] == kind for r in runs):
            continue
        path = WORK / f"rw-maverick-{args.maverick_experts}e" if kind == "maverick" else WORK / f"rw-{kind}"
        if not (path / "config.json").is_file():
            t = time.perf_counter()
            write_synthetic(path, cfg)
            res[f"{kind}_write_s"] = round(time.perf_counter() - t, 1)
        res[f"{kind}_checkpoint_gb"] = du(path)
        ckpts[kind] = path
    for name in runs:
        print(f"running {name} ...", flush=True)
        res["runs"][name] = convert_run(name, ckpts)
        print(json.dumps({k: v for k, v in res["runs"][name].items() if k != "log"}), flush=True)
    if args.gptq:
        res["gptq_s"] = gptq_times()
    res["extrapolation"] = extrapolate(res)
    rows = [{"run": n, **{k: v for k, v in r.items() if k not in ("log", "args", "checkpoint")}}
            for n, r in res["runs"].items()]
    if rows:
        print(table(rows, ["run", "wall_s", "peak_rss_gb", "peak_rss_driver_gb", "peak_rss_sum_gb", "peak_extra_disk_gb", "output_gb",
                           "weights_sha"]))
    for line in res["extrapolation"]:
        print(line)
    print(f"wrote {save_result('real-width' + (f'-{args.tag}' if args.tag else ''), res)}")


if __name__ == "__main__":
    main()
