"""Lazy tensors over a Hugging Face Llama 4 checkpoint (one safetensors file, or shards with an index).

Only headers are read when a checkpoint is opened. Each canonical tensor (see ``names.py``) is a thunk with a
known shape and dtype; ``load()`` reads it with positioned reads into one fresh array, so a reader holds one
tensor in memory at a time (plus one expert slice while stacking), never the model. Stacked expert tensors
also load a range of experts (``load(experts=slice(a, b))``), so a reader can hold a batch of experts instead.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from .errors import CheckpointError, MappingError, UsageError
from .names import (IGNORED, OPS, SCALE_SUFFIXES, Match, canonical_shapes, is_vision, match, normalise_prefix, source_shape,
                    vision_shapes)
from .safetensors_codec import DTYPES
from .safetensors_codec import read_header as read_safetensors_header
from .spec import Llama4Spec, load_spec

log = logging.getLogger(__name__)
FLOAT8 = np.dtype(ml_dtypes.float8_e4m3fn)
SLICE_BYTES = 256 << 20  # float32 bytes of a tensor read (and quantized) at once: LazyTensor.runs



@dataclass(frozen=True)
class SourceTensor:
    """One tensor inside one safetensors file: where its bytes are."""

    file: Path
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def read(self, index: int | slice | None = None, rows: slice | None = None) -> np.ndarray:
        """The whole tensor, slice ``index`` of its first axis, or a contiguous range of it (``slice(a, b)``);
        ``rows``: only that range of the first axis of slice ``index`` (an int).

        A range is one positioned read of only its bytes: the first axis is the outermost in the file."""
        shape, offset = self.shape, self.offset
        row = int(np.prod(shape[1:], dtype=np.int64)) * self.dtype.itemsize if shape else 0
        if isinstance(index, slice):
            a, b = _range(index, shape[0], self.name)
            shape, offset = (b - a,) + shape[1:], offset + a * row
        elif index is not None:
            shape, offset = shape[1:], offset + index * row
        if rows is not None:
            if not isinstance(index, int) or not shape:
                raise ValueError(f"{self.name}: rows= needs one integer index of a tensor of 2 or more axes")
            a, b = _range(rows, shape[0], self.name)
            offset += a * int(np.prod(shape[1:], dtype=np.int64)) * self.dtype.itemsize
            shape = (b - a,) + shape[1:]
        out = np.empty(shape, dtype=self.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        with open(self.file, "rb", buffering=0) as f:
            f.seek(offset)
            done = 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise CheckpointError(f"{self.file}: ended while reading tensor {self.name}; the file is truncated")
                done += n
        return out


def _range(index: slice, size: int, name: str) -> tuple[int, int]:
    """[a, b) of a step-1 slice over an axis of ``size``."""
    a, b, step = index.indices(size)
    if step != 1:
        raise UsageError(f"{name}: expert slices must be contiguous (step 1), got step {step}")
    return a, max(a, b)


def _ints(values: Any, n: int | None = None) -> tuple[int, ...]:
    """A header's list of integers (not floats, not booleans), of length ``n`` if given; TypeError otherwise."""
    if not isinstance(values, list) or (n is not None and len(values) != n) or any(
            not isinstance(v, int) or isinstance(v, bool) for v in values):
        raise TypeError("not a list of integers")
    return tuple(values)


def read_header(path: Path) -> dict[str, SourceTensor]:
    """Parse a safetensors header and check every tensor's byte range against the file."""
    size = path.stat().st_size
    header, base = read_safetensors_header(path)
    out: dict[str, SourceTensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = _ints(info["shape"])
            begin, end = _ints(info["data_offsets"], 2)
        except KeyError as e:
            raise CheckpointError(f"{path}: tensor {name} has unsupported or missing {e} in its header") from None
        except (TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name} has a malformed shape or data_offsets in its header") from None
        if min(shape, default=0) < 0 or not 0 <= begin <= end:
            raise CheckpointError(f"{path}: tensor {name} has a negative dimension or offsets out of order")
        want = math.prod(shape) * dtype.itemsize  # (Python ints: a huge header shape cannot overflow here)
        if end - begin != want:
            raise CheckpointError(f"{path}: tensor {name} {list(shape)} {info['dtype']} needs {want} bytes, header gives {end - begin}")
        if base + end > size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name} ends at byte {base + end} but the file has {size}; re-download this shard"
            )
        out[name] = SourceTensor(path, name, dtype, shape, base + begin)
    _check_layout(path, out, base, size)
    return out


