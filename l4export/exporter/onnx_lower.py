"""Lowering of linears and routed experts to ONNX Runtime ops: one emitter per (scheme kind, target), in two tables.

    kind    target   LINEAR (x [.., in] @ W^T)                      EXPERTS (routed SwiGLU experts, a node per rank)
    float   any      MatMul, W stored [in, out]                    com.microsoft.MoE, fc1 gate/up interleaved
    int     any      com.microsoft.MatMulNBits                     com.microsoft.QMoE (CUDA: weights_prepacked=0)
    fp8     cpu      e4m3 Cast * scale (per channel or per square   the same -> MoE (ORT CPU stores FP8 but computes
                     tile) -> MatMul                               in float: the dequantization is a constant
                                                                   subgraph, folded when the session is created)
    fp8     cuda     com.microsoft.MatMulBlockQuantizedFp8Weight   QMoE quant_type='fp8' (square blocks, SM90+,
                                                                   a USE_FP8_QMOE build: docs/fp8.md)

Facts relied on (docs/onnx-runtime-facts.md §2-§8):
  * MoE/QMoE weights are output-major per expert: fc1 ``[E, 2I, H]``, fc2 ``[E, H, I]``; the CPU kernels take SwiGLU
    only as ``swiglu_fusion=1`` (fc1 rows gate0, up0, gate1, up1, ...);
  * ``k=1, normalize_routing_weights=1`` makes the op's routing weight exactly 1.0 on every EP;
  * symmetric int codes are stored ``q+8`` (QMoE/MatMulNBits' default zero point); QMoE scales are float16 even in
    float32 graphs (exact: int scales sit on the fp16 grid, schemes._fp16_exact);
  * MatMulNBits runs at accuracy_level 0 (float activations) for parity;
  * static FP8 activations: QuantizeLinear(FLOAT8E4M3FN) -> Cast -> Mul (ORT 1.31's QDQ fusion rejects a
    DequantizeLinear on FP8 activations); before a fused MoE one scale for all experts, the max of theirs (vLLM).

The emitters see a small ``Lowering`` context (graph builder, weights, quantized tensors, target), never the
decoder builder. Initializers stay lazy: each is read, quantized and packed (``quant/pack.py``) when ir.save writes
it; the few initializers cut from one source tensor share ``QuantSource``'s two-entry cache.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from ..checkpoint import SLICE_BYTES, LazyTensor
from ..outputs import Columns
from ..quant import pack
from ..quant.ahead import quant_runs, rtn
from ..quant.schemes import FP8, AnyScheme, Fp8, Int, PerExpert, QTensor
from ..quant.stream import Run, Streamed
from .onnx_graph import FP32, MS_DOMAIN, GraphBuilder

log = logging.getLogger(__name__)


class QuantSource:
    """Quantized tensors for the lowering: calibrated ones when calibration made them, else round-to-nearest of the
    checkpoint's weights (two-entry cache: fc1 needs gate and up at once). FP8 static input scales from calibration."""

    def __init__(self, tensor: Callable[[str], LazyTensor], scheme: Callable[[str], AnyScheme | None],
                 calibrated: Mapping[str, QTensor] | None = None, act_scales: Mapping[str, np.ndarray] | None = None):
        self.tensor, self.scheme = tensor, scheme
        # looked up on every use, never kept: a spilled store maps a tensor's files afresh each time, so the pages a
        # slice touched leave the resident set with it (a dict of mapped tensors would grow to the whole store)
        self.calibrated: Mapping[str, QTensor] = calibrated if calibrated is not None else {}
        # name -> [E] (routed experts) or [1] (dense) input scales, amax/448
        self.act_scales = {n: np.asarray(v, np.float32).reshape(-1) for n, v in (act_scales or {}).items()}
        self._cache: OrderedDict[str, QTensor] = OrderedDict()
        self._packed: tuple[str, dict] | None = None

    def qtensor(self, name: str) -> QTensor:
        if name in self.calibrated:
            return self.calibrated[name]
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        qt = rtn(self.tensor(name), self.scheme(name))  # a slice at a time; = quantize(load(float32))
        self._cache[name] = qt
        while len(self._cache) > 2:
            self._cache.popitem(last=False)
        return qt

    def lead(self, name: str, run: Run) -> QTensor:
        """Rows (experts of a stack) [a, b) of ``name`` quantized: calibration's, else round to nearest of them."""
        if name in self.calibrated:
            return self.calibrated[name].lead(*run)
        return rtn(self.tensor(name), self.scheme(name), run)

    def runs(self, name: str) -> list[Run]:
        """The leading-axis runs ``lead`` is asked for: one slice of float32 each, or the whole tensor when its
        scheme does not quantize rows on their own."""
        return quant_runs(self.tensor(name), self.scheme(name))

    def streamed(self, key: str, runs: list[Run], make: Callable[[Run], dict], first: str) -> Streamed:
        """The packed layout ``key``, made a run at a time as its first part is written (quant/stream.py)."""
        return self.packed(key, lambda: Streamed(runs, make, first))

    def packed(self, key: str, make: Callable[[], Any]) -> Any:
        """One packed layout at a time (its initializers are written in a row)."""
        if self._packed is None or self._packed[0] != key:
            self._packed = None  # drop the previous one before packing the next
            self._packed = (key, make())
        return self._packed[1]


