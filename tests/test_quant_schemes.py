"""Schemes round trip, and the packed layouts run on the real ops: onnxruntime MatMulNBits / QMoE / DequantizeLinear,
mlx mx.quantize / mx.dequantize."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from l4export.errors import RecipeError
from l4export.quant.pack import (mlx_config_entry, qmoe_scales, qmoe_weights, qmoe_zero_points, to_matmulnbits,
                                 to_mlx, to_onnx_fp8)
from l4export.quant.schemes import FP8, Fp8, Int, MxFp8, QTensor, grouped, sqnr_db

RNG = np.random.default_rng(0)
# rows with very different magnitudes per expert, so one scale across experts would show
W = (RNG.standard_normal((3, 16, 128)) * np.exp(RNG.standard_normal((3, 16, 1)))).astype(np.float32)

# ---- test-side views of the packed layouts (the exporters write them part by part) -----------------------------
def unpack_nibbles(p: np.ndarray) -> np.ndarray:
    out = np.empty(p.shape[:-1] + (p.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = p & 0x0F
    out[..., 1::2] = p >> 4
    return out


def to_qmoe(gate: QTensor, up: QTensor, down: QTensor) -> dict[str, np.ndarray | int | None]:
    """Stacked experts (gate/up ``[E, I, H]``, down ``[E, H, I]``) as QMoE fc1/fc2 (swiglu_fusion=1).

    Zero points are returned for asymmetric schemes only; symmetric codes are stored ``q+8`` and QMoE's
    default zero point (2^(bits-1)) reads them."""
    s = gate.scheme
    sym = s.symmetric and down.scheme.symmetric
    return {"fc1": qmoe_weights(gate, up), "fc1_scales": qmoe_scales(gate, up), "fc2": qmoe_weights(down),
            "fc2_scales": qmoe_scales(down), "fc1_zero_points": None if sym else qmoe_zero_points(gate, up),
            "fc2_zero_points": None if sym else qmoe_zero_points(down),
            "expert_weight_bits": s.bits, "block_size": s.group_size}


INTS = [Int(4, g, sym) for g in (32, 64, 128) for sym in (True, False)] + [Int(8, 32, True), Int(8, 64, False)]
# below 4 bits and between (MLX reads 2, 3, 4, 5, 6, 8; ONNX Runtime CPU 2, 4, 8)
LOW = [Int(2, 32, False), Int(2, 64, True), Int(3, 64, False), Int(3, 32, True), Int(5, 32, False), Int(6, 64, True)]
ORT_INTS = INTS + [s for s in LOW if s.bits == 2]


@pytest.mark.parametrize("scheme", INTS + LOW, ids=lambda s: s.name)
def test_int_round_trip_bounded_and_exact_on_grid(scheme):
    qt = scheme.quantize(W)
    assert qt.q.dtype == np.uint8 and qt.q.max() <= scheme.qmax
    assert qt.scale.shape == (3, 16, 128 // scheme.group_size)  # per expert, per row, per group
    d = qt.dequantize()
    # error at most half a step, except symmetric's clipped positive extreme (one step)
    step = np.repeat(qt.scale, scheme.group_size, axis=-1)
    bound = step * (1.0 if scheme.symmetric else 0.5) + 1e-6
    assert np.all(np.abs(d - W) <= bound)
    # values already on the grid come back exactly (same grid: re-fitting a symmetric absmax/8 grid on
    # clipped values would pick a smaller scale)
    again = scheme.with_scales(d, qt.scale, qt.zero)
    np.testing.assert_array_equal(again.q, qt.q)
    np.testing.assert_array_equal(again.dequantize(), d)
    floor = {2: 4.0, 3: 10.0, 4: 18.0, 5: 24.0, 6: 30.0, 8: 40.0}[scheme.bits]
    assert sqnr_db(W, d) > floor


def test_int4_symmetric_codes_are_q_plus_8():
    qt = Int(4, 32, True).quantize(W)
    assert np.all(qt.zero == 8)
    q_signed = qt.q.astype(int) - 8
    assert q_signed.min() >= -8 and q_signed.max() <= 7
    amax = np.abs(grouped(W, 32)).max(-1)
    np.testing.assert_allclose(qt.scale, amax / 8, rtol=2**-10)  # Meta's int4_row_quantize scale, on the fp16 grid
    assert np.all(qt.scale >= amax / 8) and np.array_equal(qt.scale.astype(np.float16).astype(np.float32), qt.scale)


def test_scales_are_per_expert():
    w = W.copy()
    w[1] *= 1000.0
    a, b = Int(4, 32, True).quantize(W), Int(4, 32, True).quantize(w)
    np.testing.assert_array_equal(a.q[0], b.q[0])
    np.testing.assert_array_equal(a.scale[0], b.scale[0])


def test_fp8_per_channel_round_trip():
    qt = Fp8().quantize(W)
    assert qt.q.dtype == FP8 and qt.scale.shape == (3, 16, 1)
    assert np.abs(qt.q.astype(np.float32)).max() <= 448
    d = qt.dequantize()
    assert np.all(np.isfinite(d))
    np.testing.assert_allclose(d, W, rtol=2**-4, atol=1e-6)  # e4m3: 3 mantissa bits, half-ulp 2^-4
    assert np.array_equal(Fp8().with_scales(d, qt.scale, None).dequantize(), d)
    assert sqnr_db(W, d) > 28


def test_zero_tensor_stays_finite():
    z = np.zeros((2, 4, 128), np.float32)
    for s in INTS + [Fp8(), MxFp8()]:
        d = s.quantize(z).dequantize()
        assert np.all(np.isfinite(d)) and not d.any()


def test_group_size_must_divide():
    with pytest.raises(RecipeError, match="does not divide"):
        Int(4, 64, True).quantize(np.ones((4, 96), np.float32))
    with pytest.raises(RecipeError, match="32, 64 or 128"):
        Int(4, 48, True)


# ---- MLX -------------------------------------------------------------------------------------------------
@pytest.mark.mlx
@pytest.mark.parametrize("scheme", INTS + LOW, ids=lambda s: s.name)
def test_mlx_affine_layout_matches_mx_dequantize(scheme):
    import mlx.core as mx

    qt = scheme.quantize(W)
    p = to_mlx(qt)
    assert p["weight"].dtype == np.uint32 and p["weight"].shape == (3, 16, 128 * scheme.bits // 32)
    d = np.array(mx.dequantize(mx.array(p["weight"]), mx.array(p["scales"]), mx.array(p["biases"]),
                               group_size=scheme.group_size, bits=scheme.bits))
    g = scheme.group_size
    mine = np.repeat(p["scales"], g, -1) * qt.q.astype(np.float32) + np.repeat(p["biases"], g, -1)
    np.testing.assert_array_equal(d, mine)  # bit-exact: w = scale*q + bias
    np.testing.assert_allclose(d, qt.dequantize(), atol=4e-6)  # (q - zp)*scale, as ORT computes it
    assert mlx_config_entry(qt) == {"group_size": g, "bits": scheme.bits, "mode": "affine"}


@pytest.mark.mlx
def test_mlx_quantize_reads_our_affine_bytes():
    """mx.quantize of values already on our grid: its packing has our shape, and its own min/max grid (at most
    as coarse as ours, whose scale is rounded up onto the fp16 grid) reproduces them within one of our steps."""
    import mlx.core as mx

    s = Int(4, 32, False)
    d = s.quantize(W).dequantize()
    qt = s.quantize(d)
    wq, _, _ = mx.quantize(mx.array(d), group_size=32, bits=4)
    back = np.array(mx.dequantize(wq, *mx.quantize(mx.array(d), group_size=32, bits=4)[1:], group_size=32, bits=4))
    assert np.all(np.abs(back - d) <= np.repeat(qt.scale, 32, -1) + 1e-5)
    assert to_mlx(qt)["weight"].shape == tuple(wq.shape)


@pytest.mark.mlx
def test_mxfp8_matches_mx_quantize_bit_exactly():
    import mlx.core as mx

    w = np.concatenate([W, W * 1e-3, W * 300], axis=-1)
    w[0, 0, :32] = 0.0  # an all-zero group
    w[0, 1, :32] = 2.0**-3  # an exact power of two at the edge
    qt = MxFp8().quantize(w)
    p = to_mlx(qt)
    ref_q, ref_s = mx.quantize(mx.array(w), group_size=32, bits=8, mode="mxfp8")
    np.testing.assert_array_equal(p["weight"], np.array(ref_q))
    np.testing.assert_array_equal(p["scales"], np.array(ref_s))
    d = mx.dequantize(ref_q, ref_s, group_size=32, bits=8, mode="mxfp8").astype(mx.float32)
    np.testing.assert_array_equal(np.array(d), qt.dequantize())
    assert mlx_config_entry(qt)["mode"] == "mxfp8"


@pytest.mark.parametrize("scheme", [Int(4, 32, True), Int(4, 64, False), Int(8, 32, True), Fp8(), Fp8(block_size=16),
                                    MxFp8()], ids=lambda s: s.name)
def test_row_steps_give_the_codes_of_one_step(scheme, monkeypatch):
    """quantize, with_scales and dequantize a few output rows at a time (real widths: ROWS) give the arrays of one
    pass over every row, 3-D and 2-D; a row step never splits a block of rows that shares a scale (the step, 3
    here, is not a multiple of Fp8's 16-row tiles, and the rows in a tile are not equal)."""
    from l4export.quant import schemes

    w3 = (RNG.standard_normal((2, 48, 64)) * np.exp(RNG.standard_normal((2, 48, 1)))).astype(np.float32)
    for w in (w3, w3[0]):
        whole = scheme.quantize(w)
        again = scheme.with_scales(w * 0.9, whole.scale, whole.zero)
        whole_d, again_d = whole.dequantize(), again.dequantize()
        monkeypatch.setattr(schemes, "ROWS", 3)
        stepped = scheme.quantize(w)
        for a, b in zip((whole.q, whole.scale, whole.zero), (stepped.q, stepped.scale, stepped.zero)):
            assert (a is None) == (b is None)
            if a is not None:
                np.testing.assert_array_equal(a.view(np.uint8) if a.dtype == FP8 else a, b.view(np.uint8) if b.dtype == FP8 else b)
        stepped_again = scheme.with_scales(w * 0.9, whole.scale, whole.zero)
        np.testing.assert_array_equal(again.q.view(np.uint8), stepped_again.q.view(np.uint8))
        np.testing.assert_array_equal(whole_d, stepped.dequantize())
        np.testing.assert_array_equal(again_d, stepped_again.dequantize())
        monkeypatch.setattr(schemes, "ROWS", 1024)


def test_fp8_has_no_mlx_layout():
    with pytest.raises(TypeError, match="mxfp8"):
        to_mlx(Fp8().quantize(W))


# ---- ONNX Runtime ------------------------------------------------------------------------------------------
def _run(node, inputs: dict[str, np.ndarray], inits: dict[str, np.ndarray], out_shape, opset=21):
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(v.shape)) for n, v in inputs.items()],
        [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, list(out_shape))],
        [numpy_helper.from_array(v, n) for n, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)[0]


