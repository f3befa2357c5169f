"""FP8 for ONNX: square-block FP8, static activation scales (CPU, run), and the CUDA-native form (checked
structurally: no GPU here; the CUDA parity test skips without CUDAExecutionProvider).

Real onnxruntime and transformers throughout; the tiny quantization fixtures (conftest.QUANT) stand in for
``scout``/``maverick``. Run with OMP_NUM_THREADS=1 on shared machines.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

from builders import patch_initializer  # noqa: E402
from l4export.checkpoint import Checkpoint  # noqa: E402
from l4export.cli import main  # noqa: E402
from l4export.convert import ExportOptions, convert  # noqa: E402
from l4export.errors import CapabilityError, RecipeError  # noqa: E402
from l4export.quant.calib_data import read_calibration  # noqa: E402
from l4export.quant.calib import CalibOptions, calibrate  # noqa: E402
from l4export.quant.pack import to_matmul_fp8, to_qmoe_fp8  # noqa: E402
from l4export.quant.recipe import PRESETS, Recipe, Rule, canonical_shapes, load_recipe  # noqa: E402
from l4export.quant.schemes import FP8, Fp8  # noqa: E402
from l4export.runtimes import load_runtime  # noqa: E402
from l4export.runtimes.reference import ReferenceRunner, set_canonical_weight  # noqa: E402
from l4export.verify import THRESHOLDS, compare, default_prompts  # noqa: E402

# this module quantizes: scout / maverick are conftest.QUANT_CASES' checkpoints
pytestmark = pytest.mark.quant_checkpoints

log = logging.getLogger(__name__)


# The fixtures are 64 wide (hidden and expert width), so tiles of 32 stand in for the real models' 128.
_FLOAT = "".join(f'[[rule]]\nmatch = "{m}"\nscheme = "float"\n' for m in
                 ("*.feed_forward.router.weight", "*norm.weight", "model.embed_tokens.weight", "lm_head.weight"))
RECIPES = {
    # static input scales on routed experts and attention, per-channel weights (CPU)
    "fp8-static": _FLOAT + '[[rule]]\nmatch = "*.feed_forward.experts.*"\nscheme = "fp8"\nactivation = "static"\n'
                           '[[rule]]\nmatch = "*.self_attn.*_proj.weight"\nscheme = "fp8"\nactivation = "static"\n',
    # the CUDA-native form: block experts (QMoE fp8), per-channel attention (MatMulBlockQuantizedFp8Weight)
    "fp8-block": _FLOAT + '[[rule]]\nmatch = "*.feed_forward.experts.*"\nscheme = "fp8"\nblock_size = 32\n'
                          '[[rule]]\nmatch = "*.self_attn.*_proj.weight"\nscheme = "fp8"\n',
    # the same with static scales (a_scale on MatMulBlockQuantizedFp8Weight, Q -> Cast*s before QMoE)
    "fp8-block-static": _FLOAT + '[[rule]]\nmatch = "*.feed_forward.experts.*"\nscheme = "fp8"\nblock_size = 32\n'
                                 'activation = "static"\n'
                                 '[[rule]]\nmatch = "*.self_attn.*_proj.weight"\nscheme = "fp8"\nactivation = "static"\n',
}


def _recipe_file(root: Path, name: str) -> Path:
    p = root / f"{name}.toml"
    if not p.exists():
        p.write_text(f'name = "{name}"\n' + RECIPES[name])
    return p


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx_fp8")


@pytest.fixture(scope="module")
def calib_file(root) -> Path:
    rng = np.random.default_rng(0)
    p = root / "calib.jsonl"
    p.write_text("\n".join(json.dumps({"input_ids": rng.integers(4, 300, 24).tolist()}) for _ in range(8)))
    return p


def _calib(path: Path) -> CalibOptions:
    return CalibOptions(path=path, samples=8, seqlen=24)


def _export(src: Path, out: Path, recipe: Path, dtype: str = "float32", target: str = "cpu",
            calib: Path | None = None) -> Path:
    if not out.exists():
        convert(src, out, ExportOptions(format="onnx", dtype=dtype, target=target, quant=load_recipe(str(recipe)),
                                        calib=None if calib is None else _calib(calib)))
    return out


@pytest.fixture(scope="module")
def static_cpu(root, scout, calib_file) -> Path:
    return _export(scout, root / "static_cpu", _recipe_file(root, "fp8-static"), calib=calib_file)


def _initializers(export: Path) -> dict[str, np.ndarray]:
    m = onnx.load(str(export / "model.onnx"), load_external_data=True)
    return {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}


# ---- the block scheme -----------------------------------------------------------------------------------


def test_block_fp8_round_trip():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((3, 64, 96)) * rng.uniform(0.01, 2, (3, 64, 1))).astype(np.float32)
    w[1, :32, 32:64] = 0.0  # an all-zero tile gets scale 1, codes 0
    s = Fp8(block_size=32)
    qt = s.quantize(w)
    assert s.name == "fp8-e4m3-block32" and qt.q.dtype == FP8 and qt.scale.shape == (3, 64, 3)
    tiles = s.block_scales(qt)  # [E, out/b, in/b]
    assert tiles.shape == (3, 2, 3)
    # one scale per 32 x 32 tile: absmax/448 of the tile, repeated over its rows
    amax = np.abs(w).reshape(3, 2, 32, 3, 32).max(axis=(2, 4))
    np.testing.assert_array_equal(tiles, np.where(amax > 0, (amax / np.float32(448)).astype(np.float32), 1.0))
    np.testing.assert_array_equal(qt.scale, np.repeat(tiles, 32, axis=1))
    assert tiles[1, 0, 1] == 1.0 and not qt.q[1, :32, 32:64].astype(np.float32).any()
    # dequantize is q * tile scale, one float32 multiply
    ref = qt.q.astype(np.float32) * np.repeat(np.repeat(tiles, 32, 1), 32, 2)
    np.testing.assert_array_equal(qt.dequantize(), ref)
    # no code saturates and the error is FP8's: |err| <= half an e4m3 step (2^-3 relative) of the tile's scale
    assert np.abs(qt.q.astype(np.float32)).max() <= 448
    assert np.all(np.abs(qt.dequantize() - w) <= np.repeat(np.repeat(tiles, 32, 1), 32, 2) * 448 * 2.0**-4 + 1e-12)
    # re-encoding the dequantized tensor on the same scales is exact (what GPTQ's with_scales relies on)
    np.testing.assert_array_equal(s.with_scales(qt.dequantize(), qt.scale, None).dequantize(), qt.dequantize())
    # one 4-byte scale per tile, not per row
    assert qt.nbytes == w.size + tiles.size * 4
    # block 0 is per channel, unchanged
    assert Fp8().quantize(w).scale.shape == (3, 64, 1)


def test_block_fp8_bad_values_are_recipe_errors(tmp_path):
    with pytest.raises(RecipeError, match="block_size=100"):
        Fp8(block_size=100)
    with pytest.raises(RecipeError, match="output dimension 48"):
        Fp8(block_size=32).quantize(np.ones((48, 64), np.float32))
    r = Recipe("r", (Rule("*", Fp8(block_size=64)),))
    with pytest.raises(RecipeError, match="does not divide .* output dimension 32"):
        r.validate({"model.layers.0.feed_forward.experts.gate_proj": (4, 32, 64)})
    p = tmp_path / "bad.toml"
    p.write_text('[[rule]]\nmatch = "*"\nscheme = "fp8"\nblock_size = "128"\n')
    with pytest.raises(RecipeError, match="block_size must be an integer"):
        load_recipe(str(p))
    p.write_text('[[rule]]\nmatch = "*"\nscheme = "fp8"\nblock_size = 128\nactivation = "static"\n')
    assert load_recipe(str(p)).rules[0].scheme == Fp8(activation="static", block_size=128)


def test_packers_follow_the_documented_formulas():
    """QMoE fp8: w[e, n, k] * scales[e, n // b, k // b] over fc1 = [gate; up]; MatMulBlockQuantizedFp8Weight:
    B[n, k] * b_scale[n, k // block_size]. Both equal QTensor.dequantize() exactly."""
    rng = np.random.default_rng(2)
    s = Fp8(block_size=32)
    gate, up, down = (s.quantize(rng.standard_normal(sh).astype(np.float32)) for sh in ((4, 64, 96), (4, 64, 96), (4, 96, 64)))
    p = to_qmoe_fp8(gate, up, down)
    fc1 = _qmoe_fp8_dequant(p["fc1"], p["fc1_scales"], p["block_size"])
    np.testing.assert_array_equal(fc1, np.concatenate([gate.dequantize(), up.dequantize()], axis=1))
    np.testing.assert_array_equal(_qmoe_fp8_dequant(p["fc2"], p["fc2_scales"], 32), down.dequantize())
    for scheme in (Fp8(), Fp8(block_size=32)):
        qt = scheme.quantize(rng.standard_normal((64, 96)).astype(np.float32))
        m = to_matmul_fp8(qt)
        np.testing.assert_array_equal(_matmul_fp8_dequant(m["B"], m["b_scale"], m["block_size"]), qt.dequantize())


def _qmoe_fp8_dequant(w: np.ndarray, scales: np.ndarray, b: int) -> np.ndarray:
    """QMoE's documented FP8 formula: dequantized[e, n, k] = float(weight[e, n, k]) * scale[e, n / b, k / b]."""
    _, n, k = w.shape
    rows, cols = np.arange(n) // b, np.arange(k) // b
    return w.astype(np.float32) * scales[:, rows][:, :, cols]


def _matmul_fp8_dequant(w: np.ndarray, b_scale: np.ndarray, block: int) -> np.ndarray:
    """MatMulBlockQuantizedFp8Weight's documented formula: B_scaled[n, k] = fp8(B[n, k]) * b_scale[n, k / block]."""
    return w.astype(np.float32) * b_scale[:, np.arange(w.shape[1]) // block]


# ---- bad requests: one line, exit 2, nothing written ------------------------------------------------------


def _refused(src: Path, tmp_path: Path, recipe: Path, *args: str) -> str:
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--quant", str(recipe), *args])
    assert r.exit_code == 2, r.output
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())
    assert len(r.output.strip().splitlines()) == 1, r.output
    return r.output


def test_static_without_calibration_is_exit_2(scout, tmp_path):
    msg = _refused(scout, tmp_path, _recipe_file(tmp_path, "fp8-static"))
    assert "static" in msg and "--calib" in msg


def test_per_channel_experts_on_cuda_are_refused(scout, tmp_path):
    p = tmp_path / "fp8.toml"
    p.write_text(_FLOAT + '[[rule]]\nmatch = "*.feed_forward.experts.*"\nscheme = "fp8"\n')
    msg = _refused(scout, tmp_path, p, "--target", "cuda")
    assert "block_size = 128" in msg and "experts" in msg
    with pytest.raises(CapabilityError, match="block_size = 128"):
        PRESETS["fp8"].check_target("onnx", "cuda", names=list(Checkpoint(scout).tensors))
    PRESETS["fp8"].check_target("onnx", "cpu", names=list(Checkpoint(scout).tensors))  # the DQ form: fine


def test_static_lm_head_is_refused(scout, tmp_path, calib_file):
    p = tmp_path / "head.toml"
    p.write_text('[[rule]]\nmatch = "lm_head.weight"\nscheme = "fp8"\nactivation = "static"\n')
    msg = _refused(scout, tmp_path, p, "--calib", str(calib_file))
    assert "lm_head.weight" in msg and "dynamic" in msg


def test_block_fp8_on_mlx_becomes_mxfp8():
    from l4export.plan import mlx_recipe
    from l4export.quant.schemes import MxFp8

    r = mlx_recipe(Recipe("b", (Rule("*.experts.*", Fp8(block_size=128)),)))
    assert r.rules[0].scheme == MxFp8()
    Recipe("b", (Rule("*", Fp8(block_size=128)),)).check_target("mlx", "any")
    with pytest.raises(CapabilityError, match="static"):
        Recipe("b", (Rule("*", Fp8("static", 128)),)).check_target("mlx", "any")


# ---- static activation scales on CPU (run) ----------------------------------------------------------------


def _emulation(src: Path, recipe: Recipe, calib_file: Path) -> tuple[ReferenceRunner, dict]:
    """transformers float32 with every quantized weight replaced by its calibrated dequantized tensor and the
    graph's activation fake-quantization, fp8(x / s) * s, on the same inputs: each static dense linear's input
    (its own scale) and the routed experts' input (max over experts of the gate/up scales)."""
    ck, c = Checkpoint(src), _calib(calib_file)
    result = calibrate(ck, recipe.plan(canonical_shapes(ck.spec)), read_calibration(c.path, ck.spec.vocab_size, ck.path, c.samples, c.seqlen), c)
    ref = ReferenceRunner(src)
    modules = dict(ref.model.named_modules())

    def fake_quant(s: float):
        def hook(module, args):
            x = args[0]
            q = torch.clamp(x.float() / s, -448, 448).to(torch.float8_e4m3fn).float() * s
            return (q.to(x.dtype),) + tuple(args[1:])
        return hook

    for name, qt in result.tensors.items():
        set_canonical_weight(ref.model, name, qt.dequantize())
    for name, scales in result.act_scales.items():
        if name.endswith("experts.down_proj") or name.endswith("experts.up_proj"):
            continue  # down: inside the fused op, not applied; up: same input as gate
        if name.endswith("experts.gate_proj"):
            s = float(max(scales.max(), result.act_scales[name.replace("gate_proj", "up_proj")].max()))
            modules[name.rsplit(".", 1)[0]].register_forward_pre_hook(fake_quant(s))
        else:
            modules[name[: -len(".weight")]].register_forward_pre_hook(fake_quant(float(scales.max())))
    return ref, result.act_scales


def test_static_cpu_export_equals_emulation(static_cpu, scout, root, calib_file):
    """ONNX (Q -> Cast*s, stored FP8 + DQ) == transformers with the same fake-quantized weights and inputs."""
    ops = [n.op_type for n in onnx.load(str(static_cpu / "model.onnx"), load_external_data=False).graph.node]
    spec = load_runtime(static_cpu).spec
    n_moe = sum(la.is_moe for la in spec.layers)
    assert ops.count("QuantizeLinear") == 4 * spec.num_layers + n_moe  # q, k, v, o + one before each MoE
    emu, act = _emulation(scout, load_recipe(str(_recipe_file(root, "fp8-static"))), calib_file)
    # l4export.json records every calibrated scale, per expert for routed experts (down_proj included)
    q = json.loads((static_cpu / "l4export.json").read_text())["onnx"]["quant"]
    assert set(q["activation_scales"]) == set(act)
    down = "model.layers.0.feed_forward.experts.down_proj"
    assert len(q["activation_scales"][down]) == spec.num_experts
    np.testing.assert_allclose(q["activation_scales"][down], act[down], rtol=0)
    assert "model.layers.0.feed_forward.experts.input_scale" in q["activation_scales_applied"]
    rt, ref = load_runtime(static_cpu), ReferenceRunner(scout)
    for name, ids in default_prompts(rt.spec):
        got, want = rt.logits(ids), emu.logits(ids)
        rel = float(np.abs(got - want).max() / np.abs(want).max())
        m = compare(ref.logits(ids), got)
        log.info("scout fp8-static %s: vs emulation rel %.2e; vs float transformers KL %.2e top1 %.3f rel %.2e",
                 name, rel, m["kl"], m["top1"], m["rel"])
        assert rel <= 1e-4, (name, rel)
        assert 0 < m["kl"] < THRESHOLDS["fp8"].kl


def test_static_cpu_export_passes_verify_and_a_corrupted_scale_fails(static_cpu, scout, tmp_path):
    r = CliRunner().invoke(main, ["verify", str(static_cpu), "--reference", str(scout), "--greedy-tokens", "4"])
    log.info("%s", r.output)
    assert r.exit_code == 0 and "PASSED" in r.output, r.output
    size = (static_cpu / "model.onnx.data").stat().st_size
    log.info("fp8-static export: %d bytes of weights", size)
    # one routed-experts input scale 1000x too small: nearly every input saturates at +-448 s
    broken = tmp_path / "broken"
    shutil.copytree(static_cpu, broken)
    patch_initializer(broken, "model.layers.1.feed_forward.experts.input_scale", lambda a: a * np.float32(1e-3))
    r = CliRunner().invoke(main, ["verify", str(broken), "--reference", str(scout), "--greedy-tokens", "2"])
    assert r.exit_code == 1 and "FAILED" in r.output, r.output


def test_block_fp8_cpu_export_equals_transformers_on_the_same_weights(root, scout):
    """Block FP8 on --target cpu (Cast * tile scale, gate/up interleaved after dequantization) is exact."""
    out = _export(scout, root / "block_cpu", _recipe_file(root, "fp8-block"))
    recipe = load_recipe(str(_recipe_file(root, "fp8-block")))
    ref = ReferenceRunner(scout)
    for name, t in Checkpoint(scout).tensors.items():
        if (scheme := recipe.scheme_for(name)) is not None:
            set_canonical_weight(ref.model, name, scheme.rtn(t.load(np.float32)))
    rt = load_runtime(out)
    ids = default_prompts(rt.spec)[2][1]
    got, want = rt.logits(ids), ref.logits(ids)
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    log.info("scout fp8 block32 CPU vs transformers on the same weights: rel %.2e", rel)
    assert rel <= 1e-4


# ---- the CUDA form (structural: no GPU here) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_exports(root, scout, calib_file) -> dict[str, Path]:
    return {
        "bfloat16": _export(scout, root / "cuda_bf16", _recipe_file(root, "fp8-block"), "bfloat16", "cuda"),
        "float16": _export(scout, root / "cuda_f16_static", _recipe_file(root, "fp8-block-static"), "float16", "cuda",
                           calib=calib_file),
    }


def _single_node(model: onnx.ModelProto, op: str, elem: int) -> bytes:
    """The first ``op`` node of the export with its own initializers, as a one-node model."""
    inits = {i.name: i for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == op)
    rank = ["T", "K"] if op == "QMoE" else ["B", "S", "K"]
    ins = [onnx.helper.make_tensor_value_info(n, elem, rank) for n in node.input if n and n not in inits]
    g = onnx.helper.make_graph([node], op, ins, [onnx.helper.make_tensor_value_info(node.output[0], elem, rank)],
                               [inits[n] for n in node.input if n in inits])
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 21), onnx.helper.make_opsetid("com.microsoft", 1)],
                               ir_version=10)
    onnx.checker.check_model(m, full_check=True)
    return m.SerializeToString()


