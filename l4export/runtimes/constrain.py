"""Constrained decoding: a JSON schema enforced token by token with llguidance (the grammar engine llama.cpp and
onnxruntime-genai use; the ``serve`` extra). Why llguidance: it reads the export's own tokenizer.json (no
transformers), computes each step's allowed-token mask in microseconds, and compiles JSON schemas itself; xgrammar and
outlines-core need a transformers tokenizer or a vocabulary walk per schema.

    g = JsonGrammar(rt, {"type": "object", ...})   # None: any JSON object (response_format json_object)
    rt.generate(ids, n, constraint=g)              # every sampled token is one the grammar allows; ends with the value

An answer cut by max_tokens is the only one that does not parse (finish_reason "length")."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import UsageError


def _tokenizer(rt: Any, stops: list[int]):
    """The runtime's llguidance tokenizer (built once: ~1 s for a 200k vocabulary)."""
    cached = getattr(rt, "_llg_tokenizer", None)
    if cached is not None and cached[0] == stops:
        return cached[1]
    try:
        import llguidance
    except ImportError:
        raise UsageError("structured output needs llguidance: pip install 'l4export[serve]'") from None
    from .base import require_tokenizer

    text = require_tokenizer(rt.path).read_text(encoding="utf-8")
    tok = llguidance.LLTokenizer(text, n_vocab=rt.spec.vocab_size, eos_token=stops or None)
    rt._llg_tokenizer = (stops, tok)
    return tok


class JsonGrammar:
    """A JSON value of ``schema`` (None: any object), compact (no free whitespace: a sampled model cannot wander)."""

    def __init__(self, rt: Any, schema: dict | None, stops: list[int]):
        import llguidance

        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                {"type": "object"} if schema is None else schema, defaults={"whitespace_flexible": False})
        except Exception as err:  # the schema itself: one line for the caller
            raise UsageError(f"the JSON schema cannot be used: {str(err).splitlines()[0][:160]}") from None
        self.m = llguidance.LLMatcher(_tokenizer(rt, stops), grammar)
        if self.m.is_error():
            raise UsageError(f"the JSON schema cannot be used: {self.m.get_error()[:160]}")
        self.vocab, self.stops = rt.spec.vocab_size, set(stops)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` with every token the grammar does not allow next at -inf."""
        allowed = np.frombuffer(self.m.compute_logit_bias(), np.uint8)[: self.vocab] > 0
        return np.where(allowed, logits, -np.inf).astype(logits.dtype, copy=False)

    def accept(self, tok: int) -> None:
        self.m.consume_token(int(tok))

    @property
    def done(self) -> bool:
        """The value is complete: nothing but an end token may follow (the end token itself is not generated)."""
        if self.m.is_stopped():
            return True
        if not self.m.is_accepting():
            return False
        allowed = np.flatnonzero(np.frombuffer(self.m.compute_logit_bias(), np.uint8)[: self.vocab])
        return set(allowed.tolist()) <= self.stops


__all__ = ["JsonGrammar"]
