"""Round-to-nearest in slices, and ahead of the writer on a cluster.

``rtn(t, scheme)`` equals ``scheme.quantize(t.load(np.float32))`` byte for byte (every scheme quantizes each row,
and each expert, on its own), but reads a stacked expert tensor a few experts at a time and converts a dense one to
float32 a block of rows at a time, so its float32 copy never holds a whole Scout/Maverick expert stack or lm_head.

``quantize_ahead`` is what ``--ray`` distributes when the recipe is not calibrated: every round-to-nearest
tensor of the plan is cut into jobs (a run of experts, or one dense tensor), quantized by the workers, written by
them as files into the output's temporary folder and appended, in order, to a ``SpilledTensors`` store that the
writer then reads as it reads calibrated tensors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import Checkpoint, LazyTensor
from .schemes import AnyScheme, Int, PerExpert, QTensor, assembled, plain
from .spill import Part, SpilledTensors, save_part

log = logging.getLogger(__name__)

def sliceable(t: LazyTensor, scheme: AnyScheme) -> bool:
    """Whether ``scheme`` quantizes ``t`` a leading-axis slice at a time: each expert of a stack is quantized on its
    own, and an Int scheme quantizes each row of a matrix on its own (block FP8's scales span rows)."""
    return t.is_experts or (isinstance(scheme, Int) and t.rows_readable)


def quant_runs(t: LazyTensor, scheme: AnyScheme) -> list[tuple[int, int]]:
    """The leading-axis runs ``rtn(t, scheme, run)`` is asked for by a streaming writer: one slice of float32
    each, or the whole tensor when the scheme does not quantize its rows on their own."""
    if isinstance(scheme, PerExpert):
        return scheme.runs(t.runs())  # one width per run
    return t.runs() if sliceable(t, scheme) else [(0, t.shape[0])]


def rtn(t: LazyTensor, scheme: AnyScheme, lead: tuple[int, int] | None = None,
        slice_bytes: int | None = None) -> QTensor:
    """Round-to-nearest of ``t`` (or of its leading-axis slice [a, b): experts or rows), a slice at a time (module
    docstring)."""
    if not sliceable(t, scheme):
        return scheme.quantize(t.load(np.float32))
    if lead is not None:
        return plain(scheme, *lead).quantize(t.lead(lead, np.float32))
    runs = t.runs(slice_bytes)
    runs = scheme.runs(runs) if isinstance(scheme, PerExpert) else runs
    parts = ((slice(a, b), plain(scheme, a, b).quantize(t.lead((a, b), np.float32))) for a, b in runs)
    qt = assembled(parts, t.shape[0], 0)  # one slice's float32 beside the codes at a time
    return QTensor(scheme, qt.q, qt.scale, qt.zero)


def rtn_job(t: LazyTensor, scheme: AnyScheme, experts: tuple[int, int] | None, folder: str) -> Part:
    """One job of ``quantize_ahead``: quantize, write the parts into ``folder``."""
    return save_part(folder, rtn(t, scheme, experts))


def _jobs(ckpt: Checkpoint, todo: Mapping[str, AnyScheme], folder: str) -> Iterator[tuple[str, tuple]]:
    for name, scheme in todo.items():
        t = ckpt[name]
        for run in quant_runs(t, scheme) if t.is_experts else [None]:
            yield name, (t, scheme, run, folder)


def quantize_ahead(ckpt: Checkpoint, todo: Mapping[str, AnyScheme], workers: Any, parent: Path) -> SpilledTensors:
    """Round-to-nearest of every tensor in ``todo`` (canonical name -> scheme) as jobs on ``workers``; returns the
    store (under ``parent``, the output's temporary folder) the writer reads them from."""
    store = SpilledTensors(parent)
    jobs = list(_jobs(ckpt, todo, str(store.path)))
    t0 = time.perf_counter()
    for i, part in enumerate(workers.map(rtn_job, (job for _, job in jobs))):
        store.append_part(jobs[i][0], part)
        log.debug("quantized %s (%d/%d jobs)", jobs[i][0], i + 1, len(jobs))
    log.info("%d tensors quantized in %d jobs on the %s in %.1f s", len(todo), len(jobs), workers.name,
             time.perf_counter() - t0)
    return store
