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
from ..quant.stream import Run, Streamed, member_runs
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


# ---- experts: routed (stacked [E, out, in]) and one-expert MLPs ([out, in] as E = 1) ---------------------------
# Each emitter takes the canonical (gate, up, down) names and ``base``, the prefix of what it stores; ``route`` has
# the fp32 router logits [T, E] (None for a one-expert MLP), and per routing rank the op's input and router_probs
# [T, E] in the compute dtype: one fused node per rank over the same weights.
@dataclass(frozen=True)
class Route:
    """``probs``: one [T, E] per routing rank (top-k: rank j's op picks each token's j-th expert), with ``inputs``,
    the expert input of each rank (Llama 4 scales it by that rank's router score)."""
    logits: ir.Value | None
    probs: tuple[ir.Value, ...]
    inputs: tuple[ir.Value, ...]


def per_rank(lo: Lowering, route: Route, node: Callable[[ir.Value, ir.Value], ir.Value]) -> ir.Value:
    """One fused expert node per routing rank over the same weights, summed: y = sum_j node(x_j, probs_j)."""
    out = None
    for x, probs in zip(route.inputs, route.probs):
        y = node(x, probs)
        out = y if out is None else lo.g.op("Add", out, y)
    return out


def _experts_shape(lo: Lowering, name: str) -> tuple[int, int, int]:
    shape = tuple(lo.tensor(name).shape)
    return shape if len(shape) == 3 else (1,) + shape  # an MLP weight is one expert


def _load_experts(lo: Lowering, name: str, dtype: np.dtype, run: tuple[int, int] | None = None) -> np.ndarray:
    t = lo.tensor(name)
    if run is not None and t.is_experts:
        return t.load(dtype, experts=slice(*run))
    a = t.load(dtype)
    return a if a.ndim == 3 else a[None]


def _expert_runs(lo: Lowering, name: str) -> list[Run]:
    t = lo.tensor(name)
    return t.runs() if t.is_experts else [(0, 1)]


def _q_experts(lo: Lowering, name: str, run: Run) -> QTensor:
    """Experts [a, b) of ``name`` quantized, [b - a, out, in]; a one-expert MLP ([out, in]) is the run (0, 1)."""
    if lo.tensor(name).is_experts:
        return lo.quant.lead(name, run)
    qt = lo.quant.qtensor(name)
    return QTensor(qt.scheme, qt.q[None], qt.scale[None], None if qt.zero is None else qt.zero[None])


def moe(g: GraphBuilder, x: ir.Value, probs: ir.Value, fc1: ir.Value, fc2: ir.Value) -> ir.Value:
    """y[t] = expert_{argmax probs[t]}(x[t]) with weight 1.0: SwiGLU ``down(silu(gate x) * up x)``.
    x [T, H] and probs [T, E] in the compute dtype; fc1 [E, 2I, H] interleaved; fc2 [E, H, I] -> [T, H]."""
    return g.op("MoE", x, probs, fc1, None, fc2, domain=MS_DOMAIN, k=1, normalize_routing_weights=1,
                activation_type="swiglu", swiglu_fusion=1)


def float_experts(lo: Lowering, route: Route, names: tuple[str, ...], base: str, scheme: None) -> ir.Value:
    gate, up, down = names
    e, i, h = _experts_shape(lo, gate)
    dt = lo.g.np_dtype

    def fc1() -> Iterator[np.ndarray]:  # [E, 2I, H] rows g0, u0, g1, u1, ...; written a few experts at a time
        for run in _expert_runs(lo, gate):  # (Scout fp32: 5.4 GB whole)
            yield pack.interleave_rows(_load_experts(lo, gate, dt, run), _load_experts(lo, up, dt, run))

    w1 = lo.g.weight(f"{base}.fc1_interleaved", (e, 2 * i, h), dt, fc1)
    w2 = lo.g.weight(f"{base}.down_proj", (e, h, i), dt,
                     lambda: (_load_experts(lo, down, dt, run) for run in _expert_runs(lo, down)))
    return per_rank(lo, route, lambda x, probs: moe(lo.g, x, probs, w1, w2))


