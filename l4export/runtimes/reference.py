"""The PyTorch reference: transformers' own Llama 4 text model, in float32, eager attention.

Only ``l4export verify`` and the tests import this (it needs the ``reference`` extra: torch, transformers).
The runtimes never do.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from ..names import normalise_prefix


def _require() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError:
        raise UsageError("the PyTorch reference needs torch and transformers: pip install 'l4export[reference]'") from None
    if not logging.getLogger("l4export").isEnabledFor(logging.DEBUG):
        # quiet by default: e.g. Scout's own rope_parameters (low == high frequency factor) draw a config warning
        transformers.logging.set_verbosity_error()
    return torch, transformers


def load_reference(path: str | Path, dtype: str = "float32"):
    """The transformers text model (``Llama4ForCausalLM``) for a checkpoint of either layout.

    A multimodal checkpoint's ``language_model.`` tensors are loaded strictly into a ``Llama4ForCausalLM`` built from
    its ``text_config``: names keep transformers' own layout, only the prefix changes (``names.normalise_prefix``);
    the vision tower is never built.
    """
    torch, transformers = _require()
    from safetensors.torch import load_file

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    kwargs = dict(dtype=getattr(torch, dtype), attn_implementation="eager")
    if config.get("model_type") != "llama4":
        return transformers.Llama4ForCausalLM.from_pretrained(path, **kwargs).eval()
    text_config = transformers.Llama4Config.from_pretrained(path).text_config
    text_config._attn_implementation = "eager"
    with torch.device("meta"):
        model = transformers.Llama4ForCausalLM(text_config)
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        for k, v in load_file(f).items():
            if k.startswith("language_model."):  # the text model; the vision tower and projector are not built
                state[normalise_prefix(k)] = v.to(getattr(torch, dtype))
    model.load_state_dict(state, strict=True, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(text_config)  # buffers were built on meta
    return model.to(getattr(torch, dtype)).eval()


def set_canonical_weight(model, name: str, weight: np.ndarray) -> None:
    """Overwrite one parameter of a ``load_reference`` model with a tensor in canonical layout (names.py), e.g. a
    dequantized weight. Stacked experts are ``[E, out, in]`` canonically; transformers fuses them input-major:
    ``gate_up_proj [E, H, 2I]`` (gate = ``[..., :I]``) and ``down_proj [E, I, H]``."""
    torch, _ = _require()
    params = dict(model.named_parameters())
    w = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))
    with torch.no_grad():
        if ".experts." not in name:
            params[name].copy_(w)
            return
        pre, which = name.rsplit(".", 1)
        if which == "down_proj":
            params[f"{pre}.down_proj"].copy_(w.transpose(1, 2))
        else:
            i = w.shape[1]
            cols = slice(0, i) if which == "gate_proj" else slice(i, 2 * i)
            params[f"{pre}.gate_up_proj"][:, :, cols].copy_(w.transpose(1, 2))


class ReferenceRunner:
    """Logits and greedy tokens from transformers, as numpy."""

    def __init__(self, path: str | Path, dtype: str = "float32"):
        self.torch, _ = _require()
        self.model = load_reference(path, dtype)

    def logits(self, ids: list[int] | np.ndarray) -> np.ndarray:
        """Logits [T, V] (float32) of one full forward over ``ids``."""
        torch = self.torch
        with torch.no_grad():
            x = torch.tensor(np.asarray(ids, dtype=np.int64)[None])
            return self.model(input_ids=x, use_cache=False).logits[0].float().numpy()

    def margins(self, ids: list[int], pixel_values: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Router margins per token (``router_margins``) of a forward over ``ids``."""
        return router_margins(self.model.model.layers, lambda: self.logits(ids))

    def routers(self, ids: list[int], pixel_values: np.ndarray | None = None) -> list[tuple[int, np.ndarray, int]]:
        """Each MoE layer's router logits over ``ids`` (``router_logits``)."""
        return router_logits(self.model.model.layers, lambda: self.logits(ids))

    @property
    def text_model(self):
        """The causal LM whose parameters carry the canonical text names (``set_canonical_weight``)."""
        return self.model

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        torch = self.torch
        with torch.no_grad():
            x = torch.tensor([list(ids)], dtype=torch.long)
            out = self.model.generate(x, max_new_tokens=max_new_tokens, do_sample=False, min_new_tokens=max_new_tokens,
                                      eos_token_id=None, pad_token_id=0)
        return out[0, len(ids):].tolist()


