"""Below 4 bits (issue 26): held-out perplexity, KL and top-1 agreement of l4export's mixed:B exports against mlx-lm's
2/3-bit recipes and llama.cpp's K- and I-quants, on a trained Llama 4 MoE whose widths every peer's kernels take.

    python -m benchmarks low-bit [--steps 1400] [--budgets 2.5,3.0,3.5] [--llama-cpp DIR] [--train-only]

1. The model (trained once, cached in benchmarks/work/low-bit/): Llama4ForCausalLM with hidden 256, expert and
   shared-expert width 256 (llama.cpp's K-quants need rows that are multiples of 256), 8 layers (NoPE every 4th:
   chunked RoPE layers and global NoPE layers), 16 experts, top-1 + shared expert, trained by
   bench_quant_quality.train (sparse top-1 training, 1 thread, deterministic) on the bytes of this Python's standard
   library sources (PSF license; the same split: every 10th file held out, the next one for calibration).
2. l4export: MLX (bfloat16 store) mixed:B at the bytes of each peer row (``mixed:<bytes>B``), placed by calibration
   (GPTQ at each width on the calibration windows; for two peers also by the weights alone), and the ONNX mixed:3.0;
   every row is evaluated on the same held-out windows (BOS + 256 bytes) as transformers float, the reference of the
   KL and top-1 columns. MLX rows (ours and mlx-lm's) are scored with their weights dequantized to float32 by
   ``mx.dequantize`` and run as a float32 ONNX export of those weights (``logprobs_dequantized``, checked on every
   row against mlx-lm's float path): mlx[cpu] takes minutes per row on this machine even in float, and the maths is
   the same weights'.
3. mlx-lm 0.32 ``mlx_lm convert`` of our float MLX export: 2-bit g64, 2-bit g32, 3-bit g64, 4-bit g64,
   ``--quant-predicate mixed_2_6`` and ``mixed_3_6``, evaluated by mlx-lm on the same windows.
4. llama.cpp (``--llama-cpp DIR``: a llama.cpp source tree with build/bin/llama-{quantize,imatrix,perplexity}, e.g. the
   one vendored in the llama-cpp-python sdist): its converter's bf16 GGUF, an importance matrix from the same
   calibration text, then Q3_K_S, IQ3_XXS, Q2_K, IQ2_XS, IQ2_S and Q4_K_M, each scored by llama-perplexity on the
   held-out text against its own bf16 GGUF (``--kl-divergence``). llama.cpp windows its text itself, so its rows are
   compared by their increase over llama.cpp's own bf16, not by absolute perplexity.

Writes benchmarks/results/low-bit-<date>.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quant_quality import SEQ, THREADS, corpus, train, windows  # noqa: E402
from common import WORK, save_result, table  # noqa: E402

from l4export.demo import BOS, EOS, EOT, PAD  # noqa: E402

log = logging.getLogger("bench_low_bit")
HERE = WORK / "low-bit"

CONFIG = dict(
    vocab_size=272, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    intermediate_size=256, intermediate_size_mlp=512, num_hidden_layers=8,  # layers 3 and 7 are NoPE (every 4th)
    num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1, use_qk_norm=True,
    attention_chunk_size=8192,  # llama.cpp hard-codes Llama 4's chunk to 8192: the same here, so both engines agree
    max_position_embeddings=8192, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},  # (no llama3 scaling within 8192 tokens)
    bos_token_id=BOS, eos_token_id=[EOS, EOT], pad_token_id=PAD, initializer_range=0.02,
)


def model(steps: int, batch: int, lr: float, data: dict) -> Path:
    ckpt = HERE / f"ckpt-s{steps}-b{batch}-{data['sha256_16']}"
    if not (ckpt / "config.json").is_file():
        log.info("training %s on %d bytes (%d steps)", ckpt.name, data["bytes"]["train"], steps)
        train(ckpt, data["data"]["train"], steps, batch, lr, config=CONFIG)
    return ckpt


# ---- scoring: every engine's log-probabilities on the same windows --------------------------------------
def _logprobs(logits: np.ndarray) -> np.ndarray:
    lg = logits[:-1].astype(np.float64)
    lg -= lg.max(-1, keepdims=True)
    return (lg - np.log(np.exp(lg).sum(-1, keepdims=True))).astype(np.float32)  # [SEQ, V] for ids[1:]


def logprobs_transformers(ckpt: Path, wins: np.ndarray) -> np.ndarray:
    import torch

    from l4export.runtimes.reference import load_reference

    torch.set_num_threads(1)
    ref = load_reference(ckpt)
    with torch.no_grad():
        return np.stack([_logprobs(ref(input_ids=torch.from_numpy(w)[None]).logits[0].numpy()) for w in wins])


def logprobs_export(path: Path, wins: np.ndarray) -> np.ndarray:
    from l4export.runtimes import load_runtime

    rt = load_runtime(path)
    return np.stack([_logprobs(np.asarray(rt.logits(w.tolist()), np.float32)) for w in wins])


def logprobs_mlx_lm(path: Path, wins: np.ndarray) -> np.ndarray:
    import mlx.core as mx
    from mlx_lm import load

    m, _ = load(str(path))
    return np.stack([_logprobs(np.array(m(mx.array(w)[None])[0].astype(mx.float32))) for w in wins])


def dequantized(folder: Path) -> Path:
    """An MLX folder (ours or mlx-lm's: the same layout) with every quantized module dequantized to float32 and the
    quantization dropped from config.json: the same weights. (mlx[cpu]'s gather_qmm takes ~6 min per 48 windows on 2
    cores here, its float path ~40 s, ORT on a float32 export of them 3 s: the dequantized maths is the quantized
    model's up to the order of float sums.)"""
    import mlx.core as mx

    out = folder.with_name(folder.name + "-dequantized")  # made again each time: the row's export may have changed
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    cfg = json.loads((folder / "config.json").read_text())
    q = cfg.pop("quantization", None) or {}
    cfg.pop("quantization_config", None)
    weights = {}
    for f in sorted(folder.glob("*.safetensors")):
        weights.update(mx.load(str(f)))
    for name in [n for n in weights if n.endswith(".scales")]:
        base = name[: -len(".scales")]
        entry = q.get(base, q) if isinstance(q.get(base, q), dict) else q
        w = weights.pop(base + ".weight")
        scales, biases = weights.pop(name), weights.pop(base + ".biases", None)
        weights[base + ".weight"] = mx.dequantize(w, scales, biases, group_size=entry.get("group_size", 64),
                                                  bits=entry.get("bits", 4), mode=entry.get("mode", "affine"))
    weights = {k: v.astype(mx.float32) for k, v in weights.items()}
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in folder.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json" and f.is_file():
            shutil.copy(f, out / f.name)
    return out


def as_checkpoint(folder: Path, ckpt: Path) -> Path:
    """A dequantized MLX folder's weights as a Hugging Face checkpoint beside ``ckpt``'s config (mlx-lm's Llama 4 names
    and stacked experts back to transformers': experts [E, out, in] -> gate_up_proj [E, H, 2I], down_proj [E, I, H])."""
    import mlx.core as mx
    from safetensors.numpy import save_file

    out = folder.with_name(folder.name + "-hf")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    w = {k.removeprefix("language_model."): np.array(v.astype(mx.float32)) for k, v in mx.load(str(folder / "model.safetensors")).items()}
    for gate in [k for k in w if k.endswith(".experts.gate_proj.weight")]:
        pre = gate.removesuffix("gate_proj.weight")
        g, u, d = w.pop(gate), w.pop(pre + "up_proj.weight"), w.pop(pre + "down_proj.weight")
        w[pre + "gate_up_proj"] = np.ascontiguousarray(np.concatenate([g, u], axis=1).transpose(0, 2, 1))
        w[pre + "down_proj"] = np.ascontiguousarray(d.transpose(0, 2, 1))
    save_file(w, str(out / "model.safetensors"))
    for f in ckpt.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    return out


def logprobs_dequantized(path: Path, wins: np.ndarray, ckpt: Path) -> np.ndarray:
    """An MLX row's weights, dequantized, scored by ONNX Runtime (a float32 export of them: mlx[cpu] takes ~0.7 s per
    window even in float, ORT 0.06 s). Checked on every row against mlx-lm's own float path on two windows."""
    deq = dequantized(path)
    onnx_dir = path.with_name(path.name + "-onnx")
    l4(as_checkpoint(deq, ckpt), onnx_dir, "onnx")
    lp = logprobs_export(onnx_dir, wins)
    gap = float(np.abs(logprobs_mlx_lm(deq, wins[:2]) - lp[:2]).max())
    log.info("%s: ONNX against mlx-lm's float path on 2 windows: max |logprob difference| %.1e", path.name, gap)
    if gap > 1e-3:
        raise RuntimeError(f"the ONNX scorer disagrees with mlx-lm on {path.name} by {gap:.1e}: a mapping bug")
    return lp


def score(lp: np.ndarray, ref: np.ndarray | None, wins: np.ndarray) -> dict:
    """Perplexity of ids[1:], and against the float reference: mean KL(ref || this) and top-1 agreement."""
    tgt = wins[:, 1:]
    nll = -np.take_along_axis(lp, tgt[..., None], -1)[..., 0].astype(np.float64)
    out = {"ppl": float(np.exp(nll.mean()))}
    if ref is not None:
        kl = (np.exp(ref.astype(np.float64)) * (ref.astype(np.float64) - lp)).sum(-1).ravel()
        # The mean is carried by a few tokens whose top-1 expert flips (on the benchmark model ten of 12k positions
        # held 40-70 % of it): report its standard error, the median and the 99th percentile beside it, as
        # llama-perplexity does, and compare means only where the errors say they differ.
        d = (nll + np.take_along_axis(ref, tgt[..., None], -1)[..., 0].astype(np.float64)).ravel()  # ln(p_ref / p)
        out |= {"ln_ppl_ratio": float(d.mean()), "ln_ppl_ratio_se": float(d.std(ddof=1) / np.sqrt(d.size)),
                "kl": float(kl.mean()), "kl_se": float(kl.std(ddof=1) / np.sqrt(kl.size)),
                "kl_median": float(np.median(kl)), "kl_p99": float(np.percentile(kl, 99)),
                "top1": float((ref.argmax(-1) == lp.argmax(-1)).mean()), "positions": int(kl.size)}
    return out


def tensor_bytes(path: Path) -> int:
    from l4export.folder import export_tensor_bytes

    return export_tensor_bytes(path)


def text_bytes(path: Path) -> int:
    """An MLX folder's text weights (every tensor but a vision tower's: these models have none)."""
    return tensor_bytes(path)


# ---- the exports ---------------------------------------------------------------------------------------
def run(cmd: list[str]) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **THREADS})
    if r.returncode != 0:
        raise RuntimeError((r.stderr or r.stdout).strip().splitlines()[-1] if (r.stderr or r.stdout) else f"rc {r.returncode}")
    return time.perf_counter() - t