def int_experts(lo: Lowering, route: Route, names: tuple[str, ...], base: str, scheme: Int | PerExpert) -> ir.Value:
    if isinstance(scheme, PerExpert):
        return per_width(lo, route, names, base, scheme)
    return per_rank(lo, route, _qmoe(lo, names, base, scheme, None))


def per_width(lo: Lowering, route: Route, names: tuple[str, ...], base: str, scheme: PerExpert) -> ir.Value:
    """Routed experts at several widths (the mixed allocator's per-expert placement): one QMoE node per width over
    its own experts. Each token's rows go to the node of its expert's width (Compress), and come back in place
    (ScatterND); a token is computed once, by one node.

        probs [T, E] -> ArgMax -> expert [T] -> width [T] --+--> rows of width w: x [n_w, H], probs [n_w, E_w] -> QMoE_w
                                                            +--> ... each width -> ScatterND into [T, H] zeros

    Why the routing stays the single node's, bit for bit: the node of width w sees the same router_probs, only its
    experts' columns, in ascending order; the token's expert (the first largest column, as ArgMax and the single
    node take it) is the largest of those columns too, and the first of them."""
    g = lo.g
    widths = scheme.widths()
    of = np.zeros(len(scheme.schemes), np.int64)
    for w, (_, experts) in enumerate(widths):
        of[list(experts)] = w
    nodes = [_qmoe(lo, names, f"{base}.int{s.bits}", s, experts) for s, experts in widths]

    def node(x: ir.Value, probs: ir.Value) -> ir.Value:
        width = g.op("Gather", g.const(of), g.op("ArgMax", probs, axis=1, keepdims=0))  # [T]
        out = g.op("Expand", g.const(np.zeros((1, 1), g.np_dtype)), g.op("Shape", x))  # [T, H] zeros
        for w, (_, experts) in enumerate(widths):
            at = g.op("Transpose", g.op("NonZero", g.op("Equal", width, g.i64(w))), perm=[1, 0])  # [n_w, 1]
            rows = g.op("Reshape", at, g.i64(-1))  # [n_w]
            mine = g.op("Gather", g.op("Gather", probs, rows, axis=0), g.const(np.array(experts, np.int64)), axis=1)
            out = g.op("ScatterND", out, at, nodes[w](g.op("Gather", x, rows, axis=0), mine))
        return out

    return per_rank(lo, route, node)


