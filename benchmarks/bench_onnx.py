"""ONNX export and runtime benchmark (CPU).

  (a) ``l4export convert --format onnx`` vs ``mlx_lm convert`` on the same sharded bf16 Scout-shaped
      checkpoint (>= 1 GB, random weights written with numpy): wall time and peak RSS of each subprocess.
  (b) prefill and decode tokens/s: the ONNX runtime vs transformers eager (float32) on one small model.
  (c) decode time of a 128-expert model over a 16-expert model of equal active size (goal <= 1.3).

    python benchmarks/bench_onnx.py [--work DIR] [--layers 16] [--threads 2]

Prints a table and writes benchmarks/results/onnx-<date>.json. Checkpoints live under --work (not in git).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_result, write_checkpoint as common_write  # noqa: E402

log = logging.getLogger("bench_onnx")
ROOT = Path(__file__).resolve().parent.parent


# ---- (a) conversion ----------------------------------------------------------------------------------------


def big_scout_config(layers: int) -> dict:
    from l4export.demo import demo_config

    cfg = demo_config()
    cfg["text_config"].update(vocab_size=32000, hidden_size=1024, intermediate_size=512, intermediate_size_mlp=1024,
                              num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                              attention_chunk_size=8192, num_local_experts=16)
    return cfg


def write_big_checkpoint(out: Path, layers: int, seed: int = 0) -> Path:
    """A sharded bf16 checkpoint in the released multimodal layout, one tensor in memory at a time."""
    return common_write(out, big_scout_config(layers), 400 * 1024**2, seed)


def timed(cmd: list[str], threads: int) -> dict:
    """Wall time and peak RSS (GNU time -v) of a subprocess."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    if p.returncode != 0:
        log.error("%s failed: %s", cmd[:4], p.stderr[-2000:])
    return {"ok": p.returncode == 0, "wall_s": round(wall, 2), "peak_rss_mb": round(int(m.group(1)) / 1024, 1) if m else None}


def bench_convert(work: Path, layers: int, threads: int) -> dict:
    ckpt = write_big_checkpoint(work / f"scout_big_{layers}L", layers)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    res = {"checkpoint_gb": round(size / 1e9, 3), "shards": len(list(ckpt.glob("*.safetensors")))}
    onnx_out, mlx_out = work / "big_onnx", work / "big_mlx"
    for p in (onnx_out, mlx_out):
        shutil.rmtree(p, ignore_errors=True)
    res["l4export_onnx_fp32"] = timed([sys.executable, "-m", "l4export.cli", "convert", str(ckpt), "-o", str(onnx_out),
                                       "--format", "onnx", "--dtype", "float32"], threads)
    res["mlx_lm_convert"] = timed([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(ckpt), "--mlx-path",
                                   str(mlx_out)], threads)
    for key, p in (("l4export_onnx_fp32", onnx_out), ("mlx_lm_convert", mlx_out)):
        if p.exists():
            res[key]["output_gb"] = round(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 1e9, 3)
        shutil.rmtree(p, ignore_errors=True)
    return res


# ---- (b), (c) runtime speed ------------------------------------------------------------------------------------

SMALL = dict(vocab_size=2000, hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
             intermediate_size=128, intermediate_size_mlp=256, num_hidden_layers=4, attention_chunk_size=64)