def l4(ckpt: Path, out: Path, fmt: str, *extra: str) -> float:
    return run([sys.executable, "-m", "l4export.cli", "convert", str(ckpt), "-o", str(out), "--format", fmt,
                "--force", *extra])


MLX_LM = {"mlx-lm 2-bit g64": ["--q-bits", "2", "--q-group-size", "64"],
          "mlx-lm 2-bit g32": ["--q-bits", "2", "--q-group-size", "32"],
          "mlx-lm 3-bit g64": ["--q-bits", "3", "--q-group-size", "64"],
          "mlx-lm 4-bit g64": ["--q-bits", "4", "--q-group-size", "64"],
          "mlx-lm mixed_2_6": ["--quant-predicate", "mixed_2_6"],
          "mlx-lm mixed_3_6": ["--quant-predicate", "mixed_3_6"]}


def mlx_lm_convert(src: Path, out: Path, extra: list[str]) -> float:
    shutil.rmtree(out, ignore_errors=True)
    return run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src), "--mlx-path", str(out), "-q", *extra])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1400, help="Training steps (batch 8 x 256 bytes).")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--budgets", default="3.0", help="mixed:B rows of their own (besides those at each peer's bytes)")
    ap.add_argument("--budget-formats", default="onnx", help="formats of the --budgets rows")
    ap.add_argument("--placements", default="projection",
                    help="placements of the ONNX --budgets rows: projection, expert (mixed:B:per-expert), or both")
    ap.add_argument("--no-peers", action="store_true", help="only the --budgets rows (and the float reference)")
    ap.add_argument("--widths", default="", help="also a row per budget and format placing only these widths "
                    "(e.g. 2,4,6,8: the recipe's widths = [...])")
    ap.add_argument("--tag", default="", help="results/low-bit[-TAG]-DATE.json")
    ap.add_argument("--eval-windows", type=int, default=48)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--llama-cpp", type=Path, default=None, help="llama.cpp source tree with build/bin tools.")
    ap.add_argument("--llama-bin", type=Path, default=None, help="its tools' folder, if not build/bin (e.g. a build "
                    "without AMX: the -march=native one crashes on any batch on this VM)")
    ap.add_argument("--llama-types", default=",".join(LLAMA_CPP), help="llama.cpp quant types to score")
    ap.add_argument("--no-mlx-lm", action="store_true", help="peers: llama.cpp only")
    ap.add_argument("--no-mixed-at-peers", action="store_true", help="no l4export mixed rows at the peers' bytes")
    ap.add_argument("--presets", default="", help="ONNX preset rows (e.g. int4,int8: issue 27's quality against "
                    "llama.cpp Q4_K_M / Q8_0)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for k, v in THREADS.items():
        os.environ.setdefault(k, v)
    HERE.mkdir(parents=True, exist_ok=True)
    for stale in HERE.glob("measure-*.json"):  # measured once per run: another commit's measurements would place bits
        stale.unlink()
    data = corpus()
    ckpt = model(args.steps, args.batch, args.lr, data)
    if args.train_only:
        print(json.loads((ckpt / "train_info.json").read_text()))
        return
    wins = windows(data["data"]["eval"], args.eval_windows)
    calib = HERE / "calib.jsonl"
    cw = windows(data["data"]["calib"], args.calib_samples)
    calib.write_text("".join(json.dumps({"text": bytes(w[1:].astype(np.uint8)).decode("utf-8", "replace")}) + "\n"
                             for w in cw))
    calib_args = ["--calib", str(calib), "--calib-samples", str(args.calib_samples), "--calib-seqlen", str(SEQ + 1)]
    ref = logprobs_transformers(ckpt, wins)
    R: dict[str, dict] = {"transformers float": {**score(ref, None, wins), "engine": "transformers"}}

    def row(name: str, make, scorer, **meta) -> dict:
        t = time.perf_counter()
        try:
            path, convert_s = make()
            R[name] = {**score(scorer(path, wins), ref, wins), "bytes": tensor_bytes(path),
                       "convert_s": round(convert_s, 1), "eval_s": round(time.perf_counter() - t - convert_s, 1), **meta}
        except Exception as e:  # noqa: BLE001 - a row that cannot run is reported, not fatal
            R[name] = {"error": str(e)[:300], **meta}
        log.info("%s: %s", name, R[name])
        return R[name]

    float_mlx = HERE / "mlx-float"
    if not args.no_peers:
        peer_rows(args, row, R, ckpt, wins, calib, calib_args, float_mlx)
    for preset in [x for x in args.presets.split(",") if x]:  # issue 27: the int4 / int8 presets (PRESET:calib: GPTQ
        name, _, calibrated = preset.partition(":")          # on the calibration text, as llama.cpp's imatrix rows;
        out = HERE / f"onnx-{Path(name).stem}{'-calib' if calibrated else ''}"  # or a recipe file: PATH.toml[:calib])
        extra = calib_args if calibrated else []
        row(f"l4export onnx {name} preset{' (calibrated)' if calibrated else ''}",
            lambda out=out, q=name, extra=extra: (out, l4(ckpt, out, "onnx", "--quant", q, *extra)),
            logprobs_export, engine="l4export", fmt="onnx", preset=preset)
    scorers = {"mlx": partial(logprobs_dequantized, ckpt=ckpt), "onnx": logprobs_export}
    for b in [x for x in args.budgets.split(",") if x]:
        for fmt in args.budget_formats.split(","):
            for how in args.placements.split(",") if fmt == "onnx" else ["projection"]:
                # explicit on ONNX: mixed:B alone places per expert there from 2.75 bits (l4export.mixed)
                suffix = f":per-{how}" if fmt == "onnx" else ""
                name = f"l4export {fmt} mixed:{b}{suffix} (calibrated)"
                out = HERE / f"{fmt}-mixed-{b}{'-per-expert' if how == 'expert' else ''}-calib"
                dtype = ["--dtype", "bfloat16"] if fmt == "mlx" else []
                cache = ["--measurements", str(HERE / f"measure-{fmt}-{how}-calibrated.json")]
                scorer = scorers[fmt]
                row(name, lambda out=out, fmt=fmt, q=f"mixed:{b}{suffix}", extra=dtype + cache:
                    (out, l4(ckpt, out, fmt, *extra, "--quant", q, *calib_args)),
                    scorer, engine="l4export", fmt=fmt, budget=b, placement=how)
            if args.widths:
                ws = [int(w) for w in args.widths.split(",")]
                recipe = HERE / f"widths-{b}-{'-'.join(map(str, ws))}.toml"
                recipe.write_text(f'budget = "{b}"\nwidths = {ws}\n')
                name = f"l4export {fmt} mixed:{b} widths {args.widths} (calibrated)"
                out = HERE / f"{fmt}-mixed-{b}-w{'-'.join(map(str, ws))}-calib"
                row(name, lambda out=out, fmt=fmt, recipe=recipe, extra=dtype:
                    (out, l4(ckpt, out, fmt, *extra, "--quant", str(recipe), *calib_args)),
                    scorers[fmt], engine="l4export", fmt=fmt, budget=b, widths=ws)
    report(R, ckpt, data, wins, args)


def peer_rows(args, row, R: dict, ckpt: Path, wins: np.ndarray, calib: Path, calib_args: list, float_mlx: Path) -> None:
    """mlx-lm's and llama.cpp's rows, and l4export's MLX mixed rows at each peer's bytes."""
    logprobs_mlx = partial(logprobs_dequantized, ckpt=ckpt)
    if not (args.no_mlx_lm and args.no_mixed_at_peers):  # mlx-lm's source, and the MLX rows' float reference
        row("l4export mlx float (bf16)", lambda: (float_mlx, l4(ckpt, float_mlx, "mlx", "--dtype", "bfloat16")),
            logprobs_mlx, engine="l4export", fmt="mlx")
    for name, extra in ({} if args.no_mlx_lm else MLX_LM).items():
        out = HERE / name.replace(" ", "-")
        row(name, lambda out=out, extra=extra: (out, mlx_lm_convert(float_mlx, out, extra)), logprobs_mlx,
            engine="mlx-lm")
    if args.llama_cpp is not None:
        R.update(llama_cpp_rows(args.llama_cpp, ckpt, wins, calib, args.llama_bin, args.llama_types.split(",")))
    peers = {k: v for k, v in R.items() if k.startswith(("mlx-lm", "llama.cpp")) and "bytes" in v
             and "4-bit" not in k and "Q4" not in k and "Q8" not in k and "bf16" not in k}
    for peer, v in ({} if args.no_mixed_at_peers else peers).items():
        hows = (("weights", []), ("calibrated", calib_args)) if peer in WEIGHTS_TOO else (("calibrated", calib_args),)
        for how, extra in hows:
            name = f"l4export mixed at {peer} bytes ({how})"
            out = HERE / name.replace(" ", "-").replace("(", "").replace(")", "")
            cache = ["--measurements", str(HERE / f"measure-mlx-{how}.json")]  # measured once, every budget reads it
            row(name, lambda out=out, extra=extra + cache, b=v["bytes"]: (out, l4(ckpt, out, "mlx", "--dtype", "bfloat16",
                                                                                  "--quant", f"mixed:{b}B", *extra)),
                logprobs_mlx, engine="l4export", fmt="mlx", peer=peer, measure=how)


# ---- llama.cpp --------------------------------------------------------------------------------------------
_CONVERT = """import sys, runpy
src = sys.argv[1]; sys.argv = [src + "/convert_hf_to_gguf.py"] + sys.argv[2:]
sys.path[:0] = [src, src + "/gguf-py"]
import conversion.base as base
# our byte-level tokenizer is not one the converter fingerprints: name its pre-tokenizer
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
"""
LLAMA_CPP = ("Q8_0", "Q4_0", "Q4_K_M", "Q3_K_S", "IQ3_XXS", "Q2_K", "IQ2_S", "IQ2_XS")
WEIGHTS_TOO = ("mlx-lm 3-bit g64", "mlx-lm 2-bit g32")  # peers whose bytes also get a weights-only placement row


def gguf_source(ckpt: Path) -> Path:
    """The checkpoint as llama.cpp's converter takes it: its BPE reader needs at least one merge, so the tokenizer gains
    one for two bytes that never meet in text (0x00 0x01, in an unused reserved slot): every byte stays one token."""
    src = HERE / "gguf-src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    for f in ckpt.iterdir():
        if f.name != "tokenizer.json":
            (src / f.name).symlink_to(f.resolve())
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    slot = tok["added_tokens"][-1]
    tok["added_tokens"] = tok["added_tokens"][:-1]
    tok["model"]["vocab"].pop(slot["content"], None)
    tok["model"]["vocab"]["\u0100\u0101"] = slot["id"]
    tok["model"]["merges"] = [["\u0100", "\u0101"]]
    (src / "tokenizer.json").write_text(json.dumps(tok))
    return src


_STATS = {"Mean PPL(Q)": ("ppl", 1.0), "Mean KLD": ("kl", 1.0), "Median KLD": ("kl_median", 1.0),
          "99.0% KLD": ("kl_p99", 1.0), "Same top p": ("top1", 0.01), "Mean ln(PPL(Q)/PPL(base))": ("ln_ppl_ratio", 1.0)}


def _perplexity(tools: Path, model: Path, text: Path, *extra: str) -> dict:
    r = subprocess.run([str(tools / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", str(SEQ), "-t", "2",
                        "-b", str(SEQ), *extra], capture_output=True, text=True)
    out = r.stdout + r.stderr
    if r.returncode < 0 or r.returncode > 128:
        raise RuntimeError(f"llama-perplexity crashed (signal {abs(r.returncode) % 128}) on this model")
    if r.returncode != 0:
        raise RuntimeError(out.strip().splitlines()[-1] if out.strip() else f"rc {r.returncode}")
    got: dict = {}
    for line in out.splitlines():
        key, _, value = line.partition(":")
        key = " ".join(key.split())
        if "Final estimate: PPL" in line:
            got["ppl"] = float(line.split("=")[1].split()[0])
        elif key in _STATS:
            v, *rest = value.split()
            name, scale = _STATS[key]
            got[name] = float(v) * scale
            if len(rest) >= 2 and key in ("Mean KLD", "Mean ln(PPL(Q)/PPL(base))"):  # "0.000161 ± 0.000044"
                got[name + "_se"] = float(rest[1])
    if "ppl" not in got:  # seen once (2026-12-08, the bf16 base run, rc 0): the run's end, not a KeyError at the end
        raise RuntimeError(f"llama-perplexity printed no final estimate: {out.strip()[-300:]!r}")
    return got


def llama_cpp_rows(root: Path, ckpt: Path, wins: np.ndarray, calib: Path, tools: Path | None = None,
                   types=LLAMA_CPP) -> dict:
    """llama.cpp's rows: bf16 GGUF, importance matrix on the calibration text, each quant type scored against the bf16
    GGUF's own logits (llama-perplexity --kl-divergence) on the held-out windows' text."""
    tools = tools or root / "build" / "bin"
    text = HERE / "eval.txt"
    text.write_bytes(b"\n".join(bytes(w[1:].astype(np.uint8)) for w in wins))
    ctext = HERE / "calib.txt"
    ctext.write_text("\n".join(json.loads(line)["text"] for line in calib.read_text().splitlines()))
    script = HERE / "convert_hf_to_gguf_wrapper.py"
    script.write_text(_CONVERT)
    bf16 = HERE / "bf16.gguf"
    rows: dict = {}
    t = time.perf_counter()
    run([sys.executable, str(script), str(root), str(gguf_source(ckpt)), "--outfile", str(bf16), "--outtype", "bf16"])
    base = HERE / "bf16.kld"
    try:
        scored = _perplexity(tools, bf16, text, "--kl-divergence-base", str(base))
    except RuntimeError as e:
        log.warning("llama.cpp bf16: %s; once more", e)
        scored = _perplexity(tools, bf16, text, "--kl-divergence-base", str(base))
    rows["llama.cpp bf16"] = {**scored,
                              "bytes": gguf_tensor_bytes(root, bf16), "engine": "llama.cpp",
                              "convert_s": round(time.perf_counter() - t, 1)}
    imatrix = HERE / "imatrix.gguf"
    run([str(tools / "llama-imatrix"), "-m", str(bf16), "-f", str(ctext), "-o", str(imatrix), "-c", str(SEQ), "-t", "2"])
    for q in types:
        out = HERE / f"{q}.gguf"
        try:
            run([str(tools / "llama-quantize"), "--imatrix", str(imatrix), str(bf16), str(out), q, "2"])
            rows[f"llama.cpp {q}"] = {**_perplexity(tools, out, text, "--kl-divergence-base", str(base), "--kl-divergence"),
                                      "bytes": gguf_tensor_bytes(root, out), "engine": "llama.cpp", "imatrix": True}
        except Exception as e:  # noqa: BLE001
            rows[f"llama.cpp {q}"] = {"error": str(e)[:300], "engine": "llama.cpp"}
        log.info("llama.cpp %s: %s", q, rows[f"llama.cpp {q}"])
    return rows


def gguf_tensor_bytes(root: Path, path: Path) -> int:
    """The GGUF's tensor data (metadata and tokenizer left out), read with llama.cpp's own gguf-py."""
    sys.path.insert(0, str(root / "gguf-py"))
    import gguf

    return int(sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors))


def increase(R: dict, name: str) -> float | None:
    """Perplexity increase (%) over the row's own float: transformers' for ours and mlx-lm's, llama.cpp's bf16 GGUF
    for llama.cpp's."""
    v = R.get(name, {})
    if "ppl" not in v:
        return None
    base = R["llama.cpp bf16"]["ppl"] if v.get("engine") == "llama.cpp" else R["transformers float"]["ppl"]
    return 100 * (v["ppl"] / base - 1)


def report(R: dict, ckpt: Path, data: dict, wins: np.ndarray, args) -> None:
    info = json.loads((ckpt / "train_info.json").read_text())
    params = info["params"]
    rows = []
    for k, v in R.items():
        inc = increase(R, k)
        rows.append({"variant": k, "PPL": f"{v['ppl']:.4f}" if "ppl" in v else "n/a",
                     "vs float": "" if inc is None else f"{inc:+.2f}%" + (f" ± {100 * v['ln_ppl_ratio_se']:.2f}"
                                                                            if "ln_ppl_ratio_se" in v else ""),
                     "KL": _kl(v), "median KL": f"{v['kl_median']:.6f}" if "kl_median" in v else "", "top1": f"{v['top1']:.3f}" if "top1" in v else "",
                     "bpw": f"{8 * v['bytes'] / params:.3f}" if v.get("bytes") else "",
                     "note": v.get("error", "")[:60]})
    print(f"\nmodel: {params / 1e6:.1f}M params, {info['steps']} steps ({info['train_seconds']} s), "
          f"{wins.shape[0]} x {SEQ} held-out predictions\n")
    print(table(rows, ["variant", "PPL", "vs float", "KL", "median KL", "top1", "bpw", "note"]))
    goals = compute_goals(R)
    for k, g in goals.items():
        print(f"{'MET   ' if g['met'] else 'MISSED'} {k}: {g['value']}")
    placement = compare_placements(R)
    for b, c in placement.items():
        print(f"mixed:{b} ONNX per expert vs per projection: {c}")
    result = {"model": {"config": CONFIG, "train": info, "checkpoint": ckpt.name},
              "data": {k: v for k, v in data.items() if k != "data"},
              "eval": {"windows": int(wins.shape[0]), "seq": SEQ}, "rows": R, "goals": goals, "placement": placement}
    path = save_result("low-bit" + (f"-{args.tag}" if args.tag else ""), result)
    print(f"\nwrote {path}")


def _kl(v: dict) -> str:
    if "kl" not in v:
        return ""
    return f"{v['kl']:.5f}" + (f" ± {v['kl_se']:.5f}" if "kl_se" in v else "")


def compare_placements(R: dict) -> dict:
    """Per budget, the ONNX rows placed per expert and per projection side by side (increase, KL, top-1, bytes)."""
    out = {}
    for k, v in R.items():
        if v.get("placement") != "expert" or "ppl" not in v:
            continue
        proj = R.get(k.replace(":per-expert", ":per-projection"), {})
        if "ppl" not in proj:
            continue
        pick = lambda r, n: {"increase_pct": round(increase(R, n), 3), "kl": round(r["kl"], 5),  # noqa: E731
                             "top1": round(r["top1"], 4), "bytes": r["bytes"]}
        out[v["budget"]] = {"projection": pick(proj, k.replace(":per-expert", ":per-projection")), "expert": pick(v, k),
                            "expert_better": v["kl"] < proj["kl"]}
    return out


def compute_goals(R: dict) -> dict:
    """The issue's quality goals, each l4export row at <= its peer's bytes (calibrated placement)."""
    def best(names):
        vals = [(increase(R, n), n) for n in names if increase(R, n) is not None]
        return min(vals) if vals else (None, None)

    def ours(peer):
        return increase(R, f"l4export mixed at {peer} bytes (calibrated)")

    goals = {}
    m3 = ours("mlx-lm 3-bit g64")
    p3 = increase(R, "mlx-lm 3-bit g64")
    if m3 is not None and p3 is not None:
        goals["mixed:3.5-class (at mlx-lm 3-bit g64's bytes): <= +0.5 % and <= 1/3 of mlx-lm 3-bit g64's increase"] = {
            "value": f"{m3:+.2f}% vs mlx-lm {p3:+.2f}%", "met": m3 <= 0.5 and m3 <= p3 / 3}
    for label, peer_names in (("3.0", ["mlx-lm 2-bit g32", "mlx-lm mixed_2_6", "llama.cpp Q3_K_S", "llama.cpp IQ3_XXS"]),
                              ("2.5", ["mlx-lm 2-bit g64", "llama.cpp Q2_K", "llama.cpp IQ2_XS", "llama.cpp IQ2_S"])):
        b, which = best(peer_names)
        mine = [ours(n) for n in peer_names if ours(n) is not None]
        if b is not None and mine:
            # Two readings of "each l4export row at <= the peer's bytes". Paired: each of our rows against the peer at
            # whose bytes it sits, and so ours at the best peer's bytes against the best peer. Strict: every row of
            # the class, also those at fewer bytes than the best peer's, against the best peer.
            paired = {n: (ours(n), increase(R, n)) for n in peer_names if ours(n) is not None and increase(R, n) is not None}
            goals[f"mixed:{label}-class, paired: each row <= 1/2 of the increase of the peer at whose bytes it sits"] = {
                "value": ", ".join(f"{n} {m:+.2f}% vs {p:+.2f}%" for n, (m, p) in paired.items()),
                "met": all(m <= p / 2 for m, p in paired.values())}
            worst_mine = max(mine)
            goals[f"mixed:{label}-class, strict: every row <= 1/2 of the best peer's increase ({which})"] = {
                "value": f"ours up to {worst_mine:+.2f}% vs {which} {b:+.2f}%", "met": worst_mine <= b / 2}
    for preset, peer in (("int4", "llama.cpp Q4_K_M"), ("int8", "llama.cpp Q8_0")):  # issue 27
        for how in ("", " (calibrated)"):
            mine, theirs = R.get(f"l4export onnx {preset} preset{how}", {}), R.get(peer, {})
            if "kl" in mine and "kl" in theirs:
                se = (mine.get("kl_se", 0.0) ** 2 + theirs.get("kl_se", 0.0) ** 2) ** 0.5
                goals[f"{preset} preset{how} KL <= {peer}'s (issue 27)"] = {
                    "value": f"{_kl(mine)} vs {_kl(theirs)} (median {mine.get('kl_median', float('nan')):.6f} vs "
                             f"{theirs.get('kl_median', float('nan')):.6f})",
                    "met": mine["kl"] <= theirs["kl"], "difference_in_se": round((mine["kl"] - theirs["kl"]) / se, 2)
                    if se else None}
    return goals


if __name__ == "__main__":
    main()
