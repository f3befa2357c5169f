"""MLX export: the folder layout mlx-lm's ``llama4`` model reads, written tensor by tensor.

mlx-lm (``mlx_lm/models/llama4.py``) reads Llama 4 only in the multimodal layout, so both input layouts
(``Llama4ForConditionalGeneration`` and the text-only ``Llama4ForCausalLM``) are written as::

    config.json                      model_type "llama4" + text_config (+ vision_config, image token ids)
    model.safetensors                or model-0000i-of-0000n.safetensors + model.safetensors.index.json
        language_model.model.embed_tokens.weight                           [V, H]
        language_model.model.layers.{L}.self_attn.{q,k,v,o}_proj.weight    [out, in]
        language_model.model.layers.{L}.feed_forward.router.weight         [E, H]
        language_model.model.layers.{L}.feed_forward.experts.gate_proj.weight   [E, I, H]  (SwitchGLU: [E, out, in])
        language_model.model.layers.{L}.feed_forward.experts.up_proj.weight     [E, I, H]
        language_model.model.layers.{L}.feed_forward.experts.down_proj.weight   [E, H, I]
        language_model.model.layers.{L}.feed_forward.shared_expert.{gate,up,down}_proj.weight
        language_model.model.layers.{L}.feed_forward.{gate,up,down}_proj.weight  (dense layers)
        language_model.model.norm.weight, language_model.lm_head.weight
        vision_model.*, multi_modal_projector.linear_1.weight   HF's names, as mlx-vlm's llama4 reads them
                                                                 (left out with --text-only)
    tokenizer files (copied by convert.py), l4export.json

With ``--quant``, each quantized module holds ``.weight`` (uint32 packed), ``.scales`` [and ``.biases``] instead
(mlx-lm's QuantizedLinear / QuantizedSwitchLinear, per-expert scales), FP8 rules become mxfp8, and config.json gets
``"quantization"`` (+ a ``"quantization_config"`` copy) with explicit per-path entries (``false`` for float modules).
With ``--calib``, GPTQ tensors and ``quant_report.json`` + PNGs (docs/quantization.md).

``text_config`` carries both what mlx-lm requires (top-level ``rope_theta`` and ``rope_scaling``, which
transformers-5 configs lack; mlx-lm raises TypeError without them) and the per-layer lists our MLX runtime
reads through ``Llama4Spec`` (``no_rope_layers``, ``moe_layers``, ``layer_types``), written from the spec so
no reader has to re-derive them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from ..checkpoint import Checkpoint, LazyTensor
from ..names import is_linear_weight, is_vision, source_name
from ..outputs import PendingTensor, write_sharded
from ..plan import ExportPlan
from ..quant.ahead import quant_runs, rtn
from ..quant.pack import mlx_config_entry, to_mlx
from ..quant.schemes import Fp8, Int, PerExpert, QTensor
from ..quant.stream import Run, Streamed, member_runs
from ..spec import Llama4Spec

log = logging.getLogger(__name__)

NP_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}


def mlx_name(canonical: str) -> str:
    """Canonical tensor name -> the name mlx-lm's llama4 Model holds: HF's multimodal name, except that SwitchGLU's
    stacked experts ([E, out, in], as canonical) are modules and gain ``.weight``. Vision tensors keep HF's names."""
    if is_vision(canonical):
        return canonical
    name = source_name(canonical, "multimodal")
    if ".feed_forward.experts." in canonical:
        name += ".weight"
    return name