def _qmoe(lo: Lowering, names: tuple[str, ...], base: str, scheme: Int,
          experts: tuple[int, ...] | None) -> Callable[[ir.Value, ir.Value], ir.Value]:
    """A QMoE node maker over the routed experts ``experts`` (None: all) of one width: its weights, streamed a few
    experts at a time, and ``node(x, probs)``."""
    gate_n, up_n, down_n = names
    e, i, h = _experts_shape(lo, gate_n)
    runs = _expert_runs(lo, gate_n)
    if experts is not None:  # the runs' parts that hold these experts, in order
        e, runs = len(experts), [r for a, b in runs for r in member_runs(experts, a, b)]
    bits, blk = scheme.bits, scheme.group_size
    if bits == 8 and scheme.accuracy_level == 0:
        log.warning("%s: block-wise int8 QMoE computes with int8 activations on ORT CPU (~5e-2 error)", base)
    # QMoE takes scales of their own type (T2): float16 even in a float32 graph (exact, 2 bytes per group)
    sdt = np.float16 if lo.g.np_dtype == np.float32 else lo.g.np_dtype

    def fc(key: str, names: tuple[str, ...], n: int, k: int) -> tuple[ir.Value, ir.Value, ir.Value | None]:
        """QMoE weights, scales [, zero points] of fc1 (gate, up: rows interleaved) or fc2 (down), [E, n, k] before
        packing, made a few experts at a time."""
        def make(run: Run) -> dict:
            qts = [_q_experts(lo, name, run) for name in names]
            return {"w": pack.qmoe_weights(*qts), "s": pack.qmoe_scales(*qts, dtype=sdt),
                    "z": None if scheme.symmetric else pack.qmoe_zero_points(*qts)}

        layout = lambda: lo.quant.streamed(f"{base}.{key}", runs, make, "w")  # noqa: E731
        w = lo.weight(f"{base}.{key}.qweight", (e, n, k * bits // 8), np.uint8, lambda: layout().chunks())
        s = lo.weight(f"{base}.{key}.scales", (e, n, k // blk), sdt, lambda: layout().part("s"))
        z = None if scheme.symmetric else lo.weight(f"{base}.{key}.qzeros", (e, n, (k // blk * bits + 7) // 8),
                                                     np.uint8, lambda: layout().part("z"))
        return w, s, z

    fc1, fc1_s, fc1_z = fc("fc1", (gate_n, up_n), 2 * i, h)
    fc2, fc2_s, fc2_z = fc("fc2", (down_n,), h, i)
    attrs = {"weights_prepacked": 0} if lo.target == "cuda" else {"accuracy_level": scheme.accuracy_level}

    def node(x: ir.Value, probs: ir.Value) -> ir.Value:
        lo.counts["QMoE"] += 1
        return lo.g.op("QMoE", x, probs, fc1, fc1_s, None, fc2, fc2_s, None, None, None, None, fc1_z, fc2_z,
                       domain=MS_DOMAIN, k=1, normalize_routing_weights=1, activation_type="swiglu", swiglu_fusion=1,
                       expert_weight_bits=bits, block_size=blk, **attrs)

    return node


def _experts_input_qdq(lo: Lowering, route: Route, names: tuple[str, ...], base: str, scheme: Fp8) -> Route:
    """Static FP8: one input scale for the fused op, the max over experts (gate and up read the same input)."""
    gate_n, up_n = names[:2]
    a_scale = _static_scale(lo, gate_n, scheme, f"{base}.input_scale")
    if a_scale is None:
        return route
    a_scale = max(a_scale, float(lo.quant.act_scales[up_n].max()))
    lo.applied_scales[f"{base}.input_scale"] = a_scale
    return Route(route.logits, route.probs, tuple(_act_qdq(lo, x, a_scale, base) for x in route.inputs))


def fp8_experts_cpu(lo: Lowering, route: Route, names: tuple[str, ...], base: str, scheme: Fp8) -> ir.Value:
    """ORT CPU stores FP8 but has no FP8 MoE kernel, and its FP8 gathers and DequantizeLinear convert 1-4 ns per
    element (a decode step slower than float32). So the stored e4m3 weights are dequantized with Cast * scale,
    a constant subgraph that ONNX Runtime folds when the session is created: the file holds FP8 (1 byte per weight),
    memory and compute are float (as a float32 export), and a decode step runs the float MoE."""
    g, q = lo.g, lo.quant.qtensor
    gate_n, up_n, down_n = names
    e, i, h = _experts_shape(lo, gate_n)
    route = _experts_input_qdq(lo, route, names, base, scheme)
    if scheme.block_size:
        # gate, up, down stored as QMoE would ([E, N, K] e4m3 + [E, N/b, K/b] tiles); gate/up interleaved after
        # dequantization for the CPU MoE's swiglu_fusion=1.
        b = scheme.block_size

        def deq(n: str, rows: int, cols: int) -> ir.Value:
            w8 = lo.weight(f"{n}.weight_fp8", (e, rows, cols), FP8, lambda: q(n).q)
            t = lo.weight(f"{n}.block_scale", (e, rows // b, cols // b), np.float32, lambda: scheme.block_scales(q(n)))
            return _block_dequant(lo, w8, t, (e, rows, cols), b)

        gu = [g.op("Unsqueeze", deq(n, i, h), g.i64(2)) for n in (gate_n, up_n)]  # [E, I, 1, H] each
        fc1 = g.op("Reshape", g.op("Concat", *gu, axis=2), g.i64(e, 2 * i, h))  # rows g0, u0, g1, u1, ...
        fc1, fc2 = g.cast(fc1, g.dt), g.cast(deq(down_n, h, i), g.dt)
        return per_rank(lo, route, lambda x, probs: moe(g, x, probs, fc1, fc2))
    # per channel: e4m3 [E, N, K] with one float32 scale per row [E, N, 1]; fc1 rows interleaved gate/up
    fp8 = lambda n: pack.to_onnx_fp8(q(n))  # noqa: E731
    w1 = lo.weight(f"{base}.fc1_interleaved.weight_fp8", (e, 2 * i, h), FP8,
                   lambda: pack.interleave_rows(fp8(gate_n)["weight"], fp8(up_n)["weight"]))
    s1 = lo.weight(f"{base}.fc1_interleaved.weight_scale", (e, 2 * i, 1), np.float32,
                   lambda: pack.interleave_rows(fp8(gate_n)["scale"], fp8(up_n)["scale"])[..., None])
    w2 = lo.weight(f"{base}.down_proj.weight_fp8", (e, h, i), FP8, lambda: fp8(down_n)["weight"])
    s2 = lo.weight(f"{base}.down_proj.weight_scale", (e, h, 1), np.float32, lambda: fp8(down_n)["scale"][..., None])
    lo.counts["Fp8Dequant"] += 2  # Cast -> Mul, folded at session creation
    fc1, fc2 = (g.cast(g.op("Mul", g.op("Cast", w, to=FP32), sc), g.dt) for w, sc in ((w1, s1), (w2, s2)))
    return per_rank(lo, route, lambda x, probs: moe(g, x, probs, fc1, fc2))


def fp8_experts_cuda(lo: Lowering, route: Route, names: tuple[str, ...], base: str, scheme: Fp8) -> ir.Value:
    """QMoE fp8, square blocks (plan.make_plan refuses per-channel FP8 experts for CUDA before any weight is read)."""
    route = _experts_input_qdq(lo, route, names, base, scheme)  # QMoE fp8 takes no activation scales itself
    e, i, h = _experts_shape(lo, names[0])
    b = scheme.block_size
    layer = lambda: lo.quant.packed(base, lambda: pack.to_qmoe_fp8(*(lo.quant.qtensor(n) for n in names)))  # noqa: E731
    fc1 = lo.weight(f"{base}.fc1.weight_fp8", (e, 2 * i, h), FP8, lambda: layer()["fc1"])
    s1 = lo.weight(f"{base}.fc1.block_scale", (e, 2 * i // b, h // b), np.float32, lambda: layer()["fc1_scales"])
    fc2 = lo.weight(f"{base}.fc2.weight_fp8", (e, h, i), FP8, lambda: layer()["fc2"])
    s2 = lo.weight(f"{base}.fc2.block_scale", (e, h // b, i // b), np.float32, lambda: layer()["fc2_scales"])

    def node(x: ir.Value, probs: ir.Value) -> ir.Value:
        lo.counts["QMoE"] += 1
        return lo.g.op("QMoE", x, probs, fc1, s1, None, fc2, s2, domain=MS_DOMAIN, k=1, normalize_routing_weights=1,
                       activation_type="swiglu", swiglu_fusion=2, expert_weight_bits=8, quant_type="fp8", block_size=b)

    return per_rank(lo, route, node)


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
ExpertsEmitter = Callable[[Lowering, Route, tuple[str, ...], str, AnyScheme | None], ir.Value]
# (scheme kind, target) -> emitter; "*" serves every target. Adding a scheme or a target is a row.
LINEAR: dict[tuple[str, str], LinearEmitter] = {
    ("float", "*"): float_linear, ("int", "*"): int_linear, ("fp8", "cpu"): fp8_linear_cpu, ("fp8", "cuda"): fp8_linear_cuda,
}
EXPERTS_TABLE: dict[tuple[str, str], ExpertsEmitter] = {
    ("float", "*"): float_experts, ("int", "*"): int_experts, ("fp8", "cpu"): fp8_experts_cpu,
    ("fp8", "cuda"): fp8_experts_cuda,
}


def emitter(table: dict, scheme: AnyScheme | None, target: str):
    k = kind(scheme)
    return table.get((k, target)) or table[(k, "*")]


def linear(lo: Lowering, x: ir.Value, names: tuple[str, ...], base: str, scheme: AnyScheme | None) -> ir.Value:
    """x [..., in] @ [W_0; W_1; ...]^T for weights of one scheme, stored as one under ``base``."""
    return emitter(LINEAR, scheme, lo.target)(lo, x, names, base, scheme)


def experts(lo: Lowering, route: Route, names: tuple[str, ...], base: str, scheme: AnyScheme | None) -> ir.Value:
    return emitter(EXPERTS_TABLE, scheme, lo.target)(lo, route, names, base, scheme)
