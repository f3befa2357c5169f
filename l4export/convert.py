"""``l4export convert``: checkpoint in, ONNX or MLX export out, written atomically.

Data flows one way: plan, read, lower, write.

    Checkpoint(path)          headers only: the spec and the canonical lazy tensors (names.py)
    make_plan(spec, ...)      every refusal, before any weight is read (plan.py)
    calibrate(...)            once, when --calib is given: GPTQ tensors spilled to disk (quant/calib/)
    export_<format>(...)      streams each tensor from the checkpoint into the temporary output folder
    l4export.json             what the runtimes read to know what they hold

Each format's writer lives in ``exporter/`` and has the signature::

    export_<format>(ckpt, out, plan, options, calib, ready) -> dict   # l4export.json's "<format>" section (folder.ExportInfo)
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from collections import ChainMap
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .capabilities import DTYPE_BYTES, check_dtype
from .checkpoint import Checkpoint
from .errors import CapabilityError, MappingError, UsageError
from .folder import ExportInfo, QuantInfo
from .manifest import write_manifest
from .outputs import atomic_output_dir, copy_files
from .plan import ExportPlan, make_plan
from .quant.recipe import Recipe

log = logging.getLogger(__name__)

Format = Literal["onnx", "mlx"]


@dataclass
class ExportOptions:
    format: Format = "onnx"
    dtype: str = "float32"
    target: str = "cpu"  # onnx: cpu | cuda; mlx: any
    quant: Any = None  # a quant.recipe.Recipe, or None for float
    calib: Any = None  # a quant.calib.CalibOptions, or None
    text_only: bool = False  # leave a multimodal checkpoint's vision tower and projector out
    max_images: int = 8  # images a prompt may carry (runtimes refuse more)
    max_shard_bytes: int = 2 * 1024**3
    ray: str | None = None  # a Ray address (local, auto, ray://...): distribute the quantization (--ray)
    tmp_dir: Path | None = None  # where calibration spills (default: inside the output's temporary folder)
    allocation: dict | None = None  # mixed:B, set by convert: the allocator's record (l4export.json, quant report)
    measurements: Path | None = None  # mixed:B: the measurements file (read when it matches, else written)


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


def _calibrate(ckpt: Checkpoint, plan: ExportPlan, options: ExportOptions, tmp: Path, workers):
    """GPTQ (or RTN statistics) for the plan's recipe; calibrated codes spill into the output's temporary folder
    (the output's disk, not a possibly RAM-backed $TMPDIR) or --tmp-dir, and go when the export is written."""
    from .quant.calib import calibrate, spill_next_to
    from .quant.calib_data import read_calibration

    c = options.calib
    if options.tmp_dir is not None and options.ray is None:
        c = replace(c, spill_dir=options.tmp_dir)
    ids = read_calibration(c.path, ckpt.spec.vocab_size, ckpt.path, c.samples, c.seqlen)
    return calibrate(ckpt, plan.quantized, ids, spill_next_to(c, tmp), workers=workers)


def spill_bytes(plan: ExportPlan) -> int:
    """Disk the quantized codes take while they wait for the writer: one byte per weight plus float32 scales and
    uint8 zero points per group (calibration, and round-to-nearest ahead of the writer with --ray)."""
    total = 0
    for name, t in plan.tensors.items():
        if t.scheme is not None:
            n = int(np.prod(t.shape, dtype=np.int64))
            total += n + 5 * n // t.scheme.group_for(t.shape[-1])
    return total


def calib_scratch_bytes(plan: ExportPlan, calib: Any) -> int:
    """Disk calibration uses beside the codes: its activations (at most samples x seqlen tokens, ``ACTIVATION_FILES``
    [tokens, hidden] float32 files) and the widest input's Hessian: parked while it is factored
    (``gptq.factor_in_place``), or in tiles with its factor's (``quant.tiles``)."""
    from .quant.activations import ACTIVATION_FILES
    from .quant.tiles import tiles_bytes

    spec = plan.spec
    widest = max(spec.hidden_size, spec.intermediate_size, spec.intermediate_size_mlp)
    hessian = max(widest * widest * 4, 2 * tiles_bytes(widest))
    return ACTIVATION_FILES * calib.samples * calib.seqlen * spec.hidden_size * 4 + hessian


def check_disk(out: Path, plan: ExportPlan, options: ExportOptions, ahead: bool) -> None:
    """Refuse, before anything is written, an export whose output and spill do not fit the free disk."""
    parent = out.resolve().parent
    need = {parent: int(plan.total * 1.01) + (64 << 20)}  # weights, graph and tokenizer files
    spill = spill_bytes(plan) if options.calib is not None or ahead else 0
    spill += calib_scratch_bytes(plan, options.calib) if options.calib is not None else 0
    where = options.tmp_dir if options.tmp_dir is not None and options.ray is None else parent
    if spill:
        key = parent if _same_disk(where, parent) else Path(where)
        need[key] = need.get(key, 0) + spill
    for folder, n in need.items():
        free = shutil.disk_usage(folder).free if folder.exists() else None
        if free is not None and free < n:
            detail = f" (the output {plan.total / 1e9:.2f} GB" + (f", the quantization spill {spill / 1e9:.2f} GB)"
                                                                  if spill else ")")
            raise UsageError(f"{folder}: {free / 1e9:.2f} GB free but this export needs about {n / 1e9:.2f} GB"
                             f"{detail}; free space, or choose another -o" + (" or --tmp-dir" if spill else ""))


def _same_disk(a: Path, b: Path) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return True


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


def _ahead(plan: ExportPlan, options: ExportOptions) -> dict:
    """With --ray: the round-to-nearest integer tensors to quantize on the cluster before the writer runs."""
    from .quant.schemes import Int

    if options.ray is None:
        return {}
    return {n: s for n, s in plan.quantized.items() if isinstance(s, Int)}


def _check_tmp_dir(options: ExportOptions) -> None:
    d = options.tmp_dir
    if d is None:
        return
    if options.ray is not None:
        raise UsageError("--tmp-dir with --ray: the spill must be on the filesystem every node shares; "
                         "leave --tmp-dir out (it goes inside the output's temporary folder)")
    if not Path(d).is_dir() or not os.access(d, os.W_OK):
        raise UsageError(f"{d}: --tmp-dir is not a writable folder; create it or choose another")


def _write(ckpt: Checkpoint, tmp: Path, plan: ExportPlan, options: ExportOptions, writer,
           stack: ExitStack) -> tuple[dict, dict | None]:
    """Calibrate (if asked), quantize ahead (with --ray), then run the format's writer into ``tmp``. Returns the
    writer's l4export.json section and what calibration ran on (samples, tokens, method), or None."""
    from .distributed import workers_for

    workers = workers_for(options.ray, tmp)
    stack.callback(workers.close)
    calib = _calibrate(ckpt, plan, options, tmp, workers) if options.calib is not None else None
    if calib is not None:
        stack.callback(calib.close)  # the spilled codes are in the export now (or the export failed)
    ready = None
    ahead = _ahead(plan, options)
    if ahead:
        from .quant.ahead import quantize_ahead

        store = quantize_ahead(ckpt, {n: s for n, s in ahead.items() if calib is None or n not in calib.tensors},
                               workers, tmp)
        stack.callback(store.close)
        ready = store if calib is None else ChainMap(calib.tensors, store)  # type: ignore[arg-type]
    section = writer(ckpt, tmp, plan, options, calib, ready)
    if calib is not None:  # the quant report, once for both formats
        from .quant.report import report_inputs, write_report

        shapes, vision = report_inputs(ckpt, plan)
        float_bytes = 2 if plan.format == "onnx" else DTYPE_BYTES[plan.dtype]  # (ONNX's reference: bf16)
        write_report(tmp, calib, shapes, plan.recipe.name, float_bytes, uncalibrated=vision, adapted=plan.adapted,
                     allocation=options.allocation)
    ran = None if calib is None else {"samples": calib.samples, "tokens": calib.tokens, "method": options.calib.method}
    return section, ran


def _allocate(ckpt: Checkpoint, options: ExportOptions) -> ExportOptions:
    """The mixed-precision budget placed by measurement (l4export.mixed); the allocated recipe replaces it."""
    from .mixed import allocate

    ids = None
    if options.calib is not None:
        from .quant.calib_data import read_calibration

        c = options.calib
        ids = read_calibration(c.path, ckpt.spec.vocab_size, ckpt.path, c.samples, c.seqlen)
    calib = options.calib
    if calib is not None and options.tmp_dir is not None:  # the measurement's float pass spills where asked too
        calib = replace(calib, spill_dir=options.tmp_dir)
    recipe, alloc = allocate(ckpt, options.quant, options.format, options.dtype, options.target, calib, ids,
                             options.measurements)
    return replace(options, quant=recipe, allocation=alloc.record())


def _quant_info(plan: ExportPlan, calibration: dict | None, allocation: dict | None = None) -> QuantInfo | None:
    if plan.recipe is None:
        return None
    from .quant.schemes import scheme_record

    placed = plan.quantized  # name -> scheme, the plan's order
    return QuantInfo(plan.recipe.name, calibration is not None, calibration, len(placed), dict(plan.adapted),
                     schemes={s.name: scheme_record(s) for s in placed.values()},
                     placement={n: s.name for n, s in placed.items()}, allocation=allocation)


def convert(checkpoint: str | Path, out: str | Path, options: ExportOptions, force: bool = False) -> Path:
    """Convert a checkpoint folder to an export folder; returns the output path."""
    check_dtype(options.format, options.dtype, options.target)
    ckpt = Checkpoint(checkpoint)
    mixed = options.quant is not None and options.quant.budget is not None
    # a bad recipe fails here, before any weight is read or anything written (a mixed one: its pins, its budget)
    plan = plan_export(ckpt, replace(options, quant=Recipe(options.quant.name, options.quant.rules)) if mixed else options)
    if options.calib is not None and importlib.util.find_spec("torch") is None:
        raise CapabilityError("--calib runs the model in torch, which is not installed: pip install 'l4export[reference]'"
                              " (with torch==2.13.0 first for the CPU build)")
    out = Path(out)
    if out.resolve() == Path(checkpoint).resolve():
        raise UsageError(f"{out}: the output folder must not be the checkpoint folder")
    _check_tmp_dir(options)
    if options.ray is not None and importlib.util.find_spec("ray") is None:
        raise CapabilityError("--ray needs Ray, which is not installed: pip install 'l4export[distributed]'")
    if mixed:  # measure (reads the weights), allocate, then plan the allocated recipe
        options = _allocate(ckpt, options)
        plan = plan_export(ckpt, options)
    check_disk(out, plan, options, bool(_ahead(plan, options)))
    if not (ckpt.path / "tokenizer.json").is_file():
        log.warning("%s has no tokenizer.json: the export will run token ids (run --ids) but not text; copy the "
                    "model's tokenizer.json next to config.json and convert again", ckpt.path)
    if options.format == "onnx":
        from .exporter.onnx import export_onnx as writer
    else:
        from .exporter.mlx import export_mlx as writer
    with atomic_output_dir(out, force=force) as tmp:
        with ExitStack() as stack:  # workers, spilled codes: gone before the manifest is written
            section, calibration = _write(ckpt, tmp, plan, options, writer, stack)
        ExportInfo(options.format, options.dtype, options.target, str(Path(checkpoint).resolve()), ckpt.spec.layout,
                   copy_files(ckpt.tokenizer_files(), tmp), _quant_info(plan, calibration, options.allocation),
                   vision_info(ckpt, options) if plan.vision else None, **{options.format: section}).write(tmp)
        write_manifest(tmp)  # last: the sha256 of every file (l4export inspect OUT --check)
    log.info("wrote %s", out)
    return out
