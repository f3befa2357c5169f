"""Where batched sequences keep their caches and how one step decodes them all (runtimes/batch.py's backends).

A backend holds N slots' caches, indexed by row. ``bind(row)`` makes a slot's cache the runtime's own, so that its
prompt runs through ``Runtime.forward`` as any sequence's would; ``decode(tokens, positions)`` runs one token of each
of rows 0..d-1 and returns their logits (d, V); ``swap(a, b)`` trades two rows' caches (the engine keeps the decoding
slots first)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import CapabilityError, UsageError
from ..folder import BATCH_FILE
from .base import chunk_start


class OnnxRows:
    """ONNX: rows of one [N, Hkv, R, D] numpy buffer per layer, which ORT reads and writes in place: a [1, ...] view to
    prefill one slot through the decoder, [:d] to decode d slots through ``model.batch.onnx``."""

    def __init__(self, rt: Any, slots: int, context: int):
        if "batch_decoder" not in (rt.files or {}):
            raise UsageError(f"{rt.path}: batched decoding needs an ONNX export with {BATCH_FILE}; convert it again "
                             "with this l4export, or serve with --parallel 1")
        if rt.kv_quant is not None or rt.provider != "cpu" or rt.plain:
            raise CapabilityError("--parallel above 1 runs the float KV cache on CPU with GroupQueryAttention; "
                                  "drop --kv-dtype / --provider cuda, or serve with --parallel 1")
        s = rt.spec
        self.rt, self.context = rt, context
        self.session = rt._open(BATCH_FILE)
        chunk = s.attention_chunk_size
        rows = [min(chunk, context) if la.chunked and chunk else context for la in s.layers]
        self.buffers = [[np.zeros((slots, s.num_kv_heads, r, s.head_dim), rt.kv_dtype) for _ in range(2)] for r in rows]
        self._bindings: dict[int, tuple] = {}  # rows -> (IO binding, the cache OrtValues it holds)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for pair in self.buffers for a in pair)

    def bind(self, row: int) -> None:
        rt = self.rt
        rt.cache = [tuple(rt.ort.OrtValue.ortvalue_from_numpy(a[row: row + 1]) for a in pair) for pair in self.buffers]
        rt.capacity = self.context

    def decode(self, tokens: list[int], positions: list[int]) -> np.ndarray:
        """One token for each of rows 0..d-1: GroupQueryAttention reads each row's own key count."""
        rt, d = self.rt, len(tokens)
        pos = np.array(positions, np.int64)
        chunk = rt.spec.attention_chunk_size or 0
        held = pos + 1 - chunk_start(pos, chunk)  # keys a chunked layer holds after this step
        feeds = {"input_ids": np.array(tokens, np.int64).reshape(d, 1), "position_ids": pos.reshape(d, 1),
                 "seqlens_k": pos.astype(np.int32), "total_sequence_length": np.array(pos.max() + 1, np.int32),
                 "seqlens_k.chunked": (held - 1).astype(np.int32),
                 "total_sequence_length.chunked": np.array(held.max(), np.int32)}
        io = self._binding(d)
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        with rt.running():
            self.session.run_with_iobinding(io)
        return io.get_outputs()[0].numpy().reshape(d, -1).copy()  # (the binding's buffer: the next step writes it)

    def _binding(self, d: int):
        """The IO binding of a d-row step, its caches bound once (buffer[:d] as past and present: appended in place);
        each step binds only its tokens and key counts (a fresh binding a step cost ~0.5 ms, 8 % of a one-row step)."""
        if d not in self._bindings:
            io, keep = self.session.io_binding(), []
            io.bind_output("logits", "cpu")  # first: get_outputs() lists outputs in binding order
            for i, pair in enumerate(self.buffers):
                for j, kind in enumerate(("key", "value")):
                    keep.append(buf := self.rt.ort.OrtValue.ortvalue_from_numpy(pair[j][:d]))
                    io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", buf)
                    io.bind_ortvalue_output(f"present.{i}.{kind}", buf)
            self._bindings[d] = (io, keep)
        return self._bindings[d][0]

    def swap(self, a: int, b: int, lengths: tuple[int, int]) -> None:
        """Trade rows ``a`` and ``b`` (``lengths``: their sequences' token counts; only valid rows are copied)."""
        chunk = self.rt.spec.attention_chunk_size or 0
        for layer, pair in zip(self.rt.spec.layers, self.buffers):
            n = max(p - (chunk_start(p, chunk) if layer.chunked else 0) for p in lengths)
            for buf in pair:
                keep = buf[a, :, :n].copy()
                buf[a, :, :n] = buf[b, :, :n]
                buf[b, :, :n] = keep


class MlxRows:
    """MLX: each slot its own layer caches (float or quantized, as the runtime's ``kv_dtype``); a decode step runs every
    linear and expert over the d rows at once and attention per row (``MlxRuntime.step_rows``)."""

    def __init__(self, rt: Any, slots: int, context: int):
        self.rt = rt
        self.caches = []
        for _ in range(slots):
            rt._reset()
            self.caches.append(rt.cache)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for caches in self.caches for c in caches)

    def bind(self, row: int) -> None:
        self.rt.cache = self.caches[row]

    def decode(self, tokens: list[int], positions: list[int]) -> np.ndarray:
        with self.rt.running():
            return self.rt.step_rows(tokens, self.caches[: len(tokens)], positions)

    def swap(self, a: int, b: int, lengths: tuple[int, int]) -> None:
        self.caches[a], self.caches[b] = self.caches[b], self.caches[a]
