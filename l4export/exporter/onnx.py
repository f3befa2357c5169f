"""ONNX export of the Llama 4 text decoder (MoE, chunked attention, NoPE layers) with a KV cache.

The graph mirrors transformers' ``modeling_llama4.py`` layer by layer (``Llama4TextModel.forward`` ->
``Llama4TextDecoderLayer`` -> ``Llama4TextAttention`` / ``Llama4TextMoe`` / ``Llama4TextMLP``). Shapes in the
comments use B batch, S new tokens, P_i layer i's past length, L_i = P_i + S its key length, T total length
(attention_mask's width), H hidden, D head_dim, Hq/Hkv heads, G = Hq/Hkv, E experts, I expert width, V vocab.

I/O (optimum / onnxruntime-genai names)::

    input_ids                 int64 [B, S]
    attention_mask            int64 [B, T]            T = tokens seen so far + S
    position_ids              int64 [B, S]            RoPE positions
    past_key_values.{i}.key   dt    [B, Hkv, P_i, D]  P_i = 0 starts a sequence
    past_key_values.{i}.value dt    [B, Hkv, P_i, D]
    -> logits                 fp32  [B, S, V]
    -> present.{i}.key/value  dt    [B, Hkv, P_i + S, D]

Why each layer reads its own past length: our runtime keeps only the current chunk in a chunked layer's cache
(memory bounded by attention_chunk_size) while global layers keep everything, and onnxruntime-genai keeps
everything everywhere. Layer i's keys sit at absolute positions (T - L_i) .. T-1, so one graph serves both.

Weights are lazy initializers: ``ir.save`` reads each one from the checkpoint when its bytes are due and
drops it after, so the model never sits whole in memory. Linear weights are stored transposed ``[in, out]``
under their checkpoint names (MatMul layout).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from ..checkpoint import Checkpoint, LazyTensor
from ..spec import LayerSpec, Llama4Spec
from . import onnx_contrib, onnx_quant
from .onnx_graph import GraphBuilder

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
NP_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
FP32 = ir.DataType.FLOAT
NEG = -3.0e38  # additive mask; finite so a fully masked (padding) row gives a uniform softmax, not NaN


class DecoderBuilder:
    """Emits the decoder graph for one checkpoint and compute dtype."""

    def __init__(self, ckpt: Checkpoint, dtype: str, target: str = "cpu", recipe: Any = None,
                 calibrated: dict[str, Any] | None = None, act_scales: dict[str, Any] | None = None):
        self.ckpt = ckpt
        self.spec: Llama4Spec = ckpt.spec
        self.np_dtype = NP_DTYPES[dtype]
        self.dt = ir.DataType.from_numpy(self.np_dtype)
        self.target = target
        self.g = GraphBuilder(opset=21)
        # Quantized lowering (onnx_quant.py) only when a recipe is given; the float graph is unchanged otherwise.
        self.quant = None if recipe is None else onnx_quant.QuantLowering(self, recipe, calibrated, act_scales)

    # ---- small helpers -----------------------------------------------------------------------------
    def i64(self, *values: int) -> ir.Value:
        return self.g.const(np.array(values, dtype=np.int64))

    def f32(self, value: float) -> ir.Value:
        return self.g.const(np.array(value, dtype=np.float32))

    def to(self, x: ir.Value, dtype: ir.DataType) -> ir.Value:
        """Cast to ``dtype``. The float32 graph has no casts; in others a redundant Cast is harmless."""
        if dtype == self.dt == FP32 or (x.type is not None and x.type.dtype == dtype):
            return x
        y = self.g.op("Cast", x, to=dtype)
        y.type = ir.TensorType(dtype)
        return y

    def linear(self, x: ir.Value, name: str) -> ir.Value:
        """x [..., in] @ W^T -> [..., out]; W stored transposed [in, out] under its checkpoint name."""
        if self.quant is not None and (scheme := self.quant.scheme(name)) is not None:
            with self.g.scope(name.rsplit(".", 2)[-2]):
                return self.quant.linear(x, name, scheme)
        t = self.ckpt[name]
        out_f, in_f = t.shape
        w = self.g.weight(name, (in_f, out_f), self.np_dtype, lambda: np.ascontiguousarray(t.load(self.np_dtype).T))
        with self.g.scope(name.rsplit(".", 2)[-2]):
            return self.g.op("MatMul", x, w)

    def rms(self, x: ir.Value, eps: float) -> ir.Value:
        """Weightless RMS over the last axis, in fp32 (as HF: ``x.float() * rsqrt(mean(x^2) + eps)``)."""
        g = self.g
        xf = self.to(x, FP32)
        ms = g.op("ReduceMean", g.op("Mul", xf, xf), self.i64(-1), keepdims=1)
        return g.op("Mul", xf, g.op("Reciprocal", g.op("Sqrt", g.op("Add", ms, self.f32(eps)))))

    def rms_norm(self, x: ir.Value, name: str) -> ir.Value:
        """Llama4TextRMSNorm: ``(x.float() * rsqrt(mean(x^2)+eps)).type_as(x) * weight``, returned in fp32.

        The residual stream stays fp32 in every graph (only matmul inputs and the KV cache use the compute
        dtype): with 128 experts the top-1 router margin can be ~1e-4, and fp16 residual rounding flips it.
        """
        t = self.ckpt[name]
        w = self.g.weight(name, tuple(t.shape), self.np_dtype, lambda: t.load(self.np_dtype))
        with self.g.scope(name.rsplit(".", 1)[0].rsplit(".", 1)[-1]):
            y = self.g.op("Mul", self.rms(x, self.spec.rms_norm_eps), self.to(w, FP32))
            y.type = ir.TensorType(FP32)
            return y

    # ---- shared per-call values ------------------------------------------------------------------------
    def positions(self, input_ids: ir.Value, attention_mask: ir.Value, position_ids: ir.Value) -> None:
        """RoPE cos/sin and the query positions, computed once for all layers.

        freqs = position_ids x inv_freq in fp32 (as Llama4TextRotaryEmbedding); cos/sin [B, S, 1, D/2].
        q_pos = (T - S) + arange(S): the absolute cache position, which temperature tuning and masks use.
        """
        g = self.g
        with g.scope("rotary_emb"):
            inv = g.const(self.spec.inv_freq().reshape(1, 1, -1))  # [1, 1, D/2]
            pos = g.op("Unsqueeze", g.op("Cast", position_ids, to=FP32), self.i64(-1))  # [B, S, 1]
            freqs = g.op("Unsqueeze", g.op("Mul", pos, inv), self.i64(2))  # [B, S, 1, D/2]
            self.cos, self.sin = g.op("Cos", freqs), g.op("Sin", freqs)
        with g.scope("positions"):
            self.total = g.op("Gather", g.op("Shape", attention_mask), self.i64(1), axis=0)  # [1] = T
            self.seq = g.op("Gather", g.op("Shape", input_ids), self.i64(1), axis=0)  # [1] = S
            start = g.op("Sub", self.total, self.seq)
            steps = g.op("Range", g.const(np.int64(0)), g.op("Squeeze", self.seq, self.i64(0)), g.const(np.int64(1)))
            self.q_pos = g.op("Add", steps, start)  # [S] int64
            self.attention_mask = attention_mask

    # ---- attention -----------------------------------------------------------------------------------------
    def rope(self, x: ir.Value) -> ir.Value:
        """Interleaved ("traditional") RoPE on [B, S, heads, D] in fp32: rotates pairs (2i, 2i+1).

        Llama 4 uses complex RoPE (view_as_complex over adjacent pairs), not neox rotate_half; written with
        real cos/sin so it exports (complex does not: pytorch#150891).
        """
        g, d = self.g, self.spec.head_dim
        xf = self.to(x, FP32)
        pairs = g.op("Reshape", xf, self.i64(0, 0, 0, d // 2, 2))  # [B, S, h, D/2, 2]
        x0 = g.op("Squeeze", g.op("Slice", pairs, self.i64(0), self.i64(1), self.i64(-1)), self.i64(-1))
        x1 = g.op("Squeeze", g.op("Slice", pairs, self.i64(1), self.i64(2), self.i64(-1)), self.i64(-1))
        r0 = g.op("Sub", g.op("Mul", x0, self.cos), g.op("Mul", x1, self.sin))  # [B, S, h, D/2]
        r1 = g.op("Add", g.op("Mul", x0, self.sin), g.op("Mul", x1, self.cos))
        both = g.op("Concat", g.op("Unsqueeze", r0, self.i64(-1)), g.op("Unsqueeze", r1, self.i64(-1)), axis=-1)
        return g.op("Reshape", both, self.i64(0, 0, 0, d))  # [B, S, h, D] fp32

    def key_mask(self, layer: LayerSpec, past_len: ir.Value) -> ir.Value:
        """Additive mask [B, 1, 1, S, L_i] in fp32 for this layer's keys.

            k_pos = (T - L_i) + arange(L_i)            absolute positions of this layer's keys
            allow = k_pos <= q_pos                     causal
                  & k_pos // C == q_pos // C           chunked layers only (aligned to absolute 0, C, 2C, ...)
                  & attention_mask[:, T - L_i:]        padding
        """
        g, C = self.g, self.spec.attention_chunk_size
        klen = g.op("Add", past_len, self.seq)  # [1] = L_i
        kstart = g.op("Sub", self.total, klen)
        k_pos = g.op("Add", g.op("Range", g.const(np.int64(0)), g.op("Squeeze", klen, self.i64(0)), g.const(np.int64(1))),
                     kstart)  # [L]
        q_col = g.op("Unsqueeze", self.q_pos, self.i64(1))  # [S, 1]
        allow = g.op("LessOrEqual", k_pos, q_col)  # [S, L]
        if layer.chunked:
            cc = self.i64(C)
            allow = g.op("And", allow, g.op("Equal", g.op("Div", k_pos, cc), g.op("Div", q_col, cc)))
        pad = g.op("Cast", g.op("Slice", self.attention_mask, kstart, self.total, self.i64(1)), to=ir.DataType.BOOL)  # [B, L]
        pad = g.op("Unsqueeze", pad, self.i64(1, 2, 3))  # [B, 1, 1, 1, L]
        allow = g.op("And", allow, pad)  # [B, 1, 1, S, L]
        return g.op("Where", allow, self.f32(0.0), self.f32(NEG))

    def attention(self, x: ir.Value, layer: LayerSpec, past_k: ir.Value, past_v: ir.Value) -> tuple[ir.Value, ...]:
        """Llama4TextAttention with a KV cache.

            x [B,S,H] -> q_proj -> [B,S,Hq,D] -> RoPE? -> qk-norm? -> temperature? -> [B,Hkv,G,S,D] --+
                      -> k_proj -> [B,S,Hkv,D] -> RoPE? -> qk-norm? -> [B,Hkv,S,D] -> concat(past) --+-> scores
                      -> v_proj -> [B,Hkv,S,D] ------------------------------> concat(past) ----+   [B,Hkv,G,S,L]
            scores * D^-0.5 + mask -> softmax(fp32) -> @ v -> [B,Hq,S,D] -> [B,S,Hq*D] -> o_proj -> [B,S,H]
        """
        g, s = self.g, self.spec
        hq, hkv, d = s.num_heads, s.num_kv_heads, s.head_dim
        pre = f"model.layers.{layer.index}.self_attn"
        with g.scope("self_attn"):
            q = g.op("Reshape", self.linear(x, f"{pre}.q_proj.weight"), self.i64(0, 0, hq, d))  # [B, S, Hq, D]
            k = g.op("Reshape", self.linear(x, f"{pre}.k_proj.weight"), self.i64(0, 0, hkv, d))  # [B, S, Hkv, D]
            v = g.op("Reshape", self.linear(x, f"{pre}.v_proj.weight"), self.i64(0, 0, hkv, d))
            if layer.uses_rope:
                with g.scope("rope"):
                    q, k = self.rope(q), self.rope(k)
            if layer.qk_norm:
                # Why: Llama 4's qk-norm is a weightless RMS per head over head_dim, after RoPE, eps=rms_norm_eps.
                with g.scope("qk_norm"):
                    q, k = self.rms(q, s.rms_norm_eps), self.rms(k, s.rms_norm_eps)
            if layer.temperature_tuning:
                # Why: NoPE layers sharpen attention at long range: q *= 1 + attn_scale*log1p(floor((pos+1)/floor_scale)),
                # pos being the absolute cache position (not position_ids).
                with g.scope("temperature"):
                    p = g.op("Cast", self.q_pos, to=FP32)
                    t = g.op("Floor", g.op("Div", g.op("Add", p, self.f32(1.0)), self.f32(s.floor_scale)))
                    t = g.op("Add", g.op("Mul", g.op("Log", g.op("Add", t, self.f32(1.0))), self.f32(s.attn_scale)),
                             self.f32(1.0))  # [S]
                    q = g.op("Mul", self.to(q, FP32), g.op("Reshape", t, self.i64(1, -1, 1, 1)))
            q, k = self.to(q, self.dt), self.to(k, self.dt)  # HF: .type_as(x) after RoPE / norm
            with g.scope("cache"):
                k = g.op("Transpose", k, perm=[0, 2, 1, 3])  # [B, Hkv, S, D]
                v = g.op("Transpose", v, perm=[0, 2, 1, 3])
                present_k = g.op("Concat", past_k, k, axis=2)  # [B, Hkv, L, D]
                present_v = g.op("Concat", past_v, v, axis=2)
                past_len = g.op("Gather", g.op("Shape", past_k), self.i64(2), axis=0)  # [1] = P_i
            with g.scope("mask"):
                mask = self.key_mask(layer, past_len)
            with g.scope("sdpa"):
                # GQA as repeat_kv: query head h reads kv head h // G, i.e. q viewed as [B, Hkv, G, S, D].
                qg = g.op("Reshape", g.op("Transpose", q, perm=[0, 2, 1, 3]), self.i64(0, hkv, hq // hkv, -1, d))
                kt = g.op("Unsqueeze", g.op("Transpose", self.to(present_k, FP32), perm=[0, 1, 3, 2]), self.i64(2))
                scores = g.op("MatMul", self.to(qg, FP32), kt)  # [B, Hkv, G, S, L]
                scores = g.op("Add", g.op("Mul", scores, self.f32(d**-0.5)), mask)
                probs = g.op("Softmax", scores, axis=-1)
                vv = g.op("Unsqueeze", present_v, self.i64(2))  # [B, Hkv, 1, L, D]
                # HF: softmax in fp32, then .to(q.dtype) @ v in the compute dtype
                o = g.op("MatMul", self.to(probs, self.dt), self.to(vv, self.dt))  # [B, Hkv, G, S, D]
                o = g.op("Transpose", g.op("Reshape", o, self.i64(0, hq, -1, d)), perm=[0, 2, 1, 3])  # [B, S, Hq, D]
                o = g.op("Reshape", o, self.i64(0, 0, hq * d))
            return self.linear(o, f"{pre}.o_proj.weight"), present_k, present_v

    # ---- feed-forward ------------------------------------------------------------------------------------
    def mlp(self, x: ir.Value, pre: str) -> ir.Value:
        """Llama4TextMLP: down(silu(gate x) * up x); the dense layers and the shared expert."""
        g = self.g
        gate = self.linear(x, f"{pre}.gate_proj.weight")
        up = self.linear(x, f"{pre}.up_proj.weight")
        return self.linear(g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up), f"{pre}.down_proj.weight")

    def moe(self, x: ir.Value, layer: LayerSpec) -> ir.Value:
        """Llama4TextMoe, top-1 routing, only the routed expert computed per token.

            x [B,S,H] -> [T,H] -+-> router (fp32) -> logits [T,E] -> s = sigmoid(max logit) [T,1]
                                +-> x * s --------------------------> MoE(k=1, w=1.0) -----+
                                +-> shared_expert(x) -------------------------------------(+)-> [B,S,H]

        Why: Llama 4's router score scales the expert INPUT (expert(x * s)), not its output, so it is applied
        before the fused op and the op's own routing weight is forced to 1.0 (k=1, normalized).
        """
        g, s = self.g, self.spec
        pre = f"model.layers.{layer.index}.feed_forward"
        with g.scope("feed_forward"):
            flat = g.op("Reshape", x, self.i64(-1, s.hidden_size))  # [T, H] fp32
            flat.type = ir.TensorType(FP32)
            r = self.ckpt[f"{pre}.router.weight"]
            w_r = g.weight(f"{pre}.router.weight", (s.hidden_size, s.num_experts), np.dtype(np.float32),
                           lambda: np.ascontiguousarray(r.load(np.float32).T))
            with g.scope("router"):
                logits = g.op("MatMul", self.to(flat, FP32), w_r)  # [T, E] fp32, as HF's router
                score = g.op("Sigmoid", g.op("ReduceMax", logits, self.i64(-1), keepdims=1))  # [T, 1]
                scaled = self.to(g.op("Mul", flat, score), self.dt)
                # Why: the op picks its own top-1 from router_probs in the compute dtype; fp16 rounding of the
                # logits can tie or swap near-equal experts. Hand it the fp32 choice as 0 / -30000 instead.
                choice = g.op("Equal", logits, g.op("ReduceMax", logits, self.i64(-1), keepdims=1))
                probs = self.to(g.op("Where", choice, self.f32(0.0), self.f32(-30000.0)), self.dt)  # [T, E]
            scheme = None if self.quant is None else self.quant.expert_scheme(pre)
            if scheme is not None:
                with g.scope("experts"):
                    routed = self.quant.experts(scaled, probs, pre, scheme)  # QMoE, or FP8 DQ -> MoE
            else:
                fc1, fc2 = onnx_contrib.moe_weights(g, f"{pre}.experts", self._experts(pre), self.np_dtype)
                with g.scope("experts"):
                    routed = onnx_contrib.routed_experts(g, scaled, probs, fc1, fc2)  # [T, H]
            with g.scope("shared_expert"):
                shared = self.mlp(self.to(flat, self.dt), f"{pre}.shared_expert")
            out = g.op("Add", shared, routed)
            return g.op("Reshape", out, g.op("Shape", x))

    def _experts(self, pre: str) -> dict[str, LazyTensor]:
        return {n: self.ckpt[f"{pre}.experts.{n}"] for n in ("gate_proj", "up_proj", "down_proj")}

    # ---- the model -------------------------------------------------------------------------------------
    def build(self) -> ir.Model:
        g, s = self.g, self.spec
        input_ids = g.input("input_ids", ir.DataType.INT64, ["batch_size", "sequence_length"])
        attention_mask = g.input("attention_mask", ir.DataType.INT64, ["batch_size", "total_sequence_length"])
        position_ids = g.input("position_ids", ir.DataType.INT64, ["batch_size", "sequence_length"])
        pasts = []
        for i in range(s.num_layers):
            shape = ["batch_size", s.num_kv_heads, f"past_sequence_length_{i}", s.head_dim]
            pasts.append((g.input(f"past_key_values.{i}.key", self.dt, shape),
                          g.input(f"past_key_values.{i}.value", self.dt, shape)))
        self.positions(input_ids, attention_mask, position_ids)
        embed = self.ckpt["model.embed_tokens.weight"]
        with g.scope("model.embed_tokens"):
            w = g.weight("model.embed_tokens.weight", tuple(embed.shape), self.np_dtype, lambda: embed.load(self.np_dtype))
            h = self.to(g.op("Gather", w, input_ids, axis=0), FP32)  # [B, S, H], residual stream in fp32
        presents = []
        for layer in s.layers:
            pre = f"model.layers.{layer.index}"
            with g.scope(pre):
                x = self.to(self.rms_norm(h, f"{pre}.input_layernorm.weight"), self.dt)
                attn, pk, pv = self.attention(x, layer, *pasts[layer.index])
                h = g.op("Add", h, self.to(attn, FP32))
                normed = self.rms_norm(h, f"{pre}.post_attention_layernorm.weight")
                if layer.is_moe:
                    ff = self.moe(normed, layer)
                else:
                    with g.scope("feed_forward"):
                        ff = self.mlp(self.to(normed, self.dt), f"{pre}.feed_forward")
                h = g.op("Add", h, self.to(ff, FP32))
            presents.append((pk, pv))
        with g.scope("model.norm"):
            h = self.to(self.rms_norm(h, "model.norm.weight"), self.dt)
        with g.scope("lm_head"):
            logits = self.to(self.linear(h, "lm_head.weight"), FP32)
        g.output(logits, "logits", FP32, ["batch_size", "sequence_length", s.vocab_size])
        for i, (pk, pv) in enumerate(presents):
            shape = ["batch_size", s.num_kv_heads, f"total_sequence_length_{i}", s.head_dim]
            g.output(pk, f"present.{i}.key", self.dt, shape)
            g.output(pv, f"present.{i}.value", self.dt, shape)
        return g.model(doc="Llama 4 text decoder with KV cache, exported by l4export")


def genai_config(spec: Llama4Spec, dtype: str, target: str) -> dict[str, Any]:
    """onnxruntime-genai's genai_config.json (model.type 'decoder': genai rejects 'llama4_text')."""
    provider = [{"cuda": {}}] if target == "cuda" else []
    eos = list(spec.eos_token_ids) or [0]
    return {
        "model": {
            "type": "decoder",
            "bos_token_id": spec.bos_token_id if spec.bos_token_id is not None else eos[0],
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": spec.pad_token_id if spec.pad_token_id is not None else eos[0],
            "context_length": spec.max_position_embeddings,
            "vocab_size": spec.vocab_size,
            "decoder": {
                "filename": MODEL_FILE,
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden_size,
                "num_attention_heads": spec.num_heads,
                "num_key_value_heads": spec.num_kv_heads,
                "num_hidden_layers": spec.num_layers,
                "session_options": {"log_id": "l4export", "provider_options": provider},
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {
            "max_length": min(spec.max_position_embeddings, 4096),
            "do_sample": False,
            "num_beams": 1,
            "num_return_sequences": 1,
            # Off: each layer reads its own past length (present = concat(past, new)), not a max-length buffer.
            "past_present_share_buffer": False,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def save_model(model: ir.Model, out: Path, total_bytes: int) -> None:
    """Write model.onnx + model.onnx.data, streaming each weight from the checkpoint (one at a time)."""
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="onnx weights", leave=False) as bar:

        def progress(tensor: ir.TensorProtocol, info: Any) -> None:
            bar.update(tensor.nbytes)

        ir.save(model, out / MODEL_FILE, external_data=DATA_FILE, callback=progress, max_workers=1)


def export_onnx(ckpt: Checkpoint, out: Path, options: Any) -> dict[str, Any]:
    """Write the decoder, its external data and genai_config.json into ``out``; return l4export.json extras."""
    recipe, calib = options.quant, None
    if recipe is not None:
        recipe.validate({n: t.shape for n, t in ckpt.tensors.items()})
        recipe.check_target("onnx", options.target, names=list(ckpt.tensors), calibrated=options.calib is not None)
        if options.calib is not None:
            from ..quant.calib_data import read_calibration
            from ..quant.calibrate import calibrate, spill_next_to

            # one decoder layer in memory at a time; calibrated codes spill next to the output (same disk, not a
            # tmpfs $TMPDIR) and go when written
            c = options.calib
            ids = read_calibration(c.path, ckpt.spec.vocab_size, ckpt.path, c.samples, c.seqlen)
            calib = calibrate(ckpt, recipe, ids, spill_next_to(c, out))
    builder = DecoderBuilder(ckpt, options.dtype, options.target, recipe, None if calib is None else calib.tensors,
                             None if calib is None else calib.act_scales)
    model = builder.build()
    total = sum(int(v.const_value.nbytes) for v in builder.g.initializers if v.const_value is not None)
    log.info("onnx graph: %d nodes, %d initializers, %.1f MB of weights", len(builder.g.nodes),
             len(builder.g.initializers), total / 1e6)
    save_model(model, out, total)
    # The runtimes read the spec from the export's own config.json (the source's, verbatim).
    (out / "config.json").write_text(json.dumps(ckpt.spec.config, indent=2))
    (out / "genai_config.json").write_text(json.dumps(genai_config(ckpt.spec, options.dtype, options.target), indent=2))
    info: dict[str, Any] = {"model": MODEL_FILE, "data": DATA_FILE, "opset": builder.g.opset, "nodes": len(builder.g.nodes),
                            "moe_nodes": sum(n.op_type == "MoE" for n in builder.g.nodes)}
    if builder.quant is not None:
        info["quant"] = {"recipe": recipe.name, "calibrated": calib is not None, "nodes": dict(builder.quant.counts),
                         "weight_bytes": total, **builder.quant.meta}
        if calib is not None:
            from ..quant.report import write_report

            write_report(out, calib, {n: tuple(t.shape) for n, t in ckpt.tensors.items()}, recipe.name)
            calib.close()
    return {"onnx": info}
