"""Vision encoder latency per tile and peak memory: ONNX and MLX, float32 and with the vision tower at int8, beside
transformers (the reference) in the same run; and the image-feature error of int8 against float32.

The model has Scout's vision widths (hidden 1408, 16 heads of 88, MLP 5632, 336-pixel tiles of 14-pixel patches,
adapter 5632 -> 4096 -> 4096, projector 4096 -> 5120) with fewer layers (--layers, default 4 of Scout's 34) and
random weights; its text model is one small layer at width 5120 (the projector's output). Per-tile cost scales
linearly with the layer count, so the per-layer figures carry over to Scout (34 layers: about 8.5x the encoder part).

Each engine runs in its own process (peak RSS from wait4), engines interleaved, medians of --runs:

    python benchmarks/bench_vision.py [--layers 4] [--tiles 5] [--runs 3] [--threads 2]
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
from common import WORK, machine, measure, save, scout_like_config, table, write_checkpoint  # noqa: E402

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
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--worker", nargs=2, metavar=("ENGINE", "OUT"))
    args = ap.parse_args()
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
            m = measure([sys.executable, __file__, "--layers", str(args.layers), "--tiles", str(args.tiles),
                         "--repeats", str(args.repeats), "--threads", str(args.threads), "--engines", e,
                         "--worker", e, str(out)])
            m["seconds"] = json.loads(out.read_text())["seconds"]
            runs[e].append(m)
            print(f"run {r + 1}/{args.runs} {e}: {np.median(m['seconds']) / args.tiles * 1000:.0f} ms/tile, "
                  f"peak RSS {m['peak_rss_mb']:.0f} MB", flush=True)
    report(runs, args)


def report(runs: dict[str, list[dict]], args) -> None:
    gflop = flops_per_tile(args.layers) / 1e9
    feats = {e: np.load(WORK / f"vision-{e}.npy") for e in runs}
    rows, med = [], {}
    for e, rs in runs.items():
        per_tile = float(np.median([np.median(r["seconds"]) for r in rs])) / args.tiles
        med[e] = {"ms_per_tile": round(per_tile * 1000, 1), "peak_rss_mb": float(np.median([r["peak_rss_mb"] for r in rs])),
                  "gflops": round(gflop / per_tile, 1)}
        base = feats[e.replace("int8", "fp32")] if "int8" in e else feats["transformers-fp32"] if "transformers-fp32" in feats else None
        if base is not None and e != "transformers-fp32":
            d = feats[e] - base
            med[e]["features_rel_max"] = float(np.abs(d).max() / np.abs(base).max())
            med[e]["features_rel_mean"] = float(np.abs(d).mean() / np.abs(base).mean())
            med[e]["vs"] = e.replace("int8", "fp32") if "int8" in e else "transformers-fp32"
        ref = med.get("transformers-fp32", {}).get("ms_per_tile")
        rows.append({"engine": e, **med[e], "vs transformers": f"{ref / med[e]['ms_per_tile']:.2f}x" if ref else ""})
    for e in list(med):
        if e.endswith("int8") and e.replace("int8", "fp32") in med:
            med[e]["speed_vs_fp32"] = round(med[e.replace("int8", "fp32")]["ms_per_tile"] / med[e]["ms_per_tile"], 2)
    print(f"\nvision encoder, Scout widths, {args.layers} layers, {args.tiles} tiles per encode, "
          f"{gflop:.1f} GFLOP per tile, {args.threads} threads, medians of {args.runs} runs x {args.repeats}\n")
    print(table(rows, ["engine", "ms_per_tile", "gflops", "peak_rss_mb", "features_rel_max", "features_rel_mean",
                       "vs", "vs transformers"]))
    path = save("vision", {"machine": machine(), "layers": args.layers, "tiles": args.tiles, "threads": args.threads,
                           "gflop_per_tile": gflop, "median": med, "runs": runs})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
