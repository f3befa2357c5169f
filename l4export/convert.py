"""``l4export convert``: checkpoint in, ONNX or MLX export out, written atomically.

Data flows one way: plan, read, lower, write.

    Checkpoint(path)          headers only: the spec and the canonical lazy tensors (names.py)
    make_plan(spec, ...)      every refusal, before any weight is read (plan.py)
    calibrate(...)            once, when --calib is given: GPTQ tensors spilled to disk (quant/calibrate.py)
    export_<format>(...)      streams each tensor from the checkpoint into the temporary output folder
    l4export.json             what the runtimes read to know what they hold

Each format's writer lives in ``exporter/`` and has the signature::

    export_<format>(ckpt, out, plan, options, calib) -> dict   # extra l4export.json metadata
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .checkpoint import Checkpoint
from .errors import CapabilityError, MappingError, UsageError
from .manifest import write_manifest
from .outputs import atomic_output_dir, copy_files
from .plan import ExportPlan, check_dtype, make_plan
from .runtimes.base import EXPORT_INFO

log = logging.getLogger(__name__)

Format = Literal["onnx", "mlx"]


@dataclass
class ExportOptions:
    format: Format = "onnx"
    dtype: str = "float32"
    target: str = "cpu"  # onnx: cpu | cuda; mlx: any
    quant: Any = None  # a quant.recipe.Recipe, or None for float
    calib: Any = None  # a quant.calibrate.CalibOptions, or None
    text_only: bool = False  # leave a multimodal checkpoint's vision tower and projector out
    max_images: int = 8  # images a prompt may carry (runtimes refuse more)
    max_shard_bytes: int = 2 * 1024**3


def plan_export(ckpt: Checkpoint, options: ExportOptions) -> ExportPlan:
    """The export plan of ``options`` for ``ckpt``: raises before any weight is read if it cannot be done."""
    vision = ckpt.spec.vision is not None and not options.text_only
    missing = ckpt.vision_missing() if vision else []
    if missing:
        raise MappingError(f"{ckpt.path}: config.json has a vision_config but the checkpoint lacks {missing[0]}"
                           + (f" and {len(missing) - 1} more vision tensors" if len(missing) > 1 else "")
                           + "; convert with --text-only for a text export")
    return make_plan(ckpt.spec, options.format, options.dtype, options.target, options.quant,
                     calibrated=options.calib is not None, vision=vision)


def _calibrate(ckpt: Checkpoint, plan: ExportPlan, options: ExportOptions, tmp: Path):
    """GPTQ (or RTN statistics) for the plan's recipe; calibrated codes spill into the output's temporary folder
    (the output's disk, not a possibly RAM-backed $TMPDIR) and go when the export is written."""
    from .quant.calib_data import read_calibration
    from .quant.calibrate import calibrate, spill_next_to

    c = options.calib
    ids = read_calibration(c.path, ckpt.spec.vocab_size, ckpt.path, c.samples, c.seqlen)
    return calibrate(ckpt, plan.recipe, ids, spill_next_to(c, tmp))


def vision_info(ckpt: Checkpoint, options: ExportOptions) -> dict[str, Any]:
    """l4export.json "vision": what the runtimes need to preprocess images and lay them out as tokens."""
    vs = ckpt.spec.vision
    pre = ckpt.path / "preprocessor_config.json"
    try:
        max_patches = int(json.loads(pre.read_text()).get("max_patches", 16)) if pre.is_file() else 16
    except (ValueError, TypeError, AttributeError):
        raise UsageError(f"{pre}: not a JSON object with an integer max_patches; fix or remove the file") from None
    return {"tile_size": vs.image_size, "tokens_per_tile": vs.tokens_per_tile, "image_token_id": vs.image_token_id,
            "max_patches": max_patches, "max_images": options.max_images}


def convert(checkpoint: str | Path, out: str | Path, options: ExportOptions, force: bool = False) -> Path:
    """Convert a checkpoint folder to an export folder; returns the output path."""
    check_dtype(options.format, options.dtype, options.target)
    ckpt = Checkpoint(checkpoint)
    plan = plan_export(ckpt, options)  # a bad recipe fails here, before any weight is read or anything written
    if options.calib is not None and importlib.util.find_spec("torch") is None:
        raise CapabilityError("--calib runs the model in torch, which is not installed: pip install 'l4export[reference]'"
                              " (with torch==2.13.0 first for the CPU build)")
    out = Path(out)
    if out.resolve() == Path(checkpoint).resolve():
        raise UsageError(f"{out}: the output folder must not be the checkpoint folder")
    if options.format == "onnx":
        from .exporter.onnx import export_onnx as writer
    else:
        from .exporter.mlx import export_mlx as writer
    with atomic_output_dir(out, force=force) as tmp:
        calib = _calibrate(ckpt, plan, options, tmp) if options.calib is not None else None
        try:
            extra = writer(ckpt, tmp, plan, options, calib) or {}
        finally:
            if calib is not None:
                calib.close()  # the spilled codes are in the export now (or the export failed)
        tokenizer = copy_files(ckpt.tokenizer_files(), tmp)
        info = {
            "format": options.format,
            "dtype": options.dtype,
            "target": options.target,
            "quantization": None if options.quant is None else getattr(options.quant, "name", str(options.quant)),
            **({"quantization_adapted": plan.adapted} if plan.adapted else {}),
            "source": str(Path(checkpoint).resolve()),
            "source_layout": ckpt.spec.layout,
            "vision": vision_info(ckpt, options) if plan.vision else None,
            "tokenizer_files": tokenizer,
            **extra,
        }
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2, default=str))
        write_manifest(tmp)  # last: the sha256 of every file (l4export inspect OUT --check)
    log.info("wrote %s", out)
    return out
