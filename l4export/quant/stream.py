"""Packed layouts made a run of rows (or experts) at a time, so that no writer holds a whole tensor's codes.

A quantized weight is written as several tensors (codes, then scales and zero points or biases). ``Streamed``
quantizes and packs one leading-axis run at a time: the codes part goes to the writer run by run (``chunks``), the
small parts (scales, zero points: 1/16 of the codes or less) are kept from the same pass for the tensors written
after it (``part``). At Scout width this is what keeps an int4 conversion at one slice of float32 plus the small
parts: the whole codes of a 16-expert projection (0.67 GB) or of lm_head (1 GB at 8 bits), and their packed copy,
are never in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

Run = tuple[int, int]


class Streamed:
    """``make(run)`` -> the packed parts of that run (arrays along the leading axis; other values are ignored);
    ``first`` is the part written first and streamed."""

    def __init__(self, runs: list[Run], make: Callable[[Run], dict], first: str):
        self.runs, self.make, self.first = runs, make, first
        self.kept: dict[str, np.ndarray] | None = None

    def chunks(self) -> Iterator[np.ndarray]:
        """The first part, run by run; keeps the others."""
        kept: dict[str, list[np.ndarray]] = {}
        for run in self.runs:
            parts = self.make(run)
            for k, v in parts.items():
                if k != self.first and isinstance(v, np.ndarray):
                    kept.setdefault(k, []).append(v)
            yield parts[self.first]
        self.kept = {k: v[0] if len(v) == 1 else np.concatenate(v) for k, v in kept.items()}

    def part(self, key: str) -> np.ndarray:
        """A part other than the first, handed over once (one more pass if the first was not written before it)."""
        if self.kept is None or key not in self.kept:
            for _ in self.chunks():
                pass
        assert self.kept is not None
        return self.kept.pop(key)


def member_runs(experts: tuple[int, ...], a: int, b: int) -> list[Run]:
    """The runs of consecutive ``experts`` (ascending) inside [a, b): how a subset of a stack is read and written."""
    out: list[list[int]] = []
    for x in experts:
        if a <= x < b:
            if out and out[-1][1] == x:
                out[-1][1] = x + 1
            else:
                out.append([x, x + 1])
    return [(p, q) for p, q in out]
