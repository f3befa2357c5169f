"""ONNX Runtime backend: one decoder session and an in-place KV cache for one sequence.

Each layer's cache is one preallocated buffer that GroupQueryAttention reads and appends to in place: the same
OrtValue is bound as ``past_key_values.{i}.*`` and as ``present.{i}.*`` (IO binding), so a step copies only its
new keys, never the cache. Chunked (RoPE) layers hold at most one chunk: their buffer has attention_chunk_size
rows, and when a step starts a new chunk it starts at row 0 again (``cache_start`` tells the graph where that
chunk begins). Global (NoPE) layers hold the whole sequence in a buffer sized by ``reserve`` (or grown by doubling).

``kv_dtype="int8"`` runs the export's ``model.kv-int8.onnx``, whose cache holds one byte per element with
per-channel static scales (a few per layer) that this runtime chooses as tokens arrive; scales only grow (x1.25
headroom, by at least GROWTH = 1.5). Each step also returns its new float keys and values.
- A step of several tokens (prefill) attends over the cached rows dequantized and its own float keys and values,
  and writes nothing to the cache; this runtime then grows the scales where the new rows do not fit (requantizing
  the cached rows) and quantizes the new rows into the cache, which is numpy memory that ORT reads in place. No step
  runs twice.
- A step of one token (decode): GroupQueryAttention quantizes what it appends with the current scales, in place;
  when the new key or value exceeds its layer's range, the scales grow as above and the step runs again (rare after
  a prompt).
Exports older than the prefill path run every step the decode way.

Exports with the vision path run three graphs: ``vision.onnx`` (image tiles -> image features, on demand),
``embedding.onnx`` (token embeddings with the image features at the <|patch|> tokens) and ``model.embeds.onnx`` (the
decoder on those embeddings); every step, text-only ones included, goes through the embedding graph.

Needs numpy and onnxruntime only (tokenizers for text, Pillow for images); no torch, transformers, onnx or onnx_ir.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..errors import CapabilityError, ExportError, UsageError
from ..folder import KV_PREFILL_KEY, MODEL_FILE
from .base import Runtime, chunk_start

log = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
KV_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}
HEADROOM = 1.25  # int8 KV scales leave this much room over the largest value seen
# and grow by at least this factor when a value does not fit. Measured on the trained demo (float32, 100 random ids,
# KL against the float cache; 2026-12-07): 2.0 gave KL 0.096 token by token from the first token (14 reruns) and
# 0.0022 decoding after a 50-token prompt (3 reruns); 1.5: 0.019 (19) and 0.0010 (4); 1.25: 0.0062 (26) and 0.0019
# (7); 1.0: 0.0025 (95) and 0.0007 (36). Every growth requantizes the cached rows, and a loose scale costs bits.
GROWTH = 1.5
MIN_CAPACITY = 256  # rows a global layer's buffer starts with when nothing was reserved


def session_options(threads: int | None = None):
    """Session options: deterministic thread count, quiet logging."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    # int4 Q/DQ fused into MatMulNBits defaults to int8 activations (accuracy level 4); keep what the graph says.
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    # ORT's own log lines only with -vv: its errors come back as exceptions, which the CLI prints as one line
    so.log_severity_level = 2 if log.isEnabledFor(logging.DEBUG) else 4
    if threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = int(os.environ["OMP_NUM_THREADS"])  # respect the usual knob on shared machines
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return so


