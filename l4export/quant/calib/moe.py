"""One MoE layer's routed experts, the driver's side: the layer's routing state (``_Experts``), its priors (gate/up
and down), the expert batches handed to the workers as jobs (``experts.py``) and their results taken back in batch
order: the quantized experts appended to the spill, their outputs added to the layer's pass-2 tokens."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...distributed import LocalWorkers
from ...heap import WEIGHTS, give_back, mapped_from
from ...torch_llama4 import RowBuffer, expert_hidden, routed_inputs, times_t
from ..activations import Routed, Samples
from ..gptq import working_dtype
from ..schemes import AnyScheme, Fp8
from ..spill import ArrayFile
from .experts import _DOWN, _GATE, _UP, BatchResult, ExpertBatch, expert_batch_size, run_expert_batch
from .hessian import _prior
from .options import _Run
from .stats import _eta, _log_tensor, _static_scales
from .weights import _Dequantized, _entry, _stored

log = logging.getLogger(__name__)


@dataclass
class _Experts:
    """One MoE layer's routed experts and the per-layer routing state their calibration needs.

    ``routed1``/``routed2``: per sample, (h2 [T, H], top-k experts [T, k], router scores [T, k]) of pass 1 (float weights:
    the experts' Hessians come from it) and of pass 2 (quantized weights: the experts' outputs go to it);
    ``partial``: pass 2's x + attention + shared expert [T, H] per sample, to which the routed outputs are added."""

    layer: int
    lazy: Mapping[str, Any]  # the layer's LazyTensors; stacked experts [E, out, in] are loaded a batch at a time
    plan: dict[str, AnyScheme]  # the routed expert tensors to quantize
    routed1: Routed
    routed2: Routed
    partial: Samples  # the layer's X, holding pass 2's outputs
    counts: np.ndarray = field(init=False)  # tokens routed to each expert (pass 1)
    stats: dict[str, dict[str, list[float]]] = field(init=False)  # per tensor, extended batch by batch
    amax: dict[str, list[np.ndarray]] = field(init=False)  # per tensor, each batch's input absmax per expert

    def __post_init__(self) -> None:
        num_e = self.shape[0]
        self.counts = np.zeros(num_e, np.int64)
        for _, idx, _ in self.routed1:
            self.counts += np.bincount(idx.cpu().numpy().reshape(-1), minlength=num_e)
        self.stats = {n: {} for n in self.plan}
        self.amax = {n: [] for n in self.plan}

    @property
    def shape(self) -> tuple[int, int, int]:
        """(E, I, H): experts, expert width, hidden size."""
        return tuple(self.lazy[_GATE].shape)

    def load(self, names: Iterable[str], a: int, b: int, dev) -> dict:
        """Experts [a, b) of each stacked tensor in ``names``, as stored (``_stored``), torch tensors [b - a, out, in]."""
        return {n: _stored(self.lazy[n], dev, slice(a, b)) for n in names}


def _routed_rows(routing: Routed, a: int, b: int) -> Iterator[tuple[int, int, Any, Any]]:
    """(sample, expert, token rows, s·h2 of those rows) for every expert in [a, b) with tokens, sample by sample (h2
    read only for the samples that route to one of them)."""
    import torch

    for j, (idx, s) in enumerate(zip(routing.expert, routing.score)):
        hit = [e for e in torch.unique(idx).tolist() if a <= e < b]
        if not hit:
            continue
        h2 = routing.h2[j]
        for e in hit:
            rows, xe = routed_inputs(h2, idx, s, e)  # IMPORTANT: the router score scales the expert INPUT
            yield j, e, rows, xe


def _calibrate_experts(ex: _Experts, run: _Run) -> None:
    """GPTQ the routed experts of one MoE layer in batches (jobs, on ``run.workers``), and add their quantized
    outputs to ``ex.partial``. Each job holds one batch's weights and Hessians; nothing is [E, K, K] or the whole
    [E, out, in]. Results are taken in batch order, so the spill and the sums are those of one process."""
    num_e, inter, hidden = ex.shape
    run.result.token_counts[ex.layer] = ex.counts.tolist()
    log.info("layer %d: tokens per expert %s", ex.layer, ex.counts.tolist())
    bsz = expert_batch_size(hidden, inter, run.options.expert_batch_bytes, num_e)
    batches = [(a, min(a + bsz, num_e)) for a in range(0, num_e, bsz)]
    log.info("layer %d: %d routed experts in %d batch(es) of up to %d", ex.layer, num_e, len(batches), bsz)
    folder = str(run.result.tensors.path)
    # each prior [K, K] as a file of the spill folder, which every --ray node shares: a batch reads it while it blends
    # its Hessians, so no process holds it between batches (0.1 GB at Scout width), and a Ray job carries the path,
    # not the tensor (Ray copies a large task argument into its object store once per job, and the driver's pages
    # of those copies stay in its resident set)
    priors = {k: v if isinstance(v, float) else ArrayFile.save(v.cpu().numpy(), Path(folder) / f"prior-{ex.layer}-{k}")
              for k, v in _expert_priors(ex, batches, run.dev).items()}
    give_back()
    local = isinstance(run.workers, LocalWorkers)
    alpha = run.options.prior_tokens if num_e > 1 else 0.0
    lazy = {n: ex.lazy[n] for n in (_GATE, _UP, _DOWN)}
    jobs = ((ExpertBatch(ex.layer, lazy, ex.plan, a, b, [(e, xe.cpu()) for _, e, _, xe in _routed_rows(ex.routed1, a, b)],
                         priors, alpha, run.options, folder),) for a, b in batches)
    observe = (lambda layer, name, e, x: run.observe(layer, name, e, x)) if local and run.observer else None
    t0 = time.perf_counter()
    for i, res in enumerate(run.workers.map(run_expert_batch, ((*job, observe) for job in jobs))):
        _take_batch(ex, res, batches[i], run)
        _eta(ex.layer, i + 1, len(batches), t0)
    for v in priors.values():
        if isinstance(v, ArrayFile):
            v.unlink()
    for n, scheme in ex.plan.items():
        full = f"model.layers.{ex.layer}.{n}"
        run.result.stats[full] = {**ex.stats[n], "tokens": ex.counts.tolist()}
        if isinstance(scheme, Fp8) and scheme.activation == "static":
            run.result.act_scales[full] = _static_scales(np.concatenate(ex.amax[n]), ex.counts)
        _log_tensor(full, scheme, ex.stats[n], run.options.method)


