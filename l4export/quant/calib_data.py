"""The calibration data: token id arrays from a ``.txt``, ``.jsonl`` or ``.json`` file (``--calib``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import UsageError


def read_calibration(path: str | Path | None, vocab_size: int, tokenizer_dir: str | Path | None = None,
                     samples: int = 64, seqlen: int = 256) -> list[np.ndarray]:
    """Token id arrays from ``.txt`` (one sample per line), ``.jsonl`` ({"text": ...} or {"input_ids": [...]})
    or ``.json`` (a list of strings or of id lists). Text is tokenized with ``tokenizer_dir/tokenizer.json``."""
    if path is None:
        raise UsageError("calibration needs --calib FILE")
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--calib {path}: no such file")
    try:
        raw = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"--calib {path}: not UTF-8 text (byte {err.start}); give a UTF-8 .txt, .jsonl or .json file") from None
    records = [r for r in _records(path, raw) if len(r) > 0][:samples]
    if not records:
        raise UsageError(f"--calib {path}: no calibration samples in the file; give at least one non-empty line")

    tok = _tokenizer(path, tokenizer_dir) if any(isinstance(r, str) for r in records) else None
    out = []
    for n, r in enumerate(records, 1):
        if isinstance(r, str):
            ids = tok.encode(r).ids
        else:
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in r):
                raise UsageError(f"--calib {path} sample {n}: token ids must be integers")
            ids = r
        ids = np.asarray(ids[:seqlen], dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise UsageError(f"--calib {path} sample {n}: token id {int(ids.max())} is outside the vocabulary (0..{vocab_size - 1})")
        if ids.size:
            out.append(ids)
    if not out:
        raise UsageError(f"--calib {path}: every sample tokenized to nothing")
    return out


def _records(path: Path, raw: str) -> list[str | list[int]]:
    """The file's samples, texts or id lists, by suffix: .jsonl, .json, else one text per non-empty line."""
    if path.suffix == ".jsonl":
        return _jsonl_records(path, raw)
    if path.suffix == ".json":
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as err:
            raise UsageError(f"--calib {path}: not JSON ({err.msg}); give a list of strings or of token id lists") from None
        if not isinstance(obj, list) or not all(isinstance(r, (str, list)) for r in obj):
            raise UsageError(f"--calib {path}: a .json calibration file must be a list of strings or of token id lists")
        return list(obj)
    return [line for line in raw.splitlines() if line.strip()]


def _jsonl_records(path: Path, raw: str) -> list[str | list[int]]:
    records: list[str | list[int]] = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"--calib {path} line {n}: not JSON ({err.msg}); one JSON object per line") from None
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            records.append(obj["text"])
        elif isinstance(obj, dict) and isinstance(obj.get("input_ids"), list):
            records.append(obj["input_ids"])
        else:
            raise UsageError(f"--calib {path} line {n}: needs a string \"text\" or a list \"input_ids\" field")
    return records


def _tokenizer(path: Path, tokenizer_dir: str | Path | None):
    """The checkpoint's ``tokenizer.json`` (``tokenizers.Tokenizer``), for calibration text."""
    tj = Path(tokenizer_dir) / "tokenizer.json" if tokenizer_dir else None
    if tj is None or not tj.is_file():
        raise UsageError(f"--calib {path}: text needs the checkpoint's tokenizer.json, which is missing; give token ids instead")
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tj))
