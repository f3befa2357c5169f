"""sha256 of every file of every export form, for checking that a restructuring changes no export.

    python scripts/export_digests.py OUT.json [--work DIR]

Converts the demo model (trained and random weights) and the test suite's tiny checkpoints (tests/builders.py: Scout-
and Maverick-shaped, a top-2 one) to every format x {float, int4, int4-exact, fp8} and int4 calibrated, always into
the same folders under DIR (l4export.json records the source path), and writes {export: {file: sha256}}. Run it
before and after the commits, then compare the two files (``--compare A B``): a difference names the export and
the file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

QUANTS = (None, "int4", "int4-exact", "fp8")
CHECKPOINTS = {
    "scout": dict(shape="scout", style="hub", dtype="bfloat16", intermediate_size=64, initializer_range=0.05),
    "maverick": dict(shape="maverick", style="hub", dtype="float32", intermediate_size=64, initializer_range=0.05),
    "top2": dict(shape="maverick", style="v5", dtype="float32", intermediate_size=64, initializer_range=0.05,
                 num_experts_per_tok=2),
}


def checkpoints(work: Path) -> dict[str, Path]:
    from builders import build

    from l4export.demo import write_demo_checkpoint

    out = {}
    for name, kwargs in CHECKPOINTS.items():
        path = work / "ckpt" / name
        out[name] = path if (path / "config.json").is_file() else build(path, **kwargs)
    for name, seed in (("demo", None), ("demo-random", 0)):
        path = work / "ckpt" / name
        out[name] = path if (path / "config.json").is_file() else write_demo_checkpoint(path, seed=seed)
    return out


def calib_ids(work: Path) -> Path:
    """Token ids (the tiny test checkpoints have no tokenizer), the same every run."""
    import numpy as np

    rng = np.random.default_rng(0)
    path = work / "calib.json"
    path.write_text(json.dumps([rng.integers(4, 256, 32).tolist() for _ in range(8)]))
    return path


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run(work: Path) -> dict[str, dict[str, str]]:
    from l4export.convert import ExportOptions, convert
    from l4export.quant.calib import CalibOptions
    from l4export.quant.recipe import load_recipe

    result = {}
    calib = calib_ids(work)
    (work / "exports").mkdir(parents=True, exist_ok=True)
    for name, src in checkpoints(work).items():
        for fmt in ("onnx", "mlx"):
            forms = [(q, None) for q in QUANTS] + [("int4", CalibOptions(path=calib, samples=4, seqlen=32))]
            for quant, cal in forms:
                key = f"{name}-{fmt}-{quant or 'float'}{'-calibrated' if cal else ''}"
                out = work / "exports" / key
                options = ExportOptions(format=fmt, quant=None if quant is None else load_recipe(quant), calib=cal)
                convert(src, out, options, force=True)
                result[key] = digests(out)
                print(key, len(result[key]), "files", flush=True)
    return result


def compare(a: Path, b: Path) -> int:
    x, y = json.loads(a.read_text()), json.loads(b.read_text())
    bad = [f"{k}: {f}" for k in sorted(set(x) | set(y)) for f in sorted(set(x.get(k, {})) | set(y.get(k, {})))
           if x.get(k, {}).get(f) != y.get(k, {}).get(f)]
    print("\n".join(bad) if bad else f"equal: {len(x)} exports, {sum(map(len, x.values()))} files")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, nargs="?")
    ap.add_argument("--work", type=Path, default=Path("/tmp/l4export-digests"))
    ap.add_argument("--compare", type=Path, nargs=2)
    args = ap.parse_args()
    if args.compare:
        return compare(*args.compare)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(run(args.work), indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
