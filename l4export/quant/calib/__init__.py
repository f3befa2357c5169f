"""Layer-by-layer calibration with per-expert GPTQ, in torch (CPU, or CUDA when torch sees a GPU).

Only one decoder layer's non-expert weights and one batch of its routed experts are in memory at a time; the
calibration activations ``X`` (one ``[T_i, H]`` tensor per sample) are carried from layer to layer:

    X = embed(ids)
    for each layer L:
        load L's non-expert weights (float32)
        pass 1, float weights: capture every non-expert linear's real inputs as Hessians H = Σ x xᵀ
            q/k/v  <- input_layernorm(X)            o <- attention output
            router, shared expert <- h2 = post_attention_layernorm(X + attn)
            keep h2 and the top-1 routing (expert, score) of every token
        GPTQ the non-expert tensors; pass 2 (quantized) up to the router: X + attn + shared, h2', routing'
        for each batch of B routed experts (B from ``expert_batch_bytes``; Maverick: 1):
            load the batch's gate/up/down (``LazyTensor.load(experts=slice)``)
            IMPORTANT: routed expert e (top-1) sees only the tokens routed to it, scaled:
                gate/up <- s·h2, s = sigmoid(max router logit)        (never expert(h2)·s)
                down    <- silu(G s h2) ⊙ (U s h2)                    (the real intermediate)
            GPTQ the batch (vectorised over its experts, with the layer prior), spill it to disk
            add the batch's quantized output to the pass-2 tokens routed to it
        X <- pass 2's output    (the next layer calibrates on what it will see)

Rare and unrouted experts: ``Ĥ_e = (H_e + α·H̄) / (n_e + α)``, where ``H̄`` is the layer's mean per-token
outer product over all routed tokens (gate/up: one shared input space) or ``mean-diag·I`` (down: each
expert's intermediate features are its own), and α = ``prior_tokens``. An expert with no tokens is
quantized against the layer prior: finite, non-zero, never NaN; no weight column is ever zeroed. Neither
prior needs per-expert stacks: gate/up's is one [H, H] sum over all routed tokens; down's needs each expert's
tr(H_e), a first pass over the batches with gate/up only.

Peak memory therefore does not grow with the number of experts: one layer's activations, its non-expert
weights and one expert batch. Calibrated tensors go to disk as they are made (``SpilledTensors``), so
``CalibResult.tensors`` is a mapping over memory-mapped files, not ~1 byte per weight of RAM.

This module is the driver. Its parts: the layer maths in torch (``l4export/torch_llama4.py``), GPTQ (``gptq.py``),
the on-disk store (``spill.py``); the calibration file is read by ``calib_data.read_calibration``, before this runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ...checkpoint import Checkpoint
from ...distributed import LocalWorkers
from ...errors import UsageError
from ...heap import ACTIVATIONS, WEIGHTS, give_back, mapped_from
from ...spec import LayerSpec
from ...torch_llama4 import RowBuffer, attention_block, expert_hidden, mlp, rms, route, routed_inputs, times_t
from .. import tiles
from ..activations import ACTIVATION_FILES, Routed, Samples
from ..gptq import F64_MAX_K, factored, gptq, one_thread, output_sqnr, sampled_rows, working_dtype
from ..recipe import Recipe
from ..schemes import AnyScheme, Fp8, QTensor, assembled, db
from ..spill import ArrayFile, Part, SpilledTensors, save_part

log = logging.getLogger(__name__)

# observer(canonical_name, expert or -1, inputs [n, in]): sees every captured input (tests, debugging)
Observer = Callable[[str, int, Any], None]


@dataclass(frozen=True)
class CalibOptions:
    path: Path | None = None  # the calibration file (--calib), for read_calibration; calibrate() takes ids
    samples: int = 64  # at most this many samples (lines / records)
    seqlen: int = 256  # each sample truncated to this many tokens
    method: str = "gptq"  # "gptq" or "rtn" (round to nearest; statistics and report only)
    prior_tokens: float = 16.0  # α: strength of the layer prior, in tokens
    damp: float = 0.01  # GPTQ dampening, fraction of the mean Hessian diagonal
    device: str | None = None  # None: cuda if torch sees a GPU, else cpu
    expert_batch_bytes: int = 1 << 30  # routed experts calibrated at once: their weights, Hessians and GPTQ work
    spill_dir: Path | None = None  # parent of the temporary folder calibrated tensors are spilled to (None: $TMPDIR)

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seqlen < 1:
            raise UsageError(f"--calib-samples ({self.samples}) and --calib-seqlen ({self.seqlen}) must be at least 1")
        if self.expert_batch_bytes < 1:
            raise UsageError(f"expert_batch_bytes ({self.expert_batch_bytes}) must be positive")
        if self.method not in ("gptq", "rtn"):
            raise UsageError(f"calibration method {self.method!r} is not one of gptq, rtn")


@dataclass
class CalibResult:
    tensors: Mapping[str, QTensor]  # canonical name -> calibrated tensor, memory-mapped from disk (SpilledTensors)
    token_counts: dict[int, list[int]]  # MoE layer -> tokens routed to each expert
    stats: dict[str, dict[str, list[float]]]  # name -> weight/output SQNR (dB), RTN and calibrated, per expert
    act_scales: dict[str, np.ndarray] = field(default_factory=dict)  # fp8 static: name -> [E] or [1] input scales
    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0
    device: str = "cpu"

    def close(self) -> None:
        """Remove the spilled tensors' folder now (it also goes when this result is garbage collected)."""
        if isinstance(self.tensors, SpilledTensors):
            self.tensors.close()


def spill_next_to(options: "CalibOptions", out: Path) -> "CalibOptions":
    """``options`` spilling into ``out`` (an export's temporary folder) unless a spill folder was chosen: the
    spilled codes (one byte per weight) then sit on the output's disk, not in a possibly RAM-backed $TMPDIR."""
    return options if options.spill_dir is not None else replace(options, spill_dir=Path(out))


