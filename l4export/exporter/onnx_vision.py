"""ONNX export of Llama 4's early-fusion vision path, in onnxruntime-genai's multimodal layout.

    vision.onnx            pixel_values [N, 3, S, S] -> image_features [N * T, text_hidden]     (this module)
    embedding.onnx         input_ids [B, L], image_features [P, text_hidden] -> inputs_embeds [B, L, text_hidden]
    model.embeds.onnx      the decoder (model.onnx) with inputs_embeds in place of input_ids
                           (both cut from model.onnx by ``split_embedding``: no weight is written twice)

The vision graph mirrors transformers' ``Llama4VisionModel`` + ``Llama4MultiModalProjector`` layer by layer.
Shapes for Scout: N tiles, S = 336, p = 14, P = S/p = 24 patches a side, C = 1408 hidden, h = 16 heads of
D = 88, T = 144 image tokens per tile, text_hidden = 5120.

    pixel_values [N,3,S,S] -> patches [N,P*P,3*p*p] (unfold: channel-major, row-major patches) -> linear -> [N,576,C]
      -> + class token (appended LAST) -> [N,577,C] -> + positional_embedding_vlm -> LayerNorm (layernorm_pre)
      -> layers: x + o(Attention(RoPE2D(q(LN x)), RoPE2D(k(LN x)), v(LN x)))   (non-causal, all 577 tokens)
                 x + fc2(GELU(fc1(LN x)))
      -> LayerNorm (layernorm_post) -> drop the class token -> [N,576,C]
      -> pixel shuffle 0.5 -> [N,144,4C] -> adapter: GELU(fc2(GELU(fc1 x))) -> [N,144,4096]
      -> multi_modal_projector.linear_1 -> [N*144, text_hidden]

Why 2D RoPE as RotaryEmbedding: transformers rotates adjacent (interleaved) pairs by complex multiplication in
float32; the first half of a head's pairs turn with the patch's column + 1, the second half with its row + 1, and
the class token not at all. These angles depend on nothing but the tile size, so they are constants here (cos/sin
tables [P*P + 1, D/2]), and the rotation is plain real arithmetic: RotaryEmbedding(interleaved=1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from ..checkpoint import Checkpoint
from ..folder import VISION_DATA, VISION_FILE
from ..plan import ExportPlan
from ..spec import VisionSpec
from . import onnx_lower
from .onnx_graph import GraphBuilder, save_model


class VisionBuilder:
    """Emits vision.onnx for one checkpoint and export plan (compute dtype, per-tensor schemes)."""

    def __init__(self, ckpt: Checkpoint, plan: ExportPlan, np_dtype: Any):
        self.ckpt, self.plan = ckpt, plan
        self.vs: VisionSpec = ckpt.spec.vision
        self.text_hidden = ckpt.spec.hidden_size
        self.g = GraphBuilder(opset=23, dtype=np_dtype)
        self.dt = self.g.dt
        tensor = ckpt.vision.__getitem__
        quantized = any(plan.scheme(n) is not None for n in ckpt.vision)
        quant = onnx_lower.QuantSource(tensor, plan.scheme) if quantized else None
        self.lo = onnx_lower.Lowering(self.g, tensor, plan.target, quant)

    # ---- parameters and linears ------------------------------------------------------------------------
    def param(self, name: str) -> ir.Value:
        """A float parameter (norm weights and biases, embeddings) in the compute dtype."""
        t = self.ckpt.vision[name]
        dt = self.g.np_dtype
        return self.g.weight(name, tuple(t.shape), dt, lambda: t.load(dt))

    def linear(self, x: ir.Value, name: str, bias: bool = False) -> ir.Value:
        """x [..., in] @ W^T (+ b): MatMul, or MatMulNBits / FP8 when the plan quantizes the weight."""
        with self.g.scope(name.rsplit(".", 2)[-2]):
            y = onnx_lower.linear(self.lo, x, (name,), name, self.plan.scheme(name))
            return self.g.op("Add", y, self.param(name[: -len("weight")] + "bias")) if bias else y

    def layer_norm(self, x: ir.Value, pre: str) -> ir.Value:
        """nn.LayerNorm (eps from the config), statistics in float32."""
        with self.g.scope(pre.rsplit(".", 1)[-1]):
            return self.g.op("LayerNormalization", x, self.param(f"{pre}.weight"), self.param(f"{pre}.bias"), axis=-1,
                             epsilon=self.vs.norm_eps, stash_type=1)

    def gelu(self, x: ir.Value) -> ir.Value:
        return self.g.op("Gelu", x, approximate="none")  # nn.GELU(): the exact erf form

    # ---- stages --------------------------------------------------------------------------------------------
    def patches(self, pixels: ir.Value) -> ir.Value:
        """[N, 3, S, S] -> [N, P*P, 3*p*p]: nn.Unfold's order (channel, then row and column within the patch)."""
        g, vs = self.g, self.vs
        side, p, c = vs.patches_per_side, vs.patch_size, vs.num_channels
        x = g.op("Reshape", pixels, g.i64(-1, c, side, p, side, p))
        x = g.op("Transpose", x, perm=[0, 2, 4, 1, 3, 5])  # [N, P, P, 3, p, p]
        return g.op("Reshape", x, g.i64(-1, side * side, c * p * p))

    def embed(self, pixels: ir.Value) -> ir.Value:
        """patch embedding + class token (last) + positional embedding -> layernorm_pre: [N, P*P + 1, C]."""
        g, c = self.g, self.vs.hidden_size
        with g.scope("vision_model.patch_embedding"):
            x = self.linear(self.patches(pixels), "vision_model.patch_embedding.linear.weight")
        with g.scope("vision_model.class_embedding"):
            batch = g.op("Slice", g.op("Shape", x), g.i64(0), g.i64(1))  # [1] = N
            cls = g.op("Reshape", self.param("vision_model.class_embedding"), g.i64(1, 1, c))
            cls = g.op("Expand", cls, g.op("Concat", batch, g.i64(1, c), axis=0))
            x = g.op("Concat", x, cls, axis=1)
            x = g.op("Add", x, self.param("vision_model.positional_embedding_vlm"))
        return self.layer_norm(x, "vision_model.layernorm_pre")

    def attention(self, x: ir.Value, pre: str, positions: ir.Value, cos: ir.Value, sin: ir.Value) -> ir.Value:
        """Llama4VisionAttention: q, k, v (with bias) -> 2D RoPE on q, k -> softmax(q k^T / sqrt(D)) v -> o."""
        g, h = self.g, self.vs.num_heads
        with g.scope("self_attn"):
            q, k, v = (self.linear(x, f"{pre}.self_attn.{p}_proj.weight", bias=True) for p in "qkv")
            with g.scope("rope"):
                q, k = (g.op("RotaryEmbedding", t, cos, sin, positions, interleaved=1, num_heads=h) for t in (q, k))
            o = g.op("Attention", q, k, v, q_num_heads=h, kv_num_heads=h)  # [N, L, C]; no mask: every token sees all
            return self.linear(o, f"{pre}.self_attn.o_proj.weight", bias=True)

    def layer(self, x: ir.Value, n: int, positions: ir.Value, cos: ir.Value, sin: ir.Value) -> ir.Value:
        pre = f"vision_model.model.layers.{n}"
        with self.g.scope(pre):
            x = self.g.op("Add", x, self.attention(self.layer_norm(x, f"{pre}.input_layernorm"), pre, positions, cos, sin))
            h = self.layer_norm(x, f"{pre}.post_attention_layernorm")
            with self.g.scope("mlp"):
                h = self.linear(self.gelu(self.linear(h, f"{pre}.mlp.fc1.weight", bias=True)), f"{pre}.mlp.fc2.weight",
                                bias=True)
            return self.g.op("Add", x, h)

    def pixel_shuffle(self, x: ir.Value) -> ir.Value:
        """[N, P*P, C] -> [N, (P*r)^2, C/r^2], transformers' view/permute sequence step for step (r = 0.5)."""
        g, vs = self.g, self.vs
        side, c, r = vs.patches_per_side, vs.hidden_size, vs.pixel_shuffle_ratio
        x = g.op("Reshape", x, g.i64(-1, side, int(side * r), int(c / r)))  # [N, h, w*r, C/r]
        x = g.op("Transpose", x, perm=[0, 2, 1, 3])
        x = g.op("Reshape", x, g.i64(-1, int(side * r), int(side * r), int(c / r**2)))
        x = g.op("Transpose", x, perm=[0, 2, 1, 3])
        return g.op("Reshape", x, g.i64(-1, int(side * r) ** 2, int(c / r**2)))

    def build(self) -> ir.Model:
        g, vs = self.g, self.vs
        pixels = g.input("pixel_values", self.dt, ["num_tiles", vs.num_channels, vs.image_size, vs.image_size])
        x = self.embed(pixels)
        with g.scope("vision_model.rotary_embedding"):
            cos, sin = (g.const(t.astype(g.np_dtype)) for t in vs.rope_tables())
            batch = g.op("Slice", g.op("Shape", x), g.i64(0), g.i64(1))
            tokens = vs.patches_per_side**2 + 1
            positions = g.op("Expand", g.const(np.arange(tokens, dtype=np.int64)[None]),
                             g.op("Concat", batch, g.i64(tokens), axis=0))  # [N, P*P + 1]
        for n in range(vs.num_layers):
            x = self.layer(x, n, positions, cos, sin)
        x = self.layer_norm(x, "vision_model.layernorm_post")
        with g.scope("vision_model.vision_adapter"):
            x = g.op("Slice", x, g.i64(0), g.i64(-1), g.i64(1))  # drop the class token (last)
            x = self.pixel_shuffle(x)
            x = self.gelu(self.linear(x, "vision_model.vision_adapter.mlp.fc1.weight"))
            x = self.gelu(self.linear(x, "vision_model.vision_adapter.mlp.fc2.weight"))
        with g.scope("multi_modal_projector"):
            x = g.op("Reshape", x, g.i64(-1, vs.vision_output_dim))
            x = self.linear(x, "multi_modal_projector.linear_1.weight")  # [N*T, text_hidden]
        g.output(x, "image_features", self.dt, ["num_image_tokens", self.text_hidden])
        return g.model(doc="Llama 4 vision encoder + projector, exported by l4export", name="llama4_vision")


def export_vision(ckpt: Checkpoint, out, plan: ExportPlan, np_dtype: Any) -> dict[str, Any]:
    """Write vision.onnx + vision.onnx.data; return its l4export.json entry."""
    builder = VisionBuilder(ckpt, plan, np_dtype)
    model = builder.build()
    total = sum(int(v.const_value.nbytes) for v in builder.g.initializers if v.const_value is not None)
    save_model(model, out, total, VISION_FILE, VISION_DATA)
    vs = ckpt.spec.vision
    return {"model": VISION_FILE, "data": VISION_DATA, "nodes": len(builder.g.nodes), "weight_bytes": total,
            "tile_size": vs.image_size, "tokens_per_tile": vs.tokens_per_tile, "image_token_id": vs.image_token_id,
            "quant_nodes": dict(builder.lo.counts)}
