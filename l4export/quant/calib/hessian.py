"""Hessians Σ x xᵀ of the linears' real inputs: in memory (``_Acc``, one or a batch of experts) or in tiles on
disk (``_TiledAcc``, a non-expert linear too wide for memory), blended with the layer prior (``_prior``; the
package docstring), and which captured input feeds which linear (``_SHARES``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .. import tiles
from ..gptq import working_dtype
from .options import _Run


# Which captured input feeds which linear (q/k/v share one input; gate/up share one).
_SHARES = {"self_attn.k_proj.weight": "self_attn.q_proj.weight", "self_attn.v_proj.weight": "self_attn.q_proj.weight",
           "feed_forward.up_proj.weight": "feed_forward.gate_proj.weight",
           "feed_forward.shared_expert.up_proj.weight": "feed_forward.shared_expert.gate_proj.weight",
           "feed_forward.experts.up_proj": "feed_forward.experts.gate_proj"}


Prior = Any  # a [K, K] tensor, or a float c standing for c·I (never made: at I = 8192 one is 0.27-0.54 GB)


class _Acc:
    """Σ x xᵀ and token counts for one linear: experts ``offset .. offset + b - 1`` of a batch, or one (b = 1), in
    GPTQ's working dtype for this input width."""

    def __init__(self, b: int, k: int, device, offset: int = 0):
        import torch

        self.h = torch.zeros(b, k, k, dtype=working_dtype(k), device=device)
        self.n = np.zeros(b, np.int64)
        self.amax = np.zeros(b, np.float32)
        self.offset = offset
        self.done = False

    def add(self, e: int, x) -> None:
        j = max(e, 0) - self.offset
        xd = x.to(self.h.dtype)
        self.h[j].addmm_(xd.T, xd)  # in place: no [K, K] temporary
        self.n[j] += x.shape[0]
        self.amax[j] = max(self.amax[j], float(x.abs().max()) if x.numel() else 0.0)

    def blended(self, prior: Prior, alpha: float):
        """Per-entry normalised Hessians (H_e + α·H̄) / (n_e + α) with the layer prior H̄ (package docstring), made
        in place of the sums (which nothing reads after) on the first call; later calls return the same tensor."""
        import torch

        h = self.h
        if self.done:
            return h
        self.done = True
        if alpha == 0 and self.n.sum() == 0:  # nothing seen: the prior itself
            h.zero_()
            if isinstance(prior, float):
                h.diagonal(dim1=-2, dim2=-1).fill_(prior)
            else:
                h.copy_(prior.to(h.device, h.dtype).expand_as(h))
            return h
        n = torch.tensor(self.n, dtype=h.dtype, device=h.device)
        if alpha and isinstance(prior, float):  # c·I
            h.diagonal(dim1=-2, dim2=-1).add_(alpha * prior)
        elif alpha:
            h.add_(prior.to(h.device, h.dtype), alpha=alpha)
        return h.div_((n + alpha).clamp_min(1e-12)[:, None, None])


def _prior(total: int, shared=None, per_token_diag: float | None = None) -> Prior:
    """The layer prior H̄: ``shared`` (Σ x xᵀ over all routed tokens) / total for a shared input space (divided in
    place), or ``per_token_diag``·I; I (1.0) when the layer routed nothing or the prior would be degenerate."""
    import torch

    if total == 0:
        return 1.0
    if shared is None:
        return float(per_token_diag) if per_token_diag is not None and per_token_diag > 0 else 1.0
    prior = shared.div_(total)
    return 1.0 if float(torch.diagonal(prior).sum()) <= 0 else prior


class _TiledAcc:
    """``_Acc`` for one linear too wide for its Hessian in memory (``tiles.tiled_width``: Maverick's 16384-wide
    dense MLP down projection, 1.07 GB in float32): Σ x xᵀ in tiles on disk (``tiles.Tiles``). Inputs are staged up
    to ``STAGE`` bytes and added at once (each addition reads and writes every tile)."""

    STAGE = 64 << 20

    def __init__(self, k: int, scratch: str | Path | None):
        self.h = tiles.Tiles(k, working_dtype(k), scratch)
        self.n = np.zeros(1, np.int64)
        self.amax = np.zeros(1, np.float32)
        self._stage, self._rows, self.done = None, 0, False

    def add(self, e: int, x) -> None:
        import torch

        self.n[0] += x.shape[0]
        self.amax[0] = max(self.amax[0], float(x.abs().max()) if x.numel() else 0.0)
        if self._stage is None:
            self._stage = torch.empty((max(1, self.STAGE // (x.shape[1] * x.element_size())), x.shape[1]),
                                      dtype=self.h.dtype)
        at = 0
        while at < x.shape[0]:  # (an input larger than the stage's room goes in pieces)
            take = min(x.shape[0] - at, len(self._stage) - self._rows)
            self._stage[self._rows : self._rows + take] = x[at : at + take]
            self._rows, at = self._rows + take, at + take
            if self._rows == len(self._stage):
                self._flush()

    def _flush(self) -> None:
        if self._rows:
            self.h.add_gram(self._stage[: self._rows])
        self._rows = 0

    def blended(self, prior: Prior, alpha: float):
        """H / n (``_Acc.blended`` with a non-expert's prior, I, and α = 0), in the tiles; I if nothing was seen."""
        import torch

        assert alpha == 0, "a tiled Hessian is a non-expert linear's: no prior to blend"
        if not self.done:
            self.done = True
            self._flush()
            self._stage = None
            if self.n[0]:
                self.h.scale(1.0 / float(self.n[0]))
            else:
                for i in range(self.h.nt):
                    self.h.put(i, i, torch.eye(self.h.size(i), dtype=self.h.dtype))
        return self.h


def _acc(k: int, run: "_Run"):
    """The Hessian accumulator of a non-expert linear of input width ``k``: tiled on disk when too wide."""
    import torch

    if run.dev.type == "cpu" and tiles.tiled_width(k, torch.finfo(working_dtype(k)).bits // 8):
        return _TiledAcc(k, run.options.spill_dir)
    return _Acc(1, k, run.dev)
