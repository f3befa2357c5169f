"""Calibration memory benchmark: peak RSS of GPTQ calibration, 16 vs 128 routed experts, old vs new driver.

    python benchmarks/bench_calib_memory.py [--hidden 256] [--inter 512] [--layers 2] [--tokens 512]

Two synthetic Maverick-layout checkpoints (text-only ``Llama4ForCausalLM`` built and saved in bf16 by
transformers, ``tests/builders.build``) with the same per-expert size (hidden 256, expert width 512) and 16 or
128 routed experts; ``--layers 2`` gives one dense and one MoE layer. Each is calibrated with the ``int4`` preset
(GPTQ) on the same token ids, in a fresh process, by

  * old: ``l4export.quant.calibrate`` at commit ada705f (a ``git worktree`` under benchmarks/work/): [E, K, K]
    Hessian stacks, the whole layer's float32 weights, every calibrated tensor in RAM;
  * new: this tree, calibrated tensors spilled to disk and memory-mapped, expert batches from
    ``CalibOptions.expert_batch_bytes``: the default 1 GiB (at this small size that is ~60 experts, so a 16-expert
    layer is one batch), and a budget of 16 experts (``expert_bytes``), which is what a real-size expert
    against a 1 GiB budget looks like: batches far smaller than E.

GPTQ time grows with E·N·K², so the sizes are small to keep the run to a few minutes on 2 cores.

Peak RSS is the child's own ru_maxrss read right after ``calibrate`` returns (so hashing the codes afterwards,
which touches the memory-mapped files, is not counted), and the wait4 peak of the whole run is reported too.
Baseline: a process that imports torch and l4export and nothing else. Each run prints a SHA-256 of every
calibrated tensor's codes and scales, so old and new are also compared for equal output.

Prints a table and writes benchmarks/results/calib-memory-<date>.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, WORK, measure, save_result, table  # noqa: E402

REPO = ROOT.parent
OLD_COMMIT = "ada705f"
OLD_TREE = WORK / f"old-{OLD_COMMIT}"

# Run in a fresh process with the l4export under test first on sys.path.
CHILD = """
import hashlib, json, resource, sys, time
import numpy as np
import l4export
from l4export.checkpoint import Checkpoint
try:
    from l4export.quant.calib import CalibOptions, calibrate
    from l4export.names import canonical_shapes
    what = lambda ck: PRESETS["int4"].plan(canonical_shapes(ck.spec))  # noqa: E731 - the plan's schemes
except ImportError:  # the old tree: one module, quant/calibrate.py, taking the recipe
    from l4export.quant.calibrate import CalibOptions, calibrate
    what = lambda ck: PRESETS["int4"]  # noqa: E731
from l4export.quant.recipe import PRESETS

ck = Checkpoint(sys.argv[1])
ids = [np.asarray(i, np.int64) for i in json.loads(open(sys.argv[2]).read())]
options = CalibOptions(expert_batch_bytes=int(sys.argv[3])) if len(sys.argv) > 3 else CalibOptions()
t = time.perf_counter()
res = calibrate(ck, what(ck), options=options, ids=ids)
seconds = time.perf_counter() - t
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
h = hashlib.sha256()
for name in sorted(res.tensors):
    qt = res.tensors[name]
    for a in (qt.q, qt.scale, qt.zero):
        if a is not None:
            h.update(name.encode()); h.update(np.ascontiguousarray(a).view(np.uint8).tobytes())
print(json.dumps({"module": l4export.__file__, "calib_s": round(seconds, 2), "calib_peak_rss_mb": round(peak_kb / 1024, 1),
                  "tensors": len(res.tensors), "sha256": h.hexdigest()}))
