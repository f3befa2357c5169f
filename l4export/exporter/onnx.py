"""ONNX export of the Llama 4 text decoder (MoE, chunked attention, NoPE layers) with a KV cache.

The graph mirrors transformers' ``modeling_llama4.py`` layer by layer (``Llama4TextModel.forward`` ->
``Llama4TextDecoderLayer`` -> ``Llama4TextAttention`` / ``Llama4TextMoe`` / ``Llama4TextMLP``), written with ONNX
Runtime's fused operators so that a decode step is a few kernels per layer, not a few dozen:

    SkipSimplifiedLayerNormalization   residual add + RMSNorm (the residual stream stays float32)
    MatMul / MatMulNBits               q, k, v as one linear (qkv_proj)
    RMSNormalization (opset 23)        qk-norm, per head (weightless RMS; it commutes with RoPE, so it comes first)
    RotaryEmbedding (opset 23)         interleaved RoPE from this step's cos/sin (no max-length table)
    GroupQueryAttention                causal attention over the cache, in place when past and present share a buffer
    MoE / QMoE                         routed experts (top-1, input scaled by the router score) and the shared
                                       expert or dense MLP as a one-expert QMoE when int4
                                       (float: MatMuls, gate and up as one)

Shapes: B batch, S new tokens, T total tokens (attention_mask's width), H hidden, D head_dim, Hq/Hkv heads,
E experts, I expert width, V vocab, C attention_chunk_size.

I/O (optimum / onnxruntime-genai names)::

    input_ids                 int64 [B, S]
    attention_mask            int64 [B, T]            T = tokens seen so far + S
    position_ids              int64 [B, S]            RoPE positions
    past_key_values.{i}.key   dt    [B, Hkv, P_i, D]  P_i = 0 starts a sequence; or a larger buffer shared with
    past_key_values.{i}.value dt    [B, Hkv, P_i, D]  present.{i}.* (GroupQueryAttention writes in place)
    cache_start               int64 []   absolute position of the first key that the chunked layers' caches hold
    num_logits_to_keep        int64 []   logits for the last n positions only (0 = all)
    (onnxruntime-genai's copy, model.genai.onnx / model.embeds.genai.onnx, has both as constant zeros: genai feeds
    only the standard inputs, and ONNX Runtime warns on every session about an initializer that is also an input)
    -> logits                 fp32  [B, S or n, V]
    -> present.{i}.key/value  dt    [B, Hkv, P_i + S (or the shared buffer), D]

Why cache_start: a chunked (RoPE) layer only ever attends within its chunk of C tokens (aligned to absolute
positions 0, C, 2C, ...), so our runtime keeps only the current chunk in those layers' caches, a buffer of C
(memory and compute bounded by C), and passes where that chunk starts. onnxruntime-genai keeps everything in every
layer and passes nothing: cache_start 0. Either way the chunked layers read (T - cache_start) keys and an
attention bias keeps each query to its own chunk; global (NoPE) layers always hold all T keys.

Weights are lazy initializers: ``ir.save`` reads each one from the checkpoint when its bytes are due and
drops it after, so the model never sits whole in memory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir

from ..checkpoint import Checkpoint
from ..folder import DATA_FILE, EMBEDS_FILE, GENAI_CONFIG, MODEL_FILE
from ..plan import ExportPlan
from ..spec import LayerSpec, Llama4Spec
from . import onnx_experts, onnx_lower
from .genai import genai_config
from .onnx_experts import Route
from .onnx_graph import FP32, MS_DOMAIN, GraphBuilder, save_model
from .onnx_variants import (
    KV_VARIANTS,
    write_batch_decoder,
    write_embedding_model,
    write_embeds_decoder,
    write_genai_decoder,
    write_kv_variant,
)

log = logging.getLogger(__name__)

OPSET = 23  # RotaryEmbedding
NP_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
NEG = -3.0e38  # additive mask; finite so a fully masked row gives a uniform softmax, not NaN
I32 = ir.DataType.INT32


class DecoderBuilder:
    """Emits the decoder graph for one checkpoint and export plan (compute dtype, target, per-tensor schemes)."""

    def __init__(self, ckpt: Checkpoint, plan: ExportPlan, calibrated: dict[str, Any] | None = None,
                 act_scales: dict[str, Any] | None = None):
        self.ckpt, self.plan = ckpt, plan
        self.spec: Llama4Spec = ckpt.spec
        self.g = GraphBuilder(opset=OPSET, dtype=NP_DTYPES[plan.dtype])
        self.dt = self.g.dt
        quant = None
        if plan.recipe is not None:  # quantized tensors come from calibration, else round to nearest
            quant = onnx_lower.QuantSource(ckpt.__getitem__, plan.scheme, calibrated, act_scales)
        self.lo = onnx_lower.Lowering(self.g, ckpt.__getitem__, plan.target, quant)

    # ---- linears and norms -------------------------------------------------------------------------
    def linear(self, x: ir.Value, *names: str, base: str | None = None) -> ir.Value:
        """x [..., in] @ W^T for one weight, or several of one scheme as one stored linear (``base``)."""
        base = base or names[0]
        with self.g.scope(base.rsplit(".", 2)[-2]):
            return onnx_lower.linear(self.lo, x, names, base, self.plan.scheme(names[0]))

    def norm_weight(self, name: str) -> ir.Value:
        t = self.ckpt[name]
        return self.g.weight(name, tuple(t.shape), np.dtype(np.float32), lambda: t.load(np.float32))

    def add_norm(self, x: ir.Value, residual: ir.Value | None, name: str) -> tuple[ir.Value, ir.Value]:
        """(RMSNorm(residual + x) * weight, residual + x), both float32 [B, S, H]; ``residual`` None: no add.

        Llama4TextRMSNorm: ``(x.float() * rsqrt(mean(x^2) + eps)).type_as(x) * weight``. The residual stream stays
        float32 in every graph (only matmul inputs and the KV cache use the compute dtype): with 128 experts the
        top-1 router margin can be ~1e-4, and fp16 residual rounding flips it."""
        g, w, eps = self.g, self.norm_weight(name), self.spec.rms_norm_eps
        with g.scope(name.rsplit(".", 2)[-2]):
            if residual is None:
                return g.op("RMSNormalization", g.cast(x, FP32), w, axis=-1, epsilon=eps, stash_type=1), x
            y, _, _, total = g.op("SkipSimplifiedLayerNormalization", g.cast(x, FP32), residual, w, domain=MS_DOMAIN,
                                  outputs=4, epsilon=eps)
            return y, total

    # ---- shared per-call values ----------------------------------------------------------------------
    def positions(self, input_ids: ir.Value, attention_mask: ir.Value, position_ids: ir.Value, cache_start: ir.Value) -> None:
        """What every layer of this call shares, computed once:

            cos, sin      [B, S, D/2] compute dtype   RoPE of position_ids (fp32 angles, as transformers)
            q_pos         [S] int64                   absolute cache positions T - S .. T - 1
            temperature   [1, S, 1] fp32              NoPE layers' q multiplier at q_pos
            seqlens/total int32 [B] / []              GroupQueryAttention's key counts: T for global layers,
                                                      T - cache_start for chunked layers
            chunk_bias    [1, 1, S, T - cache_start]  0 where key and query share a chunk, else -inf"""
        g, s = self.g, self.spec
        with g.scope("rotary_emb"):
            inv = g.const(s.inv_freq().reshape(1, 1, -1))  # [1, 1, D/2]
            freqs = g.op("Mul", g.op("Unsqueeze", g.op("Cast", position_ids, to=FP32), g.i64(-1)), inv)  # [B, S, D/2]
            self.cos, self.sin = g.cast(g.op("Cos", freqs), self.dt), g.cast(g.op("Sin", freqs), self.dt)
        with g.scope("positions"):
            total = g.op("Gather", g.op("Shape", attention_mask), g.i64(1), axis=0)  # [1] = T
            seq = g.op("Gather", g.op("Shape", input_ids), g.i64(1), axis=0)  # [1] = S
            start = g.op("Sub", total, seq)
            steps = g.op("Range", g.const(np.int64(0)), g.op("Squeeze", seq, g.i64(0)), g.const(np.int64(1)))
            self.q_pos = g.op("Add", steps, start)  # [S]
            self.seqlens = {"global": self._seqlens(total)}
            self.keys = {"global": total}  # [1] keys a layer reads this call
        if any(la.temperature_tuning for la in s.layers):
            with g.scope("temperature"):
                # NoPE layers sharpen attention at long range: q *= 1 + attn_scale*log1p(floor((pos+1)/floor_scale)),
                # pos being the absolute cache position (not position_ids).
                p = g.op("Cast", self.q_pos, to=FP32)
                t = g.op("Floor", g.op("Div", g.op("Add", p, g.f32(1.0)), g.f32(s.floor_scale)))
                t = g.op("Add", g.op("Mul", g.op("Log", g.op("Add", t, g.f32(1.0))), g.f32(s.attn_scale)), g.f32(1.0))
                self.temperature = g.cast(g.op("Reshape", t, g.i64(1, -1, 1)), self.dt)  # [1, S, 1]
        if any(la.chunked for la in s.layers):
            with g.scope("chunks"):
                held = g.op("Sub", total, g.op("Reshape", cache_start, g.i64(1)))  # [1] = keys a chunked layer holds
                self.seqlens["chunked"] = self._seqlens(held)
                self.keys["chunked"] = held
                self.chunk_bias = self._chunk_bias(cache_start, held)
        if self.plan.attention == "plain":
            with g.scope("masks"):
                self.masks = {kind: self._plain_mask(keys, seq, self.chunk_bias if kind == "chunked" else None)
                              for kind, keys in self.keys.items()}

    def _seqlens(self, keys: ir.Value) -> tuple[ir.Value, ir.Value]:
        """GroupQueryAttention's (seqlens_k [B] = keys - 1, total_sequence_length [] = keys), int32 (batch 1)."""
        g = self.g
        k32 = g.op("Cast", keys, to=I32)
        return g.op("Sub", k32, g.const(np.array([1], np.int32))), g.op("Squeeze", k32, g.i64(0))

    def _chunk_bias(self, cache_start: ir.Value, held: ir.Value) -> ir.Value:
        """[1, 1, S, L] additive bias, L = keys held: key j (absolute cache_start + j) is visible to query q only in
        q's chunk (k // C == q // C, chunks aligned to absolute positions). GroupQueryAttention adds the causal part."""
        g = self.g
        c = g.i64(self.spec.attention_chunk_size)
        k_pos = g.op("Add", g.op("Range", g.const(np.int64(0)), g.op("Squeeze", held, g.i64(0)), g.const(np.int64(1))),
                     cache_start)  # [L]
        q_col = g.op("Unsqueeze", self.q_pos, g.i64(1))  # [S, 1]
        same = g.op("Equal", g.op("Div", k_pos, c), g.op("Div", q_col, c))  # [S, L]
        bias = g.cast(g.op("Where", same, g.f32(0.0), g.f32(NEG)), self.dt)  # (-inf in fp16: a query always sees itself)
        return g.op("Unsqueeze", bias, g.i64(0, 1))

    # ---- attention -----------------------------------------------------------------------------------------
    def attention(self, x: ir.Value, layer: LayerSpec, past_k: ir.Value, past_v: ir.Value) -> tuple[ir.Value, ...]:
        """Llama4TextAttention with a KV cache (GroupQueryAttention).

            x [B,S,H] -> qkv_proj -> q [B,S,Hq*D], k, v [B,S,Hkv*D]
              q, k -> qk-norm per head (if qk_norm) -> RoPE (if uses_rope)      q -> * temperature (NoPE layers)
              GroupQueryAttention(q, k, v, cache) -> [B,S,Hq*D] -> o_proj -> [B,S,H]
        """
        g, s = self.g, self.spec
        hq, hkv, d = s.num_heads, s.num_kv_heads, s.head_dim
        pre = f"model.layers.{layer.index}.self_attn"
        with g.scope("self_attn"):
            names = tuple(f"{pre}.{p}_proj.weight" for p in "qkv")
            if self.plan.qkv_fused(layer.index):
                qkv = self.linear(x, *names, base=f"{pre}.qkv_proj.weight")
                if layer.qk_norm or layer.uses_rope:
                    # q and k heads side by side [B,S,(Hq+Hkv)*D]: one qk-norm and one RoPE node over both (per
                    # head, the same maths), then split: 6 nodes a layer where q and k apart took 9
                    qk, v = g.op("Split", qkv, g.i64((hq + hkv) * d, hkv * d), axis=-1, outputs=2)
                    q, k = g.op("Split", self.qk_rope(qk, hq + hkv, layer), g.i64(hq * d, hkv * d), axis=-1, outputs=2)
                else:
                    q, k, v = g.op("Split", qkv, g.i64(hq * d, hkv * d, hkv * d), axis=-1, outputs=3)
            else:
                q, k, v = (self.linear(x, n) for n in names)
                q, k = self.qk_rope(q, hq, layer), self.qk_rope(k, hkv, layer)
            if layer.temperature_tuning:
                with g.scope("temperature"):
                    q = g.op("Mul", q, self.temperature)
            kind = "chunked" if layer.chunked else "global"
            with g.scope("sdpa"):
                if self.plan.attention == "plain":
                    o, present_k, present_v = self.plain_attention(q, k, v, past_k, past_v, kind)
                else:
                    seqlens, total = self.seqlens[kind]
                    bias = self.chunk_bias if layer.chunked else None
                    o, present_k, present_v = g.op("GroupQueryAttention", q, k, v, past_k, past_v, seqlens, total, None,
                                                   None, None, bias, domain=MS_DOMAIN, outputs=3, num_heads=hq,
                                                   kv_num_heads=hkv)
            return self.linear(o, f"{pre}.o_proj.weight"), present_k, present_v

    def plain_attention(self, q: ir.Value, k: ir.Value, v: ir.Value, past_k: ir.Value, past_v: ir.Value,
                        kind: str) -> tuple[ir.Value, ir.Value, ir.Value]:
        """GroupQueryAttention's contract from plain ops, for head sizes it refuses (capabilities.attention_form).

        The cache as GroupQueryAttention keeps it: this step's keys go to rows [pos, pos + S) of the layer's buffer,
        pos = keys - S (keys: T, or T - cache_start in a chunked layer), whatever the buffer's length P; present is
        past[:pos] ++ new ++ past[pos + S:] (P = pos: onnxruntime-genai's growing cache; P larger: our runtime's
        preallocated one). Attention over rows [0, keys), in float32, head h reading kv head h // G:

            q [B,S,Hq*D] -> [B,Hkv,G,S,D] @ K^T [B,Hkv,1,D,L] * D^-0.5 + mask [1,1,S,L] -> softmax -> @ V -> [B,S,Hq*D]"""
        g, s = self.g, self.spec
        hq, hkv, d = s.num_heads, s.num_kv_heads, s.head_dim
        keys = self.keys[kind]
        pos = g.op("Sub", keys, g.op("Gather", g.op("Shape", q), g.i64(1), axis=0))  # [1]

        def write(past: ir.Value, new: ir.Value) -> tuple[ir.Value, ir.Value]:
            new = g.op("Transpose", g.op("Reshape", new, g.i64(0, 0, hkv, d)), perm=[0, 2, 1, 3])  # [B, Hkv, S, D]
            head = g.op("Slice", past, g.i64(0), pos, g.i64(2))
            tail = g.op("Slice", past, keys, g.i64(np.iinfo(np.int64).max), g.i64(2))
            present = g.op("Concat", head, new, tail, axis=2)
            return present, g.cast(g.op("Slice", present, g.i64(0), keys, g.i64(2)), FP32)  # [B, Hkv, L, D]

        present_k, k_all = write(past_k, k)
        present_v, v_all = write(past_v, v)
        q5 = g.op("Transpose", g.op("Reshape", g.cast(q, FP32), g.i64(0, 0, hkv, hq // hkv, d)), perm=[0, 2, 3, 1, 4])
        kt = g.op("Unsqueeze", g.op("Transpose", k_all, perm=[0, 1, 3, 2]), g.i64(2))  # [B, Hkv, 1, D, L]
        scores = g.op("Add", g.op("Mul", g.op("MatMul", q5, kt), g.f32(d ** -0.5)), self.masks[kind])
        o = g.op("MatMul", g.op("Softmax", scores, axis=-1), g.op("Unsqueeze", v_all, g.i64(2)))  # [B, Hkv, G, S, D]
        o = g.op("Reshape", g.op("Transpose", o, perm=[0, 3, 1, 2, 4]), g.i64(0, 0, hq * d))
        return g.cast(o, self.dt), present_k, present_v

    def _plain_mask(self, keys: ir.Value, seq: ir.Value, chunk_bias: ir.Value | None) -> ir.Value:
        """[1, 1, S, L] float32: 0 where key j (0..L-1 of the layer's rows) is visible to query i, i.e. causal
        (j <= pos + i) and, in a chunked layer, in the query's chunk (``chunk_bias``); else NEG."""
        g = self.g
        k_idx = g.op("Range", g.const(np.int64(0)), g.op("Squeeze", keys, g.i64(0)), g.const(np.int64(1)))  # [L]
        steps = g.op("Range", g.const(np.int64(0)), g.op("Squeeze", seq, g.i64(0)), g.const(np.int64(1)))  # [S]
        q_rel = g.op("Unsqueeze", g.op("Add", steps, g.op("Sub", keys, seq)), g.i64(1))  # [S, 1]
        visible = g.op("LessOrEqual", k_idx, q_rel)  # [S, L]
        bias = g.f32(0.0) if chunk_bias is None else g.cast(chunk_bias, FP32)
        return g.op("Where", g.op("Unsqueeze", visible, g.i64(0, 1)), bias, g.f32(NEG))

    def qk_rope(self, x: ir.Value, heads: int, layer: LayerSpec) -> ir.Value:
        """qk-norm (if the layer has it), then RoPE (if it uses it), of ``heads`` heads [B, S, heads*D]: q's, k's, or
        both side by side (each head on its own, so one node serves both)."""
        g = self.g
        if layer.qk_norm:
            # Why: Llama 4's qk-norm is a weightless RMS per head over head_dim, eps=rms_norm_eps, applied after
            # RoPE in transformers; a rotation keeps each head's norm, so it is applied first here.
            with g.scope("qk_norm"):
                x = self.head_rms(x, heads)
        if layer.uses_rope:
            with g.scope("rope"):
                # IMPORTANT: interleaved ("traditional") pairs (2i, 2i+1), as Llama 4's complex RoPE.
                x = g.op("RotaryEmbedding", x, self.cos, self.sin, interleaved=1, num_heads=heads)
        return x

    def head_rms(self, x: ir.Value, heads: int) -> ir.Value:
        """Weightless RMS over head_dim of [B, S, heads*D] (computed in float32, as transformers' L2Norm)."""
        g, d = self.g, self.spec.head_dim
        x4 = g.op("Reshape", x, g.i64(0, 0, heads, d))
        y = g.op("RMSNormalization", x4, g.const(np.ones(d, g.np_dtype)), axis=-1,
                 epsilon=self.spec.rms_norm_eps, stash_type=1)
        return g.op("Reshape", y, g.i64(0, 0, heads * d))

    # ---- feed-forward ------------------------------------------------------------------------------------
    def mlp(self, flat: ir.Value, probs1: ir.Value, pre: str) -> ir.Value:
        """Llama4TextMLP, down(silu(gate x) * up x), on flat [T, H]: the dense layers and the shared expert.
        As a one-expert QMoE when the plan fuses it (int4: one kernel; ``probs1`` [T, 1] routes every token to it),
        else linears, gate and up as one [2I, H] linear when they share a scheme."""
        g, x = self.g, self.g.cast(flat, self.dt)
        names = tuple(f"{pre}.{p}_proj.weight" for p in ("gate", "up", "down"))
        if self.plan.mlp_fused(pre):
            return onnx_experts.experts(self.lo, Route(None, (probs1,), (x,)), names, pre, self.plan.scheme(names[0]))
        if self.plan.gate_up_fused(pre):
            width = self.ckpt[names[0]].shape[0]
            gate, up = g.op("Split", self.linear(x, *names[:2], base=f"{pre}.gate_up_proj.weight"), g.i64(width, width),
                            axis=-1, outputs=2)
        else:
            gate, up = self.linear(x, names[0]), self.linear(x, names[1])
        return self.linear(g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up), names[2])

    def moe(self, x: ir.Value, layer: LayerSpec) -> ir.Value:
        """Llama4TextMoe, top-k routing, only the routed experts computed per token.

            x [B,S,H] -> [T,H] -+-> router (fp32) -> logits [T,E] -> top-k values v_j, experts e_j [T,1] each
                                +-> x * sigmoid(v_j) --> (Q)MoE(k=1, weight 1.0, picks e_j), one node per rank j ---(+)-+
                                +-> shared_expert(x): a one-expert QMoE, or MatMuls ------------------------------(+)-> [B,S,H]

        Why: Llama 4's router score scales the expert INPUT (expert(x * s)), not its output, so it is applied
        before the fused op and the op's own routing weight is forced to 1.0 (k=1, normalized); with top-k > 1 each
        rank's input has its own score, so each rank is its own node over the same weights."""
        g, s = self.g, self.spec
        pre = f"model.layers.{layer.index}.feed_forward"
        with g.scope("feed_forward"):
            flat = g.op("Reshape", x, g.i64(-1, s.hidden_size))  # [T, H] fp32
            r = self.ckpt[f"{pre}.router.weight"]
            w_r = g.weight(f"{pre}.router.weight", (s.hidden_size, s.num_experts), np.dtype(np.float32),
                           lambda: np.ascontiguousarray(r.load(np.float32).T))
            with g.scope("router"):
                logits = g.op("MatMul", flat, w_r)  # [T, E] fp32, as HF's router
                route, top = self.route(flat, logits)
            with g.scope("experts"):  # [T, H]: QMoE, MoE, or the routed FP8 experts dequantized -> MoE
                names = tuple(f"{pre}.experts.{n}" for n in ("gate_proj", "up_proj", "down_proj"))
                routed = onnx_experts.experts(self.lo, route, names, f"{pre}.experts", self.plan.expert_scheme(layer.index))
            with g.scope("shared_expert"):
                shared = self.mlp(flat, g.cast(top, self.dt), f"{pre}.shared_expert")
            return g.op("Reshape", g.op("Add", shared, routed), self.hidden_shape)

    def route(self, flat: ir.Value, logits: ir.Value) -> tuple[Route, ir.Value]:
        """The routing ranks (each: input x * sigmoid(its logit), router_probs picking its expert) and the top
        logit [T, 1]. Top-1 keeps the single-ReduceMax form; top-k takes TopK (ties to the lower index, as torch)."""
        g, k = self.g, self.spec.top_k
        if k == 1:
            top = g.op("ReduceMax", logits, g.i64(-1), keepdims=1)  # [T, 1]
            scaled = g.cast(g.op("Mul", flat, g.op("Sigmoid", top)), self.dt)
            return Route(logits, (self.router_probs(logits, top),), (scaled,)), top
        values, idx = g.op("TopK", logits, g.i64(k), axis=-1, largest=1, sorted=1, outputs=2)  # [T, k]
        experts = g.const(np.arange(self.spec.num_experts, dtype=np.int64))  # [E]
        inputs, probs = [], []
        for j in range(k):
            v_j, e_j = (g.op("Slice", t, g.i64(j), g.i64(j + 1), g.i64(1)) for t in (values, idx))  # [T, 1]
            inputs.append(g.cast(g.op("Mul", flat, g.op("Sigmoid", v_j)), self.dt))
            pick = g.op("Where", g.op("Equal", experts, e_j), g.f32(0.0), g.f32(-30000.0))  # [T, E]
            probs.append(g.cast(pick, self.dt))
        return Route(logits, tuple(probs), tuple(inputs)), g.op("Slice", values, g.i64(0), g.i64(1), g.i64(1))

    def router_probs(self, logits: ir.Value, top: ir.Value) -> ir.Value:
        """The op's router_probs [T, E]: the fp32 logits in a float32 graph. Otherwise the fp32 choice as 0 / -30000:
        the op picks its own top-1 in the compute dtype, and fp16 rounding can tie or swap near-equal experts."""
        g = self.g
        if self.dt == FP32:
            return logits
        choice = g.op("Equal", logits, top)
        return g.cast(g.op("Where", choice, g.f32(0.0), g.f32(-30000.0)), self.dt)

    # ---- the model -------------------------------------------------------------------------------------
    def inputs(self) -> tuple[ir.Value, ...]:
        g, s = self.g, self.spec
        input_ids = g.input("input_ids", ir.DataType.INT64, ["batch_size", "sequence_length"])
        attention_mask = g.input("attention_mask", ir.DataType.INT64, ["batch_size", "total_sequence_length"])
        position_ids = g.input("position_ids", ir.DataType.INT64, ["batch_size", "sequence_length"])
        pasts = []
        for i in range(s.num_layers):
            shape = ["batch_size", s.num_kv_heads, f"past_sequence_length_{i}", s.head_dim]
            pasts.append((g.input(f"past_key_values.{i}.key", self.dt, shape),
                          g.input(f"past_key_values.{i}.value", self.dt, shape)))
        # required here; genai's copy of the graph has them as constant zeros (onnx_variants.write_genai_decoder)
        cache_start = g.input("cache_start", ir.DataType.INT64, [])
        keep = g.input("num_logits_to_keep", ir.DataType.INT64, [])
        return input_ids, attention_mask, position_ids, pasts, cache_start, keep

    def build(self) -> ir.Model:
        g, s = self.g, self.spec
        input_ids, attention_mask, position_ids, pasts, cache_start, keep = self.inputs()
        self.positions(input_ids, attention_mask, position_ids, cache_start)
        with g.scope("model.embed_tokens"):  # only the lookup in this scope: onnx_variants cuts it out by name
            name = "model.embed_tokens.weight"
            embeds = onnx_lower.embedding(self.lo, input_ids, name, self.plan.scheme(name))  # [B, S, H] compute dtype
        h = g.cast(embeds, FP32)
        with g.scope("model.hidden"):  # [B, S, H], for every layer's MLP output (one Shape node, not one a layer)
            self.hidden_shape = g.op("Shape", h)
        ff, presents = None, []
        for layer in s.layers:
            pre = f"model.layers.{layer.index}"
            with g.scope(pre):
                x, h = self.add_norm(h if ff is None else ff, None if ff is None else h, f"{pre}.input_layernorm.weight")
                attn, pk, pv = self.attention(g.cast(x, self.dt), layer, *pasts[layer.index])
                normed, h = self.add_norm(attn, h, f"{pre}.post_attention_layernorm.weight")
                if layer.is_moe:
                    ff = self.moe(normed, layer)
                else:
                    with g.scope("feed_forward"):
                        flat = g.op("Reshape", normed, g.i64(-1, s.hidden_size))
                        one = g.cast(g.op("Slice", flat, g.i64(0), g.i64(1), g.i64(-1)), self.dt)  # [T, 1]: any value
                        ff = g.op("Reshape", self.mlp(flat, one, f"{pre}.feed_forward"), self.hidden_shape)
            presents.append((pk, pv))
        with g.scope("model.norm"):
            h, _ = self.add_norm(ff, h, "model.norm.weight")
        with g.scope("lm_head"):
            logits = g.cast(self.linear(g.cast(self.last(h, keep), self.dt), "lm_head.weight"), FP32)
        g.output(logits, "logits", FP32, ["batch_size", "logits_length", s.vocab_size])
        for i, (pk, pv) in enumerate(presents):
            shape = ["batch_size", s.num_kv_heads, f"total_sequence_length_{i}", s.head_dim]
            g.output(pk, f"present.{i}.key", self.dt, shape)
            g.output(pv, f"present.{i}.value", self.dt, shape)
        return g.model(doc="Llama 4 text decoder with KV cache, exported by l4export")

    def last(self, h: ir.Value, keep: ir.Value) -> ir.Value:
        """h [B, S, H] -> its last ``keep`` positions (all of them when keep is 0): logits only where needed."""
        g = self.g
        seq = g.op("Gather", g.op("Shape", h), g.i64(1), axis=0)  # [1] = S
        k = g.op("Reshape", keep, g.i64(1))
        n = g.op("Where", g.op("Greater", k, g.i64(0)), g.op("Min", k, seq), seq)
        return g.op("Slice", h, g.op("Sub", seq, n), seq, g.i64(1))


def export_onnx(ckpt: Checkpoint, out: Path, plan: ExportPlan, options: Any, calib: Any = None,
                ready: Any = None) -> dict[str, Any]:
    """Write the decoder, its external data and genai_config.json into ``out`` (with the vision path: vision.onnx,
    embedding.onnx and model.embeds.onnx too); return l4export.json's "onnx" section. ``calib``: convert's calibration result
    (quantized tensors and FP8 input scales), or None."""
    quantized = ready if ready is not None else None if calib is None else calib.tensors  # made ahead of the writer
    builder = DecoderBuilder(ckpt, plan, quantized, None if calib is None else calib.act_scales)
    model = builder.build()
    total = sum(int(v.const_value.nbytes) for v in builder.g.initializers if v.const_value is not None)
    log.info("onnx graph: %d nodes, %d initializers, %.1f MB of weights", len(builder.g.nodes),
             len(builder.g.initializers), total / 1e6)
    save_model(model, out, total, MODEL_FILE, DATA_FILE)
    # The runtimes read the spec from the export's own config.json (the source's, verbatim).
    (out / "config.json").write_text(json.dumps(ckpt.spec.config, indent=2))
    kv_variants = KV_VARIANTS if plan.attention == "gqa" else ()  # GroupQueryAttention's quantized cache only
    info: dict[str, Any] = {"model": MODEL_FILE, "data": DATA_FILE, "opset": builder.g.opset, "nodes": len(builder.g.nodes),
                            "moe_nodes": sum(n.op_type == "MoE" for n in builder.g.nodes),
                            "attention": plan.attention,
                            "kv_variants": {kv: write_kv_variant(out, ckpt.spec, kv, plan.dtype) for kv in kv_variants}}
    if plan.vision:
        from .onnx_vision import export_vision

        info["vision"] = export_vision(ckpt, out, plan, NP_DTYPES[plan.dtype])
        info["embedding"] = write_embedding_model(out, ckpt.spec, plan.dtype)
        info["embeds_decoder"] = write_embeds_decoder(out, ckpt.spec, plan.dtype)
        info["embeds_kv_variants"] = {kv: write_kv_variant(out, ckpt.spec, kv, plan.dtype, EMBEDS_FILE) for kv in kv_variants}
    if plan.attention == "gqa":  # GroupQueryAttention's per-row key counts (the plain-op form has one length)
        info["batch_decoder"] = write_batch_decoder(out)
    info["genai_decoder"] = write_genai_decoder(out, info["embeds_decoder"] if plan.vision else MODEL_FILE)
    cfg = genai_config(ckpt.spec, plan.target, info["genai_decoder"], plan.vision)
    (out / GENAI_CONFIG).write_text(json.dumps(cfg, indent=2))
    if plan.recipe is not None:  # (the recipe, calibration and adapted tensors: ExportInfo.quant, by convert)
        info["quant"] = {"nodes": dict(builder.lo.counts), "weight_bytes": total, **builder.lo.meta}
    return info
