"""ONNX Runtime backend: one decoder session and a KV cache for one sequence.

Memory is bounded by attention_chunk_size on chunked layers: after each step their cache is trimmed to the
keys of the current chunk (the only ones a later query can see); global (NoPE) layers keep everything. The
graph reads each layer's own past length, so trimmed and full caches give the same logits.

Needs numpy and onnxruntime only (tokenizers for text); no torch, transformers, onnx or onnx_ir.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import CapabilityError, UsageError
from .base import Runtime

log = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
KV_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def session_options(threads: int | None = None):
    """Session options for parity: no reduced-precision accuracy levels, deterministic thread count."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    # int4 Q/DQ fused into MatMulNBits defaults to int8 activations (accuracy level 4); keep full precision.
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    so.log_severity_level = 3
    if threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = int(os.environ["OMP_NUM_THREADS"])  # respect the usual knob on shared machines
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return so


class OnnxRuntime(Runtime):
    format = "onnx"

    def __init__(self, path: str | Path, provider: str | None = None, threads: int | None = None):
        super().__init__(path)
        try:
            import onnxruntime as ort
        except ImportError:
            raise UsageError("running ONNX exports needs onnxruntime: pip install onnxruntime") from None
        model = self.path / self.info.get("onnx", {}).get("model", "model.onnx")
        if not model.is_file():
            raise UsageError(f"{self.path}: no {model.name}; the export is incomplete, convert it again")
        provider = provider or ("cuda" if self.info.get("target") == "cuda" else "cpu")
        if provider not in PROVIDERS:
            raise UsageError(f"--provider {provider!r} is not one of {', '.join(PROVIDERS)}")
        ep = PROVIDERS[provider]
        if ep not in ort.get_available_providers():
            raise CapabilityError(f"{self.path}: ONNX Runtime here has no {ep}; install onnxruntime-gpu or use --provider cpu")
        if provider == "cpu" and self.info.get("dtype") == "bfloat16":
            raise CapabilityError(f"{self.path}: a bfloat16 export needs --provider cuda (ORT CPU has no bfloat16 MoE)")
        self.session = ort.InferenceSession(str(model), sess_options=session_options(threads), providers=[ep])
        self.provider = provider
        kv = next(i for i in self.session.get_inputs() if i.name.startswith("past_key_values."))
        self.kv_dtype = KV_DTYPES.get(kv.type, np.float16)
        self.chunk = self.spec.attention_chunk_size
        self.reset()

    def reset(self) -> None:
        s = self.spec
        empty = np.zeros((1, s.num_kv_heads, 0, s.head_dim), dtype=self.kv_dtype)
        self.past: list[tuple[np.ndarray, np.ndarray]] = [(empty, empty) for _ in s.layers]
        self.seen = 0  # tokens in the sequence so far

    def forward(self, ids: Sequence[int]) -> np.ndarray:
        n = len(ids)
        if n == 0:
            raise UsageError("forward needs at least one token")
        total = self.seen + n
        feeds: dict[str, np.ndarray] = {
            "input_ids": np.asarray(ids, dtype=np.int64).reshape(1, n),
            "attention_mask": np.ones((1, total), dtype=np.int64),
            "position_ids": np.arange(self.seen, total, dtype=np.int64).reshape(1, n),
        }
        for i, (k, v) in enumerate(self.past):
            feeds[f"past_key_values.{i}.key"] = k
            feeds[f"past_key_values.{i}.value"] = v
        outs = self.session.run(None, feeds)
        names = [o.name for o in self.session.get_outputs()]
        got = dict(zip(names, outs))
        keep = self.chunk_keep(total)
        for layer in self.spec.layers:
            k, v = got[f"present.{layer.index}.key"], got[f"present.{layer.index}.value"]
            if layer.chunked:
                # Later queries (positions >= total) only see keys of their own chunk: keep those.
                k, v = k[:, :, k.shape[2] - keep:], v[:, :, v.shape[2] - keep:]
            self.past[layer.index] = (np.ascontiguousarray(k), np.ascontiguousarray(v))
        self.seen = total
        return got["logits"][0].astype(np.float32, copy=False)

    def chunk_keep(self, total: int) -> int:
        """How many trailing keys a chunked layer keeps after ``total`` tokens: those of the current chunk."""
        if not self.chunk:
            return total
        return total - (total // self.chunk) * self.chunk

    def cache_lengths(self) -> list[int]:
        """Keys held per layer (for tests and memory reports)."""
        return [k.shape[2] for k, _ in self.past]
