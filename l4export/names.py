"""The one closed table of Llama 4 tensor names.

Canonical names are those of the text-only ``Llama4ForCausalLM`` (``model.layers.3.self_attn.q_proj.weight``),
with one change: routed experts are stacked ``[E, out, in]`` per projection, as mlx-lm's SwitchGLU holds them:

    model.layers.{L}.feed_forward.experts.gate_proj   [E, I, H]
    model.layers.{L}.feed_forward.experts.up_proj     [E, I, H]
    model.layers.{L}.feed_forward.experts.down_proj   [E, H, I]

Every source tensor either maps through a row of ``RULES``, is a vision tensor of ``vision_shapes`` (the vision
tower and projector keep their HF names: they are canonical as they are), or is set aside by ``IGNORED`` (the vision
tensors of a checkpoint whose config has no vision path); anything else is an error. The table maps both ways: ``match`` reads a source name into canonical
tensors, ``source_layout`` writes canonical tensors under HF's names (the demo and benchmark checkpoints,
the reference's weights, mlx-lm's names). Many-to-one layouts are rows, not branches:
  * HF's fused ``experts.gate_up_proj [E, H, 2I]`` (input-major; gate = [..., :I]) gives gate_proj and up_proj;
  * HF's ``experts.down_proj [E, I, H]`` (input-major) is transposed;
  * compressed-tensors FP8 checkpoints store each expert unfused (``experts.{e}.gate_proj.weight [I, H]``
    plus ``.weight_scale [I, 1]``); expert e fills slice e of the stacked tensor.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .errors import MappingError
from .spec import Layout, Llama4Spec, VisionSpec

# Source prefixes of the two layouts, mapped to the text-only prefix.
PREFIXES: tuple[tuple[str, str], ...] = (
    ("language_model.model.", "model."),  # Llama4ForConditionalGeneration (hub releases)
    ("language_model.lm_head.", "lm_head."),
    ("model.", "model."),  # Llama4ForCausalLM
    ("lm_head.", "lm_head."),
)

# The early-fusion vision tower and its projector: mapped by vision_shapes when the config has a vision path,
# set aside otherwise (and by text-only exports).
VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")
IGNORED = re.compile(r"^(vision_model\.|multi_modal_projector\.)")

# Siblings of an FP8 weight (compressed-tensors): consumed with the weight they belong to.
SCALE_SUFFIXES = (".weight_scale", ".input_scale")

Op = Literal["copy", "gate_of_fused", "up_of_fused", "transpose_experts", "expert_slice"]
LayerKind = Literal["global", "any", "moe", "dense"]


@dataclass(frozen=True)
class Rule:
    source: str  # with {L} (layer) and {e} (expert) holes
    canonical: str  # with {L}
    op: Op
    layer: LayerKind
    why: str = ""


_FF = "model.layers.{L}.feed_forward"
RULES: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", "model.embed_tokens.weight", "copy", "global"),
    Rule("model.norm.weight", "model.norm.weight", "copy", "global"),
    Rule("lm_head.weight", "lm_head.weight", "copy", "global"),
    Rule("model.layers.{L}.input_layernorm.weight", "model.layers.{L}.input_layernorm.weight", "copy", "any"),
    Rule("model.layers.{L}.post_attention_layernorm.weight", "model.layers.{L}.post_attention_layernorm.weight", "copy", "any"),
    *(
        Rule(f"model.layers.{{L}}.self_attn.{p}_proj.weight", f"model.layers.{{L}}.self_attn.{p}_proj.weight", "copy", "any")
        for p in "qkvo"
    ),
    Rule(f"{_FF}.router.weight", f"{_FF}.router.weight", "copy", "moe"),
    *(
        Rule(f"{_FF}.shared_expert.{p}_proj.weight", f"{_FF}.shared_expert.{p}_proj.weight", "copy", "moe")
        for p in ("gate", "up", "down")
    ),
    *(Rule(f"{_FF}.{p}_proj.weight", f"{_FF}.{p}_proj.weight", "copy", "dense") for p in ("gate", "up", "down")),
    # HF fused experts: raw Parameters, no .weight suffix, input-major.
    Rule(f"{_FF}.experts.gate_up_proj", f"{_FF}.experts.gate_proj", "gate_of_fused", "moe", "HF [E,H,2I]; gate=[...,:I]"),
    Rule(f"{_FF}.experts.gate_up_proj", f"{_FF}.experts.up_proj", "up_of_fused", "moe", "HF [E,H,2I]; up=[...,I:]"),
    Rule(f"{_FF}.experts.down_proj", f"{_FF}.experts.down_proj", "transpose_experts", "moe", "HF [E,I,H]"),
    # compressed-tensors FP8 (Maverick-FP8): one Linear per expert, output-major.
    *(
        Rule(f"{_FF}.experts.{{e}}.{p}_proj.weight", f"{_FF}.experts.{p}_proj", "expert_slice", "moe", "per-expert FP8")
        for p in ("gate", "up", "down")
    ),
)


def _compile(pattern: str) -> re.Pattern[str]:
    rx = re.escape(pattern).replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(rx + "$")


_COMPILED = tuple((_compile(r.source), r) for r in RULES)


def normalise_prefix(name: str) -> str | None:
    """Map a source name of either layout to the text-only prefix; None if it has neither."""
    for src, dst in PREFIXES:
        if name.startswith(src):
            return dst + name[len(src) :]
    return None


@dataclass(frozen=True)
class Match:
    canonical: str
    op: Op
    expert: int | None


def match(name: str, spec: Llama4Spec) -> list[Match] | None:
    """The canonical tensors a (prefix-normalised) source name feeds; None if the table has no row for it."""
    hits: list[Match] = []
    for rx, rule in _COMPILED:
        m = rx.match(name)
        if not m:
            continue
        layer = int(m.group("L")) if "L" in rx.groupindex else None
        if layer is not None:
            if layer >= spec.num_layers:
                return None
            is_moe = spec.layers[layer].is_moe
            if (rule.layer == "moe" and not is_moe) or (rule.layer == "dense" and is_moe):
                return None
        expert = int(m.group("e")) if "e" in rx.groupindex else None
        if expert is not None and expert >= spec.num_experts:
            return None
        hits.append(Match(rule.canonical.replace("{L}", str(layer)), rule.op, expert))
    return hits or None


def canonical_shapes(spec: Llama4Spec) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor of the text model, in model order, with its shape."""
    h, v, e, i, im = spec.hidden_size, spec.vocab_size, spec.num_experts, spec.intermediate_size, spec.intermediate_size_mlp
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in spec.layers:
        p = f"model.layers.{layer.index}"
        out[f"{p}.input_layernorm.weight"] = (h,)
        out[f"{p}.self_attn.q_proj.weight"] = (spec.q_size, h)
        out[f"{p}.self_attn.k_proj.weight"] = (spec.kv_size, h)
        out[f"{p}.self_attn.v_proj.weight"] = (spec.kv_size, h)
        out[f"{p}.self_attn.o_proj.weight"] = (h, spec.q_size)
        out[f"{p}.post_attention_layernorm.weight"] = (h,)
        ff = f"{p}.feed_forward"
        if layer.is_moe:
            out[f"{ff}.router.weight"] = (e, h)
            out[f"{ff}.experts.gate_proj"] = (e, i, h)
            out[f"{ff}.experts.up_proj"] = (e, i, h)
            out[f"{ff}.experts.down_proj"] = (e, h, i)
            out[f"{ff}.shared_expert.gate_proj.weight"] = (i, h)
            out[f"{ff}.shared_expert.up_proj.weight"] = (i, h)
            out[f"{ff}.shared_expert.down_proj.weight"] = (h, i)
        else:
            out[f"{ff}.gate_proj.weight"] = (im, h)
            out[f"{ff}.up_proj.weight"] = (im, h)
            out[f"{ff}.down_proj.weight"] = (h, im)
    out["model.norm.weight"] = (h,)
    if not spec.tie_word_embeddings:
        out["lm_head.weight"] = (v, h)
    return out


