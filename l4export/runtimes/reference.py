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


def _require() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError:
        raise UsageError("the PyTorch reference needs torch and transformers: pip install 'l4export[reference]'") from None
    return torch, transformers


def load_reference(path: str | Path, dtype: str = "float32"):
    """The transformers text model (``Llama4ForCausalLM``) for a checkpoint of either layout."""
    torch, transformers = _require()
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    kwargs = dict(dtype=getattr(torch, dtype), attn_implementation="eager")
    if config.get("model_type") == "llama4":
        full = transformers.Llama4ForConditionalGeneration.from_pretrained(path, **kwargs)
        # The text half as a CausalLM sharing the same modules (vision tower dropped).
        model = transformers.Llama4ForCausalLM(full.config.text_config)
        model.model = full.model.language_model if hasattr(full, "model") else full.language_model.model
        model.lm_head = full.lm_head if hasattr(full, "lm_head") else full.language_model.lm_head
        model = model.to(getattr(torch, dtype))
        del full
    else:
        model = transformers.Llama4ForCausalLM.from_pretrained(path, **kwargs)
    model.eval()
    return model


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
