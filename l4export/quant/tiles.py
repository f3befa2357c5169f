"""A symmetric [K, K] Hessian kept on disk as its lower-triangle tiles, and GPTQ's H⁻¹ factor made from it a tile
at a time.

Why: Maverick's dense MLP is 16384 wide. The Hessian of its down projection is [16384, 16384], 1.07 GB in float32
(and the factorisation wanted it in memory, or twice), more than the 1 GB that calibration may hold beside the
largest slice it reads. Here H lives in an unnamed temporary file as the tiles on and below its diagonal
(``TILE`` square, 53% of [K, K] at K = 16384); the factor is made in a second such file by the blocked LAPACK
algorithms (Cholesky, triangular inverse, LᵀL product, Cholesky again: what ``torch.cholesky_inverse`` and
``torch.linalg.cholesky`` do in memory), each a sequence of tile GEMMs, so memory holds a few tiles and one tile
column. The files sit in the page cache when there is room; nothing of them counts as the process's memory.

GPTQ reads the factor U (upper, UᵀU = H⁻¹) a strip of rows at a time (``Factor.strip``); U is the transpose of the
lower Cholesky factor stored here, so a strip of U's rows is a column of tiles, read once per tile column."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

TILE = 1024  # a tile is [1024, 1024]: 4 MB in float32; a tile column of a 16384-wide H is 64 MB
TILED_ABOVE = 128 << 20  # a dense Hessian larger than this (float32: K > 5792) is kept in tiles on disk


def tiled_width(k: int, itemsize: int) -> bool:
    """Whether a [k, k] Hessian of ``itemsize``-byte floats is kept in tiles (``TILED_ABOVE``)."""
    return k * k * itemsize > TILED_ABOVE


def tiles_bytes(k: int, itemsize: int = 4) -> int:
    """Bytes of one tiled [k, k] on disk (the tiles on and below the diagonal)."""
    sizes = [min(TILE, k - a) for a in range(0, k, TILE)]
    return sum(sizes[i] * sizes[j] for i in range(len(sizes)) for j in range(i + 1)) * itemsize


class Tiles:
    """A symmetric (or lower-triangular) [K, K] torch-dtype matrix as its tiles (i, j), j <= i, in an unnamed
    temporary file in ``scratch`` (None: $TMPDIR), zero when made. ``get`` reads a tile into fresh memory, ``put``
    writes one back: a tile is never shared with the file."""

    def __init__(self, k: int, dtype: Any, scratch: str | Path | None = None, tile: int | None = None):
        import torch

        tile = tile or TILE
        self.k, self.tile, self.nt, self.dtype = k, tile, -(-k // tile), dtype
        self.device = torch.device("cpu")
        self.np_dtype = np.dtype(str(dtype).removeprefix("torch."))
        self._at: dict[tuple[int, int], int] = {}
        end = 0
        for i in range(self.nt):
            for j in range(i + 1):
                self._at[i, j] = end
                end += self.size(i) * self.size(j) * self.np_dtype.itemsize
        self._f = tempfile.TemporaryFile(dir=scratch)
        self._f.truncate(end)  # sparse: reads as zeros

    def size(self, i: int) -> int:
        return min(self.tile, self.k - i * self.tile)

    def span(self, i: int) -> slice:
        return slice(i * self.tile, i * self.tile + self.size(i))

    def get(self, i: int, j: int):
        import torch

        out = np.empty((self.size(i), self.size(j)), self.np_dtype)
        view, at, done = memoryview(out).cast("B"), self._at[i, j], 0
        while done < len(view):
            n = os.preadv(self._f.fileno(), [view[done:]], at + done)
            if n <= 0:
                raise OSError(f"{self._f.name}: tile ({i}, {j}) ended early")
            done += n
        return torch.from_numpy(out)

    def put(self, i: int, j: int, a) -> None:
        raw = memoryview(np.ascontiguousarray(a.numpy())).cast("B")
        at, done = self._at[i, j], 0
        while done < len(raw):
            done += os.pwrite(self._f.fileno(), raw[done:], at + done)

    def pairs(self) -> list[tuple[int, int]]:
        """The stored tiles' (i, j), row by row."""
        return list(self._at)

    def close(self) -> None:
        self._f.close()

    # ---- as a Hessian ------------------------------------------------------------------------------------------
    def add_gram(self, x) -> None:
        """self += xᵀx for x [n, K] (torch, the tiles' dtype)."""
        for i in range(self.nt):
            xi = x[:, self.span(i)]
            for j in range(i + 1):
                t = self.get(i, j)
                self.put(i, j, t.addmm_(xi.T, x[:, self.span(j)]))

    def scale(self, c: float) -> None:
        for (i, j) in self.pairs():
            self.put(i, j, self.get(i, j).mul_(c))

    def diagonal(self):
        import torch

        return torch.cat([self.get(i, i).diagonal() for i in range(self.nt)])

    def times(self, w: np.ndarray) -> np.ndarray:
        """w @ H for w [n, K] (numpy): each stored tile (i, j) serves block (i, j) and, transposed, (j, i)."""
        out = np.zeros(w.shape, np.result_type(w.dtype, self.np_dtype))
        for (i, j) in self.pairs():
            t = self.get(i, j).numpy()
            out[:, self.span(j)] += w[:, self.span(i)] @ t
            if i != j:
                out[:, self.span(i)] += w[:, self.span(j)] @ t.T
        return out


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread inside the block. The factorisation is what ties GPTQ's codes to a thread count (LAPACK's
    blocked Cholesky splits its work by thread; GEMMs and triangular solves do not: checked with MKL), and a --ray
    worker runs 1 thread while a single process runs all cores: pinned to 1, both give the same bytes (costs ~10%
    of a real-width expert). Here only each diagonal tile's Cholesky is pinned (``cholesky``)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# ---- the blocked factorisations, in place in the tiles (LAPACK's potrf, trtri, lauum, lower) ----------------------
