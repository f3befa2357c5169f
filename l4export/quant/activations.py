"""Calibration's activations on disk: a layer's per-sample [T_i, H] float32 tensors in one unnamed file, read back a
sample at a time.

Calibration carries, from layer to layer, the layer's input (which pass 2 overwrites with its output, sample by
sample), and holds the normed states h2 of both passes (the routed experts' inputs). In memory they would be
3 x tokens x hidden x 4 bytes: 0.34 GB per copy at Scout width and 16k tokens, 5.4 GB per copy at 128 x 2048. In
these files the resident set holds a sample or two of each; the bytes sit on the spill folder's disk (and in the page
cache, which the kernel can reclaim).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np


ACTIVATION_FILES = 3  # [tokens, hidden] float32 on disk at most: the layer's input/output, both passes' h2


class Samples:
    """Per-sample [T_i, H] float32 tensors, sample ``j`` read with ``s[j]`` (a torch tensor on ``dev``) and written
    with ``s[j] = t``; stored back to back in one unnamed temporary file in ``folder`` (None: $TMPDIR)."""

    def __init__(self, lengths: Sequence[int], hidden: int, folder: str | Path | None, dev: Any):
        self.lengths = [int(n) for n in lengths]
        self.hidden, self.dev = int(hidden), dev
        self.starts = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])
        self._f = tempfile.TemporaryFile(dir=folder)
        self._f.truncate(self.nbytes)

    @property
    def nbytes(self) -> int:
        return int(self.starts[-1]) * self.hidden * 4

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, j: int):
        import torch

        out = np.empty((self.lengths[j], self.hidden), np.float32)
        view, at = memoryview(out.reshape(-1).view(np.uint8)), self._at(self.starts[j])
        done = 0
        while done < len(view):
            n = os.preadv(self._f.fileno(), [view[done:]], at + done)
            if n <= 0:
                raise OSError(f"{self._f.name}: activation file ended early")
            done += n
        return torch.from_numpy(out).to(self.dev)

    def __setitem__(self, j: int, t: Any) -> None:
        a = np.ascontiguousarray(t.detach().cpu().numpy() if hasattr(t, "detach") else t, np.float32)
        if a.shape != (self.lengths[j], self.hidden):
            raise ValueError(f"sample {j}: {a.shape}, expected {(self.lengths[j], self.hidden)}")
        self._write(self._at(self.starts[j]), a)

    def __iter__(self) -> Iterator[Any]:
        for j in range(len(self)):
            yield self[j]

    def write_rows(self, flat: np.ndarray, rows: np.ndarray) -> None:
        """Rows [k, H] at flat token positions ``flat`` (positions across all samples, in order)."""
        for k, r in zip(flat.tolist(), np.ascontiguousarray(rows, np.float32)):
            self._write(self._at(k), r)

    def close(self) -> None:
        self._f.close()

    def _at(self, row: int) -> int:
        return int(row) * self.hidden * 4

    def _write(self, at: int, a: np.ndarray) -> None:
        view, done = memoryview(a.reshape(-1).view(np.uint8)), 0
        while done < len(view):
            done += os.pwrite(self._f.fileno(), view[done:], at + done)


class Routed:
    """One pass's routing, per sample: (h2 [T, H] in ``Samples``, top-k experts [T, k], router scores [T, k]); iterating
    yields those triples, h2 read from disk."""

    def __init__(self, lengths: Sequence[int], hidden: int, folder: str | Path | None, dev: Any):
        self.h2 = Samples(lengths, hidden, folder, dev)
        self.expert: list[Any] = []
        self.score: list[Any] = []

    def append(self, h2: Any, expert: Any, score: Any) -> None:
        self.h2[len(self.expert)] = h2
        self.expert.append(expert)
        self.score.append(score)

    def __len__(self) -> int:
        return len(self.expert)

    def __iter__(self) -> Iterator[tuple[Any, Any, Any]]:
        for j in range(len(self)):
            yield self.h2[j], self.expert[j], self.score[j]

    def close(self) -> None:
        self.h2.close()


__all__ = ["ACTIVATION_FILES", "Routed", "Samples"]
