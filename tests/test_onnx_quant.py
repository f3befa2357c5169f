"""ONNX export with ``--quant``: QMoE / MatMulNBits (int4, int8) and FP8 DequantizeLinear, on tiny Scout and Maverick.

Real onnxruntime and transformers throughout. The central check: an int4 export gives the same logits as
transformers running on the same dequantized weights (``scheme.dequantize(scheme.quantize(w))``), so all
of the int4 error is the scheme's, none the lowering's. Run with OMP_NUM_THREADS=1 on shared machines.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

from builders import build  # noqa: E402

from l4export.checkpoint import Checkpoint  # noqa: E402
from l4export.cli import main  # noqa: E402
from l4export.convert import ExportOptions, convert  # noqa: E402
from l4export.plan import make_plan  # noqa: E402
from l4export.quant.recipe import load_recipe  # noqa: E402
from l4export.runtimes import load_runtime  # noqa: E402
from l4export.runtimes.reference import ReferenceRunner, set_canonical_weight  # noqa: E402
from l4export.verify import THRESHOLDS, compare, default_prompts  # noqa: E402

# this module quantizes: scout / maverick are conftest.QUANT_CASES' checkpoints
pytestmark = pytest.mark.quant_checkpoints


log = logging.getLogger(__name__)


def _export(src: Path, out: Path, quant: str, dtype: str = "float32") -> Path:
    if not out.exists():
        convert(src, out, ExportOptions(format="onnx", dtype=dtype, quant=load_recipe(quant)))
    return out


@pytest.fixture(scope="module")
def qexports(scout, maverick, export) -> dict[str, Path]:
    return {f"{name}_{q}": export(src, quant=q) for name, src in (("scout", scout), ("maverick", maverick))
            for q in ("int4", "int4-exact")} | {"scout_fp8": export(scout, quant="fp8")}


def _graph(export: Path) -> onnx.ModelProto:
    return onnx.load(str(export / "model.onnx"), load_external_data=False)


def _ops(export: Path) -> list[str]:
    return [n.op_type for n in _graph(export).graph.node]


def _fake_quant_reference(src: Path, recipe_name: str) -> ReferenceRunner:
    """transformers (float32) with every recipe-quantized weight replaced by dequantize(quantize(w)) (the preset as
    this model takes it: plan.make_plan's recipe)."""
    ckpt = Checkpoint(src)
    recipe = make_plan(ckpt.spec, "onnx", "float32", "cpu", load_recipe(recipe_name)).recipe
    ref = ReferenceRunner(src)
    for name, t in ckpt.tensors.items():
        if (scheme := recipe.scheme_for(name)) is not None:
            set_canonical_weight(ref.model, name, scheme.rtn(t.load(np.float32)))
    return ref


# ---- graph --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["scout", "maverick"])
def test_int4_graph_has_qmoe_and_matmulnbits_and_no_float_moe(model, qexports, request):
    export = qexports[f"{model}_int4"]
    ops = _ops(export)
    spec = load_runtime(export).spec
    n_moe = sum(la.is_moe for la in spec.layers)
    # per MoE layer: the routed experts and the shared expert (a one-expert QMoE), both int4
    assert ops.count("QMoE") == 2 * n_moe and "MoE" not in ops
    assert ops.count("MatMulNBits") > 0
    g = _graph(export).graph
    recipe = load_recipe("int4")
    for qmoe in (n for n in g.node if n.op_type == "QMoE"):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in qmoe.attribute}
        assert attrs["expert_weight_bits"] == 4 and attrs["block_size"] == 64 and attrs["swiglu_fusion"] == 1
        assert attrs["k"] == 1 and attrs["normalize_routing_weights"] == 1
        assert attrs["accuracy_level"] == recipe.scheme_for(qmoe.input[2].replace(".fc1.qweight", ".gate_proj")
                                                            .replace("shared_expert.gate_proj", "shared_expert.gate_proj.weight")).accuracy_level
    for n in g.node:
        if n.op_type == "MatMulNBits":
            name = n.input[1].replace(".qweight", ".weight").replace("qkv_proj", "q_proj").replace("gate_up_proj", "gate_proj")
            level = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}["accuracy_level"]
            assert level == recipe.scheme_for(name).accuracy_level, name
    info = json.loads((export / "l4export.json").read_text())
    assert info["quantization"] == "int4" and info["onnx"]["quant"]["nodes"]["QMoE"] == 2 * n_moe
    # router, norms and embeddings stay float; lm_head is int8 (MatMulNBits)
    floats = {i.name for i in g.initializer if i.data_type == onnx.TensorProto.FLOAT}
    assert all(f"{la}.feed_forward.router.weight" in floats for la in (f"model.layers.{i}" for i in spec.moe_layers))
    assert "lm_head.weight" not in floats
    assert any(n.op_type == "MatMulNBits" and n.input[1].startswith("lm_head") for n in g.node)


