"""Quantized lowering for the ONNX exporter: what ``onnx.py`` emits instead of a float MatMul / MoE when the
recipe gives a tensor a scheme (docs/onnx-runtime-facts.md §3, §5, §7, §8).

    routed experts, int4/int8   -> one com.microsoft.QMoE per MoE layer (swiglu_fusion=1, k=1, normalized,
                                   block_size = group size; symmetric codes stored q+8 = QMoE's default zero point;
                                   float16 scales in every graph dtype: exact, see schemes._fp16_exact)
    other linears, int4/int8    -> com.microsoft.MatMulNBits (accuracy_level=0: float activations, for parity)
    fp8 (e4m3), --target cpu    -> FLOAT8E4M3FN initializers dequantized in the graph (per channel: DequantizeLinear;
                                   square blocks: Cast * tile scale) feeding the same float MatMul / MoE
                                   (ORT CPU stores FP8 but computes in float)
    fp8, --target cuda          -> dense linears: com.microsoft.MatMulBlockQuantizedFp8Weight (per channel:
                                   block_size = K); routed experts (square blocks only): com.microsoft.QMoE
                                   quant_type='fp8', swiglu_fusion=2 (SM90+, and a USE_FP8_QMOE build: docs/fp8.md)
    fp8 static activations      -> QuantizeLinear(FLOAT8E4M3FN) -> Cast -> Mul on the linear's input (CPU), or
                                   MatMulBlockQuantizedFp8Weight's a_scale (CUDA); before a fused MoE, one scale for
                                   all experts: the max of their gate/up input scales (what vLLM does). down_proj's
                                   input is inside the fused op: its scales are recorded in l4export.json only.

Quantized initializers stay lazy: each is quantized and packed when ``ir.save`` writes it. The few
initializers cut from one source tensor (codes, scales, zero points; fc1 = gate + up) share a two-entry
cache, so one (or, for fc1, two) quantized tensors are in memory at a time. With calibration, the
calibrated ``QTensor``s (``quant/calibrate.py``) are used instead of round-to-nearest.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from ..errors import CapabilityError
from ..quant.pack import pack_codes, to_matmul_fp8, to_onnx_fp8, to_qmoe_fp8, zero_points
from ..quant.recipe import Recipe
from ..quant.schemes import FP8, AnyScheme, Fp8, Int, QTensor
from .onnx_graph import MS_DOMAIN

FP32 = ir.DataType.FLOAT

if TYPE_CHECKING:  # pragma: no cover
    from .onnx import DecoderBuilder

log = logging.getLogger(__name__)
EXPERTS = ("gate_proj", "up_proj", "down_proj")


def _interleave(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rows a0, b0, a1, b1, ... along axis 1 (QMoE fc1 with swiglu_fusion=1: gate, up, gate, up, ...)."""
    out = np.empty((a.shape[0], 2 * a.shape[1]) + a.shape[2:], dtype=a.dtype)
    out[:, 0::2], out[:, 1::2] = a, b
    return out