def vision_shapes(vs: VisionSpec, text_hidden: int) -> dict[str, tuple[int, ...]]:
    """Every vision tensor (HF names, which are canonical), in model order, with its shape. Scout: 554 tensors,
    0.87 B parameters. The patch embedding is an unfold + linear: [hidden, C*p*p] with inputs in (C, ph, pw) order."""
    h, i, p = vs.hidden_size, vs.intermediate_size, vs.patch_size
    v = "vision_model"
    out: dict[str, tuple[int, ...]] = {
        f"{v}.patch_embedding.linear.weight": (h, vs.num_channels * p * p),
        f"{v}.class_embedding": (h,),
        f"{v}.positional_embedding_vlm": (vs.patches_per_side**2 + 1, h),
        f"{v}.layernorm_pre.weight": (h,),
        f"{v}.layernorm_pre.bias": (h,),
    }
    for n in range(vs.num_layers):
        pre = f"{v}.model.layers.{n}"
        for proj in "qkvo":
            out[f"{pre}.self_attn.{proj}_proj.weight"] = (h, h)
            out[f"{pre}.self_attn.{proj}_proj.bias"] = (h,)
        out[f"{pre}.mlp.fc1.weight"], out[f"{pre}.mlp.fc1.bias"] = (i, h), (i,)
        out[f"{pre}.mlp.fc2.weight"], out[f"{pre}.mlp.fc2.bias"] = (h, i), (h,)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"{pre}.{norm}.weight"], out[f"{pre}.{norm}.bias"] = (h,), (h,)
    out[f"{v}.layernorm_post.weight"], out[f"{v}.layernorm_post.bias"] = (h,), (h,)
    out[f"{v}.vision_adapter.mlp.fc1.weight"] = (vs.projector_input_dim, i)
    out[f"{v}.vision_adapter.mlp.fc2.weight"] = (vs.projector_output_dim, vs.projector_input_dim)
    out["multi_modal_projector.linear_1.weight"] = (text_hidden, vs.vision_output_dim)
    return out


