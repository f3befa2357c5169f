"""What each candidate scheme costs a tensor in error, for the mixed-precision allocator (l4export.mixed).

Two measures, one meaning (a relative squared error, weighted by the share of tokens that pass through the tensor;
a routed expert's share is the fraction of tokens routed to it, so a layer's routed experts sum to top-k):

    weights      ||W - Q(W)||² / ||W||² of round to nearest, on sampled rows: no activations (``weight_errors``)
    calibration  tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), the relative output error on the calibration activations, with Q the
                 GPTQ codes on H = Σ xxᵀ of the tensor's real inputs in the float model (``output_errors``; a routed
                 expert's H from the tokens routed to it, scaled by the router score as the reference does, plus the
                 layer's mean input worth prior_tokens tokens, as calibration blends it). Inputs wider than FULL_K
                 (Llama 4's real widths) keep only H's diagonal: round to nearest, weighted by E[x_k²] (bounded
                 memory: one layer's diagonals, not 12 GB of [K, K]).
                 lm_head and the embedding are measured on their weights (no input is captured for them).

Rows are sampled (GPTQ and the traces treat rows independently), so memory is one expert's weights and one layer's
Hessians; every weight is read once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..checkpoint import Checkpoint, LazyTensor
from .gptq import factored, gptq, output_sqnr, sampled_rows
from .schemes import AnyScheme

log = logging.getLogger(__name__)

ROWS = 256  # sampled output rows per matrix (per expert)
FULL_K = 4096  # inputs up to this width get the full Hessian and GPTQ; wider ones the diagonal and round to nearest

def _rows(t: LazyTensor, expert: int | None = None) -> np.ndarray:
    """Up to ROWS evenly spaced output rows of a matrix (or of one expert of a stack), float32 [r, K]."""
    if expert is not None:
        w = t.load(np.float32, experts=slice(expert, expert + 1))[0]
        return np.ascontiguousarray(w[sampled_rows(w.shape[0], ROWS)])
    n = t.shape[0]
    if not t.rows_readable or n <= ROWS:
        w = t.load(np.float32)
        return np.ascontiguousarray(w[sampled_rows(n, ROWS)])
    blocks = 8  # contiguous blocks spread over the rows: a lookup table's rows are not read whole
    size = ROWS // blocks
    starts = np.linspace(0, n - size, blocks).astype(np.int64)
    return np.concatenate([t.load_rows(slice(int(a), int(a) + size), np.float32) for a in starts])


def _rel_rtn(w: np.ndarray, s: AnyScheme) -> float:
    err = float(((w - s.rtn(w)).astype(np.float64) ** 2).sum())
    return err / max(float((w.astype(np.float64) ** 2).sum()), 1e-30)


def weight_errors(ckpt: Checkpoint, units: Mapping[str, Sequence[str]], schemes: Mapping[str, Sequence[AnyScheme]],
                  shares: Mapping[int, np.ndarray] | None = None,
                  experts: Mapping[str, int] | None = None) -> dict[str, list[float]]:
    """unit -> its error under each of its schemes (weights only). ``shares``: MoE layer -> each expert's share of
    tokens (default top-k / E each); ``experts``: unit -> the one routed expert of its stacks it is (per-expert
    placement; default all of them)."""
    spec = ckpt.spec
    out = {}
    for key, names in units.items():
        err = np.zeros(len(schemes[key]))
        for name in names:
            t = ckpt.tensors[name]
            if t.is_experts:
                layer = int(name.split(".")[2])
                share = (shares or {}).get(layer, np.full(t.shape[0], spec.top_k / t.shape[0]))
                for e in _experts_of(key, experts, t.shape[0]):
                    w = _rows(t, e)
                    err += share[e] * np.array([_rel_rtn(w, s) for s in schemes[key]])
            else:
                w = _rows(t)
                err += np.array([_rel_rtn(w, s) for s in schemes[key]])
        out[key] = err.tolist()
        log.debug("measured %s (weights): %s", key, ", ".join(f"{s.name} {e:.3g}" for s, e in zip(schemes[key], err)))
    return out


def _experts_of(key: str, experts: Mapping[str, int] | None, n: int) -> list[int]:
    return [experts[key]] if experts and key in experts else list(range(n))


class _Inputs:
    """Observer of a float calibration pass: Σ xxᵀ and the token count per (captured input, expert), one layer at
    a time; when the next layer starts, ``done(layer, hessians, counts)`` gets the finished one's."""

    def __init__(self, done):
        self.done, self.layer, self.h, self.n = done, None, {}, {}

    def __call__(self, name: str, e: int, x: Any) -> None:
        layer = int(name.split(".")[2])
        if layer != self.layer:
            self.flush()
            self.layer = layer
        x = x.reshape(-1, x.shape[-1]).double().cpu()  # (calibration may run on a GPU; the sums live here)
        key = (name.split(".", 3)[3], e)
        # full Σ xxᵀ (GPTQ) up to FULL_K inputs; beyond, its diagonal Σ x² (a real-width layer's experts would hold
        # 16 x (5120² + 8192²) float64 = 12 GB; the diagonal is 1.7 MB)
        add = x.T @ x if x.shape[-1] <= FULL_K else (x * x).sum(0)
        self.h[key] = self.h[key] + add if key in self.h else add
        self.n[key] = self.n.get(key, 0) + x.shape[0]

    def flush(self) -> None:
        if self.layer is not None:
            self.done(self.layer, self.h, self.n)
        self.h, self.n = {}, {}


