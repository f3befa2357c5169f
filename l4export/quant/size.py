"""Exact weight bytes of an export, planned from the spec and the recipe alone (no weight is read).

The plan follows the exporters' storage rules tensor by tensor, so it equals the sum of the export's tensor
bytes (ONNX initializers / safetensors tensors; not file sizes, which add headers and graph constants):

ONNX (``exporter/onnx.py``, ``exporter/onnx_quant.py``), graph dtype ``dt``:
    float linears, norms, embeddings, float experts (fc1 + fc2)   numel · sizeof(dt)
    router                                                        numel · 4   (always float32: exact expert choice)
    int linear (MatMulNBits)       codes numel·bits/8 + scales out·in/g · sizeof(dt) [+ zero points, asymmetric]
    int routed experts (QMoE)      codes numel·bits/8 + scales E·out·in/g · sizeof(fp16 if dt is fp32 else dt)
                                   [+ zero points]: QMoE scales are float16 even in fp32 graphs (exact on the
                                   fp16 grid, schemes._fp16_exact)
    fp8 (linear or experts)        e4m3 numel · 1 + float32 scale per output channel
    zero points (asymmetric only)  uint8, two 4-bit points per byte, per row: ceil(in/g · bits / 8)

MLX (``exporter/mlx.py``, ``quant/pack.to_mlx``), model dtype ``dt``:
    float tensors (router included)    numel · sizeof(dt)
    affine int                          uint32 words numel·bits/8 + scales AND biases out·in/g · sizeof(dt) each
                                        (symmetric too: MLX has no symmetric mode, bias = -8·scale)
    fp8 / mxfp8                         e4m3 numel · 1 + e8m0 (uint8) per 32 inputs (FP8 rules become mxfp8)

Why a plan and not a measurement: the size goal is about Scout (≈ 108 B parameters) and Maverick (≈ 400 B),
which cannot be exported here; the plan is tested equal to real exports of the tiny models.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import CapabilityError
from ..names import canonical_shapes
from ..spec import Llama4Spec
from .recipe import Recipe, Rule
from .schemes import AnyScheme, Fp8, Int, MxFp8

Format = Literal["onnx", "mlx"]
DTYPE_BYTES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}
COMPONENTS = ("routed experts", "shared expert", "attention", "dense mlp", "router", "norms", "embeddings", "lm_head")


def component(name: str) -> str:
    """Which part of the model a canonical tensor belongs to (the labels of ``quant_report.json``)."""
    if ".experts." in name:
        return "routed experts"
    if ".shared_expert." in name:
        return "shared expert"
    if ".router." in name:
        return "router"
    if ".self_attn." in name:
        return "attention"
    if ".feed_forward." in name:
        return "dense mlp"
    if "embed_tokens" in name:
        return "embeddings"
    if name.startswith("lm_head"):
        return "lm_head"
    return "norms"


@dataclass(frozen=True)
class SizePlan:
    """Planned tensor bytes of one export: per canonical tensor and per component."""

    format: Format
    dtype: str
    recipe: str | None
    by_tensor: dict[str, int]  # canonical name -> bytes of everything stored for it (codes, scales, zeros)

    @property
    def total(self) -> int:
        return sum(self.by_tensor.values())

    @property
    def by_component(self) -> dict[str, int]:
        out = dict.fromkeys(COMPONENTS, 0)
        for name, n in self.by_tensor.items():
            out[component(name)] += n
        return out


def bf16_bytes(spec: Llama4Spec) -> int:
    """The reference of the size goal: every text parameter in bfloat16."""
    return 2 * spec.total_params


def _int_bytes(shape: tuple[int, ...], s: Int, scale_bytes: int, n_scale_tensors: int) -> int:
    """Packed codes + scales (+ biases on MLX: ``n_scale_tensors`` = 2) + zero points (asymmetric, ONNX only)."""
    numel = int(np.prod(shape, dtype=np.int64))
    rows, k = numel // shape[-1], shape[-1]
    groups = k // s.group_size
    return numel * s.bits // 8 + n_scale_tensors * rows * groups * scale_bytes


def _zero_point_bytes(shape: tuple[int, ...], s: Int) -> int:
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    return rows * ((shape[-1] // s.group_size * s.bits + 7) // 8)


def _fp8_bytes(shape: tuple[int, ...], per_row_scale_bytes: int | None, group: int | None = None) -> int:
    """e4m3 codes plus either one scale per output row (ONNX float32) or one e8m0 byte per ``group`` (mxfp8)."""
    numel = int(np.prod(shape, dtype=np.int64))
    rows = numel // shape[-1]
    if group is not None:
        return numel + rows * (shape[-1] // group)
    return numel + rows * int(per_row_scale_bytes or 0)


def _check_fp8_form(name: str, scheme: AnyScheme | None) -> None:
    """The plan covers per-channel FP8 with dynamic activations (the ``fp8`` preset). Square-block scales and
    static input scales (docs/fp8.md) store other tensors; refuse rather than guess."""
    if isinstance(scheme, Fp8) and (getattr(scheme, "block_size", None) or scheme.activation != "dynamic"):
        raise ValueError(f"{name}: the size plan covers per-channel dynamic FP8 only, not {scheme!r}")


def _onnx_tensor(name: str, shape: tuple[int, ...], scheme: AnyScheme | None, dt: int) -> int:
    numel = int(np.prod(shape, dtype=np.int64))
    if name.endswith("router.weight"):
        return numel * 4  # stored float32 in every graph (onnx.py: the router runs in fp32)
    if scheme is None:
        return numel * dt
    experts = ".experts." in name
    if isinstance(scheme, Int):
        # QMoE scales: float16 even in an fp32 graph; MatMulNBits scales: the graph dtype.
        scale_bytes = (2 if dt == 4 else dt) if experts else dt
        n = _int_bytes(shape, scheme, scale_bytes, 1)
        return n if scheme.symmetric else n + _zero_point_bytes(shape, scheme)
    if isinstance(scheme, Fp8):
        return _fp8_bytes(shape, 4)  # float32 scale per output channel (DequantizeLinear)
    raise CapabilityError(f"{name}: {scheme.name} has no ONNX Runtime kernel")


def _mlx_tensor(shape: tuple[int, ...], scheme: AnyScheme | None, dt: int) -> int:
    numel = int(np.prod(shape, dtype=np.int64))
    if scheme is None:
        return numel * dt
    if isinstance(scheme, Int):
        return _int_bytes(shape, scheme, dt, 2)  # scales and biases, both in the model dtype
    if isinstance(scheme, (Fp8, MxFp8)):
        return _fp8_bytes(shape, None, group=32)  # FP8 rules are written as mxfp8 (exporter/mlx.mlx_recipe)
    raise TypeError(f"{scheme!r} has no MLX layout")


def _check_onnx(spec: Llama4Spec, recipe: Recipe) -> None:
    """The refusals of ``onnx_quant.QuantLowering``, so that no plan is made for an export that cannot exist."""
    for name in canonical_shapes(spec):
        s = recipe.scheme_for(name)
        if s is not None and (name.endswith("router.weight") or name == "model.embed_tokens.weight"):
            raise CapabilityError(f"recipe {recipe.name}: {name} cannot be quantized for --format onnx")
    for la in spec.layers:
        if not la.is_moe:
            continue
        pre = f"model.layers.{la.index}.feed_forward.experts"
        g, u, d = (recipe.scheme_for(f"{pre}.{p}") for p in ("gate_proj", "up_proj", "down_proj"))
        if (g, u, d) == (None, None, None):
            continue
        same = g is not None and g == u and d is not None and type(d) is type(g)
        if same and isinstance(g, Int):
            same = d.bits == g.bits and d.group_size == g.group_size
        if not same:
            raise CapabilityError(f"recipe {recipe.name}: {pre} gate/up/down need one scheme for QMoE")


def plan_bytes(spec: Llama4Spec, recipe: Recipe | None, fmt: Format, dtype: str) -> SizePlan:
    """The weight bytes ``l4export convert --format fmt --dtype dtype [--quant recipe]`` will write."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    dt = DTYPE_BYTES[dtype]
    shapes = canonical_shapes(spec)  # lm_head absent when tied (nothing stored for it)
    if recipe is not None:
        recipe.validate(shapes)
        # cpu: for the forms planned here (int, per-channel dynamic FP8) cuda stores the same bytes
        recipe.check_target(fmt, "cpu")
        if fmt == "onnx":
            _check_onnx(spec, recipe)
        else:  # what exporter/mlx.mlx_recipe does: per-channel FP8 has no MLX mode
            recipe = Recipe(recipe.name, tuple(Rule(r.pattern, MxFp8()) if isinstance(r.scheme, Fp8) else r
                                               for r in recipe.rules))
    by_tensor: dict[str, int] = {}
    for name, shape in shapes.items():
        scheme = None if recipe is None else recipe.scheme_for(name)
        _check_fp8_form(name, scheme)
        by_tensor[name] = _onnx_tensor(name, shape, scheme, dt) if fmt == "onnx" else _mlx_tensor(shape, scheme, dt)
    return SizePlan(fmt, dtype, None if recipe is None else recipe.name, by_tensor)


# ---- measured: the same quantity from an export on disk ---------------------------------------------------
_GRAPH_CONSTANT = re.compile(r"const_\d+")  # GraphBuilder.const: shape/axis constants, inv_freq (not weights)
_ONNX_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2, 17: 1}


def export_tensor_bytes(path: str | Path) -> int:
    """Sum of the weight tensors' bytes of an export folder: safetensors tensors (MLX) or ONNX initializers
    without the graph's own constants. Headers, the graph and metadata are not counted."""
    path = Path(path)
    onnx_file = path / "model.onnx"
    if onnx_file.is_file():
        import onnx

        graph = onnx.load(str(onnx_file), load_external_data=False).graph
        total = 0
        for init in graph.initializer:
            if _GRAPH_CONSTANT.fullmatch(init.name):
                continue
            total += int(np.prod(init.dims, dtype=np.int64)) * _ONNX_ITEMSIZE[init.data_type]
        return total
    total = 0
    for f in sorted(path.glob("*.safetensors")):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        total += sum(e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items() if k != "__metadata__")
    return total


__all__ = ["COMPONENTS", "SizePlan", "bf16_bytes", "component", "export_tensor_bytes", "plan_bytes"]
