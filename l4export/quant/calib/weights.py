"""How calibration reads weights: a layer's non-expert weights for the forward passes (``_Weights``), a checkpoint
tensor as stored (``_stored``), quantized codes dequantized a block of rows at a time (``_Dequantized``), and the
quantization of a 2-D tensor a block of rows at a time (``_rows_quantized``: dense linears, lm_head, the
embedding)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from ...heap import WEIGHTS, mapped_from
from ...torch_llama4 import RowBuffer
from .. import tiles
from ..gptq import factored, gptq, output_sqnr, sampled_rows
from ..schemes import AnyScheme, QTensor, db, plain
from .options import CalibOptions
from .stats import _square_sums


class _Weights(Mapping):
    """A layer's non-expert weights as the forward passes read them: matrices as stored (bf16/fp16, float32, or a
    quantized one's codes, ``_Dequantized``), made float32 a block of rows at a time in the reused buffer ``buf``
    by their reader (``torch_llama4.linear``; bf16/fp16 -> float32 is exact, so the passes compute what they
    would on float32 copies); vectors (the norms) float32. At Maverick width the dense MLP's three matrices are
    0.5 GB as stored, 1.0 GB in float32, and one of them made float32 whole was 0.34 GB more. One buffer, not a
    fresh copy per read: a fresh 168 MB ``.float()`` was 0.76 GB of page faults per sample and pass at Scout width
    (``RowBuffer``)."""

    def __init__(self, raw: dict):
        self.raw = raw  # name -> torch tensor (bf16, fp16 or float32), or a quantized one's codes (_Dequantized)
        self.buf = RowBuffer()

    def __getitem__(self, name: str):
        t = self.raw[name]
        return t if len(t.shape) == 2 else t.float()

    def __iter__(self) -> Iterator[str]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)


def _stored(t: Any, dev, experts: slice | None = None):
    """A checkpoint tensor (or experts [a, b) of a stack) on ``dev``: as stored if bf16 or fp16, else float32 (FP8
    dequantized, ...); its readers make it float32 as they use it (``_Weights``, ``expert_hidden``)."""
    import torch

    a = t.load(experts=experts)
    if a.dtype == np.float16:
        return torch.from_numpy(a).to(dev)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).to(dev)
    return _torch(a.astype(np.float32, copy=False), dev)


def _torch(a: np.ndarray, dev):
    """``a`` as a torch tensor on ``dev``: the same memory on the CPU when numpy owns it (no second copy)."""
    import torch

    if dev.type == "cpu" and a.flags.writeable and a.flags.c_contiguous:
        return torch.from_numpy(a)
    return torch.tensor(a, device=dev)


class _Dequantized:
    """A quantized [out, in] (a dense linear, or an expert of a stack: ``_entry``) as pass 2 reads it: float32
    output rows made as they are sliced (``w[a:b]``), so a real-width expert is held as its codes (42 MB in
    int4/int8), not 168 MB of float32."""

    def __init__(self, qt: QTensor, dev):
        self.qt, self.dev, self.shape = qt, dev, tuple(qt.q.shape)

    def __getitem__(self, rows: slice):
        return _torch(self.qt.rows(rows).dequantize(), self.dev)


def _entry(qt: QTensor, i: int = 0) -> QTensor:
    """Entry ``i`` of a stack [B, N, K] as an [N, K] tensor."""
    return type(qt)(plain(qt.scheme, i, i + 1), qt.q[i], qt.scale[i], None if qt.zero is None else qt.zero[i])


ROW_BLOCK = 64 << 20  # _rows_quantized's step: output rows of at most 64 MB in float32


@mapped_from(WEIGHTS)
def _rows_quantized(t: Any, scheme: AnyScheme, hess: Any, options: CalibOptions,
                    sink: Callable[[QTensor], None]) -> dict:
    """RTN, and GPTQ on ``hess`` (in memory or ``tiles.Tiles``) unless the method is RTN, of a 2-D tensor (``t``:
    its ``shape`` and ``load_rows``) in blocks of ``ROW_BLOCK`` bytes, each block's codes handed to ``sink`` (the
    spill: appended along the rows) as it is made: GPTQ treats rows independently (one H), so the codes are those of
    the whole matrix, which is never float32 whole (Scout's lm_head [202048, 5120]: 4.1 GB), nor its codes (1 GB).
    Returns the statistics (one entry each): weight SQNRs over every row, output SQNRs on ``sampled_rows`` when
    there is a Hessian."""
    n, k = t.shape
    rows = max(1, ROW_BLOCK // (4 * k))
    sums = {"sig": 0.0, "weight_sqnr_rtn": 0.0, "weight_sqnr_calibrated": 0.0}
    picked = sampled_rows(n)
    kept: dict[str, list] = {"w": [], "rtn": [], "calibrated": []}  # the picked rows, for the output SQNRs

    def parts(factor: Any) -> Iterator[tuple[slice, QTensor]]:
        for a in range(0, n, rows):
            w = t.load_rows(slice(a, min(a + rows, n)), np.float32)[None]
            rtn = scheme.quantize(w)
            qt = gptq(w, None, scheme, factor=factor) if factor is not None else rtn
            for key, part in (("weight_sqnr_rtn", rtn), ("weight_sqnr_calibrated", qt)):
                sig, err = _square_sums(w, part)
                sums[key] += float(err[0])
            sums["sig"] += float(sig[0])
            if hess is not None:
                at = picked[(picked >= a) & (picked < a + rows)] - a
                kept["w"].append(w[:, at])
                kept["rtn"].append(rtn.rows(at).dequantize())
                kept["calibrated"].append(qt.rows(at).dequantize())
            yield slice(a, a + rows), _entry(qt)

    if hess is None or options.method != "gptq":
        for _, part in parts(None):
            sink(part)
    else:
        with factored(hess, options.damp, options.spill_dir) as factor:  # one factor for every row block
            for _, part in parts(factor):
                sink(part)
    stats = {key: [float(db(sums["sig"], sums[key]))] for key in ("weight_sqnr_rtn", "weight_sqnr_calibrated")}
    if hess is not None:  # (after ``factored``: H is whole again)
        w = np.concatenate(kept.pop("w"), axis=1)
        for key, v in kept.items():
            stats[f"output_sqnr_{key}"] = output_sqnr(w, np.concatenate(v, axis=1), _numpy(hess)).tolist()
    return stats


def _numpy(hess: Any) -> Any:
    """A Hessian as ``output_sqnr`` reads it: an in-memory one as numpy, a tiled one as it is."""
    return hess if isinstance(hess, tiles.Tiles) else hess.cpu().numpy()