def cholesky(a: Tiles) -> bool:
    """a <- L, lower, with L Lᵀ = a (right-looking: each tile column, then the trailing tiles it updates).
    False when a is not positive definite (a is then spent)."""
    import torch

    for k in range(a.nt):
        with one_thread():  # (LAPACK's potrf rounds by thread count; the GEMMs and solves here do not)
            lkk, info = torch.linalg.cholesky_ex(a.get(k, k))
        if int(info):
            return False
        a.put(k, k, lkk)
        col = {i: torch.linalg.solve_triangular(lkk.T, a.get(i, k), upper=True, left=False)  # A_ik L_kk⁻ᵀ
               for i in range(k + 1, a.nt)}
        for i, lik in col.items():
            a.put(i, k, lik)
            for j in range(k + 1, i + 1):
                a.put(i, j, a.get(i, j).sub_(lik @ col[j].T))
    return True


def invert_lower(a: Tiles) -> None:
    """a (lower-triangular L) <- L⁻¹, column by column: X_jj = L_jj⁻¹, X_ij = -L_ii⁻¹ Σ_{j<=k<i} L_ik X_kj.
    Column j reads L in columns >= j only (not yet overwritten) and X in its own column (kept in memory)."""
    import torch

    for j in range(a.nt):
        ljj = a.get(j, j)
        xs = {j: torch.linalg.solve_triangular(ljj, torch.eye(a.size(j), dtype=ljj.dtype), upper=False)}
        a.put(j, j, xs[j])
        for i in range(j + 1, a.nt):
            s = a.get(i, j) @ xs[j]
            for k in range(j + 1, i):
                s.addmm_(a.get(i, k), xs[k])
            xs[i] = torch.linalg.solve_triangular(a.get(i, i), s, upper=False).neg_()
            a.put(i, j, xs[i])