@mapped_from(WEIGHTS)  # a codes' row step dequantized per routed sample: the same few sizes, reused
def _take_batch(ex: _Experts, res: BatchResult, batch: tuple[int, int], run: _Run) -> None:
    """Append a batch's quantized experts to the spill and its stats to ``ex``; then pass 2, here in the driver:
    the batch's quantized (or float) experts on the quantized layer's tokens, added to ``ex.partial``."""

    a, b = batch
    w = {}
    for n in (_GATE, _UP, _DOWN):
        if n not in res.parts:
            w[n] = _stored(ex.lazy[n], run.dev, slice(a, b))
            continue
        qt = res.parts[n].load()
        run.result.tensors.append(f"model.layers.{ex.layer}.{n}", qt)
        res.parts[n].unlink()
        w[n] = [_Dequantized(_entry(qt, i), run.dev) for i in range(b - a)]
        for key, values in res.stats[n].items():
            ex.stats[n].setdefault(key, []).extend(values)
        ex.amax[n].append(res.amax[n])
    buf = RowBuffer()
    for j, e, rows, xe in _routed_rows(ex.routed2, a, b):
        me = expert_hidden(xe, w[_GATE][e - a], w[_UP][e - a], buf=buf)
        p = ex.partial[j]
        p[rows] = p[rows] + times_t(me, w[_DOWN][e - a], rows=2048, buf=buf)
        ex.partial[j] = p
    del w
    give_back()


def _expert_priors(ex: _Experts, batches: list[tuple[int, int]], dev) -> dict:
    """The layer priors H̄ (package docstring) of the planned experts' inputs, keyed by input as in ``_SHARES``
    (gate/up: gate_proj's; down: its own), computed without per-expert stacks."""
    priors = {}
    if _GATE in ex.plan or _UP in ex.plan:
        priors[_GATE] = _prior_gate_up(ex, dev)
    if _DOWN in ex.plan:
        priors[_DOWN] = _prior_down(ex, batches, dev)
    return priors


def _prior_gate_up(ex: _Experts, dev):
    """gate/up: every routed (token, rank)'s s·h2 feeds exactly one expert, so Σ_e H_e is Σ over all of them of
    (s·h2)(s·h2)ᵀ, one [H, H]."""
    import torch

    hidden = ex.shape[2]
    shared = torch.zeros(hidden, hidden, dtype=working_dtype(hidden), device=dev)
    for h2, _, s in ex.routed1:
        for j in range(s.shape[1]):  # each rank's token feeds its expert once
            xd = (h2 * s[:, j:j + 1]).to(shared.dtype)
            shared.addmm_(xd.T, xd)
    return _prior(int(ex.counts.sum()), shared=shared)


def _prior_down(ex: _Experts, batches: list[tuple[int, int]], dev):
    """down: each expert's intermediate features are its own, so the prior is mean-diag·I, the mean over routed
    experts of tr(H_e)/n_e/I. tr(H_e) = Σ_tokens |silu(G s h2) ⊙ (U s h2)|², which needs the float gate/up:
    a first, cheaper pass over the batches (weights only, no Hessians)."""
    import torch

    num_e, inter, _ = ex.shape
    trace = np.zeros(num_e, np.float64)
    for a, b in batches:
        w, buf = ex.load((_GATE, _UP), a, b, dev), RowBuffer()  # [B, I, H] each
        for _, e, _, xe in _routed_rows(ex.routed1, a, b):
            me = expert_hidden(xe, w[_GATE][e - a], w[_UP][e - a], buf=buf)
            trace[e] += float(me.to(torch.float64).pow(2).sum())
        del w, buf
    live = ex.counts > 0
    per_tok = torch.tensor(trace[live] / ex.counts[live] / inter, dtype=torch.float64) if live.any() else None
    return _prior(int(ex.counts.sum()), per_token_diag=float(per_tok.mean()) if per_tok is not None else 0.0)