def _not_implemented_only(model: bytes | str, op: str) -> None:
    """ORT CPU resolves the graph (schema and type inference) and fails only at kernel lookup for ``op``."""
    with pytest.raises(Exception) as err:
        ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    assert "NOT_IMPLEMENTED" in str(err.value) and op in str(err.value), str(err.value)[:400]


def test_cuda_graph_has_native_fp8_ops_and_only_lacks_cpu_kernels(cuda_exports):
    for dtype, export in cuda_exports.items():
        onnx.checker.check_model(str(export / "model.onnx"), full_check=True)
        m = onnx.load(str(export / "model.onnx"), load_external_data=True)
        cfg = json.loads((export / "l4export.json").read_text())["onnx"]
        ops = [n.op_type for n in m.graph.node]
        assert "DequantizeLinear" not in ops
        # float MoE nodes only for the (float) shared experts: the routed experts are QMoE fp8
        assert all(".shared_expert." in n.input[2] for n in m.graph.node if n.op_type == "MoE")
        assert ops.count("QMoE") == cfg["quant"]["nodes"]["QMoE"] > 0
        assert ops.count("MatMulBlockQuantizedFp8Weight") == cfg["quant"]["nodes"]["MatMulBlockQuantizedFp8Weight"] > 0
        qmoe = next(n for n in m.graph.node if n.op_type == "QMoE")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in qmoe.attribute}
        assert attrs["quant_type"] == b"fp8" and attrs["block_size"] == 32 and attrs["expert_weight_bits"] == 8
        assert attrs["swiglu_fusion"] == 2 and attrs["k"] == 1 and attrs["normalize_routing_weights"] == 1
        mm = next(n for n in m.graph.node if n.op_type == "MatMulBlockQuantizedFp8Weight")
        assert {a.name: onnx.helper.get_attribute_value(a) for a in mm.attribute}["block_size"] == 64  # = K: per channel
        elem = onnx.TensorProto.BFLOAT16 if dtype == "bfloat16" else onnx.TensorProto.FLOAT16
        _not_implemented_only(_single_node(m, "QMoE", elem), "QMoE")
        if dtype == "bfloat16":
            # fp16 graphs on ORT CPU get "precision-free" casts inserted in front of ops without fp16 CPU kernels,
            # which then fail type checking; bf16 graphs do not, so they show the whole graph resolves.
            _not_implemented_only(_single_node(m, "MatMulBlockQuantizedFp8Weight", elem), "MatMulBlockQuantizedFp8Weight")
            _not_implemented_only(str(export / "model.onnx"), "MatMulBlockQuantizedFp8Weight")
    # control: a wrongly typed scale is a type error at graph resolution, not a missing kernel
    m = onnx.load(str(cuda_exports["bfloat16"] / "model.onnx"), load_external_data=True)
    for i in m.graph.initializer:
        if i.name.endswith("qkv_proj.weight_scale"):
            i.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(i).astype(np.float16), i.name))
            break
    else:
        raise AssertionError("no qkv_proj.weight_scale initializer")
    with pytest.raises(Exception, match="INVALID_GRAPH|Type Error"):
        ort.InferenceSession(_single_node(m, "MatMulBlockQuantizedFp8Weight", onnx.TensorProto.BFLOAT16),
                             providers=["CPUExecutionProvider"])


