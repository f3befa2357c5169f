"""``l4export convert``: checkpoint in, ONNX or MLX export out, written atomically.

This module owns what both formats share: checking the request before any weight is read, the temporary
output folder, tokenizer files, and ``l4export.json`` (what the runtimes read to know what they hold).
Each format's writer lives in ``exporter/`` and has the signature::

    export_<format>(ckpt: Checkpoint, out: Path, options: ExportOptions) -> dict   # extra metadata
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .checkpoint import Checkpoint
from .errors import CapabilityError, UsageError
from .outputs import atomic_output_dir, copy_files
from .runtimes.base import EXPORT_INFO

log = logging.getLogger(__name__)

Format = Literal["onnx", "mlx"]
DTYPES = ("float32", "float16", "bfloat16")

# Which (format, target) pairs can run which compute dtypes. One row per pair; adding a target is a row.
SUPPORTED: dict[tuple[str, str], tuple[str, ...]] = {
    ("onnx", "cpu"): ("float32", "float16"),  # ORT CPU MoE/QMoE: fp32 and fp16 only (no bf16 kernels)
    ("onnx", "cuda"): ("float16", "bfloat16"),  # ORT CUDA MoE/QMoE: fp16/bf16 only (no fp32)
    ("mlx", "any"): ("float32", "float16", "bfloat16"),
}


@dataclass
class ExportOptions:
    format: Format = "onnx"
    dtype: str = "float32"
    target: str = "cpu"  # onnx: cpu | cuda; mlx: any
    quant: Any = None  # a quant.recipe.Recipe, or None for float
    calib: Any = None  # a quant.calibrate.CalibOptions, or None
    max_shard_bytes: int = 2 * 1024**3
    extra: dict[str, Any] = field(default_factory=dict)


def check_request(options: ExportOptions) -> None:
    """Refuse an impossible request before any weight is read."""
    if options.dtype not in DTYPES:
        raise UsageError(f"--dtype {options.dtype!r} is not one of {', '.join(DTYPES)}")
    key = (options.format, options.target if options.format == "onnx" else "any")
    if key not in SUPPORTED:
        raise UsageError(f"--target {options.target!r} is not supported for --format {options.format}; use cpu or cuda")
    ok = SUPPORTED[key]
    if options.dtype not in ok:
        raise CapabilityError(
            f"--dtype {options.dtype} cannot run on {options.format} target {options.target}; use --dtype {' or '.join(ok)}"
        )


def convert(checkpoint: str | Path, out: str | Path, options: ExportOptions, force: bool = False) -> Path:
    """Convert a checkpoint folder to an export folder; returns the output path."""
    check_request(options)
    ckpt = Checkpoint(checkpoint)
    if ckpt.spec.top_k != 1:
        raise CapabilityError(
            f"{checkpoint}: num_experts_per_tok={ckpt.spec.top_k}; l4export exports top-1 routing only (Scout, Maverick)"
        )
    if options.quant is not None:  # a bad recipe fails here, before any weight is read or anything written
        options.quant.validate(ckpt.spec)
        options.quant.check_target(options.format, options.target, names=list(ckpt.tensors),
                                   calibrated=options.calib is not None)
    out = Path(out)
    if out.resolve() == Path(checkpoint).resolve():
        raise UsageError(f"{out}: the output folder must not be the checkpoint folder")
    if options.format == "onnx":
        from .exporter.onnx import export_onnx as writer
    else:
        from .exporter.mlx import export_mlx as writer
    with atomic_output_dir(out, force=force) as tmp:
        extra = writer(ckpt, tmp, options) or {}
        tokenizer = copy_files(ckpt.tokenizer_files(), tmp)
        info = {
            "format": options.format,
            "dtype": options.dtype,
            "target": options.target,
            "quantization": None if options.quant is None else getattr(options.quant, "name", str(options.quant)),
            "source": str(Path(checkpoint).resolve()),
            "source_layout": ckpt.spec.layout,
            "tokenizer_files": tokenizer,
            **extra,
        }
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2, default=str))
    log.info("wrote %s", out)
    return out


def options_dict(options: ExportOptions) -> dict[str, Any]:
    return {k: v for k, v in asdict(options).items() if k not in ("quant", "calib")}
