"""Runtimes for l4export exports (ONNX Runtime, MLX) behind one API (see base.py)."""

from __future__ import annotations

from pathlib import Path

from .base import Runtime, read_export_info


def load_runtime(path: str | Path, provider: str | None = None, dtype: str | None = None,
                 prefill_step: int | None = None, kv_dtype: str | None = None) -> Runtime:
    """Open an export folder with the runtime its format needs.

    provider: ONNX Runtime execution provider ("cpu", "cuda"); dtype: MLX compute dtype override; prefill_step:
    prompt tokens per step (default min(2048, attention_chunk_size)); kv_dtype: quantize the KV cache at run time
    ("int8"; "fp8" on MLX and ONNX Runtime CUDA), None for the compute dtype.
    """
    fmt = read_export_info(Path(path)).format
    if fmt == "onnx":
        from .onnx import OnnxRuntime

        return OnnxRuntime(path, provider=provider, prefill_step=prefill_step, kv_dtype=kv_dtype)
    if fmt == "mlx":
        from .mlx import MlxRuntime

        return MlxRuntime(path, dtype=dtype, prefill_step=prefill_step, kv_dtype=kv_dtype)
    from ..errors import UsageError

    raise UsageError(f"{path}: unknown export format {fmt!r} in l4export.json")


__all__ = ["Runtime", "load_runtime"]
