"""Long prompts in bounded memory: stepped prefill, logits only where needed, in-place caches, quantized KV cache.

Both runtimes (ONNX Runtime, MLX) on the tiny Scout (chunk 8, a NoPE layer every 4th) against transformers, and
on the built-in demo model for the quantized cache (KL against the float cache).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("onnxruntime")

from l4export.cli import main  # noqa: E402
from l4export.convert import ExportOptions, convert  # noqa: E402
from l4export.errors import CapabilityError, UsageError  # noqa: E402
from l4export.runtimes import load_runtime  # noqa: E402
from l4export.runtimes.reference import ReferenceRunner  # noqa: E402
from l4export.verify import compare, default_prompts  # noqa: E402

FORMATS = ["onnx", pytest.param("mlx", marks=pytest.mark.mlx)]


@pytest.fixture(scope="module")
def exports(scout, export) -> dict[str, Path]:
    out = {"onnx": export(scout)}
    try:
        import mlx.core  # noqa: F401

        out["mlx"] = export(scout, "mlx")
    except ImportError:
        pass
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    from l4export.demo import write_demo_checkpoint

    root = tmp_path_factory.mktemp("demo_kv")
    ckpt = write_demo_checkpoint(root / "demo", seed=0)  # random weights: see conftest.random_demo
    out = {"ckpt": ckpt, "onnx": root / "onnx"}
    convert(ckpt, out["onnx"], ExportOptions(format="onnx"))
    try:
        import mlx.core  # noqa: F401

        out["mlx"] = root / "mlx"
        convert(ckpt, out["mlx"], ExportOptions(format="mlx"))
    except ImportError:
        pass
    return out


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---- stepped prefill ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("step", [1, 3, 8])
def test_stepped_prefill_equals_transformers(fmt, step, exports, scout):
    """Every prefill step size gives transformers' logits across chunk boundaries (3 chunks + 2 tokens)."""
    rt = load_runtime(exports[fmt], prefill_step=step)
    ids = default_prompts(rt.spec)[3][1] + [5, 6]
    ref = ReferenceRunner(scout).logits(ids)
    assert _rel(rt.logits(ids), ref) <= 1e-4
    chunk = rt.spec.attention_chunk_size
    rt.reset()
    rt.pos = 5  # pieces never cross a chunk boundary and never exceed the step
    pieces = rt.steps(20)
    assert all(b - a <= step and (5 + a) // chunk == (5 + b - 1) // chunk for a, b in pieces)
    assert pieces[0][0] == 0 and pieces[-1][1] == 20 and all(p[1] == q[0] for p, q in zip(pieces, pieces[1:]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_last_only_logits_equal_the_last_row(fmt, exports):
    rt = load_runtime(exports[fmt])
    ids = default_prompts(rt.spec)[3][1]
    full = rt.logits(ids)
    rt.reset()
    last = rt.forward(ids, last_only=True)
    assert last.shape == (1, rt.spec.vocab_size)
    np.testing.assert_allclose(last[0], full[-1], rtol=1e-5, atol=1e-5 * np.abs(full).max())


def test_onnx_cache_is_appended_in_place(exports):
    """The same OrtValue buffers through a whole generation: reserve sizes them once; chunked layers hold one chunk."""
    rt = load_runtime(exports["onnx"])
    ids = default_prompts(rt.spec)[2][1]
    rt.reset()
    rt.reserve(len(ids) + 20)
    rt.forward(ids)
    buffers = [id(kv[0]) for kv in rt.cache]
    for t in range(20):
        rt.forward([4 + t])
    assert [id(kv[0]) for kv in rt.cache] == buffers  # no reallocation, no copy into a new present
    chunk = rt.spec.attention_chunk_size
    for layer, (k, _) in zip(rt.spec.layers, rt.cache):
        assert k.shape()[2] == chunk if layer.chunked else k.shape()[2] >= len(ids) + 20


def test_onnx_cache_grows_when_not_reserved(exports, scout):
    rt = load_runtime(exports["onnx"])
    ids = default_prompts(rt.spec)[3][1] * 12  # 288 tokens: the global buffers double past their first 256 rows
    rt.reset()
    got = np.concatenate([rt.forward(ids[i:i + 50]) for i in range(0, len(ids), 50)])
    assert max(k.shape()[2] for k, _ in rt.cache) >= len(ids)
    ref = ReferenceRunner(scout).logits(ids)
    assert _rel(got, ref) <= 1e-4


# ---- quantized KV cache -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, kv", [("onnx", "int8"), pytest.param("mlx", "int8", marks=pytest.mark.mlx),
                                     pytest.param("mlx", "fp8", marks=pytest.mark.mlx)])
def test_quantized_kv_cache_is_close_to_the_float_cache(fmt, kv, demo):
    """KL against the float cache on the demo model, full forward and token by token (scales grow as tokens
    arrive), greedy tokens equal, and the cache's bytes."""
    base, rt = load_runtime(demo[fmt]), load_runtime(demo[fmt], kv_dtype=kv)
    ids = np.random.default_rng(0).integers(4, 256, 100).tolist()
    ref = base.logits(ids)
    for got in (rt.logits(ids), rt.logits_incremental(ids)):
        assert compare(ref, got)["kl"] <= 1e-3
    assert list(rt.generate(ids[:6], 12)) == list(base.generate(ids[:6], 12))
    fp16 = base.cache_bytes // 2  # the float caches here are float32
    # ONNX: one byte per element, a handful of per-channel scales per layer (kept apart from the buffers);
    # MLX: plus a float32 scale and bias per 32 elements (mx.quantize), or an e8m0 byte per 32 (mxfp8)
    assert rt.cache_bytes <= (0.5 if fmt == "onnx" else 0.63) * fp16


def test_onnx_int8_scales_only_grow_and_requantize(demo):
    rt = load_runtime(demo["onnx"], kv_dtype="int8")
    rt.reset()
    rt.forward([256, 40, 41])
    first = [s[0].copy() for s in rt.scales]
    assert all((s > 0).any() for s in first)
    rt.forward(list(range(60, 120)))
    assert all(np.all(s[0] >= f) for s, f in zip(rt.scales, first))


def test_onnx_int8_prefill_runs_each_step_once_and_decode_appends_in_place(demo):
    """A multi-token step attends over the dequantized cache and its own float keys (the graph's float path) and
    runs once; the runtime quantizes its rows into the cache with the scales grown to fit them. A one-token step
    appends in place through the int8 node, inside the If (ORT hands the bound buffer down)."""
    rt = load_runtime(demo["onnx"], kv_dtype="int8")
    assert rt.host_cache
    runs, real = [0], rt.session.run_with_iobinding
    rt.session.run_with_iobinding = lambda io: (runs.__setitem__(0, runs[0] + 1), real(io))[1]
    ids = np.random.default_rng(1).integers(4, 256, 40).tolist()
    rt.reset()
    steps = len(rt.steps(20))
    rt.forward(ids[:20])
    steps += len(rt.steps(20))
    rt.forward(ids[20:])  # the second prompt's keys outgrow some scales: the cached rows are requantized, no rerun
    assert runs[0] == steps
    chunk = rt.spec.attention_chunk_size
    for layer in rt.spec.layers:  # every held row is written; a global layer's later rows untouched (a chunked
        k = rt.host[layer.index][0][0]  # layer's buffer still has the last chunk's rows after them)
        held = 40 - (40 // chunk) * chunk if layer.chunked else 40
        assert np.abs(k[:, :held]).max(axis=(0, 2)).min() > 0
        assert layer.chunked or not k[:, held:].any()
    g = next(la for la in rt.spec.layers if not la.chunked)
    arrays, before = [a[0] for a in rt.host], rt.host[g.index][0][0, :, :40].copy()
    runs[0] = 0
    rt.forward([7])  # decode: the int8 node writes row 40 of the same arrays
    assert all(a is b[0] for a, b in zip(arrays, rt.host))
    assert np.abs(rt.host[g.index][0][0, :, 40]).max() > 0
    if runs[0] == 1:  # (a rerun grows the scales and requantizes the rows before)
        assert np.array_equal(rt.host[g.index][0][0, :, :40], before)
    ref = load_runtime(demo["onnx"]).logits(ids + [7])
    assert compare(ref, rt.logits(ids + [7]))["kl"] <= 1e-3


def test_kv_dtype_refusals(demo):
    with pytest.raises(CapabilityError, match="FP8 cache"):
        load_runtime(demo["onnx"], kv_dtype="fp8")
    with pytest.raises(UsageError):
        load_runtime(demo["onnx"], kv_dtype="int4")


def test_verify_reports_kl_against_the_float_cache(demo):
    r = CliRunner().invoke(main, ["verify", str(demo["onnx"]), "--reference", str(demo["ckpt"]), "--kv-dtype", "int8",
                                  "--greedy-tokens", "4"])
    assert r.exit_code == 0, r.output
    assert "compare with the float cache" in r.output and "PASSED" in r.output


# ---- bad input --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("step, why", [(0, "positive"), (-3, "positive"), (9, "larger than attention_chunk_size")])
def test_bad_prefill_step(step, why, exports):
    with pytest.raises(UsageError, match=why):
        load_runtime(exports["onnx"], prefill_step=step)


def test_bad_prefill_step_cli_and_too_long_prompt(exports, demo):
    r = CliRunner().invoke(main, ["run", str(exports["onnx"]), "--ids", "1,2,3", "--prefill-step", "0"])
    assert r.exit_code == 2 and r.stderr.count("error:") == 1 and "Traceback" not in r.output
    rt = load_runtime(exports["onnx"])
    with pytest.raises(UsageError, match="max_position_embeddings"):
        rt.logits([5] * (rt.spec.max_position_embeddings + 1))


def test_inspect_context_plan_for_the_real_scout():
    """Scout's KV at 1M tokens: 12 global layers x 2^20 tokens x 8 KV heads x 128 x (k, v) x 2 bytes, plus 36
    chunked layers holding one 8192-token chunk; int8 halves both."""
    from test_spec import SCOUT_TEXT

    from l4export.inspect import context_memory
    from l4export.spec import spec_from_config

    spec = spec_from_config({"model_type": "llama4", "text_config": dict(SCOUT_TEXT)})
    plan = context_memory(spec, 1 << 20)
    per_token = 2 * 8 * 128
    assert plan["layers"] == {"global": 12, "chunked": 36}
    assert plan["kv_bytes"]["bfloat16"] == {"global": 12 * (1 << 20) * per_token * 2, "chunked": 36 * 8192 * per_token * 2}
    assert plan["kv_bytes"]["int8"]["global"] * 2 == plan["kv_bytes"]["bfloat16"]["global"]
    with pytest.raises(UsageError, match="max_position_embeddings"):
        context_memory(spec, spec.max_position_embeddings + 1)
