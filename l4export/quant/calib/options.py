"""Calibration's options (``CalibOptions``) and result (``CalibResult``), and ``_Run``: what every step of one
calibration shares (its inputs, the torch device, the result being filled, the workers)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ...checkpoint import Checkpoint
from ...distributed import LocalWorkers
from ...errors import UsageError
from ..schemes import AnyScheme, QTensor
from ..spill import SpilledTensors


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


@dataclass
class _Run:
    """What every step of one calibration shares: its inputs, the torch device and the result being filled."""

    ckpt: Checkpoint
    schemes: Mapping[str, AnyScheme]  # canonical name -> scheme: what the plan quantizes
    options: CalibOptions
    observer: Observer | None
    dev: Any  # torch.device
    inv_freq: Any  # RoPE inverse frequencies [D/2], on dev
    result: CalibResult
    workers: Any = field(default_factory=LocalWorkers)  # where the expert batches run (distributed.py)

    def observe(self, layer: int, name: str, e: int, x) -> None:
        if self.observer is not None:
            self.observer(f"model.layers.{layer}.{name}", e, x)
