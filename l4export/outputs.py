"""Writing outputs safely: atomic output folders and a streaming safetensors writer.

Every command that writes a folder writes it into a temporary sibling and renames it into place only when
everything succeeded, so a failure (bad input, full disk, Ctrl-C) leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import L4ExportError, UsageError
from .safetensors_codec import encode_header

log = logging.getLogger(__name__)



class OutputError(L4ExportError):
    """The output could not be written (disk full, permissions)."""


def check_writable(path: str | Path) -> Path:
    """A file that can be written: its folder exists and is writable, and it is not a folder (checked before work)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UsageError(f"{path}: is a folder; give a file name")
    if not parent.is_dir():
        raise UsageError(f"{parent}: the folder of {path.name} does not exist; create it first")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"{path}: not writable; choose another path")
    return path


# A temporary sibling: ".{output name}.tmp-{pid}@{host}-{random}" (".old-" for a replaced output on its way out).
# The pid and a tag of the host name say which process owns it, so the next run into the same folder can tell a
# sibling left by a killed run (its process gone) from one still being written, here or by another host.
_SIBLING = re.compile(r"^\.(?P<out>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:@(?P<host>[0-9a-f]{8}))?-[^/]*$")


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _sibling_prefix(name: str, kind: str) -> str:
    return f".{name}.{kind}-{os.getpid()}@{_host_tag()}-"


def _stale(entry: Path, name: str) -> bool:
    """``entry`` is a temporary sibling this host made whose process is gone (one named without a host, as older
    versions named them, only when it belongs to the output ``name``)."""
    m = _SIBLING.match(entry.name)
    if m is None or entry.is_symlink() or not entry.is_dir():
        return False
    if m["host"] is None and (m["kind"] != "tmp" or m["out"] != name):
        return False
    if m["host"] is not None and m["host"] != _host_tag():
        return False  # another host's process: its pid means nothing here
    pid = int(m["pid"])
    return pid != os.getpid() and not _alive(pid)


