"""heap.mapped_from: glibc's mmap threshold per phase, checked on glibc's own counters (mallinfo2) in a fresh process
(the setting is process-wide and cannot be undone)."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap

import pytest

from l4export import heap

try:
    _GLIBC = hasattr(ctypes.CDLL(None), "mallinfo2")
except OSError:
    _GLIBC = False

_PROBE = textwrap.dedent("""
    import ctypes, json, numpy as np
    from l4export import heap

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = Info

    def own_mapping(nbytes):  # does a block of nbytes get a mapping of its own?
        heap.give_back()  # (glibc maps a block only when the heap's free space cannot serve it: empty that first)
        before = libc.mallinfo2().hblkhd
        block = np.ones(nbytes // 4, np.float32)
        grew = libc.mallinfo2().hblkhd - before
        del block
        return grew >= nbytes

    big = np.ones(16 << 18, np.float32)  # 16 MB: mapped; freeing it raises glibc's adaptive threshold to 16 MB
    del big
    out = {"adaptive": own_mapping(8 << 20)}
    with heap.mapped_from(heap.ACTIVATIONS):
        out["activations"] = own_mapping(8 << 20)
        out["nested_weights"] = heap.mapped_from(heap.WEIGHTS)(own_mapping)(8 << 20)
        out["restored"] = own_mapping(8 << 20)
    out["after"] = own_mapping(8 << 20)
    print(json.dumps(out))
""")


@pytest.mark.skipif(not _GLIBC, reason="glibc's mallinfo2 is not available here")
def test_threshold_per_phase_on_glibc_counters():
    import json

    r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # adaptive (after a 16 MB block was freed): 8 MB comes from the heap; ACTIVATIONS maps it on its own; WEIGHTS,
    # nested, takes it from the heap again; the outer setting returns, and after the outermost, WEIGHTS
    assert json.loads(r.stdout.splitlines()[-1]) == {"adaptive": False, "activations": True, "nested_weights": False,
                                                      "restored": True, "after": False}


def test_nesting_restores_the_previous_setting():
    with heap.mapped_from(heap.ACTIVATIONS):
        assert heap.threshold() == heap.ACTIVATIONS
        with heap.mapped_from(heap.WEIGHTS):
            assert heap.threshold() == heap.WEIGHTS
        assert heap.threshold() == heap.ACTIVATIONS
    assert heap.threshold() == heap.WEIGHTS
