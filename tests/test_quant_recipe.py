"""Recipes: first match wins, presets, strict TOML, group-size and capability checks."""

from __future__ import annotations

from dataclasses import replace

import pytest

from l4export.errors import CapabilityError, RecipeError
from l4export.quant.recipe import PRESETS, Recipe, Rule, canonical_shapes, for_model, load_recipe
from l4export.quant.schemes import Fp8, Int, MxFp8
from l4export.spec import load_spec

# this module quantizes: scout / maverick are conftest.QUANT_CASES' checkpoints
pytestmark = pytest.mark.quant_checkpoints


def test_first_match_wins():
    r = Recipe("t", (Rule("*.experts.down_proj", None), Rule("*.experts.*", Int(4, 64)), Rule("re:.*proj.*", Fp8())))
    assert r.scheme_for("model.layers.0.feed_forward.experts.down_proj") is None
    assert r.scheme_for("model.layers.0.feed_forward.experts.gate_proj") == Int(4, 64)
    assert r.scheme_for("model.layers.0.self_attn.q_proj.weight") == Fp8()
    assert r.scheme_for("model.norm.weight") is None  # no rule: float


def test_int4_preset_plan(scout):
    plan = PRESETS["int4"].validate({n: (s[0], 128) if len(s) == 2 else s for n, s in canonical_shapes(load_spec(scout)).items()})
    assert plan["model.layers.0.feed_forward.experts.gate_proj"] == Int(4, 64, True, accuracy_level=4)
    assert plan["model.layers.0.feed_forward.shared_expert.down_proj.weight"] == Int(4, 64, True, accuracy_level=4)
    assert plan["model.layers.0.self_attn.q_proj.weight"] == Int(8, 128, True, accuracy_level=4)
    assert plan["lm_head.weight"] == plan["model.embed_tokens.weight"] == Int(8, 128, True, accuracy_level=4)
    assert "model.layers.0.feed_forward.router.weight" not in plan and "model.norm.weight" not in plan
    exact = PRESETS["int4-exact"].validate({n: (s[0], 128) if len(s) == 2 else s  # the same weights, float activations
                                            for n, s in canonical_shapes(load_spec(scout)).items()})
    assert {n: replace(s, accuracy_level=0) for n, s in plan.items()} == exact


def test_presets_adapt_to_the_model_and_target(maverick):
    """A preset's group size that does not divide a tensor falls back (128 -> 64 -> 32 -> float); accuracy_level 4
    is for ONNX Runtime CPU only. Explicit recipes are not adapted: they are refused with the reason."""
    shapes = canonical_shapes(load_spec(maverick))
    recipe, adapted = for_model(PRESETS["int4"], shapes, "onnx", "cpu")
    down = "model.layers.0.feed_forward.down_proj.weight"  # dense, 96 inputs
    assert recipe.scheme_for(down) == Int(8, 32, True, accuracy_level=4) and down in adapted
    assert all(shapes[n][-1] % 128 for n in adapted)
    odd = {**shapes, down: (64, 100)}  # nothing of 128, 64, 32 divides 100: float
    assert for_model(PRESETS["int4"], odd, "onnx", "cpu")[0].scheme_for(down) is None
    for fmt, target in (("mlx", "any"), ("onnx", "cuda")):
        r, _ = for_model(PRESETS["int4"], shapes, fmt, target)
        assert {s.accuracy_level for s in r.plan(shapes).values()} == {0}
    explicit = Recipe("mine", (Rule("*.self_attn.*", Int(8, 128, accuracy_level=4)),))
    assert for_model(explicit, shapes, "onnx", "cuda") == (explicit, {})
    with pytest.raises(CapabilityError, match="accuracy_level = 4"):
        explicit.check_target("onnx", "cuda")


def test_fp8_preset_only_routed_experts(maverick):
    plan = PRESETS["fp8"].validate(load_spec(maverick))
    assert plan and all(".experts." in n and s == Fp8() for n, s in plan.items())
    assert "model.layers.1.feed_forward.experts.down_proj" in plan


