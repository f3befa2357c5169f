"""The PyTorch reference: transformers' own Llama 4 text model, in float32, eager attention.

Only ``l4export verify`` and the tests import this (it needs the ``reference`` extra: torch, transformers).
The runtimes never do.
"""

from __future__ import annotations

import json
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

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        torch = self.torch
        with torch.no_grad():
            x = torch.tensor([list(ids)], dtype=torch.long)
            out = self.model.generate(x, max_new_tokens=max_new_tokens, do_sample=False, min_new_tokens=max_new_tokens,
                                      eos_token_id=None, pad_token_id=0)
        return out[0, len(ids):].tolist()
