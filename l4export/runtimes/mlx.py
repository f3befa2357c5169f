"""The l4export MLX runtime: Llama 4, spec-exact (needs numpy, mlx; tokenizers for text; Pillow for images).
The vision encoder (exports with the vision path) is in mlx_vision.py.

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
from pathlib import Path

import numpy as np

from ..errors import CapabilityError, CheckpointError, ExportError, UsageError
from ..names import is_vision
from ..spec import LayerSpec
from .base import Runtime, chunk_start

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


KV_MODES = {"int8": dict(bits=8, mode="affine"), "fp8": dict(bits=8, mode="mxfp8")}  # run-time KV quantization


class LayerCache:
    """Keys and values of one layer in a preallocated buffer, grown in steps of ``STEP`` rows (as mlx-lm's KVCache),
    written in place. A chunked layer holds only the current chunk: a step that starts a chunk starts at row 0
    (steps never cross a chunk boundary, base.Runtime.steps), so every key it holds is visible to its queries.

    ``kv``: None (the compute dtype) or a KV_MODES entry: each new key/value row is quantized as it arrives (groups of
    ``group`` along head_dim, mx.quantize), and the buffers hold codes, scales [and biases], not floats."""

    STEP = 256

    def __init__(self, chunk: int | None, kv: dict | None = None, group: int = 64):
        self.chunk = chunk  # attention_chunk_size for chunked layers, None for global ones
        self.kv, self.group = kv, group
        self.keys: list | None = None  # arrays (n_kv, capacity, ...): [float] or [codes, scales(, biases)]
        self.values: list | None = None
        self.length = 0  # valid rows

    def _parts(self, x) -> list:
        if self.kv is None:
            return [x]
        return [a for a in mx.quantize(x, group_size=self.group, **self.kv) if a is not None]

    def update(self, k, v, pos: int) -> tuple[list, list]:
        """Write this step's keys/values (n_kv, S, D) at absolute position ``pos``; return the valid rows (as parts)."""
        if self.chunk is not None and pos % self.chunk == 0:
            self.length = 0  # a new chunk: the previous one is never seen again
        kp, vp = self._parts(k), self._parts(v)
        end = self.length + k.shape[1]
        if self.keys is None or end > self.keys[0].shape[1]:
            rows = ((end + self.STEP - 1) // self.STEP) * self.STEP
            if self.chunk is not None:
                rows = min(rows, max(self.chunk, end))
            self.keys, self.values = self._grow(self.keys, kp, rows), self._grow(self.values, vp, rows)
        for buf, new in zip(self.keys + self.values, kp + vp):
            buf[:, self.length : end] = new
        self.length = end
        return [a[:, :end] for a in self.keys], [a[:, :end] for a in self.values]

    def _grow(self, old: list | None, like: list, rows: int) -> list:
        fresh = [mx.zeros((a.shape[0], rows, *a.shape[2:]), a.dtype) for a in like]
        if old is None:
            return fresh
        return [mx.concatenate([o[:, : self.length], f[:, self.length :]], axis=1) for o, f in zip(old, fresh)]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.keys or []) + (self.values or []))


