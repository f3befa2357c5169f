"""Continuous batching: up to N sequences decode together, one token each per step (ONNX and MLX exports).

    engine = BatchEngine(load_runtime("out/"), slots=4, context=8192)
    job = engine.submit(Job(ids, max_new=64))          # from any thread
    for tok, logits in job.tokens(): ...               # this job's tokens as they come

Each sequence lives in a slot. ONNX: its rows of one [N, Hkv, R, D] numpy buffer per layer (R = ``context`` in the
global layers, one chunk in the chunked ones), which ONNX Runtime reads and writes in place. MLX: its own layer caches
(runtimes/mlx.py LayerCache, float or quantized). One worker thread loops:

1. a waiting job takes the free slot whose cached sequence shares the longest prefix with its ids (a conversation's
   next turn finds its own slot: llama-server's per-slot prompt cache); only that prefix's tokens are skipped
   (``base.reusable``, exact);
2. one piece of one prompt (at most ``piece`` tokens while others decode, so a long prompt holds the running
   streams back by one piece a step) runs through the export's decoder on that slot's rows (a [1, ...] view);
3. one decode step of every decoding slot at once. ONNX: ``model.batch.onnx``, whose attention takes each row's own
   key count (exporter/onnx_variants.write_batch_decoder); the decoding slots are kept in rows 0..d-1 (a slot that
   starts or stops decoding trades rows with another: its valid rows are copied), so a step binds ``buffer[:d]``.
   MLX: ``MlxRuntime.step_rows``, every linear and expert over the d rows at once, attention per row.

Sampling, stop tokens, constraints and cancellation are per job; a job's greedy tokens are those it gets alone
(tests/test_batch.py). ONNX: float caches on CPU only (the int8 cache's scales and the CUDA buffers are per sequence).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ExportError, L4ExportError, UsageError
from .base import pick, reusable
from .batch_rows import MlxRows, OnnxRows

log = logging.getLogger(__name__)

END = object()  # the last item of a job's queue


@dataclass(eq=False)
class Job:
    """One sequence to generate: the prompt's ids, how many tokens, how to sample them and when to stop."""

    ids: list[int]
    max_new: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0
    stops: frozenset[int] = frozenset()
    constraint: Any = None
    features: np.ndarray | None = None  # image features of the prompt's <|patch|> tokens
    cancel: threading.Event = field(default_factory=threading.Event)
    reused: int = 0  # prompt tokens taken from the slot's cache
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.made = 0

    def tokens(self) -> Iterator[tuple[int, np.ndarray]]:
        """(token, the logits it was drawn from) as the worker makes them; an engine failure is raised here."""
        while (item := self.out.get()) is not END:
            if isinstance(item, BaseException):
                raise item
            yield item


class Slot:
    """One sequence's place: its cached ids and position, and the job it serves (None: free, cache kept)."""

    def __init__(self) -> None:
        self.history: list[int] | None = []  # ids in the cache (None: image features, not reusable)
        self.pos = 0
        self.job: Job | None = None
        self.todo: list[int] = []  # prompt ids still to run
        self.next = -1  # the token to run in the next decode step
        self.used = 0  # when it last took a job (least recently used slots are taken first)

    @property
    def decoding(self) -> bool:
        return self.job is not None and not self.todo


