"""What every runtime shares: the Python API apps embed, sampling, tokenizer handling.

A backend implements ``_reset()`` (drop the KV cache) and ``_step(ids, n_logits)`` (run new tokens of one chunk
through the cache, return the logits of the last n of them). Everything else is here, once: prompts in steps,
ids checked, sampling, text:

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


DEFAULT_PREFILL_STEP = 2048  # tokens per prefill step (capped by attention_chunk_size)


class Runtime(ABC):
    """A loaded export with a KV cache for one sequence.

    Prompts are run in steps (``prefill_step`` tokens, never crossing a chunk boundary of the chunked layers, so a
    chunked layer's cache never holds more than one chunk), and logits are computed only where they are asked for:
    ``generate`` needs the last position of a prompt, ``logits`` every position."""

    format: str = ""

    def __init__(self, path: str | Path, prefill_step: int | None = None):
        self.path = Path(path)
        self.info = read_export_info(self.path)
        self.spec: Llama4Spec = load_spec(self.path)
        self._tokenizer = None
        self.prefill_step = check_prefill_step(prefill_step, self.spec)
        self.pos = 0  # tokens in the cache

    # ---- backend -------------------------------------------------------------------------------
    @abstractmethod
    def _reset(self) -> None:
        """Drop the KV cache."""

    @abstractmethod
    def _step(self, ids: list[int], n_logits: int) -> np.ndarray:
        """Run ``ids`` (within one chunk) at positions ``self.pos`` ..; return the logits [n_logits, V] float32 of the
        last ``n_logits`` of them (n_logits >= 1)."""

    # ---- shared API ----------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the sequence (empty KV cache)."""
        self.pos = 0
        self._reset()

    def reserve(self, tokens: int) -> None:
        """A hint: the sequence will reach ``tokens`` tokens (backends may size their caches once)."""

    def steps(self, n: int) -> list[tuple[int, int]]:
        """[a, b) pieces of ``n`` new tokens: at most prefill_step each, none crossing a chunk boundary."""
        chunk, out, a = self.spec.attention_chunk_size or 0, [], 0
        while a < n:
            room = chunk - (self.pos + a) % chunk if chunk else n - a
            b = a + min(self.prefill_step, room, n - a)
            out.append((a, b))
            a = b
        return out

    def forward(self, ids: Sequence[int], last_only: bool = False) -> np.ndarray:
        """Run ``ids`` after what the cache holds; return their logits [len(ids), V] (``last_only``: [1, V], the last
        position's) as float32."""
        ids = self.check_ids(ids)
        pieces = self.steps(len(ids))
        out = []
        for n, (a, b) in enumerate(pieces):
            want = 1 if last_only else b - a  # a step always computes at least its last position's logits
            logits = self._step(ids[a:b], want)
            self.pos += b - a
            if not last_only or n == len(pieces) - 1:
                out.append(logits)
        return out[0] if len(out) == 1 else np.concatenate(out, axis=0)

    def check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        if not ids:
            raise UsageError("forward needs at least one token id")
        if min(ids) < 0 or max(ids) >= self.spec.vocab_size:
            raise UsageError(f"token ids must be in 0..{self.spec.vocab_size - 1}; got {min(ids)}..{max(ids)}")
        if self.pos + len(ids) > self.spec.max_position_embeddings:
            raise UsageError(f"{self.pos + len(ids)} tokens exceed max_position_embeddings "
                             f"({self.spec.max_position_embeddings}); use a shorter prompt or fewer new tokens")
        return ids

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits [T, V] of one full forward over ``ids`` from an empty cache."""
        self.reset()
        self.reserve(len(ids))
        return self.forward(list(ids))

    def logits_incremental(self, ids: Sequence[int], step: int = 1) -> np.ndarray:
        """Logits [T, V] feeding ``ids`` ``step`` tokens at a time through the KV cache."""
        self.reset()
        ids = list(ids)
        self.reserve(len(ids))
        return np.concatenate([self.forward(ids[i : i + step]) for i in range(0, len(ids), step)], axis=0)

    def generate(self, ids: Sequence[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = 0, stop: Sequence[int] | None = None) -> Iterator[int]:
        """Stream up to ``max_new_tokens`` token ids after the prompt ``ids`` (greedy when temperature is 0)."""
        if not ids:
            raise UsageError("generate needs at least one prompt token")
        rng = np.random.default_rng(seed)
        stop_ids = set(self.spec.eos_token_ids if stop is None else stop)
        self.reset()
        self.reserve(len(ids) + max_new_tokens)
        logits = self.forward(list(ids), last_only=True)[-1]
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


def check_prefill_step(step: int | None, spec: Llama4Spec) -> int:
    """The prefill step: at most attention_chunk_size (a step never crosses a chunk boundary)."""
    chunk = spec.attention_chunk_size or 0
    if step is None:
        return min(DEFAULT_PREFILL_STEP, chunk) if chunk else DEFAULT_PREFILL_STEP
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise UsageError(f"prefill step {step!r} must be a positive number of tokens (e.g. {DEFAULT_PREFILL_STEP})")
    if chunk and step > chunk:
        raise UsageError(f"prefill step {step} is larger than attention_chunk_size {chunk}: a step never crosses a chunk "
                         f"boundary; use a step of at most {chunk}")
    return step


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
