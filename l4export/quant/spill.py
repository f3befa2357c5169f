"""Calibrated tensors on disk: ``SpilledTensors``, a read-only mapping over memory-mapped files."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .schemes import Int, PerExpert, QTensor


_SUFFIXES = ("q", "scale", "zero")


@dataclass(frozen=True)
class ArrayFile:
    """One array as a raw file (a job's output, or an input every job of a layer reads): its path and layout."""

    path: str
    dtype: np.dtype  # (the dtype itself: ml_dtypes' float8/bfloat16 have no string form that numpy reads back)
    shape: tuple[int, ...]

    @staticmethod
    def save(a: np.ndarray, path: str | Path) -> "ArrayFile":
        with open(path, "wb") as f:
            f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
        return ArrayFile(str(path), np.dtype(a.dtype), tuple(a.shape))

    def load(self) -> np.ndarray:
        return np.fromfile(self.path, dtype=self.dtype).reshape(self.shape)

    def unlink(self) -> None:
        Path(self.path).unlink(missing_ok=True)


@dataclass(frozen=True)
class Part:
    """A quantized tensor (or a run of its experts) that a job wrote as raw files: what the driver needs to map it."""

    scheme: object
    arrays: tuple[ArrayFile | None, ...]  # q, scale, zero (None: no zero points)

    def load(self) -> QTensor:
        a = [None if f is None else f.load() for f in self.arrays]
        return QTensor(self.scheme, a[0], a[1], a[2])  # type: ignore[arg-type]

    def unlink(self) -> None:
        for f in self.arrays:
            if f is not None:
                f.unlink()


def save_part(folder: str | Path, qt: QTensor) -> Part:
    """Write ``qt`` as raw files in ``folder`` (a job's output; the driver appends it with ``append_part``)."""
    stem = Path(folder) / f"part-{os.getpid()}-{secrets.token_hex(6)}"
    return Part(qt.scheme, tuple(None if a is None else ArrayFile.save(a, f"{stem}.{suffix}")
                                 for suffix, a in zip(_SUFFIXES, (qt.q, qt.scale, qt.zero))))


def stacked(name: str, first: Any, n1: int, then: Any, n2: int) -> PerExpert:
    """The scheme of ``n1`` experts of scheme ``first`` followed by ``n2`` of ``then`` (integer widths only)."""
    def each(s: Any, n: int) -> tuple:
        if isinstance(s, PerExpert) and len(s.schemes) == n:
            return s.schemes
        if isinstance(s, Int):
            return (s,) * n
        raise ValueError(f"{name}: appended part does not match the earlier parts")
    try:
        return PerExpert(each(first, n1) + each(then, n2))
    except Exception as err:  # RecipeError: the widths differ in more than their bits
        raise ValueError(f"{name}: appended part does not match the earlier parts ({err})") from None


class SpilledTensors(Mapping[str, QTensor]):
    """Calibrated tensors, spilled to disk as they are produced and mapped back read-only on access.

    Each tensor's codes, scales and zero points are raw little files (``{i}.q``/``.scale``/``.zero``) in a private
    temporary folder; ``[name]`` returns a ``QTensor`` over ``np.memmap`` views of them, so holding every calibrated
    tensor of Scout (~100 GB of uint8 codes) costs address space, not RAM. Routed experts are appended in expert
    batches (E is the leading axis, so a batch is a contiguous byte range written with plain ``write``; no
    writable mapping grows the resident set). The folder is removed by ``close()``, when this object is garbage
    collected, or at interpreter exit; arrays already mapped stay readable after that (the files are unlinked,
    not unmapped)."""

    def __init__(self, parent: str | Path | None = None):
        self.path = Path(tempfile.mkdtemp(prefix="l4export-calib-", dir=parent))
        # name -> [file index, scheme, (q dtype, q shape), (scale dtype, scale shape), zero (dtype, shape) or None]
        self._meta: dict[str, list[Any]] = {}
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.path), True)

    def append(self, name: str, qt: QTensor) -> None:
        """Add ``qt`` as ``name``, or append it along the leading (expert) axis of ``name``'s earlier parts."""
        parts = (qt.q, qt.scale, qt.zero)
        meta = self._meta.get(name)
        if meta is None:
            meta = self._meta[name] = [len(self._meta), qt.scheme,
                                       *(None if a is None else (a.dtype, tuple(a.shape)) for a in parts)]
        else:
            if meta[1] != qt.scheme:  # experts at several widths (PerExpert), or an error
                meta[1] = stacked(name, meta[1], meta[2][1][0], qt.scheme, qt.q.shape[0])
            if any((m is None) != (a is None) or (a is not None and m[1][1:] != a.shape[1:])
                   for m, a in zip(meta[2:], parts)):
                raise ValueError(f"{name}: appended part does not match the earlier parts")
            for j, a in enumerate(parts):
                if a is not None:
                    meta[2 + j] = (a.dtype, (meta[2 + j][1][0] + a.shape[0],) + tuple(a.shape[1:]))
        for suffix, a in zip(("q", "scale", "zero"), parts):
            if a is not None:
                with open(self.path / f"{meta[0]}.{suffix}", "ab") as f:
                    f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)

    def append_part(self, name: str, part: Part) -> None:
        """Append a job's ``Part`` as ``append`` would append its tensor, then remove the part's files."""
        self.append(name, part.load())
        part.unlink()

    def __getitem__(self, name: str) -> QTensor:
        index, scheme, *parts = self._meta[name]
        arrays = [None if m is None else self._map(f"{index}.{suffix}", *m)
                  for suffix, m in zip(("q", "scale", "zero"), parts)]
        return QTensor(scheme, arrays[0], arrays[1], arrays[2])

    def _map(self, file: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        if int(np.prod(shape, dtype=np.int64)) == 0:
            return np.empty(shape, dtype)  # nothing to map (mmap refuses empty files)
        return np.memmap(self.path / file, dtype=dtype, mode="r", shape=shape)

    def __contains__(self, name: object) -> bool:
        return name in self._meta

    def __iter__(self) -> Iterator[str]:
        return iter(self._meta)

    def __len__(self) -> int:
        return len(self._meta)

    def reorder(self, names: Iterable[str]) -> None:
        """Iterate in the order of ``names`` (model order); names not given keep their order, last."""
        order = {n: i for i, n in enumerate(names)}
        self._meta = dict(sorted(self._meta.items(), key=lambda kv: order.get(kv[0], len(order))))

    @property
    def bytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir()) if self.path.is_dir() else 0

    def close(self) -> None:
        """Remove the folder now (idempotent)."""
        self._finalizer()
