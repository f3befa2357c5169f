"""What calibration measures and logs: weight and output SQNR per tensor (RTN and calibrated), FP8 static input
scales from the inputs' absmax, a tensor's log line and the progress (ETA) lines."""

from __future__ import annotations

import logging
import time

import numpy as np

from ..gptq import output_sqnr, sampled_rows
from ..schemes import AnyScheme, QTensor, db

log = logging.getLogger(__name__)


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


def _log_tensor(full: str, scheme: AnyScheme, stats: dict[str, list[float]], method: str) -> None:
    lr, lc = np.mean(stats["output_sqnr_rtn"]), np.mean(stats["output_sqnr_calibrated"])
    log.info("%s %s: output SQNR %.2f dB (RTN) -> %.2f dB (%s)", full, scheme.name, lr, lc, method)


def _static_scales(amax: np.ndarray, n: np.ndarray) -> np.ndarray:
    """FP8 static input scales from per-entry input absmax: amax/448, unrouted entries get the layer max, never 0."""
    amax = amax.copy()
    amax[n == 0] = amax.max() if amax.max() > 0 else 1.0
    amax[amax <= 0] = amax.max() if amax.max() > 0 else 1.0
    return (amax / 448.0).astype(np.float32)


def _eta_model(layer: int, layers: int, took: float, spent: float) -> None:
    log.info("calibrated layer %d/%d in %.0f s; %.0f s so far, ETA %.0f s", layer + 1, layers, took, spent,
             spent / (layer + 1) * (layers - layer - 1))


def _eta(layer: int, done: int, total: int, t0: float) -> None:
    spent = time.perf_counter() - t0
    log.info("layer %d: expert batch %d/%d, %.0f s, ETA %.0f s for the layer", layer, done, total, spent,
             spent / done * (total - done))