@dataclass
class Lowering:
    """What an emitter needs: the graph, the weights, the target, and what it reports back for l4export.json."""

    g: GraphBuilder
    tensor: Callable[[str], LazyTensor]
    target: str
    quant: QuantSource | None = None
    counts: Counter = field(default_factory=Counter)  # op kind -> nodes emitted
    applied_scales: dict[str, float] = field(default_factory=dict)  # static FP8 scale in the graph -> its value

    def weight(self, name: str, shape: tuple[int, ...], dtype, load: Callable[[], np.ndarray]) -> ir.Value:
        return self.g.weight(name, tuple(int(d) for d in shape), np.dtype(dtype), load)

    @property
    def meta(self) -> dict:
        """Static FP8 input scales for l4export.json: all calibration gave (per expert for routed experts, down_proj
        included, though the fused op cannot apply it) and the ones the graph applies."""
        if self.quant is None or not self.quant.act_scales:
            return {}
        return {"activation_scales": {n: v.tolist() for n, v in sorted(self.quant.act_scales.items())},
                "activation_scales_applied": dict(self.applied_scales)}


def kind(scheme: AnyScheme | None) -> str:
    return "float" if scheme is None else "int" if isinstance(scheme, (Int, PerExpert)) else "fp8"


def _base(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


# ---- dense linears -------------------------------------------------------------------------------------------
# Each emitter takes the canonical names of one or more weights [out_i, in] that read the same input and stores them
# as one [sum(out_i), in] weight under ``base`` (q, k, v -> qkv_proj: one kernel call instead of three).
def _rows(lo: Lowering, names: tuple[str, ...]) -> tuple[int, int]:
    shapes = [lo.tensor(n).shape for n in names]
    return sum(sh[0] for sh in shapes), shapes[0][1]


def _concat(qts: list[QTensor]) -> QTensor:
    if len(qts) == 1:
        return qts[0]
    zero = None if qts[0].zero is None else np.concatenate([qt.zero for qt in qts])
    return QTensor(qts[0].scheme, np.concatenate([qt.q for qt in qts]), np.concatenate([qt.scale for qt in qts]), zero)


def _quantized(lo: Lowering, names: tuple[str, ...]) -> QTensor:
    return _concat([lo.quant.qtensor(n) for n in names])


def float_linear(lo: Lowering, x: ir.Value, names: tuple[str, ...], base: str, scheme: None) -> ir.Value:
    """W [out, in] stored transposed [in, out] (MatMul layout), under the checkpoint name for one weight."""
    out_f, in_f = _rows(lo, names)
    dt = lo.g.np_dtype
    w = lo.g.weight(base, (in_f, out_f), dt, lambda: _transposed(lo, names, dt))
    return lo.g.op("MatMul", x, w)


def _transposed(lo: Lowering, names: tuple[str, ...], dt: np.dtype) -> Columns:
    """concat(W_i).T [in, sum(out_i)] as column blocks, made from blocks of source rows as they are written (Scout's
    lm_head is 4.1 GB in float32; its transpose is never whole in memory). A quarter of a slice at a time: the
    writer makes each block row-major, a copy of it."""
    def blocks() -> Iterator[tuple[int, np.ndarray]]:
        col = 0
        for n in names:
            for rows in lo.tensor(n).slices(dt, SLICE_BYTES // 4):
                yield col, rows.T
                col += rows.shape[0]
                del rows

    return Columns(blocks())


def int_linear(lo: Lowering, x: ir.Value, names: tuple[str, ...], base: str, scheme: Int) -> ir.Value:
    out_f, in_f = _rows(lo, names)
    base, sdt, blk, bits = _base(base), lo.g.np_dtype, scheme.group_size, scheme.bits
    nb = in_f // blk
    if len(names) == 1:  # a run of rows at a time (lm_head: 1 GB of int8 codes at Scout width)
        runs, make = lo.quant.runs(names[0]), lambda r: pack.to_matmulnbits(lo.quant.lead(names[0], r), sdt)
    else:  # q, k, v as one: small
        runs, make = [(0, out_f)], lambda r: pack.to_matmulnbits(_quantized(lo, names), sdt)
    layout = lambda: lo.quant.streamed(base, runs, make, "B")  # noqa: E731
    b = lo.weight(f"{base}.qweight", (out_f, nb, blk * bits // 8), np.uint8, lambda: layout().chunks())
    s = lo.weight(f"{base}.scales", (out_f, nb), sdt, lambda: layout().part("scales"))
    zp = None
    if not scheme.symmetric:
        zp = lo.weight(f"{base}.qzeros", (out_f, (nb * bits + 7) // 8), np.uint8, lambda: layout().part("zero_points"))
    lo.counts["MatMulNBits"] += 1
    return lo.g.op("MatMulNBits", x, b, s, zp, domain=MS_DOMAIN, K=in_f, N=out_f, bits=bits, block_size=blk,
                   accuracy_level=scheme.accuracy_level)


def fp8_linear_cpu(lo: Lowering, x: ir.Value, names: tuple[str, ...], base: str, scheme: Fp8) -> ir.Value:
    g = lo.g
    out_f, in_f = _rows(lo, names)
    base = _base(base)
    a_scale = _static_scale(lo, names[0], scheme, f"{base}.input_scale")  # static FP8 is never fused (plan)
    if a_scale is not None:
        x = _act_qdq(lo, x, a_scale, base)
    if scheme.block_size:
        # Square tiles are symmetric under transposition: store W^T [in, out] (MatMul layout) and tiles^T.
        b = scheme.block_size
        w8 = lo.weight(f"{base}.weight_fp8", (in_f, out_f), FP8, lambda: np.ascontiguousarray(_quantized(lo, names).q.T))
        t = lo.weight(f"{base}.weight_block_scale", (in_f // b, out_f // b), np.float32,
                      lambda: np.ascontiguousarray(scheme.block_scales(_quantized(lo, names)).T))
        return g.op("MatMul", x, g.cast(_block_dequant(lo, w8, t, (in_f, out_f), b), g.dt))
    # per channel: stored transposed [in, out] (MatMul layout), one scale per output channel; Cast * scale is folded
    # at session creation (DequantizeLinear would not be, and would run on every step)
    w8 = lo.weight(f"{base}.weight_fp8", (in_f, out_f), FP8,
                   lambda: np.ascontiguousarray(pack.to_onnx_fp8(_quantized(lo, names))["weight"].T))
    sc = lo.weight(f"{base}.weight_scale", (out_f,), np.float32, lambda: pack.to_onnx_fp8(_quantized(lo, names))["scale"])
    lo.counts["Fp8Dequant"] += 1
    return g.op("MatMul", x, g.cast(g.op("Mul", g.op("Cast", w8, to=FP32), sc), g.dt))


def fp8_linear_cuda(lo: Lowering, x: ir.Value, names: tuple[str, ...], base: str, scheme: Fp8) -> ir.Value:
    """One CUDA op: B e4m3 [N, K] as stored, b_scale [N, K/block]; per channel is block_size = K."""
    out_f, in_f = _rows(lo, names)
    base = _base(base)
    a_scale = _static_scale(lo, names[0], scheme, f"{base}.input_scale")
    blk = scheme.block_size or in_f
    mm = lambda: pack.to_matmul_fp8(_quantized(lo, names))  # noqa: E731
    w8 = lo.weight(f"{base}.weight_fp8", (out_f, in_f), FP8, lambda: mm()["B"])
    sc = lo.weight(f"{base}.weight_scale", (out_f, in_f // blk), np.float32, lambda: mm()["b_scale"])
    a = None if a_scale is None else lo.weight(f"{base}.input_scale", (), np.float32, lambda: np.array(a_scale, np.float32))
    lo.counts["MatMulBlockQuantizedFp8Weight"] += 1
    return lo.g.op("MatMulBlockQuantizedFp8Weight", x, w8, sc, a, domain=MS_DOMAIN, block_size=blk)


# ---- FP8 helpers -------------------------------------------------------------------------------------------
def _static_scale(lo: Lowering, name: str, scheme: Fp8, where: str) -> float | None:
    """The one input scale the graph applies for ``name`` (None: dynamic). Routed experts share one input, so their
    per-expert scales collapse to the max (no expert's input clips)."""
    if scheme.activation != "static":
        return None
    value = float(lo.quant.act_scales[name].max())
    lo.applied_scales[where] = value
    return value


def _act_qdq(lo: Lowering, x: ir.Value, scale: float, base: str) -> ir.Value:
    """Static FP8 activation fake-quantization fp8_e4m3(x / s) * s with a float32 scalar s: QuantizeLinear
    (saturate=1 clips to +-448, as Fp8.encode) -> Cast to float32 -> Mul by s, in float32 so the scale is exact in
    every graph dtype. Why not DequantizeLinear: ORT 1.31 CPU's QDQ fusion turns Q -> DQ(activation) + DQ(weight)
    -> MatMul into an integer MatMulIntegerToFloat and then rejects the FP8 input (INVALID_GRAPH)."""
    g = lo.g
    s = lo.weight(f"{base}.input_scale", (), np.float32, lambda: np.array(scale, np.float32))
    zp = g.const(np.zeros((), FP8))  # FLOAT8E4M3FN zero point: selects the output type
    lo.counts["QuantizeLinear"] += 1
    q = g.op("QuantizeLinear", g.cast(x, FP32), s, zp)
    return g.cast(g.op("Mul", g.op("Cast", q, to=FP32), s), g.dt)


def _block_dequant(lo: Lowering, w8: ir.Value, tiles: ir.Value, shape: tuple[int, ...], b: int) -> ir.Value:
    """float32 ``w8 [..., R, C] * tiles[..., r // b, c // b]`` (ORT CPU has no 2-D blocked DequantizeLinear):
    Cast, view as [..., R/b, b, C/b, b], multiply by tiles [..., R/b, 1, C/b, 1], view back."""
    lo.counts["Fp8BlockDequant"] += 1  # Cast -> Mul, not a single op
    return _tile_scale(lo, lo.g.op("Cast", w8, to=FP32), tiles, shape, b)


def _tile_scale(lo: Lowering, w: ir.Value, tiles: ir.Value, shape: tuple[int, ...], b: int) -> ir.Value:
    """float32 ``w [..., R, C] * tiles[..., r // b, c // b]``: view as [..., R/b, b, C/b, b], multiply, view back."""
    g, lead = lo.g, shape[:-2]
    r, c = shape[-2:]
    w = g.op("Reshape", w, g.i64(*lead, r // b, b, c // b, b))
    t = g.op("Unsqueeze", tiles, g.i64(len(lead) + 1, len(lead) + 3))
    return g.op("Reshape", g.op("Mul", w, t), g.i64(*shape))


# ---- embedding -------------------------------------------------------------------------------------------------
def embedding(lo: Lowering, ids: ir.Value, name: str, scheme: Int | None) -> ir.Value:
    """Rows of the embedding table for ``ids`` [B, S] -> [B, S, H] in the compute dtype: Gather, or
    GatherBlockQuantized for an int table (codes packed along H, symmetric codes read with the default zero point)."""
    g, t, dt = lo.g, lo.tensor(name), lo.g.np_dtype
    if scheme is None:
        w = g.weight(name, tuple(t.shape), dt, lambda: t.slices(dt))
        return g.op("Gather", w, ids, axis=0)
    v, hid = t.shape
    base, blk, bits = _base(name), scheme.group_size, scheme.bits

    def make(run: Run) -> dict:
        parts = pack.to_matmulnbits(lo.quant.lead(name, run), dt)
        return {**parts, "B": parts["B"].reshape(run[1] - run[0], -1)}

    layout = lambda: lo.quant.streamed(base, lo.quant.runs(name), make, "B")  # noqa: E731
    data = lo.weight(f"{base}.qweight", (v, hid * bits // 8), np.uint8, lambda: layout().chunks())
    sc = lo.weight(f"{base}.scales", (v, hid // blk), dt, lambda: layout().part("scales"))
    zp = None
    if not scheme.symmetric:
        zp = lo.weight(f"{base}.qzeros", (v, (hid // blk * bits + 7) // 8), np.uint8, lambda: layout().part("zero_points"))
    lo.counts["GatherBlockQuantized"] += 1
    return g.op("GatherBlockQuantized", data, ids, sc, zp, domain=MS_DOMAIN, gather_axis=0, quantize_axis=1,
                block_size=blk, bits=bits)


LinearEmitter = Callable[[Lowering, ir.Value, tuple[str, ...], str, AnyScheme | None], ir.Value]
# (scheme kind, target) -> emitter; "*" serves every target. Adding a scheme or a target is a row.
LINEAR: dict[tuple[str, str], LinearEmitter] = {
    ("float", "*"): float_linear, ("int", "*"): int_linear, ("fp8", "cpu"): fp8_linear_cpu, ("fp8", "cuda"): fp8_linear_cuda,
}


def emitter(table: dict, scheme: AnyScheme | None, target: str):
    k = kind(scheme)
    return table.get((k, target)) or table[(k, "*")]


def linear(lo: Lowering, x: ir.Value, names: tuple[str, ...], base: str, scheme: AnyScheme | None) -> ir.Value:
    """x [..., in] @ [W_0; W_1; ...]^T for weights of one scheme, stored as one under ``base``."""
    return emitter(LINEAR, scheme, lo.target)(lo, x, names, base, scheme)

