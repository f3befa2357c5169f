"""Shape fuzzing, the long run (issue 24): hypothesis draws small Llama 4 configs across what transformers accepts
(tests/shapes.py says which), each is built with transformers' own classes in a fresh temporary folder (removed
afterwards), and every format x quantization (onnx, mlx) x (float, int4, int4-exact, fp8) is converted and judged:

  * convert must not refuse (tests/shapes.ALLOWED_REFUSALS lists the refusals allowed: none) nor fail;
  * ``l4export verify``'s own gates (per dtype / quantization), on prompts of 1, chunk-1, chunk+1 and 3*chunk tokens
    (8 greedy tokens each) and, for multimodal checkpoints, one image;
  * ONNX: every ``*.onnx`` opens in a plain onnxruntime InferenceSession (CPU; the CUDA-only FP8-cache variant
    excepted) and model.onnx's logits match transformers; MLX: ``mlx_lm.load`` and mlx-lm's logits match
    transformers, wherever mlx-lm 0.32's hard-coded limits (top-1, NoPE at (i+1)%4, MoE by the interleave step, >= 4
    layers) allow; otherwise that is noted, not failed.

Failures do not stop the run. Prints one line per config and a table per (format, quant); writes
benchmarks/results/shape-fuzz-<date>.json (commit, command, machine, versions, counts, every failure with its
config), rewritten after each config so an interrupted run keeps what it found.

    python benchmarks/shape_fuzz.py --configs 300 --seed 0            # the long run (17 min on 2 idle cores)
    python benchmarks/shape_fuzz.py --configs 20 --seed 0 --formats onnx --quants float,int4
    python benchmarks/shape_fuzz.py --configs 300 --seed 0 --only 17,42  # rerun configs 17 and 42 of that run
    python benchmarks/shape_fuzz.py --configs 300 --seed 0 --only 0-19   # the long run's first 20 configs
    python benchmarks/shape_fuzz.py --replay benchmarks/results/shape-fuzz-2026-12-07.json   # its failing configs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests"))
import shapes as S
from common import RESULTS, machine, table


def draw_shapes(n: int, seed: int, multimodal: bool | None) -> list[S.Shape]:
    """The first ``n`` distinct shapes hypothesis generates with ``seed`` (deterministic for a hypothesis version;
    different choice sequences can map to the same shape, so it draws twice as many and drops repeats)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    drawn: list[S.Shape] = []

    @hseed(seed)
    @settings(max_examples=2 * n + 20, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(S.shapes(multimodal=multimodal))
    def collect(shape):
        drawn.append(shape)

    collect()
    seen, unique = set(), []
    for shape in drawn:
        key = json.dumps(shape.to_dict(), sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(shape)
    return unique[:n]


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT.parent, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return ""


def versions() -> dict:
    out = {}
    for mod in ("torch", "transformers", "onnxruntime", "onnx", "mlx", "mlx_lm", "hypothesis", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            try:
                from importlib.metadata import version

                out[mod] = version(mod.replace("_", "-"))
            except Exception:
                out[mod] = None
    return out


def qname(q: str | None) -> str:
    return q or "float"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", type=int, default=300, help="configs to draw (default 300)")
    ap.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0)")
    ap.add_argument("--formats", default="onnx,mlx")
    ap.add_argument("--quants", default="float,int4,int4-exact,fp8")
    ap.add_argument("--multimodal", choices=["mixed", "yes", "no"], default="mixed")
    ap.add_argument("--only", default="", help="config indices of the drawn list to run, e.g. 0-19 or 3,17,42 "
                    "(the same --configs and --seed draw the same list)")
    ap.add_argument("--replay", type=Path, help="a results JSON: rerun its failing configs (its formats/quants)")
    ap.add_argument("--no-plain", action="store_true", help="skip plain onnxruntime / mlx-lm (convert + verify only)")
    ap.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/shape-fuzz-<date>.json)")
    args = ap.parse_args()

    formats = tuple(f for f in args.formats.split(",") if f)
    quants = tuple(None if q == "float" else q for q in args.quants.split(",") if q)
    if "mlx" in formats:
        try:
            import mlx.core  # noqa: F401
        except ImportError:
            print("mlx is not importable here: running --formats onnx only", file=sys.stderr)
            formats = tuple(f for f in formats if f != "mlx")

    if args.replay:
        prev = json.loads(args.replay.read_text())
        failing = {f["config"]: f["shape"] for f in prev["failures"]}  # each failure carries its config
        configs = [(i, S.Shape.from_dict(shape)) for i, shape in sorted(failing.items())]
    else:
        mm = {"mixed": None, "yes": True, "no": False}[args.multimodal]
        shapes = draw_shapes(args.configs, args.seed, mm)
        only = set()
        for part in filter(None, (x.strip() for x in args.only.split(","))):
            lo, _, hi = part.partition("-")
            only.update(range(int(lo), int(hi or lo) + 1))
        configs = [(i, s) for i, s in enumerate(shapes) if not only or i in only]

    date = machine()["date"]
    out_path = args.out or RESULTS / f"shape-fuzz-{date}.json"
    result = {
        "benchmark": "shape-fuzz",
        "issue": 24,
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT.parent), *sys.argv[1:]]),
        "commit": git("rev-parse", "HEAD"),
        "dirty": [line[3:] for line in git("status", "--porcelain", "--", "l4export").splitlines()],
        "machine": dict(machine(), processor=platform.processor()),
        "versions": versions(),
        "seed": args.seed,
        "formats": list(formats),
        "quants": [qname(q) for q in quants],
        "thresholds": {"verify": "l4export.verify.THRESHOLDS", "plain_onnxruntime_rel": S.PLAIN_ORT_TOL,
                       "mlx_lm_rel": S.MLX_LM_TOL, "same_engine_rel": S.SAME_ENGINE_TOL,
                       "greedy_tokens": S.GREEDY_TOKENS},
        "allowed_refusals": [reason for _, reason in S.ALLOWED_REFUSALS],
        "configs_planned": len(configs),
        "configs_done": 0,
        "multimodal_configs": 0,
        "seconds": 0.0,
        "counts": {},
        "notes": {},
        "failures": [],
        "config_seconds": {},  # index -> seconds (build + every check); the configs themselves: --only INDEX redraws
        # one (same --configs, --seed and hypothesis version), and every failure below carries its own
    }
    counts: dict[tuple[str, str], Counter] = defaultdict(Counter)
    notes: Counter = Counter()
    note_configs: dict[str, set] = defaultdict(set)
    t_start = time.perf_counter()
    S.quiet()
    print(f"shape fuzz: {len(configs)} configs x {len(formats)} formats x {len(quants)} quants "
          f"(seed {args.seed}, commit {result['commit'][:10]}{' + uncommitted changes' if result['dirty'] else ''})",
          flush=True)
    for n, (i, shape) in enumerate(configs, 1):
        t = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"shape-fuzz-{i}-") as tmp:
            outcomes = S.check_shape(shape, Path(tmp) / "case", formats, quants, plain=not args.no_plain)
        result["config_seconds"][str(i)] = round(time.perf_counter() - t, 1)
        bad = []
        for o in outcomes:
            counts[o.fmt, qname(o.quant)]["passed" if o.passed else o.stage] += 1
            for note in o.notes:
                key = f"{o.fmt}: " + re.sub(r"\[[^\]]*\]", "[..]", note.split(" (")[0])
                notes[key] += 1
                note_configs[key].add(i)
            if not o.passed:
                bad.append(o)
                result["failures"].append({"config": i, "label": shape.label(), "format": o.fmt, "quant": qname(o.quant),
                                           "stage": o.stage, "message": o.message, "metrics": o.metrics,
                                           "shape": shape.to_dict()})
        status = "ok" if not bad else f"{len(bad)} FAILED: " + "; ".join(o.line()[:160] for o in bad)
        print(f"[{n}/{len(configs)}] #{i} {'mm ' if shape.multimodal else 'txt'} {shape.label()} "
              f"{time.perf_counter() - t:.1f}s {status}", flush=True)
        result["configs_done"] = n
        result["multimodal_configs"] += shape.multimodal
        result["seconds"] = round(time.perf_counter() - t_start, 1)
        result["counts"] = {f"{f}/{q}": dict(c) for (f, q), c in sorted(counts.items())}
        result["notes"] = {k: {"checks": v, "configs": len(note_configs[k])} for k, v in notes.most_common()}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1, default=str))

    rows = []
    for (f, q), c in sorted(counts.items()):
        total = sum(c.values())
        rows.append({"format": f, "quant": q, "checks": total, "passed": c["passed"],
                     "refused": c["refused"], "failed": total - c["passed"] - c["refused"],
                     "by stage": ", ".join(f"{k} {v}" for k, v in sorted(c.items()) if k != "passed")})
    print()
    print(table(rows, ["format", "quant", "checks", "passed", "refused", "failed", "by stage"]))
    if notes:
        print("\nchecks not run (tools' own limits, not failures):")
        for k, v in notes.most_common():
            print(f"  {v:5d}  {k}")
    fails = result["failures"]
    print(f"\n{len(configs)} configs, {sum(sum(c.values()) for c in counts.values())} checks, {len(fails)} failures, "
          f"{result['seconds']:.0f} s; results: {out_path}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