def test_cuda_initializers_dequantize_to_our_tensors(cuda_exports, scout):
    """The ops' documented formulas on the stored bytes == QTensor.dequantize() (RTN export, no calibration)."""
    inits = _initializers(cuda_exports["bfloat16"])
    recipe = load_recipe(str(cuda_exports["bfloat16"].parent / "fp8-block.toml"))
    ckpt = Checkpoint(scout)
    pre = "model.layers.0"
    qt = {n: recipe.scheme_for(f"{pre}.feed_forward.experts.{n}").quantize(ckpt[f"{pre}.feed_forward.experts.{n}"].load(np.float32))
          for n in ("gate_proj", "up_proj", "down_proj")}
    fc1 = _qmoe_fp8_dequant(inits[f"{pre}.feed_forward.experts.fc1.weight_fp8"],
                            inits[f"{pre}.feed_forward.experts.fc1.block_scale"], 32)
    np.testing.assert_array_equal(fc1, np.concatenate([qt["gate_proj"].dequantize(), qt["up_proj"].dequantize()], 1))
    fc2 = _qmoe_fp8_dequant(inits[f"{pre}.feed_forward.experts.fc2.weight_fp8"],
                            inits[f"{pre}.feed_forward.experts.fc2.block_scale"], 32)
    np.testing.assert_array_equal(fc2, qt["down_proj"].dequantize())
    # q, k and v of one scheme are one stored linear, their rows concatenated
    want = np.concatenate([recipe.scheme_for(n).quantize(ckpt[n].load(np.float32)).dequantize()
                           for n in (f"{pre}.self_attn.{p}_proj.weight" for p in "qkv")])
    w8, sc = inits[f"{pre}.self_attn.qkv_proj.weight_fp8"], inits[f"{pre}.self_attn.qkv_proj.weight_scale"]
    assert w8.shape == want.shape and sc.shape == (want.shape[0], 1)
    np.testing.assert_array_equal(_matmul_fp8_dequant(w8, sc, w8.shape[1]), want)
    # static: a_scale is a float32 scalar on every dense FP8 op (static q, k, v stay three linears); the experts'
    # scale feeds the Q before QMoE
    name = f"{pre}.self_attn.q_proj.weight"
    static = _initializers(cuda_exports["float16"])
    q = json.loads((cuda_exports["float16"] / "l4export.json").read_text())["onnx"]["quant"]
    a = static[f"{pre}.self_attn.q_proj.input_scale"]
    assert a.shape == () and a.dtype == np.float32
    assert float(a) == np.float32(max(q["activation_scales"][name]))
    e = static[f"{pre}.feed_forward.experts.input_scale"]
    assert float(e) == np.float32(max(q["activation_scales"][f"{pre}.feed_forward.experts.gate_proj"]))


@pytest.mark.gpu
def test_cuda_fp8_parity(cuda_exports, scout):
    """KL vs transformers under the fp8 verify threshold on a GPU (QMoE fp8 needs SM90 and a USE_FP8_QMOE build)."""
    if ", fp8-qmoe=" not in ort.get_build_info():
        pytest.skip("this onnxruntime build has no FP8 QMoE kernels (USE_FP8_QMOE off)")
    ref = ReferenceRunner(scout)
    for export in cuda_exports.values():
        rt = load_runtime(export, provider="cuda")
        for name, ids in default_prompts(rt.spec):
            m = compare(ref.logits(ids), rt.logits(ids))
            log.info("%s %s: KL %.2e top1 %.3f", export.name, name, m["kl"], m["top1"])
            assert m["kl"] < THRESHOLDS["fp8"].kl, (export.name, name, m)
