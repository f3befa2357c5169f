"""Quantized lowering for the ONNX exporter: what ``onnx.py`` emits instead of a float MatMul / MoE when the
recipe gives a tensor a scheme (docs/onnx-runtime-facts.md §3, §5, §7, §8).

    routed experts, int4/int8   -> one com.microsoft.QMoE per MoE layer (swiglu_fusion=1, k=1, normalized,
                                   block_size = group size; symmetric codes stored q+8 = QMoE's default zero point;
                                   float16 scales in every graph dtype: exact, see schemes._fp16_exact)
    other linears, int4/int8    -> com.microsoft.MatMulNBits (accuracy_level=0: float activations, for parity)
    any linear, fp8 (e4m3)      -> FLOAT8E4M3FN initializer + per-output-channel DequantizeLinear feeding the
                                   same float MatMul / MoE (ORT CPU stores FP8 but computes in float; QMoE fp8
                                   needs SM90 and a USE_FP8_QMOE build, so --target cuda gets this form too)

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
from ..quant.pack import pack_codes, zero_points, to_onnx_fp8
from ..quant.recipe import Recipe
from ..quant.schemes import FP8, AnyScheme, Fp8, Int, QTensor
from .onnx_graph import MS_DOMAIN

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

    def __init__(self, builder: "DecoderBuilder", recipe: Recipe, calibrated: Mapping[str, QTensor] | None = None):
        self.b, self.g, self.recipe = builder, builder.g, recipe
        self.calibrated = dict(calibrated or {})
        self._cache: OrderedDict[str, QTensor] = OrderedDict()
        self.counts: Counter[str] = Counter()  # op kind -> nodes emitted (for l4export.json)
        for name in builder.ckpt.tensors:
            s = recipe.scheme_for(name)
            if s is None:
                continue
            if name.endswith("router.weight") or name == "model.embed_tokens.weight":
                raise CapabilityError(f"recipe {recipe.name}: {name} cannot be quantized for --format onnx; "
                                      "add a float rule for it (scheme = \"float\")")
            if not isinstance(s, (Int, Fp8)):
                raise CapabilityError(f"recipe {recipe.name}: {s.name} for {name} has no ONNX Runtime kernel; use int4, int8 or fp8")

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
        # FP8: stored transposed [in, out] (MatMul layout), one scale per output channel -> DQ axis=1
        w8 = self._weight(f"{base}.weight_fp8", (in_f, out_f), FP8,
                          lambda: np.ascontiguousarray(to_onnx_fp8(self.qtensor(name))["weight"].T))
        sc = self._weight(f"{base}.weight_scale", (out_f,), np.float32, lambda: to_onnx_fp8(self.qtensor(name))["scale"])
        self.counts["DequantizeLinear"] += 1
        w = self.b.to(g.op("DequantizeLinear", w8, sc, axis=1), self.b.dt)
        return g.op("MatMul", x, w)

    # ---- routed experts ------------------------------------------------------------------------------
    def expert_scheme(self, pre: str) -> AnyScheme | None:
        """The one scheme of a layer's routed experts (None: float). Mixed schemes are refused."""
        names = [f"{pre}.experts.{n}" for n in EXPERTS]
        schemes = [self.scheme(n) for n in names]
        if all(s is None for s in schemes):
            return None
        gate, up, down = schemes
        ok = (gate is not None and gate == up and down is not None and type(down) is type(gate)
              and (not isinstance(gate, Int) or (down.bits == gate.bits and down.group_size == gate.group_size)))
        if not ok:
            raise CapabilityError(
                f"recipe {self.recipe.name}: {pre}.experts gate/up/down have schemes "
                f"{[s.name if s else 'float' for s in schemes]}; QMoE needs one scheme for all three (same bits and group size)")
        return gate

    def experts(self, x: ir.Value, probs: ir.Value, pre: str, scheme: AnyScheme) -> ir.Value:
        """The routed experts of MoE layer ``pre`` on pre-scaled ``x`` [T, H] with the fp32 choice ``probs`` [T, E]."""
        from . import onnx_contrib

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
        # FP8 experts: e4m3 stored 2-D [E*N, K] (per-axis DQ needs a 1-D scale), dequantized to the float MoE layout
        fp8 = lambda n: to_onnx_fp8(self.qtensor(n))  # noqa: E731
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
