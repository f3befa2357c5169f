"""What every runtime shares: the Python API apps embed, sampling, tokenizer handling.

A backend implements ``reset()`` (drop the KV cache) and ``forward(ids)`` (run new tokens through the cache,
return their logits [S, V] float32). Everything else is here, once:

    rt = load_runtime("out/")              # ONNX or MLX export
    rt.logits([1, 2, 3])                    # [T, V] full forward from an empty cache
    for tok in rt.generate(ids, 32):        # streams token ids
    rt.generate_text("Hello", 32)           # text in, text out (needs tokenizer.json)

This module needs numpy only (tokenizers when text is used).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..spec import Llama4Spec, load_spec

EXPORT_INFO = "l4export.json"  # written into every export: format, dtype, target, quantization, source


def read_export_info(path: Path) -> dict:
    p = Path(path) / EXPORT_INFO
    if not p.is_file():
        raise UsageError(f"{path}: not an l4export export (no {EXPORT_INFO}); run 'l4export convert' first")
    return json.loads(p.read_text())


class Runtime(ABC):
    """A loaded export with a KV cache for one sequence."""

    format: str = ""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.info = read_export_info(self.path)
        self.spec: Llama4Spec = load_spec(self.path)
        self._tokenizer = None

    # ---- backend -------------------------------------------------------------------------------
    @abstractmethod
    def reset(self) -> None:
        """Forget the sequence (empty KV cache)."""

    @abstractmethod
    def forward(self, ids: Sequence[int]) -> np.ndarray:
        """Run ``ids`` after what the cache holds; return their logits [len(ids), vocab] as float32."""

    # ---- shared API ----------------------------------------------------------------------------
    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits [T, V] of one full forward over ``ids`` from an empty cache."""
        self.reset()
        return self.forward(list(ids))

    def logits_incremental(self, ids: Sequence[int], step: int = 1) -> np.ndarray:
        """Logits [T, V] feeding ``ids`` ``step`` tokens at a time through the KV cache."""
        self.reset()
        ids = list(ids)
        return np.concatenate([self.forward(ids[i : i + step]) for i in range(0, len(ids), step)], axis=0)

    def generate(self, ids: Sequence[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = 0, stop: Sequence[int] | None = None) -> Iterator[int]:
        """Stream up to ``max_new_tokens`` token ids after the prompt ``ids`` (greedy when temperature is 0)."""
        if not ids:
            raise UsageError("generate needs at least one prompt token")
        rng = np.random.default_rng(seed)
        stop_ids = set(self.spec.eos_token_ids if stop is None else stop)
        self.reset()
        logits = self.forward(list(ids))[-1]
        for _ in range(max_new_tokens):
            tok = sample(logits, temperature, top_p, rng)
            yield tok
            if tok in stop_ids:
                return
            logits = self.forward([tok])[-1]

    # ---- text ------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            tj = self.path / "tokenizer.json"
            if not tj.is_file():
                raise UsageError(f"{self.path}: no tokenizer.json in the export; pass token ids (--ids) instead of text")
            try:
                from tokenizers import Tokenizer
            except ImportError:
                raise UsageError("text in and out needs the tokenizers package: pip install tokenizers") from None
            self._tokenizer = Tokenizer.from_file(str(tj))
        return self._tokenizer

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        bos = self.spec.bos_token_id
        return ([bos] if add_bos and bos is not None else []) + ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def generate_text(self, prompt: str, max_new_tokens: int = 64, **kw) -> Iterator[str]:
        """Stream decoded text pieces for a prompt."""
        out: list[int] = []
        shown = ""
        for tok in self.generate(self.encode(prompt), max_new_tokens, **kw):
            out.append(tok)
            text = self.decode(out)
            if not text.endswith("\ufffd"):  # wait for whole UTF-8 characters
                yield text[len(shown):]
                shown = text


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; else temperature + nucleus (top-p) sampling."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]
        mask = np.zeros_like(p)
        mask[keep] = p[keep]
        p = mask / mask.sum()
    return int(rng.choice(len(p), p=p))