class BatchEngine:
    def __init__(self, rt: Any, slots: int, context: int, piece: int = 256):
        s = rt.spec
        if context < 2 or context > s.max_position_embeddings:
            raise UsageError(f"--ctx-size {context} must be within 2..{s.max_position_embeddings} "
                             "(max_position_embeddings)")
        self.rt, self.context, self.piece = rt, context, piece
        self.rows = (OnnxRows if getattr(rt, "format", "") == "onnx" else MlxRows)(rt, slots, context)
        self.slots = [Slot() for _ in range(slots)]  # slots[row]
        self.waiting: list[Job] = []
        self.cv = threading.Condition()
        self.busy = threading.Lock()  # held through each step: MLX work from other threads (images) waits for it
        self.clock, self.closed = 0, False
        self.thread = threading.Thread(target=self._loop, name="l4export-batch", daemon=True)
        self.thread.start()

    @property
    def cache_bytes(self) -> int:
        return self.rows.nbytes

    def submit(self, job: Job) -> Job:
        """Queue ``job`` (any thread); its tokens come from ``job.tokens()``. A prompt that leaves no room in a slot's
        context is a UsageError now; max_new is cut to the room left (the answer ends with finish "length")."""
        ids, vocab = job.ids, self.rt.spec.vocab_size
        if not ids or min(ids) < 0 or max(ids) >= vocab:  # (not rt.check_ids: it counts the runtime's own position)
            raise UsageError(f"a job needs token ids in 0..{vocab - 1}; got {len(ids)} ids"
                             + (f" in {min(ids)}..{max(ids)}" if ids else ""))
        if len(ids) >= self.context:
            raise UsageError(f"the prompt is {len(job.ids)} tokens; a slot holds {self.context} (--ctx-size): "
                             "shorten the prompt or serve with a larger --ctx-size")
        job.max_new = min(job.max_new, self.context - len(job.ids))
        with self.cv:
            self.waiting.append(job)
            self.cv.notify()
        return job

    # ---- the worker ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the worker after its current step (a process that exits with it inside ORT or MLX can abort)."""
        with self.cv:
            self.closed = True
            self.cv.notify()
        self.thread.join(timeout=60)

    def _loop(self) -> None:
        while True:
            with self.cv:
                self.cv.wait_for(lambda: self.closed or self.waiting or any(s.job for s in self.slots))
                if self.closed:
                    return
            try:
                with self.busy:
                    self._tick()
            except Exception as err:  # an engine failure ends every running job with it; the slots start empty
                failure = err if isinstance(err, L4ExportError) else ExportError(f"{self.rt.path}: {err}")
                log.debug("batch step failed", exc_info=err)
                for s in self.slots:
                    if s.job is not None:
                        s.job.out.put(failure)
                        s.job.out.put(END)
                    s.job, s.history, s.pos, s.todo = None, [], 0, []

    def _tick(self) -> None:
        """Admit a waiting job if a slot is free, run one piece of one prompt, then one decode step."""
        for s in self.slots:
            if s.job is not None and s.job.cancel.is_set():
                self._finish(s)
        if not any(s.job is not None and s.todo for s in self.slots):
            self._admit()
        filling = next((r for r, s in enumerate(self.slots) if s.job is not None and s.todo), None)
        if filling is not None:
            self._prefill(filling)
        if any(s.decoding for s in self.slots):
            self._decode()

    def _admit(self) -> None:
        with self.cv:
            free = [s for s in self.slots if s.job is None]
            if not self.waiting or not free:
                return
            job = self.waiting.pop(0)
        chunk = self.rt.spec.attention_chunk_size
        reuse = {id(s): 0 if job.features is not None or s.history is None else
                 reusable(s.history, job.ids, s.pos, chunk) for s in free}
        slot = max(free, key=lambda s: (reuse[id(s)], -s.used))
        n = reuse[id(slot)]
        self.clock += 1
        slot.job, slot.used, slot.pos, job.reused = job, self.clock, n, n
        slot.history = slot.history[:n] if n else []  # (an image prompt's run sets it to None: not reusable)
        slot.todo = job.ids[n:]
        self.rows.bind(self.slots.index(slot))
        self.rt._truncate(n)  # (MLX: the layer caches' lengths; ONNX: nothing, a step writes after row n)

    def _prefill(self, row: int) -> None:
        """One piece of slot ``row``'s prompt through the decoder, on its rows of the buffers (in place)."""
        rt, slot = self.rt, self.slots[row]
        job = slot.job
        alone = not any(s.decoding for s in self.slots)
        n = len(slot.todo) if job.features is not None else min(len(slot.todo), rt.prefill_step if alone else self.piece)
        self.rows.bind(row)
        rt.pos, rt.history = slot.pos, slot.history
        logits = rt.forward(slot.todo[:n], last_only=True, features=job.features)[-1]
        slot.pos, slot.history, slot.todo = rt.pos, rt.history, slot.todo[n:]
        if not slot.todo:
            self._emit(row, logits)

    def _decode(self) -> None:
        """One token for each decoding slot (rows 0..d-1) in one step."""
        rows = [x for x in self.slots if x.decoding]
        logits = self.rows.decode([x.next for x in rows], [x.pos for x in rows])
        for x in rows:
            x.pos += 1
            if x.history is not None:
                x.history.append(x.next)
        for r in range(len(rows) - 1, -1, -1):  # from the end: a finished row trades places with the last decoding one
            self._emit(r, logits[r])

    def _emit(self, row: int, logits: np.ndarray) -> None:
        """Draw slot ``row``'s next token from ``logits``, hand it out, and finish the job or queue the token."""
        slot = self.slots[row]
        job = slot.job
        if job.cancel.is_set():
            self._finish(slot)
            return
        tok = pick(logits, job.constraint, job.temperature, job.top_p, job.rng)
        job.out.put((tok, logits))
        job.made += 1
        if job.constraint is not None:
            job.constraint.accept(tok)
        if tok in job.stops or job.made >= job.max_new or (job.constraint is not None and job.constraint.done):
            self._finish(slot)  # (the last token is not run: nothing would read its logits)
        else:
            slot.next = tok
            if row >= sum(x.decoding for x in self.slots):  # a prompt just done, below the decoding rows
                self._order()

    def _finish(self, slot: Slot) -> None:
        slot.job.out.put(END)
        slot.job, slot.todo = None, []
        self._order()

    def _order(self) -> None:
        """Decoding slots first (rows 0..d-1): swap each one found below row d with a non-decoding one above."""
        d = sum(x.decoding for x in self.slots)
        outside = [r for r in range(d, len(self.slots)) if self.slots[r].decoding]
        inside = [r for r in range(d) if not self.slots[r].decoding]
        for a, b in zip(inside, outside):
            self._swap(a, b)

    def _swap(self, a: int, b: int) -> None:
        """Trade rows ``a`` and ``b``: the slots and their caches."""
        sa, sb = self.slots[a], self.slots[b]
        self.rows.swap(a, b, (sa.pos, sb.pos))
        self.slots[a], self.slots[b] = sb, sa
