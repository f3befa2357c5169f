"""The serial server's prompt cache: sequences kept beside the runtime's live one (``l4export serve --prompt-cache``).
With ``--parallel`` each slot keeps its own sequence instead (runtimes/batch.py)."""

from __future__ import annotations

from typing import Any

from .base import common_prefix


class PromptCache:
    """Sequences kept beside the runtime's live one, least recently used first out (bounded by count and bytes), so
    that alternating conversations each find their own prefix: before a request, the runtime holds whichever kept
    sequence (or the live one) shares the longest prefix with the request's ids; a live sequence that the request
    would cut back is copied in first."""

    def __init__(self, count: int, nbytes: int):
        self.count, self.nbytes, self.items = count, nbytes, []

    def pick(self, rt: Any, ids: list[int]) -> None:
        live = rt.history or []
        best = max(self.items, key=lambda s: common_prefix(s.ids, ids), default=None)
        switch = best is not None and common_prefix(best.ids, ids) > common_prefix(live, ids)
        kept = 0 if switch else common_prefix(live, ids)  # what stays of the live sequence
        if switch:
            self.items = [s for s in self.items if s is not best]
        if self.count and kept < len(live):  # it would be cut back or replaced: keep a copy
            snap = rt.snapshot()
            if snap is not None:
                self._add(snap)
        if switch:
            rt.restore(best)

    def _add(self, snap: Any) -> None:
        self.items = [s for s in self.items if s.ids != snap.ids] + [snap]
        while self.items and (len(self.items) > self.count or sum(s.nbytes for s in self.items) > self.nbytes):
            self.items.pop(0)
