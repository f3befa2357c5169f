"""``l4export inspect``: what a checkpoint is, how big it is, and (with --check) whether every tensor is sound."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from tqdm import tqdm

from .checkpoint import Checkpoint

log = logging.getLogger(__name__)

# Bytes per parameter of the export formats, for the size estimates. int4: 4-bit values plus an fp16 scale per
# group of 32 (routed and shared experts), 8-bit attention (plus its scales), the rest fp16. fp8: routed experts in
# e4m3 with a per-channel scale, the rest fp16.
_INT4 = 0.5 + 2 / 32
_INT8 = 1 + 2 / 32


def estimate_sizes(ckpt: Checkpoint) -> dict[str, int]:
    s = ckpt.spec
    h, i = s.hidden_size, s.intermediate_size
    routed = sum(3 * s.num_experts * h * i for la in s.layers if la.is_moe)
    shared = sum(3 * h * i for la in s.layers if la.is_moe)
    attn = sum(2 * h * s.q_size + 2 * h * s.kv_size for _ in s.layers)
    rest = s.total_params - routed - shared - attn
    return {
        "float16": 2 * s.total_params,
        "int4": int(_INT4 * (routed + shared) + _INT8 * attn + 2 * rest),
        "fp8": int(1 * routed + 2 * (s.total_params - routed)),
    }


def pattern(flags: list[bool], yes: str, no: str) -> str:
    return "".join(yes if f else no for f in flags)


def summarize(ckpt: Checkpoint) -> dict[str, Any]:
    s = ckpt.spec
    return {
        "path": str(ckpt.path),
        "layout": s.layout,
        "architecture": "Llama4ForConditionalGeneration" if s.layout == "multimodal" else "Llama4ForCausalLM",
        "num_layers": s.num_layers,
        "moe_layers": list(s.moe_layers),
        "num_experts": s.num_experts,
        "top_k": s.top_k,
        "hidden_size": s.hidden_size,
        "num_heads": s.num_heads,
        "num_kv_heads": s.num_kv_heads,
        "head_dim": s.head_dim,
        "intermediate_size": s.intermediate_size,
        "intermediate_size_mlp": s.intermediate_size_mlp,
        "vocab_size": s.vocab_size,
        "attention_chunk_size": s.attention_chunk_size,
        "nope_layers": list(s.nope_layers),
        "rope_pattern": pattern([la.uses_rope for la in s.layers], "R", "N"),
        "moe_pattern": pattern([la.is_moe for la in s.layers], "M", "D"),
        "qk_norm": s.use_qk_norm,
        "rope_theta": s.rope_theta,
        "rope_scaling": None if s.rope_scaling is None else vars(s.rope_scaling),
        "attn_temperature_tuning": s.attn_temperature_tuning,
        "dtypes": ckpt.source_dtypes,
        "fp8_checkpoint": s.fp8 is not None,
        "files": len(ckpt.files),
        "bytes_on_disk": ckpt.bytes_on_disk,
        "ignored_tensors": len(ckpt.ignored),
        "total_params": s.total_params,
        "active_params": s.active_params,
        "estimated_bytes": estimate_sizes(ckpt),
    }


def count_non_finite(a: np.ndarray, block: int = 1 << 22) -> int:
    """Non-finite values, counted in blocks so no float32 copy of the whole tensor is made."""
    flat = a.reshape(-1)
    return sum(int(np.count_nonzero(~np.isfinite(flat[i : i + block].astype(np.float32)))) for i in range(0, flat.size, block))


def check(ckpt: Checkpoint, progress: bool = True) -> dict[str, Any]:
    """Read every tensor once (one at a time) and count non-finite values."""
    bad: dict[str, int] = {}
    for t in tqdm(list(ckpt), desc="checking", unit="tensor", disable=not progress):
        n = count_non_finite(t.load())
        if n:
            bad[t.name] = n
    return {"tensors_checked": len(ckpt.tensors), "non_finite": bad}


def human(n: float, unit: str = "B") -> str:
    for p in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or p == "T":
            return f"{n:.1f} {p}{unit}" if p else f"{n:.0f} {unit}"
        n /= 1000
    return str(n)


def format_table(info: dict[str, Any]) -> str:
    rs = info["rope_scaling"]
    rows = [
        ("checkpoint", info["path"]),
        ("architecture", f"{info['architecture']} ({info['layout']} layout)"),
        ("layers", str(info["num_layers"])),
        ("MoE layers", f"{len(info['moe_layers'])}  {info['moe_pattern']}  (M=MoE, D=dense)"),
        ("experts / top-k", f"{info['num_experts']} / {info['top_k']} (+1 shared)"),
        ("hidden / expert / dense MLP", f"{info['hidden_size']} / {info['intermediate_size']} / {info['intermediate_size_mlp']}"),
        ("heads / KV heads / head dim", f"{info['num_heads']} / {info['num_kv_heads']} / {info['head_dim']}"),
        ("RoPE / NoPE", f"{info['rope_pattern']}  (R=RoPE+chunked, N=NoPE global)"),
        ("chunk size", str(info["attention_chunk_size"])),
        ("qk-norm", "on (RoPE layers)" if info["qk_norm"] else "off"),
        ("rope", f"theta {info['rope_theta']:g}" + (f", llama3 {rs['factor']:g}/{rs['low_freq_factor']:g}/"
                 f"{rs['high_freq_factor']:g}/{rs['original_max_position_embeddings']}" if rs else ", no scaling")),
        ("vocab", str(info["vocab_size"])),
        ("dtype", ", ".join(f"{k} x{v}" for k, v in info["dtypes"].items())),
        ("files / on disk", f"{info['files']} / {human(info['bytes_on_disk'])}"
         + (f" ({info['ignored_tensors']} vision/projector tensors set aside)" if info["ignored_tensors"] else "")),
        ("parameters (text)", f"{info['total_params']:,} total, {info['active_params']:,} active per token"),
        ("estimated export", "  ".join(f"{k} {human(v)}" for k, v in info["estimated_bytes"].items())),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