def is_vision(name: str) -> bool:
    return name.startswith(VISION_PREFIXES)


def is_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    """A weight that multiplies activations (what a quantization rule may hit): every 2-D/3-D text tensor but the
    norms; of the vision tensors, the projections (the positional embedding is 2-D but is added, not multiplied)."""
    if len(shape) not in (2, 3) or name.endswith("norm.weight"):
        return False
    return not is_vision(name) or name.endswith(".weight")


def _fused(parts: list[np.ndarray]) -> np.ndarray:  # canonical gate, up [E, I, H] -> HF gate_up_proj [E, H, 2I]
    gate, up = parts
    return np.concatenate([gate.transpose(0, 2, 1), up.transpose(0, 2, 1)], axis=-1)


@dataclass(frozen=True)
class LayoutOp:
    """How a source tensor holds a canonical one: the source's shape, which of a stored row's columns are the
    canonical tensor's (``columns(row block, half)``, for ops that read input-major rows), and the source array made
    from the canonical ones (``assemble``, for writing checkpoints; None where one source holds one expert)."""

    source_shape: Callable[[tuple[int, ...]], tuple[int, ...]]
    columns: Callable[[np.ndarray, int], np.ndarray] | None
    assemble: Callable[[list[np.ndarray]], np.ndarray] | None


# The layout ops, one row each (``Rule.op``): canonical experts are [E, out, in]; HF stores some input-major.
OPS: dict[str, LayoutOp] = {
    "copy": LayoutOp(lambda s: s, None, lambda parts: parts[0]),
    "gate_of_fused": LayoutOp(lambda s: (s[0], s[2], 2 * s[1]), lambda w, half: w[:, :half], _fused),  # <- [E, H, 2I]
    "up_of_fused": LayoutOp(lambda s: (s[0], s[2], 2 * s[1]), lambda w, half: w[:, half:], _fused),
    "transpose_experts": LayoutOp(lambda s: (s[0], s[2], s[1]), lambda w, half: w,  # canonical [E, H, I] <- [E, I, H]
                                  lambda parts: parts[0].transpose(0, 2, 1)),
    "expert_slice": LayoutOp(lambda s: s[1:], None, None),  # canonical [E, out, in] <- one [out, in] per expert
}


def source_shape(op: Op, canonical_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a source tensor must have to feed a canonical tensor through ``op``."""
    return OPS[op].source_shape(tuple(canonical_shape))


# ---- canonical -> source ------------------------------------------------------------------------------------
def source_name(canonical: str, layout: Layout = "multimodal") -> str:
    """The prefix of ``layout`` on a canonical name (``model.norm.weight`` -> ``language_model.model.norm.weight``)."""
    for src, dst in PREFIXES:
        if canonical.startswith(dst) and (layout == "text") == (src == dst):
            return src + canonical[len(dst):]
    raise MappingError(f"{canonical!r} is not a canonical Llama 4 tensor name")


def _reverse_rule(canonical: str) -> tuple[str, Op]:
    """The HF-layout source name (layer filled in) and op of a canonical name: the first non-FP8 row that fits."""
    for rule in RULES:
        if rule.op == "expert_slice":
            continue
        rx = re.escape(rule.canonical).replace(r"\{L\}", r"(?P<L>\d+)") + "$"
        m = re.match(rx, canonical)
        if m:
            return (rule.source.replace("{L}", m.group("L")) if "L" in m.groupdict() else rule.source), rule.op
    raise MappingError(f"{canonical!r} is not a canonical Llama 4 tensor name")


def source_layout(spec: Llama4Spec, layout: Layout = "multimodal") -> dict[str, tuple[tuple[int, ...], tuple[str, ...], Op]]:
    """How HF stores the canonical tensors: source name -> (source shape, the canonical names it holds, op).
    Fused experts hold two canonical tensors (gate, up); ``assemble`` builds the source array from them."""
    out: dict[str, tuple[tuple[int, ...], tuple[str, ...], Op]] = {}
    for name, shape in canonical_shapes(spec).items():
        src, op = _reverse_rule(name)
        src = source_name(src, layout)
        held = out[src][1] if src in out else ()
        out[src] = (source_shape(op, shape), held + (name,), op)
    return out


def assemble(op: Op, parts: list[np.ndarray]) -> np.ndarray:
    """The source array of one ``source_layout`` entry from its canonical arrays (in the entry's order)."""
    make = OPS[op].assemble
    if make is None:
        raise MappingError(f"op {op!r} has no single source array")
    return make(parts)


COMPONENTS = ("routed experts", "shared expert", "attention", "dense mlp", "router", "norms", "embeddings", "lm_head",
              "vision")


def component(name: str) -> str:
    """Which part of the model a canonical tensor belongs to (the labels of sizes and ``quant_report.json``)."""
    if is_vision(name):
        return "vision"
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


