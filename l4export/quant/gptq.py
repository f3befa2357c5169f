"""GPTQ (Frantar et al. 2022) over a leading batch (expert) axis, in torch, and the output SQNR it is judged by."""

from __future__ import annotations

from typing import Any

import numpy as np

from .schemes import AnyScheme, QTensor


def gptq(w: np.ndarray, hessian, scheme: AnyScheme, damp: float = 0.01) -> QTensor:
    """GPTQ (Frantar et al. 2022) over a leading batch (expert) axis: w [B, N, K], hessian [B, K, K] (torch).
    Group scales are fitted on the already-updated weights at each group's first column. Columns whose
    Hessian diagonal is 0 get a unit diagonal (plain rounding); no column is ever zeroed."""
    import torch

    dev = hessian.device
    W = torch.tensor(w, dtype=torch.float64, device=dev)
    b, n, k = W.shape
    H = hessian.to(torch.float64).clone()
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    dead = diag <= 0
    diag[dead] = 1.0
    mean = diag.mean(-1, keepdim=True)  # (B, 1)
    eye = torch.eye(k, dtype=torch.float64, device=dev)
    Hinv = _damped_inverse_factor(H, mean, eye, damp)
    del H
    g = scheme.group_for(k)
    scales = np.empty((b, n, k // g), np.float32)
    zeros = None
    Q = np.empty((b, n, k), np.float32)
    for i in range(k):
        if i % g == 0:
            s, z = scheme.fit(W[:, :, i : i + g].cpu().numpy().astype(np.float32)[:, :, None, :])
            scales[:, :, i // g] = s[:, :, 0, 0]
            if z is not None:
                zeros = zeros if zeros is not None else np.empty((b, n, k // g), np.uint8)
                zeros[:, :, i // g] = z[:, :, 0, 0]
        col = W[:, :, i].cpu().numpy().astype(np.float32)
        q = scheme.snap(col[:, :, None, None], s, z)[:, :, 0, 0]
        Q[:, :, i] = q
        err = (W[:, :, i] - torch.tensor(q, dtype=torch.float64, device=dev)) / Hinv[:, i, i][:, None]
        W[:, :, i:] -= err[:, :, None] * Hinv[:, None, i, i:]
    return scheme.with_scales(Q, scales, zeros)


def _damped_inverse_factor(H, mean, eye, damp: float):
    """Upper Cholesky factor of H⁻¹ per batch entry, H [B, K, K] dampened by λ·mean-diag. λ starts at ``damp`` and
    is raised tenfold (up to 5 times) for the entries whose H + λ·I is not positive definite; an entry that never
    factors gets I (plain rounding). Per entry, so an entry's result does not depend on which batch it is in."""
    import torch

    b = H.shape[0]
    todo = torch.arange(b, device=H.device)
    done: list[tuple[Any, Any]] = []  # (entries, their factors)
    lam = damp
    for _ in range(6):
        Hs = H if len(todo) == b else H[todo]
        L, info = torch.linalg.cholesky_ex(Hs + lam * mean[todo][..., None] * eye)
        del Hs
        ok = info == 0
        if bool(ok.any()):
            Lok = L if bool(ok.all()) else L[ok]
            inv, info2 = torch.linalg.cholesky_ex(torch.cholesky_inverse(Lok), upper=True)
            del Lok
            good = (info2 == 0) & torch.isfinite(inv).flatten(1).all(-1)
            ok[ok.clone()] = good
            done.append((todo[ok], inv if bool(good.all()) else inv[good]))
            del inv
        del L
        todo = todo[~ok]
        if len(todo) == 0:
            break
        lam *= 10
    if len(done) == 1 and len(todo) == 0:
        return done[0][1]  # the common case: every entry factored at the same λ, no copy
    Hinv = eye.expand(b, -1, -1).clone()  # what is left over: plain rounding
    for entries, inv in done:
        Hinv[entries] = inv
    return Hinv


def output_sqnr(w: np.ndarray, wq: np.ndarray, hessian: np.ndarray) -> np.ndarray:
    """Per batch entry: 10·log10(tr(W H Wᵀ) / tr(ΔW H ΔWᵀ)), the SQNR of x·Wᵀ over the inputs behind H."""
    w, d = w.astype(np.float64), (w - wq).astype(np.float64)
    sig = np.einsum("bnk,bkl,bnl->b", w, hessian, w)
    err = np.einsum("bnk,bkl,bnl->b", d, hessian, d)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(np.where(err > 0, sig / np.where(err > 0, err, 1), np.inf))