def lower_gram(a: Tiles) -> None:
    """a (lower-triangular X) <- the lower part of XᵀX, row by row: (XᵀX)_ij = Σ_{k>=i} X_kiᵀ X_kj. Row i reads X in
    rows >= i only, and its own tiles (i, j < i) each once, before the diagonal tile (which they all read)."""
    for i in range(a.nt):
        col = [a.get(k, i) for k in range(i, a.nt)]  # X_ki, k >= i
        for j in list(range(i)) + [i]:
            acc = None
            for k, xki in zip(range(i, a.nt), col):
                term = xki.T @ (col[k - i] if j == i else a.get(k, j))
                acc = term if acc is None else acc.add_(term)
            a.put(i, j, acc)


class Factor:
    """GPTQ's H⁻¹ factor U (upper, UᵀU = H⁻¹) as its transpose's tiles: ``strip(a, b)`` is U[a:b, a:] with a batch
    axis, [1, b - a, K - a], made from the tile columns it covers (the current one is kept: GPTQ's strips walk
    down the diagonal)."""

    def __init__(self, lower: Tiles):
        self.lower, self.dtype, self.device = lower, lower.dtype, lower.device
        self._col: tuple[int, list] | None = None

    def _column(self, c: int) -> list:
        if self._col is None or self._col[0] != c:
            self._col = None  # (the old column goes before the new one is read)
            self._col = (c, [self.lower.get(k, c) for k in range(c, self.lower.nt)])
        return self._col[1]

    def strip(self, a: int, b: int):
        import torch

        lo, t = self.lower, self.lower.tile
        out = torch.zeros((1, b - a, lo.k - a), dtype=self.dtype)
        for c in range(a // t, (b - 1) // t + 1):
            r0, r1 = max(a, c * t), min(b, c * t + lo.size(c))  # U's rows = L's columns here
            for k, tile in zip(range(c, lo.nt), self._column(c)):
                s0 = max(a, k * t)  # U's columns = L's rows, from a on
                out[0, r0 - a : r1 - a, s0 - a : k * t + lo.size(k) - a] = \
                    tile[s0 - k * t :, r0 - c * t : r1 - c * t].T
        return out

    def close(self) -> None:
        self._col = None
        self.lower.close()


def inverse_factor(h: Tiles, damp: float, scratch: str | Path | None = None) -> Factor:
    """The upper Cholesky factor of the damped H⁻¹, as ``gptq.inverse_factor`` makes it in memory: dead columns
    (diagonal <= 0) get a unit diagonal, H + λ·mean-diag·I with λ from ``damp`` raised tenfold (up to 5 times) while
    that is not positive definite; I (plain rounding) if it never is. ``h`` is left as it is."""
    import torch

    diag = h.diagonal()
    dead = diag <= 0
    mean = float(torch.where(dead, torch.ones_like(diag), diag).mean())
    lam = damp
    for _ in range(6):
        f = _damped_copy(h, dead, lam * mean, scratch)
        if cholesky(f):
            invert_lower(f)
            lower_gram(f)  # H⁻¹'s lower part
            if cholesky(f) and all(bool(torch.isfinite(f.get(i, j)).all()) for (i, j) in f.pairs()):
                return Factor(f)
        f.close()
        lam *= 10
    f = Tiles(h.k, h.dtype, scratch, h.tile)
    for i in range(f.nt):
        f.put(i, i, torch.eye(f.size(i), dtype=h.dtype))
    return Factor(f)


def _damped_copy(h: Tiles, dead, add: float, scratch: str | Path | None) -> Tiles:
    f = Tiles(h.k, h.dtype, scratch, h.tile)
    for (i, j) in h.pairs():
        t = h.get(i, j)
        if i == j:
            d = t.diagonal()
            d[dead[h.span(i)]] = 1.0
            d.add_(add)
        f.put(i, j, t)
    return f
