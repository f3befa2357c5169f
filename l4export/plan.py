"""The export plan: every tensor's scheme, storage and bytes, and every refusal, decided before any weight is read.

    spec + recipe + format + dtype + target  --make_plan-->  ExportPlan
        convert.py      validates the request once (make_plan raises here, before anything is read or written)
        exporter/*.py   read each tensor's scheme from it (no second recipe lookup, no second validation)
        inspect.py      its bytes are the dry run (``l4export inspect --quant``); folder.export_tensor_bytes measures
                        an export's, and tests/test_quant_size.py checks the two equal

Storage rules (bytes of everything written for one canonical tensor; they equal the export's tensor bytes,
tests/test_quant_size.py checks them against real exports). ``dt`` is the compute dtype's size:

ONNX (``exporter/onnx_lower.py``):
    router, norms                   numel * 4                 (always float32: exact expert choice, fp32 residual)
    float                           numel * dt                (float experts: interleaved fc1 + fc2, same numel)
    int linear (MatMulNBits)        numel*bits/8 + rows*groups*dt         [+ zero points, asymmetric]
    int embedding (GatherBlockQuantized)   the same
    int routed experts (QMoE), and dense MLPs / shared experts lowered as a one-expert QMoE (``mlp_fused``)
                                    numel*bits/8 + rows*groups*fp16-or-dt [+ zero points]
                                    (QMoE scales are float16 even in fp32 graphs: exact on the fp16 grid)
    fp8 per channel                 numel + rows*4            (float32 scale per output channel)
    fp8 square blocks b             numel + tiles*4           (tiles = rows/b * cols/b; CUDA dense linears store
                                                               MatMulBlockQuantizedFp8Weight's b_scale per row: rows*cols/b*4)
    fp8 static activations          + 4 per applied input scale (dense linears; one per MoE layer, on gate_proj)
    Fused storage (q/k/v as one qkv_proj; gate/up/down as one MoE) stores the same bytes as the parts.
MLX (``exporter/mlx.py``):
    float (router included)         numel * dt
    affine int                      numel*bits/8 + 2 * rows*groups*dt      (scales and biases)
    fp8 (written as mxfp8)          numel + rows*cols/32                   (e8m0 byte per 32 inputs)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from .capabilities import DTYPE_BYTES, attention_form, check_dtype, int_bits
from .errors import CapabilityError, UsageError
from .names import COMPONENTS, canonical_shapes, component, is_vision, vision_shapes
from .quant.recipe import PRESETS, Recipe, Rule, for_model
from .quant.schemes import AnyScheme, Fp8, Int, MxFp8, PerExpert
from .spec import Llama4Spec

log = logging.getLogger(__name__)
Format = Literal["onnx", "mlx"]
EXPERTS = ("gate_proj", "up_proj", "down_proj")

@dataclass(frozen=True)
class TensorPlan:
    name: str  # canonical (names.py)
    shape: tuple[int, ...]
    scheme: AnyScheme | None  # None: stored float
    nbytes: int  # everything written for it (codes, scales, zero points, input scales)


@dataclass(frozen=True)
class ExportPlan:
    spec: Llama4Spec = field(repr=False)
    format: Format
    dtype: str
    target: str  # onnx: cpu | cuda; mlx: any
    recipe: Recipe | None  # as this format stores it (MLX: FP8 rules become mxfp8)
    calibrated: bool
    tensors: dict[str, TensorPlan] = field(repr=False)
    adapted: dict[str, str] = field(default_factory=dict)  # preset tensors changed to fit: name -> "from -> to"
    attention: str = "gqa"  # capabilities.ATTENTION_FORMS: the ONNX attention kernel this head size runs (recorded
    #                        in l4export.json's onnx.attention; what presets adapted: ``adapted``, in its quant.adapted)

    @property
    def vision(self) -> bool:
        """The export carries the vision tower and projector (a multimodal checkpoint without --text-only)."""
        return any(is_vision(n) for n in self.tensors)

    def scheme(self, name: str) -> AnyScheme | None:
        t = self.tensors.get(name)
        return None if t is None else t.scheme

    @property
    def quantized(self) -> dict[str, AnyScheme]:
        return {n: t.scheme for n, t in self.tensors.items() if t.scheme is not None}

    def expert_scheme(self, layer: int) -> AnyScheme | None:
        """The one scheme of a MoE layer's routed experts (make_plan refused mixed schemes for ONNX)."""
        return self.scheme(f"model.layers.{layer}.feed_forward.experts.gate_proj")

    def qkv_fused(self, layer: int) -> bool:
        """q, k and v projections of ``layer`` as one linear (ONNX): one scheme for the three, no static FP8."""
        return _qkv_fused(self.tensors, layer)

    def mlp_fused(self, pre: str) -> bool:
        """A SwiGLU MLP (``pre`` = a dense ``feed_forward`` or a ``feed_forward.shared_expert``) lowered as one
        one-expert QMoE node (ONNX): gate/up/down of one int4 scheme. (Float MLPs stay MatMuls: ORT's float MoE
        kernel reads its weights at about 0.65x MatMul's rate, measured on the decode benchmark.)"""
        return _mlp_fused(self.tensors, pre)

    def gate_up_fused(self, pre: str) -> bool:
        """gate_proj and up_proj of an MLP as one linear [2I, H] (ONNX): one scheme for both, no static FP8."""
        gate, up = (self.tensors[f"{pre}.{p}.weight"].scheme for p in EXPERTS[:2])
        return gate == up and not (isinstance(gate, Fp8) and gate.activation == "static")

    @property
    def by_tensor(self) -> dict[str, int]:
        return {n: t.nbytes for n, t in self.tensors.items()}

    @property
    def total(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def by_component(self) -> dict[str, int]:
        out = dict.fromkeys(COMPONENTS, 0)
        for t in self.tensors.values():
            out[component(t.name)] += t.nbytes
        return out


def _qkv_fused(tensors: dict[str, "TensorPlan"], layer: int) -> bool:
    schemes = [tensors[f"model.layers.{layer}.self_attn.{p}_proj.weight"].scheme for p in "qkv"]
    static = isinstance(schemes[0], Fp8) and schemes[0].activation == "static"
    return schemes[0] == schemes[1] == schemes[2] and not static


def _mlp_fused(tensors: dict[str, "TensorPlan"], pre: str) -> bool:
    gate, up, down = (tensors[f"{pre}.{p}.weight"].scheme for p in EXPERTS)
    return gate == up == down and isinstance(gate, Int) and gate.bits == 4


# ---- checks -----------------------------------------------------------------------------------------------
def mlx_recipe(recipe: Recipe) -> Recipe:
    """The recipe as MLX stores it: FP8 (no per-channel or block e4m3 mode in MLX) becomes mxfp8."""
    rules = tuple(Rule(r.pattern, MxFp8()) if isinstance(r.scheme, Fp8) else r for r in recipe.rules)
    return recipe if rules == recipe.rules else Recipe(recipe.name, rules)


def _check_onnx(spec: Llama4Spec, recipe: Recipe, schemes: dict[str, AnyScheme | None]) -> None:
    """What ONNX Runtime cannot store or run: a quantized router or embedding, a scheme without a kernel, routed
    experts whose gate/up/down disagree (QMoE takes one scheme)."""
    for name, s in schemes.items():
        if s is None:
            continue
        if name.endswith("router.weight"):
            raise CapabilityError(f"recipe {recipe.name}: {name} cannot be quantized for --format onnx (the router "
                                  "chooses experts in float32); add a float rule for it (scheme = \"float\")")
        if name == "model.embed_tokens.weight" and not (isinstance(s, Int) and s.bits in int_bits("onnx", "cpu", True)):
            raise CapabilityError(f"recipe {recipe.name}: {s.name} for {name} has no ONNX Runtime gather kernel; "
                                  "use int4 or int8 (GatherBlockQuantized), or float")
        if isinstance(s, PerExpert) and ".feed_forward.experts." not in name:
            raise CapabilityError(f"recipe {recipe.name}: {name} is not a stack of routed experts; per-expert widths "
                                  "are for routed experts only")
        if not isinstance(s, (Int, Fp8, PerExpert)):
            raise CapabilityError(f"recipe {recipe.name}: {s.name} for {name} has no ONNX Runtime kernel; use int4, int8 or fp8")
    for la in spec.layers:
        if not la.is_moe:
            continue
        pre = f"model.layers.{la.index}.feed_forward.experts"
        gate, up, down = (schemes.get(f"{pre}.{p}") for p in EXPERTS)
        if gate is None and up is None and down is None:
            continue
        if isinstance(gate, PerExpert) or isinstance(down, PerExpert):  # one QMoE node per width: the three agree
            if not gate == up == down:
                raise CapabilityError(f"recipe {recipe.name}: {pre} gate/up/down have per-expert widths that differ; "
                                      "the experts' QMoE nodes need one width per expert for all three")
            continue
        ok = (gate is not None and gate == up and down is not None and type(down) is type(gate)
              and (not isinstance(gate, Int) or (down.bits == gate.bits and down.group_size == gate.group_size))
              and (not isinstance(gate, Fp8) or down.block_size == gate.block_size))
        if not ok:
            raise CapabilityError(
                f"recipe {recipe.name}: {pre} gate/up/down have schemes {[s.name if s else 'float' for s in (gate, up, down)]}; "
                "QMoE needs one scheme for all three (same bits and group/block size)")


# ---- bytes ------------------------------------------------------------------------------------------------
def _int_bytes(shape: tuple[int, ...], s: Int, scale_bytes: int, n_scale_tensors: int, zero_points: bool) -> int:
    numel = int(np.prod(shape, dtype=np.int64))
    rows, groups = numel // shape[-1], shape[-1] // s.group_size
    n = numel * s.bits // 8 + n_scale_tensors * rows * groups * scale_bytes
    return n + (rows * ((groups * s.bits + 7) // 8) if zero_points else 0)


def _fp8_onnx_bytes(name: str, shape: tuple[int, ...], s: Fp8, target: str) -> int:
    numel = int(np.prod(shape, dtype=np.int64))
    rows, cols = numel // shape[-1], shape[-1]
    experts = ".experts." in name
    if not s.block_size:
        scales = rows
    elif target == "cuda" and not experts:
        scales = rows * (cols // s.block_size)  # MatMulBlockQuantizedFp8Weight: b_scale [N, K/b]
    else:
        scales = (rows // s.block_size) * (cols // s.block_size)  # one float32 per square tile
    static = s.activation == "static" and (not experts or name.endswith("gate_proj"))
    return numel + 4 * scales + (4 if static else 0)


def _onnx_bytes(name: str, shape: tuple[int, ...], s: AnyScheme | None, dt: int, target: str, qmoe: bool) -> int:
    """``qmoe``: stored as QMoE weights (routed experts, or an MLP lowered as a one-expert QMoE)."""
    numel = int(np.prod(shape, dtype=np.int64))
    if name.endswith(("router.weight", "norm.weight")) and not is_vision(name):
        return numel * 4
    if s is None:
        return numel * dt
    if isinstance(s, Int):
        scale_bytes = (2 if dt == 4 else dt) if qmoe else dt
        return _int_bytes(shape, s, scale_bytes, 1, not s.symmetric)
    if isinstance(s, PerExpert):  # one QMoE node per width: each expert's own bytes
        return sum(_onnx_bytes(name, shape[1:], e, dt, target, qmoe) for e in s.schemes)
    return _fp8_onnx_bytes(name, shape, s, target)


def _qmoe_stored(tensors: dict[str, TensorPlan], name: str) -> bool:
    if ".experts." in name:
        return True
    pre = name.rsplit(".", 2)[0]  # model.layers.{L}.feed_forward[.shared_expert]
    return name.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight")) and _mlp_fused(tensors, pre)


def _mlx_bytes(shape: tuple[int, ...], s: AnyScheme | None, dt: int) -> int:
    numel = int(np.prod(shape, dtype=np.int64))
    if s is None:
        return numel * dt
    if isinstance(s, Int):
        return _int_bytes(shape, s, dt, 2, False)
    if isinstance(s, PerExpert):
        return sum(_mlx_bytes(shape[1:], e, dt) for e in s.schemes)
    return numel + numel // 32  # mxfp8: e4m3 codes + one e8m0 byte per 32 inputs


# ---- the plan -----------------------------------------------------------------------------------------------
def make_plan(spec: Llama4Spec, fmt: Format, dtype: str, target: str = "cpu", recipe: Recipe | None = None,
              calibrated: bool = False, vision: bool = False) -> ExportPlan:
    """Check the request and plan every tensor. Raises (UsageError, CapabilityError, RecipeError) before any
    weight is read; the returned plan is what every later stage reads. ``vision``: plan the vision tower and
    projector too (their HF names; vision ONNX tensors are stored in the compute dtype, norms and biases included)."""
    check_dtype(fmt, dtype, target)
    target = target if fmt == "onnx" else "any"
    if not 1 <= spec.top_k <= spec.num_experts:
        raise CapabilityError(f"num_experts_per_tok={spec.top_k} is outside 1..num_local_experts={spec.num_experts}; "
                              "fix config.json")
    if vision and spec.vision is None:
        raise UsageError("this checkpoint's config.json has no vision_config; it exports text only")
    shapes = canonical_shapes(spec)
    if vision:
        shapes |= vision_shapes(spec.vision, spec.hidden_size)
    adapted: dict[str, str] = {}
    if recipe is not None and recipe.budget is not None:
        raise UsageError(f"--quant {recipe.name}: a mixed-precision budget is allocated by measuring the weights "
                         "(l4export.mixed.allocate, which convert runs); plan its result")
    if recipe is not None:
        preset = PRESETS.get(recipe.name) is recipe
        recipe, adapted = for_model(recipe, shapes, fmt, target, preset)  # presets fit the model and the target
        recipe.check_target(fmt, target, names=list(shapes), calibrated=calibrated)
        if fmt == "mlx":  # FP8 as MLX stores it (mxfp8: group 32), fitted again
            recipe, more = for_model(mlx_recipe(recipe), shapes, fmt, target, preset)
            adapted |= more
        for name, how in adapted.items():
            log.info("preset %s: %s %s", recipe.name, name, how)
        recipe.validate(shapes)
    schemes = {n: None if recipe is None else recipe.scheme_for(n) for n in shapes}
    if fmt == "onnx" and recipe is not None:
        _check_onnx(spec, recipe, schemes)
    dt = DTYPE_BYTES[dtype]
    tensors = {n: TensorPlan(n, shape, schemes[n], 0) for n, shape in shapes.items()}
    for name, t in tensors.items():
        nbytes = (_onnx_bytes(name, t.shape, t.scheme, dt, target, _qmoe_stored(tensors, name)) if fmt == "onnx"
                  else _mlx_bytes(t.shape, t.scheme, dt))
        tensors[name] = TensorPlan(name, t.shape, t.scheme, nbytes)
    return ExportPlan(spec, fmt, dtype, target, recipe, calibrated, tensors, adapted, attention_form(spec.head_dim))


def tensor_bytes(fmt: Format, name: str, shape: tuple[int, ...], scheme: AnyScheme | None, dtype: str, target: str,
                 qmoe: bool = False) -> int:
    """What make_plan counts for one tensor (``qmoe``: ONNX stores it as QMoE weights: routed experts, or an MLP whose
    gate/up/down are one int4 scheme)."""
    dt = DTYPE_BYTES[dtype]
    return _onnx_bytes(name, shape, scheme, dt, target, qmoe) if fmt == "onnx" else _mlx_bytes(shape, scheme, dt)


__all__ = ["ExportPlan", "TensorPlan", "make_plan", "mlx_recipe", "tensor_bytes"]