def mlx_text_config(spec: Llama4Spec, dtype: str) -> dict[str, Any]:
    """The text_config written into the export: the source's keys, made explicit where readers differ."""
    cfg = spec.text_config()
    cfg.pop("rope_parameters", None)  # replaced by the hub-style pair below, which mlx-lm requires
    rs = spec.rope_scaling
    cfg.update(
        model_type="llama4_text",
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        intermediate_size_mlp=spec.intermediate_size_mlp,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        num_local_experts=spec.num_experts,
        num_experts_per_tok=spec.top_k,
        rms_norm_eps=spec.rms_norm_eps,
        rope_theta=spec.rope_theta,
        rope_scaling=None
        if rs is None
        else {
            "rope_type": "llama3",
            "factor": rs.factor,
            "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
        },
        attention_chunk_size=spec.attention_chunk_size,
        attention_bias=False,
        use_qk_norm=spec.use_qk_norm,
        max_position_embeddings=spec.max_position_embeddings,
        # mlx-lm reads interleave_moe_layer_step; our runtime reads moe_layers (the spec's, exact).
        interleave_moe_layer_step=int(cfg.get("interleave_moe_layer_step") or 1),
        moe_layers=list(spec.moe_layers),
        # IMPORTANT: no_rope_layers[i] == 1 means layer i USES RoPE (transformers' inverted name).
        no_rope_layers=[int(la.uses_rope) for la in spec.layers],
        layer_types=["chunked_attention" if la.chunked else "full_attention" for la in spec.layers],
        attn_temperature_tuning=spec.attn_temperature_tuning,
        # transformers' config validation wants an int here (8192, not 8192.0)
        floor_scale=int(spec.floor_scale) if float(spec.floor_scale).is_integer() else spec.floor_scale,
        attn_scale=spec.attn_scale,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=spec.bos_token_id,
        eos_token_id=list(spec.eos_token_ids),
        pad_token_id=spec.pad_token_id,
        torch_dtype=dtype,
    )
    cfg.pop("dtype", None)
    cfg.pop("quantization_config", None)  # FP8 sources are dequantized on the way out
    return cfg


def mlx_config(spec: Llama4Spec, dtype: str, vision: bool = False) -> dict[str, Any]:
    """config.json of the export: mlx-lm's ``llama4`` (multimodal) layout; with ``vision``, the source's
    vision_config and image token ids too (mlx-vlm's llama4 reads them)."""
    text = mlx_text_config(spec, dtype)
    extra: dict[str, Any] = {}
    if vision:
        vc = dict(spec.config["vision_config"])
        vc.pop("dtype", None)
        # keys mlx-vlm's VisionConfig requires that transformers-5 configs may lack (rope_theta is in rope_parameters)
        for key, value in (("model_type", "llama4_vision_model"), ("rope_theta", spec.vision.rope_theta),
                           ("norm_eps", spec.vision.norm_eps), ("num_channels", spec.vision.num_channels),
                           ("initializer_range", 0.02), ("projector_dropout", 0.0), ("vision_feature_layer", -1),
                           ("vision_feature_select_strategy", "default")):
            vc.setdefault(key, value)
        extra = {"vision_config": vc, "image_token_index": spec.vision.image_token_id,
                 "boi_token_index": spec.vision.boi_token_id, "eoi_token_index": spec.vision.eoi_token_id}
    return {
        "architectures": ["Llama4ForConditionalGeneration"],
        "model_type": "llama4",  # NOT llama4_text: mlx-lm maps that to a dense model
        "text_config": text,
        "torch_dtype": dtype,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": list(spec.eos_token_ids),
        "pad_token_id": spec.pad_token_id,
        **extra,
    }


def mlx_lm_differences(spec: Llama4Spec) -> list[str]:
    """Where mlx-lm's llama4 model (which hard-codes some per-layer facts) cannot run this config as transformers
    does; our MLX runtime follows the config in every case. Logged as warnings and recorded in l4export.json."""
    out = []
    step = int(spec.text_config().get("interleave_moe_layer_step") or 1)
    if any(la.is_moe != (la.index % step == step - 1) for la in spec.layers):
        out.append(f"moe_layers {list(spec.moe_layers)} do not follow interleave_moe_layer_step={step}: mlx-lm will not "
                   "load this export")
    if any(la.uses_rope != ((la.index + 1) % 4 != 0) for la in spec.layers):
        out.append(f"NoPE layers {list(spec.nope_layers)} differ from mlx-lm's hard-coded (i+1)%4: mlx-lm computes "
                   "this model differently")
    if spec.top_k != 1:
        out.append(f"num_experts_per_tok={spec.top_k}: mlx-lm's llama4 asserts top-1 routing and will not load it")
    return out