# ---- accuracy -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["scout", "maverick"])
def test_int4_exact_equals_transformers_on_the_same_dequantized_weights(model, qexports, request):
    """int4-exact: float activations (accuracy_level 0), so the lowering adds no error to the scheme's."""
    src = request.getfixturevalue(model)
    rt = load_runtime(qexports[f"{model}_int4-exact"])
    fq = _fake_quant_reference(src, "int4-exact")
    ref = ReferenceRunner(src)
    for name, ids in default_prompts(rt.spec):
        got, want = rt.logits(ids), fq.logits(ids)
        rel = float(np.abs(got - want).max() / np.abs(want).max())
        m = compare(ref.logits(ids), got)
        log.info("%s int4 %s: vs dequantized reference rel %.2e; vs float transformers KL %.2e top1 %.3f",
                 model, name, rel, m["kl"], m["top1"])
        assert rel <= 1e-4, (model, name, rel)
        incr = rt.logits_incremental(ids)
        assert float(np.abs(incr - want).max() / np.abs(want).max()) <= 1e-4, (model, name, "incremental")
        assert m["kl"] > 0  # the weights really are quantized


@pytest.mark.parametrize("model", ["scout", "maverick"])
def test_int8_preset_is_8_bits_everywhere_and_near_lossless(model, export, request):
    """The int8 preset (issue 27's 8-bit path): every QMoE and MatMulNBits 8-bit at int8 activations, the embedding
    int8; KL against float transformers well under the int4 preset's and within verify's int8 gate."""
    src = request.getfixturevalue(model)
    out = export(src, quant="int8")
    g = _graph(out).graph
    bits = {n.op_type: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            for n in g.node if n.op_type in ("QMoE", "MatMulNBits")}
    assert bits["QMoE"]["expert_weight_bits"] == 8 and bits["QMoE"]["accuracy_level"] == 4
    assert bits["MatMulNBits"]["bits"] == 8 and bits["MatMulNBits"]["accuracy_level"] == 4
    assert "GatherBlockQuantized" in _ops(out)
    rt, ref = load_runtime(out), ReferenceRunner(src)
    worst = 0.0
    for name, ids in default_prompts(rt.spec):
        m = compare(ref.logits(ids), rt.logits(ids))
        log.info("%s int8 preset %s: KL %.2e top1 %.3f", model, name, m["kl"], m["top1"])
        worst = max(worst, m["kl"])
    assert 0 < worst <= THRESHOLDS["int8"].kl
    r = CliRunner().invoke(main, ["verify", str(out), "--reference", str(src), "--greedy-tokens", "4"])
    assert r.exit_code == 0, r.output