def expert_bytes(hidden: int, inter: int) -> int:
    """Estimated peak bytes one routed expert adds to an expert batch (``run_expert_batch``).

    The Hessians, gate/up [H, H] and down [I, I] in GPTQ's working dtype (``working_dtype``), held through the batch
    (GPTQ makes its H⁻¹ factor in their memory), and the larger of pass 1 (gate and up as stored, at most float32:
    2·I·H·4) and GPTQ of one projection (its float32 weight with the statistics' reread, 2·I·H·4). Scout/Maverick
    (H 5120, I 8192, float32 beyond K 4096): ~0.7 GB (an estimate for batch sizing; measured: docs/scale.md)."""
    size = lambda k: k * k * (8 if k <= F64_MAX_K else 4)  # noqa: E731
    return size(hidden) + size(inter) + 8 * inter * hidden


def expert_batch_size(hidden: int, inter: int, budget_bytes: int, num_experts: int) -> int:
    """How many routed experts fit ``budget_bytes`` at once: at least 1 (Maverick at 1 GiB), at most all."""
    return max(1, min(num_experts, budget_bytes // expert_bytes(hidden, inter)))


# ---- Hessians and the layer prior ---------------------------------------------------------------------------
Prior = Any  # a [K, K] tensor, or a float c standing for c·I (never made: at I = 8192 one is 0.27-0.54 GB)


class _Acc:
    """Σ x xᵀ and token counts for one linear: experts ``offset .. offset + b - 1`` of a batch, or one (b = 1), in
    GPTQ's working dtype for this input width."""

    def __init__(self, b: int, k: int, device, offset: int = 0):
        import torch

        self.h = torch.zeros(b, k, k, dtype=working_dtype(k), device=device)
        self.n = np.zeros(b, np.int64)
        self.amax = np.zeros(b, np.float32)
        self.offset = offset
        self.done = False

    def add(self, e: int, x) -> None:
        j = max(e, 0) - self.offset
        xd = x.to(self.h.dtype)
        self.h[j].addmm_(xd.T, xd)  # in place: no [K, K] temporary
        self.n[j] += x.shape[0]
        self.amax[j] = max(self.amax[j], float(x.abs().max()) if x.numel() else 0.0)

    def blended(self, prior: Prior, alpha: float):
        """Per-entry normalised Hessians (H_e + α·H̄) / (n_e + α) with the layer prior H̄ (module docstring), made
        in place of the sums (which nothing reads after) on the first call; later calls return the same tensor."""
        import torch

        h = self.h
        if self.done:
            return h
        self.done = True
        if alpha == 0 and self.n.sum() == 0:  # nothing seen: the prior itself
            h.zero_()
            if isinstance(prior, float):
                h.diagonal(dim1=-2, dim2=-1).fill_(prior)
            else:
                h.copy_(prior.to(h.device, h.dtype).expand_as(h))
            return h
        n = torch.tensor(self.n, dtype=h.dtype, device=h.device)
        if alpha and isinstance(prior, float):  # c·I
            h.diagonal(dim1=-2, dim2=-1).add_(alpha * prior)
        elif alpha:
            h.add_(prior.to(h.device, h.dtype), alpha=alpha)
        return h.div_((n + alpha).clamp_min(1e-12)[:, None, None])


def _prior(total: int, shared=None, per_token_diag: float | None = None) -> Prior:
    """The layer prior H̄: ``shared`` (Σ x xᵀ over all routed tokens) / total for a shared input space (divided in
    place), or ``per_token_diag``·I; I (1.0) when the layer routed nothing or the prior would be degenerate."""
    import torch

    if total == 0:
        return 1.0
    if shared is None:
        return float(per_token_diag) if per_token_diag is not None and per_token_diag > 0 else 1.0
    prior = shared.div_(total)
    return 1.0 if float(torch.diagonal(prior).sum()) <= 0 else prior


class _TiledAcc:
    """``_Acc`` for one linear too wide for its Hessian in memory (``tiles.tiled_width``: Maverick's 16384-wide
    dense MLP down projection, 1.07 GB in float32): Σ x xᵀ in tiles on disk (``tiles.Tiles``). Inputs are staged up
    to ``STAGE`` bytes and added at once (each addition reads and writes every tile)."""

    STAGE = 64 << 20

    def __init__(self, k: int, scratch: str | Path | None):
        self.h = tiles.Tiles(k, working_dtype(k), scratch)
        self.n = np.zeros(1, np.int64)
        self.amax = np.zeros(1, np.float32)
        self._stage, self._rows, self.done = None, 0, False

    def add(self, e: int, x) -> None:
        import torch

        self.n[0] += x.shape[0]
        self.amax[0] = max(self.amax[0], float(x.abs().max()) if x.numel() else 0.0)
        if self._stage is None:
            self._stage = torch.empty((max(1, self.STAGE // (x.shape[1] * x.element_size())), x.shape[1]),
                                      dtype=self.h.dtype)
        at = 0
        while at < x.shape[0]:  # (an input larger than the stage's room goes in pieces)
            take = min(x.shape[0] - at, len(self._stage) - self._rows)
            self._stage[self._rows : self._rows + take] = x[at : at + take]
            self._rows, at = self._rows + take, at + take
            if self._rows == len(self._stage):
                self._flush()

    def _flush(self) -> None:
        if self._rows:
            self.h.add_gram(self._stage[: self._rows])
        self._rows = 0

    def blended(self, prior: Prior, alpha: float):
        """H / n (``_Acc.blended`` with a non-expert's prior, I, and α = 0), in the tiles; I if nothing was seen."""
        import torch

        assert alpha == 0, "a tiled Hessian is a non-expert linear's: no prior to blend"
        if not self.done:
            self.done = True
            self._flush()
            self._stage = None
            if self.n[0]:
                self.h.scale(1.0 / float(self.n[0]))
            else:
                for i in range(self.h.nt):
                    self.h.put(i, i, torch.eye(self.h.size(i), dtype=self.h.dtype))
        return self.h


def _acc(k: int, run: "_Run"):
    """The Hessian accumulator of a non-expert linear of input width ``k``: tiled on disk when too wide."""
    import torch

    if run.dev.type == "cpu" and tiles.tiled_width(k, torch.finfo(working_dtype(k)).bits // 8):
        return _TiledAcc(k, run.options.spill_dir)
    return _Acc(1, k, run.dev)


# ---- the driver -------------------------------------------------------------------------------------------
def _layer_plan(recipe: Recipe, layer: int, names: list[str]) -> dict[str, AnyScheme]:
    return {n: s for n in names if (s := recipe.scheme_for(f"model.layers.{layer}.{n}")) is not None}


# Which captured input feeds which linear (q/k/v share one input; gate/up share one).
_SHARES = {"self_attn.k_proj.weight": "self_attn.q_proj.weight", "self_attn.v_proj.weight": "self_attn.q_proj.weight",
           "feed_forward.up_proj.weight": "feed_forward.gate_proj.weight",
           "feed_forward.shared_expert.up_proj.weight": "feed_forward.shared_expert.gate_proj.weight",
           "feed_forward.experts.up_proj": "feed_forward.experts.gate_proj"}
_EX = "feed_forward.experts."
_GATE, _UP, _DOWN = _EX + "gate_proj", _EX + "up_proj", _EX + "down_proj"


@dataclass
class _Run:
    """What every step of one calibration shares: its inputs, the torch device and the result being filled."""

    ckpt: Checkpoint
    recipe: Recipe
    options: CalibOptions
    observer: Observer | None
    dev: Any  # torch.device
    inv_freq: Any  # RoPE inverse frequencies [D/2], on dev
    result: CalibResult
    workers: Any = field(default_factory=LocalWorkers)  # where the expert batches run (distributed.py)

    def observe(self, layer: int, name: str, e: int, x) -> None:
        if self.observer is not None:
            self.observer(f"model.layers.{layer}.{name}", e, x)


@dataclass
class _Experts:
    """One MoE layer's routed experts and the per-layer routing state their calibration needs.

    ``routed1``/``routed2``: per sample, (h2 [T, H], top-k experts [T, k], router scores [T, k]) of pass 1 (float weights:
    the experts' Hessians come from it) and of pass 2 (quantized weights: the experts' outputs go to it);
    ``partial``: pass 2's x + attention + shared expert [T, H] per sample, to which the routed outputs are added."""

    layer: int
    lazy: Mapping[str, Any]  # the layer's LazyTensors; stacked experts [E, out, in] are loaded a batch at a time
    plan: dict[str, AnyScheme]  # the routed expert tensors to quantize
    routed1: Routed
    routed2: Routed
    partial: Samples  # the layer's X, holding pass 2's outputs
    counts: np.ndarray = field(init=False)  # tokens routed to each expert (pass 1)
    stats: dict[str, dict[str, list[float]]] = field(init=False)  # per tensor, extended batch by batch
    amax: dict[str, list[np.ndarray]] = field(init=False)  # per tensor, each batch's input absmax per expert

    def __post_init__(self) -> None:
        num_e = self.shape[0]
        self.counts = np.zeros(num_e, np.int64)
        for _, idx, _ in self.routed1:
            self.counts += np.bincount(idx.cpu().numpy().reshape(-1), minlength=num_e)
        self.stats = {n: {} for n in self.plan}
        self.amax = {n: [] for n in self.plan}

    @property
    def shape(self) -> tuple[int, int, int]:
        """(E, I, H): experts, expert width, hidden size."""
        return tuple(self.lazy[_GATE].shape)

    def load(self, names: Iterable[str], a: int, b: int, dev) -> dict:
        """Experts [a, b) of each stacked tensor in ``names``, as stored (``_stored``), torch tensors [b - a, out, in]."""
        return {n: _stored(self.lazy[n], dev, slice(a, b)) for n in names}


def calibrate(ckpt: Checkpoint, recipe: Recipe, ids: list[np.ndarray], options: CalibOptions,
              observer: Observer | None = None, workers: Any = None) -> CalibResult:
    """Quantize every tensor the recipe matches, calibrated on the token id arrays ``ids`` (``read_calibration``
    reads them from ``options.path``; this does not). ``recipe`` is one that ``plan.make_plan`` (convert) or
    ``Recipe.validate`` accepted for this checkpoint; it is not validated again here.

    The calibrated tensors are spilled to disk as they are made (``result.tensors`` is a ``SpilledTensors``).
    ``workers``: where the routed experts' GPTQ jobs run (``distributed.RayWorkers``; default this process; the
    observer sees routed experts' inputs only in this process). Sets glibc's mmap threshold per phase
    (``heap.mapped_from``)."""
    import torch

    t0 = time.perf_counter()
    spec = ckpt.spec
    dev = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokens = sum(len(i) for i in ids)
    X = Samples([len(i) for i in ids], spec.hidden_size, options.spill_dir, dev)
    log.info("calibrating on %d samples, %d tokens, device %s; activations on disk: up to %.2f GB", len(ids), tokens,
             dev, ACTIVATION_FILES * X.nbytes / 1e9)
    _embed_into(X, ckpt.tensors["model.embed_tokens.weight"], ids)
    inv_freq = torch.tensor(spec.inv_freq(), device=dev)
    result = CalibResult(SpilledTensors(options.spill_dir), {}, {}, samples=len(ids), tokens=tokens,
                         device=str(dev))
    run = _Run(ckpt, recipe, options, observer, dev, inv_freq, result, workers or LocalWorkers())
    with torch.no_grad(), mapped_from(ACTIVATIONS):  # per-sample temporaries would fragment the heap (heap.py)
        for la in spec.layers:
            t_layer = time.perf_counter()
            X = _calibrate_layer(la, X, run)
            _eta_model(la.index, len(spec.layers), time.perf_counter() - t_layer, time.perf_counter() - t0)
        _global_tensors(X, run)
    X.close()
    result.tensors.reorder(ckpt.tensors)
    result.stats = {n: result.stats[n] for n in sorted(result.stats, key=list(ckpt.tensors).index)}
    result.seconds = time.perf_counter() - t0
    log.info("calibration done in %.1f s; %.1f MB of calibrated tensors spilled to %s", result.seconds,
             result.tensors.bytes_on_disk / 1e6, result.tensors.path)
    return result


def _embed_into(X: Samples, t: Any, ids: list[np.ndarray], rows: int = 8192, tokens: int = 4096) -> None:
    """X <- the embedding rows of each sample's ids, float32 [T_i, H]: the table a block of rows at a time (Scout's
    is 2 GB in bf16), written ``tokens`` at a time."""
    flat = np.concatenate([np.asarray(i, np.int64) for i in ids])
    for a in range(0, t.shape[0], rows):
        at = np.flatnonzero((flat >= a) & (flat < a + rows))
        if len(at):
            block = t.load_rows(slice(a, a + rows), np.float32)
            for c in range(0, len(at), tokens):
                X.write_rows(at[c : c + tokens], block[flat[at[c : c + tokens]] - a])


@mapped_from(WEIGHTS)  # row steps of the same few sizes, reused: from the heap (heap.py)
def _quantize(load: Callable[[], np.ndarray], hb, scheme: AnyScheme, options: CalibOptions,
              stats: dict[str, list[float]], fresh: bool = False) -> QTensor:
    """RTN and (GPTQ or RTN) of w = load() [B, N, K] on the blended Hessians hb [B, K, K]; extends ``stats`` per
    entry. ``fresh``: load() reads w anew each time (from the checkpoint); GPTQ then works in w itself, and the
    statistics read it again (one [N, K] less at the peak)."""
    h_np = hb.cpu().numpy()
    w = load()
    rtn = scheme.quantize(w)
    _add_stats(stats, "rtn", w, rtn, h_np)
    if options.method != "gptq":
        _add_stats(stats, "calibrated", w, rtn, h_np)
        return rtn
    del rtn
    qt = gptq(w, hb, scheme, options.damp, overwrite=fresh, scratch=options.spill_dir)
    if fresh:
        del w  # (``w = load()`` would hold the spent copy until the new one is read)
        give_back()  # (GPTQ's freed row steps, before the float weight is read again)
        w = load()
    _add_stats(stats, "calibrated", w, qt, h_np)
    del w
    give_back()
    return qt


def _square_sums(w: np.ndarray, qt: QTensor, block: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Σ w² and Σ (w − dequantized)² per leading entry of w [B, N, K], ``block`` rows at a time (a float64 copy of a
    real-width w and of its error would be 0.7 GB)."""
    sig, err = np.zeros(w.shape[0]), np.zeros(w.shape[0])
    for a in range(0, w.shape[1], block):
        ref = w[:, a : a + block].astype(np.float64)
        sig += (ref**2).sum(axis=(1, 2))
        err += ((ref - qt.rows(slice(a, a + block)).dequantize()) ** 2).sum(axis=(1, 2))
    return sig, err


def _add_stats(stats: dict[str, list[float]], kind: str, w: np.ndarray, qt: QTensor, h_np: np.ndarray,
               block: int = 128) -> None:
    """Weight SQNR (every row, ``_square_sums``) and output SQNR (``output_sqnr``'s sampled rows) per batch entry."""
    picked = sampled_rows(w.shape[1])
    for key, value in ((f"weight_sqnr_{kind}", db(*_square_sums(w, qt, block))),
                       (f"output_sqnr_{kind}", output_sqnr(w[:, picked], qt.rows(picked).dequantize(), h_np))):
        stats.setdefault(key, []).extend(np.asarray(value).tolist())


class _Weights(Mapping):
    """A layer's non-expert weights as the forward passes read them: matrices as stored (bf16/fp16, float32, or a
    quantized one's codes, ``_Dequantized``), made float32 a block of rows at a time in the reused buffer ``buf``
    by their reader (``torch_llama4.linear``; bf16/fp16 -> float32 is exact, so the passes compute what they
    would on float32 copies); vectors (the norms) float32. At Maverick width the dense MLP's three matrices are
    0.5 GB as stored, 1.0 GB in float32, and one of them made float32 whole was 0.34 GB more. One buffer, not a
    fresh copy per read: a fresh 168 MB ``.float()`` was 0.76 GB of page faults per sample and pass at Scout width
    (``RowBuffer``)."""

    def __init__(self, raw: dict):
        self.raw = raw  # name -> torch tensor (bf16, fp16 or float32), or a quantized one's codes (_Dequantized)
        self.buf = RowBuffer()

    def __getitem__(self, name: str):
        t = self.raw[name]
        return t if len(t.shape) == 2 else t.float()

    def __iter__(self) -> Iterator[str]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)


def _stored(t: Any, dev, experts: slice | None = None):
    """A checkpoint tensor (or experts [a, b) of a stack) on ``dev``: as stored if bf16 or fp16, else float32 (FP8
    dequantized, ...); its readers make it float32 as they use it (``_Weights``, ``expert_hidden``)."""
    import torch

    a = t.load(experts=experts)
    if a.dtype == np.float16:
        return torch.from_numpy(a).to(dev)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).to(dev)
    return _torch(a.astype(np.float32, copy=False), dev)


def _torch(a: np.ndarray, dev):
    """``a`` as a torch tensor on ``dev``: the same memory on the CPU when numpy owns it (no second copy)."""
    import torch

    if dev.type == "cpu" and a.flags.writeable and a.flags.c_contiguous:
        return torch.from_numpy(a)
    return torch.tensor(a, device=dev)


def _log_tensor(full: str, scheme: AnyScheme, stats: dict[str, list[float]], method: str) -> None:
    lr, lc = np.mean(stats["output_sqnr_rtn"]), np.mean(stats["output_sqnr_calibrated"])
    log.info("%s %s: output SQNR %.2f dB (RTN) -> %.2f dB (%s)", full, scheme.name, lr, lc, method)


def _static_scales(amax: np.ndarray, n: np.ndarray) -> np.ndarray:
    """FP8 static input scales from per-entry input absmax: amax/448, unrouted entries get the layer max, never 0."""
    amax = amax.copy()
    amax[n == 0] = amax.max() if amax.max() > 0 else 1.0
    amax[amax <= 0] = amax.max() if amax.max() > 0 else 1.0
    return (amax / 448.0).astype(np.float32)


def _entry(qt: QTensor, i: int = 0) -> QTensor:
    """Entry ``i`` of a stack [B, N, K] as an [N, K] tensor."""
    return type(qt)(qt.scheme, qt.q[i], qt.scale[i], None if qt.zero is None else qt.zero[i])


# ---- one decoder layer: the non-expert linears --------------------------------------------------------------
def _calibrate_layer(la: LayerSpec, X: Samples, run: _Run) -> Samples:
    """Calibrate one decoder layer; returns its output on the calibration data with quantized weights.

    Non-expert linears are calibrated on the float pass (pass 1), then the quantized non-expert part of the layer
    runs (pass 2) up to the router. Routed experts follow in batches: each batch's Hessians come from the
    pass-1 tokens routed to it, and its quantized output is added to the pass-2 tokens routed to it."""

    lazy = run.ckpt.layer(la.index)
    plan = _layer_plan(run.recipe, la.index, list(lazy))
    experts = {n for n, t in lazy.items() if t.is_experts}  # stacked [E, out, in]: loaded per batch, never whole
    W = _Weights({n: _stored(t, run.dev) for n, t in lazy.items() if n not in experts})
    dense_plan = {n: s for n, s in plan.items() if n not in experts}
    accs, routed1 = _float_pass(la, X, W, dense_plan, run)
    Wq = _quantize_dense(la.index, W, lazy, dense_plan, accs, run)
    del W, accs
    give_back()

    # pass 2, quantized weights (the next layer calibrates on what it will see)
    spec = run.ckpt.spec
    # each sample's output replaces its input in X as it is made (for an MoE layer: x + attention + shared expert,
    # to which the routed experts' outputs are added batch by batch)
    if not la.is_moe:
        for j, x in enumerate(X):
            x, h2 = attention_block(x, Wq, la, spec, run.inv_freq, _nop)
            X[j] = x + mlp(h2, Wq, "feed_forward.", _nop)
        return X
    routed2 = Routed(X.lengths, spec.hidden_size, run.options.spill_dir, run.dev)  # (h2, expert, score) of pass 2
    for j, x in enumerate(X):
        x, h2 = attention_block(x, Wq, la, spec, run.inv_freq, _nop)
        X[j] = x + mlp(h2, Wq, "feed_forward.shared_expert.", _nop)
        routed2.append(h2, *route(h2, Wq, spec.top_k))
    del Wq
    _calibrate_experts(_Experts(la.index, lazy, {n: s for n, s in plan.items() if n in experts}, routed1, routed2,
                                X), run)
    routed1.close()
    routed2.close()
    return X


def _float_pass(la: LayerSpec, X: Samples, W: _Weights, dense_plan: dict[str, AnyScheme],
                run: _Run) -> tuple[dict, Routed | None]:
    """Pass 1, float weights: the Hessians of the non-expert linears in ``dense_plan`` (one ``_Acc`` per distinct
    input, ``_SHARES``); for an MoE layer also h2 and the top-1 routing per sample (the routed experts' inputs)."""
    accs = {n: _acc(W.raw[n].shape[-1], run) for n in {_SHARES.get(n, n) for n in dense_plan}}

    def capture(name: str, e: int, x) -> None:
        run.observe(la.index, name, e, x)
        if name in accs:
            accs[name].add(e, x)

    routed1 = Routed(X.lengths, run.ckpt.spec.hidden_size, run.options.spill_dir, run.dev) if la.is_moe else None
    for x in X:
        _, h2 = attention_block(x, W, la, run.ckpt.spec, run.inv_freq, capture)
        if not la.is_moe:
            mlp(h2, W, "feed_forward.", capture)
            continue
        mlp(h2, W, "feed_forward.shared_expert.", capture)
        routed1.append(h2, *route(h2, W, run.ckpt.spec.top_k))
    return accs, routed1


def _quantize_dense(layer: int, W: _Weights, lazy: dict, dense_plan: dict[str, AnyScheme], accs: dict,
                    run: _Run) -> _Weights:
    """GPTQ each non-expert linear of ``dense_plan`` on its input's Hessian, a block of rows at a time
    (``_rows_quantized``), read again from the checkpoint (``lazy``; one not stored by rows, FP8 say, is loaded whole
    for each block): the stored weights leave ``W`` first (Maverick's dense MLP: 0.5 GB in bf16). In ``W`` each is replaced by its codes, dequantized on each read (pass
    2's weights). Each Hessian goes from ``accs`` once no later tensor reads it."""

    for n in dense_plan:
        del W.raw[n]
    give_back()
    todo = list(dense_plan.items())
    for i, (n, scheme) in enumerate(todo):
        full = f"model.layers.{layer}.{n}"
        key = _SHARES.get(n, n)
        acc = accs[key]
        qt, stats = _rows_quantized(lazy[n], scheme, acc.blended(1.0, 0.0), run.options)
        run.result.stats[full] = {**stats, "tokens": acc.n.tolist()}
        if isinstance(scheme, Fp8) and scheme.activation == "static":
            run.result.act_scales[full] = _static_scales(acc.amax, acc.n)
        run.result.tensors.append(full, qt)
        # the codes, not the float weights: at Maverick width its dense MLP's three are 0.5 GB in bf16
        W.raw[n] = _Dequantized(qt, run.dev)
        _log_tensor(full, scheme, stats, run.options.method)
        if all(_SHARES.get(m, m) != key for m, _ in todo[i + 1:]):
            del accs[key], acc  # [K, K]: 0.1 GB at K = 5120 (a tiled one's files go with it)
    return W


def _nop(*_: Any) -> None:
    return None


# ---- one MoE layer: the routed experts, in batches ----------------------------------------------------------
def _routed_rows(routing: Routed, a: int, b: int) -> Iterator[tuple[int, int, Any, Any]]:
    """(sample, expert, token rows, s·h2 of those rows) for every expert in [a, b) with tokens, sample by sample (h2
    read only for the samples that route to one of them)."""
    import torch

    for j, (idx, s) in enumerate(zip(routing.expert, routing.score)):
        hit = [e for e in torch.unique(idx).tolist() if a <= e < b]
        if not hit:
            continue
        h2 = routing.h2[j]
        for e in hit:
            rows, xe = routed_inputs(h2, idx, s, e)  # IMPORTANT: the router score scales the expert INPUT
            yield j, e, rows, xe


@dataclass
class ExpertBatch:
    """One job: GPTQ of routed experts [a, b) of one MoE layer, everything it needs carried along (it may run on
    another machine). ``inputs1``: (expert, s·h2 rows) of pass 1 (float weights: the Hessians come from them)."""

    layer: int
    lazy: dict[str, Any]  # gate/up/down LazyTensors [E, out, in]
    plan: dict[str, AnyScheme]
    a: int
    b: int
    inputs1: list  # emptied by run_expert_batch once its Hessians are made
    priors: dict  # input key -> the layer prior: an ArrayFile of the [K, K], or a float c for c·I
    alpha: float
    options: CalibOptions
    folder: str  # where the job writes its quantized parts (the output's temporary folder)


@dataclass
class BatchResult:
    parts: dict[str, Part]  # planned tensor -> this batch's quantized experts, as files
    stats: dict[str, dict[str, list[float]]]
    amax: dict[str, np.ndarray]


def run_expert_batch(job: ExpertBatch, observe: Observer | None = None) -> BatchResult:
    """Load the batch's float experts, accumulate their Hessians on pass 1's routed tokens, GPTQ them and write
    them. The same function runs locally and on Ray. (Pass 2, the quantized experts' outputs, is the driver's: its
    silu would round by the worker's thread count, and the next layer calibrates on those outputs.)"""
    import torch

    dev = torch.device(job.options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    load = lambda n: job.lazy[n].load(np.float32, experts=slice(job.a, job.b))  # noqa: E731  float32 [B, out, in]
    with torch.no_grad():
        with mapped_from(ACTIVATIONS):  # (also in a --ray worker's process)
            accs = _expert_hessians(job, {n: _stored(job.lazy[n], dev, slice(job.a, job.b)) for n in (_GATE, _UP)},
                                    dev, observe)
        job.inputs1.clear()  # consumed: the batch's routed tokens (0.18 GB per expert at 16k tokens) not held in GPTQ
        give_back()
        res = BatchResult({}, {n: {} for n in job.plan}, {})
        todo = [n for n in (_GATE, _UP, _DOWN) if n in job.plan]
        for i, n in enumerate(todo):  # one projection's float weights at a time, read again for its statistics
            key = _SHARES.get(n, n)
            acc = accs[key]
            prior = job.priors[key]
            hb = acc.blended(_torch(prior.load(), dev) if isinstance(prior, ArrayFile) else prior, job.alpha)
            qt = _quantize(lambda n=n: load(n), hb, job.plan[n], job.options, res.stats[n], fresh=True)
            res.amax[n] = acc.amax
            res.parts[n] = save_part(job.folder, qt)
            del qt, hb
            if all(_SHARES.get(m, m) != key for m in todo[i + 1:]):
                del accs[key], acc  # Hessians no later tensor reads: [B, K, K] each
    return res


def _expert_hessians(job: ExpertBatch, w: dict, dev, observe: Observer | None) -> dict:
    """Pass 1 over the batch: Σ x xᵀ of the float experts' real inputs for the planned tensors, keyed by input as in
    ``_SHARES``; ``observe`` (if any) sees every input, planned or not."""
    inter, hidden = job.lazy[_GATE].shape[1:]
    accs, buf = {}, RowBuffer()
    if _GATE in job.plan or _UP in job.plan:
        accs[_GATE] = _Acc(job.b - job.a, hidden, dev, job.a)
    if _DOWN in job.plan:
        accs[_DOWN] = _Acc(job.b - job.a, inter, dev, job.a)
    for e, xe in job.inputs1:
        xe = xe.to(dev)
        if observe is not None:
            observe(job.layer, _GATE, e, xe)
        if _GATE in accs:
            accs[_GATE].add(e, xe)
        if _DOWN in accs or observe is not None:
            with one_thread():  # F.silu's last bits follow the thread count; a --ray worker has 1
                me = expert_hidden(xe, w[_GATE][e - job.a], w[_UP][e - job.a], buf=buf)
            if observe is not None:
                observe(job.layer, _DOWN, e, me)
            if _DOWN in accs:
                accs[_DOWN].add(e, me)
    return accs


def _calibrate_experts(ex: _Experts, run: _Run) -> None:
    """GPTQ the routed experts of one MoE layer in batches (jobs, on ``run.workers``), and add their quantized
    outputs to ``ex.partial``. Each job holds one batch's weights and Hessians; nothing is [E, K, K] or the whole
    [E, out, in]. Results are taken in batch order, so the spill and the sums are those of one process."""
    num_e, inter, hidden = ex.shape
    run.result.token_counts[ex.layer] = ex.counts.tolist()
    log.info("layer %d: tokens per expert %s", ex.layer, ex.counts.tolist())
    bsz = expert_batch_size(hidden, inter, run.options.expert_batch_bytes, num_e)
    batches = [(a, min(a + bsz, num_e)) for a in range(0, num_e, bsz)]
    log.info("layer %d: %d routed experts in %d batch(es) of up to %d", ex.layer, num_e, len(batches), bsz)
    folder = str(run.result.tensors.path)
    # each prior [K, K] as a file of the spill folder, which every --ray node shares: a batch reads it while it blends
    # its Hessians, so no process holds it between batches (0.1 GB at Scout width), and a Ray job carries the path,
    # not the tensor (Ray copies a large task argument into its object store once per job, and the driver's pages
    # of those copies stay in its resident set)
    priors = {k: v if isinstance(v, float) else ArrayFile.save(v.cpu().numpy(), Path(folder) / f"prior-{ex.layer}-{k}")
              for k, v in _expert_priors(ex, batches, run.dev).items()}
    give_back()
    local = isinstance(run.workers, LocalWorkers)
    alpha = run.options.prior_tokens if num_e > 1 else 0.0
    lazy = {n: ex.lazy[n] for n in (_GATE, _UP, _DOWN)}
    jobs = ((ExpertBatch(ex.layer, lazy, ex.plan, a, b, [(e, xe.cpu()) for _, e, _, xe in _routed_rows(ex.routed1, a, b)],
                         priors, alpha, run.options, folder),) for a, b in batches)
    observe = (lambda layer, name, e, x: run.observe(layer, name, e, x)) if local and run.observer else None
    t0 = time.perf_counter()
    for i, res in enumerate(run.workers.map(run_expert_batch, ((*job, observe) for job in jobs))):
        _take_batch(ex, res, batches[i], run)
        _eta(ex.layer, i + 1, len(batches), t0)
    for v in priors.values():
        if isinstance(v, ArrayFile):
            v.unlink()
    for n, scheme in ex.plan.items():
        full = f"model.layers.{ex.layer}.{n}"
        run.result.stats[full] = {**ex.stats[n], "tokens": ex.counts.tolist()}
        if isinstance(scheme, Fp8) and scheme.activation == "static":
            run.result.act_scales[full] = _static_scales(np.concatenate(ex.amax[n]), ex.counts)
        _log_tensor(full, scheme, ex.stats[n], run.options.method)


@mapped_from(WEIGHTS)  # a codes' row step dequantized per routed sample: the same few sizes, reused
def _take_batch(ex: _Experts, res: BatchResult, batch: tuple[int, int], run: _Run) -> None:
    """Append a batch's quantized experts to the spill and its stats to ``ex``; then pass 2, here in the driver:
    the batch's quantized (or float) experts on the quantized layer's tokens, added to ``ex.partial``."""

    a, b = batch
    w = {}
    for n in (_GATE, _UP, _DOWN):
        if n not in res.parts:
            w[n] = _stored(ex.lazy[n], run.dev, slice(a, b))
            continue
        qt = res.parts[n].load()
        run.result.tensors.append(f"model.layers.{ex.layer}.{n}", qt)
        res.parts[n].unlink()
        w[n] = [_Dequantized(_entry(qt, i), run.dev) for i in range(b - a)]
        for key, values in res.stats[n].items():
            ex.stats[n].setdefault(key, []).extend(values)
        ex.amax[n].append(res.amax[n])
    buf = RowBuffer()
    for j, e, rows, xe in _routed_rows(ex.routed2, a, b):
        me = expert_hidden(xe, w[_GATE][e - a], w[_UP][e - a], buf=buf)
        p = ex.partial[j]
        p[rows] = p[rows] + times_t(me, w[_DOWN][e - a], rows=2048, buf=buf)
        ex.partial[j] = p
    del w
    give_back()


class _Dequantized:
    """A quantized [out, in] (a dense linear, or an expert of a stack: ``_entry``) as pass 2 reads it: float32
    output rows made as they are sliced (``w[a:b]``), so a real-width expert is held as its codes (42 MB in
    int4/int8), not 168 MB of float32."""

    def __init__(self, qt: QTensor, dev):
        self.qt, self.dev, self.shape = qt, dev, tuple(qt.q.shape)

    def __getitem__(self, rows: slice):
        return _torch(self.qt.rows(rows).dequantize(), self.dev)


def _eta_model(layer: int, layers: int, took: float, spent: float) -> None:
    log.info("calibrated layer %d/%d in %.0f s; %.0f s so far, ETA %.0f s", layer + 1, layers, took, spent,
             spent / (layer + 1) * (layers - layer - 1))


def _eta(layer: int, done: int, total: int, t0: float) -> None:
    spent = time.perf_counter() - t0
    log.info("layer %d: expert batch %d/%d, %.0f s, ETA %.0f s for the layer", layer, done, total, spent,
             spent / done * (total - done))


def _expert_priors(ex: _Experts, batches: list[tuple[int, int]], dev) -> dict:
    """The layer priors H̄ (module docstring) of the planned experts' inputs, keyed by input as in ``_SHARES``
    (gate/up: gate_proj's; down: its own), computed without per-expert stacks."""
    priors = {}
    if _GATE in ex.plan or _UP in ex.plan:
        priors[_GATE] = _prior_gate_up(ex, dev)
    if _DOWN in ex.plan:
        priors[_DOWN] = _prior_down(ex, batches, dev)
    return priors


def _prior_gate_up(ex: _Experts, dev):
    """gate/up: every routed (token, rank)'s s·h2 feeds exactly one expert, so Σ_e H_e is Σ over all of them of
    (s·h2)(s·h2)ᵀ, one [H, H]."""
    import torch

    hidden = ex.shape[2]
    shared = torch.zeros(hidden, hidden, dtype=working_dtype(hidden), device=dev)
    for h2, _, s in ex.routed1:
        for j in range(s.shape[1]):  # each rank's token feeds its expert once
            xd = (h2 * s[:, j:j + 1]).to(shared.dtype)
            shared.addmm_(xd.T, xd)
    return _prior(int(ex.counts.sum()), shared=shared)


def _prior_down(ex: _Experts, batches: list[tuple[int, int]], dev):
    """down: each expert's intermediate features are its own, so the prior is mean-diag·I, the mean over routed
    experts of tr(H_e)/n_e/I. tr(H_e) = Σ_tokens |silu(G s h2) ⊙ (U s h2)|², which needs the float gate/up:
    a first, cheaper pass over the batches (weights only, no Hessians)."""
    import torch

    num_e, inter, _ = ex.shape
    trace = np.zeros(num_e, np.float64)
    for a, b in batches:
        w, buf = ex.load((_GATE, _UP), a, b, dev), RowBuffer()  # [B, I, H] each
        for _, e, _, xe in _routed_rows(ex.routed1, a, b):
            me = expert_hidden(xe, w[_GATE][e - a], w[_UP][e - a], buf=buf)
            trace[e] += float(me.to(torch.float64).pow(2).sum())
        del w, buf
    live = ex.counts > 0
    per_tok = torch.tensor(trace[live] / ex.counts[live] / inter, dtype=torch.float64) if live.any() else None
    return _prior(int(ex.counts.sum()), per_token_diag=float(per_tok.mean()) if per_tok is not None else 0.0)


# ---- lm_head and the embedding -----------------------------------------------------------------------------
def _global_tensors(X: Samples, run: _Run) -> None:
    """lm_head (calibrated on the final normed states) and the embedding (RTN: its 'input' is a lookup), a block
    of rows at a time: GPTQ treats rows independently (one H), so the codes are those of the whole matrix, and
    Scout's [202048, 5120] never sits in memory as float32 or float64."""
    import torch

    ckpt = run.ckpt
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        scheme = run.recipe.scheme_for(name)
        if scheme is None or name not in ckpt.tensors:
            continue
        t, hess = ckpt.tensors[name], None
        if name == "lm_head.weight" and run.options.method == "gptq":
            acc = _acc(t.shape[-1], run)
            norm = torch.tensor(ckpt.tensors["model.norm.weight"].load(np.float32), device=run.dev)
            for x in X:
                acc.add(-1, rms(x, norm, ckpt.spec.rms_norm_eps))
            hess = acc.blended(1.0, 0.0)
        qt, run.result.stats[name] = _rows_quantized(t, scheme, hess, run.options)
        run.result.tensors.append(name, qt)


ROW_BLOCK = 64 << 20  # _rows_quantized's step: output rows of at most 64 MB in float32


@mapped_from(WEIGHTS)
def _rows_quantized(t: Any, scheme: AnyScheme, hess: Any, options: CalibOptions) -> tuple[QTensor, dict]:
    """RTN, and GPTQ on ``hess`` (in memory or ``tiles.Tiles``) unless the method is RTN, of a 2-D tensor (``t``:
    its ``shape`` and ``load_rows``) in blocks of ``ROW_BLOCK`` bytes: GPTQ treats rows independently (one H), so
    the codes are those of the whole matrix, which is never float32 whole (Scout's lm_head [202048, 5120]: 4.1 GB).
    Statistics (one entry each): weight SQNRs over every row, output SQNRs on ``sampled_rows`` when there is a
    Hessian."""
    n, k = t.shape
    rows = max(1, ROW_BLOCK // (4 * k))
    sums = {"sig": 0.0, "weight_sqnr_rtn": 0.0, "weight_sqnr_calibrated": 0.0}
    picked = sampled_rows(n)
    kept: dict[str, list] = {"w": [], "rtn": [], "calibrated": []}  # the picked rows, for the output SQNRs

    def parts(factor: Any) -> Iterator[tuple[slice, QTensor]]:
        for a in range(0, n, rows):
            w = t.load_rows(slice(a, min(a + rows, n)), np.float32)[None]
            rtn = scheme.quantize(w)
            qt = gptq(w, None, scheme, factor=factor) if factor is not None else rtn
            for key, part in (("weight_sqnr_rtn", rtn), ("weight_sqnr_calibrated", qt)):
                sig, err = _square_sums(w, part)
                sums[key] += float(err[0])
            sums["sig"] += float(sig[0])
            if hess is not None:
                at = picked[(picked >= a) & (picked < a + rows)] - a
                kept["w"].append(w[:, at])
                kept["rtn"].append(rtn.rows(at).dequantize())
                kept["calibrated"].append(qt.rows(at).dequantize())
            yield slice(a, a + rows), _entry(qt)

    if hess is None or options.method != "gptq":
        qt = assembled(parts(None), n, 0)
    else:
        with factored(hess, options.damp, options.spill_dir) as factor:  # one factor for every row block
            qt = assembled(parts(factor), n, 0)
    stats = {key: [float(db(sums["sig"], sums[key]))] for key in ("weight_sqnr_rtn", "weight_sqnr_calibrated")}
    if hess is not None:  # (after ``factored``: H is whole again)
        w = np.concatenate(kept.pop("w"), axis=1)
        for key, v in kept.items():
            stats[f"output_sqnr_{key}"] = output_sqnr(w, np.concatenate(v, axis=1), _numpy(hess)).tolist()
    return qt, stats


def _numpy(hess: Any) -> Any:
    """A Hessian as ``output_sqnr`` reads it: an in-memory one as numpy, a tiled one as it is."""
    return hess if isinstance(hess, tiles.Tiles) else hess.cpu().numpy()


__all__ = ["CalibOptions", "CalibResult", "calibrate", "spill_next_to", "expert_batch_size", "expert_bytes"]
