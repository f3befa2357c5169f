"""``l4export inspect``: what a checkpoint is, how big it is, and (with --check) whether every tensor is sound."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .checkpoint import Checkpoint
from .errors import L4ExportError, UsageError
from .plan import ExportPlan, make_plan
from .spec import Llama4Spec

log = logging.getLogger(__name__)

# The planned sizes inspect lists (plan.make_plan; exact, not estimated): format, dtype, preset.
SIZE_ROWS = (("onnx", "float32", None), ("onnx", "float16", None), ("mlx", "bfloat16", None),
             ("onnx", "float32", "int4"), ("mlx", "bfloat16", "int4"), ("onnx", "float32", "fp8"))


def planned_sizes(spec: Llama4Spec) -> dict[str, int | str]:
    """Exact weight bytes of the common exports (the size plan), or why one cannot be made."""
    from .quant.recipe import PRESETS

    out: dict[str, int | str] = {}
    for fmt, dtype, preset in SIZE_ROWS:
        key = f"{fmt} {preset or dtype}" + (f" ({dtype})" if preset else "")
        try:
            out[key] = make_plan(spec, fmt, dtype, "cpu", PRESETS[preset] if preset else None, calibrated=True).total
        except L4ExportError as e:
            out[key] = f"n/a: {e}"
    return out


def plan_summary(plan: ExportPlan) -> dict[str, Any]:
    """The dry run of one convert: bytes per component and in total, against every parameter in bf16."""
    bf16 = 2 * plan.spec.total_params
    return {"format": plan.format, "dtype": plan.dtype, "target": plan.target,
            "recipe": None if plan.recipe is None else plan.recipe.name, "bytes_by_component": plan.by_component,
            "total_bytes": plan.total, "ratio_to_bf16": round(plan.total / bf16, 4),
            "quantized_tensors": len(plan.quantized)}


def format_plan(info: dict[str, Any]) -> str:
    head = (f"plan: --format {info['format']} --dtype {info['dtype']}"
            + (f" --target {info['target']}" if info["format"] == "onnx" else "")
            + (f" --quant {info['recipe']}" if info["recipe"] else ""))
    rows = [(k, human(v)) for k, v in info["bytes_by_component"].items() if v]
    rows.append(("total", f"{human(info['total_bytes'])}  ({info['ratio_to_bf16']:.4f}x bf16)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join([head] + [f"  {k:<{width}}  {v}" for k, v in rows])


# KV cache element sizes by dtype (per stored element; ONNX int8/fp8 use one static scale per channel per layer).
KV_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "fp8": 1}


MACHINES_GB = (32, 48, 64, 128, 192)
# The share of a machine's memory a model may take: Apple's default GPU working set (recommendedMaxWorkingSetSize) is
# about 75 % of unified memory, and a PC keeps about as much for the OS and its apps. Plus 1 GB for the runtime's
# activations and buffers.
USABLE, RUNTIME_BYTES = 0.75, 10**9
MIXED_BUDGETS = ("2.5", "3.0", "3.5")


def max_context(spec: Llama4Spec, weights: int, machine_bytes: int, kv_bytes: int) -> int:
    """The most tokens of context whose KV cache (``kv_bytes`` per element) fits beside ``weights`` in a machine's usable
    memory (0: the weights alone do not fit); at most max_position_embeddings."""
    per = 2 * spec.num_kv_heads * spec.head_dim * kv_bytes  # one token of one layer
    glob = sum(1 for la in spec.layers if not la.chunked)
    chunked = len(spec.layers) - glob
    chunk = spec.attention_chunk_size or 0
    free = int(USABLE * machine_bytes) - weights - RUNTIME_BYTES
    if free <= 0:
        return 0
    short = free // (per * len(spec.layers))  # below one chunk every layer grows
    if not chunk or short <= chunk:
        return int(min(short, spec.max_position_embeddings))
    n = (free - chunked * chunk * per) // max(per * glob, 1) if glob else spec.max_position_embeddings
    return int(min(n, spec.max_position_embeddings))


def fits(spec: Llama4Spec, weights: dict[str, int]) -> dict[str, dict[str, int]]:
    """Per weights row and machine size: the longest context with a bf16 and an int8 KV cache (0: does not fit)."""
    return {w: {f"{gb} GB": {dt: max_context(spec, b, gb * 10**9, KV_BYTES[dt]) for dt in ("bfloat16", "int8")}
                for gb in MACHINES_GB} for w, b in weights.items()}


def context_memory(spec: Llama4Spec, tokens: int, plan_bytes: int | None = None) -> dict[str, Any]:
    """The memory plan for ``tokens`` tokens of context: KV per layer type and dtype, weights + KV in total, and what
    fits on common machines (``fits``; the planned rows, mixed:2.5/3.0/3.5 at their budgets, and ``plan_bytes``: the
    dry run's own, when one was asked for).

    Chunked (RoPE) layers hold at most one chunk (attention_chunk_size keys); global (NoPE) layers hold every token
    (what both runtimes keep, runtimes/onnx.py and runtimes/mlx.py)."""
    if tokens < 1 or tokens > spec.max_position_embeddings:
        raise UsageError(f"--context {tokens}: use 1..{spec.max_position_embeddings} (max_position_embeddings)")
    per_token = 2 * spec.num_kv_heads * spec.head_dim  # key + value elements per token per layer
    chunk = spec.attention_chunk_size
    types = {"global": [la for la in spec.layers if not la.chunked], "chunked": [la for la in spec.layers if la.chunked]}
    held = {"global": tokens, "chunked": min(tokens, chunk) if chunk else tokens}
    kv = {dt: {t: len(layers) * held[t] * per_token * nb for t, layers in types.items()} for dt, nb in KV_BYTES.items()}
    weights = {k: v for k, v in planned_sizes(spec).items() if isinstance(v, int)}
    text = spec.total_params  # the mixed budgets' denominator: text parameters (router and norms included)
    weights |= {f"mixed:{b} (at most)": int(float(b) * text / 8) for b in MIXED_BUDGETS}
    if plan_bytes:
        weights["this plan"] = plan_bytes
    return {"tokens": tokens, "layers": {t: len(v) for t, v in types.items()}, "keys_held_per_layer": held,
            "kv_bytes": kv, "weights_bytes": weights,
            "total_bytes": {f"{w} + kv {dt}": wb + sum(kv[dt].values()) for w, wb in weights.items()
                            for dt in ("bfloat16", "int8")},
            "fits": fits(spec, weights), "usable_share": USABLE, "runtime_bytes": RUNTIME_BYTES}


def format_context(info: dict[str, Any]) -> str:
    n, held, layers = info["tokens"], info["keys_held_per_layer"], info["layers"]
    lines = [f"context {n:,} tokens: global layers x{layers['global']} hold {held['global']:,} keys each, "
             f"chunked layers x{layers['chunked']} hold {held['chunked']:,}"]
    for dt, parts in info["kv_bytes"].items():
        lines.append(f"  kv {dt:<9} {human(sum(parts.values())):>10}  (global {human(parts['global'])}, "
                     f"chunked {human(parts['chunked'])})")
    for k, v in info["total_bytes"].items():
        lines.append(f"  {k:<42} {human(v):>10}")
    lines.append(f"longest context that fits (weights + KV bf16 / int8 in {info['usable_share']:.0%} of the machine, "
                 f"{human(info['runtime_bytes'])} for the runtime; '-' does not fit):")
    lines.append(f"  {'weights':<26}" + "".join(f"{gb:>18}" for gb in info["fits"][next(iter(info["fits"]))]))
    for w, row in info["fits"].items():
        cells = "".join(f"{_tokens(c['bfloat16']) + ' / ' + _tokens(c['int8']):>18}" for c in row.values())
        lines.append(f"  {w[:26]:<26}{cells}")
    return "\n".join(lines)


def _tokens(n: int) -> str:
    return "-" if n <= 0 else f"{n / 1e6:.1f}M" if n >= 10**6 else f"{n // 1000}k" if n >= 1000 else str(n)


def format_mixed(info: dict[str, Any]) -> str:
    lines = [f"plan: --format {info['format']} --dtype {info['dtype']} --quant {info['recipe']} (placed by measurement)",
             f"  budget          {human(info['budget_bytes'])} = {info['budget_bpw']:.3f} bits per weight of "
             f"{info['params']:,} text parameters",
             f"  float + pinned  {human(info['fixed_bytes'])}",
             f"  units           {info['units']}, spanning {human(info['smallest_bytes'])} (all smallest) .. "
             f"{human(info['largest_bytes'])} (all largest)"
             + ("" if info["feasible"] else "  -- the budget is below the smallest form: raise it")]
    for kind, what in info["candidates"].items():
        lines.append(f"  {kind:<16}{what}")
    lines.append(f"  widths vary     per {info['per']}" + (" (each routed expert its own width)" if info["per"] == "expert"
                                                              else " (one width per projection per layer)"))
    lines.append(f"  placement       {info['placement']}")
    return "\n".join(lines)


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
        "vision": _vision_summary(ckpt),
        "total_params": s.total_params,
        "active_params": s.active_params,
        "planned_bytes": planned_sizes(s),
    }


def _vision_summary(ckpt: Checkpoint) -> dict[str, Any] | None:
    vs = ckpt.spec.vision
    if vs is None:
        return None
    return {"layers": vs.num_layers, "hidden_size": vs.hidden_size, "heads": vs.num_heads, "tile": vs.image_size,
            "patch": vs.patch_size, "tokens_per_tile": vs.tokens_per_tile,
            "params": sum(int(np.prod(t.shape)) for t in ckpt.vision.values()), "missing_tensors": len(ckpt.vision_missing())}


def count_non_finite(a: np.ndarray, block: int = 1 << 22) -> int:
    """Non-finite values, counted in blocks so no float32 copy of the whole tensor is made."""
    flat = a.reshape(-1)
    return sum(int(np.count_nonzero(~np.isfinite(flat[i : i + block].astype(np.float32)))) for i in range(0, flat.size, block))


def check(ckpt: Checkpoint, progress: bool = True) -> dict[str, Any]:
    """Read every tensor once (one at a time) and count non-finite values."""
    bad: dict[str, int] = {}
    tensors = list(ckpt) + list(ckpt.vision.values())
    for t in tqdm(tensors, desc="checking", unit="tensor", mininterval=0,
                  disable=not progress or not log.isEnabledFor(logging.INFO)):
        n = count_non_finite(t.load(finite=False))
        if n:
            bad[t.name] = n
    return {"tensors_checked": len(tensors), "non_finite": bad}


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
    ]
    v = info.get("vision")
    if v:
        rows.append(("vision", f"{v['layers']} layers, hidden {v['hidden_size']}, {v['heads']} heads, {v['tile']}-pixel "
                     f"tiles of {v['patch']}-pixel patches -> {v['tokens_per_tile']} tokens per tile, {v['params']:,} "
                     "parameters" + (f" ({v['missing_tensors']} tensors missing: --text-only)" if v["missing_tensors"] else "")))
    rows += [(f"export {k}", human(v) if isinstance(v, int) else v) for k, v in info["planned_bytes"].items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# ---- exports ------------------------------------------------------------------------------------------------
def describe_export(path: Path) -> dict[str, Any]:
    """What an export folder holds: format, dtype, target, quantization, vision, files and bytes (from l4export.json
    and the folder; nothing is loaded)."""
    from .folder import read_export_info

    info = read_export_info(path)
    files = {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}
    return {"path": str(path), "export": True, "format": info.format, "dtype": info.dtype, "target": info.target,
            "quantization": info.quantization, "quant": None if info.quant is None else asdict(info.quant),
            "vision": info.vision, "source": info.source, "files": files, "bytes": sum(files.values())}


def format_export(d: dict[str, Any]) -> str:
    rows = [("export", d["path"]), ("format / dtype / target", f"{d['format']} / {d['dtype']} / {d['target']}"),
            ("quantization", d["quantization"] or "none (float)"),
            ("vision", "yes" if d["vision"] else "no (text only)"), ("source", d["source"]),
            ("files / bytes", f"{len(d['files'])} / {human(d['bytes'])}")]
    rows += [(f"  {name}", human(size)) for name, size in d["files"].items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
