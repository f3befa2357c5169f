"""The export folder as a contract: what is in it, measured from disk.

``export_tensor_bytes`` is the quantity the plan predicts (``plan.ExportPlan.total``); tests/test_quant_size.py checks
the two equal on real exports of the tiny models, tensor byte for byte.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np

from .errors import ExportError, UsageError

EXPORT_INFO = "l4export.json"  # written into every export: format, dtype, target, quantization, source

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
            for init in graph.initializer:
                if _GRAPH_CONSTANT.fullmatch(init.name):
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


def read_export_info(path: Path) -> dict:
    """The export's l4export.json (UsageError: not an export; ExportError: damaged)."""
    p = Path(path) / EXPORT_INFO
    if not p.is_file():
        raise UsageError(f"{path}: not an l4export export (no {EXPORT_INFO}); run 'l4export convert' first")
    try:
        info = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        info = None
    if not isinstance(info, dict):
        raise ExportError(f"{p}: not the JSON object l4export writes; the export is damaged, convert it again")
    return info


__all__ = ["EXPORT_INFO", "export_tensor_bytes", "read_export_info"]