def small_checkpoint(work: Path, name: str, shape: str, **kw) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from builders import build

    out = work / name
    if not (out / "config.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        build(out, shape=shape, style="hub", dtype="float32", max_shard_size=None, **dict(SMALL, **kw))
    return out


def onnx_export(ckpt: Path) -> Path:
    from l4export.convert import ExportOptions, convert

    out = ckpt.with_name(ckpt.name + "_onnx")
    if not (out / "l4export.json").is_file():
        convert(ckpt, out, ExportOptions(format="onnx", dtype="float32"), force=True)
    return out


def onnx_speed(export: Path, prompt: int, decode: int, threads: int) -> dict:
    from l4export.runtimes.onnx import OnnxRuntime

    rt = OnnxRuntime(export, threads=threads)
    ids = list(np.random.default_rng(0).integers(4, rt.spec.vocab_size, prompt))
    rt.logits(ids[:8])  # warm-up
    rt.reset()
    t0 = time.perf_counter()
    logits = rt.forward(ids)
    t1 = time.perf_counter()
    tok = int(np.argmax(logits[-1]))
    for _ in range(decode):
        tok = int(np.argmax(rt.forward([tok])[-1]))
    t2 = time.perf_counter()
    return {"prefill_tok_s": round(prompt / (t1 - t0), 1), "decode_tok_s": round(decode / (t2 - t1), 1),
            "decode_ms_per_token": round(1000 * (t2 - t1) / decode, 3)}


def torch_speed(ckpt: Path, prompt: int, decode: int, threads: int) -> dict:
    import torch

    from l4export.runtimes.reference import load_reference

    torch.set_num_threads(threads)
    model = load_reference(ckpt)
    ids = torch.tensor([list(np.random.default_rng(0).integers(4, model.config.vocab_size, prompt))])
    with torch.no_grad():
        model(ids[:, :8])
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        t1 = time.perf_counter()
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(decode):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
    return {"prefill_tok_s": round(prompt / (t1 - t0), 1), "decode_tok_s": round(decode / (t2 - t1), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/l4export-bench-onnx"))
    ap.add_argument("--layers", type=int, default=16, help="layers of the conversion checkpoint (16 -> ~1.06 GB)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--skip-convert", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict = {"threads": args.threads}
    if not args.skip_convert:
        log.info("(a) conversion")
        results["convert"] = bench_convert(args.work, args.layers, args.threads)
    log.info("(b) prefill/decode vs transformers")
    s16 = small_checkpoint(args.work, "small_scout16", "scout")
    results["speed"] = {"model": dict(SMALL, num_local_experts=16, prompt=args.prompt, decode=args.decode),
                        "onnx": onnx_speed(onnx_export(s16), args.prompt, args.decode, args.threads),
                        "transformers_eager": torch_speed(s16, args.prompt, args.decode, args.threads)}
    log.info("(c) 128 vs 16 experts")
    moe = {}
    for e in (16, 128):
        ck = small_checkpoint(args.work, f"small_moe{e}", "maverick", num_local_experts=e, interleave_moe_layer_step=1)
        moe[e] = onnx_speed(onnx_export(ck), 16, args.decode, args.threads)
    results["experts_128_over_16"] = {"e16_decode_ms": moe[16]["decode_ms_per_token"],
                                      "e128_decode_ms": moe[128]["decode_ms_per_token"],
                                      "ratio": round(moe[128]["decode_ms_per_token"] / moe[16]["decode_ms_per_token"], 3),
                                      "goal": 1.3}
    out = save_result("onnx", results)

    rows = []
    if "convert" in results:
        c = results["convert"]
        for k in ("l4export_onnx_fp32", "mlx_lm_convert"):
            rows.append((f"convert {c['checkpoint_gb']} GB bf16: {k}", f"{c[k]['wall_s']} s",
                         f"peak RSS {c[k]['peak_rss_mb']} MB", "ok" if c[k]["ok"] else "FAILED"))
    sp = results["speed"]
    for k in ("onnx", "transformers_eager"):
        rows.append((f"speed {k}", f"prefill {sp[k]['prefill_tok_s']} tok/s", f"decode {sp[k]['decode_tok_s']} tok/s", ""))
    r = results["experts_128_over_16"]
    rows.append(("decode 128E / 16E (equal active)", f"{r['ratio']}x", f"{r['e128_decode_ms']} vs {r['e16_decode_ms']} ms",
                 "goal <= 1.3"))
    width = max(len(x[0]) for x in rows)
    for row in rows:
        print(f"{row[0]:<{width}}  {row[1]:>22}  {row[2]:>28}  {row[3]}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