def _pending(t: LazyTensor, dtype: np.dtype) -> PendingTensor:
    def load() -> Iterator[np.ndarray]:
        for arr in t.slices(None):  # source dtype (FP8 arrives dequantized as float32), a slice at a time
            yield arr if arr.dtype == dtype else arr.astype(dtype)

    return PendingTensor(mlx_name(t.name), tuple(t.shape), dtype, load)


def mlx_module(canonical: str) -> str:
    """Canonical tensor name -> the mlx-lm module path that holds it (the key of config "quantization")."""
    name = mlx_name(canonical)
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _entries(name: str, s: Any) -> dict[str, Any]:
    """A module's "quantization" entries; per-expert widths: one sub-module per width (``{module}.int{bits}``, the
    stack of that width's experts), and on the module itself each expert's bits (l4export's runtime reads them)."""
    module = mlx_module(name)
    if not isinstance(s, PerExpert):
        return {module: mlx_config_entry(s)}
    out = {f"{module}.int{w.bits}": mlx_config_entry(w) for w, _ in s.widths()}
    return {**out, module: {"group_size": s.group_size, "bits": s.bits, "mode": "affine",
                            "per_expert_bits": [e.bits for e in s.schemes]}}


def quantization_config(shapes: dict[str, tuple[int, ...]], plan: dict[str, Any]) -> dict[str, Any]:
    """config.json "quantization": the most common entry as the global default, then one explicit entry per
    module path: the quantized ones, and ``false`` for every other linear/embedding (router, norms excluded)."""
    entries = {k: v for n, s in plan.items() for k, v in _entries(n, s).items()}
    counts: dict[str, int] = {}
    for e in entries.values():
        counts[json.dumps(e, sort_keys=True)] = counts.get(json.dumps(e, sort_keys=True), 0) + 1
    cfg: dict[str, Any] = dict(json.loads(max(counts, key=counts.get)))
    for n, shape in shapes.items():
        if not is_linear_weight(n, shape):
            continue
        cfg[mlx_module(n)] = entries.get(mlx_module(n), False)
    return {**cfg, **{k: v for k, v in entries.items() if k not in cfg}}  # (per-width sub-modules)


