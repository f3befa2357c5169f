"""The spec against transformers: per-layer facts, RoPE frequencies, parameter counts, both layouts and styles."""

from __future__ import annotations

import json

import numpy as np
import pytest

from l4export.spec import load_spec, spec_from_config

# Tests that read a checkpoint or transformers carry the ``reference`` marker (skipped without torch and transformers);
# the config-only ones run everywhere.


def _hf_text_config(path):
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(path)
    return cfg.text_config if hasattr(cfg, "text_config") else cfg


@pytest.mark.reference
def test_per_layer_facts_match_transformers(any_checkpoint):
    spec = load_spec(any_checkpoint)
    hf = _hf_text_config(any_checkpoint)
    assert [la.is_moe for la in spec.layers] == [i in hf.moe_layers for i in range(hf.num_hidden_layers)]
    assert [int(la.uses_rope) for la in spec.layers] == list(hf.no_rope_layers)
    assert [la.chunked for la in spec.layers] == [t == "chunked_attention" for t in hf.layer_types]
    assert [la.qk_norm for la in spec.layers] == [bool(hf.use_qk_norm and r) for r in hf.no_rope_layers]
    assert spec.num_experts == hf.num_local_experts and spec.top_k == hf.num_experts_per_tok
    assert spec.floor_scale == hf.floor_scale and spec.attn_scale == hf.attn_scale
    assert spec.attn_temperature_tuning == bool(hf.attn_temperature_tuning)


@pytest.mark.reference
def test_inv_freq_matches_transformers(any_checkpoint):
    from transformers.models.llama4.modeling_llama4 import Llama4TextRotaryEmbedding

    hf = _hf_text_config(any_checkpoint)
    ref = Llama4TextRotaryEmbedding(hf).inv_freq.numpy()
    np.testing.assert_allclose(load_spec(any_checkpoint).inv_freq(), ref, rtol=1e-6, atol=0)


@pytest.mark.reference
def test_parameter_counts_equal_transformers(any_checkpoint):
    from builders import count_text_params

    spec = load_spec(any_checkpoint)
    assert spec.total_params == count_text_params(any_checkpoint)
    # Active: everything but (E - k) routed experts in each MoE layer.
    per_expert = 3 * spec.hidden_size * spec.intermediate_size
    assert spec.active_params == spec.total_params - len(spec.moe_layers) * (spec.num_experts - 1) * per_expert


@pytest.mark.reference
def test_layouts_and_styles(checkpoint):
    scout_hub, scout_v5 = load_spec(checkpoint("scout_hub")), load_spec(checkpoint("scout_v5"))
    mav_hub, mav_v5 = load_spec(checkpoint("maverick_hub")), load_spec(checkpoint("maverick_v5"))
    assert scout_hub.layout == scout_v5.layout == "multimodal" and scout_hub.vision is not None
    assert mav_hub.layout == mav_v5.layout == "text"
    # Same model whichever config style wrote it.
    for a, b in ((scout_hub, scout_v5), (mav_hub, mav_v5)):
        assert a.layers == b.layers and a.rope_scaling == b.rope_scaling and a.rope_theta == b.rope_theta
    assert mav_hub.moe_layers == (1, 3) and mav_hub.rope_scaling is None and not any(la.qk_norm for la in mav_hub.layers)
    assert scout_hub.nope_layers == (3,) and scout_hub.rope_scaling.low_freq_factor == scout_hub.rope_scaling.high_freq_factor


# Real released configs, hub style (values from the model cards' config.json).
SCOUT_TEXT = dict(model_type="llama4_text", vocab_size=202048, hidden_size=5120, intermediate_size=8192,
                  intermediate_size_mlp=16384, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                  head_dim=128, num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1,
                  use_qk_norm=True, rope_theta=500000.0, attention_chunk_size=8192, rms_norm_eps=1e-5,
                  rope_scaling={"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                                "original_max_position_embeddings": 8192},
                  max_position_embeddings=10485760, tie_word_embeddings=False)
MAVERICK_TEXT = dict(SCOUT_TEXT, num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False, rope_scaling=None,
                     max_position_embeddings=1048576)
SCOUT_VISION = dict(hidden_size=1408, num_hidden_layers=34, num_attention_heads=16, intermediate_size=5632,
                    image_size=336, patch_size=14, pixel_shuffle_ratio=0.5, vision_output_dim=4096,
                    projector_input_dim=4096, projector_output_dim=4096, num_channels=3, norm_eps=1e-5,
                    rope_theta=10000, multi_modal_projector_bias=False, projector_dropout=0.0)


@pytest.mark.reference
@pytest.mark.parametrize("text, total_with_vision", [(SCOUT_TEXT, 108_641_793_536), (MAVERICK_TEXT, 401_583_781_376)])
def test_real_configs_count_like_transformers_on_meta(text, total_with_vision):
    """Scout and Maverick at full size, built on the meta device (no memory): our counts equal transformers'."""
    import torch
    import transformers

    config = {"model_type": "llama4", "text_config": dict(text), "vision_config": dict(SCOUT_VISION)}
    spec = spec_from_config(config)
    hf_cfg = transformers.Llama4Config(**json.loads(json.dumps(config)))
    with torch.device("meta"):
        model = transformers.Llama4ForConditionalGeneration(hf_cfg)
    text_params = sum(p.numel() for n, p in model.named_parameters() if "vision" not in n and "projector" not in n)
    assert spec.total_params == text_params
    assert sum(p.numel() for p in model.parameters()) == total_with_vision
    assert spec.nope_layers == tuple(range(3, 48, 4))
    if text["interleave_moe_layer_step"] == 2:
        assert spec.moe_layers == tuple(range(1, 48, 2))
    # 17B active for both (the "17B" in the names).
    assert 16e9 < spec.active_params < 18e9


def test_scout_rope_index_35_and_temperature_values():
    spec = spec_from_config({"model_type": "llama4", "text_config": SCOUT_TEXT})
    mav = spec_from_config({"model_type": "llama4", "text_config": MAVERICK_TEXT})
    inv, inv_m = spec.inv_freq(), mav.inv_freq()
    assert np.isfinite(inv).all()
    np.testing.assert_array_equal(inv[:35], inv_m[:35])
    np.testing.assert_allclose(inv[35], inv_m[35] / 16, rtol=1e-6)
    temps = spec.attn_temperature(np.array([0, 8190, 8191, 16383, 32767, 131071, 1048575]))
    np.testing.assert_allclose(temps, [1.0, 1.0, 1.0693, 1.1099, 1.1609, 1.2833, 1.4860], atol=1e-4)


def test_empty_no_rope_layers_means_default_and_explicit_lists_win():
    base = dict(SCOUT_TEXT, num_hidden_layers=8)
    assert spec_from_config(dict(base, no_rope_layers=[])).nope_layers == (3, 7)
    custom = spec_from_config(dict(base, no_rope_layers=[1, 0, 1, 1, 1, 1, 1, 1], moe_layers=[2, 5]))
    assert custom.nope_layers == (1,) and custom.moe_layers == (2, 5)
    assert [la.chunked for la in custom.layers] == [True, False] + [True] * 6
