"""Recipes: first match wins, presets, strict TOML, group-size and capability checks."""

from __future__ import annotations

import pytest

from l4export.errors import CapabilityError, RecipeError
from l4export.quant.recipe import PRESETS, Recipe, Rule, canonical_shapes, load_recipe
from l4export.quant.schemes import Fp8, Int, MxFp8
from l4export.spec import load_spec

QUANT_FIXTURES = True  # scout/maverick are conftest.QUANT's checkpoints (64-wide experts, init 0.05)


def test_first_match_wins():
    r = Recipe("t", (Rule("*.experts.down_proj", None), Rule("*.experts.*", Int(4, 64)), Rule("re:.*proj.*", Fp8())))
    assert r.scheme_for("model.layers.0.feed_forward.experts.down_proj") is None
    assert r.scheme_for("model.layers.0.feed_forward.experts.gate_proj") == Int(4, 64)
    assert r.scheme_for("model.layers.0.self_attn.q_proj.weight") == Fp8()
    assert r.scheme_for("model.norm.weight") is None  # no rule: float


def test_int4_preset_plan(scout):
    plan = PRESETS["int4"].validate(load_spec(scout))
    assert plan["model.layers.0.feed_forward.experts.gate_proj"] == Int(4, 64, True)
    assert plan["model.layers.0.feed_forward.shared_expert.down_proj.weight"] == Int(4, 64, True)
    assert plan["model.layers.0.self_attn.q_proj.weight"].bits == 8
    assert plan["lm_head.weight"] == Int(8, 32, True)
    for kept in ("model.layers.0.feed_forward.router.weight", "model.embed_tokens.weight"):
        assert kept not in plan


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
    ('[[rule]]\nmatch = "*"\nscheme = "int3"\n', "scheme 'int3'"),
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
    PRESETS["int4"].check_target("onnx", "cuda")