def _remove_stale(parent: Path, name: str) -> None:
    """Temporary siblings in ``parent`` left by killed runs (on any output; their process is gone): removed."""
    for entry in parent.glob(".*-*"):
        if not _stale(entry, name):
            continue
        m = _SIBLING.match(entry.name)
        kept, dest = entry / m["out"], parent / m["out"]
        if m["kind"] == "old" and kept.is_dir() and not dest.exists():
            # killed between moving the previous export aside and moving the new one in: the previous one goes back
            log.warning("restoring %s, moved aside by an interrupted run", dest)
            os.replace(kept, dest)
        log.warning("removing %s, left by an interrupted run", entry)
        shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; on success it replaces ``out``, on any failure it is removed."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder; remove it or choose another -o")
    if out.exists() and not force:
        raise UsageError(f"{out}: already exists; pass --force to replace it or choose another -o")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise UsageError(f"{parent}: the parent folder of {out.name} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{parent}: not writable; choose another -o")
    _remove_stale(parent, out.name)
    tmp = Path(tempfile.mkdtemp(prefix=_sibling_prefix(out.name, "tmp"), dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; an export is a normal folder
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=_sibling_prefix(out.name, "old"), dir=parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == 28:  # ENOSPC
            raise OutputError(f"{out}: no space left on the device while writing; nothing was written") from None
        raise OutputError(f"{out}: {e.strerror or e}; nothing was written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass(frozen=True)
class Columns:
    """A matrix given as column blocks ``(first column, block [rows, n])`` in order: a transposed weight made from
    blocks of its source rows. A file gets them by positioned writes, one block at a time."""

    blocks: Iterable[tuple[int, np.ndarray]]


Arrays = np.ndarray | Iterable[np.ndarray] | Columns  # a tensor, its leading-axis slices, or its column blocks


def checked(name: str, shape: tuple[int, ...], dtype: np.dtype, data: Arrays) -> Iterator[np.ndarray]:
    """A tensor's array, or its leading-axis slices as they are made (a writer never holds more than one), each
    contiguous and checked against the planned shape and dtype (column blocks: joined)."""
    if isinstance(data, Columns):
        whole = np.empty(shape, dtype)
        for c, block in _column_blocks(name, shape, dtype, data):
            whole[:, c : c + block.shape[1]] = block
        yield whole
        return
    whole = isinstance(data, np.ndarray)
    rows = 0
    for arr in [data] if whole else data:
        arr = np.asarray(arr, order="C")  # (not ascontiguousarray: it makes a scalar 1-D)
        if arr.dtype != np.dtype(dtype) or (arr.shape != tuple(shape) if whole else arr.shape[1:] != tuple(shape[1:])):
            raise L4ExportError(f"internal: {name} loaded as {arr.shape} {arr.dtype}, planned {shape} {dtype}")
        rows += arr.shape[0] if arr.ndim else 1
        yield arr
        del arr  # not held while the next slice is read
    if not whole and rows != shape[0]:
        raise L4ExportError(f"internal: {name} loaded {rows} leading rows, planned {shape}")


def _column_blocks(name: str, shape: tuple[int, ...], dtype: np.dtype, data: Columns) -> Iterator[tuple[int, np.ndarray]]:
    done = 0
    for c, block in data.blocks:
        block = np.asarray(block, order="C")
        if c != done or block.dtype != np.dtype(dtype) or block.ndim != 2 or block.shape[0] != shape[0]:
            raise L4ExportError(f"internal: {name} column block at {c} is {block.shape} {block.dtype}, planned {shape}")
        done += block.shape[1]
        yield c, block
        del block
    if done != shape[1]:
        raise L4ExportError(f"internal: {name} got {done} columns, planned {shape}")


def write_array(f: BinaryIO, name: str, shape: tuple[int, ...], dtype: np.dtype, data: Arrays) -> None:
    """Write a tensor's bytes at the file's position; column blocks by positioned writes into a real file."""
    if isinstance(data, Columns) and hasattr(f, "fileno"):
        f.flush()
        base, cols, item = f.tell(), shape[1], np.dtype(dtype).itemsize
        for c, block in _column_blocks(name, shape, dtype, data):
            for r in range(shape[0]):  # row r of the matrix: columns c .. c + n of it
                os.pwrite(f.fileno(), memoryview(block[r].view(np.uint8)), base + (r * cols + c) * item)
            del block
        f.seek(base + shape[0] * cols * item)
        return
    for arr in checked(name, shape, dtype, data):
        f.write(memoryview(arr.reshape(-1).view(np.uint8)))
        del arr  # (the next slice is read before the loop would rebind it)


@dataclass(frozen=True)
class PendingTensor:
    """A tensor to write: its name, shape and dtype now, its bytes from ``load()`` later."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    load: Callable[[], Arrays]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def write_safetensors(
    path: Path, tensors: Iterable[PendingTensor], metadata: dict[str, str] | None = None, on_tensor: Callable[[str], None] | None = None
) -> int:
    """Write one safetensors file, loading each tensor only when its bytes are due. Returns bytes written."""
    items = list(tensors)
    head, data = encode_header(((t.name, t.dtype, t.shape) for t in items), metadata or {"format": "np"})
    with open(path, "wb") as f:
        f.write(head)
        for t in items:
            write_array(f, t.name, t.shape, t.dtype, t.load())
            if on_tensor:
                on_tensor(t.name)
    return len(head) + data


def write_sharded(
    folder: Path, tensors: Iterable[PendingTensor], max_shard_bytes: int, metadata: dict[str, str] | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> list[Path]:
    """Write ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` shards plus an index."""
    shards: list[list[PendingTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    if len(shards) == 1:
        path = folder / "model.safetensors"
        write_safetensors(path, shards[0], metadata, on_tensor)
        return [path]
    n = len(shards)
    paths, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards, 1):
        path = folder / f"model-{i:05d}-of-{n:05d}.safetensors"
        write_safetensors(path, shard, metadata, on_tensor)
        paths.append(path)
        for t in shard:
            weight_map[t.name] = path.name
            total += t.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return paths


def copy_files(files: Iterable[Path], dest: Path) -> list[str]:
    copied = []
    for f in files:
        shutil.copy2(f, dest / f.name)
        copied.append(f.name)
    return copied
