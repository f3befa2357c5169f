"""Lowering of routed experts (and MLPs lowered as one expert) to ONNX Runtime's fused MoE ops: one emitter per
(scheme kind, target) in ``EXPERTS_TABLE``, as onnx_lower.py does for linears (its docstring lists the ops and the
facts relied on).

    kind        target   EXPERTS (routed SwiGLU experts, a node per routing rank)
    float       any      com.microsoft.MoE, fc1 gate/up interleaved
    int         any      com.microsoft.QMoE (CUDA: weights_prepacked=0); per-expert widths: one QMoE node per width
    fp8         cpu      dequantized -> MoE (ORT CPU has no FP8 MoE kernel)
    fp8         cuda     QMoE quant_type='fp8' (square blocks)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..quant import pack
from ..quant.schemes import FP8, AnyScheme, Fp8, Int, PerExpert, QTensor
from ..quant.stream import Run, member_runs
from .onnx_graph import FP32, MS_DOMAIN, GraphBuilder
from .onnx_lower import Lowering, _act_qdq, _block_dequant, _static_scale, emitter

log = logging.getLogger(__name__)


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


ExpertsEmitter = Callable[[Lowering, Route, tuple[str, ...], str, AnyScheme | None], ir.Value]
EXPERTS_TABLE: dict[tuple[str, str], ExpertsEmitter] = {
    ("float", "*"): float_experts, ("int", "*"): int_experts, ("fp8", "cpu"): fp8_experts_cpu,
    ("fp8", "cuda"): fp8_experts_cuda,
}


def experts(lo: Lowering, route: Route, names: tuple[str, ...], base: str, scheme: AnyScheme | None) -> ir.Value:
    return emitter(EXPERTS_TABLE, scheme, lo.target)(lo, route, names, base, scheme)
