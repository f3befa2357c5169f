"""glibc's heap, set per phase: calibration's forward passes make many 1-30 MB temporaries that outlive their
neighbours; its weight work (GPTQ, quantize, statistics) reuses blocks of the same few sizes in tight loops.

glibc serves a block above its mmap threshold with a mapping of its own (when the heap's free space cannot serve
it), unmapped on free; below it, from the heap, where freed space is reused only when a later request fits and goes
back to the OS only from the top (or by ``malloc_trim``). The threshold is adaptive: freeing a mapped block raises
it to that block's size, up to 32 MB. Once a real-width weight's 4-30 MB row steps have been freed, each sample's
activations come from the heap, and with the small tensors kept per sample (routing) between them the heap
fragments: over the 64 samples of one Scout-width layer's second pass it grew from 0.47 to 0.88 GB, 0.73 GB of it
free (peak RSS 1.37 GB). With the threshold at 1 MB every such block is its own mapping, given back when freed:
0.85 GB for the same pass. The weight work is the other way round: at 1 MB, GPTQ of one real-width expert projection took
12-15 s instead of 7-9 s (an mmap and its page faults per row step), so it runs with the heap at glibc's ceiling, 32
MB.

Nothing changes where the C library is not glibc.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator
from typing import Any

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
ACTIVATIONS = 1 << 20  # bytes: from this size a block gets a mapping of its own during the forward passes
WEIGHTS = 32 << 20  # ... during the weight work: glibc's ceiling, where its adaptive threshold ends up
_state: dict[str, int | None] = {"threshold": None}  # None: glibc's adaptive default (never set here)


@functools.cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _set(threshold: int) -> None:
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, threshold)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * threshold)  # (what glibc's adaptive mode pairs with its threshold)
    _state["threshold"] = threshold


@contextlib.contextmanager
def mapped_from(threshold: int) -> Iterator[None]:
    """Within: blocks of at least ``threshold`` bytes are mapped on their own (``ACTIVATIONS`` or ``WEIGHTS``). On
    exit the previous setting returns; after the outermost, ``WEIGHTS`` (glibc cannot be made adaptive again)."""
    before = _state["threshold"]
    _set(threshold)
    try:
        yield
    finally:
        _set(before if before is not None else WEIGHTS)


def give_back() -> None:
    """Hand the heap's free pages back to the OS (``malloc_trim``): between phases, what small blocks left behind."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def threshold() -> int | None:
    """The mmap threshold this module set last (None: never set)."""
    return _state["threshold"]


__all__ = ["ACTIVATIONS", "WEIGHTS", "give_back", "mapped_from", "threshold"]