def test_fp8_export_stores_e4m3_and_dequantizes_once_at_load(qexports, scout):
    export = qexports["scout_fp8"]
    g = _graph(export).graph
    fp8 = [i for i in g.initializer if i.data_type == onnx.TensorProto.FLOAT8E4M3FN]
    spec = load_runtime(export).spec
    n_moe = sum(la.is_moe for la in spec.layers)
    assert len(fp8) == 2 * n_moe  # fc1 (gate/up interleaved) and fc2 per MoE layer
    ops = [n.op_type for n in g.node]
    # e4m3 * per-channel scale (Cast -> Mul), then the float MoE; the float shared experts and dense MLPs are MatMuls
    assert ops.count("MoE") == n_moe and "QMoE" not in ops and "DequantizeLinear" not in ops
    # ONNX Runtime folds the dequantization when the session is created: no FP8 tensor is converted per step
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(export.parent / "fp8-optimized.onnx")
    ort.InferenceSession(str(export / "model.onnx"), so, providers=["CPUExecutionProvider"])
    opt = onnx.load(so.optimized_model_filepath, load_external_data=False)
    fp8_names = {i.name for i in fp8}
    assert not any(fp8_names.intersection(n.input) for n in opt.graph.node)
    rt, ref = load_runtime(export), ReferenceRunner(scout)
    ids = default_prompts(spec)[2][1]
    m = compare(ref.logits(ids), rt.logits(ids))
    log.info("scout fp8 vs float transformers: KL %.2e top1 %.3f", m["kl"], m["top1"])
    assert 0 < m["kl"] < 1e-3


# ---- verify -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["scout_int4", "maverick_int4", "scout_fp8"])
def test_verify_passes_tuned_thresholds(which, qexports, request):
    src = request.getfixturevalue(which.split("_")[0])
    r = CliRunner().invoke(main, ["verify", str(qexports[which]), "--reference", str(src), "--greedy-tokens", "4"])
    log.info("%s", r.output)
    assert r.exit_code == 0, r.output
    assert "PASSED" in r.output


def test_verify_fails_a_broken_quantized_export(qexports, scout, tmp_path):
    """Corrupt the int4 codes of one QMoE's fc2 (flip every nibble): verify must exit 1."""
    import shutil

    from builders import patch_initializer

    broken = tmp_path / "broken"
    shutil.copytree(qexports["scout_int4"], broken)
    names = [i.name for i in onnx.load(str(broken / "model.onnx"), load_external_data=False).graph.initializer
             if i.name.endswith("experts.fc2.qweight")]
    for name in names:  # in place, so every graph over model.onnx.data sees it
        patch_initializer(broken, name, lambda a: a ^ np.uint8(0x88))
    assert names
    r = CliRunner().invoke(main, ["verify", str(broken), "--reference", str(scout), "--greedy-tokens", "2"])
    assert r.exit_code == 1, r.output
    assert "FAILED" in r.output


# ---- size -------------------------------------------------------------------------------------------


def test_int4_export_is_under_030_of_bf16_when_experts_dominate(tmp_path):
    """hidden 128, 128 experts of width 128 on every layer: routed experts are ~97% of the weights."""
    src = build(tmp_path / "big", shape="maverick", style="hub", dtype="bfloat16", hidden_size=128, intermediate_size=128,
                intermediate_size_mlp=256, num_local_experts=128, interleave_moe_layer_step=1, num_hidden_layers=2,
                head_dim=32, max_shard_size=None)
    ckpt = Checkpoint(src)
    params = sum(int(np.prod(t.shape)) for t in ckpt.tensors.values())
    out = {}
    for dtype in ("float16", "float32"):
        out[dtype] = tmp_path / f"int4_{dtype}"
        convert(src, out[dtype], ExportOptions(format="onnx", dtype=dtype, quant=load_recipe("int4")))
    ratio = {d: (p / "model.onnx.data").stat().st_size / (2 * params) for d, p in out.items()}
    log.info("int4 export / bf16 (2 bytes x %d params): float16 graph %.3f, float32 graph %.3f", params,
             ratio["float16"], ratio["float32"])
    # experts: 0.5 + 2/64 bytes per int4 weight (fp16 scales in both graphs) = 0.266 of bf16
    assert ratio["float16"] <= 0.30, ratio
    assert ratio["float32"] <= 0.30, ratio