"""

BASELINE = "import torch, numpy, l4export.quant.calib"


def old_tree() -> Path:
    """A detached worktree of the old implementation (created once, git-ignored under benchmarks/work/)."""
    if not (OLD_TREE / "l4export" / "quant" / "calibrate.py").is_file():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(OLD_TREE), OLD_COMMIT], check=True)
    return OLD_TREE


def checkpoint(experts: int, hidden: int, inter: int, layers: int) -> Path:
    """A Maverick-layout bf16 checkpoint (dense layer 0, MoE every other layer) built with transformers."""
    sys.path.insert(0, str(REPO / "tests"))
    from builders import build

    out = WORK / f"calib-mav-{experts}e-{hidden}h-{inter}i-{layers}L"
    if not (out / "config.json").is_file():
        tmp = out.with_name(out.name + ".partial")
        build(tmp, shape="maverick", style="hub", dtype="bfloat16", max_shard_size="200MB", num_local_experts=experts,
              hidden_size=hidden, intermediate_size=inter, intermediate_size_mlp=inter, num_hidden_layers=layers,
              num_attention_heads=8, num_key_value_heads=2, head_dim=hidden // 8, initializer_range=0.05)
        tmp.rename(out)
    return out


def run(impl: str, ckpt: Path, ids: Path, budget: int | None) -> dict:
    src = old_tree() if impl == "old" else REPO
    env = {"PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    m = measure([sys.executable, "-c", CHILD, str(ckpt), str(ids), *([str(budget)] if budget else [])], env=env)
    child = json.loads(m.pop("output_tail").strip().splitlines()[-1])
    assert Path(child.pop("module")).is_relative_to(src), f"{impl}: imported l4export from the wrong tree"
    return {**child, "run_wall_s": m["wall_s"], "run_peak_rss_mb": m["peak_rss_mb"]}


def plot(rows: list[dict], baseline: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experts = sorted({r["experts"] for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(impls)
    for k, impl in enumerate(impls):
        ys = [next(r["calib_peak_rss_mb"] for r in rows if r["impl"] == impl and r["experts"] == e) for e in experts]
        xs = np.arange(len(experts)) + (k - (len(impls) - 1) / 2) * width
        bars = ax.bar(xs, ys, width, label=impl)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.axhline(baseline, color="k", ls="--", lw=0.8, label="import torch + l4export")
    ax.set_xticks(np.arange(len(experts)), [f"{e} experts" for e in experts])
    ax.set_ylabel("peak RSS during calibration (MB)")
    ax.set_title("GPTQ calibration memory, same per-expert size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=512, help="routed expert width")
    ap.add_argument("--layers", type=int, default=2, help="Maverick layout: every other layer is MoE")
    ap.add_argument("--tokens", type=int, default=512, help="calibration tokens (samples of 128)")
    args = ap.parse_args()

    WORK.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ids = WORK / f"calib-ids-{args.tokens}.json"
    ids.write_text(json.dumps([rng.integers(4, 300, size=128).tolist() for _ in range(max(1, args.tokens // 128))]))
    base = measure([sys.executable, "-c", BASELINE], env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})["peak_rss_mb"]
    sys.path.insert(0, str(REPO))
    from l4export.quant.calib import expert_bytes

    small = 16 * expert_bytes(args.hidden, args.inter)
    impls = {"old": None, "new": None, "new-16e-budget": small}
    rows = []
    for experts in (16, 128):
        ckpt = checkpoint(experts, args.hidden, args.inter, args.layers)
        size_mb = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 1024**2
        for impl, budget in impls.items():
            r = {"impl": impl, "experts": experts, "checkpoint_mb": round(size_mb, 1),
                 "expert_batch_bytes": budget or (1 << 30), **run(impl, ckpt, ids, budget)}
            r["above_baseline_mb"] = round(r["calib_peak_rss_mb"] - base, 1)
            rows.append(r)
            print(f"{impl} {experts}E: {r['calib_peak_rss_mb']} MB peak, {r['calib_s']} s", flush=True)

    def peak(impl: str, e: int) -> float:
        return next(r["calib_peak_rss_mb"] for r in rows if r["impl"] == impl and r["experts"] == e)

    ratios: dict[str, float] = {}
    ratios_above: dict[str, float] = {}  # the same, over what calibration adds to the import baseline
    for impl in impls:
        ratios[f"{impl}: 128e/16e"] = round(peak(impl, 128) / peak(impl, 16), 2)
        ratios_above[f"{impl}: 128e/16e"] = round((peak(impl, 128) - base) / (peak(impl, 16) - base), 2)
        if impl != "old":
            for e in (16, 128):
                ratios[f"{impl}/old at {e}e"] = round(peak(impl, e) / peak("old", e), 2)
                ratios_above[f"{impl}/old at {e}e"] = round((peak(impl, e) - base) / (peak("old", e) - base), 2)
    old_sha = {r["experts"]: r["sha256"] for r in rows if r["impl"] == "old"}
    for r in rows:
        r["codes_equal_old"] = r["sha256"] == old_sha[r["experts"]]
    print(f"baseline (import torch + l4export): {base} MB; hidden {args.hidden}, expert width {args.inter}, "
          f"{args.layers} layers, {args.tokens} tokens")
    print(table(rows, ["impl", "experts", "checkpoint_mb", "expert_batch_bytes", "calib_s", "calib_peak_rss_mb",
                       "above_baseline_mb", "run_peak_rss_mb", "codes_equal_old"]))
    print(table([{"ratio": k, "peak RSS": v, "above baseline": ratios_above[k]} for k, v in ratios.items()],
                ["ratio", "peak RSS", "above baseline"]))
    for r in rows:
        r.pop("sha256")
    data = {"config": vars(args), "recipe": "int4", "baseline_rss_mb": base, "rows": rows,
            "ratios_peak_rss": ratios, "ratios_above_baseline": ratios_above}
    path = save_result("calib-memory", data, png=lambda png: plot(rows, base, png))
    print(f"wrote {path} and {path.with_suffix('.png').name}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
