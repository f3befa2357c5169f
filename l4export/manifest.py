"""The sha256 manifest every export carries (``manifest.sha256``, the ``sha256sum`` format), and its check.

    write_manifest(folder)     after everything else is written, before the export is renamed into place
    check_manifest(folder)     -> the files that are missing, changed or unlisted ([] when intact)

``sha256sum -c manifest.sha256`` in the export folder checks it too.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import ExportError

MANIFEST = "manifest.sha256"


def _sha256(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: str | Path) -> Path:
    folder = Path(folder)
    lines = [f"{_sha256(folder / name)}  {name}\n" for name in _files(folder)]
    path = folder / MANIFEST
    path.write_text("".join(lines))
    return path


def read_manifest(folder: Path) -> dict[str, str]:
    path = folder / MANIFEST
    if not path.is_file():
        raise ExportError(f"{folder}: no {MANIFEST} (exported by an older l4export); convert it again to check it")
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            raise ExportError(f"{path}:{n}: not a sha256sum line; the manifest is damaged, convert again")
        out[name] = digest
    return out


def check_manifest(folder: str | Path) -> list[str]:
    """Problems, one per file: ``missing NAME``, ``changed NAME``, ``unlisted NAME`` ([] when the export is intact)."""
    folder = Path(folder)
    listed = read_manifest(folder)
    present = set(_files(folder))
    problems = [f"missing {n}" for n in sorted(set(listed) - present)]
    problems += [f"changed {n}" for n in sorted(set(listed) & present) if _sha256(folder / n) != listed[n]]
    problems += [f"unlisted {n}" for n in sorted(present - set(listed))]
    return problems
