"""One expert batch as a job: GPTQ of routed experts [a, b) of one MoE layer (``ExpertBatch`` in,
``run_expert_batch``, ``BatchResult`` out), the same function locally and on Ray (``distributed.py``); and how many
experts a batch holds (``expert_bytes``, ``expert_batch_size``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ...heap import ACTIVATIONS, WEIGHTS, give_back, mapped_from
from ...torch_llama4 import RowBuffer, expert_hidden
from ..gptq import F64_MAX_K, gptq, one_thread
from ..schemes import AnyScheme, PerExpert, QTensor, assembled, plain
from ..spill import ArrayFile, Part, save_part
from .hessian import _SHARES, _Acc
from .options import CalibOptions, Observer
from .stats import _add_stats
from .weights import _stored, _torch


def expert_bytes(hidden: int, inter: int) -> int:
    """Estimated peak bytes one routed expert adds to an expert batch (``run_expert_batch``).

    The Hessians, gate/up [H, H] and down [I, I] in GPTQ's working dtype (``working_dtype``), held through the batch
    (GPTQ makes its H⁻¹ factor in their memory), and the larger of pass 1 (gate and up as stored, at most float32:
    2·I·H·4) and GPTQ of one projection (its float32 weight with the statistics' reread, 2·I·H·4). Scout/Maverick
    (H 5120, I 8192, float32 beyond K 4096): ~0.7 GB (an estimate for batch sizing; measured: docs/scale.md)."""
    size = lambda k: k * k * (8 if k <= F64_MAX_K else 4)  # noqa: E731
    return size(hidden) + size(inter) + 8 * inter * hidden


def expert_batch_size(hidden: int, inter: int, budget_bytes: int, num_experts: int) -> int:
    """How many routed experts fit ``budget_bytes`` at once: at least 1 (Maverick at 1 GiB), at most all."""
    return max(1, min(num_experts, budget_bytes // expert_bytes(hidden, inter)))


_EX = "feed_forward.experts."
_GATE, _UP, _DOWN = _EX + "gate_proj", _EX + "up_proj", _EX + "down_proj"


@dataclass
class ExpertBatch:
    """One job: GPTQ of routed experts [a, b) of one MoE layer, everything it needs carried along (it may run on
    another machine). ``inputs1``: (expert, s·h2 rows) of pass 1 (float weights: the Hessians come from them)."""

    layer: int
    lazy: dict[str, Any]  # gate/up/down LazyTensors [E, out, in]
    plan: dict[str, AnyScheme]
    a: int
    b: int
    inputs1: list  # emptied by run_expert_batch once its Hessians are made
    priors: dict  # input key -> the layer prior: an ArrayFile of the [K, K], or a float c for c·I
    alpha: float
    options: CalibOptions
    folder: str  # where the job writes its quantized parts (the output's temporary folder)


@dataclass
class BatchResult:
    parts: dict[str, Part]  # planned tensor -> this batch's quantized experts, as files
    stats: dict[str, dict[str, list[float]]]
    amax: dict[str, np.ndarray]


def run_expert_batch(job: ExpertBatch, observe: Observer | None = None) -> BatchResult:
    """Load the batch's float experts, accumulate their Hessians on pass 1's routed tokens, GPTQ them and write
    them. The same function runs locally and on Ray. (Pass 2, the quantized experts' outputs, is the driver's: its
    silu would round by the worker's thread count, and the next layer calibrates on those outputs.)"""
    import torch

    dev = torch.device(job.options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    load = lambda n: job.lazy[n].load(np.float32, experts=slice(job.a, job.b))  # noqa: E731  float32 [B, out, in]
    with torch.no_grad():
        with mapped_from(ACTIVATIONS):  # (also in a --ray worker's process)
            accs = _expert_hessians(job, {n: _stored(job.lazy[n], dev, slice(job.a, job.b)) for n in (_GATE, _UP)},
                                    dev, observe)
        job.inputs1.clear()  # consumed: the batch's routed tokens (0.18 GB per expert at 16k tokens) not held in GPTQ
        give_back()
        res = BatchResult({}, {n: {} for n in job.plan}, {})
        todo = [n for n in (_GATE, _UP, _DOWN) if n in job.plan]
        for i, n in enumerate(todo):  # one projection's float weights at a time, read again for its statistics
            key = _SHARES.get(n, n)
            acc = accs[key]
            prior = job.priors[key]
            hb = acc.blended(_torch(prior.load(), dev) if isinstance(prior, ArrayFile) else prior, job.alpha)
            qt = _quantize(lambda n=n: load(n), hb, plain(job.plan[n], job.a, job.b), job.options, res.stats[n],
                           fresh=True)
            res.amax[n] = acc.amax
            res.parts[n] = save_part(job.folder, qt)
            del qt, hb
            if all(_SHARES.get(m, m) != key for m in todo[i + 1:]):
                del accs[key], acc  # Hessians no later tensor reads: [B, K, K] each
    return res


def _expert_hessians(job: ExpertBatch, w: dict, dev, observe: Observer | None) -> dict:
    """Pass 1 over the batch: Σ x xᵀ of the float experts' real inputs for the planned tensors, keyed by input as in
    ``_SHARES``; ``observe`` (if any) sees every input, planned or not."""
    inter, hidden = job.lazy[_GATE].shape[1:]
    accs, buf = {}, RowBuffer()
    if _GATE in job.plan or _UP in job.plan:
        accs[_GATE] = _Acc(job.b - job.a, hidden, dev, job.a)
    if _DOWN in job.plan:
        accs[_DOWN] = _Acc(job.b - job.a, inter, dev, job.a)
    for e, xe in job.inputs1:
        xe = xe.to(dev)
        if observe is not None:
            observe(job.layer, _GATE, e, xe)
        if _GATE in accs:
            accs[_GATE].add(e, xe)
        if _DOWN in accs or observe is not None:
            with one_thread():  # F.silu's last bits follow the thread count; a --ray worker has 1
                me = expert_hidden(xe, w[_GATE][e - job.a], w[_UP][e - job.a], buf=buf)
            if observe is not None:
                observe(job.layer, _DOWN, e, me)
            if _DOWN in accs:
                accs[_DOWN].add(e, me)
    return accs


@mapped_from(WEIGHTS)  # row steps of the same few sizes, reused: from the heap (heap.py)
def _quantize(load: Callable[[], np.ndarray], hb, scheme: AnyScheme, options: CalibOptions,
              stats: dict[str, list[float]], fresh: bool = False) -> QTensor:
    """RTN and (GPTQ or RTN) of w = load() [B, N, K] on the blended Hessians hb [B, K, K]; extends ``stats`` per
    entry. ``fresh``: load() reads w anew each time (from the checkpoint); GPTQ then works in w itself, and the
    statistics read it again (one [N, K] less at the peak). Experts of several widths (``PerExpert``): each width's
    run on its own, stacked."""
    if isinstance(scheme, PerExpert):
        whole = load()  # read once; each width's run quantized from its slice
        parts = [(slice(a, b), _quantize(lambda a=a, b=b: whole[a:b], hb[a:b], scheme.at(a, b), options, stats))
                 for a, b in scheme.runs([(0, len(scheme.schemes))])]
        qt = assembled(parts, len(scheme.schemes), 0)
        return QTensor(scheme, qt.q, qt.scale, qt.zero)
    h_np = hb.cpu().numpy()
    w = load()
    rtn = scheme.quantize(w)
    _add_stats(stats, "rtn", w, rtn, h_np)
    if options.method != "gptq":
        _add_stats(stats, "calibrated", w, rtn, h_np)
        return rtn
    del rtn
    qt = gptq(w, hb, scheme, options.damp, overwrite=fresh, scratch=options.spill_dir)
    if fresh:
        del w  # (``w = load()`` would hold the spent copy until the new one is read)
        give_back()  # (GPTQ's freed row steps, before the float weight is read again)
        w = load()
    _add_stats(stats, "calibrated", w, qt, h_np)
    del w
    give_back()
    return qt