class QuantLowering:
    """Quantized linears and experts for one ``DecoderBuilder``."""

    def __init__(self, builder: "DecoderBuilder", recipe: Recipe, calibrated: Mapping[str, QTensor] | None = None,
                 act_scales: Mapping[str, np.ndarray] | None = None):
        self.b, self.g, self.recipe = builder, builder.g, recipe
        self.calibrated = dict(calibrated or {})
        # FP8 static input scales from calibration: name -> [E] (routed experts) or [1] (dense), amax/448
        self.act_scales = {n: np.asarray(v, np.float32).reshape(-1) for n, v in (act_scales or {}).items()}
        self._cache: OrderedDict[str, QTensor] = OrderedDict()
        self._packed: tuple[str, dict] | None = None  # one MoE layer's QMoE fp8 tensors (initializers in a row)
        self.counts: Counter[str] = Counter()  # op kind -> nodes emitted (for l4export.json)
        self.applied_scales: dict[str, float] = {}  # where a static scale is in the graph -> its value
        for name in builder.ckpt.tensors:
            s = recipe.scheme_for(name)
            if s is None:
                continue
            if name.endswith("router.weight") or name == "model.embed_tokens.weight":
                raise CapabilityError(f"recipe {recipe.name}: {name} cannot be quantized for --format onnx; "
                                      "add a float rule for it (scheme = \"float\")")
            if not isinstance(s, (Int, Fp8)):
                raise CapabilityError(f"recipe {recipe.name}: {s.name} for {name} has no ONNX Runtime kernel; use int4, int8 or fp8")
            if isinstance(s, Fp8) and s.activation == "static" and name not in self.act_scales:
                raise CapabilityError(f"recipe {recipe.name}: {name} has activation = \"static\" but no calibrated input "
                                      "scale; pass --calib FILE, or use activation = \"dynamic\"")

    @property
    def meta(self) -> dict:
        """Extra l4export.json quant info: every static FP8 input scale calibration gave (per expert for routed
        experts, down_proj included, though the fused op cannot apply it), and the ones the graph applies."""
        if not self.act_scales:
            return {}
        return {"activation_scales": {n: v.tolist() for n, v in sorted(self.act_scales.items())},
                "activation_scales_applied": dict(self.applied_scales)}

    def scheme(self, name: str) -> AnyScheme | None:
        return self.recipe.scheme_for(name)

    def qtensor(self, name: str) -> QTensor:
        """The quantized tensor: calibrated if calibration produced it, else round-to-nearest (cached, 2 entries)."""
        if name in self.calibrated:
            return self.calibrated[name]
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        scheme = self.scheme(name)
        qt = scheme.quantize(self.b.ckpt[name].load(np.float32))
        self._cache[name] = qt
        while len(self._cache) > 2:
            self._cache.popitem(last=False)
        return qt

    def _weight(self, name: str, shape: tuple[int, ...], dtype, load: Callable[[], np.ndarray]) -> ir.Value:
        return self.g.weight(name, tuple(int(d) for d in shape), np.dtype(dtype), load)

    # ---- dense linears -------------------------------------------------------------------------------
    def linear(self, x: ir.Value, name: str, scheme: AnyScheme) -> ir.Value:
        """x [..., in] @ W^T with W ``[out, in]`` quantized under ``scheme``."""
        out_f, in_f = self.b.ckpt[name].shape
        base = name[: -len(".weight")] if name.endswith(".weight") else name
        g, sdt = self.g, self.b.np_dtype
        if isinstance(scheme, Int):
            blk, bits = scheme.group_size, scheme.bits
            nb = in_f // blk
            b = self._weight(f"{base}.qweight", (out_f, nb, blk * bits // 8), np.uint8,
                             lambda: pack_codes(self.qtensor(name).q, bits).reshape(out_f, nb, blk * bits // 8))
            s = self._weight(f"{base}.scales", (out_f, nb), sdt, lambda: self.qtensor(name).scale.astype(sdt))
            zp = None
            if not scheme.symmetric:
                zp = self._weight(f"{base}.qzeros", (out_f, (nb * bits + 7) // 8), np.uint8,
                                  lambda: zero_points(self.qtensor(name), bits))
            self.counts["MatMulNBits"] += 1
            return g.op("MatMulNBits", x, b, s, zp, domain=MS_DOMAIN, K=in_f, N=out_f, bits=bits, block_size=blk,
                        accuracy_level=0)
        return self._linear_fp8(x, name, base, scheme, out_f, in_f)

    def _linear_fp8(self, x: ir.Value, name: str, base: str, scheme: Fp8, out_f: int, in_f: int) -> ir.Value:
        g = self.g
        a_scale = self._static_scale(name, scheme, f"{base}.input_scale")
        if self.b.target == "cuda":
            # One CUDA op: B e4m3 [N, K] as stored, b_scale [N, K/block]; per channel is block_size = K.
            blk = scheme.block_size or in_f
            w8 = self._weight(f"{base}.weight_fp8", (out_f, in_f), FP8, lambda: to_matmul_fp8(self.qtensor(name))["B"])
            sc = self._weight(f"{base}.weight_scale", (out_f, in_f // blk), np.float32,
                              lambda: to_matmul_fp8(self.qtensor(name))["b_scale"])
            a = None if a_scale is None else self._weight(f"{base}.input_scale", (), np.float32,
                                                          lambda: np.array(a_scale, np.float32))
            self.counts["MatMulBlockQuantizedFp8Weight"] += 1
            return g.op("MatMulBlockQuantizedFp8Weight", x, w8, sc, a, domain=MS_DOMAIN, block_size=blk)
        if a_scale is not None:
            x = self._act_qdq(x, a_scale, base)
        if scheme.block_size:
            # Square tiles are symmetric under transposition: store W^T [in, out] (MatMul layout) and tiles^T.
            b = scheme.block_size
            w8 = self._weight(f"{base}.weight_fp8", (in_f, out_f), FP8,
                              lambda: np.ascontiguousarray(self.qtensor(name).q.T))
            t = self._weight(f"{base}.weight_block_scale", (in_f // b, out_f // b), np.float32,
                             lambda: np.ascontiguousarray(scheme.block_scales(self.qtensor(name)).T))
            return g.op("MatMul", x, self.b.to(self._block_dequant(w8, t, (in_f, out_f), b), self.b.dt))
        # per channel: stored transposed [in, out] (MatMul layout), one scale per output channel -> DQ axis=1
        w8 = self._weight(f"{base}.weight_fp8", (in_f, out_f), FP8,
                          lambda: np.ascontiguousarray(to_onnx_fp8(self.qtensor(name))["weight"].T))
        sc = self._weight(f"{base}.weight_scale", (out_f,), np.float32, lambda: to_onnx_fp8(self.qtensor(name))["scale"])
        self.counts["DequantizeLinear"] += 1
        w = self.b.to(g.op("DequantizeLinear", w8, sc, axis=1), self.b.dt)
        return g.op("MatMul", x, w)

    # ---- FP8 helpers -------------------------------------------------------------------------------------
    def _static_scale(self, name: str, scheme: Fp8, where: str) -> float | None:
        """The one input scale the graph applies for ``name`` (None: dynamic). Routed experts share one input,
        so their per-expert scales collapse to the max (no expert's input clips)."""
        if scheme.activation != "static":
            return None
        value = float(self.act_scales[name].max())
        self.applied_scales[where] = value
        return value

    def _act_qdq(self, x: ir.Value, scale: float, base: str) -> ir.Value:
        """Static FP8 activation fake-quantization, fp8_e4m3(x / s) * s with a float32 scalar s, in standard ONNX:
        QuantizeLinear (saturate=1 clips to +-448, as Fp8.encode) -> Cast to float32 -> Mul by s, in float32 so
        the scale is exact in every graph dtype.

        Why not DequantizeLinear: ORT 1.31 CPU's QDQ fusion turns Q -> DQ(activation) + DQ(weight) -> MatMul into
        an integer MatMulIntegerToFloat and then rejects the FP8 input (INVALID_GRAPH at session creation).
        Cast * s is the same single multiply."""
        g = self.g
        s = self._weight(f"{base}.input_scale", (), np.float32, lambda: np.array(scale, np.float32))
        zp = g.const(np.zeros((), FP8))  # FLOAT8E4M3FN zero point: selects the output type
        self.counts["QuantizeLinear"] += 1
        q = g.op("QuantizeLinear", self.b.to(x, FP32), s, zp)
        return self.b.to(g.op("Mul", g.op("Cast", q, to=FP32), s), self.b.dt)

    def _block_dequant(self, w8: ir.Value, tiles: ir.Value, shape: tuple[int, ...], b: int) -> ir.Value:
        """float32 ``w8 [..., R, C] * tiles[..., r // b, c // b]`` (ORT CPU has no 2-D blocked DequantizeLinear):
        Cast, view as [..., R/b, b, C/b, b], multiply by tiles [..., R/b, 1, C/b, 1], view back."""
        g, lead = self.g, shape[:-2]
        r, c = shape[-2:]
        self.counts["Fp8BlockDequant"] += 1  # Cast -> Mul, not a single op
        w = g.op("Reshape", g.op("Cast", w8, to=FP32), self.b.i64(*lead, r // b, b, c // b, b))
        t = g.op("Unsqueeze", tiles, self.b.i64(len(lead) + 1, len(lead) + 3))
        return g.op("Reshape", g.op("Mul", w, t), self.b.i64(*shape))

    # ---- routed experts ------------------------------------------------------------------------------
    def expert_scheme(self, pre: str) -> AnyScheme | None:
        """The one scheme of a layer's routed experts (None: float). Mixed schemes are refused."""
        names = [f"{pre}.experts.{n}" for n in EXPERTS]
        schemes = [self.scheme(n) for n in names]
        if all(s is None for s in schemes):
            return None
        gate, up, down = schemes
        ok = (gate is not None and gate == up and down is not None and type(down) is type(gate)
              and (not isinstance(gate, Int) or (down.bits == gate.bits and down.group_size == gate.group_size))
              and (not isinstance(gate, Fp8) or down.block_size == gate.block_size))
        if not ok:
            raise CapabilityError(
                f"recipe {self.recipe.name}: {pre}.experts gate/up/down have schemes "
                f"{[s.name if s else 'float' for s in schemes]}; QMoE needs one scheme for all three (same bits and group/block size)")
        return gate

    def experts(self, x: ir.Value, probs: ir.Value, pre: str, scheme: AnyScheme) -> ir.Value:
        """The routed experts of MoE layer ``pre`` on pre-scaled ``x`` [T, H] with the fp32 choice ``probs`` [T, E]."""
        g, sdt = self.g, self.b.np_dtype
        gate_n, up_n, down_n = (f"{pre}.experts.{n}" for n in EXPERTS)
        e, i, h = self.b.ckpt[gate_n].shape
        if isinstance(scheme, Int):
            bits, blk = scheme.bits, scheme.group_size
            if bits == 8:
                log.warning("%s: block-wise int8 QMoE computes with int8 activations on ORT CPU (~5e-2 error)", pre)
            q = lambda n: self.qtensor(n)  # noqa: E731
            # QMoE takes scales of their own type (T2): float16 even in a float32 graph. Int scales sit on the
            # fp16 grid (schemes._fp16_exact), so this is exact and 2 bytes per group instead of 4.
            sdt = np.float16 if sdt == np.float32 else sdt
            fc1 = self._weight(f"{pre}.experts.fc1.qweight", (e, 2 * i, h * bits // 8), np.uint8,
                               lambda: _interleave(pack_codes(q(gate_n).q, bits), pack_codes(q(up_n).q, bits)))
            fc1_s = self._weight(f"{pre}.experts.fc1.scales", (e, 2 * i, h // blk), sdt,
                                 lambda: _interleave(q(gate_n).scale, q(up_n).scale).astype(sdt))
            fc1_z = fc2_z = None
            if not scheme.symmetric:
                fc1_z = self._weight(f"{pre}.experts.fc1.qzeros", (e, 2 * i, (h // blk * bits + 7) // 8), np.uint8,
                                     lambda: _interleave(zero_points(q(gate_n), bits), zero_points(q(up_n), bits)))
            fc2 = self._weight(f"{pre}.experts.fc2.qweight", (e, h, i * bits // 8), np.uint8,
                               lambda: pack_codes(q(down_n).q, bits))
            fc2_s = self._weight(f"{pre}.experts.fc2.scales", (e, h, i // blk), sdt, lambda: q(down_n).scale.astype(sdt))
            if not scheme.symmetric:
                fc2_z = self._weight(f"{pre}.experts.fc2.qzeros", (e, h, (i // blk * bits + 7) // 8), np.uint8,
                                     lambda: zero_points(q(down_n), bits))
            attrs = {"weights_prepacked": 0} if self.b.target == "cuda" else {}  # CUDA: raw layout, repacked at load
            self.counts["QMoE"] += 1
            return g.op("QMoE", x, probs, fc1, fc1_s, None, fc2, fc2_s, None, None, None, None, fc1_z, fc2_z,
                        domain=MS_DOMAIN, k=1, normalize_routing_weights=1, activation_type="swiglu", swiglu_fusion=1,
                        expert_weight_bits=bits, block_size=blk, **attrs)
        return self._experts_fp8(x, probs, pre, scheme, e, i, h)

    def _experts_fp8(self, x: ir.Value, probs: ir.Value, pre: str, scheme: Fp8, e: int, i: int, h: int) -> ir.Value:
        from . import onnx_contrib

        g = self.g
        gate_n, up_n, down_n = (f"{pre}.experts.{n}" for n in EXPERTS)
        a_scale = self._static_scale(gate_n, scheme, f"{pre}.experts.input_scale")
        if a_scale is not None:  # also for QMoE fp8, which takes no activation scales itself
            # gate and up read the same input (one calibration accumulator), so their scales are equal
            a_scale = max(a_scale, float(self.act_scales[up_n].max()))
            self.applied_scales[f"{pre}.experts.input_scale"] = a_scale
            x = self._act_qdq(x, a_scale, f"{pre}.experts")
        q = self.qtensor
        if self.b.target == "cuda":
            if not scheme.block_size:  # check_target refuses this before any weight is read; kept for library callers
                raise CapabilityError(f"{pre}.experts: per-channel FP8 has no CUDA MoE kernel; add block_size = 128 "
                                      "to the experts' fp8 rule, or use --target cpu")
            b = scheme.block_size
            fc1 = self._weight(f"{pre}.experts.fc1.weight_fp8", (e, 2 * i, h), FP8, lambda: self._qmoe_fp8(pre)["fc1"])
            s1 = self._weight(f"{pre}.experts.fc1.block_scale", (e, 2 * i // b, h // b), np.float32,
                              lambda: self._qmoe_fp8(pre)["fc1_scales"])
            fc2 = self._weight(f"{pre}.experts.fc2.weight_fp8", (e, h, i), FP8, lambda: self._qmoe_fp8(pre)["fc2"])
            s2 = self._weight(f"{pre}.experts.fc2.block_scale", (e, h // b, i // b), np.float32,
                              lambda: self._qmoe_fp8(pre)["fc2_scales"])
            self.counts["QMoE"] += 1
            return g.op("QMoE", x, probs, fc1, s1, None, fc2, s2, domain=MS_DOMAIN, k=1, normalize_routing_weights=1,
                        activation_type="swiglu", swiglu_fusion=2, expert_weight_bits=8, quant_type="fp8", block_size=b)
        if scheme.block_size:
            # CPU: gate, up, down stored as QMoE would ([E, N, K] e4m3 + [E, N/b, K/b] tiles), dequantized in the
            # graph; gate/up interleaved after dequantization for the CPU MoE's swiglu_fusion=1.
            b = scheme.block_size

            def deq(n: str, rows: int, cols: int) -> ir.Value:
                w8 = self._weight(f"{n}.weight_fp8", (e, rows, cols), FP8, lambda: q(n).q)
                t = self._weight(f"{n}.block_scale", (e, rows // b, cols // b), np.float32,
                                 lambda: scheme.block_scales(q(n)))
                return self._block_dequant(w8, t, (e, rows, cols), b)

            gu = [g.op("Unsqueeze", deq(n, i, h), self.b.i64(2)) for n in (gate_n, up_n)]  # [E, I, 1, H] each
            fc1 = g.op("Reshape", g.op("Concat", *gu, axis=2), self.b.i64(e, 2 * i, h))  # rows g0, u0, g1, u1, ...
            fc2 = deq(down_n, h, i)
            return onnx_contrib.routed_experts(g, x, probs, self.b.to(fc1, self.b.dt), self.b.to(fc2, self.b.dt))
        # per channel: e4m3 stored 2-D [E*N, K] (per-axis DQ needs a 1-D scale), dequantized to the float MoE layout
        fp8 = lambda n: to_onnx_fp8(q(n))  # noqa: E731
        w1 = self._weight(f"{pre}.experts.fc1_interleaved.weight_fp8", (e * 2 * i, h), FP8,
                          lambda: _interleave(fp8(gate_n)["weight"], fp8(up_n)["weight"]).reshape(e * 2 * i, h))
        s1 = self._weight(f"{pre}.experts.fc1_interleaved.weight_scale", (e * 2 * i,), np.float32,
                          lambda: _interleave(fp8(gate_n)["scale"], fp8(up_n)["scale"]).reshape(-1))
        w2 = self._weight(f"{pre}.experts.down_proj.weight_fp8", (e * h, i), FP8,
                          lambda: fp8(down_n)["weight"].reshape(e * h, i))
        s2 = self._weight(f"{pre}.experts.down_proj.weight_scale", (e * h,), np.float32,
                          lambda: fp8(down_n)["scale"].reshape(-1))
        self.counts["DequantizeLinear"] += 2
        fc1 = self.b.to(g.op("Reshape", g.op("DequantizeLinear", w1, s1, axis=0), self.b.i64(e, 2 * i, h)), self.b.dt)
        fc2 = self.b.to(g.op("Reshape", g.op("DequantizeLinear", w2, s2, axis=0), self.b.i64(e, h, i)), self.b.dt)
        return onnx_contrib.routed_experts(g, x, probs, fc1, fc2)

    def _qmoe_fp8(self, pre: str) -> dict:
        """QMoE fp8 tensors of one layer, packed once: ir.save writes a layer's four initializers in a row."""
        if self._packed is None or self._packed[0] != pre:
            self._packed = None  # drop the previous layer before packing the next
            self._packed = (pre, to_qmoe_fp8(*(self.qtensor(f"{pre}.experts.{n}") for n in EXPERTS)))
        return self._packed[1]