class OnnxRuntime(Runtime):
    format = "onnx"

    def __init__(self, path: str | Path, provider: str | None = None, threads: int | None = None,
                 prefill_step: int | None = None, kv_dtype: str | None = None):
        super().__init__(path, prefill_step)
        self.files = self.info.onnx or {}  # l4export.json's "onnx" section: the graph files (exporter/onnx.py)
        try:
            import onnxruntime as ort
        except ImportError:
            raise UsageError("running ONNX exports needs onnxruntime: pip install onnxruntime") from None
        self.ort = ort
        provider = provider or ("cuda" if self.info.target == "cuda" else "cpu")
        model = self._model_file(kv_dtype, provider)
        if provider not in PROVIDERS:
            raise UsageError(f"--provider {provider!r} is not one of {', '.join(PROVIDERS)}")
        ep = PROVIDERS[provider]
        if ep not in ort.get_available_providers():
            raise CapabilityError(f"{self.path}: ONNX Runtime here has no {ep}; install onnxruntime-gpu or use --provider cpu")
        if provider == "cpu" and self.info.dtype == "bfloat16":
            raise CapabilityError(f"{self.path}: a bfloat16 export needs --provider cuda (ORT CPU has no bfloat16 MoE)")
        self._options, self._providers = session_options(threads), [ep]
        self.session = self._open(model.name)
        self.embedding = None  # embedding.onnx, for exports with the vision path
        self._vision = None  # vision.onnx, opened on the first image
        if self.vision is not None:
            self.embedding = self._open(self.files["embedding"])
        if "cache_start" not in {i.name for i in self.session.get_inputs()}:
            raise UsageError(f"{self.path}: exported by an older l4export (no in-place KV cache); convert it again")
        self.provider, self.device = provider, ("cuda" if provider == "cuda" else "cpu")
        self.plain = self.files.get("attention", "gqa") == "plain"  # capabilities.ATTENTION_FORMS
        kv = next(i for i in self.session.get_inputs() if i.name.startswith("past_key_values."))
        self.kv_dtype = KV_DTYPES.get(kv.type, np.float16)
        self.kv_quant = kv_dtype  # None: the cache is in the compute dtype
        meta = self.session.get_modelmeta().custom_metadata_map
        # int8 graphs with the float prefill path (exporter/onnx_variants.py): the cache is numpy memory we write
        self.host_cache = provider == "cpu" and meta.get(KV_PREFILL_KEY) == "dequantized"
        self.scales: list[list[np.ndarray]] = []  # per layer [key, value] int8 scales [1, Hkv, 1, D]
        self.chunk = self.spec.attention_chunk_size
        self.capacity = 0  # rows of the global layers' buffers
        self.cache: list[tuple] = []
        self._reset()

    def _open(self, name: str):
        """An ONNX Runtime session over one of the export's graphs; a damaged file is one line (ExportError)."""
        path = self.path / name
        if not path.is_file():
            raise ExportError(f"{self.path}: no {name}; the export is incomplete, convert it again")
        try:
            return self.ort.InferenceSession(str(path), sess_options=self._options, providers=self._providers)
        except Exception as err:  # ORT raises its own Fail/InvalidProtobuf/NoSuchFile/... types
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ExportError(f"{path}: ONNX Runtime cannot load it ({first[:200]}); the export is damaged or "
                              "incomplete, convert it again") from None

    def _model_file(self, kv_dtype: str | None, provider: str) -> Path:
        info = self.files
        embeds = self.vision is not None  # the decoder on inputs_embeds (embedding.onnx places the image features)
        name = info["embeds_decoder"] if embeds else info.get("model", MODEL_FILE)
        if kv_dtype is not None:
            variants = info.get("embeds_kv_variants" if embeds else "kv_variants", {})
            if kv_dtype not in variants:
                raise UsageError(f"--kv-dtype {kv_dtype!r}: this export has {', '.join(variants) or 'no'} quantized KV "
                                 "cache graphs; use one of them, or convert again with this l4export")
            if kv_dtype == "fp8" and provider == "cpu":
                raise CapabilityError("--kv-dtype fp8: ONNX Runtime's CPU GroupQueryAttention has no FP8 cache; use "
                                      "--kv-dtype int8 (or fp8 with --provider cuda on an SM89+ GPU, or the MLX runtime)")
            name = variants[kv_dtype]
        model = self.path / name
        if not model.is_file():
            raise ExportError(f"{self.path}: no {model.name}; the export is incomplete, convert it again")
        return model

    # ---- cache --------------------------------------------------------------------------------------
    def _buffer(self, rows: int):
        s = self.spec
        shape = (1, s.num_kv_heads, rows, s.head_dim)
        if self.host_cache:  # ORT reads and writes this numpy array in place
            a = np.zeros(shape, self.kv_dtype)
            return self.ort.OrtValue.ortvalue_from_numpy(a), a
        return self.ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, self.device, 0), None

    @property
    def can_reuse(self) -> bool:
        return self.kv_quant is None  # an int8/fp8 cache's scales follow everything it has seen

    def _truncate(self, pos: int) -> None:
        """GroupQueryAttention's buffers: nothing to do (a step attends to the first ``pos`` rows and writes after
        them). The plain-op attention's cache holds exactly the valid rows: sliced."""
        if not self.plain:
            return
        start = chunk_start(pos, self.chunk)
        cut = []
        for layer, kv in zip(self.spec.layers, self.cache):
            rows = pos - start if layer.chunked else pos
            cut.append(tuple(self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a.numpy()[:, :, :rows]),
                                                                    self.device, 0) for a in kv))
        self.cache = cut

    def _save(self) -> tuple[list, int]:
        start = self.chunk_start()
        rows = [self.pos - start if la.chunked else self.pos for la in self.spec.layers]
        state = [tuple(a.numpy()[:, :, :n].copy() for a in kv) for kv, n in zip(self.cache, rows)]
        return state, sum(k.nbytes + v.nbytes for k, v in state)

    def _load(self, state: list) -> None:
        if self.plain:  # the cache is exactly the valid rows
            self.cache = [tuple(self.ort.OrtValue.ortvalue_from_numpy(a, self.device, 0) for a in kv) for kv in state]
            return
        for buf, kv in zip(self.cache, state):  # (reserve made the buffers)
            for b, a in zip(buf, kv):
                dst = b.numpy()
                dst[:, :, : a.shape[2]] = a
                b.update_inplace(dst)

    def _reset(self) -> None:
        self.capacity = 0
        self.cache = [None] * self.spec.num_layers  # (key, value) OrtValues, allocated on first use
        self.host = [(None, None)] * self.spec.num_layers  # (key, value) numpy arrays behind them (host_cache)
        s = self.spec
        self.scales = [[np.zeros((1, s.num_kv_heads, 1, s.head_dim), np.float32) for _ in range(2)] for _ in s.layers]

    def reserve(self, tokens: int) -> None:
        """Size the global layers' buffers for ``tokens`` tokens now (no growth copies later)."""
        self._grow(tokens)

    def _grow(self, tokens: int) -> None:
        """Global buffers with room for ``tokens`` rows (doubling; the valid rows are copied over); chunked ones
        with room for one chunk."""
        if tokens <= self.capacity:
            return
        new = max(tokens, 2 * self.capacity, MIN_CAPACITY)
        new = min(new, max(tokens, self.spec.max_position_embeddings))
        for layer in self.spec.layers:
            old = self.cache[layer.index]
            if layer.chunked and self.chunk:
                if old is None:
                    rows = min(self.chunk, new)
                elif old[0].shape()[2] >= min(self.chunk, new):
                    continue
                else:
                    rows = min(self.chunk, new)
            else:
                rows = new
            pairs = [self._copy(old[j] if old else None, rows) for j in range(2)]
            self.cache[layer.index] = tuple(b for b, _ in pairs)
            self.host[layer.index] = tuple(a for _, a in pairs)
        self.capacity = new

    def _copy(self, old, rows: int):
        buf, host = self._buffer(rows)
        if old is not None and self.pos:  # keep the valid rows (only the global layers' ever grow past a chunk)
            valid = min(old.shape()[2], rows)
            dst, src = buf.numpy() if host is None else host, old.numpy()
            dst[:, :, :valid] = src[:, :, :valid]
            if host is None:
                buf.update_inplace(dst)
        return buf, host

    def chunk_start(self) -> int:
        """Absolute position of the first key the chunked layers' buffers hold: the start of the current chunk."""
        return chunk_start(self.pos, self.chunk)

    def cache_lengths(self) -> list[int]:
        """Keys held per layer (for tests and memory reports)."""
        return [self.pos - self.chunk_start() if la.chunked else self.pos for la in self.spec.layers]

    @property
    def cache_bytes(self) -> int:
        """Bytes of the KV cache buffers as allocated."""
        item = np.dtype(self.kv_dtype).itemsize
        return sum(2 * int(np.prod(kv[0].shape())) * item for kv in self.cache if kv is not None)

    # ---- one step ---------------------------------------------------------------------------------------
    def _encode_tiles(self, pixel_values: np.ndarray) -> np.ndarray:
        if self._vision is None:
            self._vision = self._open(self.files["vision"]["model"])
        x = pixel_values.astype(KV_DTYPES[self._vision.get_inputs()[0].type], copy=False)
        return self._vision.run(None, {"pixel_values": x})[0].astype(np.float32, copy=False)

    def _embeds(self, ids: list[int], features: np.ndarray | None) -> np.ndarray:
        """inputs_embeds [1, S, H] of ``ids`` with ``features`` over their <|patch|> tokens (embedding.onnx)."""
        dt = KV_DTYPES[self.embedding.get_inputs()[1].type]
        feats = np.zeros((0, self.spec.hidden_size), dt) if features is None else features.astype(dt, copy=False)
        return self.embedding.run(None, {"input_ids": np.asarray(ids, np.int64)[None], "image_features": feats})[0]

    def _step(self, ids: list[int], n_logits: int, features: np.ndarray | None = None) -> np.ndarray:
        self._grow(self.pos + len(ids))
        embeds = self._embeds(ids, features) if self.embedding is not None else None
        prefill = self.host_cache and len(ids) > 1  # the graph's float path: we write the cache (module docstring)
        while True:
            io = self._bind(ids, n_logits, embeds, prefill)
            self.session.run_with_iobinding(io)
            outs = io.get_outputs()
            if self.plain:  # the plain-op attention writes a new buffer: it becomes the cache
                self.cache = [(outs[1 + 2 * i], outs[2 + 2 * i]) for i in range(self.spec.num_layers)]
            if prefill:
                self._absorb([o.numpy() for o in outs[1: 1 + 2 * self.spec.num_layers]])
            elif self.kv_quant is not None and self._rescale([o.numpy() for o in outs[1:]]):
                continue
            return outs[0].numpy()[0].astype(np.float32, copy=False)

    def _bind(self, ids: list[int], n_logits: int, embeds: np.ndarray | None = None, prefill: bool = False):
        n, total = len(ids), self.pos + len(ids)
        io = self.session.io_binding()
        feeds = {
            **({"input_ids": np.asarray(ids, dtype=np.int64).reshape(1, n)} if embeds is None else {"inputs_embeds": embeds}),
            "attention_mask": np.ones((1, total), dtype=np.int64),
            "position_ids": np.arange(self.pos, total, dtype=np.int64).reshape(1, n),
        }
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        # scalars and scales beside the tokens (cache_start, num_logits_to_keep, the KV variants' scales), as OrtValues
        scalars = {"cache_start": np.array(self.chunk_start(), np.int64), "num_logits_to_keep": np.array(n_logits, np.int64)}
        if self.kv_quant is not None:
            for i, (ks, vs) in enumerate(self.scales):
                scalars[f"kv_scale.{i}.key"], scalars[f"kv_scale.{i}.value"] = np.maximum(ks, 1e-30), np.maximum(vs, 1e-30)
        for name, value in scalars.items():
            io.bind_ortvalue_input(name, self.ort.OrtValue.ortvalue_from_numpy(value))
        io.bind_output("logits", "cpu")  # first: get_outputs() lists outputs in binding order
        if self.kv_quant is not None:
            for i in range(self.spec.num_layers):
                io.bind_output(f"new_key.{i}", "cpu")
                io.bind_output(f"new_value.{i}", "cpu")
        for i, (k, v) in enumerate(self.cache):  # past and present are one buffer: appended in place
            io.bind_ortvalue_input(f"past_key_values.{i}.key", k)
            io.bind_ortvalue_input(f"past_key_values.{i}.value", v)
            for name, buf in ((f"present.{i}.key", k), (f"present.{i}.value", v)):
                if self.plain or prefill:  # not in place: ORT's plain ops may read the buffer they write; the
                    io.bind_output(name, self.device)  # prefill path returns no rows
                else:
                    io.bind_ortvalue_output(name, buf)
        return io

    def _held(self, layer) -> int:
        """Rows a layer's buffer held before this step."""
        return self.pos - self.chunk_start() if layer.chunked else self.pos

    def _rescale(self, new: list[np.ndarray]) -> bool:
        """Grow the int8 scales of the layers whose new keys/values did not fit; requantize their cached rows.
        True when the step must run again."""
        s, again = self.spec, False
        for layer in s.layers:
            for j in range(2):
                x = new[2 * layer.index + j].reshape(-1, s.num_kv_heads, s.head_dim)  # [S, Hkv, D]
                again |= self._fit(layer.index, j, x, self._held(layer))
        return again

    def _absorb(self, new: list[np.ndarray]) -> None:
        """After a prefill step: fit the scales to its new keys/values, then quantize them into the cache."""
        s = self.spec
        for layer in s.layers:
            held = self._held(layer)
            for j in range(2):
                x = new[2 * layer.index + j].reshape(-1, s.num_kv_heads, s.head_dim).astype(np.float32, copy=False)
                self._fit(layer.index, j, x, held)
                rows = x.transpose(1, 0, 2)[None] / self.scales[layer.index][j]  # [1, Hkv, S, D]
                dst = self.host[layer.index][j][:, :, held: held + x.shape[0]]
                np.clip(np.rint(rows, out=rows), -127, 127, out=rows)
                dst[...] = rows

    def _fit(self, i: int, j: int, x: np.ndarray, held: int) -> bool:
        """Grow layer ``i``'s key (j=0) or value (j=1) scales where ``x`` [S, Hkv, D] exceeds them, requantizing the
        ``held`` cached rows; True when they grew."""
        s = self.spec
        amax = np.abs(x).max(axis=0).reshape(1, s.num_kv_heads, 1, s.head_dim)
        old = self.scales[i][j]
        if np.all(amax <= 127 * old):
            return False
        # at least GROWTH times: a range that creeps up costs a few reruns, not one per step
        scale = np.maximum(GROWTH * old, amax * HEADROOM / 127).astype(np.float32)
        if held:
            self._requantize(i, j, held, old, scale)
        self.scales[i][j] = scale
        return True

    def _requantize(self, i: int, j: int, rows: int, old: np.ndarray, new: np.ndarray) -> None:
        buf, host = self.cache[i][j], self.host[i][j]
        a = buf.numpy() if host is None else host
        a[:, :, :rows] = np.clip(np.rint(a[:, :, :rows] * (old / new)), -127, 127).astype(np.int8)
        if host is None:
            buf.update_inplace(a)