@pytest.mark.parametrize("scheme", ORT_INTS, ids=lambda s: s.name)
def test_matmulnbits_layout_runs_on_onnxruntime(scheme):
    from onnx import helper

    w = W[0]  # (N, K)
    qt = scheme.quantize(w)
    p = to_matmulnbits(qt)
    assert p["B"].shape == (16, 128 // scheme.group_size, scheme.group_size * scheme.bits // 8)
    if scheme.bits == 4:  # low nibble = even element
        np.testing.assert_array_equal(unpack_nibbles(p["B"].reshape(16, -1)), qt.q)
    a = RNG.standard_normal((5, 128)).astype(np.float32)
    inits = {"B": p["B"], "scales": p["scales"]}
    if scheme.symmetric:  # codes stored q + 2^(bits-1): MatMulNBits' default zero point reads them
        assert p["zero_points"] is None
    else:
        inits["zero_points"] = p["zero_points"]
    node = helper.make_node("MatMulNBits", ["A", *inits], ["Y"], domain="com.microsoft",
                            K=p["K"], N=p["N"], bits=p["bits"], block_size=p["block_size"], accuracy_level=0)
    y = _run(node, {"A": a}, inits, (5, 16))
    np.testing.assert_allclose(y, a @ qt.dequantize().T, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("scheme", [Int(4, 32, True), Int(4, 64, False), Int(2, 32, False), Int(2, 64, True)],
                         ids=lambda s: s.name)
def test_qmoe_layout_runs_on_onnxruntime(scheme):
    from onnx import helper

    e, i, h, t = 4, 64, 128, 12
    gate = (RNG.standard_normal((e, i, h)) * 0.1).astype(np.float32)
    up = (RNG.standard_normal((e, i, h)) * 0.1).astype(np.float32)
    down = (RNG.standard_normal((e, h, i)) * 0.1).astype(np.float32)
    qg, qu, qd = scheme.quantize(gate), scheme.quantize(up), scheme.quantize(down)
    p = to_qmoe(qg, qu, qd)
    assert p["fc1"].shape == (e, 2 * i, h * scheme.bits // 8) and p["fc2"].shape == (e, h, i * scheme.bits // 8)
    assert p["fc1_scales"].shape == (e, 2 * i, h // scheme.group_size)
    x = RNG.standard_normal((t, h)).astype(np.float32)
    probs = RNG.standard_normal((t, e)).astype(np.float32)
    inits = {"fc1": p["fc1"], "fc1_s": p["fc1_scales"], "fc2": p["fc2"], "fc2_s": p["fc2_scales"]}
    names = ["x", "probs", "fc1", "fc1_s", "", "fc2", "fc2_s", "", "", "", ""]
    if p["fc1_zero_points"] is not None:
        inits.update(fc1_z=p["fc1_zero_points"], fc2_z=p["fc2_zero_points"])
        names += ["fc1_z", "fc2_z"]
    node = helper.make_node("QMoE", names, ["Y"], domain="com.microsoft", k=1, activation_type="swiglu",
                            swiglu_fusion=1, normalize_routing_weights=1, expert_weight_bits=scheme.bits,
                            block_size=scheme.group_size)
    y = _run(node, {"x": x, "probs": probs}, inits, (t, h))
    G, U, D = qg.dequantize(), qu.dequantize(), qd.dequantize()
    ref = np.empty_like(x)
    for n in range(t):
        k = int(probs[n].argmax())
        g, u = G[k] @ x[n], U[k] @ x[n]
        ref[n] = D[k] @ (g / (1 + np.exp(-g)) * u)
    if scheme.bits == 2:  # ORT 1.32's 2-bit QMoE runs the LUT GEMM, which quantizes activations (measured ~0.7 %)
        assert np.abs(y - ref).max() / np.abs(ref).max() < 2e-2
        return
    np.testing.assert_allclose(y, ref, atol=2e-5, rtol=1e-4)


def test_fp8_dequantizelinear_runs_on_onnxruntime():
    from onnx import helper

    qt = Fp8().quantize(W[0])
    p = to_onnx_fp8(qt)
    node = helper.make_node("DequantizeLinear", ["w", "s"], ["Y"], axis=0)
    y = _run(node, {}, {"w": p["weight"], "s": p["scale"]}, (16, 128), opset=19)
    np.testing.assert_array_equal(y, qt.dequantize())


def test_slice_wise_rtn_equals_whole_tensor_rtn(qscout):
    """quant/ahead.rtn reads experts and dense rows a slice at a time: the codes, scales and zero points are those
    of quantizing the whole float32 tensor (each row and each expert is quantized on its own)."""
    from l4export.checkpoint import Checkpoint
    from l4export.quant.ahead import rtn
    from l4export.quant.schemes import Int

    ck = Checkpoint(qscout)
    for name in ("lm_head.weight", "model.layers.0.feed_forward.experts.down_proj",
                 "model.layers.1.self_attn.o_proj.weight"):
        for scheme in (Int(4, 32, symmetric=False), Int(8, 64)):
            whole = scheme.quantize(ck[name].load(np.float32))
            sliced = rtn(ck[name], scheme, slice_bytes=3000)  # a few rows / one expert per slice
            for a, b in ((whole.q, sliced.q), (whole.scale, sliced.scale), (whole.zero, sliced.zero)):
                assert (a is None and b is None) or np.array_equal(a, b), name


def test_per_expert_widths_round_trip_expert_by_expert(qscout):
    """PerExpert: expert e is exactly its own width's round trip; sliced reads (ahead.rtn, QTensor.lead) see plain
    Int schemes; the l4export.json record reads back; widths that differ in more than their bits are refused."""
    from l4export.checkpoint import Checkpoint
    from l4export.quant.ahead import quant_runs, rtn
    from l4export.quant.recipe import scheme_from_record
    from l4export.quant.schemes import PerExpert, scheme_record

    t = Checkpoint(qscout)["model.layers.0.feed_forward.experts.down_proj"]
    n = t.shape[0]
    each = PerExpert(tuple(Int((2, 4, 8)[e % 3], 32, symmetric=False) for e in range(n)))
    w = t.load(np.float32)
    whole, sliced = each.quantize(w), rtn(t, each, slice_bytes=3000)
    for e in range(n):
        one = each.schemes[e].quantize(w[e : e + 1])
        assert np.array_equal(whole.q[e], one.q[0]) and np.array_equal(sliced.q[e], one.q[0])
        assert np.array_equal(each.dequantize(whole)[e], each.schemes[e].dequantize(one)[0])
        assert whole.lead(e, e + 1).scheme == each.schemes[e]
    assert all(len({each.schemes[e] for e in range(a, b)}) == 1 for a, b in quant_runs(t, each))
    assert scheme_from_record(scheme_record(each), "x") == each
    with pytest.raises(RecipeError, match="differ in more than their bits"):
        PerExpert((Int(2, 32, symmetric=False), Int(4, 64, symmetric=False)))


ASYMMETRIC = """name = "asym"
[[rule]]
match = "*.router.weight"
scheme = "float"
[[rule]]
match = "*norm.weight"
scheme = "float"
[[rule]]
match = "*.feed_forward.*"
scheme = "int4"
group_size = 32
symmetric = false
[[rule]]
match = "*"
scheme = "int8"
group_size = 64
symmetric = false
"""


@pytest.mark.parametrize("fmt, quant", [("onnx", "int4"), ("onnx", "asym"), ("onnx", None), ("mlx", "int4"),
                                        ("mlx", "asym")])
def test_writers_stream_slices_with_the_same_bytes(qscout, tmp_path, monkeypatch, fmt, quant):
    """Quantized (and float expert) weights are made and written a leading-axis slice at a time
    (quant/stream.py): with 3 KB slices (a few rows or one expert each, so every big tensor is many slices, zero
    points and the embedding included) the export's files are byte for byte those of one slice per tensor."""
    import hashlib

    from l4export.convert import ExportOptions, convert
    from l4export import checkpoint
    from l4export.quant.recipe import load_recipe

    if quant == "asym":
        (tmp_path / "asym.toml").write_text(ASYMMETRIC)
        quant = str(tmp_path / "asym.toml")
    opts = lambda: ExportOptions(format=fmt, quant=None if quant is None else load_recipe(quant))  # noqa: E731

    def digest(out: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())
                if p.suffix in (".data", ".safetensors", ".onnx")}

    whole = digest(convert(qscout, tmp_path / "whole", opts()))
    monkeypatch.setattr(checkpoint, "SLICE_BYTES", 3000)
    sliced = digest(convert(qscout, tmp_path / "sliced", opts()))
    assert whole == sliced and any(k.endswith((".data", ".safetensors")) for k in whole)