def _quantized_pending(t: LazyTensor, scheme: Any, dtype: np.dtype, calibrated: Callable[[], QTensor] | None,
                       experts: tuple[int, ...] | None = None, suffix: str = "") -> list[PendingTensor]:
    """``.weight`` (uint32), ``.scales`` [, ``.biases``] of one quantized module, quantized a run of rows (experts)
    at a time as ``.weight`` is written (quant/stream.py). ``calibrated``: the made tensor, looked up per run (a
    spilled store maps it afresh, so a run's pages leave the resident set with it). ``experts``: only these experts
    of the stack, as the module ``{module}{suffix}`` (a width's stack of per-expert widths)."""

    def make(run: Run) -> dict[str, np.ndarray]:
        arrays = to_mlx(calibrated().lead(*run) if calibrated is not None else rtn(t, scheme, run))
        for k in ("scales", "biases"):  # affine scales/biases in the model dtype (as mlx-lm writes them)
            if k in arrays and arrays[k].dtype == np.float32:
                arrays[k] = arrays[k].astype(dtype)
        return arrays

    runs = quant_runs(t, scheme)
    if experts is not None:
        runs = [r for a, b in runs for r in member_runs(experts, a, b)]
    layout = Streamed(runs, make, "weight")

    def part(key: str):
        return layout.chunks if key == "weight" else lambda: layout.part(key)

    module = mlx_module(t.name) + suffix
    shape = tuple(t.shape) if experts is None else (len(experts),) + tuple(t.shape[1:])
    g = scheme.group_for(shape[-1])
    lead = shape[:-1]
    if isinstance(scheme, Int):
        specs = [("weight", lead + (shape[-1] * scheme.bits // 32,), np.dtype(np.uint32)),
                 ("scales", lead + (shape[-1] // g,), dtype), ("biases", lead + (shape[-1] // g,), dtype)]
    else:  # MxFp8
        specs = [("weight", lead + (shape[-1] // 4,), np.dtype(np.uint32)),
                 ("scales", lead + (shape[-1] // g,), np.dtype(np.uint8))]
    return [PendingTensor(f"{module}.{k}", s, d, part(k)) for k, s, d in specs]


def _per_width_pending(t: LazyTensor, scheme: PerExpert, dtype: np.dtype,
                       calibrated: Callable[[], QTensor] | None) -> list[PendingTensor]:
    """Per-expert widths: each width's experts as a stack of their own, ``{module}.int{bits}`` (its uint32 codes
    have their own row width)."""
    return [p for w, experts in scheme.widths()
            for p in _quantized_pending(t, w, dtype, calibrated, experts, f".int{w.bits}")]


def export_mlx(ckpt: Checkpoint, out: Path, plan: ExportPlan, options: Any, calib: Any = None,
               ready: Any = None) -> dict[str, Any]:
    """Write the MLX export of ``ckpt`` into ``out`` (already the temporary folder). Returns l4export.json's "mlx" section.
    ``calib``: convert's calibration result (GPTQ tensors), or None for round to nearest; ``ready``: quantized
    tensors made ahead of the writer (--ray), the calibrated ones included."""
    spec = ckpt.spec
    dtype = NP_DTYPES[plan.dtype]
    differences = mlx_lm_differences(spec)
    if any(isinstance(s, PerExpert) for s in plan.quantized.values()):
        differences.append("per-expert widths: mlx-lm's SwitchGLU reads one width per projection per layer and will "
                           "not load this export")
    for why in differences:
        log.warning("%s (the l4export MLX runtime runs it as transformers does)", why)
    tensors = list(ckpt) + (list(ckpt.vision.values()) if plan.vision else [])
    shapes = {t.name: tuple(t.shape) for t in tensors}
    config = mlx_config(spec, plan.dtype, plan.vision)
    quantized = plan.quantized
    made: Mapping[str, QTensor] = {}
    extra: dict[str, Any] = {"mlx_lm": {"runs_as_transformers": not differences, "differences": differences}}
    if plan.recipe is not None:
        if any(isinstance(r.scheme, Fp8) for r in options.quant.rules):
            log.info("recipe %s: MLX has no per-channel e4m3 FP8; FP8 rules are written as mxfp8 (e4m3, power-of-two "
                     "scale per 32 inputs), re-quantized from the float weights", plan.recipe.name)
        made = ready if ready is not None else calib.tensors if calib is not None else {}
        if quantized:
            qcfg = quantization_config(shapes, quantized)
            config["quantization"] = qcfg
            config["quantization_config"] = dict(qcfg)
        else:  # no group size MLX reads divides any tensor (plan.adapted says why): a float export, no config entry
            log.warning("recipe %s quantizes no tensor of this model (no MLX group size fits its widths); the export "
                        "is float", plan.recipe.name)
        log.info("MLX quantized export: %d tensors quantized (%s), %s", len(quantized),
                 ", ".join(sorted({s.name for s in quantized.values()})), "GPTQ-calibrated" if calib is not None else "round to nearest")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    pending: list[PendingTensor] = []
    for t in tensors:
        if t.name in quantized:
            lookup = (lambda n=t.name: made[n]) if t.name in made else None
            scheme = quantized[t.name]
            make = _per_width_pending if isinstance(scheme, PerExpert) else _quantized_pending
            pending += make(t, scheme, dtype, lookup)
        else:
            pending.append(_pending(t, dtype))
    done = 0

    def progress(name: str) -> None:
        nonlocal done
        done += 1
        log.debug("wrote %s (%d/%d)", name, done, len(pending))

    shards = write_sharded(out, pending, options.max_shard_bytes, metadata={"format": "mlx"}, on_tensor=progress)
    log.info("MLX export: %d tensors in %d shard(s), %s", len(pending), len(shards), plan.dtype)
    if plan.dtype != "float32":
        log.info("note: mlx on a CPU runs Llama 4's expert matmuls (GatherMM) in float32 only; "
                 "the MLX runtime upcasts there, Metal runs %s as stored", plan.dtype)
    return {"shards": [p.name for p in shards], "ignored_source_tensors": len(ckpt.ignored), **extra}
