"""The plan's bytes (``plan.make_plan``) against real exports (``folder.export_tensor_bytes``): planned bytes == the
export's tensor bytes.

Tensor bytes are the ONNX initializers (graph constants excluded) or the safetensors tensors; headers and the
graph itself are not counted. Exports are round to nearest (calibration does not change any shape).
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from l4export.checkpoint import Checkpoint  # noqa: E402
from l4export.convert import ExportOptions, convert  # noqa: E402
from l4export.errors import CapabilityError  # noqa: E402
from l4export.folder import export_tensor_bytes  # noqa: E402
from l4export.names import COMPONENTS  # noqa: E402
from l4export.plan import make_plan  # noqa: E402
from l4export.quant.recipe import PRESETS, Recipe, Rule, load_recipe  # noqa: E402
from l4export.quant.schemes import Fp8, Int, MxFp8  # noqa: E402
from l4export.spec import load_spec, spec_from_config  # noqa: E402

# this module quantizes: scout / maverick are conftest.QUANT_CASES' checkpoints
pytestmark = pytest.mark.quant_checkpoints


def plan_bytes(spec, recipe, fmt, dtype, target="cpu", vision=False):
    """The plan of that convert (static FP8 planned as calibrated): its .total, .by_component are the bytes it writes."""
    return make_plan(spec, fmt, dtype, target, recipe, calibrated=True, vision=vision)


def bf16_bytes(spec) -> int:
    """The reference of the size goals: every text parameter in bfloat16."""
    return 2 * spec.total_params


CASES = [  # (format, dtype, recipe): ONNX fp32 and fp16 graphs, MLX bf16; int4 and fp8 presets; one float
    ("onnx", "float32", "int4"), ("onnx", "float16", "int4"), ("onnx", "float32", "fp8"), ("onnx", "float16", "fp8"),
    ("mlx", "bfloat16", "int4"), ("mlx", "bfloat16", "fp8"), ("onnx", "float32", None), ("mlx", "bfloat16", None),
]


@pytest.mark.parametrize("fmt, dtype, quant", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("model", ["scout", "maverick"])
def test_plan_equals_export_tensor_bytes(model, fmt, dtype, quant, request, export):
    src = request.getfixturevalue(model)
    recipe = None if quant is None else load_recipe(quant)
    out = export(src, fmt, dtype, quant=quant)
    plan = plan_bytes(load_spec(src), recipe, fmt, dtype, vision=load_spec(src).vision is not None)
    assert plan.total == export_tensor_bytes(out), (model, fmt, dtype, quant, plan.by_component)
    assert sum(plan.by_component.values()) == plan.total and set(plan.by_component) == set(COMPONENTS)
    if fmt == "onnx" and quant is not None:  # the exporter's own count agrees too
        info = json.loads((out / "l4export.json").read_text())["onnx"]
        assert info["quant"]["weight_bytes"] + info.get("vision", {}).get("weight_bytes", 0) >= plan.total


def test_asymmetric_int_and_mxfp8_plans_equal_exports(scout, tmp_path):
    """Zero points (ONNX, asymmetric) and the MLX mxfp8 layout."""
    asym = Recipe("asym", (Rule("*.feed_forward.router.weight", None), Rule("*norm.weight", None),
                           Rule("model.embed_tokens.weight", None),
                           Rule("*.feed_forward.experts.*", Int(4, 32, symmetric=False)),
                           Rule("*.self_attn.*_proj.weight", Int(4, 32, symmetric=False)),
                           Rule("lm_head.weight", Int(8, 64, symmetric=False))))
    spec = load_spec(scout)
    for fmt, dtype in (("onnx", "float32"), ("mlx", "float16")):
        out = convert(scout, tmp_path / f"asym-{fmt}", ExportOptions(format=fmt, dtype=dtype, quant=asym))
        assert plan_bytes(spec, asym, fmt, dtype, vision=spec.vision is not None).total == export_tensor_bytes(out), fmt
    mx = Recipe("mx", (Rule("*.feed_forward.experts.*", MxFp8()),))
    out = convert(scout, tmp_path / "mx", ExportOptions(format="mlx", dtype="bfloat16", quant=mx))
    assert plan_bytes(spec, mx, "mlx", "bfloat16", vision=spec.vision is not None).total == export_tensor_bytes(out)
    with pytest.raises(CapabilityError):
        plan_bytes(spec, mx, "onnx", "float32")


def test_block_and_static_fp8_plans_equal_exports(scout, tmp_path):
    """Square-block FP8 (CPU: tiles; CUDA: QMoE fp8 tiles and MatMulBlockQuantizedFp8Weight's per-row b_scale) and
    static activation scales (one 4-byte input scale per applied linear, one per MoE layer)."""
    from l4export.quant.calib import CalibOptions

    spec = load_spec(scout)
    floats = (Rule("*.feed_forward.router.weight", None), Rule("*norm.weight", None), Rule("model.embed_tokens.weight", None))
    block = Recipe("blk", floats + (Rule("*.feed_forward.experts.*", Fp8(block_size=32)),
                                    Rule("*.self_attn.*_proj.weight", Fp8(block_size=32))))
    for target, dtype in (("cpu", "float32"), ("cuda", "float16")):
        out = convert(scout, tmp_path / f"blk-{target}", ExportOptions(format="onnx", dtype=dtype, target=target, quant=block))
        assert plan_bytes(spec, block, "onnx", dtype, target, vision=spec.vision is not None).total == export_tensor_bytes(out), target
    static = Recipe("st", floats + (Rule("*.feed_forward.experts.*", Fp8("static")),
                                    Rule("*.self_attn.q_proj.weight", Fp8("static"))))
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"input_ids": list(range(4 + n, 36 + n))}) for n in range(4)))
    out = convert(scout, tmp_path / "static", ExportOptions(format="onnx", quant=static,
                                                            calib=CalibOptions(path=calib, samples=4, seqlen=32)))
    assert plan_bytes(spec, static, "onnx", "float32", vision=spec.vision is not None).total == export_tensor_bytes(out)


def test_float_plan_is_the_parameter_count(scout, maverick):
    for src in (scout, maverick):
        spec = Checkpoint(src).spec
        assert plan_bytes(spec, None, "mlx", "bfloat16").total == bf16_bytes(spec) == 2 * spec.total_params
        # ONNX keeps the router and the norms in float32 whatever the graph dtype
        router = sum(spec.num_experts * spec.hidden_size for la in spec.layers if la.is_moe)
        norms = (2 * spec.num_layers + 1) * spec.hidden_size
        assert plan_bytes(spec, None, "onnx", "float16").total == bf16_bytes(spec) + 2 * router + 2 * norms


def test_real_scout_and_maverick_projection():
    """The int4 preset on the released configs (tests/test_spec.py): the figures docs/quantization.md quotes."""
    from test_spec import MAVERICK_TEXT, SCOUT_TEXT

    ratios = {}
    for name, text in (("scout", SCOUT_TEXT), ("maverick", MAVERICK_TEXT)):
        spec = spec_from_config({"model_type": "llama4", "text_config": dict(text)})
        for fmt, dtype in (("mlx", "bfloat16"), ("onnx", "float32"), ("onnx", "float16")):
            ratios[name, fmt, dtype] = plan_bytes(spec, PRESETS["int4"], fmt, dtype).total / bf16_bytes(spec)
    assert ratios["scout", "mlx", "bfloat16"] == pytest.approx(0.2923, abs=5e-5)
    assert ratios["scout", "onnx", "float32"] == pytest.approx(0.2775, abs=5e-5)
    assert ratios["scout", "onnx", "float16"] == pytest.approx(0.2771, abs=5e-5)
    assert ratios["maverick", "mlx", "bfloat16"] == pytest.approx(0.2878, abs=5e-5)
    assert ratios["maverick", "onnx", "float32"] == pytest.approx(0.2726, abs=5e-5)
    assert ratios["maverick", "onnx", "float16"] == pytest.approx(0.2724, abs=5e-5)
