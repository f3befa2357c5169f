"""The quantization report: ``quant_report.json`` plus PNG plots (matplotlib, Agg backend).

    tokens_per_expert.png   heatmap, MoE layer × expert, tokens routed during calibration
    expert_sqnr.png         per-expert output SQNR of routed-expert tensors, RTN vs calibrated
    size_by_component.png   bytes per component (float vs quantized)
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Mapping

import numpy as np

from ..folder import QUANT_REPORT
from ..names import component
from .calib import CalibResult
from .schemes import QTensor

log = logging.getLogger(__name__)


def size_by_component(shapes: Mapping[str, tuple[int, ...]], quantized: Mapping[str, QTensor | int],
                      float_bytes: int = 2) -> dict[str, dict[str, int]]:
    """Bytes per component: as float (``float_bytes`` per value) and as exported (quantized where the recipe says;
    ``quantized``: name -> QTensor or its bytes)."""
    out: dict[str, dict[str, int]] = {}
    for name, shape in shapes.items():
        n = int(np.prod(shape, dtype=np.int64))
        c = out.setdefault(component(name), {"float": 0, "quantized": 0})
        c["float"] += n * float_bytes
        q = quantized.get(name)
        c["quantized"] += n * float_bytes if q is None else q if isinstance(q, int) else q.nbytes
    return out


def _finite(v: list[float]) -> list[float | None]:
    return [None if not math.isfinite(x) else round(float(x), 3) for x in v]


def report_inputs(ckpt, plan) -> tuple[dict[str, tuple[int, ...]], dict[str, dict]]:
    """The report's shapes (text, + vision when exported) and its entries for the quantized vision tensors
    (round to nearest: calibration runs the text model only). ``ckpt``: a Checkpoint; ``plan``: its ExportPlan."""
    vision = ckpt.vision if plan.vision else {}
    shapes = {n: tuple(t.shape) for n, t in (ckpt.tensors | vision).items()}
    return shapes, rtn_stats(vision, {n: s for n, s in plan.quantized.items() if n in vision})


def rtn_stats(tensors: Mapping[str, object], schemes: Mapping[str, object]) -> dict[str, dict]:
    """Report entries of tensors quantized to nearest outside calibration (the vision tower and projector): scheme,
    shape and the weight SQNR in dB. ``tensors``: name -> LazyTensor; ``schemes``: name -> scheme."""
    from .schemes import sqnr_db

    out = {}
    for name, scheme in schemes.items():
        w = tensors[name].load(np.float32)
        q = scheme.quantize(w)
        out[name] = {"scheme": scheme.name, "shape": list(w.shape), "calibrated": False, "nbytes": int(q.nbytes),
                     "weight_sqnr_rtn": round(float(sqnr_db(w, q.dequantize())), 3)}
    return out


def write_report(out_dir: str | Path, result: CalibResult, shapes: Mapping[str, tuple[int, ...]],
                 recipe_name: str, float_bytes: int = 2, uncalibrated: Mapping[str, dict] | None = None,
                 adapted: Mapping[str, str] | None = None, allocation: Mapping | None = None) -> Path:
    """Write the JSON report and the plots into ``out_dir``; returns the JSON path. ``uncalibrated``: entries of
    quantized tensors calibration does not see (``rtn_stats``), reported beside the calibrated ones."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    quantized = {n: qt.nbytes for n, qt in result.tensors.items()} | {n: e["nbytes"] for n, e in (uncalibrated or {}).items()}
    sizes = size_by_component(shapes, quantized, float_bytes)
    report = {
        "recipe": recipe_name,
        "adapted": dict(adapted or {}),  # preset tensors changed to fit the model: name -> "from -> to"
        # what was calibrated, not how long it took: the same inputs give the same bytes (the time is logged)
        "calibration": {"samples": result.samples, "tokens": result.tokens, "device": result.device},
        "tokens_per_expert": {str(k): v for k, v in result.token_counts.items()},
        "tensors": {
            name: {"scheme": qt.scheme.name, "shape": list(qt.shape),
                   **{k: (_finite(v) if k != "tokens" else v) for k, v in result.stats.get(name, {}).items()}}
            for name, qt in result.tensors.items()
        } | dict(uncalibrated or {}),
        "size_bytes": sizes,
        # mixed:B: the budget arithmetic and each unit's scheme, measured error and routing share (l4export.mixed)
        "allocation": None if allocation is None else dict(allocation),
        "plots": ["tokens_per_expert.png", "expert_sqnr.png", "size_by_component.png"],
    }
    log.info("calibration: %d samples, %d tokens, %.1f s on %s", result.samples, result.tokens, result.seconds,
             result.device)
    path = out_dir / QUANT_REPORT
    path.write_text(json.dumps(report, indent=2, allow_nan=False))
    _plot_tokens(result, out_dir / "tokens_per_expert.png")
    _plot_sqnr(result, out_dir / "expert_sqnr.png")
    _plot_sizes(sizes, recipe_name, float_bytes, out_dir / "size_by_component.png")
    log.info("wrote %s", path)
    return path


def _save(fig, png: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _plot_tokens(result: CalibResult, png: Path) -> None:
    """Tokens routed per expert per MoE layer (a heatmap)."""
    import matplotlib.pyplot as plt

    layers = sorted(result.token_counts)
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.3 * max(len(layers), 1)))
    if layers:
        grid = np.array([result.token_counts[k] for k in layers])
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(layers)), [str(k) for k in layers])
        fig.colorbar(im, ax=ax, label="tokens")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title("Calibration tokens routed per expert")
    _save(fig, png)


def _plot_sqnr(result: CalibResult, png: Path) -> None:
    """Per-expert output SQNR, RTN vs calibrated (routed expert tensors)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    xs_r, xs_c = [], []
    for name, st in result.stats.items():
        if ".experts." in name and "output_sqnr_rtn" in st:
            xs_r += st["output_sqnr_rtn"]
            xs_c += st["output_sqnr_calibrated"]
    if xs_r:
        r, c = np.array(xs_r), np.array(xs_c)
        ok = np.isfinite(r) & np.isfinite(c)
        ax.scatter(r[ok], c[ok], s=6, alpha=0.6)
        lo, hi = float(min(r[ok].min(), c[ok].min())), float(max(r[ok].max(), c[ok].max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="calibrated = RTN")
        ax.legend()
    ax.set_xlabel("RTN output SQNR (dB)")
    ax.set_ylabel("calibrated output SQNR (dB)")
    ax.set_title("Per-expert output SQNR (each point: one expert of one tensor)")
    _save(fig, png)


def _plot_sizes(sizes: dict, recipe_name: str, float_bytes: int, png: Path) -> None:
    """Model size by component, float vs quantized."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(sizes)
    x = np.arange(len(names))
    ax.bar(x - 0.2, [sizes[n]["float"] / 2**20 for n in names], 0.4, label=f"float ({8 * float_bytes}-bit)")
    ax.bar(x + 0.2, [sizes[n]["quantized"] / 2**20 for n in names], 0.4, label=recipe_name)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("MiB")
    ax.set_title("Model size by component")
    ax.legend()
    _save(fig, png)
