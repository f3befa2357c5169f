"""The l4export MLX runtime: Llama 4 text, spec-exact, in one file (needs numpy, mlx; tokenizers for text).

It mirrors transformers' ``modeling_llama4.py`` layer by layer and follows the config where mlx-lm hard-codes:

    |                       | this runtime (spec)                         | mlx-lm 0.32 llama4.py         |
    |-----------------------|---------------------------------------------|-------------------------------|
    | qk-norm epsilon       | rms_norm_eps (1e-5)                         | 1e-6                          |
    | NoPE / chunked layers | no_rope_layers / layer_types                | (i + 1) % 4                   |
    | MoE layers            | moe_layers                                  | i % step == step - 1          |
    | routed experts / token| num_experts_per_tok                         | asserts 1                     |
    | router                | float32 logits, top-k, sigmoid              | model dtype logits            |

Per decoder layer, for S new tokens at absolute positions p0 .. p0+S-1 (batch of one)::

    x ─ RMSNorm ─ q,k,v ─ RoPE (interleaved, RoPE layers) ─ qk-norm (per head) ─ temperature (NoPE layers)
      │                                   KV cache: chunked layers keep only the current chunk
      └──────── + o_proj(softmax(q·kᵀ/√d + mask)·v) = h
    h ─ RMSNorm ─ MoE: shared(x) + Σ_topk expert_e(x · sigmoid(router_e))   (score scales the expert INPUT)
      │           or dense SwiGLU
      └──────── + = next x

Compute dtype: mlx's GatherMM (the stacked-expert matmul) runs only in float32 on the CPU, so there the
runtime computes in float32 whatever the export stores; on Metal it computes in the export's dtype.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import CapabilityError, CheckpointError, UsageError
from ..spec import LayerSpec
from .base import Runtime

log = logging.getLogger(__name__)

try:
    import mlx.core as mx
except ImportError:  # pragma: no cover - exercised only without mlx
    mx = None

PREFIX = "language_model."
DTYPES = ("float32", "float16", "bfloat16")


def device_dtypes() -> tuple[str, ...]:
    """Compute dtypes this machine's default MLX device can run Llama 4 in (first = preferred)."""
    if mx.metal.is_available() and mx.default_device().type == mx.gpu:
        return ("bfloat16", "float16", "float32")
    return ("float32",)  # CPU: "[GatherMM::eval] Currently only supports float32."


def pick_dtype(stored: str, requested: str | None) -> str:
    """The compute dtype: the request if the device runs it, else the stored dtype if it can, else float32."""
    ok = device_dtypes()
    if requested is not None:
        if requested not in DTYPES:
            raise UsageError(f"dtype {requested!r} is not one of {', '.join(DTYPES)}")
        if requested not in ok:
            raise CapabilityError(
                f"mlx on {mx.default_device()} cannot run Llama 4 experts (GatherMM) in {requested}; "
                f"use dtype {' or '.join(ok)}"
            )
        return requested
    return stored if stored in ok else ok[0]


