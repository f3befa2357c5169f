"""The safetensors format, read and written in this one place (checkpoints, MLX exports, the demo, size checks):

    [8 bytes: header length n, little-endian u64] [n bytes: JSON header, padded with spaces to 8] [data section]
    header = {"__metadata__": {str: str}, name: {"dtype": "BF16", "shape": [...], "data_offsets": [a, b]}, ...}

``data_offsets`` are relative to the data section. Reading checks the length and the JSON here; checkpoint.py checks
each entry against the file (tests/test_fuzz.py fuzzes both).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from .errors import CheckpointError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "U32": np.dtype(np.uint32),
    "BOOL": np.dtype(np.bool_),
}
ST_DTYPES: dict[np.dtype, str] = {dt: name for name, dt in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and where its data section starts (CheckpointError, one line)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: {size} bytes, too short to be a safetensors file; re-download it")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > MAX_HEADER:
            raise CheckpointError(
                f"{path}: header length {n} is larger than the file ({size} bytes); the file is truncated or not safetensors"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: header is not valid JSON; the file is corrupt or not safetensors") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object; the file is corrupt or not safetensors")
    return header, 8 + n


def encode_header(entries: Iterable[tuple[str, np.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, int]:
    """The 8-byte length and the JSON header for tensors written in this order, and the data section's length."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in entries:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": ST_DTYPES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offset


def tensor_bytes(path: Path) -> int:
    """The data bytes of every tensor in a safetensors file (headers not counted)."""
    header, _ = read_header(path)
    return sum(e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items() if k != "__metadata__")


__all__ = ["DTYPES", "MAX_HEADER", "ST_DTYPES", "encode_header", "read_header", "tensor_bytes"]
