"""Export sizes: planned (``plan.make_plan``, no weight read) and measured (an export on disk).

The storage rules live in ``l4export/plan.py``; ``plan_bytes`` is the size view of a plan. Why a plan and not a
measurement: the size goals are about Scout (~108 B parameters) and Maverick (~400 B), which cannot be exported
here; tests/test_quant_size.py checks the plan equal to real exports of the tiny models, tensor byte for byte.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np

from ..plan import COMPONENTS, ExportPlan, Format, component, make_plan
from ..spec import Llama4Spec
from .recipe import Recipe


def bf16_bytes(spec: Llama4Spec) -> int:
    """The reference of the size goals: every text parameter in bfloat16."""
    return 2 * spec.total_params


def plan_bytes(spec: Llama4Spec, recipe: Recipe | None, fmt: Format, dtype: str, target: str = "cpu",
               vision: bool = False) -> ExportPlan:
    """The plan of ``l4export convert --format fmt --dtype dtype [--quant recipe]``: ``.total``, ``.by_component``,
    ``.by_tensor`` are the weight bytes it will write (``vision``: with the vision tower and projector; the size goals
    are about the text model, ``bf16_bytes``). (Static FP8 is planned as calibrated.)"""
    return make_plan(spec, fmt, dtype, target, recipe, calibrated=True, vision=vision)


# ---- measured: the same quantity from an export on disk ---------------------------------------------------
_GRAPH_CONSTANT = re.compile(r"const_\d+")  # GraphBuilder.const: shape/axis constants, inv_freq (not weights)
_ONNX_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2, 17: 1}


def export_tensor_bytes(path: str | Path) -> int:
    """Sum of the weight tensors' bytes of an export folder (the vision tower's included, when exported):
    safetensors tensors (MLX) or the initializers of model.onnx and vision.onnx without the graphs' own constants.
    Headers, the graphs and metadata are not counted."""
    path = Path(path)
    if (path / "model.onnx").is_file():
        import onnx

        total = 0
        for name in ("model.onnx", "vision.onnx"):
            if not (path / name).is_file():
                continue
            graph = onnx.load(str(path / name), load_external_data=False).graph
            inputs = {i.name for i in graph.input}  # optional inputs' defaults are not weights
            for init in graph.initializer:
                if _GRAPH_CONSTANT.fullmatch(init.name) or init.name in inputs:
                    continue
                total += int(np.prod(init.dims, dtype=np.int64)) * _ONNX_ITEMSIZE[init.data_type]
        return total
    total = 0
    for f in sorted(path.glob("*.safetensors")):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        total += sum(e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items() if k != "__metadata__")
    return total


__all__ = ["COMPONENTS", "bf16_bytes", "component", "export_tensor_bytes", "plan_bytes"]
