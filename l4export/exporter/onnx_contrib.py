"""Lowering to ONNX Runtime contrib ops (``com.microsoft``): the routed experts as one fused ``MoE`` node.

Kept apart from the model file so that the quantized variants (``QMoE``, ``MatMulNBits``) slot in here
without touching the layer-by-layer mirror of transformers in ``onnx.py``.

Facts this relies on (docs/onnx-runtime-facts.md §2, §4, §5):
  * weights are output-major per expert: fc1 ``[E, 2I, H]``, fc2 ``[E, H, I]``;
  * the CPU kernel takes SwiGLU only as ``swiglu_fusion=1``: fc1 rows interleaved gate0, up0, gate1, up1, ...;
  * ``k=1, normalize_routing_weights=1`` makes the op's own routing weight exactly 1.0 on every EP
    (normalize=0 gives softmax p_max, and on ORT 1.31.1 CPU outputs zeros for an intermediate input).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..checkpoint import LazyTensor
from .onnx_graph import MS_DOMAIN, GraphBuilder


def interleaved_fc1(gate: LazyTensor, up: LazyTensor, dtype: np.dtype) -> np.ndarray:
    """fc1 ``[E, 2I, H]`` with rows gate0, up0, gate1, up1, ... (one source tensor in memory at a time)."""
    e, i, h = gate.shape
    out = np.empty((e, 2 * i, h), dtype=dtype)
    out[:, 0::2] = gate.load(dtype)
    out[:, 1::2] = up.load(dtype)
    return out


def moe_weights(g: GraphBuilder, prefix: str, experts: dict[str, LazyTensor], dtype: np.dtype) -> tuple[ir.Value, ir.Value]:
    """The fused expert initializers ``{prefix}.fc1`` (interleaved gate/up) and ``{prefix}.fc2`` (down)."""
    gate, up, down = experts["gate_proj"], experts["up_proj"], experts["down_proj"]
    e, i, h = gate.shape
    fc1 = g.weight(f"{prefix}.fc1_interleaved", (e, 2 * i, h), dtype, lambda: interleaved_fc1(gate, up, dtype))
    fc2 = g.weight(f"{prefix}.down_proj", tuple(down.shape), dtype, lambda: down.load(dtype))
    return fc1, fc2


def routed_experts(g: GraphBuilder, x: ir.Value, router_logits: ir.Value, fc1: ir.Value, fc2: ir.Value) -> ir.Value:
    """y[t] = expert_{argmax router_logits[t]}(x[t]) with weight 1.0: SwiGLU ``down(silu(gate x) * up x)``.

    x [T, H] and router_logits [T, E] in the compute dtype; fc1 [E, 2I, H]; fc2 [E, H, I] -> [T, H].
    """
    return g.op("MoE", x, router_logits, fc1, None, fc2, domain=MS_DOMAIN, k=1, normalize_routing_weights=1,
                activation_type="swiglu", swiglu_fusion=1)
