"""The export folder as a contract: l4export.json (ExportInfo, read and written here only), and what the folder holds,
measured from disk.

``export_tensor_bytes`` is the quantity the plan predicts (``plan.ExportPlan.total``); tests/test_quant_size.py checks
the two equal on real exports of the tiny models, tensor byte for byte.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ExportError, UsageError

# The export folder's file names: the writers write them, the runtimes, inspect and verify read them.
EXPORT_INFO = "l4export.json"  # written into every export: format, dtype, target, quantization, source
MODEL_FILE = "model.onnx"  # the ONNX decoder (+ DATA_FILE: every text weight, shared by the graphs cut from it)
DATA_FILE = "model.onnx.data"
EMBEDS_FILE = "model.embeds.onnx"  # the decoder on inputs_embeds (exports with the vision path)
BATCH_FILE = "model.batch.onnx"  # one decode step of several sequences, each at its own length (serve --parallel)
EMBEDDING_FILE = "embedding.onnx"  # input_ids + image features -> inputs_embeds
VISION_FILE = "vision.onnx"  # the vision encoder + projector (+ VISION_DATA)
VISION_DATA = "vision.onnx.data"
GENAI_CONFIG = "genai_config.json"  # onnxruntime-genai's
# metadata of an int8-KV decoder whose multi-token steps leave the cache to the runtime (exporter/onnx_variants.py)
KV_PREFILL_KEY = "l4export.kv_prefill"
QUANT_REPORT = "quant_report.json"  # calibrated exports: per-tensor error, routing, sizes (+ its plots)

_GRAPH_CONSTANT = re.compile(r"const_\d+")  # GraphBuilder.const: shape/axis constants, inv_freq (not weights)
_ONNX_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2, 17: 1}


def export_tensor_bytes(path: str | Path) -> int:
    """Sum of the weight tensors' bytes of an export folder (the vision tower's included, when exported):
    safetensors tensors (MLX) or the initializers of model.onnx and vision.onnx without the graphs' own constants.
    Headers, the graphs and metadata are not counted."""
    path = Path(path)
    if (path / MODEL_FILE).is_file():
        import onnx

        total = 0
        for name in (MODEL_FILE, VISION_FILE):
            if not (path / name).is_file():
                continue
            graph = onnx.load(str(path / name), load_external_data=False).graph
            for init in graph.initializer:
                if _GRAPH_CONSTANT.fullmatch(init.name):
                    continue
                total += int(np.prod(init.dims, dtype=np.int64)) * _ONNX_ITEMSIZE[init.data_type]
        return total
    from .safetensors_codec import tensor_bytes  # (ml_dtypes: not for the runtimes, which read l4export.json here)

    return sum(tensor_bytes(f) for f in sorted(path.glob("*.safetensors")))


@dataclass(frozen=True)
class QuantInfo:
    """What both formats record of their quantization."""

    recipe: str
    calibrated: bool = False
    calibration: dict[str, Any] | None = None  # {"samples", "tokens", "method"} when calibrated
    tensors: int = 0  # tensors stored quantized
    adapted: dict[str, str] = field(default_factory=dict)  # preset tensors changed to fit: name -> "from -> to"
    schemes: dict[str, dict[str, Any]] = field(default_factory=dict)  # scheme name -> its record (kind, options)
    placement: dict[str, str] = field(default_factory=dict)  # quantized tensor (canonical name) -> scheme name
    allocation: dict[str, Any] | None = None  # mixed precision: the budget, its arithmetic, each unit's choice


@dataclass(frozen=True)
class ExportInfo:
    """l4export.json, typed: written once by convert.py, read by the runtimes, inspect and verify."""

    format: str  # onnx | mlx
    dtype: str  # compute dtype
    target: str  # onnx: cpu | cuda; mlx: cpu (any)
    source: str = ""  # the checkpoint folder it came from
    source_layout: str = ""  # multimodal | text
    tokenizer_files: list[str] = field(default_factory=list)
    quant: QuantInfo | None = None  # None: float
    vision: dict[str, Any] | None = None  # tile_size, tokens_per_tile, image_token_id, max_patches, max_images
    onnx: dict[str, Any] | None = None  # exporter/onnx.py: the graph files and their facts
    mlx: dict[str, Any] | None = None  # exporter/mlx.py: the shards and what mlx-lm can run

    @property
    def quantization(self) -> str | None:
        """The recipe's name, None for a float export."""
        return None if self.quant is None else self.quant.recipe

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: d[k] for k in ("format", "dtype", "target")} | {"quantization": self.quantization} | {
            k: v for k, v in d.items() if k not in ("format", "dtype", "target") and not (k in ("onnx", "mlx") and v is None)}

    def write(self, folder: Path) -> None:
        (Path(folder) / EXPORT_INFO).write_text(json.dumps(self.to_json(), indent=2, default=str))

    @classmethod
    def from_json(cls, d: dict[str, Any], where: Path) -> "ExportInfo":
        try:
            quant = d.get("quant")
            return cls(**{k: d[k] for k in ("format", "dtype", "target")},
                       **{k: d[k] for k in ("source", "source_layout", "tokenizer_files", "vision", "onnx", "mlx") if k in d},
                       quant=None if quant is None else QuantInfo(**quant))
        except (KeyError, TypeError) as err:
            raise ExportError(f"{where}: {err} is missing or not what l4export writes; convert the export again") from None


def read_export_info(path: Path) -> ExportInfo:
    """The export's l4export.json (UsageError: not an export; ExportError: damaged or from an older l4export)."""
    p = Path(path) / EXPORT_INFO
    if not p.is_file():
        raise UsageError(f"{path}: not an l4export export (no {EXPORT_INFO}); run 'l4export convert' first")
    try:
        info = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        info = None
    if not isinstance(info, dict):
        raise ExportError(f"{p}: not the JSON object l4export writes; the export is damaged, convert it again")
    return ExportInfo.from_json(info, p)


__all__ = ["DATA_FILE", "EMBEDDING_FILE", "EMBEDS_FILE", "EXPORT_INFO", "GENAI_CONFIG", "MODEL_FILE", "QUANT_REPORT",
           "VISION_DATA", "VISION_FILE", "ExportInfo", "QuantInfo", "export_tensor_bytes", "read_export_info"]