class VisionReference:
    """transformers' ``Llama4ForConditionalGeneration`` (float32, eager) on a prompt with images.

    Its own forward cannot be called in transformers 5.24 (it raises "'MoeCausalLMOutputWithPast' object has no
    attribute 'image_outputs'", with or without pixel_values), so this composes that forward's steps: the vision
    model's features, the projector, masked_scatter at the <|patch|> tokens, then the language model."""

    def __init__(self, path: str | Path):
        self.torch, transformers = _require()
        torch = self.torch
        self.model = transformers.Llama4ForConditionalGeneration.from_pretrained(
            Path(path), dtype=torch.float32, attn_implementation="eager").eval()
        self.image_token_id = self.model.config.image_token_id

    def image_features(self, pixel_values: np.ndarray) -> np.ndarray:
        """[N, 3, S, S] -> [N * tokens_per_tile, text hidden] float32 (vision model + projector)."""
        torch = self.torch
        with torch.no_grad():
            h = self.model.vision_model(torch.from_numpy(np.ascontiguousarray(pixel_values, np.float32))).last_hidden_state
            return self.model.multi_modal_projector(h.reshape(-1, h.shape[-1])).numpy()

    def _embeds(self, ids: list[int], pixel_values: np.ndarray | None):
        torch = self.torch
        x = torch.tensor(np.asarray(ids, np.int64)[None])
        embeds = self.model.get_input_embeddings()(x)
        if pixel_values is not None:
            feats = torch.from_numpy(self.image_features(pixel_values))
            where = (x[0] == self.image_token_id).nonzero()[:, 0]
            if len(where) < feats.shape[0]:
                raise UsageError(f"{len(where)} <|patch|> tokens for {feats.shape[0]} image features")
            # the prompt's own <|patch|> tokens take the features; one generated after them is a token, as in
            # transformers' generate (pixel_values are read in the prefill only)
            embeds = embeds.clone()
            embeds[0, where[: feats.shape[0]]] = feats.to(embeds.dtype)
        return embeds

    def logits(self, ids: list[int], pixel_values: np.ndarray | None = None) -> np.ndarray:
        """Logits [T, V] float32 of one forward over ``ids`` with the images' tiles ``pixel_values`` (all images'
        tiles in prompt order) or None."""
        torch = self.torch
        with torch.no_grad():
            out = self.model.language_model(inputs_embeds=self._embeds(list(ids), pixel_values), use_cache=False)
            return out.logits[0].float().numpy()

    def margins(self, ids: list[int], pixel_values: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        return router_margins(self.model.language_model.model.layers, lambda: self.logits(ids, pixel_values))

    def routers(self, ids: list[int], pixel_values: np.ndarray | None = None) -> list[tuple[int, np.ndarray, int]]:
        return router_logits(self.model.language_model.model.layers, lambda: self.logits(ids, pixel_values))

    @property
    def text_model(self):
        return self.model.language_model

    def greedy(self, ids: list[int], pixel_values: np.ndarray | None, max_new_tokens: int) -> list[int]:
        """Greedy tokens after the prompt, the prompt embedded once with its images (a cache for the rest)."""
        torch = self.torch
        lm = self.model.language_model
        out: list[int] = []
        with torch.no_grad():
            res = lm(inputs_embeds=self._embeds(list(ids), pixel_values), use_cache=True)
            for _ in range(max_new_tokens):
                tok = int(res.logits[0, -1].argmax())
                out.append(tok)
                res = lm(input_ids=torch.tensor([[tok]]), past_key_values=res.past_key_values, use_cache=True)
        return out


def router_logits(layers, run) -> list[tuple[int, np.ndarray, int]]:
    """Each MoE layer's router logits [T, E] (float32) during one forward (``run()``): [(layer index, logits, top-k)]."""
    torch, _ = _require()
    found: list[tuple[int, np.ndarray, int]] = []

    def hook_for(index: int):
        def hook(mod, inp, out):
            x = inp[0].reshape(-1, inp[0].shape[-1]).float()
            found.append((index, (x @ mod.weight.float().T).numpy(), int(getattr(mod, "top_k", 1))))

        return hook

    hooks = [layer.feed_forward.router.register_forward_hook(hook_for(i))
             for i, layer in enumerate(layers) if hasattr(layer.feed_forward, "router")]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return found


def margin(logits: np.ndarray, k: int) -> np.ndarray:
    """[T, E] router logits -> [T]: the k-th chosen logit minus the first one left out (inf when all E are chosen)."""
    if k >= logits.shape[-1]:  # every expert is chosen: no choice to flip
        return np.full(logits.shape[0], np.inf)
    top = -np.sort(-logits, axis=-1)
    return top[:, k - 1] - top[:, k]


def router_margins(layers, run) -> tuple[np.ndarray, np.ndarray]:
    """Per token of one forward (``run()``), the smallest top-k minus top-(k+1) router logit over the MoE layers and the
    layer where it is smallest: ([T] float, [T] int). A margin near 0 is a near-tie: any change in summation order
    (another runtime, another dtype) may pick the other expert, and every later token sees that choice."""
    found = router_logits(layers, run)
    if not found:
        return np.full(0, np.inf), np.zeros(0, np.int64)
    stack = np.stack([margin(x, k) for _, x, k in found])  # [moe layers, T]
    which = stack.argmin(axis=0)
    return stack.min(axis=0), np.array([found[w][0] for w in which])
