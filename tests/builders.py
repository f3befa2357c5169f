"""Tiny random Llama 4 checkpoints built with transformers' own classes (used by conftest and benchmarks).

Scout-shaped: multimodal layout with a tiny vision tower, 16 experts on every layer, qk-norm, llama3 rope
scaling with low == high. Maverick-shaped: text-only, 128 experts on every other layer (dense MLP between),
no qk-norm, no rope scaling. Each in the hub's config style (what the released checkpoints ship) and in
transformers 5's (what ``save_pretrained`` writes now).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

Style = Literal["hub", "v5"]

# Keys the hub's configs do not have (transformers fills them in).
_HUB_OMITS = ("layer_types", "no_rope_layers", "moe_layers", "attn_temperature_tuning", "floor_scale", "attn_scale",
              "no_rope_layer_interval")

TINY = dict(vocab_size=300, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=4, attention_chunk_size=8,
            max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=[2, 3], pad_token_id=0,
            initializer_range=0.1, num_experts_per_tok=1)

SCOUT = dict(TINY, num_local_experts=16, interleave_moe_layer_step=1, use_qk_norm=True,
             rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 1.0, "original_max_position_embeddings": 16})
MAVERICK = dict(TINY, num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False,
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
VISION = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28,
              patch_size=14, vision_output_dim=64, projector_input_dim=64, projector_output_dim=64,
              pixel_shuffle_ratio=0.5)


def to_hub_style(config: dict) -> dict:
    """Rewrite a transformers-5 config as the hub's released configs look (rope_theta/rope_scaling, no lists)."""
    cfg = json.loads(json.dumps(config))
    text = cfg["text_config"] if "text_config" in cfg else cfg
    for key in _HUB_OMITS:
        text.pop(key, None)
    rp = text.pop("rope_parameters", None) or {}
    text["rope_theta"] = rp.get("rope_theta", 500000.0)
    if rp.get("rope_type", "default") != "default":
        text["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    else:
        text["rope_scaling"] = None
    for c in (cfg, text):
        if "dtype" in c:
            c["torch_dtype"] = c.pop("dtype")
    return cfg


def build(out: Path, shape: Literal["scout", "maverick"], style: Style = "v5", dtype: str = "float32",
          seed: int = 0, max_shard_size: str | None = "400KB", **overrides) -> Path:
    """Build and save a tiny checkpoint with transformers; returns ``out``."""
    import torch
    from transformers import Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4TextConfig

    torch.manual_seed(seed)
    text = dict(SCOUT if shape == "scout" else MAVERICK, **overrides)
    if shape == "scout":
        model = Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=VISION))
    else:
        model = Llama4ForCausalLM(Llama4TextConfig(**text))
    model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    if style == "hub":
        cfg_path = Path(out) / "config.json"
        cfg_path.write_text(json.dumps(to_hub_style(json.loads(cfg_path.read_text())), indent=2))
    return Path(out)


def count_text_params(path: Path) -> int:
    """Parameters of the text model as transformers counts them."""
    from l4export.runtimes.reference import load_reference

    model = load_reference(path)
    return sum(p.numel() for p in model.parameters())
