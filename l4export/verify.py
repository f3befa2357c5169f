"""``l4export verify``: an export's logits and greedy tokens against transformers (float32, eager).

Runtime-agnostic: the export is opened with ``load_runtime`` (ONNX, MLX, ...), so every format is held to the
same prompts, metrics and thresholds. Per prompt, both a full forward and token-by-token decoding through the
KV cache are compared with one reference forward:

    rel      max|Δ| / max|ref|          (the float32 gate)
    mean     mean|Δ|
    cosine   minimum over tokens of cos(ref_t, export_t)
    kl       mean over tokens of KL(softmax ref || softmax export)   (the reduced-precision gate)
    top1     fraction of tokens whose argmax agrees
    greedy   leading greedy tokens equal to transformers' greedy generation

Router near-ties: the reference records each token's smallest top-1/top-2 router margin over the MoE layers (for
the prompt and its greedy continuation). From the first token whose margin is below the dtype's bound (fp32 1e-4,
fp16 1e-2, bf16 5e-2), the export may legitimately pick the other expert: those tokens are reported (position,
layer, margin), not gated; everything before is judged as usual, and a run where no token at all can be judged fails.

Quantized exports (``tie_moved``): the reference is run a second time with the plan's weights rounded by each scheme
(round to nearest; a calibrated export rounds differently but by as much), and a token is a near-tie where, in some
MoE layer, the rounding takes at least 1/``tie_moved`` of the lead its chosen experts have over the first one left out
(``tie_moved`` = 2: another error as large, e.g. the ONNX fp8 graph's activation rounding, which the twin does not
model, or a calibrated rounding, could flip the choice). The same rule then applies from that token on.

Default prompts have 1, chunk-1, chunk+1 and 3*chunk tokens: they cross attention-chunk boundaries both in
prefill and while decoding. With ``--image`` (exports with the vision path), prompts with images are added: each
image alone, and all of them in one prompt, laid out by the export's processor (l4export.image); the reference is
then transformers' Llama4ForConditionalGeneration fed the same pixel_values, and the image features are compared too.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import numpy as np

from .errors import UsageError
from .folder import ExportInfo
from .spec import Llama4Spec, load_spec
from .verify_reference import Reference, first_tie, twin_prompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Threshold:
    rel: float | None = None  # max|Δ| / max|ref|
    kl: float | None = None  # mean KL(ref || export) per token
    greedy_all: bool = False  # every greedy token must equal the reference's
    top1: float | None = None  # top-1 agreement over all prompts' tokens (full forward), at least this
    tie: float | None = None  # a router top-1/top-2 margin below this is a near-tie: later tokens are not gated
    # quantized: a token whose router lead the export's weight rounding shrinks by at least 1/tie_moved of itself is a
    # near-tie (measured per token and layer: the reference again with the export's rounded weights)
    tie_moved: float | None = None

    def describe(self) -> str:
        parts = [f"rel<={self.rel:g}" if self.rel is not None else "", f"kl<={self.kl:g}" if self.kl is not None else "",
                 f"top1>={self.top1:g} overall" if self.top1 is not None else "",
                 "greedy all equal" if self.greedy_all else ""]
        return ", ".join(p for p in parts if p)


# Keyed by the export's quantization name if it has one, else by its compute dtype.
THRESHOLDS: dict[str, Threshold] = {
    # tie: the router margin below which the export's dtype may legitimately pick the other expert (fp32 logits agree
    # to ~1e-6 relative, so margins of ~1e-5 can flip; 10x that. fp16 and bf16: their rounding, 10x).
    "float32": Threshold(rel=1e-4, greedy_all=True, tie=1e-4),
    "float16": Threshold(kl=1e-3, tie=1e-2),
    "bfloat16": Threshold(kl=1e-2, tie=5e-2),
    # Quantized exports (greedy tokens may differ). Measured on the tiny test models, ONNX CPU, RTN, per prompt
    # (tests/test_onnx_quant.py): int4 preset KL 1.1e-3..6.0e-3, top-1 0.68 (Scout, flat random logits) / 0.93
    # (Maverick) over all tokens; fp8 preset KL 2e-5..2.3e-4, top-1 0.98. Gates ~3-4x above the worst KL seen.
    "int4": Threshold(kl=2e-2, top1=0.5),
    # int8 preset (2026-12-07, same models and way, groups of 64; groups of 32 since, lower on the benchmark model):
    # KL 3.2e-5..2.8e-4, top-1 0.917 over all tokens
    "int8": Threshold(kl=1e-3, top1=0.8),
    # Below 4 bits (the export's lowest width; mixed exports by theirs), measured the same way on the tiny quant
    # models (qscout, qmaverick, qtop2; ONNX and MLX; 2026-12-07): experts int2 g32 + int4 attention KL 4.6e-3..1.0e-2,
    # mixed:3.0-4.5 with some int2 KL 5e-4..2.2e-2, overall top-1 0.44-0.61; int2 experts + int3 down + int5
    # attention (MLX) KL 1.1e-3..4.5e-3. Gates ~3x above the worst KL seen.
    "int3": Threshold(kl=2e-2, top1=0.4),
    "int2": Threshold(kl=6e-2, top1=0.3),
    # fp8's rounding moves router logits by up to ~4e-2 on the tiny models, where 10 % of margins are below 2e-2: no
    # global bound both covers that and leaves tokens to judge, so its near-ties are measured per token (tie_moved).
    "fp8": Threshold(kl=1e-3, top1=0.9, tie_moved=2.0),
}


def threshold_for(info: ExportInfo) -> tuple[str, Threshold]:
    """The gate of an export: by its lowest weight width (l4export.json's quant.placement: int2, int3, int4 for 4-6
    bits, int8, fp8), else by its compute dtype (a mixed export that placed nothing too). Exports without a
    placement (older ones) by their recipe's name."""
    quant = info.quant
    if quant is not None and quant.allocation is not None and not quant.placement:
        quant = None  # a budget that placed nothing (no tensor of this model fits a scheme): judged as float
    if quant is not None and quant.placement:
        key = width_key(quant.schemes.values())
        if quant.allocation and key in ("int4", "int8"):
            # A mixed export at 4 bits and above still puts 4 bits where the int4 preset keeps 8 (attention,
            # lm_head, the shared expert): the shape fuzz (2026-12-07, mixed budgets halfway between a config's
            # smallest and largest form) measured KL up to 1.5e-2 and overall top-1 0.46 on a random flat model, past
            # the preset's gate and within int3's. The rounded twin (KL <= 1e-3) still judges its lowering. (The int8
            # row is the int8 preset's, measured on the test models only: mixed exports at 8 bits take int3's too.)
            key = "int3"
        return key, THRESHOLDS[key]
    if quant is not None:
        key = next((k for k in THRESHOLDS if k in quant.recipe.lower() and k not in ("float32", "float16", "bfloat16")), None)
        if key is None:
            raise UsageError(f"verify has no threshold for quantization {quant.recipe!r}; add a row to l4export.verify.THRESHOLDS")
        return key, THRESHOLDS[key]
    dtype = info.dtype
    if dtype not in THRESHOLDS:
        raise UsageError(f"verify has no threshold for dtype {dtype!r}; add a row to l4export.verify.THRESHOLDS")
    return dtype, THRESHOLDS[dtype]