def _check_layout(path: Path, tensors: dict[str, SourceTensor], base: int, size: int) -> None:
    """As the safetensors library checks: the tensors' byte ranges tile the data section, in order, with no overlap
    and no gap (an overlap would read one tensor from another's bytes)."""
    at = base
    for t in sorted(tensors.values(), key=lambda t: (t.offset, t.nbytes)):
        if t.offset != at:
            what = "overlaps the previous tensor" if t.offset < at else f"starts {t.offset - at} bytes after the previous one ends"
            raise CheckpointError(f"{path}: tensor {t.name} {what}; the header's data_offsets are corrupt, re-download this shard")
        at += t.nbytes
    if at != size:
        raise CheckpointError(f"{path}: the tensors end at byte {at} but the file has {size}; the file is corrupt")


@dataclass
class LazyTensor:
    """A canonical tensor: shape and dtype known, bytes read on ``load()``."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype  # dtype of load(): the source's, or float32 for dequantized FP8
    parts: list[tuple[Match, SourceTensor, SourceTensor | None]] = field(default_factory=list)  # (how, weight, scale)

    @property
    def is_fp8(self) -> bool:
        return any(src.dtype == FLOAT8 for _, src, _ in self.parts)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def is_experts(self) -> bool:
        """A stacked routed-expert tensor [E, out, in] (whatever its on-disk layout)."""
        return any(how.op != "copy" for how, _, _ in self.parts)

    def _experts(self, experts: slice | None) -> tuple[int, int]:
        if experts is None:
            return 0, self.shape[0] if self.shape else 0
        if not self.is_experts:
            raise UsageError(f"{self.name}: not a stacked expert tensor; load it whole (experts=None)")
        return _range(experts, self.shape[0], self.name)

    def load(self, dtype: np.dtype | type | str | None = None, experts: slice | None = None,
             finite: bool = True) -> np.ndarray:
        """Materialise the tensor (FP8 is dequantized with its weight_scale), optionally cast. ``finite``: refuse
        NaN or Inf values with the tensor's name (a damaged checkpoint would otherwise export silently).

        ``experts=slice(a, b)`` (stacked expert tensors only) gives ``[b - a, out, in]``, equal to
        ``load()[a:b]``, reading only those experts' bytes: E is the outermost axis of every expert layout on disk
        (fused ``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``, per-expert tensors), so the read is
        positioned and its size does not grow with the number of experts."""
        out_dtype = np.dtype(dtype) if dtype is not None else self.dtype
        a, b = self._experts(experts)
        shape = self.shape if experts is None else (b - a,) + self.shape[1:]
        out = np.empty(shape, dtype=out_dtype)
        for how, src, scale in self.parts:
            if how.op == "copy":
                out[...] = _dequant(src.read(), scale)
            elif how.op == "expert_slice":
                if a <= how.expert < b:
                    out[how.expert - a] = _dequant(src.read(), scale)
            else:
                half = self.shape[1]
                for e in range(a, b):
                    for r, w in _stored_rows(src, scale, e):  # [rows of in, out (x2 fused)], a few MB at a time
                        dst = out[e - a, :, r : r + w.shape[0]]
                        if w.dtype == out_dtype:  # pure data movement: transpose raw bits (bf16 copies are slow)
                            w, dst = _bits(w), _bits(dst)
                        _transpose_into(dst, OPS[how.op].columns(w, half))
        if finite:
            _check_finite(out, self)
        return out

    @property
    def rows_readable(self) -> bool:
        """Whether ``load_rows`` reads only the rows asked for: a dense 2-D tensor stored as one plain source
        tensor (not FP8)."""
        return len(self.shape) == 2 and len(self.parts) == 1 and self.parts[0][0].op == "copy" and not self.is_fp8

    def load_rows(self, rows: slice, dtype: np.dtype | type | str | None = None) -> np.ndarray:
        """Rows [a, b) of the tensor, equal to ``load(dtype)[a:b]``: one positioned read of only those rows when
        ``rows_readable``; anything else is loaded whole and sliced."""
        if not self.rows_readable:
            return self.load(dtype)[rows]
        out = self.parts[0][1].read(rows)
        out = out if dtype is None or out.dtype == np.dtype(dtype) else out.astype(dtype)
        _check_finite(out, self)
        return out

    # ---- the one door for reading a tensor in parts: leading-axis runs (experts of a stack, else rows) ----
    def runs(self, slice_bytes: int | None = None) -> list[tuple[int, int]]:
        """[a, b) runs along the leading axis of about ``slice_bytes`` (default SLICE_BYTES) of float32 each (at
        least one expert or row)."""
        per = 4 * int(np.prod(self.shape[1:], dtype=np.int64))
        step = max(1, (slice_bytes or SLICE_BYTES) // per)
        return [(a, min(a + step, self.shape[0])) for a in range(0, self.shape[0], step)]

    def lead(self, run: tuple[int, int], dtype: np.dtype | type | str | None = None) -> np.ndarray:
        """Experts (a stack) or rows (a matrix) [a, b), reading only those."""
        return self.load(dtype, experts=slice(*run)) if self.is_experts else self.load_rows(slice(*run), dtype)

    def slices(self, dtype: np.dtype | type | str | None = None, slice_bytes: int | None = None) -> Iterator[np.ndarray]:
        """``load(dtype)`` as leading-axis slices of about ``slice_bytes`` of float32 each; whole when its rows
        cannot be read on their own."""
        if not (self.is_experts or self.rows_readable):
            yield self.load(dtype)
            return
        for run in self.runs(slice_bytes):
            yield self.lead(run, dtype)

    def load_fp8(self, experts: slice | None = None) -> tuple[np.ndarray, np.ndarray]:
        """FP8 weights as stored (e4m3) with per-output-channel float32 scales ``[..., out, 1]``
        (``experts=slice(a, b)``: those experts only, as in ``load``)."""
        if not self.is_fp8 or any(how.op not in ("copy", "expert_slice") for how, _, _ in self.parts):
            raise CheckpointError(f"{self.name}: not stored as per-channel FP8")
        a, b = self._experts(experts)
        shape = self.shape if experts is None else (b - a,) + self.shape[1:]
        q = np.empty(shape, dtype=FLOAT8)
        s = np.empty(shape[:-1] + (1,), dtype=np.float32)
        for how, src, scale in self.parts:
            if how.op == "expert_slice":
                if not a <= how.expert < b:
                    continue
                idx = how.expert - a
            else:
                idx = ...
            q[idx] = src.read()
            s[idx] = scale.read().astype(np.float32).reshape(s[idx].shape) if scale is not None else 1.0
        return q, s


def _check_finite(a: np.ndarray, t: LazyTensor) -> None:
    if a.dtype.kind not in "fV" and a.dtype != FLOAT8:
        return
    flat, block = a.reshape(-1), 1 << 22  # in blocks: no float32 copy of a whole bf16 expert stack
    bad = sum(int(np.count_nonzero(~np.isfinite(flat[i : i + block].astype(np.float32, copy=False))))
              for i in range(0, flat.size, block))
    if bad:
        where = t.parts[0][1].file if t.parts else "checkpoint"
        raise CheckpointError(f"{where}: tensor {t.name} has {bad} non-finite values (NaN or Inf); the checkpoint is "
                              "damaged: re-download it (l4export inspect CKPT --check lists every such tensor)")


def _stored_rows(src: SourceTensor, scale: SourceTensor | None, e: int,
                 nbytes: int = 32 << 20) -> Iterator[tuple[int, np.ndarray]]:
    """Expert ``e`` of a transposed expert layout ([E, in, out], out possibly fused gate|up) as (first row, rows)
    blocks of about ``nbytes``: reading a real-width expert whole would hold a second copy of it (fused gate_up:
    168 MB of bf16 for the 84 MB half that is wanted) beside the float32 result. FP8 (its scales) is read whole."""
    n = src.shape[1]
    if src.dtype == FLOAT8:
        yield 0, _dequant(src.read(e), scale, e)
        return
    step = max(1, nbytes // max(1, int(np.prod(src.shape[2:], dtype=np.int64)) * src.dtype.itemsize))
    for r in range(0, n, step):
        yield r, src.read(e, rows=slice(r, min(r + step, n)))


def _transpose_into(dst: np.ndarray, src: np.ndarray, block: int = 128) -> None:
    """dst[...] = src.T in cache-sized tiles (4x faster than one strided copy for large matrices)."""
    rows, cols = src.shape
    for r in range(0, rows, block):
        for c in range(0, cols, block):
            dst[c : c + block, r : r + block] = src[r : r + block, c : c + block].T


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(f"u{a.dtype.itemsize}")


def _dequant(w: np.ndarray, scale: SourceTensor | None, index: int | None = None) -> np.ndarray:
    if w.dtype != FLOAT8:
        return w
    if scale is None:
        return w.astype(np.float32)
    s = scale.read(index if index is not None and len(scale.shape) == 3 else None).astype(np.float32)
    return w.astype(np.float32) * s


class Checkpoint:
    """A Llama 4 checkpoint folder: its spec, its files and its canonical lazy tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.spec: Llama4Spec = load_spec(self.path)
        if not self.path.is_dir():
            raise UsageError(f"{self.path}: pass the checkpoint folder, not a file")
        self.files = self._weight_files()
        self.sources: dict[str, SourceTensor] = {}
        for f in self.files:
            self.sources.update(read_header(f))
        self._check_index()
        self.ignored: list[str] = []
        self.vision: dict[str, LazyTensor] = {}  # the vision tower and projector (HF names), when the config has one
        self.tensors: dict[str, LazyTensor] = self._map()

    # ---- files -------------------------------------------------------------------------------
    def _weight_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        self.weight_map: dict[str, str] | None = None
        if index.is_file():
            try:
                self.weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index}: not a safetensors index (no 'weight_map' object)") from None
            names = sorted(set(self.weight_map.values()))
            missing = [n for n in names if not (self.path / n).is_file()]
            if missing:
                raise CheckpointError(f"{index}: names shard(s) that do not exist: {', '.join(missing)}")
            return [self.path / n for n in names]
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise UsageError(f"{self.path}: no *.safetensors files or model.safetensors.index.json; is this a checkpoint folder?")
        return files

    def _check_index(self) -> None:
        if self.weight_map is None:
            return
        for name, shard in self.weight_map.items():
            src = self.sources.get(name)
            if src is None:
                raise CheckpointError(f"{self.path / shard}: index lists tensor {name} but the shard does not contain it")
            if src.file.name != Path(shard).name:
                raise CheckpointError(f"{self.path}: index puts {name} in {shard} but it is in {src.file.name}")

    # ---- mapping -------------------------------------------------------------------------------
    def _map(self) -> dict[str, LazyTensor]:
        spec = self.spec
        shapes = canonical_shapes(spec)
        tensors: dict[str, LazyTensor] = {}
        unknown: list[str] = []
        vshapes = vision_shapes(spec.vision, spec.hidden_size) if spec.vision is not None else {}
        for raw, src in self.sources.items():
            if is_vision(raw) and vshapes:
                self._map_vision(raw, src, vshapes, unknown)
                continue
            if IGNORED.match(raw):
                self.ignored.append(raw)
                continue
            if raw.endswith(SCALE_SUFFIXES):
                continue  # consumed with its weight below
            name = normalise_prefix(raw)
            hits = match(name, spec) if name is not None else None
            if not hits:
                unknown.append(raw)
                continue
            scale = self.sources.get(raw[: -len(".weight")] + ".weight_scale") if raw.endswith(".weight") else None
            if src.dtype == FLOAT8 and scale is None:
                scale = self.sources.get(raw + "_scale")
            for hit in hits:
                if hit.canonical not in shapes:
                    unknown.append(raw)
                    continue
                want = source_shape(hit.op, shapes[hit.canonical])
                if src.shape != want:
                    raise MappingError(f"{src.file}: tensor {raw} has shape {list(src.shape)}, expected {list(want)} from config.json")
                t = tensors.get(hit.canonical)
                if t is None:
                    dtype = np.dtype(np.float32) if src.dtype == FLOAT8 else src.dtype
                    t = tensors[hit.canonical] = LazyTensor(hit.canonical, shapes[hit.canonical], dtype)
                t.parts.append((hit, src, scale))
        if unknown:
            shown = ", ".join(sorted(unknown)[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
            raise MappingError(f"{self.path}: {len(unknown)} tensor name(s) are not Llama 4 text tensors: {shown}")
        missing = [n for n in shapes if n not in tensors]
        incomplete = [
            n for n, t in tensors.items() if any(h.op == "expert_slice" for h, _, _ in t.parts) and len(t.parts) != shapes[n][0]
        ]
        if missing or incomplete:
            bad = (missing + incomplete)[0]
            more = len(missing) + len(incomplete) - 1
            raise MappingError(
                f"{self.path}: missing tensor {bad} (shape {list(shapes[bad])})"
                + (f" and {more} more" if more else "")
                + "; the checkpoint is incomplete or its config.json does not match it"
            )
        self.vision = {n: self.vision[n] for n in vshapes if n in self.vision}  # model order
        return {n: tensors[n] for n in shapes}  # model order

    def _map_vision(self, raw: str, src: SourceTensor, shapes: dict[str, tuple[int, ...]], unknown: list[str]) -> None:
        if raw not in shapes:
            unknown.append(raw)
        elif src.shape != shapes[raw]:
            raise MappingError(f"{src.file}: tensor {raw} has shape {list(src.shape)}, expected {list(shapes[raw])} "
                               "from config.json's vision_config")
        elif src.dtype == FLOAT8:
            raise MappingError(f"{src.file}: vision tensor {raw} is FP8; l4export reads the vision tower in bf16/fp16/fp32")
        else:
            self.vision[raw] = LazyTensor(raw, src.shape, src.dtype, [(Match(raw, "copy", None), src, None)])

    def vision_missing(self) -> list[str]:
        """The vision tensors the config implies but the files lack (an export with images needs none missing)."""
        if self.spec.vision is None:
            return []
        return [n for n in vision_shapes(self.spec.vision, self.spec.hidden_size) if n not in self.vision]

    # ---- access ----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[LazyTensor]:
        return iter(self.tensors.values())

    def __getitem__(self, name: str) -> LazyTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise MappingError(f"{self.path}: no canonical tensor {name!r}") from None

    def layer(self, index: int) -> dict[str, LazyTensor]:
        """The canonical tensors of one decoder layer, keyed by their name inside the layer."""
        prefix = f"model.layers.{index}."
        return {n[len(prefix) :]: t for n, t in self.tensors.items() if n.startswith(prefix)}

    @property
    def bytes_on_disk(self) -> int:
        return sum(os.path.getsize(f) for f in self.files)

    @property
    def source_dtypes(self) -> dict[str, int]:
        """Text-model source dtypes and how many tensors have each."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            for _, src, _ in t.parts:
                key = str(src.dtype)
                counts[key] = counts.get(key, 0) + 1
        return counts

    def tokenizer_files(self) -> list[Path]:
        names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "chat_template.jinja",
                 "generation_config.json", "preprocessor_config.json", "processor_config.json")
        return [self.path / n for n in names if (self.path / n).is_file()]
