"""verify's reference: transformers on the checkpoint (``Reference``), its twin with the export's own rounded
weights (``Reference.round_like``), and the router near-ties found with them (``first_tie``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import UsageError
from .folder import ExportInfo


class Reference:
    """transformers on the reference checkpoint: the text model, or with images the multimodal one (for every
    prompt then, so that one model is loaded)."""

    def __init__(self, path: Path, images: bool):
        from .runtimes.reference import ReferenceRunner, VisionReference

        self.vision = VisionReference(path) if images else None
        self.text = None if images else ReferenceRunner(path)
        self.rounded: Reference | None = None  # the same model with the export's rounded weights (tie_moved)

    def round_like(self, path: Path, info: ExportInfo) -> None:
        """Load the model again with every text weight the export quantizes replaced by its scheme's round trip
        (l4export.json's ``quant.placement``)."""
        from .checkpoint import Checkpoint
        from .quant.recipe import placed_schemes
        from .runtimes.reference import set_canonical_weight

        if info.quant is None or not info.quant.tensors:
            return  # nothing rounded: the routing is the reference's
        if not info.quant.placement:
            raise UsageError(f"{path}: the export's l4export.json lists no quantized tensors (quant.placement); "
                             "it predates this l4export: convert it again")
        twin = Reference(path, self.vision is not None)
        ckpt = Checkpoint(path)
        model = (twin.vision or twin.text).text_model
        for name, scheme in placed_schemes(info.quant.schemes, info.quant.placement).items():
            if name.startswith(("model.", "lm_head.")):  # the text model's (the vision tower is not routed)
                set_canonical_weight(model, name, scheme.rtn(ckpt.tensors[name].load(np.float32)))
        self.rounded = twin

    def logits(self, p: Any) -> np.ndarray:
        return self.vision.logits(p.ids, p.pixel_values) if self.vision else self.text.logits(p.ids)

    def greedy(self, p: Any, n: int) -> list[int]:
        return self.vision.greedy(p.ids, p.pixel_values, n) if self.vision else self.text.greedy(p.ids, n)

    def margins(self, ids: list[int], p: Any) -> tuple[np.ndarray, np.ndarray]:
        return (self.vision or self.text).margins(ids, p.pixel_values)

    def routers(self, ids: list[int], p: Any) -> list[tuple[int, np.ndarray, int]]:
        return (self.vision or self.text).routers(ids, p.pixel_values)


def first_tie(ref: Reference, p: Any, greedy: list[int], tie: float | None, tie_moved: float | None) -> dict | None:
    """The first token of the prompt + the reference's greedy continuation that is a router near-tie: its margin below
    ``tie``, or (``tie_moved``) the rounding taking at least 1/tie_moved of its lead."""
    ids = p.ids + greedy
    if tie_moved is not None and ref.rounded is not None:
        return _first_moved_tie(ref, p, ids, tie_moved)
    if tie is None:
        return None
    margins, layers = ref.margins(ids, p)
    hit = np.flatnonzero(margins < tie)
    if not hit.size:
        return None
    k = int(hit[0])
    return {"position": k, "layer": int(layers[k]), "margin": float(margins[k])}


def _first_moved_tie(ref: Reference, p: Any, ids: list[int], factor: float) -> dict | None:
    from .runtimes.reference import margin

    best: dict | None = None
    for (layer, exact, k), (_, rounded, _) in zip(ref.routers(ids, p), ref.rounded.routers(ids, p)):
        if k >= exact.shape[-1]:
            continue  # every expert is chosen: nothing to flip
        m = margin(exact, k)  # [T]: the exact top-k's lead over the first expert left out
        moved = m - _lead(rounded, exact, k)  # how much of that lead the rounding took (negative: it widened it)
        hit = np.flatnonzero(factor * moved >= m)
        if hit.size and (best is None or hit[0] < best["position"]):
            t = int(hit[0])
            best = {"position": t, "layer": layer, "margin": float(m[t]), "moved": float(moved[t])}
    return best


def _lead(rounded: np.ndarray, exact: np.ndarray, k: int) -> np.ndarray:
    """[T]: in ``rounded`` router logits, the smallest logit of ``exact``'s top-k experts minus the largest other."""
    if k >= exact.shape[-1]:
        return np.full(exact.shape[0], np.inf)
    chosen = np.argsort(-exact, axis=-1, kind="stable")[:, :k]
    mask = np.zeros(exact.shape, bool)
    np.put_along_axis(mask, chosen, True, axis=-1)
    return np.where(mask, rounded, np.inf).min(-1) - np.where(mask, -np.inf, rounded).max(-1)


def twin_prompt(ref: Reference, vocab: int, length: int, tie: float, tries: int = 8) -> list[int] | None:
    """``length`` token ids the rounded twin can judge when no other prompt let it: random ids whose routing under
    the rounded weights reaches no near-tie (``tie``) for longest, of ``tries`` drawn (the first with none at all).
    verify's own prompts all start with BOS, and a flat router can leave BOS tied under the rounded weights, which
    hides the whole prompt from the twin. None: every draw ties at its first token."""
    rng = np.random.default_rng(1)
    lo = min(4, vocab - 1)  # past the first few specials, as the default prompts
    twin = ref.rounded.vision or ref.rounded.text
    best, reach = None, 0
    for _ in range(tries):
        ids = rng.integers(lo, vocab, length).tolist()
        near = np.flatnonzero(twin.margins(ids)[0] < tie)
        first = int(near[0]) if near.size else len(ids)
        if first > reach:
            best, reach = ids, first
        if first == len(ids):
            break
    return best