def width_key(records) -> str:
    """The THRESHOLDS row of the lowest width among scheme records (kind: int2..int8, per-expert, fp8, mxfp8)."""
    bits = sorted([int(r["kind"][3:]) for r in records if r["kind"].startswith("int")]
                  + [b for r in records if r["kind"] == "per-expert" for b in r["bits"]])
    if not bits:
        return "fp8"
    return {2: "int2", 3: "int3", 4: "int4", 5: "int4", 6: "int4", 8: "int8"}[bits[0]]


# ---- metrics --------------------------------------------------------------------------------------------


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def compare(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Metrics of export logits ``got`` [T, V] against reference logits ``ref`` [T, V]."""
    if ref.shape != got.shape:
        raise UsageError(f"export logits have shape {list(got.shape)}, the reference's {list(ref.shape)}; vocab sizes differ")
    d = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    lp, lq = _log_softmax(ref), _log_softmax(got)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    num = (ref.astype(np.float64) * got).sum(axis=-1)
    den = np.linalg.norm(ref.astype(np.float64), axis=-1) * np.linalg.norm(got.astype(np.float64), axis=-1)
    cos = num / np.maximum(den, 1e-30)
    finite = bool(np.isfinite(got).all())
    return {
        "rel": float(d.max() / max(float(np.abs(ref).max()), 1e-30)) if finite else float("inf"),
        "mean_abs": float(d.mean()) if finite else float("inf"),
        "cosine": float(cos.min()) if finite else 0.0,
        "kl": float(max(kl.mean(), 0.0)) if finite else float("inf"),
        "kl_max": float(max(kl.max(), 0.0)) if finite else float("inf"),
        "top1": float((ref.argmax(-1) == got.argmax(-1)).mean()),
    }


# ---- report ---------------------------------------------------------------------------------------------


@dataclass
class PromptResult:
    name: str
    tokens: int
    full: dict[str, float]
    incremental: dict[str, float]
    greedy_match: int
    greedy_total: int
    failures: list[str] = field(default_factory=list)
    kv: dict[str, float] | None = None  # --kv-dtype: the quantized cache's logits against the float cache's
    twin: dict[str, float] | None = None  # quantized, round to nearest: against transformers with the same rounded weights
    images: int = 0
    image_features_rel: float | None = None  # max|Δ| / max|ref| of the export's image features (prompts with images)
    tie: dict | None = None  # the first router near-tie: {"position", "layer", "margin"}; tokens from there not gated
    judged: int | None = None  # prompt tokens gated (all of them without a near-tie)
    top1_all: float | None = None  # full forward's top-1 agreement over every prompt token, near-ties included

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class Report:
    export: str
    reference: str
    format: str
    dtype: str
    quantization: str | None
    threshold_key: str
    threshold: Threshold
    results: list[PromptResult] = field(default_factory=list)
    kv_dtype: str | None = None

    failures: list[str] = field(default_factory=list)  # run-level (overall top-1)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results) and not self.failures

    def table(self) -> str:
        head = (f"verify {self.export} ({self.format}, {self.dtype}"
                f"{', ' + self.quantization if self.quantization else ''}) vs {self.reference}\n"
                f"thresholds [{self.threshold_key}]: {self.threshold.describe()}\n")
        cols = f"{'prompt':<14}{'tokens':>7} {'mode':<6}{'rel':>11}{'mean|Δ|':>11}{'cosine':>11}{'KL':>11}{'top1':>7}{'greedy':>9}  result"
        if any(r.twin is not None for r in self.results):
            head += f"rows 'twin': against transformers with the export's own rounded weights, KL <= {TWIN_KL:g}\n"
        if self.kv_dtype:
            head += f"KV cache {self.kv_dtype}: rows 'kv' compare with the float cache, KL <= {KV_THRESHOLDS[self.kv_dtype]:g}\n"
        lines = [head + cols, "-" * len(cols)]
        for r in self.results:
            for mode, m in (("full", r.full), ("incr", r.incremental)):
                greedy = f"{r.greedy_match}/{r.greedy_total}" if mode == "full" else ""
                ok = ("PASS" if r.passed else "FAIL") if mode == "full" else ""
                lines.append(f"{r.name:<14}{r.tokens:>7} {mode:<6}{m['rel']:>11.3e}{m['mean_abs']:>11.3e}{m['cosine']:>11.7f}"
                             f"{m['kl']:>11.3e}{m['top1']:>7.3f}{greedy:>9}  {ok}")
            if r.tie is not None:
                lines.append(f"{'':<14}{'':>7} {'tie':<6} router near-tie at token {r.tie['position']} (layer "
                             f"{r.tie['layer']}, margin {r.tie['margin']:.1e}"
                             f"{', rounding moves it ' + format(r.tie['moved'], '.1e') if 'moved' in r.tie else ''}): "
                             f"{r.judged} prompt tokens and "
                             f"{r.greedy_total} greedy tokens judged, the rest reported only")
            if r.image_features_rel is not None:
                lines.append(f"{'':<14}{'':>7} {'image':<6}{r.image_features_rel:>11.3e}  (image features of "
                             f"{r.images} image(s) vs transformers)")
            if r.twin is not None:
                lines.append(f"{'':<14}{'':>7} {'twin':<6}{r.twin['rel']:>11.3e}{r.twin['mean_abs']:>11.3e}"
                             f"{r.twin['cosine']:>11.7f}{r.twin['kl']:>11.3e}{r.twin['top1']:>7.3f}")
            if r.kv is not None:
                lines.append(f"{'':<14}{'':>7} {'kv':<6}{r.kv['rel']:>11.3e}{r.kv['mean_abs']:>11.3e}{r.kv['cosine']:>11.7f}"
                             f"{r.kv['kl']:>11.3e}{r.kv['top1']:>7.3f}")
            for f in r.failures:
                lines.append(f"    ! {f}")
        for f in self.failures:
            lines.append(f"! {f}")
        lines.append(f"{'PASSED' if self.passed else 'FAILED'}: {sum(r.passed for r in self.results)}/{len(self.results)} prompts")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_junit(self) -> str:
        fails = sum(not r.passed for r in self.results) + bool(self.failures)
        suite = f"l4export.verify.{self.format}.{self.threshold_key}"
        out = ['<?xml version="1.0" encoding="UTF-8"?>',
               f'<testsuite name={quoteattr(suite)} tests="{len(self.results) + bool(self.failures)}" failures="{fails}" errors="0">']
        for r in self.results:
            out.append(f'  <testcase classname={quoteattr(suite)} name={quoteattr(f"{r.name} ({r.tokens} tokens)")}>')
            if r.failures:
                msg = "; ".join(r.failures)
                out.append(f"    <failure message={quoteattr(msg)}>{escape(msg)}</failure>")
            out.append(f"    <system-out>{escape(json.dumps({'full': r.full, 'incremental': r.incremental, 'greedy': [r.greedy_match, r.greedy_total]}))}</system-out>")
            out.append("  </testcase>")
        if self.failures:  # run-level checks (overall top-1) as one more failing case
            msg = "; ".join(self.failures)
            out.append(f'  <testcase classname={quoteattr(suite)} name="overall"><failure message={quoteattr(msg)}>'
                       f'{escape(msg)}</failure></testcase>')
        out.append("</testsuite>")
        return "\n".join(out) + "\n"


# ---- prompts --------------------------------------------------------------------------------------------


def default_prompts(spec: Llama4Spec, seed: int = 0) -> list[tuple[str, list[int]]]:
    """Token-id prompts of 1, chunk-1, chunk+1 and 3*chunk tokens (ids avoid the first few specials)."""
    chunk = spec.attention_chunk_size or 8192
    rng = np.random.default_rng(seed)
    lo, hi = min(4, spec.vocab_size - 1), spec.vocab_size
    lengths = [("one", 1), ("chunk-1", chunk - 1), ("chunk+1", chunk + 1), ("3xchunk", 3 * chunk)]
    prompts = []
    for name, n in lengths:
        ids = rng.integers(lo, hi, max(n, 1)).tolist()
        if spec.bos_token_id is not None:
            ids[0] = int(spec.bos_token_id)
        prompts.append((name, ids))
    return prompts


_IDS = re.compile(r"^\s*[+-]?\d+(\s*,\s*[+-]?\d+)*\s*,?\s*$")  # signed: a negative id is refused, not read as text


def read_prompts(path: Path, runtime: Any) -> list[tuple[str, list[int]]]:
    """One prompt per non-empty line: comma-separated token ids, or text (encoded with the export's tokenizer)."""
    if not Path(path).is_file():
        raise UsageError(f"{path}: --prompts file not found")
    prompts = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: --prompts is not UTF-8 text (one prompt per line: text, or comma-separated ids)") from None
    vocab = runtime.spec.vocab_size
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        ids = [int(t) for t in line.replace(",", " ").split()] if _IDS.match(line) else runtime.encode(line)
        bad = [i for i in ids if i < 0 or i >= vocab]
        if bad:
            raise UsageError(f"{path}: prompt {len(prompts) + 1} (line {n}) has token id {bad[0]}, outside the "
                             f"vocabulary 0..{vocab - 1}; use ids in that range")
        if not ids:
            raise UsageError(f"{path}:{n}: the prompt encodes to no tokens")
        prompts.append((f"line{n}", ids))
    if not prompts:
        raise UsageError(f"{path}: no prompts (one per line: text, or comma-separated token ids)")
    return prompts


@dataclass
class Prompt:
    name: str
    ids: list[int]
    images: int = 0
    pixel_values: np.ndarray | None = None  # every image's tiles, in prompt order (the reference's input)
    features: np.ndarray | None = None  # the export's image features for the same tiles


IMAGE_PROMPT = "Describe the image."


def image_prompts(runtime: Any, images: list[Path], text: str = IMAGE_PROMPT) -> list[Prompt]:
    """Each image alone, then (for several) all of them, before ``text`` (the export's processor lays them out)."""
    sets = [[im] for im in images] + ([list(images)] if len(images) > 1 else [])
    out = []
    for n, group in enumerate(sets, 1):
        ids, features = runtime.prompt_ids(text, group)
        pixels = np.concatenate([p.pixel_values for p in runtime.process_images(group)])
        out.append(Prompt(f"image{n}" if len(group) == 1 else "all-images", ids, len(group), pixels, features))
    return out


# ---- the check ------------------------------------------------------------------------------------------

_SAME_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                "intermediate_size_mlp", "num_experts", "top_k", "attention_chunk_size", "use_qk_norm", "rope_theta",
                "rope_scaling", "layers")


def check_same_model(export: Llama4Spec, reference: Llama4Spec, export_path: Path, reference_path: Path) -> None:
    for f in _SAME_FIELDS:
        a, b = getattr(export, f), getattr(reference, f)
        if a != b:
            b_, a_ = (f"{len(b)} layers differing", f"{len(a)} layers") if f == "layers" else (repr(b), repr(a))
            raise UsageError(
                f"{reference_path}: is not the model exported to {export_path} ({f} {b_} vs the export's {a_}); "
                "pass the checkpoint the export was converted from"
            )


# A quantized export rounded to nearest is also compared with transformers on the same rounded weights (its "twin",
# Reference.round_like): that isolates the lowering (packing, scales, zero points, kernels) from the width's loss.
# Measured 2026-12-07 on the tiny quant models: MLX at every width (2-8 bits) rel <= 7e-7; ONNX Runtime CPU at
# accuracy_level 0 rel <= 4e-3 (2-bit QMoE quantizes activations), KL <= 7e-7; at accuracy_level 4 (int8
# activations) KL <= 2.4e-4. A damaged int2 export (one layer's zero points shifted) is KL ~2e-2 from its twin.
TWIN_KL = 1e-3


def twin_tie(info: ExportInfo) -> float:
    """The router margin below which the export's kernels may pick another expert than its twin: int8 activations
    (ONNX accuracy_level 4) or static FP8 activations round the router's input by ~1 %; float kernels as float32."""
    records = info.quant.schemes.values() if info.quant is not None else ()
    rounded = any(r.get("accuracy_level") or r.get("activation") == "static" for r in records)
    return 2e-2 if rounded else THRESHOLDS["float32"].tie

# A quantized KV cache (--kv-dtype) is judged by KL of its logits against the same export with the float cache.
KV_THRESHOLDS = {"int8": 1e-3, "fp8": 5e-3}


def kv_threshold(thr: Threshold, kv_dtype: str) -> Threshold:
    """The reference thresholds with a quantized cache: KL (at least the cache's own gate) instead of rel/greedy."""
    return replace(thr, rel=None, greedy_all=False, kl=max(thr.kl or 0.0, KV_THRESHOLDS[kv_dtype]))


def _check_prompt(p: Prompt, rt: Any, ref: Reference, thr: Threshold, greedy_tokens: int,
                  twin: bool = False) -> PromptResult:
    """One prompt: full forward, token by token, greedy tokens (and image features) against the reference."""
    log.info("verify: prompt %s (%d tokens, %d images)", p.name, len(p.ids), p.images)
    r, feats = ref.logits(p), p.features
    want = ref.greedy(p, greedy_tokens) if greedy_tokens > 0 else []
    tie = first_tie(ref, p, want, thr.tie, thr.tie_moved)
    # A near-tie at token k: tokens from k on may route differently in the export and legitimately differ; they are
    # reported, not gated. Greedy token j comes from position len(ids) - 1 + j.
    n = len(p.ids) if tie is None else min(tie["position"], len(p.ids))
    judged_greedy = len(want) if tie is None else max(0, min(len(want), tie["position"] - len(p.ids) + 1))
    gated = slice(0, n if n else len(p.ids))
    logits = rt.logits(p.ids, feats)
    full = compare(r[gated], logits[gated])
    incr = compare(r[gated], rt.logits_incremental(p.ids, features=feats)[gated])
    got = list(rt.generate(p.ids, greedy_tokens, stop=[], features=feats)) if greedy_tokens > 0 else []
    match = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    res = PromptResult(p.name, len(p.ids), full, incr, min(match, judged_greedy), judged_greedy, images=p.images,
                       tie=tie, judged=n, top1_all=float((r.argmax(-1) == logits.argmax(-1)).mean()))
    if p.pixel_values is not None:
        rf = ref.vision.image_features(p.pixel_values)
        res.image_features_rel = float(np.abs(rf - feats).max() / max(float(np.abs(rf).max()), 1e-30))
        if thr.rel is not None and not res.image_features_rel <= thr.rel:
            res.failures.append(f"image features: rel {res.image_features_rel:.3e} > {thr.rel:g}")
    for mode, m in (("full", full), ("incremental", incr)) if n else ():
        if thr.rel is not None and not m["rel"] <= thr.rel:
            res.failures.append(f"{mode}: rel {m['rel']:.3e} > {thr.rel:g}")
        if thr.kl is not None and not m["kl"] <= thr.kl:
            res.failures.append(f"{mode}: KL {m['kl']:.3e} > {thr.kl:g}")
    if twin:
        # the twin shares the export's weights; only the kernels' arithmetic differs (int8 activations at
        # accuracy_level 4), which can flip a router near-tie of the twin's own: gated up to the first one
        margins, _ = ref.rounded.margins(p.ids, p)
        near = np.flatnonzero(margins < twin_tie(rt.info))
        t = min(n or len(p.ids), int(near[0]) if near.size else len(p.ids))
        res.twin = compare(ref.rounded.logits(p)[:t], logits[:t]) if t else None
    if res.twin is not None:
        if not res.twin["kl"] <= TWIN_KL:
            res.failures.append(f"vs transformers with the export's own rounded weights: KL {res.twin['kl']:.3e} > "
                                f"{TWIN_KL:g} (the lowering is wrong, not the width lossy)")
    if thr.greedy_all and match < judged_greedy:
        res.failures.append(f"greedy: {match}/{judged_greedy} tokens equal (first difference at token {match})")
    return res


def verify(export: str | Path, reference: str | Path, prompts: Path | None = None, provider: str | None = None,
           greedy_tokens: int = 32, kv_dtype: str | None = None, prefill_step: int | None = None,
           images: list[Path] | None = None) -> Report:
    """Compare an export with transformers on ``reference``; the returned Report says whether it passed.

    ``kv_dtype``: run with a quantized KV cache and also report KL against the float cache (gate KV_THRESHOLDS).
    ``images``: also prompts with these images (each alone, then all together)."""
    from .runtimes import load_runtime

    export, reference = Path(export), Path(reference)
    if kv_dtype is not None and kv_dtype not in KV_THRESHOLDS:
        raise UsageError(f"--kv-dtype {kv_dtype!r} is not one of {', '.join(KV_THRESHOLDS)}")
    rt = load_runtime(export, provider=provider, kv_dtype=kv_dtype, prefill_step=prefill_step)
    float_cache = None if kv_dtype is None else load_runtime(export, provider=provider, prefill_step=prefill_step)
    check_same_model(rt.spec, load_spec(reference), export, reference)
    key, thr = threshold_for(rt.info)
    if kv_dtype is not None:
        key, thr = f"{key}+kv-{kv_dtype}", kv_threshold(thr, kv_dtype)
    plist = [Prompt(n, ids) for n, ids in (read_prompts(prompts, rt) if prompts is not None else default_prompts(rt.spec))]
    plist += image_prompts(rt, list(images)) if images else []
    ref = Reference(reference, bool(images))
    if rt.info.quant is not None and (thr.tie_moved is not None or not rt.info.quant.calibrated):
        ref.round_like(reference, rt.info)
    twin = ref.rounded is not None and not rt.info.quant.calibrated  # gate the lowering against the rounded twin
    report = Report(str(export), str(reference), rt.info.format, rt.info.dtype, rt.info.quantization, key, thr,
                    kv_dtype=kv_dtype)
    for p in plist:
        res = _check_prompt(p, rt, ref, thr, greedy_tokens, twin)
        if float_cache is not None:
            res.kv = compare(float_cache.logits(p.ids, p.features), rt.logits(p.ids, p.features))
            if not res.kv["kl"] <= KV_THRESHOLDS[kv_dtype]:
                res.failures.append(f"kv {kv_dtype}: KL vs the float cache {res.kv['kl']:.3e} > {KV_THRESHOLDS[kv_dtype]:g}")
        report.results.append(res)
    if report.results and not any((r.judged or 0) + r.greedy_total for r in report.results):
        report.failures.append("no token could be judged: every prompt has a router near-tie at its first token; "
                               "pass other prompts (--prompts)")  # a near-tie never hides a fault by hiding everything
    if twin and report.results and all(r.twin is None for r in report.results):  # a near-tie at every first token
        length = min((rt.spec.attention_chunk_size or 63) + 1, 64, rt.spec.max_position_embeddings - greedy_tokens)
        ids = twin_prompt(ref, rt.spec.vocab_size, max(length, 1), twin_tie(rt.info))
        if ids is None:
            report.failures.append("the rounded twin judged no prompt: every prompt, and 8 drawn ones, start with a "
                                   "router near-tie of the rounded weights; pass other prompts (--prompts)")
        else:
            report.results.append(_check_prompt(Prompt("twin", ids), rt, ref, thr, greedy_tokens, twin))
    if thr.top1 is not None and report.results:
        n = sum(r.tokens for r in report.results)
        agree = sum(r.top1_all * r.tokens for r in report.results) / n  # a distribution check: every token counts
        if not agree >= thr.top1:
            report.failures.append(f"top1: {agree:.3f} of {n} tokens agree with the reference < {thr.top1:g}")
    return report
