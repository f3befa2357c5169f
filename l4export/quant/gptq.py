"""GPTQ (Frantar et al. 2022) over a leading batch (expert) axis, in torch, and the output SQNR it is judged by."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from . import tiles
from .schemes import AnyScheme, QTensor
from .tiles import one_thread

F64_MAX_K = 4096  # GPTQ works in float64 up to this input width, in float32 beyond (working_dtype)


def working_dtype(k: int):
    """GPTQ's precision for input width ``k``: float64 where a [K, K] costs little (K <= 4096: <= 134 MB), float32
    beyond (Llama 4's real widths, K 5120-16384), the precision of the reference implementation and of every peer
    (llm-compressor, AutoGPTQ, GPTQModel): it halves the Hessians, the H⁻¹ factor and the weight copy, the memory
    that bounds calibration at real width. float64 on the small widths keeps the codes of the column-by-column
    form exactly; float32 moves a few codes at the margin (Scout width: every expert's output SQNR within 0.01 dB
    of float64's, results/real-width-calib-f32-2026-11-30.json)."""
    import torch

    return torch.float64 if k <= F64_MAX_K else torch.float32


def gptq(w: np.ndarray, hessian, scheme: AnyScheme, damp: float = 0.01, block: int = 128,
         overwrite: bool = False, scratch: str | Path | None = None, factor: Any = None) -> QTensor:
    """GPTQ (Frantar et al. 2022) over a leading batch (expert) axis: w [B, N, K], hessian [B, K, K] (torch), in the
    Hessian's dtype (``working_dtype``). ``overwrite``: w (float32, the Hessian's dtype) is the working copy and is
    destroyed (one [N, K] less in memory).

    The lazy-batch form of the paper: columns are quantized ``block`` at a time, the error feedback inside a block is
    applied column by column and to the rest of the matrix once per block (one GEMM), so the work is a few large
    matmuls instead of K rank-1 updates over the whole weight: 23x faster at N 2048, K 5120 (166.6 s -> 7.3 s on
    2 cores) with the same codes. Group scales are fitted on the already-updated weights at each group's first
    column (every group starts a block or lies inside one). Columns whose Hessian diagonal is 0 get a unit diagonal
    (plain rounding); no column is ever zeroed. The snapped values go into the working copy's columns as they are
    made (a block's columns are never read again once the block is done), so the result is not another [N, K].
    The H⁻¹ factor is made in the Hessian's own memory while H waits in a file in ``scratch`` (``factor_in_place``);
    ``hessian`` holds H again on return. ``factor``: that factor, made by the caller (row blocks of one matrix share
    it); ``hessian`` is then not read."""
    import torch

    ref = factor if factor is not None else hessian
    dev, dt = ref.device, ref.dtype
    mine = (overwrite and dev.type == "cpu" and w.dtype == np.dtype(str(dt).removeprefix("torch."))
            and w.flags.c_contiguous and w.flags.writeable)
    W = torch.from_numpy(w) if mine else torch.tensor(w, dtype=dt, device=dev)
    b, n, k = W.shape
    g = scheme.group_for(k)
    step = _block_size(g, block)
    scales = np.empty((b, n, k // g), np.float32)
    with nullcontext(factor) if factor is not None else factor_in_place(hessian, damp, scratch) as Hinv:
        zeros = _columns(W, Hinv, scheme, g, step, scales)
    return scheme.with_scales(W.cpu().numpy().astype(np.float32, copy=False), scales, zeros)


def _columns(W, Hinv, scheme: AnyScheme, g: int, step: int, scales: np.ndarray) -> np.ndarray | None:
    """GPTQ's column loop in place of W [B, N, K]: snapped values into W, group scales into ``scales``; returns
    the zero points (None for a symmetric scheme)."""
    import torch

    b, n, k = W.shape
    dev, dt = W.device, W.dtype
    zeros = None
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        strip = _strip(Hinv, i1, i2)  # H⁻¹ factor rows i1..i2 from column i1 on
        W1, Hb = W[:, :, i1:i2].clone(), strip[:, :, : i2 - i1]
        Err = torch.empty_like(W1)
        for j in range(i2 - i1):
            i = i1 + j
            if i % g == 0:
                grp = W1[:, :, j : j + g] if j + g <= i2 - i1 else W[:, :, i : i + g]  # the latter only at j = 0
                s, z = scheme.fit(grp.cpu().numpy().astype(np.float32)[:, :, None, :])
                scales[:, :, i // g] = s[:, :, 0, 0]
                if z is not None:
                    zeros = zeros if zeros is not None else np.empty((b, n, k // g), np.uint8)
                    zeros[:, :, i // g] = z[:, :, 0, 0]
            q = torch.from_numpy(scheme.snap(W1[:, :, j].cpu().numpy().astype(np.float32)[:, :, None, None], s, z)[:, :, 0, 0])
            q = q.to(dev, dt)
            err = (W1[:, :, j] - q) / Hb[:, j, j][:, None]
            W1[:, :, j:] -= err[:, :, None] * Hb[:, None, j, j:]
            Err[:, :, j] = err
            W[:, :, i] = q  # exact: a float32 value in the working dtype
        W[:, :, i2:].baddbmm_(Err, strip[:, :, i2 - i1 :], alpha=-1)  # the block's feedback to every later column at once, in place
    return zeros


def _strip(Hinv, a: int, b: int):
    """Rows a..b of the factor from column a on, [B, b - a, K - a]: a view of a factor in memory, or made from the
    tiles of one on disk (``tiles.Factor``)."""
    return Hinv.strip(a, b) if isinstance(Hinv, tiles.Factor) else Hinv[:, a:b, a:]


def _block_size(g: int, block: int) -> int:
    """Columns per lazy block: a multiple of the group (or a divisor of it), so that every group starts a block or
    lies inside one and its scale is fitted on fully updated weights."""
    if g <= block:
        return g * (block // g)
    return block if g % block == 0 else g


def inverse_factor(hessian, damp: float = 0.01):
    """The upper Cholesky factor of the damped H⁻¹ that GPTQ feeds errors through, [B, K, K] in the Hessian's dtype;
    dead columns (diagonal <= 0) get a unit diagonal. ``hessian`` is left as it is. Per batch entry, so an entry's
    result does not depend on which batch it is in, and on one torch thread: MKL's Cholesky rounds differently with
    2 threads than with 1, and a --ray worker (1 thread) must agree with a single process (all cores)."""
    import torch

    out = torch.empty_like(hessian, memory_format=torch.contiguous_format)
    info = torch.empty((), dtype=torch.int32)
    with one_thread():
        for i in range(hessian.shape[0]):
            _factor_into(out[i], lambda i=i: out[i].copy_(hessian[i]), damp, info)
    return out


@contextmanager
def factor_in_place(hessian, damp: float = 0.01, scratch: str | Path | None = None) -> Iterator[Any]:
    """``inverse_factor`` made in ``hessian``'s own memory, with H parked in an unnamed temporary file in
    ``scratch`` (None: $TMPDIR) meanwhile and read back on exit: GPTQ then holds one [B, K, K], not two (a
    real-width down projection's is 0.27 GB in float32). Retries with more damping read H back from the file.
    A tensor that is not a contiguous CPU one (a GPU's) gets a factor of its own instead."""
    import torch

    if hessian.device.type != "cpu" or not hessian.is_contiguous():
        yield inverse_factor(hessian, damp)
        return
    raw = hessian.numpy().reshape(hessian.shape[0], -1).view(np.uint8)  # [B, K·K·itemsize], the same memory
    info = torch.empty((), dtype=torch.int32)
    with tempfile.TemporaryFile(dir=scratch) as f:
        f.write(raw.data)
        back = lambda i: _read_at(f, i * raw.shape[1], raw[i])  # noqa: E731
        try:
            with one_thread():
                for i in range(hessian.shape[0]):
                    _factor_into(hessian[i], lambda i=i: back(i), damp, info)
            yield hessian
        finally:
            for i in range(hessian.shape[0]):
                back(i)


@contextmanager
def factored(hessian, damp: float = 0.01, scratch: str | Path | None = None) -> Iterator[Any]:
    """The H⁻¹ factor of a [1, K, K] Hessian in memory (``factor_in_place``: H is whole again on exit) or of one in
    tiles on disk (``tiles.inverse_factor``: its files go on exit)."""
    if not isinstance(hessian, tiles.Tiles):
        with factor_in_place(hessian, damp, scratch) as f:
            yield f
        return
    f = tiles.inverse_factor(hessian, damp, scratch)  # (GEMMs on every thread; the same bytes on any count)
    try:
        yield f
    finally:
        f.close()


def _read_at(f, offset: int, out: np.ndarray) -> None:
    """out's bytes <- the file's from ``offset``."""
    f.seek(offset)
    view, done = memoryview(out).cast("B"), 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise OSError(f"{f.name}: parked Hessian ended early")
        done += n


def _factor_into(buf, fill: Callable[[], Any], damp: float, info) -> None:
    """``buf`` [K, K] <- the upper Cholesky factor of (H + λ·mean-diag·I)⁻¹, in place: no [K, K] besides ``buf``
    (at Scout width one is 0.27 GB in float32); ``fill()`` puts H into ``buf`` (again before each retry). λ starts
    at ``damp`` and is raised tenfold (up to 5 times) while the damped H is not positive definite; if it never
    factors, I (plain rounding).

    Why the transposed view: LAPACK works on column-major matrices; ``buf.mT`` is one, so torch factors it where it
    lies instead of through a copy. H is symmetric, so the view holds H too; its lower Cholesky factor L' of H⁻¹
    is, seen through ``buf``, the upper factor U = L'ᵀ with UᵀU = H⁻¹ that GPTQ needs."""
    import torch

    fill()
    diag = buf.diagonal()
    dead = diag <= 0
    mean = torch.where(dead, torch.ones_like(diag), diag).mean()
    f = buf.mT
    lam = damp
    for attempt in range(6):
        if attempt:
            fill()
        d = buf.diagonal()
        d[dead] = 1.0
        d.add_(lam * mean)  # H + λ·mean·I, no identity matrix made
        torch.linalg.cholesky_ex(f, upper=True, out=(f, info))
        if int(info) == 0:
            torch.cholesky_inverse(f, upper=True, out=f)
            torch.linalg.cholesky_ex(f, out=(f, info))
            if int(info) == 0 and bool(torch.isfinite(buf.sum())):  # (isfinite(buf) would make [K, K] temporaries)
                return
        lam *= 10
    buf.zero_()
    buf.diagonal().fill_(1.0)


def output_sqnr(w: np.ndarray, wq: np.ndarray, hessian: np.ndarray, max_rows: int = 512) -> np.ndarray:
    """Per batch entry: 10·log10(tr(W H Wᵀ) / tr(ΔW H ΔWᵀ)), the SQNR of x·Wᵀ over the inputs behind H (numpy
    [B, K, K], or one ``tiles.Tiles``).

    Both traces are sums over output rows, so they are taken over at most ``max_rows`` evenly spaced rows (every row
    of a matrix that small): at real width the exact form is a [8192, 5120] x [5120, 5120] product per trace,
    longer than the GPTQ it reports on. Matrix products (BLAS), not a three-operand einsum (a plain C loop)."""
    rows = sampled_rows(w.shape[1], max_rows)
    tiled = isinstance(hessian, tiles.Tiles)  # (one entry, [K, K] in tiles on disk)
    dt = np.float64 if np.dtype(hessian.np_dtype if tiled else hessian.dtype) == np.float64 else np.float32
    times = (lambda a: hessian.times(a[0])[None]) if tiled else (lambda a: a @ hessian)  # noqa: E731
    w = np.asarray(w[:, rows], dt)  # (never a float64 copy of a float32 [K, K])
    d = w - np.asarray(wq[:, rows], dt)
    sig = np.einsum("bnk,bnk->b", times(w), w)
    err = np.einsum("bnk,bnk->b", times(d), d)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(np.where(err > 0, sig / np.where(err > 0, err, 1), np.inf))


def sampled_rows(n: int, max_rows: int = 512) -> np.ndarray:
    """At most ``max_rows`` evenly spaced row indices of ``n`` (all of them when n is that small)."""
    return np.unique(np.linspace(0, n - 1, min(n, max_rows)).astype(np.int64))
