"""The driver: ``calibrate()`` walks the decoder layers; per layer the float pass (pass 1: the non-expert linears'
Hessians, the routed experts' inputs), GPTQ of the non-expert linears, pass 2 on the quantized weights and the
routed experts (``moe.py``); then lm_head and the embedding."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from ...checkpoint import Checkpoint
from ...distributed import LocalWorkers
from ...heap import ACTIVATIONS, give_back, mapped_from
from ...spec import LayerSpec
from ...torch_llama4 import attention_block, mlp, rms, route
from ..activations import ACTIVATION_FILES, Routed, Samples
from ..schemes import AnyScheme, Fp8
from ..spill import SpilledTensors
from .hessian import _SHARES, _acc
from .moe import _calibrate_experts, _Experts
from .options import CalibOptions, CalibResult, Observer, _Run
from .stats import _eta_model, _log_tensor, _static_scales
from .weights import _Dequantized, _rows_quantized, _stored, _Weights

log = logging.getLogger(__name__)


def calibrate(ckpt: Checkpoint, schemes: Mapping[str, AnyScheme], ids: list[np.ndarray], options: CalibOptions,
              observer: Observer | None = None, workers: Any = None) -> CalibResult:
    """Quantize the decoder's tensors in ``schemes`` (canonical name -> scheme: the plan's, ``ExportPlan.quantized``;
    decided and checked there, not again here), calibrated on the token id arrays ``ids`` (``read_calibration``
    reads them from ``options.path``; this does not).

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
    run = _Run(ckpt, schemes, options, observer, dev, inv_freq, result, workers or LocalWorkers())
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


def _layer_plan(schemes: Mapping[str, AnyScheme], layer: int, names: list[str]) -> dict[str, AnyScheme]:
    return {n: s for n in names if (s := schemes.get(f"model.layers.{layer}.{n}")) is not None}


def _calibrate_layer(la: LayerSpec, X: Samples, run: _Run) -> Samples:
    """Calibrate one decoder layer; returns its output on the calibration data with quantized weights.

    Non-expert linears are calibrated on the float pass (pass 1), then the quantized non-expert part of the layer
    runs (pass 2) up to the router. Routed experts follow in batches: each batch's Hessians come from the
    pass-1 tokens routed to it, and its quantized output is added to the pass-2 tokens routed to it."""

    lazy = run.ckpt.layer(la.index)
    plan = _layer_plan(run.schemes, la.index, list(lazy))
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
        stats = _rows_quantized(lazy[n], scheme, acc.blended(1.0, 0.0), run.options,
                                lambda part, full=full: run.result.tensors.append(full, part))
        run.result.stats[full] = {**stats, "tokens": acc.n.tolist()}
        if isinstance(scheme, Fp8) and scheme.activation == "static":
            run.result.act_scales[full] = _static_scales(acc.amax, acc.n)
        # the codes (spilled, mapped), not the float weights: at Maverick width its dense MLP's three are 0.5 GB in bf16
        W.raw[n] = _Dequantized(run.result.tensors[full], run.dev)
        _log_tensor(full, scheme, stats, run.options.method)
        if all(_SHARES.get(m, m) != key for m, _ in todo[i + 1:]):
            del accs[key], acc  # [K, K]: 0.1 GB at K = 5120 (a tiled one's files go with it)
    return W


def _nop(*_: Any) -> None:
    return None


def _global_tensors(X: Samples, run: _Run) -> None:
    """lm_head (calibrated on the final normed states) and the embedding (RTN: its 'input' is a lookup), a block
    of rows at a time: GPTQ treats rows independently (one H), so the codes are those of the whole matrix, and
    Scout's [202048, 5120] never sits in memory as float32 or float64."""
    import torch

    ckpt = run.ckpt
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        scheme = run.schemes.get(name)
        if scheme is None or name not in ckpt.tensors:
            continue
        t, hess = ckpt.tensors[name], None
        if name == "lm_head.weight" and run.options.method == "gptq":
            acc = _acc(t.shape[-1], run)
            norm = torch.tensor(ckpt.tensors["model.norm.weight"].load(np.float32), device=run.dev)
            for x in X:
                acc.add(-1, rms(x, norm, ckpt.spec.rms_norm_eps))
            hess = acc.blended(1.0, 0.0)
        run.result.stats[name] = _rows_quantized(t, scheme, hess, run.options,
                                                 lambda part, name=name: run.result.tensors.append(name, part))