class MlxRuntime(Runtime):
    format = "mlx"

    def __init__(self, path: str | Path, dtype: str | None = None, prefill_step: int | None = None,
                 kv_dtype: str | None = None):
        if mx is None:
            raise UsageError("the MLX runtime needs mlx: pip install mlx (Apple silicon) or 'mlx[cpu]' (Linux)")
        # The spec is read past mlx-lm's "quantization_config" copy (spec.py reads that key as a source checkpoint's
        # compressed-tensors FP8 config only when it has a quant_method).
        super().__init__(path, prefill_step)
        if kv_dtype is not None and kv_dtype not in KV_MODES:
            raise UsageError(f"--kv-dtype {kv_dtype!r}: the MLX runtime quantizes the KV cache to {' or '.join(KV_MODES)}")
        self.kv_dtype = kv_dtype
        # groups along head_dim: 64 for int8 (as mlx-lm's kv_bits), 32 for mxfp8 (its only group size)
        self.kv_group = 32 if kv_dtype == "fp8" or self.spec.head_dim % 64 else 64
        spec = self.spec
        if spec.top_k < 1 or spec.top_k > spec.num_experts:
            raise CheckpointError(f"{path}: num_experts_per_tok={spec.top_k} outside 1..{spec.num_experts}")
        stored = str(self.info.dtype or spec.torch_dtype)
        self.dtype_name = pick_dtype(stored, dtype)
        self.dtype = getattr(mx, self.dtype_name)
        self.w = self._load_weights()
        self.rope_freqs = mx.array(1.0 / spec.inv_freq())  # (D/2,) wavelengths / 2π, from transformers' inv_freq
        self.scale = spec.head_dim**-0.5
        self.encoder = None  # the vision encoder (mlx_vision.py), built on the first image
        self._reset()
        log.info("MLX runtime: %s, computing in %s on %s", self.path, self.dtype_name, mx.default_device())

    # ---- weights -----------------------------------------------------------------------------
    def _quant_params(self) -> dict:
        """config.json "quantization" (or its "quantization_config" copy): {} for a float export."""
        cfg_path = self.path / "config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        q = cfg.get("quantization") or cfg.get("quantization_config") or {}
        return q if isinstance(q, dict) else {}

    def _load_weights(self) -> dict:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = [p.name for p in sorted(self.path.glob("*.safetensors"))]
        if not files:
            raise CheckpointError(f"{self.path}: no safetensors weights; re-run 'l4export convert --format mlx'")
        raw = {}
        for f in files:
            try:
                arrays = mx.load(str(self.path / f))
            except (OSError, RuntimeError, ValueError) as err:
                raise ExportError(f"{self.path / f}: mlx cannot read it ({str(err).splitlines()[0][:200]}); the export "
                                  "is damaged or incomplete, convert it again") from None
            for name, arr in arrays.items():
                raw[name[len(PREFIX):] if name.startswith(PREFIX) else name] = arr
        qcfg = self._quant_params()
        # Quantized modules (QuantizedLinear / QuantizedSwitchLinear): weight uint32 + scales [+ biases].
        self.q: dict[str, tuple] = {}
        for key in [k for k in raw if k.endswith(".scales")]:
            module = key[: -len(".scales")]
            path = module if is_vision(module) else PREFIX + module
            entry = qcfg.get(path, {k: qcfg[k] for k in ("group_size", "bits", "mode") if k in qcfg})
            if not isinstance(entry, dict) or "group_size" not in entry or "bits" not in entry:
                raise CheckpointError(f"{self.path}: {PREFIX}{module} is quantized but config.json's \"quantization\" "
                                      "gives no group_size/bits for it; re-run 'l4export convert --format mlx --quant ...'")
            mode = entry.get("mode", "affine")
            scales = raw.pop(key)
            biases = raw.pop(module + ".biases", None)
            if mode == "affine":
                scales, biases = scales.astype(self.dtype), biases.astype(self.dtype)
            qw = (raw.pop(module + ".weight"), scales, biases, int(entry["group_size"]), int(entry["bits"]), mode)
            if module.endswith((".router", "embed_tokens")):
                # The router stays float32 (routing decisions); embedding rows are a lookup: dequantize once.
                dq = mx.dequantize(qw[0], qw[1], qw[2], group_size=qw[3], bits=qw[4], mode=mode)
                raw[module + ".weight"] = dq
            else:
                self.q[module] = qw
        w = {}
        for key, arr in raw.items():
            # Routers stay float32: HF applies the sigmoid in fp32, and bf16 near-ties flip top-1 choices.
            w[key] = arr.astype(mx.float32 if ".router." in key else self.dtype)
        need = ["model.embed_tokens.weight", "model.norm.weight"]
        missing = [n for n in need if n not in w] + ([] if "lm_head.weight" in w or "lm_head" in self.q else ["lm_head.weight"])
        if missing:
            raise CheckpointError(f"{self.path}: export lacks {PREFIX}{missing[0]}; re-run 'l4export convert --format mlx'")
        # per-expert widths (mixed:B:per-expert): module -> each expert's bits and its row in its width's stack
        self.widths: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for path, entry in qcfg.items():
            if isinstance(entry, dict) and "per_expert_bits" in entry:
                bits = np.array(entry["per_expert_bits"], np.int64)
                local = np.array([int((bits[:e] == b).sum()) for e, b in enumerate(bits)], np.int64)
                self.widths[path[len(PREFIX):] if path.startswith(PREFIX) else path] = (bits, local)
        if self.q:
            log.info("MLX runtime: %d quantized modules (%s)", len(self.q),
                     ", ".join(sorted({f"{m}{b}" for _, _, _, _, b, m in self.q.values()})))
        mx.eval(w, [a for v in self.q.values() for a in v[:3] if a is not None])
        return w

    def _linear(self, x, name: str):
        """x @ Wᵀ for an nn.Linear-style weight [out, in], or mx.quantized_matmul for a quantized one."""
        if name in self.q:
            wq, scales, biases, g, bits, mode = self.q[name]
            return mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=g, bits=bits, mode=mode)
        return x @ self.w[name + ".weight"].T

    def _gather(self, x, name: str, idx):
        """Stacked experts [E, out, in]: row (s, j) of x times expert idx[s, j] (gather_mm / gather_qmm)."""
        if name in self.widths:
            return self._gather_widths(x, name, idx)
        if name in self.q:
            wq, scales, biases, g, bits, mode = self.q[name]
            return mx.gather_qmm(x, wq, scales, biases, rhs_indices=idx, transpose=True, group_size=g, bits=bits, mode=mode)
        return mx.gather_mm(x, self.w[name + ".weight"].swapaxes(-1, -2), rhs_indices=idx)

    def _gather_widths(self, x, name: str, idx):
        """Per-expert widths: each width's stack takes the rows routed to its experts (gather_qmm at its bits), and
        the rows come back in place. Which rows go where is read from the evaluated routing (one sync per MoE
        projection: the price of the opt-in; the stacks' codes have different row widths, so no single kernel
        reads them)."""
        bits, local = self.widths[name]
        s, k = idx.shape
        flat = np.array(idx).reshape(-1)  # (S·k,) experts, evaluated here
        rows_x = x.reshape(s * k, 1, 1, x.shape[-1])
        order, parts = [], []
        for b in sorted(set(bits[flat].tolist())):
            rows = np.flatnonzero(bits[flat] == b)
            wq, scales, biases, g, nb, mode = self.q[f"{name}.int{b}"]
            at = mx.array(local[flat[rows]].reshape(-1, 1).astype(np.uint32))
            parts.append(mx.gather_qmm(rows_x[mx.array(rows)], wq, scales, biases, rhs_indices=at, transpose=True,
                                       group_size=g, bits=nb, mode=mode))
            order.append(rows)
        out = mx.concatenate(parts, axis=0)[mx.array(np.argsort(np.concatenate(order)))]  # (S·k, 1, 1, out)
        return out.reshape(s, k, 1, out.shape[-1])

    # ---- Runtime API ---------------------------------------------------------------------------
    def _reset(self) -> None:
        kv = KV_MODES.get(self.kv_dtype)
        self.cache = [LayerCache(self.spec.attention_chunk_size if la.chunked else None, kv, self.kv_group)
                      for la in self.spec.layers]

    def _save(self) -> tuple[list, int]:
        # copies as mx arrays (bf16 has no numpy form); the cache's later in-place writes do not reach them
        state = [(c.length, [mx.array(a[:, : c.length]) for a in (c.keys or []) + (c.values or [])]) for c in self.cache]
        mx.eval([a for _, parts in state for a in parts])
        return state, sum(a.nbytes for _, parts in state for a in parts)

    def _load(self, state: list) -> None:
        for cache, (length, parts) in zip(self.cache, state):
            if length:
                arrays = [mx.array(a) for a in parts]
                half = len(arrays) // 2
                cache.keys, cache.values, cache.length = arrays[:half], arrays[half:], length

    def _truncate(self, pos: int) -> None:
        chunk = self.spec.attention_chunk_size
        for la, cache in zip(self.spec.layers, self.cache):
            cache.length = pos - chunk_start(pos, chunk) if la.chunked else pos

    def _encode_tiles(self, pixel_values: np.ndarray) -> np.ndarray:
        if self.encoder is None:
            from .mlx_vision import VisionEncoder

            self.encoder = VisionEncoder(self.vision, self.w, self._linear, self.dtype)
        return self.encoder(pixel_values)

    def _step(self, ids: list[int], n_logits: int, features: np.ndarray | None = None) -> np.ndarray:
        positions = np.arange(self.pos, self.pos + len(ids))
        x = self.w["model.embed_tokens.weight"][mx.array(ids)]  # (S, H)
        if features is not None and len(features):  # image features replace the <|patch|> tokens, in order
            rows = np.flatnonzero(np.asarray(ids) == self.vision.image_token_id)
            x[mx.array(rows)] = mx.array(features).astype(x.dtype)
        for layer, cache in zip(self.spec.layers, self.cache):
            x = self._layer(x, layer, lambda xn, la=layer, c=cache: self._attention(xn, la, c, positions))
        return self._logits(x[-n_logits:])  # logits only where asked

    def step_rows(self, ids: list[int], caches: list[list[LayerCache]], positions: list[int]) -> np.ndarray:
        """One token for each of B sequences, each with its own caches and position: logits (B, V). Every linear and
        expert runs once over the B rows; attention runs per row, over that row's cache (runtimes/batch.py)."""
        x = self.w["model.embed_tokens.weight"][mx.array(ids)]  # (B, H)
        for layer in self.spec.layers:
            x = self._layer(x, layer, lambda xn, la=layer: self._attention_rows(xn, la, caches, positions))
        return self._logits(x)

    def _logits(self, x) -> np.ndarray:
        logits = self._linear(self._rms_norm(x, self.w["model.norm.weight"]), "lm_head").astype(mx.float32)  # (n, V)
        mx.eval(logits)
        return np.array(logits)

    @property
    def cache_bytes(self) -> int:
        return sum(c.nbytes for c in self.cache)

    # ---- the model -----------------------------------------------------------------------------
    def _rms_norm(self, x, weight):
        # transformers: (x.float() * rsqrt(mean(x²) + eps)).type_as(x) * weight
        return mx.fast.rms_norm(x, weight, self.spec.rms_norm_eps)

    def _layer(self, x, layer: LayerSpec, attention):
        p = f"model.layers.{layer.index}."
        h = x + attention(self._rms_norm(x, self.w[p + "input_layernorm.weight"]))
        y = self._rms_norm(h, self.w[p + "post_attention_layernorm.weight"])
        y = self._moe(y, p + "feed_forward.") if layer.is_moe else self._mlp(y, p + "feed_forward.")
        return h + y

    def _rope(self, x, positions: np.ndarray):
        """Interleaved (complex) RoPE: rotate adjacent pairs (2i, 2i+1) by pos·inv_freq[i]. x: (n, S, D), positions
        contiguous. mx.fast.rope with ``traditional=True`` and the spec's own frequencies (llama3 scaling included)."""
        # IMPORTANT: Llama 4 rotates adjacent pairs (view_as_complex), not neox halves (rotate_half).
        return mx.fast.rope(x, x.shape[-1], traditional=True, base=None, scale=1.0, offset=int(positions[0]),
                            freqs=self.rope_freqs)

    def _qkv(self, x, p: str):
        """q (nh, S, D), k and v (nkv, S, D) of x (S, H): S tokens of one sequence, or one token of S sequences."""
        spec = self.spec
        S, D = x.shape[0], spec.head_dim
        q = self._linear(x, p + "q_proj").reshape(S, spec.num_heads, D).transpose(1, 0, 2)
        k = self._linear(x, p + "k_proj").reshape(S, spec.num_kv_heads, D).transpose(1, 0, 2)
        v = self._linear(x, p + "v_proj").reshape(S, spec.num_kv_heads, D).transpose(1, 0, 2)
        return q, k, v

    def _attention(self, x, layer: LayerSpec, cache: LayerCache, positions: np.ndarray):
        p = f"model.layers.{layer.index}.self_attn."
        out = self._attend(*self._qkv(x, p), layer, cache, positions)  # (nh, S, D)
        return self._linear(out.transpose(1, 0, 2).reshape(x.shape[0], -1), p + "o_proj")  # (S, nh·D) -> (S, H)

    def _attention_rows(self, x, layer: LayerSpec, caches: list[list[LayerCache]], positions: list[int]):
        """x (B, H): one token of each of B sequences; row b attends over caches[b] at positions[b]."""
        p = f"model.layers.{layer.index}.self_attn."
        q, k, v = self._qkv(x, p)  # (heads, B, D)
        outs = [self._attend(q[:, b: b + 1], k[:, b: b + 1], v[:, b: b + 1], layer, c[layer.index], np.array([pos]))
                for b, (c, pos) in enumerate(zip(caches, positions))]  # each (nh, 1, D)
        return self._linear(mx.concatenate(outs, axis=1).transpose(1, 0, 2).reshape(x.shape[0], -1), p + "o_proj")

    def _attend(self, q, k, v, layer: LayerSpec, cache: LayerCache, positions: np.ndarray):
        """RoPE, qk-norm and temperature as the layer has them, then attention over the cache: (nh, S, D)."""
        spec = self.spec
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
        keys, values = cache.update(k, v, int(positions[0]))  # (nkv, L, ...): all visible to this step's queries
        if self.kv_dtype is None:
            # causal within the step, aligned to the last key ("causal" is bottom-right); one query needs no mask
            out = mx.fast.scaled_dot_product_attention(
                q[None], keys[0][None], values[0][None], scale=self.scale, mask="causal" if len(positions) > 1 else None
            )  # (1, nh, S, D); grouped-query heads share kv heads
        else:
            out = self._quantized_attention(q, keys, values)[None]
        return out[0]

    def _quantized_attention(self, q, keys: list, values: list):
        """softmax(q kᵀ / √d + causal) v over a quantized cache, with quantized matmuls (the cache is never turned
        back into floats). q (nh, S, D) -> (nh, S, D); query heads of one kv head are stacked as rows."""
        nh, S, D = q.shape
        nkv = keys[0].shape[0]
        L = keys[0].shape[1]
        kw = dict(group_size=self.kv_group, **KV_MODES[self.kv_dtype])
        qg = (q.astype(mx.float32) * self.scale).reshape(nkv, (nh // nkv) * S, D)  # (nkv, G*S, D)
        parts = lambda p: (p[0], p[1], p[2] if len(p) > 2 else None)  # noqa: E731
        scores = mx.quantized_matmul(qg, *parts(keys), transpose=True, **kw)  # (nkv, G*S, L)
        if S > 1:  # causal within the step, the last query at the last key
            allowed = mx.arange(L)[None, :] <= (mx.arange(S) + L - S)[:, None]  # (S, L)
            scores = mx.where(mx.tile(allowed, (nh // nkv, 1))[None], scores, mx.array(-mx.inf, scores.dtype))
        probs = mx.softmax(scores, axis=-1, precise=True)
        out = mx.quantized_matmul(probs, *parts(values), transpose=False, **kw)  # (nkv, G*S, D)
        return out.reshape(nh, S, D).astype(q.dtype)

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
        g = self._gather(xin, e + "gate_proj", idx)  # (S, k, 1, I)
        u = self._gather(xin, e + "up_proj", idx)  # (S, k, 1, I)
        a = mx.sigmoid(g) * g * u
        out = self._gather(a, e + "down_proj", idx)  # (S, k, 1, H)
        routed = out.squeeze(2).sum(axis=1)  # (S, H): Σ over the k chosen experts
        return routed + self._mlp(x, p + "shared_expert.")  # the shared expert sees the unscaled x