class LayerCache:
    """Keys and values of one layer for positions [start, end). A chunked layer keeps only the current chunk."""

    def __init__(self, chunk: int | None):
        self.chunk = chunk  # attention_chunk_size for chunked layers, None for global ones
        self.start = 0  # absolute position of keys[0]
        self.keys = None  # (n_kv, T, D)
        self.values = None

    def extend(self, k, v):
        """Append this step's keys/values; return everything the step's queries may look at."""
        if self.keys is None:
            self.keys, self.values = k, v
        else:
            self.keys = mx.concatenate([self.keys, k], axis=1)
            self.values = mx.concatenate([self.values, v], axis=1)
        return self.keys, self.values

    def trim(self, next_pos: int) -> None:
        """Drop keys no later query can see: for a chunked layer, those before the chunk of ``next_pos``."""
        if self.chunk is None or self.keys is None:
            return
        keep_from = (next_pos // self.chunk) * self.chunk
        drop = keep_from - self.start
        if drop > 0:
            self.keys, self.values = self.keys[:, drop:], self.values[:, drop:]
            self.start = keep_from

    @property
    def length(self) -> int:
        return 0 if self.keys is None else int(self.keys.shape[1])


class MlxRuntime(Runtime):
    format = "mlx"

    def __init__(self, path: str | Path, dtype: str | None = None):
        if mx is None:
            raise UsageError("the MLX runtime needs mlx: pip install mlx (Apple silicon) or 'mlx[cpu]' (Linux)")
        super().__init__(path)
        spec = self.spec
        if spec.top_k < 1 or spec.top_k > spec.num_experts:
            raise CheckpointError(f"{path}: num_experts_per_tok={spec.top_k} outside 1..{spec.num_experts}")
        stored = str(self.info.get("dtype") or spec.torch_dtype)
        self.dtype_name = pick_dtype(stored, dtype)
        self.dtype = getattr(mx, self.dtype_name)
        self.w = self._load_weights()
        self.inv_freq = mx.array(spec.inv_freq())  # (D/2,) float32, exactly as transformers computes it
        self.scale = spec.head_dim**-0.5
        self.reset()
        log.info("MLX runtime: %s, computing in %s on %s", self.path, self.dtype_name, mx.default_device())

    # ---- weights -----------------------------------------------------------------------------
    def _load_weights(self) -> dict:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = [p.name for p in sorted(self.path.glob("*.safetensors"))]
        if not files:
            raise CheckpointError(f"{self.path}: no safetensors weights; re-run 'l4export convert --format mlx'")
        w = {}
        for f in files:
            for name, arr in mx.load(str(self.path / f)).items():
                key = name[len(PREFIX):] if name.startswith(PREFIX) else name
                if key.endswith(".scales"):
                    # Quantized exports (QuantizedLinear / QuantizedSwitchLinear: weight uint32 + scales [+ biases])
                    # plug in here via mx.quantized_matmul / mx.gather_qmm; not supported yet.
                    raise CapabilityError(f"{self.path}: quantized MLX exports are not supported by this runtime yet")
                # Routers stay float32: HF applies the sigmoid in fp32, and bf16 near-ties flip top-1 choices.
                w[key] = arr.astype(mx.float32 if ".router." in key else self.dtype)
        need = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
        missing = [n for n in need if n not in w]
        if missing:
            raise CheckpointError(f"{self.path}: export lacks {PREFIX}{missing[0]}; re-run 'l4export convert --format mlx'")
        mx.eval(w)
        return w

    def _linear(self, x, name: str):
        """x @ Wᵀ for an nn.Linear-style weight [out, in]. (A QuantizedLinear would use mx.quantized_matmul here.)"""
        return x @ self.w[name + ".weight"].T

    # ---- Runtime API ---------------------------------------------------------------------------
    def reset(self) -> None:
        self.pos = 0
        self.cache = [LayerCache(self.spec.attention_chunk_size if la.chunked else None) for la in self.spec.layers]

    def forward(self, ids: Sequence[int]) -> np.ndarray:
        ids = [int(i) for i in ids]
        if not ids:
            raise UsageError("forward needs at least one token id")
        if min(ids) < 0 or max(ids) >= self.spec.vocab_size:
            raise UsageError(f"token ids must be in 0..{self.spec.vocab_size - 1}; got {min(ids)}..{max(ids)}")
        S, p0 = len(ids), self.pos
        positions = np.arange(p0, p0 + S)
        x = self.w["model.embed_tokens.weight"][mx.array(ids)]  # (S, H)
        for layer, cache in zip(self.spec.layers, self.cache):
            x = self._layer(x, layer, cache, positions)
        x = self._rms_norm(x, self.w["model.norm.weight"])
        logits = self._linear(x, "lm_head").astype(mx.float32)  # (S, V)
        mx.eval(logits)
        self.pos += S
        for cache in self.cache:
            cache.trim(self.pos)
        return np.array(logits)

    # ---- the model -----------------------------------------------------------------------------
    def _rms_norm(self, x, weight):
        # transformers: (x.float() * rsqrt(mean(x²) + eps)).type_as(x) * weight
        return mx.fast.rms_norm(x, weight, self.spec.rms_norm_eps)

    def _layer(self, x, layer: LayerSpec, cache: LayerCache, positions: np.ndarray):
        p = f"model.layers.{layer.index}."
        h = x + self._attention(self._rms_norm(x, self.w[p + "input_layernorm.weight"]), layer, cache, positions)
        y = self._rms_norm(h, self.w[p + "post_attention_layernorm.weight"])
        y = self._moe(y, p + "feed_forward.") if layer.is_moe else self._mlp(y, p + "feed_forward.")
        return h + y

    def _rope(self, x, positions: np.ndarray):
        """Interleaved (complex) RoPE: rotate adjacent pairs (2i, 2i+1) by pos·inv_freq[i]. x: (n, S, D)."""
        # IMPORTANT: Llama 4 rotates adjacent pairs (view_as_complex), not neox halves (rotate_half).
        angles = mx.array(positions.astype(np.float32))[:, None] * self.inv_freq[None, :]  # (S, D/2) float32
        cos, sin = mx.cos(angles), mx.sin(angles)
        n, S, D = x.shape
        xf = x.astype(mx.float32).reshape(n, S, D // 2, 2)  # (n, S, D/2, 2)
        x0, x1 = xf[..., 0], xf[..., 1]
        out = mx.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)  # (n, S, D/2, 2)
        return out.reshape(n, S, D).astype(x.dtype)

    def _attention(self, x, layer: LayerSpec, cache: LayerCache, positions: np.ndarray):
        spec, p = self.spec, f"model.layers.{layer.index}.self_attn."
        S, D = x.shape[0], spec.head_dim
        q = self._linear(x, p + "q_proj").reshape(S, spec.num_heads, D).transpose(1, 0, 2)  # (nh, S, D)
        k = self._linear(x, p + "k_proj").reshape(S, spec.num_kv_heads, D).transpose(1, 0, 2)  # (nkv, S, D)
        v = self._linear(x, p + "v_proj").reshape(S, spec.num_kv_heads, D).transpose(1, 0, 2)  # (nkv, S, D)
        if layer.uses_rope:
            q, k = self._rope(q, positions), self._rope(k, positions)
        if layer.qk_norm:
            # IMPORTANT: weightless RMS norm per head over head_dim, eps = rms_norm_eps (mlx-lm: 1e-6), in fp32.
            eps = spec.rms_norm_eps
            q = mx.fast.rms_norm(q.astype(mx.float32), None, eps).astype(q.dtype)
            k = mx.fast.rms_norm(k.astype(mx.float32), None, eps).astype(k.dtype)
        if layer.temperature_tuning:
            # NoPE layers: q *= 1 + attn_scale·log1p(floor((pos+1)/floor_scale)), pos = absolute cache position.
            t = mx.array(spec.attn_temperature(positions))[None, :, None]  # (1, S, 1)
            q = (q.astype(mx.float32) * t).astype(q.dtype)
        keys, values = cache.extend(k, v)  # (nkv, T, D), positions cache.start .. p0+S-1
        kpos = np.arange(cache.start, cache.start + keys.shape[1])
        allowed = kpos[None, :] <= positions[:, None]  # (S, T) causal
        if cache.chunk is not None:  # chunks aligned to absolute positions 0, C, 2C, ...
            allowed &= (kpos[None, :] // cache.chunk) == (positions[:, None] // cache.chunk)
        out = mx.fast.scaled_dot_product_attention(
            q[None], keys[None], values[None], scale=self.scale, mask=mx.array(allowed)
        )  # (1, nh, S, D); grouped-query heads share kv heads
        out = out[0].transpose(1, 0, 2).reshape(S, spec.num_heads * D)  # (S, nh·D)
        return self._linear(out, p + "o_proj")

    def _mlp(self, x, p: str):
        """Dense SwiGLU (and the shared expert): down(silu(gate(x)) · up(x))."""
        g, u = self._linear(x, p + "gate_proj"), self._linear(x, p + "up_proj")
        return self._linear(mx.sigmoid(g) * g * u, p + "down_proj")

    def _moe(self, x, p: str):
        k = self.spec.top_k
        logits = x.astype(mx.float32) @ self.w[p + "router.weight"].T  # (S, E) float32
        idx = mx.argpartition(-logits, kth=k - 1, axis=-1)[:, :k]  # (S, k) top-k experts
        scores = mx.sigmoid(mx.take_along_axis(logits, idx, axis=-1))  # (S, k); no softmax, no renormalisation
        # IMPORTANT: the router score scales the expert INPUT, not its output.
        xin = (x[:, None, :].astype(mx.float32) * scores[..., None]).astype(x.dtype)[:, :, None, :]  # (S, k, 1, H)
        e = p + "experts."
        # Stacked experts [E, out, in]; gather_mm picks expert idx[s, j] for row (s, j).
        g = mx.gather_mm(xin, self.w[e + "gate_proj.weight"].swapaxes(-1, -2), rhs_indices=idx)  # (S, k, 1, I)
        u = mx.gather_mm(xin, self.w[e + "up_proj.weight"].swapaxes(-1, -2), rhs_indices=idx)  # (S, k, 1, I)
        a = mx.sigmoid(g) * g * u
        out = mx.gather_mm(a, self.w[e + "down_proj.weight"].swapaxes(-1, -2), rhs_indices=idx)  # (S, k, 1, H)
        routed = out.squeeze(2).sum(axis=1)  # (S, H): Σ over the k chosen experts
        return routed + self._mlp(x, p + "shared_expert.")  # the shared expert sees the unscaled x
