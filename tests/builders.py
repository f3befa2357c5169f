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
# A tiny vision tower with Scout's structure: 56-pixel tiles of 14-pixel patches (4 x 4 -> pixel shuffle 0.5 -> 4
# image tokens per tile), 2 layers, 2 heads of 16; the encoder MLP and the adapter input are hidden / 0.5^2 wide.
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=56,
              patch_size=14, vision_output_dim=64, projector_input_dim=64, projector_output_dim=64,
              pixel_shuffle_ratio=0.5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


# Llama 4's image tokens, at the tiny vocabulary's end (the hub's are 200080.. in a 202048 vocabulary).
VISION_TOKENS = {"<|image_start|>": 280, "<|image_end|>": 281, "<|tile_x_separator|>": 284,
                 "<|tile_y_separator|>": 285, "<|image|>": 290, "<|patch|>": 292}
VISION_IDS = dict(boi_token_index=280, eoi_token_index=281, image_token_index=292)


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
        model = Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=VISION, **VISION_IDS))
    else:
        model = Llama4ForCausalLM(Llama4TextConfig(**text))
    model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    if shape == "scout":  # a byte-level tokenizer that knows the image tokens (the processor tests need one)
        from l4export.demo import byte_tokenizer_json

        (Path(out) / "tokenizer.json").write_text(json.dumps(byte_tokenizer_json(text["vocab_size"], VISION_TOKENS)))
        (Path(out) / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    if style == "hub":
        cfg_path = Path(out) / "config.json"
        cfg_path.write_text(json.dumps(to_hub_style(json.loads(cfg_path.read_text())), indent=2))
    return Path(out)


def count_text_params(path: Path) -> int:
    """Parameters of the text model as transformers counts them."""
    from l4export.runtimes.reference import load_reference

    model = load_reference(path)
    return sum(p.numel() for p in model.parameters())


def patch_initializer(export: Path, name: str, change) -> None:
    """Replace ONNX initializer ``name`` of an export by ``change(array)`` (same dtype and size), in place: in
    model.onnx.data when it is stored there (every graph over that file sees it), else in every graph that holds it
    inline (model.onnx and the graphs cut from it)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    hit = False
    data = export / "model.onnx.data"
    for graph_file in sorted(export.glob("*.onnx")):
        m = onnx.load(str(graph_file), load_external_data=False)
        for init in m.graph.initializer:
            if init.name != name:
                continue
            hit = True
            if init.data_location == onnx.TensorProto.EXTERNAL:
                ext = {e.key: e.value for e in init.external_data}
                a, n = int(ext.get("offset", 0)), int(ext["length"])
                with open(data, "r+b") as f:
                    f.seek(a)
                    dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
                    new = np.asarray(change(np.frombuffer(f.read(n), dtype)), dtype)
                    f.seek(a)
                    f.write(new.tobytes())
                return  # one file holds it for every graph
            init.CopyFrom(numpy_helper.from_array(np.asarray(change(numpy_helper.to_array(init))), name))
            onnx.save(m, str(graph_file))
    if not hit:
        raise AssertionError(f"no initializer {name} in {export}")
