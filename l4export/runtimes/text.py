"""Tokens in, text out: the one rule the API, the CLI and the server stream text by.

    stream = TextStream(rt.decode, stop_ids={eot}, stop_strings=["\\n\\n"])
    for tok in rt.generate(ids, n):
        piece = stream.push(tok)        # "" while a UTF-8 character or a possible stop string is incomplete
        ...
        if stream.finish: break         # "stop": an end-of-turn token or a stop string; None: go on

Constant work per token: only the tokens not shown yet are decoded (Llama 4's tokenizer is byte-level BPE, so the
text of a run of tokens is the concatenation of their texts), and a stop string is looked for in what was held back
plus the new piece, never in the whole text.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field


@dataclass
class TextStream:
    decode: Callable[[list[int]], str]
    stop_ids: Collection[int] = ()
    stop_strings: Sequence[str] = ()
    tokens: int = 0  # tokens taken, stop tokens excluded (the completion's length)
    finish: str | None = None  # "stop" once an end-of-turn token or a stop string ended the text
    _pending: list[int] = field(default_factory=list)  # tokens not yet shown
    _held: str = ""  # decoded text held back: it may be the start of a stop string

    def push(self, tok: int) -> str:
        """The text ``tok`` adds that can be shown now ("" when none can yet, or once the text has ended)."""
        if self.finish is not None:
            return ""
        if tok in self.stop_ids:
            self.finish = "stop"
            return self.flush()
        self.tokens += 1
        self._pending.append(tok)
        piece = self.decode(self._pending)
        if piece.endswith("\ufffd"):
            return ""  # wait for whole UTF-8 characters
        self._pending = []
        return self._cut(self._held + piece)

    def _cut(self, text: str) -> str:
        """Show ``text`` up to a stop string (ending the text there), holding back a tail that may begin one."""
        hits = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            self.finish, self._held = "stop", ""
            return text[: min(hits)]
        keep = max((_prefix_overlap(text, s) for s in self.stop_strings), default=0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """What was held back (the text ended without the stop string it might have begun)."""
        held, self._held = self._held, ""
        return held


def _prefix_overlap(text: str, stop: str) -> int:
    """The longest end of ``text`` that is a proper start of ``stop``."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0


__all__ = ["TextStream"]
