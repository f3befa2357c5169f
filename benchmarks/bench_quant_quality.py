"""Quantization quality benchmark (issue 5): held-out perplexity of a small trained Llama 4 MoE, float vs quantized.

    python benchmarks/bench_quant_quality.py [--steps 400] [--formats mlx,onnx] [--retrain]

1. Trains (deterministically, CPU, 1 thread) a small Scout-like ``Llama4ForCausalLM`` from transformers on the
   bytes of this Python's standard library sources: top-level ``*.py`` files of ``sysconfig.get_paths()["stdlib"]``
   in sorted order; file i goes to evaluation if i % 10 == 0, to calibration if i % 10 == 1, else to training.
   Byte-level tokenizer (``l4export.demo.byte_tokenizer_json``, ids 0..255 = bytes, 256 = BOS). Saved with
   ``save_pretrained`` in bf16 (text-only layout) plus tokenizer.json under benchmarks/work/ (re-runs reuse it).
   Training only: the MoE block runs sparsely (each token through its top-1 expert), which is the same maths
   as transformers' dense all-expert ``bmm`` (an unrouted expert gets input 0·x and gives exactly 0 and no
   gradient) at 1/E of the expert FLOPs. Every evaluation uses transformers' unmodified forward.
2. Exports with ``l4export convert`` (float, int4 round to nearest, int4 GPTQ-calibrated on the calibration
   files, fp8) and mlx-lm's own ``mlx_lm convert -q --q-bits 4 --q-group-size 64`` of our float MLX export,
   then measures perplexity on the same fixed held-out windows (BOS + 256 bytes; 256 predictions each).
   Variants: float; the ``int4`` preset (experts g64, the rest int8 g128; ONNX Runtime at accuracy_level 4, i.e.
   int8 activations) RTN and GPTQ-calibrated; on ONNX the ``int4-exact`` preset (the same weights, float
   activations) RTN and calibrated; fp8; mlx-lm 4-bit g64.
3. Method comparison, like for like: the routed experts quantized (int4 g64) by RTN, by l4export's per-expert
   GPTQ, and by an AWQ-style per-expert activation-aware scaling (``awq_experts``), each evaluated as a
   fake-quantized transformers model (everything else RTN at the preset's schemes).
4. Planned export bytes (``l4export.plan.make_plan``) for this model and for the real Scout and Maverick configs.

Prints a table and writes benchmarks/results/quant-quality-<date>.{json,png}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, measure, save_result, table  # noqa: E402

from l4export.demo import BOS, EOS, EOT, PAD, SPECIALS, byte_tokenizer_json  # noqa: E402

log = logging.getLogger("bench_quant_quality")

SEQ = 256  # bytes per training / evaluation / calibration window (BOS + SEQ tokens)
# The previous int4 preset (routed and shared experts at group 32: 5 bits/weight on MLX) for comparison with the
# current one (group 64: 4.5 bits/weight).
AWQ_ALPHAS = tuple(round(a, 2) for a in np.linspace(0.0, 1.0, 21))  # AWQ's own grid is 20 points in [0, 1)
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}

TEXT_CONFIG = dict(
    vocab_size=272, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    intermediate_size=256, intermediate_size_mlp=512, num_hidden_layers=4,  # layer 3 is NoPE (every 4th)
    num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1, use_qk_norm=True,
    attention_chunk_size=128,  # < SEQ: chunked attention is exercised
    max_position_embeddings=4096, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 1.0, "original_max_position_embeddings": 256},
    bos_token_id=BOS, eos_token_id=[EOS, EOT], pad_token_id=PAD, initializer_range=0.02,
)


# ---- data -----------------------------------------------------------------------------------------------
def corpus() -> dict:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())
    split = {"train": [], "eval": [], "calib": []}
    for i, p in enumerate(files):
        split["eval" if i % 10 == 0 else "calib" if i % 10 == 1 else "train"].append(p)
    data = {k: b"\n".join(p.read_bytes() for p in v) for k, v in split.items()}
    digest = hashlib.sha256(b"".join(data.values())).hexdigest()[:16]
    return {"stdlib": str(stdlib), "files": {k: [p.name for p in v] for k, v in split.items()},
            "bytes": {k: len(v) for k, v in data.items()}, "sha256_16": digest, "data": data}


def windows(data: bytes, n: int) -> np.ndarray:
    """n fixed, evenly spaced windows of BOS + SEQ bytes."""
    arr = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    starts = np.linspace(0, len(arr) - SEQ - 1, n).astype(np.int64)
    return np.stack([np.concatenate([[BOS], arr[s:s + SEQ]]) for s in starts])


# ---- training -------------------------------------------------------------------------------------------
def adamw_cosine(model, lr: float, steps: int, floor: float):
    """AdamW (weight decay 0.05 on matrices but the embedding) with 5% linear warm-up, then a cosine down to
    ``floor`` x lr (the demo's training script uses it too)."""
    import torch

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    return opt, sched


def train_step(model, opt, sched, ids) -> float:
    """One language-modelling step on ``ids`` [B, S] (loss, gradient clipped at 1.0, optimizer and schedule);
    returns the loss."""
    import torch

    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def _sparse_moe_forward(self, hidden_states):
    """Top-1 sparse equivalent of transformers' Llama4TextMoe.forward (training speed only; see module doc)."""
    import torch

    h = hidden_states.reshape(-1, self.hidden_dim)
    router_scores, router_logits = self.router(h)  # scores: sigmoid(top-1 logit) at the chosen expert, 0 elsewhere
    idx = router_logits.argmax(dim=1)
    score = router_scores.gather(1, idx[:, None])
    out = self.shared_expert(h)
    routed = torch.zeros_like(h)
    ex = self.experts
    for e in range(self.num_experts):
        sel = (idx == e).nonzero(as_tuple=True)[0]
        if sel.numel() == 0:
            continue
        x = h[sel] * score[sel]
        gate, up = (x @ ex.gate_up_proj[e]).chunk(2, dim=-1)
        routed = routed.index_add(0, sel, (up * ex.act_fn(gate)) @ ex.down_proj[e])
    return out + routed, router_logits


def train(out: Path, data: bytes, steps: int, batch: int, lr: float, seed: int = 0, config: dict | None = None) -> dict:
    import torch
    from transformers import Llama4ForCausalLM, Llama4TextConfig
    from transformers.models.llama4 import modeling_llama4

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    cfg = Llama4TextConfig(**(config or TEXT_CONFIG))
    cfg._attn_implementation = "sdpa"
    model = Llama4ForCausalLM(cfg).float().train()
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    arr = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int64))
    gen = torch.Generator().manual_seed(seed)
    opt, sched = adamw_cosine(model, lr, steps, floor=0.1)
    original = modeling_llama4.Llama4TextMoe.forward
    modeling_llama4.Llama4TextMoe.forward = _sparse_moe_forward
    t0, losses = time.perf_counter(), []
    try:
        for step in range(steps):
            starts = torch.randint(0, len(arr) - SEQ, (batch,), generator=gen)
            ids = torch.stack([torch.cat([torch.tensor([BOS]), arr[s:s + SEQ]]) for s in starts.tolist()])
            losses.append(train_step(model, opt, sched, ids))
            if step % 25 == 0 or step == steps - 1:
                log.info("step %d/%d loss %.3f (%.0f s)", step, steps, losses[-1], time.perf_counter() - t0)
    finally:
        modeling_llama4.Llama4TextMoe.forward = original
    seconds = time.perf_counter() - t0
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp)
    (tmp / "tokenizer.json").write_text(json.dumps(byte_tokenizer_json(cfg.vocab_size)))
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": SPECIALS[0], "eos_token": SPECIALS[5], "pad_token": SPECIALS[6],
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096}, indent=2))
    info = {"steps": steps, "batch": batch, "seq": SEQ, "lr": lr, "seed": seed, "train_seconds": round(seconds, 1),
            "tokens_seen": steps * batch * SEQ, "final_loss_mean_last10": round(float(np.mean(losses[-10:])), 4),
            "params": n_params, "expert_params": n_expert, "saved_dtype": "bfloat16", "layout": "text-only (Llama4ForCausalLM)",
            "deterministic_algorithms": True, "threads": 1}
    (tmp / "train_info.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return info


# ---- evaluation -----------------------------------------------------------------------------------------
def nll_from_logits(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per-prediction NLL (float64) of ids[1:] given logits[:-1]."""
    lg = logits[:-1].astype(np.float64)
    lg = lg - lg.max(-1, keepdims=True)
    lse = np.log(np.exp(lg).sum(-1))
    return lse - lg[np.arange(len(ids) - 1), ids[1:]]


def ppl_transformers(ckpt: Path, wins: np.ndarray) -> float:
    import torch

    from l4export.runtimes.reference import load_reference

    torch.set_num_threads(1)
    model = load_reference(ckpt)  # float32, eager, stock transformers forward
    nll = []
    with torch.no_grad():
        for w in wins:
            nll.append(nll_from_logits(model(input_ids=torch.from_numpy(w)[None]).logits[0].numpy(), w))
    return float(np.exp(np.concatenate(nll).mean()))


def ppl_export(path: Path, wins: np.ndarray) -> float:
    from l4export.runtimes import load_runtime

    rt = load_runtime(path)
    nll = [nll_from_logits(np.asarray(rt.logits(w.tolist()), dtype=np.float32), w) for w in wins]
    return float(np.exp(np.concatenate(nll).mean()))


def ppl_mlx_lm(path: Path, wins: np.ndarray) -> float:
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(path))
    nll = []
    for w in wins:
        logits = model(mx.array(w)[None])[0].astype(mx.float32)
        nll.append(nll_from_logits(np.array(logits), w))
    return float(np.exp(np.concatenate(nll).mean()))


def weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and
               (p.suffix in (".safetensors", ".onnx", ".data", ".bin") or p.name.endswith(".onnx_data")))


# ---- like-for-like method comparison: RTN vs GPTQ vs AWQ-style, fake-quantized in transformers -----------
# Only the routed experts differ between the three (they are 90% of the parameters and the question is
# "per-expert GPTQ or AWQ-style scaling"); shared expert and attention are round-to-nearest in all three, at the
# preset's schemes. Both calibrated methods are sequential over layers in the same way (each layer sees inputs
# from the already-quantized experts of earlier layers) and use the same calibration ids.
EXPERT_PROJ = ("gate_proj", "up_proj", "down_proj")


def _expert_scheme():
    from l4export.quant.recipe import PRESETS

    return PRESETS["int4"].scheme_for("model.layers.0.feed_forward.experts.gate_proj")


def _awq_search(w: np.ndarray, x: np.ndarray, scheme) -> tuple[np.ndarray, float, float, float]:
    """One expert's projection w [out, in] on its inputs x [n, in]: the AWQ-style fake-quantized weight
    Q(W·diag(s))·diag(1/s) with s = mean|x|^α, α on AWQ_ALPHAS minimising ‖x(W − Ŵ)ᵀ‖². Returns
    (Ŵ, α, error at α, error at α = 0, which is RTN)."""
    hess = x.T.astype(np.float64) @ x.astype(np.float64)  # ‖xΔᵀ‖² = tr(Δ H Δᵀ)
    mean_abs = np.abs(x).mean(0).astype(np.float64)
    mean_abs = np.maximum(mean_abs, mean_abs.max() * 1e-4 + 1e-12)  # a dead input channel gets a small, finite s
    best: tuple[np.ndarray, float, float] | None = None
    rtn_err = 0.0
    for a in AWQ_ALPHAS:
        s = mean_abs**a
        s = s / np.sqrt(s.max() * s.min())  # AWQ's normalisation; the grid is scale-free up to fp16 rounding
        wq = scheme.rtn((w * s[None, :]).astype(np.float32)).astype(np.float64) / s[None, :]
        d = w.astype(np.float64) - wq
        err = float(np.einsum("nk,kl,nl->", d, hess, d))
        if a == 0.0:
            rtn_err = err
        if best is None or err < best[2]:
            best = (wq.astype(np.float32), a, err)
    return best[0], best[1], best[2], rtn_err


def awq_experts(ckpt_path: Path, ids: list[np.ndarray], scheme,
                compare: dict[str, np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """AWQ-style fake quantization of every routed expert, layer by layer, with l4export's calibration layer
    maths (``torch_llama4.layer_forward`` and its capture hook): gate/up see the expert's real routed inputs
    (router score × normed h), down the true intermediate. Unrouted experts: gate/up use the layer's pooled
    routed inputs (the experts share that input space, as GPTQ's layer prior does); down falls back to RTN.
    ``compare`` (e.g. the GPTQ experts): their output error on the same captured inputs is reported too, as a
    fraction of RTN's (experts with tokens of their own only)."""
    import torch

    from l4export.checkpoint import Checkpoint
    from l4export.torch_llama4 import layer_forward

    torch.set_num_threads(1)
    ck = Checkpoint(ckpt_path)
    spec = ck.spec
    embed = torch.tensor(ck.tensors["model.embed_tokens.weight"].load(np.float32))
    X = [embed[torch.tensor(i)] for i in ids]
    inv_freq = torch.tensor(spec.inv_freq())
    out: dict[str, np.ndarray] = {}
    info: dict = {"alphas": {}, "calib_error_vs_rtn": {}, "compare_error_vs_rtn": {}, "unrouted": {}}
    for la in spec.layers:
        W = {n: torch.tensor(t.load(np.float32)) for n, t in ck.layer(la.index).items()}
        if la.is_moe:
            inputs: dict[str, dict[int, list]] = {"feed_forward.experts.gate_proj": {}, "feed_forward.experts.down_proj": {}}

            def capture(name: str, e: int, x, inputs=inputs) -> None:
                if name in inputs:
                    inputs[name].setdefault(e, []).append(x.numpy().copy())

            with torch.no_grad():
                for x in X:
                    layer_forward(x, W, la, spec, inv_freq, capture)
            gate_in = {e: np.concatenate(v) for e, v in inputs["feed_forward.experts.gate_proj"].items()}
            down_in = {e: np.concatenate(v) for e, v in inputs["feed_forward.experts.down_proj"].items()}
            pooled = np.concatenate(list(gate_in.values()))
            info["unrouted"][la.index] = [e for e in range(spec.num_experts) if e not in gate_in]
            for proj in EXPERT_PROJ:
                name = f"feed_forward.experts.{proj}"
                w = W[name].numpy()
                wq = np.empty_like(w)
                alphas, err, err_rtn, err_cmp = [], 0.0, 0.0, 0.0
                other = None if compare is None else compare[f"model.layers.{la.index}.{name}"]
                for e in range(spec.num_experts):
                    x = (down_in if proj == "down_proj" else gate_in).get(e)
                    own = x is not None
                    if x is None and proj != "down_proj":
                        x = pooled
                    if x is None:  # an unrouted expert's down: no inputs of its own exist
                        wq[e] = scheme.rtn(w[e][None])[0]
                        alphas.append(None)
                        continue
                    wq[e], a, er, er0 = _awq_search(w[e], x, scheme)
                    alphas.append(a)
                    if own:
                        err, err_rtn = err + er, err_rtn + er0
                        if other is not None:
                            d = (w[e] - other[e]).astype(np.float64) @ x.T.astype(np.float64)
                            err_cmp += float((d**2).sum())
                out[f"model.layers.{la.index}.{name}"] = wq
                info["alphas"][f"{la.index}.{proj}"] = alphas
                info["calib_error_vs_rtn"][f"{la.index}.{proj}"] = round(err / err_rtn, 4) if err_rtn else None
                if other is not None:
                    info["compare_error_vs_rtn"][f"{la.index}.{proj}"] = round(err_cmp / err_rtn, 4) if err_rtn else None
                W[name] = torch.tensor(wq)  # the next layer calibrates on what it will see
        with torch.no_grad():
            X = [layer_forward(x, W, la, spec, inv_freq) for x in X]
    return out, info


def gptq_experts(ckpt_path: Path, ids: list[np.ndarray], scheme) -> dict[str, np.ndarray]:
    """l4export's own calibration (per-expert GPTQ with the layer prior), restricted to the routed experts."""
    from l4export.checkpoint import Checkpoint
    from l4export.names import canonical_shapes
    from l4export.quant.calib import CalibOptions, calibrate
    from l4export.quant.recipe import Recipe, Rule

    ck = Checkpoint(ckpt_path)
    schemes = Recipe("experts-only", (Rule("*.feed_forward.experts.*", scheme),)).plan(canonical_shapes(ck.spec))
    res = calibrate(ck, schemes, ids, CalibOptions(samples=len(ids), seqlen=max(len(i) for i in ids)))
    return {n: qt.dequantize() for n, qt in res.tensors.items()}


def fake_quant_model(ckpt_path: Path, experts: dict[str, np.ndarray]):
    """transformers float32 with the given routed experts, and RTN (preset schemes) for every other tensor the
    int4 preset quantizes (shared expert, attention)."""
    from l4export.checkpoint import Checkpoint
    from l4export.quant.recipe import PRESETS
    from l4export.runtimes.reference import load_reference, set_canonical_weight

    recipe = PRESETS["int4"]
    model = load_reference(ckpt_path)
    for name, t in Checkpoint(ckpt_path).tensors.items():
        scheme = recipe.scheme_for(name)
        if scheme is None:
            continue
        w = experts[name] if ".experts." in name else scheme.rtn(t.load(np.float32))
        set_canonical_weight(model, name, w)
    return model


def ppl_model(model, wins: np.ndarray) -> float:
    import torch

    torch.set_num_threads(1)
    nll = []
    with torch.no_grad():
        for w in wins:
            nll.append(nll_from_logits(model(input_ids=torch.from_numpy(w)[None]).logits[0].numpy(), w))
    return float(np.exp(np.concatenate(nll).mean()))


def method_comparison(ckpt: Path, calib: Path, samples: int, wins: np.ndarray, record) -> dict:
    """RTN / GPTQ / AWQ-style on the routed experts, each evaluated as a fake-quantized transformers model."""
    from l4export.checkpoint import Checkpoint
    from l4export.quant.calib_data import read_calibration

    scheme = _expert_scheme()
    spec = Checkpoint(ckpt).spec
    ids = read_calibration(calib, spec.vocab_size, ckpt, samples, SEQ + 1)  # the ids `convert --calib` uses
    ck = Checkpoint(ckpt)
    rtn = {n: scheme.rtn(t.load(np.float32)) for n, t in ck.tensors.items() if ".experts." in n}
    t = time.perf_counter()
    gptq = gptq_experts(ckpt, ids, scheme)
    gptq_s = time.perf_counter() - t
    t = time.perf_counter()
    awq, awq_info = awq_experts(ckpt, ids, scheme, compare=gptq)
    awq_s = time.perf_counter() - t
    meta = {"experts": scheme.name, "others": "RTN at the int4 preset (shared expert int4 g64, the rest int8 g128)"}
    record("fakequant/rtn", "transformers, routed experts RTN", lambda: ppl_model(fake_quant_model(ckpt, rtn), wins), **meta)
    record("fakequant/gptq", "transformers, routed experts GPTQ (l4export calibrate)",
           lambda: ppl_model(fake_quant_model(ckpt, gptq), wins), calib_s=round(gptq_s, 1), **meta)
    record("fakequant/awq", "transformers, routed experts AWQ-style (per-expert, per-projection alpha)",
           lambda: ppl_model(fake_quant_model(ckpt, awq), wins), calib_s=round(awq_s, 1), **meta)
    chosen = [a for v in awq_info["alphas"].values() for a in v if a is not None]
    awq_info["alpha_histogram"] = {f"{a:.2f}": chosen.count(a) for a in AWQ_ALPHAS if chosen.count(a)}
    # Output error ‖x(W − Ŵ)ᵀ‖² on the calibration tokens as a fraction of RTN's (AWQ driver's captured inputs).
    awq_info["note"] = ("calib_error_vs_rtn: AWQ-style; compare_error_vs_rtn: GPTQ; both on the same captured "
                        "inputs, summed over experts with tokens of their own")
    return awq_info


# ---- driver ---------------------------------------------------------------------------------------------
def l4convert(ckpt: Path, out: Path, fmt: str, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "l4export.cli", "convert", str(ckpt), "-o", str(out), "--format", fmt, "--force", *extra]
    return measure(cmd, env=THREADS)


def compute_goals(results: dict) -> dict:
    """Increases over each family's float PPL (written into the variants) and the issue's goals."""
    V = results["variants"]
    base = {k.split("/")[0]: v["ppl"] for k, v in V.items() if k.endswith("/float") and v["ppl"]}
    base["mlx-lm"] = base.get("mlx")
    base["fakequant"] = base.get("transformers")
    for k, v in V.items():
        b = base.get(k.split("/")[0])
        if v["ppl"] is not None and b:
            v["increase_pct"] = round(100 * (v["ppl"] / b - 1), 3)
    goals: dict = {}
    mlx_lm = V.get("mlx-lm/q4g64", {}).get("increase_pct")
    for fmt in ("mlx", "onnx"):
        g = lambda n, fmt=fmt: V.get(f"{fmt}/{n}", {})  # noqa: E731
        for q in ("int4", "int4-exact"):
            rtn, cal = g(f"{q}-rtn").get("increase_pct"), g(f"{q}-calib").get("increase_pct")
            if cal is None:
                continue
            goals[f"{fmt}: calibrated {q} increase <= +0.3%"] = {"value": f"{cal:+.3f}% (RTN {rtn:+.3f}%)",
                                                                 "met": cal <= 0.3}
            if mlx_lm is not None:
                goals[f"{fmt}: calibrated {q} increase <= 1/2 of mlx-lm 4-bit g64's"] = {
                    "value": f"{cal:+.3f}% vs {mlx_lm:+.3f}%", "met": cal <= 0.5 * mlx_lm}
        fp8 = g("fp8").get("increase_pct")
        if fp8 is not None:
            goals[f"{fmt}: fp8 increase <= +0.1%"] = {"value": f"{fp8:+.3f}%", "met": fp8 <= 0.1}
        # Tensor bytes (weights only, as l4export.plan plans them) over 2 bytes per parameter (MLX: the bf16 float
        # export; ONNX: the fp32 float export / 2 with its float32 router and norms, so slightly over 2 per parameter).
        qt, ft = g("int4-rtn").get("tensor_bytes"), g("float").get("tensor_bytes")
        if qt and ft:
            ref = ft if fmt == "mlx" else ft / 2
            goals[f"{fmt}: int4 export tensor bytes <= 0.32x bf16"] = {
                "value": f"{qt} / {ref:.0f} = {qt / ref:.3f}x", "met": qt / ref <= 0.32}
    for model in ("Llama-4-Scout-17B-16E", "Llama-4-Maverick-17B-128E"):
        proj = results["size_projection"][model]
        for k in ("mlx bfloat16", "onnx float32 graph", "onnx float16 graph"):
            r = proj[k]["ratio"]
            goals[f"{model} (planned): int4 {k} <= 0.32x bf16"] = {
                "value": f"{proj[k]['bytes'] / 1e9:.2f} GB / {proj['bf16_bytes'] / 1e9:.2f} GB = {r:.3f}x", "met": r <= 0.32}
    fq = {m: V.get(f"fakequant/{m}", {}).get("increase_pct") for m in ("rtn", "gptq", "awq")}
    if None not in fq.values():
        goals["fake-quant: GPTQ increase < AWQ-style increase (routed experts)"] = {
            "value": f"GPTQ {fq['gptq']:+.3f}%, AWQ-style {fq['awq']:+.3f}%, RTN {fq['rtn']:+.3f}%",
            "met": fq["gptq"] < fq["awq"]}
    return goals


def size_projection(ckpt: Path) -> dict:
    """Planned tensor bytes (l4export.plan.make_plan) of the int4 preset, over the bf16 bytes, for this model and for
    the real Scout and Maverick configs (tests/test_spec.py's hub-style text configs)."""
    from l4export.quant.recipe import PRESETS
    from l4export.plan import make_plan
    from l4export.spec import load_spec, spec_from_config

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_spec import MAVERICK_TEXT, SCOUT_TEXT  # noqa: E402 - the released configs, kept in one place

    specs = {"this model": load_spec(ckpt),
             "Llama-4-Scout-17B-16E": spec_from_config({"model_type": "llama4", "text_config": dict(SCOUT_TEXT)}),
             "Llama-4-Maverick-17B-128E": spec_from_config({"model_type": "llama4", "text_config": dict(MAVERICK_TEXT)})}
    out: dict = {}
    for model, spec in specs.items():
        ref = 2 * spec.total_params  # every text parameter in bfloat16
        entry: dict = {"params": spec.total_params, "bf16_bytes": ref}
        for fmt, dtype in (("mlx", "bfloat16"), ("onnx", "float32"), ("onnx", "float16")):
            plan = make_plan(spec, fmt, dtype, "cpu", PRESETS["int4"], calibrated=True)
            entry[f"{fmt} {dtype} graph" if fmt == "onnx" else f"{fmt} {dtype}"] = {
                "bytes": plan.total, "ratio": round(plan.total / ref, 4), "by_component": plan.by_component}
        out[model] = entry
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400, help="Training steps (batch 8 x 256 bytes).")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--retrain", action="store_true", help="Train even if the cached checkpoint exists.")
    ap.add_argument("--formats", default="mlx,onnx", help="l4export formats to evaluate (comma-separated; '' for none).")
    ap.add_argument("--no-methods", action="store_true", help="Skip the RTN / GPTQ / AWQ-style fake-quant comparison.")
    ap.add_argument("--eval-windows", type=int, default=64, help="Held-out windows (BOS + 256 bytes each).")
    ap.add_argument("--calib-samples", type=int, default=64)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for k, v in THREADS.items():
        os.environ.setdefault(k, v)

    data = corpus()
    work = WORK / "quant-quality"
    ckpt = work / f"ckpt-s{args.steps}-b{args.batch}-{data['sha256_16']}"
    if args.retrain or not (ckpt / "config.json").is_file():
        log.info("training %s on %d bytes", ckpt.name, data["bytes"]["train"])
        train(ckpt, data["data"]["train"], args.steps, args.batch, args.lr)
    train_info = json.loads((ckpt / "train_info.json").read_text())

    wins = windows(data["data"]["eval"], args.eval_windows)
    calib = work / "calib.jsonl"  # text records (tokenized by the checkpoint's tokenizer.json, BOS prepended)
    cw = windows(data["data"]["calib"], args.calib_samples)
    calib.write_text("".join(json.dumps({"text": bytes(w[1:].astype(np.uint8)).decode("utf-8", "replace")}) + "\n"
                             for w in cw))

    calib_args = ["--calib", str(calib), "--calib-samples", str(args.calib_samples), "--calib-seqlen", str(SEQ + 1)]

    rows: list[dict] = []
    results: dict = {"data": {k: v for k, v in data.items() if k != "data"},
                     "train": train_info, "eval": {"windows": int(len(wins)), "predictions": int(wins.shape[0] * SEQ),
                                                   "seq": SEQ},
                     "calibration": {"file": calib.name, "samples": args.calib_samples, "seqlen": SEQ + 1},
                     "preset": "int4: routed + shared experts int4 g64 sym (fp16-grid scales), attention, dense MLPs, "
                               "lm_head and embedding int8 g128; router and norms float; ONNX Runtime accuracy_level 4 "
                               "(int8 activations); int4-exact: the same weights at accuracy_level 0",
                     "variants": {}}

    def record(key: str, label: str, fn, **meta):
        t = time.perf_counter()
        try:
            ppl = fn()
            entry = {"label": label, "ppl": round(ppl, 4), "eval_s": round(time.perf_counter() - t, 1), **meta}
        except Exception as e:  # noqa: BLE001 - reported as not measured, with the error line
            line = str(e).strip().splitlines()
            err = next((ln for ln in reversed(line) if ln.startswith("error:")), line[-1] if line else repr(e))
            log.warning("%s: not measured: %s", key, err)
            entry = {"label": label, "ppl": None, "error": err[:300], **meta}
        results["variants"][key] = entry
        log.info("%s: %s", key, entry.get("ppl"))
        return entry

    from l4export.folder import export_tensor_bytes

    record("transformers/float", "transformers float32 (bf16 weights)", lambda: ppl_transformers(ckpt, wins))

    for fmt in [f for f in args.formats.split(",") if f]:
        dtype = "bfloat16" if fmt == "mlx" else "float32"  # ONNX CPU has no bf16; MLX stores bf16, computes fp32 on CPU
        variants = [("float", []), ("int4-rtn", ["--quant", "int4"]),
                    ("int4-calib", ["--quant", "int4", *calib_args]),
                    ("fp8", ["--quant", "fp8"])]
        if fmt == "onnx":  # MLX reads the same weights either way (no int8-activation kernel)
            variants += [("int4-exact-rtn", ["--quant", "int4-exact"]),
                         ("int4-exact-calib", ["--quant", "int4-exact", *calib_args])]
        for name, extra in variants:
            out = work / f"{fmt}-{name}"
            conv: dict = {}

            def run(out=out, extra=extra, conv=conv):
                conv.update(l4convert(ckpt, out, fmt, "--dtype", dtype, *extra))
                return ppl_export(out, wins)

            e = record(f"{fmt}/{name}", f"l4export {fmt} {name} ({dtype} store)", run, dtype=dtype)
            if e["ppl"] is not None:
                e["bytes"] = weight_bytes(out)
                e["tensor_bytes"] = export_tensor_bytes(out)
                e["convert_s"] = conv.get("wall_s")
                e["convert_peak_rss_mb"] = conv.get("peak_rss_mb")
            else:
                e.pop("dtype", None)
        if fmt == "mlx" and results["variants"].get("mlx/float", {}).get("ppl") is not None:
            out = work / "mlx-lm-q4g64"
            shutil.rmtree(out, ignore_errors=True)

            def run_mlx_lm(out=out):
                m = measure([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(work / "mlx-float"),
                             "--mlx-path", str(out), "-q", "--q-bits", "4", "--q-group-size", "64"], env=THREADS)
                results["variants"]["mlx-lm/q4g64-convert"] = {"wall_s": m["wall_s"]}
                return ppl_mlx_lm(out, wins)

            e = record("mlx-lm/q4g64", "mlx-lm 4-bit g64 (of our bf16 MLX float export)", run_mlx_lm)
            if e["ppl"] is not None:
                e["bytes"] = weight_bytes(out)
                e["tensor_bytes"] = export_tensor_bytes(out)
            results["variants"].pop("mlx-lm/q4g64-convert", None)

    if not args.no_methods:
        results["awq"] = method_comparison(ckpt, calib, args.calib_samples, wins, record)
    results["size_projection"] = size_projection(ckpt)

    # ---- figures and goals ----
    V = results["variants"]
    goals = compute_goals(results)
    results["goals"] = goals

    for k, v in V.items():
        rows.append({"variant": k, "PPL": "not measured" if v["ppl"] is None else f"{v['ppl']:.4f}",
                     "vs float": "" if v.get("increase_pct") is None else f"{v['increase_pct']:+.3f}%",
                     "MB": "" if not v.get("bytes") else f"{v['bytes'] / 1e6:.2f}",
                     "note": v.get("error", "")[:90]})
    print(f"\nmodel: {train_info['params'] / 1e6:.2f}M params ({train_info['expert_params'] / train_info['params']:.0%} "
          f"routed experts), {train_info['steps']} steps, {train_info['train_seconds']} s; "
          f"{results['eval']['predictions']} held-out byte predictions\n")
    print(table(rows, ["variant", "PPL", "vs float", "MB", "note"]))
    print()
    for k, v in goals.items():
        print(f"{'MET   ' if v['met'] else 'MISSED'} {k}: {v['value']}")
    path = save_result("quant-quality", results, png=lambda png: plot(V, png))
    print(f"\nwrote {path} and {path.with_suffix('.png')}")


def plot(V: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k, v in V.items() if v.get("ppl") is not None]
    vals = [V[k]["ppl"] for k in keys]
    colors = ["#777" if k.endswith("float") else "#c44" if "rtn" in k else "#2a7" if "calib" in k or "gptq" in k
              else "#e90" if "awq" in k else "#36c" if "fp8" in k else "#a6c" for k in keys]
    fig, ax = plt.subplots(figsize=(12, 4.6))
    ax.bar(range(len(keys)), vals, color=colors)
    lo = min(vals)
    ax.set_ylim(lo * 0.97, max(vals) * 1.01)
    for i, k in enumerate(keys):
        inc = V[k].get("increase_pct")
        ax.text(i, vals[i], f"{vals[i]:.3f}" + ("" if inc is None else f"\n{inc:+.2f}%"), ha="center", va="bottom",
                fontsize=7)
    ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("held-out perplexity (bytes)")
    ax.set_title("Llama 4 MoE (trained on stdlib bytes): held-out PPL by quantization")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