# ---- calibration ----------------------------------------------------------------------------------------


def test_calibrated_int4_export_writes_report_and_runs(scout, tmp_path):
    rng = np.random.default_rng(0)
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"input_ids": rng.integers(4, 300, 24).tolist()}) for _ in range(4)))
    out = tmp_path / "calibrated"
    r = CliRunner().invoke(main, ["convert", str(scout), "-o", str(out), "--format", "onnx", "--quant", "int4",
                                  "--calib", str(calib), "--calib-samples", "4", "--calib-seqlen", "24"])
    assert r.exit_code == 0, r.output
    for f in ("quant_report.json", "tokens_per_expert.png", "expert_sqnr.png", "size_by_component.png"):
        assert (out / f).is_file(), f
    report = json.loads((out / "quant_report.json").read_text())
    assert report["calibration"]["samples"] == 4
    assert not list(out.glob("l4export-calib-*")) and not list(out.parent.glob(".*"))  # spilled codes are gone
    info = json.loads((out / "l4export.json").read_text())
    assert info["quant"]["calibrated"] is True and info["quant"]["calibration"]["samples"] == 4
    rt, ref = load_runtime(out), ReferenceRunner(scout)
    ids = default_prompts(rt.spec)[2][1]
    m = compare(ref.logits(ids), rt.logits(ids))
    log.info("scout int4 GPTQ vs float transformers: KL %.2e top1 %.3f", m["kl"], m["top1"])
    assert np.isfinite(m["kl"]) and m["kl"] <= THRESHOLDS["int4"].kl  # verify's own gate


# ---- bad input --------------------------------------------------------------------------------------


def test_recipe_group_size_not_dividing_is_exit_2_and_writes_nothing(scout, tmp_path):
    recipe = tmp_path / "g128.toml"
    # q_proj's input dim is hidden_size = 64: a group of 128 cannot divide it
    recipe.write_text('[[rule]]\nmatch = "*.self_attn.*_proj.weight"\nscheme = "int4"\ngroup_size = 128\n')
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["convert", str(scout), "-o", str(out), "--format", "onnx", "--quant", str(recipe)])
    assert r.exit_code == 2, r.output
    assert "group size 128" in r.output and "64" in r.output
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_unknown_recipe_key_is_exit_2(scout, tmp_path):
    recipe = tmp_path / "typo.toml"
    recipe.write_text('[[rule]]\nmatch = "*.feed_forward.experts.*"\nscheme = "int4"\ngroup = 32\n')
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["convert", str(scout), "-o", str(out), "--format", "onnx", "--quant", str(recipe)])
    assert r.exit_code == 2, r.output
    assert "unknown key 'group'" in r.output
    assert not out.exists()


# ---- ONNX vs MLX ------------------------------------------------------------------------------------


@pytest.mark.mlx
def test_onnx_and_mlx_int4_exports_of_one_recipe_agree(qexports, maverick, tmp_path):
    """The int4 preset through both exporters reads the same grid: MLX (float activations) and ONNX int4-exact
    (the same weights at accuracy_level 0) give the same logits."""
    out = tmp_path / "maverick_mlx_int4"
    convert(maverick, out, ExportOptions(format="mlx", quant=load_recipe("int4")))
    mlx_rt, onnx_rt = load_runtime(out), load_runtime(qexports["maverick_int4-exact"])
    for name, ids in default_prompts(onnx_rt.spec):
        a, b = mlx_rt.logits(ids), onnx_rt.logits(ids)
        rel = float(np.abs(a - b).max() / np.abs(b).max())
        log.info("maverick int4 MLX vs ONNX %s: rel %.2e", name, rel)
        assert rel <= 1e-4, (name, rel)
