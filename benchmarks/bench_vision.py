"""Vision encoder latency per tile and peak memory: ONNX and MLX, float32 and with the vision tower at int8, beside
transformers (the reference) in the same run; and the image-feature error of int8 against float32.

The model has Scout's vision widths (hidden 1408, 16 heads of 88, MLP 5632, 336-pixel tiles of 14-pixel patches,
adapter 5632 -> 4096 -> 4096, projector 4096 -> 5120) with fewer layers (--layers, default 4 of Scout's 34) and
random weights; its text model is one small layer at width 5120 (the projector's output). Per-tile cost scales
linearly with the layer count, so the per-layer figures carry over to Scout (34 layers: about 8.5x the encoder part).

Each engine runs in its own process (peak RSS from wait4), engines interleaved, medians of --runs:

    python benchmarks/bench_vision.py [--layers 4] [--tiles 5] [--runs 3] [--repeats 3] [--mlx-repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, measure, save_result, scout_like_config, table, write_checkpoint  # noqa: E402

SCOUT_VISION = dict(hidden_size=1408, num_attention_heads=16, intermediate_size=5632, image_size=336, patch_size=14,
                    num_channels=3, pixel_shuffle_ratio=0.5, projector_input_dim=4096, projector_output_dim=4096,
                    vision_output_dim=4096, rope_theta=10000.0, norm_eps=1e-5, hidden_act="gelu",
                    multi_modal_projector_bias=False, vision_feature_layer=-1, vision_feature_select_strategy="default")
INT8 = """name = "vision-int8"
[[rule]]
match = "vision_model.patch_embedding.*"
scheme = "float"
[[rule]]
match = "vision_model.*layernorm*"
scheme = "float"
[[rule]]
match = "vision_model.*.weight"
scheme = "int8"
group_size = 32
accuracy_level = 4
[[rule]]
match = "multi_modal_projector.*"
scheme = "int8"
group_size = 32
accuracy_level = 4
"""
ENGINES = ("onnx-fp32", "onnx-int8", "mlx-fp32", "mlx-int8", "transformers-fp32")


def build_model(layers: int) -> Path:
    cfg = scout_like_config(hidden=5120, inter=64, layers=1, experts=2, vocab=512, heads=40, kv_heads=8)
    cfg["vision_config"] = dict(SCOUT_VISION, num_hidden_layers=layers)
    cfg.update(boi_token_index=500, eoi_token_index=501, image_token_index=510)
    return write_checkpoint(WORK / f"vision-{layers}l", cfg)


def export(src: Path, fmt: str, int8: bool) -> Path:
    out = WORK / f"{src.name}-{fmt}-{'int8' if int8 else 'fp32'}"
    if (out / "l4export.json").is_file():
        return out
    cmd = [sys.executable, "-m", "l4export.cli", "convert", str(src), "-o", str(out), "--format", fmt]
    if int8:
        recipe = WORK / ("vision-int8-mlx.toml" if fmt == "mlx" else "vision-int8.toml")
        recipe.write_text(INT8 if fmt == "onnx" else INT8.replace("accuracy_level = 4", "accuracy_level = 0"))
        cmd += ["--quant", str(recipe)]
    subprocess.run(cmd, check=True)
    return out


def tiles(n: int) -> np.ndarray:
    """n tiles of a deterministic image's pixel values (the processor's output range)."""
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (n, 3, 336, 336)).astype(np.float32) / 127.5 - 1.0).astype(np.float32)


def worker(engine: str, model: Path, n_tiles: int, repeats: int, threads: int, out: Path) -> None:
    """Time `repeats` encodes of n_tiles tiles (after one warm-up); write features and times to ``out``."""
    pixels = tiles(n_tiles)
    if engine.startswith("transformers"):
        import torch

        from l4export.runtimes.reference import VisionReference

        torch.set_num_threads(threads)
        ref = VisionReference(model)
        encode = ref.image_features
    else:
        from l4export.runtimes import load_runtime

        os.environ["OMP_NUM_THREADS"] = str(threads)
        rt = load_runtime(model)
        encode = rt._encode_tiles
    feats = encode(pixels)  # warm-up (ONNX Runtime prepacks, MLX compiles kernels)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        feats = encode(pixels)
        times.append(time.perf_counter() - t)
    np.save(out.with_suffix(".npy"), feats.astype(np.float32))
    out.write_text(json.dumps({"seconds": times}))


def flops_per_tile(layers: int) -> float:
    """Multiply-adds x 2 of one tile through the encoder, adapter and projector."""
    L, c, m = 577, 1408, 5632
    layer = 2 * L * (4 * c * c + 2 * c * m) + 2 * 2 * L * L * c
    return layers * layer + 2 * 576 * 588 * c + 2 * 144 * (5632 * 4096 + 4096 * 4096 + 4096 * 5120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tiles", type=int, default=5, help="tiles per encode (5 = a 2x2 image + its global tile)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="timed encodes per run")
    ap.add_argument("--mlx-repeats", type=int, default=1,
                    help="timed encodes per run for MLX (its Linux CPU backend runs a tile's GEMMs at ~3 GFLOP/s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--worker", nargs=2, metavar=("ENGINE", "OUT"))
    ap.add_argument("--report", type=Path, help="print and plot a saved results JSON again (no runs)")
    args = ap.parse_args()
    if args.report:
        return main_report_only(args.report)
    src = build_model(args.layers)
    models = {e: src if e.startswith("transformers") else export(src, e.split("-")[0], e.endswith("int8"))
              for e in args.engines.split(",")}
    if args.worker:
        worker(args.worker[0], models[args.worker[0]], args.tiles, args.repeats, args.threads, Path(args.worker[1]))
        return
    runs: dict[str, list[dict]] = {e: [] for e in models}
    for r in range(args.runs):
        for e in models:  # interleaved: every engine once per round
            out = WORK / f"vision-{e}.json"
            repeats = args.mlx_repeats if e.startswith("mlx") else args.repeats
            m = measure([sys.executable, __file__, "--layers", str(args.layers), "--tiles", str(args.tiles),
                         "--repeats", str(repeats), "--threads", str(args.threads), "--engines", e,
                         "--worker", e, str(out)])
            m["seconds"] = json.loads(out.read_text())["seconds"]
            runs[e].append(m)
            print(f"run {r + 1}/{args.runs} {e}: {np.median(m['seconds']) / args.tiles * 1000:.0f} ms/tile, "
                  f"peak RSS {m['peak_rss_mb']:.0f} MB", flush=True)
    report(runs, args)


def summarize(runs: dict[str, list[dict]], tiles: int) -> dict[str, dict]:
    """Medians per engine, speed ratios, and the feature error of each engine against its float reference."""
    feats = {e: np.load(WORK / f"vision-{e}.npy") for e in runs}
    med: dict[str, dict] = {}
    for e, rs in runs.items():
        med[e] = {"ms_per_tile": round(float(np.median([np.median(r["seconds"]) for r in rs])) / tiles * 1000, 1),
                  "peak_rss_mb": float(np.median([r["peak_rss_mb"] for r in rs]))}
        base = e.replace("int8", "fp32") if "int8" in e else "transformers-fp32"
        if e != base and base in feats:
            d = feats[e] - feats[base]
            med[e].update(vs=base, features_rel_max=float(np.abs(d).max() / np.abs(feats[base]).max()),
                          features_rel_mean=float(np.abs(d).mean() / np.abs(feats[base]).mean()))
    for e, m in med.items():
        if "transformers-fp32" in med:
            m["speed_vs_transformers"] = round(med["transformers-fp32"]["ms_per_tile"] / m["ms_per_tile"], 3)
        if e.endswith("int8") and e.replace("int8", "fp32") in med:
            m["speed_vs_fp32"] = round(med[e.replace("int8", "fp32")]["ms_per_tile"] / m["ms_per_tile"], 3)
            m["rss_vs_fp32"] = round(m["peak_rss_mb"] / med[e.replace("int8", "fp32")]["peak_rss_mb"], 3)
    return med


def report(runs: dict[str, list[dict]], args) -> None:
    gflop = flops_per_tile(args.layers) / 1e9
    med = summarize(runs, args.tiles)
    rows = [{"engine": e, "ms/tile": m["ms_per_tile"], "GFLOP/s": round(gflop / m["ms_per_tile"] * 1000, 1),
             "peak RSS MB": round(m["peak_rss_mb"]), "features rel max (mean)":
             f"{m['features_rel_max']:.2e} ({m['features_rel_mean']:.2e}) vs {m['vs']}" if "vs" in m else "",
             "vs transformers": f"{m['speed_vs_transformers']:.2f}x" if "speed_vs_transformers" in m else "",
             "int8 vs fp32 (speed, RSS)": f"{m['speed_vs_fp32']:.2f}x, {m['rss_vs_fp32']:.2f}x" if "speed_vs_fp32" in m else ""}
            for e, m in med.items()]
    print(f"\nvision encoder, Scout widths, {args.layers} layers, {args.tiles} tile(s) per encode, {gflop:.1f} GFLOP "
          f"per tile, {args.threads} threads, medians of {args.runs} runs\n")
    print(table(rows, list(rows[0])))
    source = {"reported_from": args.source} if getattr(args, "source", None) else {}
    path = save_result("vision", {"layers": args.layers, "tiles": args.tiles, "threads": args.threads,
                                  "gflop_per_tile": gflop, "median": med, "runs": runs, **source},
                       png=lambda png: plot(med, png, args.layers))
    print(f"\nwrote {path} and {path.with_suffix('.png')}")


def plot(med: dict[str, dict], png: Path, layers: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(med)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.barh(names, [med[e]["ms_per_tile"] / 1000 for e in names], color="tab:blue")
    a.set_xscale("log")
    a.set_xlabel(f"seconds per tile ({layers} of Scout's 34 layers; log scale)")
    b.barh(names, [med[e]["peak_rss_mb"] for e in names], color="tab:orange")
    b.set_xlabel("peak RSS (MB)")
    fig.suptitle("Llama 4 vision encoder at Scout's widths, 2-core CPU")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main_report_only(path: Path) -> None:
    data = json.loads(path.read_text())
    args = argparse.Namespace(layers=data["layers"], tiles=data["tiles"], threads=data["threads"],
                              runs=len(next(iter(data["runs"].values()))),
                              source={"file": str(path), "run": data.get("run")})
    report(data["runs"], args)


if __name__ == "__main__":
    main()
