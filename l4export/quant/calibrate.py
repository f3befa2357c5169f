"""Layer-by-layer calibration with per-expert GPTQ, in torch (CPU, or CUDA when torch sees a GPU).

Only one decoder layer's weights are in memory at a time; the calibration activations ``X`` (one
``[T_i, H]`` tensor per sample) are carried from layer to layer:

    X = embed(ids)
    for each layer L:
        load L's weights (float32)
        pass 1, float weights: capture every quantized linear's real inputs as Hessians H = Σ x xᵀ
            q/k/v  <- input_layernorm(X)            o <- attention output
            router, shared expert <- h2 = post_attention_layernorm(X + attn)
            IMPORTANT: routed expert e (top-1) sees only the tokens routed to it, scaled:
                gate/up <- s·h2, s = sigmoid(max router logit)        (never expert(h2)·s)
                down    <- silu(G s h2) ⊙ (U s h2)                    (the real intermediate)
        GPTQ each quantized tensor on its Hessian (experts: per expert, with a layer prior)
        pass 2, quantized weights: X <- layer(X)    (the next layer calibrates on what it will see)
        free L's weights

Rare and unrouted experts: ``Ĥ_e = (H_e + α·H̄) / (n_e + α)``, where ``H̄`` is the layer's mean per-token
outer product over all routed tokens (gate/up: one shared input space) or ``mean-diag·I`` (down: each
expert's intermediate features are its own), and α = ``prior_tokens``. An expert with no tokens is
quantized against the layer prior: finite, non-zero, never NaN; no weight column is ever zeroed.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..checkpoint import Checkpoint
from ..errors import UsageError
from ..spec import LayerSpec, Llama4Spec
from .recipe import Recipe
from .schemes import AnyScheme, Fp8, QTensor, sqnr_db

log = logging.getLogger(__name__)

# observer(canonical_name, expert or -1, inputs [n, in]): sees every captured input (tests, debugging)
Observer = Callable[[str, int, Any], None]


@dataclass(frozen=True)
class CalibOptions:
    path: Path | None = None
    samples: int = 64  # at most this many samples (lines / records)
    seqlen: int = 256  # each sample truncated to this many tokens
    method: str = "gptq"  # "gptq" or "rtn" (round to nearest; statistics and report only)
    prior_tokens: float = 16.0  # α: strength of the layer prior, in tokens
    damp: float = 0.01  # GPTQ dampening, fraction of the mean Hessian diagonal
    device: str | None = None  # None: cuda if torch sees a GPU, else cpu

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seqlen < 1:
            raise UsageError(f"--calib-samples ({self.samples}) and --calib-seqlen ({self.seqlen}) must be at least 1")
        if self.method not in ("gptq", "rtn"):
            raise UsageError(f"calibration method {self.method!r} is not one of gptq, rtn")


@dataclass
class CalibResult:
    tensors: dict[str, QTensor]  # canonical name -> quantized tensor (calibrated)
    token_counts: dict[int, list[int]]  # MoE layer -> tokens routed to each expert
    stats: dict[str, dict[str, list[float]]]  # name -> weight/output SQNR (dB), RTN and calibrated, per expert
    act_scales: dict[str, np.ndarray] = field(default_factory=dict)  # fp8 static: name -> [E] or [1] input scales
    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0
    device: str = "cpu"


# ---- calibration data -----------------------------------------------------------------------------------
def read_calibration(path: str | Path, vocab_size: int, tokenizer_dir: str | Path | None = None,
                     samples: int = 64, seqlen: int = 256) -> list[np.ndarray]:
    """Token id arrays from ``.txt`` (one sample per line), ``.jsonl`` ({"text": ...} or {"input_ids": [...]})
    or ``.json`` (a list of strings or of id lists). Text is tokenized with ``tokenizer_dir/tokenizer.json``."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--calib {path}: no such file")
    try:
        raw = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"--calib {path}: not UTF-8 text (byte {err.start}); give a UTF-8 .txt, .jsonl or .json file") from None
    records: list[str | list[int]] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise UsageError(f"--calib {path} line {n}: not JSON ({err.msg}); one JSON object per line") from None
            if isinstance(obj, dict) and isinstance(obj.get("text"), str):
                records.append(obj["text"])
            elif isinstance(obj, dict) and isinstance(obj.get("input_ids"), list):
                records.append(obj["input_ids"])
            else:
                raise UsageError(f"--calib {path} line {n}: needs a string \"text\" or a list \"input_ids\" field")
    elif path.suffix == ".json":
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as err:
            raise UsageError(f"--calib {path}: not JSON ({err.msg}); give a list of strings or of token id lists") from None
        if not isinstance(obj, list) or not all(isinstance(r, (str, list)) for r in obj):
            raise UsageError(f"--calib {path}: a .json calibration file must be a list of strings or of token id lists")
        records = list(obj)
    else:
        records = [line for line in raw.splitlines() if line.strip()]
    records = [r for r in records if len(r) > 0][:samples]
    if not records:
        raise UsageError(f"--calib {path}: no calibration samples in the file; give at least one non-empty line")

    tok = None
    if any(isinstance(r, str) for r in records):
        tj = Path(tokenizer_dir) / "tokenizer.json" if tokenizer_dir else None
        if tj is None or not tj.is_file():
            raise UsageError(f"--calib {path}: text needs the checkpoint's tokenizer.json, which is missing; give token ids instead")
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tj))
    out = []
    for n, r in enumerate(records, 1):
        if isinstance(r, str):
            ids = tok.encode(r).ids
        else:
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in r):
                raise UsageError(f"--calib {path} sample {n}: token ids must be integers")
            ids = r
        ids = np.asarray(ids[:seqlen], dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise UsageError(f"--calib {path} sample {n}: token id {int(ids.max())} is outside the vocabulary (0..{vocab_size - 1})")
        if ids.size:
            out.append(ids)
    if not out:
        raise UsageError(f"--calib {path}: every sample tokenized to nothing")
    return out


# ---- Llama 4 layer maths (transformers' Llama4TextDecoderLayer, float32) --------------------------------
def _rms(x, w, eps: float):
    import torch

    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _attention_core(h, W: dict, la: LayerSpec, spec: Llama4Spec, inv_freq):
    """h [T, H] (already input_layernorm'ed) -> attention output before o_proj [T, nh*D]."""
    import torch

    t = h.shape[0]
    nh, nkv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    q = (h @ W["self_attn.q_proj.weight"].T).view(t, nh, d)  # (T, nh, D)
    k = (h @ W["self_attn.k_proj.weight"].T).view(t, nkv, d)  # (T, nkv, D)
    v = (h @ W["self_attn.v_proj.weight"].T).view(t, nkv, d)
    pos = torch.arange(t, device=h.device, dtype=torch.float32)
    if la.uses_rope:
        # IMPORTANT: complex, interleaved pairs (2i, 2i+1) ("traditional"), not rotate_half.
        ang = pos[:, None] * inv_freq[None, :]  # (T, D/2)
        cos, sin = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]

        def rot(x):
            x0, x1 = x[..., 0::2], x[..., 1::2]
            return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)

        q, k = rot(q), rot(k)
    if la.qk_norm:  # IMPORTANT: weightless per-head L2 norm, after RoPE, eps = rms_norm_eps
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + spec.rms_norm_eps)
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + spec.rms_norm_eps)
    if la.temperature_tuning:  # NoPE layers: q *= 1 + attn_scale·log1p(floor((pos+1)/floor_scale))
        temp = torch.log1p(torch.floor((pos + 1.0) / spec.floor_scale)) * spec.attn_scale + 1.0
        q = q * temp[:, None, None]
    rep = nh // nkv
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (T, nh, D)
    scores = torch.einsum("qhd,khd->hqk", q, k) * d**-0.5  # (nh, T, T)
    i = torch.arange(t, device=h.device)
    allowed = i[None, :] <= i[:, None]
    if la.chunked and spec.attention_chunk_size:
        c = spec.attention_chunk_size
        allowed = allowed & (i[None, :] // c == i[:, None] // c)
    scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", p, v).reshape(t, nh * d)


def _route(h2, W: dict):
    """Top-1 routing: (expert index [T], score s [T]) with s = sigmoid(max logit)."""
    import torch

    logits = h2 @ W["feed_forward.router.weight"].T  # (T, E)
    top, idx = logits.max(dim=-1)
    return idx, torch.sigmoid(top)


def layer_forward(x, W: dict, la: LayerSpec, spec: Llama4Spec, inv_freq, capture: Callable | None = None):
    """One decoder layer on one sample x [T, H]. ``capture(name_in_layer, expert, inputs)`` sees the input of
    every linear (expert=-1 for non-expert linears)."""
    import torch
    import torch.nn.functional as F

    cap = capture or (lambda *a: None)
    eps = spec.rms_norm_eps
    h = _rms(x, W["input_layernorm.weight"], eps)
    cap("self_attn.q_proj.weight", -1, h)
    a = _attention_core(h, W, la, spec, inv_freq)
    cap("self_attn.o_proj.weight", -1, a)
    x = x + a @ W["self_attn.o_proj.weight"].T
    h2 = _rms(x, W["post_attention_layernorm.weight"], eps)
    if not la.is_moe:
        p = "feed_forward."
        cap(p + "gate_proj.weight", -1, h2)
        m = F.silu(h2 @ W[p + "gate_proj.weight"].T) * (h2 @ W[p + "up_proj.weight"].T)
        cap(p + "down_proj.weight", -1, m)
        return x + m @ W[p + "down_proj.weight"].T
    p = "feed_forward.shared_expert."
    cap(p + "gate_proj.weight", -1, h2)
    m = F.silu(h2 @ W[p + "gate_proj.weight"].T) * (h2 @ W[p + "up_proj.weight"].T)
    cap(p + "down_proj.weight", -1, m)
    out = m @ W[p + "down_proj.weight"].T
    idx, s = _route(h2, W)
    xs = h2 * s[:, None]  # IMPORTANT: the router score scales the expert INPUT
    routed = torch.zeros_like(out)
    ex = "feed_forward.experts."
    for e in torch.unique(idx).tolist():
        rows = (idx == e).nonzero(as_tuple=True)[0]
        xe = xs[rows]
        cap(ex + "gate_proj", e, xe)
        me = F.silu(xe @ W[ex + "gate_proj"][e].T) * (xe @ W[ex + "up_proj"][e].T)
        cap(ex + "down_proj", e, me)
        routed[rows] = me @ W[ex + "down_proj"][e].T
    return x + out + routed


# ---- GPTQ -------------------------------------------------------------------------------------------------
def gptq(w: np.ndarray, hessian, scheme: AnyScheme, damp: float = 0.01) -> QTensor:
    """GPTQ (Frantar et al. 2022) over a leading batch (expert) axis: w [B, N, K], hessian [B, K, K] (torch).
    Group scales are fitted on the already-updated weights at each group's first column. Columns whose
    Hessian diagonal is 0 get a unit diagonal (plain rounding); no column is ever zeroed."""
    import torch

    dev = hessian.device
    W = torch.tensor(w, dtype=torch.float64, device=dev)
    b, n, k = W.shape
    H = hessian.to(torch.float64).clone()
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    dead = diag <= 0
    diag[dead] = 1.0
    mean = diag.mean(-1, keepdim=True)
    eye = torch.eye(k, dtype=torch.float64, device=dev)
    lam = damp
    for _ in range(6):  # raise the dampening until H is positive definite
        try:
            L = torch.linalg.cholesky(H + lam * mean[..., None] * eye)
            Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
            if torch.isfinite(Hinv).all():
                break
        except RuntimeError:
            pass
        lam *= 10
    else:  # give up on the curvature: plain rounding
        Hinv = eye.expand(b, k, k).clone()
    g = scheme.group_for(k)
    scales = np.empty((b, n, k // g), np.float32)
    zeros = None
    Q = np.empty((b, n, k), np.float32)
    for i in range(k):
        if i % g == 0:
            s, z = scheme.fit(W[:, :, i : i + g].cpu().numpy().astype(np.float32)[:, :, None, :])
            scales[:, :, i // g] = s[:, :, 0, 0]
            if z is not None:
                zeros = zeros if zeros is not None else np.empty((b, n, k // g), np.uint8)
                zeros[:, :, i // g] = z[:, :, 0, 0]
        col = W[:, :, i].cpu().numpy().astype(np.float32)
        q = scheme.snap(col[:, :, None, None], s, z)[:, :, 0, 0]
        Q[:, :, i] = q
        err = (W[:, :, i] - torch.tensor(q, dtype=torch.float64, device=dev)) / Hinv[:, i, i][:, None]
        W[:, :, i:] -= err[:, :, None] * Hinv[:, None, i, i:]
    return scheme.with_scales(Q, scales, zeros)


def output_sqnr(w: np.ndarray, wq: np.ndarray, hessian: np.ndarray) -> np.ndarray:
    """Per batch entry: 10·log10(tr(W H Wᵀ) / tr(ΔW H ΔWᵀ)), the SQNR of x·Wᵀ over the inputs behind H."""
    w, d = w.astype(np.float64), (w - wq).astype(np.float64)
    sig = np.einsum("bnk,bkl,bnl->b", w, hessian, w)
    err = np.einsum("bnk,bkl,bnl->b", d, hessian, d)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(np.where(err > 0, sig / np.where(err > 0, err, 1), np.inf))


# ---- the driver -------------------------------------------------------------------------------------------
class _Acc:
    """Σ x xᵀ and token counts for one linear (B = experts, or 1)."""

    def __init__(self, b: int, k: int, device):
        import torch

        self.h = torch.zeros(b, k, k, dtype=torch.float64, device=device)
        self.n = np.zeros(b, np.int64)
        self.amax = np.zeros(b, np.float32)

    def add(self, e: int, x) -> None:
        import torch

        xd = x.to(torch.float64)
        self.h[max(e, 0)] += xd.T @ xd
        self.n[max(e, 0)] += x.shape[0]
        self.amax[max(e, 0)] = max(self.amax[max(e, 0)], float(x.abs().max()) if x.numel() else 0.0)

    def blended(self, prior_tokens: float, shared_space: bool):
        """Per-entry normalised Hessians with the count-weighted layer prior (see the module docstring)."""
        import torch

        n = torch.tensor(self.n, dtype=torch.float64, device=self.h.device)
        total = float(n.sum())
        k = self.h.shape[-1]
        eye = torch.eye(k, dtype=torch.float64, device=self.h.device)
        if total == 0:
            prior = eye
        elif shared_space:
            prior = self.h.sum(0) / total
        else:
            live = n > 0
            per_tok = torch.diagonal(self.h[live], dim1=-2, dim2=-1).sum(-1) / n[live] / k
            prior = float(per_tok.mean()) * eye
        if float(torch.diagonal(prior).sum()) <= 0:
            prior = eye
        a = prior_tokens if self.h.shape[0] > 1 else 0.0
        if a == 0 and total == 0:
            return prior.expand_as(self.h).clone()
        return (self.h + a * prior) / (n + a).clamp_min(1e-12)[:, None, None]


def _layer_plan(recipe: Recipe, layer: int, names: list[str]) -> dict[str, AnyScheme]:
    return {n: s for n in names if (s := recipe.scheme_for(f"model.layers.{layer}.{n}")) is not None}


# Which captured input feeds which linear (q/k/v share one input; gate/up share one).
_SHARES = {"self_attn.k_proj.weight": "self_attn.q_proj.weight", "self_attn.v_proj.weight": "self_attn.q_proj.weight",
           "feed_forward.up_proj.weight": "feed_forward.gate_proj.weight",
           "feed_forward.shared_expert.up_proj.weight": "feed_forward.shared_expert.gate_proj.weight",
           "feed_forward.experts.up_proj": "feed_forward.experts.gate_proj"}


def calibrate(ckpt: Checkpoint, recipe: Recipe, options: CalibOptions, observer: Observer | None = None,
              ids: list[np.ndarray] | None = None) -> CalibResult:
    """Quantize every tensor the recipe matches, calibrated on ``options.path`` (or on ``ids``)."""
    import torch

    t0 = time.perf_counter()
    spec = ckpt.spec
    recipe.validate({n: t.shape for n, t in ckpt.tensors.items()})
    dev = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if ids is None:
        if options.path is None:
            raise UsageError("calibration needs --calib FILE")
        ids = read_calibration(options.path, spec.vocab_size, ckpt.path,
                               options.samples, options.seqlen)
    log.info("calibrating on %d samples, %d tokens, device %s", len(ids), sum(len(i) for i in ids), dev)
    embed = torch.tensor(ckpt.tensors["model.embed_tokens.weight"].load(np.float32), device=dev)
    X = [embed[torch.tensor(i, device=dev)] for i in ids]
    del embed
    inv_freq = torch.tensor(spec.inv_freq(), device=dev)
    result = CalibResult({}, {}, {}, samples=len(ids), tokens=sum(len(i) for i in ids), device=str(dev))

    for la in spec.layers:
        lazy = ckpt.layer(la.index)
        W = {n: torch.tensor(t.load(np.float32), device=dev) for n, t in lazy.items()}
        plan = _layer_plan(recipe, la.index, list(W))
        inputs_of = {n: _SHARES.get(n, n) for n in plan}
        accs: dict[str, _Acc] = {}
        for n in set(inputs_of.values()):
            shape = W[n].shape
            accs[n] = _Acc(shape[0] if len(shape) == 3 else 1, shape[-1], dev)
        if la.is_moe:
            counts = np.zeros(spec.num_experts, np.int64)

        def capture(name: str, e: int, x) -> None:
            if observer is not None:
                observer(f"model.layers.{la.index}.{name}", e, x)
            if name == "feed_forward.experts.gate_proj" and la.is_moe:
                counts[e] += x.shape[0]
            if name in accs:
                accs[name].add(e, x)

        with torch.no_grad():
            for x in X:
                layer_forward(x, W, la, spec, inv_freq, capture)
        if la.is_moe:
            result.token_counts[la.index] = counts.tolist()
            log.info("layer %d: tokens per expert %s", la.index, counts.tolist())
        Wq = dict(W)
        for n, scheme in plan.items():
            full = f"model.layers.{la.index}.{n}"
            acc = accs[inputs_of[n]]
            experts = W[n].dim() == 3
            w = W[n].cpu().numpy() if experts else W[n].cpu().numpy()[None]
            hb = acc.blended(options.prior_tokens, shared_space=not n.endswith("experts.down_proj"))
            rtn = scheme.quantize(w)
            qt = gptq(w, hb, scheme, options.damp) if options.method == "gptq" else rtn
            h_np = hb.cpu().numpy()
            wr, wc = rtn.dequantize(), qt.dequantize()
            result.stats[full] = {
                "weight_sqnr_rtn": sqnr_db(w, wr, axis=(1, 2)).tolist(),
                "weight_sqnr_calibrated": sqnr_db(w, wc, axis=(1, 2)).tolist(),
                "output_sqnr_rtn": output_sqnr(w, wr, h_np).tolist(),
                "output_sqnr_calibrated": output_sqnr(w, wc, h_np).tolist(),
                "tokens": acc.n.tolist(),
            }
            if not experts:
                qt = type(qt)(qt.scheme, qt.q[0], qt.scale[0], None if qt.zero is None else qt.zero[0])
            if isinstance(scheme, Fp8) and scheme.activation == "static":
                amax = acc.amax.copy()
                amax[acc.n == 0] = amax.max() if amax.max() > 0 else 1.0  # layer max for unrouted experts; never 0
                amax[amax <= 0] = amax.max() if amax.max() > 0 else 1.0
                result.act_scales[full] = (amax / 448.0).astype(np.float32)
            result.tensors[full] = qt
            Wq[n] = torch.tensor(qt.dequantize(), device=dev)
            lr, lc = np.mean(result.stats[full]["output_sqnr_rtn"]), np.mean(result.stats[full]["output_sqnr_calibrated"])
            log.info("%s %s: output SQNR %.2f dB (RTN) -> %.2f dB (%s)", full, scheme.name, lr, lc, options.method)
        with torch.no_grad():
            X = [layer_forward(x, Wq, la, spec, inv_freq) for x in X]
        del W, Wq, accs

    _global_tensors(ckpt, recipe, X, result, options, dev)
    result.seconds = time.perf_counter() - t0
    log.info("calibration done in %.1f s", result.seconds)
    return result


def _global_tensors(ckpt: Checkpoint, recipe: Recipe, X: list, result: CalibResult, options: CalibOptions, dev) -> None:
    """lm_head (calibrated on the final normed states) and the embedding (RTN: its 'input' is a lookup)."""
    import torch

    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        scheme = recipe.scheme_for(name)
        if scheme is None or name not in ckpt.tensors:
            continue
        w = ckpt.tensors[name].load(np.float32)[None]
        rtn = scheme.quantize(w)
        qt = rtn
        if name == "lm_head.weight" and options.method == "gptq":
            acc = _Acc(1, w.shape[-1], dev)
            norm = torch.tensor(ckpt.tensors["model.norm.weight"].load(np.float32), device=dev)
            for x in X:
                acc.add(-1, _rms(x, norm, ckpt.spec.rms_norm_eps))
            qt = gptq(w, acc.blended(0.0, True), scheme, options.damp)
        result.tensors[name] = type(qt)(qt.scheme, qt.q[0], qt.scale[0], None if qt.zero is None else qt.zero[0])
        result.stats[name] = {"weight_sqnr_rtn": sqnr_db(w, rtn.dequantize(), axis=(1, 2)).tolist(),
                              "weight_sqnr_calibrated": sqnr_db(w, qt.dequantize(), axis=(1, 2)).tolist()}


def quantize_rtn(name: str, w: np.ndarray, recipe: Recipe) -> QTensor | None:
    """Round-to-nearest quantization of one canonical tensor (no calibration); None if the recipe keeps it float."""
    scheme = recipe.scheme_for(name)
    return None if scheme is None else scheme.quantize(w)


__all__ = ["CalibOptions", "CalibResult", "calibrate", "gptq", "layer_forward", "quantize_rtn", "read_calibration",
           "output_sqnr"]