def _rel_gptq(w: np.ndarray, h: Any, schemes: Sequence[AnyScheme], damp: float) -> np.ndarray:
    """Relative output error of GPTQ's codes under each scheme, for rows ``w`` [r, K] and inputs' H [K, K]; with only
    H's diagonal [K] (past FULL_K), of round to nearest: Σ_k H_kk ΔW_jk² / Σ_k H_kk W_jk²."""
    if h.dim() == 1:
        d = h.numpy()
        sig = float((w.astype(np.float64) ** 2 * d).sum())
        return np.array([float(((w - s.rtn(w)).astype(np.float64) ** 2 * d).sum()) / max(sig, 1e-30) for s in schemes])
    hb = h[None].clone()  # factored() makes the H⁻¹ factor in this copy's memory
    h_np = h[None].numpy()
    out = []
    with factored(hb, damp) as factor:
        for s in schemes:
            q = gptq(w[None], None, s, factor=factor).dequantize()
            out.append(10 ** (-float(output_sqnr(w[None], q, h_np)[0]) / 10))
    return np.array(out)


def output_errors(ckpt: Checkpoint, units: Mapping[str, Sequence[str]], schemes: Mapping[str, Sequence[AnyScheme]],
                  ids: list[np.ndarray], options: Any,
                  experts: Mapping[str, int] | None = None) -> tuple[dict[str, list[float]], dict[int, np.ndarray]]:
    """unit -> its error under each of its schemes on the calibration activations, and the routing shares found
    (MoE layer -> each expert's fraction of tokens). One calibration pass of the float model (nothing quantized)."""
    from .calib import calibrate
    from .calib.hessian import _SHARES  # which captured input feeds which linear (k/v read q's, up reads gate's)

    tokens = sum(len(i) for i in ids)
    unit_of: dict[str, list[str]] = {}  # tensor -> its units (per-expert placement: one per expert)
    for k, names in units.items():
        for n in names:
            unit_of.setdefault(n, []).append(k)
    out = {k: np.zeros(len(v)) for k, v in schemes.items()}
    shares: dict[int, np.ndarray] = {}

    def done(layer: int, h: dict, n: dict) -> None:
        for name, keys in unit_of.items():
            if not name.startswith(f"model.layers.{layer}."):
                continue
            local = name.split(".", 3)[3]
            src, t = _SHARES.get(local, local), ckpt.tensors[name]
            if not t.is_experts:
                for key in keys if (src, -1) in h else ():
                    out[key] += _rel_gptq(_rows(t), h[(src, -1)], schemes[key], options.damp)
                continue
            counts = np.array([n.get((src, e), 0) for e in range(t.shape[0])], np.float64)
            shares[layer] = counts / tokens
            # the layer's mean input, worth prior_tokens tokens, blended in as calibration does for GPTQ (an
            # expert with few tokens would otherwise look easy: GPTQ fits its few inputs)
            prior = sum(h[(src, int(e))] for e in np.flatnonzero(counts)) / max(counts.sum(), 1)
            for key in keys:
                for e in (e for e in _experts_of(key, experts, t.shape[0]) if counts[e]):
                    he = h[(src, int(e))] + options.prior_tokens * prior
                    out[key] += counts[e] / tokens * _rel_gptq(_rows(t, int(e)), he, schemes[key], options.damp)

    watch = _Inputs(done)
    result = calibrate(ckpt, {}, ids, options, observer=watch)
    watch.flush()
    result.close()
    rest = {k: v for k, v in units.items() if not any(n.startswith("model.layers.") for n in v)}
    for key, err in weight_errors(ckpt, rest, schemes).items():  # lm_head, the embedding: no captured input
        out[key] += np.array(err)
    return {k: v.tolist() for k, v in out.items()}, shares


__all__ = ["ROWS", "output_errors", "weight_errors"]
