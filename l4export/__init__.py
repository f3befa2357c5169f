"""l4export: Llama 4 MoE to ONNX and MLX, with per-expert quantization, runtimes and parity checks.

Imports are lazy so that the runtimes work with only numpy, onnxruntime (or mlx) and tokenizers installed.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Checkpoint", "L4ExportError", "LayerSpec", "Llama4Spec", "load_spec", "spec_from_config", "load_runtime"]


def __getattr__(name: str) -> Any:
    if name == "Checkpoint":
        from .checkpoint import Checkpoint

        return Checkpoint
    if name == "L4ExportError":
        from .errors import L4ExportError

        return L4ExportError
    if name in ("Llama4Spec", "LayerSpec", "load_spec", "spec_from_config"):
        from . import spec

        return getattr(spec, name)
    if name == "load_runtime":
        from .runtimes import load_runtime

        return load_runtime
    raise AttributeError(name)
