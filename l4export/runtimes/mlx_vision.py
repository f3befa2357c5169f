"""Llama 4's vision encoder and projector in MLX, for the l4export MLX runtime (numpy + mlx).

Mirrors transformers' ``Llama4VisionModel`` + ``Llama4MultiModalProjector`` (the ONNX graph in
exporter/onnx_vision.py follows the same steps; see its docstring for the shapes). Where it differs from mlx-vlm's
llama4 vision (which uses GELU's tanh approximation and complex arithmetic), it follows transformers: exact GELU, the
2D RoPE as real arithmetic on interleaved pairs with float32 cos/sin tables (``VisionSpec.rope_tables``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..spec import VisionSpec

try:
    import mlx.core as mx
except ImportError:  # pragma: no cover - exercised only without mlx
    mx = None

V = "vision_model"
Linear = Callable[..., object]  # (x, module name) -> x @ W^T (float or quantized)


class VisionEncoder:
    """Image tiles -> image features with the runtime's weights (``w``: float arrays by name; ``linear``: the
    runtime's float-or-quantized matmul)."""

    def __init__(self, vs: VisionSpec, w: dict, linear: Linear, dtype):
        self.vs, self.w, self._linear, self.dtype = vs, w, linear, dtype
        cos, sin = vs.rope_tables()
        self.cos, self.sin = mx.array(cos)[:, None, :], mx.array(sin)[:, None, :]  # (L, 1, D/2) float32

    def linear(self, x, name: str, bias: bool = False):
        y = self._linear(x, name)
        return y + self.w[name + ".bias"] if bias else y

    def norm(self, x, name: str):
        return mx.fast.layer_norm(x, self.w[name + ".weight"], self.w[name + ".bias"], self.vs.norm_eps)

    @staticmethod
    def gelu(x):
        return x * (1 + mx.erf(x / math.sqrt(2.0))) / 2  # nn.GELU(): exact

    def rope(self, x):
        """(N, L, h, D): rotate interleaved pairs (2i, 2i+1) by the 2D angles, in float32 (as transformers)."""
        n, L, h, d = x.shape
        pairs = x.astype(mx.float32).reshape(n, L, h, d // 2, 2)
        re, im = pairs[..., 0], pairs[..., 1]
        out = mx.stack([re * self.cos - im * self.sin, re * self.sin + im * self.cos], axis=-1)
        return out.reshape(n, L, h, d).astype(x.dtype)

    def attention(self, x, pre: str):
        n, L, c = x.shape
        h = self.vs.num_heads
        q, k, v = (self.linear(x, f"{pre}.self_attn.{p}_proj", bias=True).reshape(n, L, h, c // h) for p in "qkv")
        q, k = self.rope(q), self.rope(k)
        o = mx.fast.scaled_dot_product_attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                                                 scale=(c // h) ** -0.5)  # (N, h, L, D); non-causal, no mask
        return self.linear(o.transpose(0, 2, 1, 3).reshape(n, L, c), f"{pre}.self_attn.o_proj", bias=True)

    def layer(self, x, i: int):
        pre = f"{V}.model.layers.{i}"
        x = x + self.attention(self.norm(x, f"{pre}.input_layernorm"), pre)
        h = self.norm(x, f"{pre}.post_attention_layernorm")
        return x + self.linear(self.gelu(self.linear(h, f"{pre}.mlp.fc1", bias=True)), f"{pre}.mlp.fc2", bias=True)

    def pixel_shuffle(self, x):
        """(N, P*P, C) -> (N, (P r)^2, C / r^2): transformers' view/permute sequence step for step."""
        vs = self.vs
        side, c, r = vs.patches_per_side, vs.hidden_size, vs.pixel_shuffle_ratio
        x = x.reshape(-1, side, int(side * r), int(c / r)).transpose(0, 2, 1, 3)
        x = x.reshape(-1, int(side * r), int(side * r), int(c / r**2)).transpose(0, 2, 1, 3)
        return x.reshape(-1, int(side * r) ** 2, int(c / r**2))

    def __call__(self, pixel_values: np.ndarray) -> np.ndarray:
        vs = self.vs
        side, p, ch = vs.patches_per_side, vs.patch_size, vs.num_channels
        x = mx.array(pixel_values).astype(self.dtype)
        n = x.shape[0]
        x = x.reshape(n, ch, side, p, side, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, side * side, ch * p * p)  # unfold
        x = self.linear(x, f"{V}.patch_embedding.linear")
        cls = mx.broadcast_to(self.w[f"{V}.class_embedding"], (n, 1, vs.hidden_size))
        x = mx.concatenate([x, cls], axis=1) + self.w[f"{V}.positional_embedding_vlm"]  # class token LAST
        x = self.norm(x, f"{V}.layernorm_pre")
        for i in range(vs.num_layers):
            x = self.layer(x, i)
        x = self.norm(x, f"{V}.layernorm_post")[:, :-1]  # drop the class token
        x = self.gelu(self.linear(self.pixel_shuffle(x), f"{V}.vision_adapter.mlp.fc1"))
        x = self.gelu(self.linear(x, f"{V}.vision_adapter.mlp.fc2"))
        out = self.linear(x.reshape(-1, vs.vision_output_dim), "multi_modal_projector.linear_1").astype(mx.float32)
        mx.eval(out)
        return np.array(out)