def _write(tmp_path, text):
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


def test_toml_recipe(tmp_path):
    r = load_recipe(_write(tmp_path, """
name = "mine"
[[rule]]
match = "*.router.weight"
scheme = "float"
[[rule]]
match = "re:model\\\\.layers\\\\.\\\\d+\\\\.feed_forward\\\\.experts\\\\..*"
scheme = "int4"
group_size = 64
symmetric = false
[[rule]]
match = "*.self_attn.*"
scheme = "mxfp8"
"""))
    assert r.name == "mine"
    assert r.scheme_for("model.layers.2.feed_forward.experts.up_proj") == Int(4, 64, False)
    assert r.scheme_for("model.layers.2.feed_forward.router.weight") is None
    assert r.scheme_for("model.layers.2.self_attn.o_proj.weight") == MxFp8()


@pytest.mark.parametrize("text, message", [
    ('nmae = "x"\n[[rule]]\nmatch = "*"\nscheme = "int4"\n', "unknown key 'nmae'"),
    ('[[rule]]\nmatch = "*"\nscheme = "int4"\ngroupsize = 64\n', "unknown key 'groupsize'"),
    ('[[rule]]\nmatch = "*"\nscheme = "fp8"\ngroup_size = 64\n', "unknown key 'group_size' for scheme fp8"),
    ('[[rule]]\nmatch = "*"\nscheme = "int7"\n', "scheme 'int7'"),
    ('[[rule]]\nmatch = "*"\nscheme = "int4"\ngroup_size = 48\n', "32, 64 or 128"),
    ('[[rule]]\nmatch = "re:("\nscheme = "int4"\n', "bad regular expression"),
    ('name = "x"\n', "no \\[\\[rule\\]\\]"),
    ('[[rule]\n', "not valid TOML"),
])
def test_bad_recipes(tmp_path, text, message):
    p = _write(tmp_path, text)
    with pytest.raises(RecipeError, match=message) as err:
        load_recipe(p)
    assert str(p) in str(err.value)


def test_unknown_preset_or_missing_file():
    with pytest.raises(RecipeError, match="not a preset"):
        load_recipe("int3")


def test_group_size_must_divide_the_dimension(scout):
    spec = load_spec(scout)  # hidden 64, expert width 64
    r = Recipe("g128", (Rule("*.experts.*", Int(4, 128)),))
    with pytest.raises(RecipeError, match=r"group size 128 does not divide model\.layers\.0\.feed_forward\.experts\.gate_proj's input dimension 64"):
        r.validate(spec)
    assert canonical_shapes(spec)["model.layers.0.feed_forward.experts.down_proj"] == (16, 64, 64)


def test_norms_are_not_linears(scout):
    with pytest.raises(RecipeError, match="not a linear weight"):
        Recipe("bad", (Rule("*", Int(4, 32)),)).validate({"model.norm.weight": (64,)})


def test_capabilities():
    with pytest.raises(CapabilityError, match="mxfp8"):
        Recipe("m", (Rule("*", MxFp8()),)).check_target("onnx", "cpu")
    with pytest.raises(CapabilityError, match="static"):
        Recipe("f", (Rule("*", Fp8("static")),)).check_target("mlx", "any")
    PRESETS["fp8"].check_target("onnx", "cpu")  # stored FP8 + DequantizeLinear: allowed
    PRESETS["fp8"].check_target("mlx", "any")  # re-quantized to mxfp8
    PRESETS["int4-exact"].check_target("onnx", "cuda")


def test_quantization_modules_get_the_quantization_checkpoints(scout, maverick, qscout, qmaverick):
    """This module is marked quant_checkpoints: conftest hands it QUANT_CASES' checkpoints as scout / maverick."""
    assert (scout, maverick) == (qscout, qmaverick)
