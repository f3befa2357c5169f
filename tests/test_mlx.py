"""MLX export + runtime: parity with transformers (float32), mlx-lm loading our export, cache, bad input.

Oracles: transformers' Llama4 (ReferenceRunner, float32) for logits and greedy tokens; mlx-lm 0.32 for the
export layout. Thresholds: our runtime 1e-4 relative (max|Δ| / max|logit|); mlx-lm 2e-3 (its qk-norm eps
is 1e-6, not the config's 1e-5).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

mx = pytest.importorskip("mlx.core")

from builders import build  # noqa: E402

from l4export.checkpoint import LazyTensor  # noqa: E402
from l4export.cli import main  # noqa: E402
from l4export.convert import ExportOptions, convert  # noqa: E402
from l4export.errors import CapabilityError  # noqa: E402
from l4export.runtimes import load_runtime  # noqa: E402
from l4export.runtimes.mlx import MlxRuntime, device_dtypes  # noqa: E402
from l4export.runtimes.reference import ReferenceRunner  # noqa: E402

CHUNK = 8  # attention_chunk_size of the tiny checkpoints
RUNTIME_TOL = 1e-4
MLX_LM_TOL = 2e-3
PROMPT_LENGTHS = (1, CHUNK - 1, CHUNK + 1, 3 * CHUNK)


def rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def prompt(n: int, seed: int = 0, vocab: int = 300) -> list[int]:
    return np.random.default_rng(seed + n).integers(4, vocab, n).tolist()


def mlx_export(src: Path, out: Path, **kw) -> Path:
    if not out.exists():
        convert(src, out, ExportOptions(format="mlx", dtype="float32", **kw))
    return out


@pytest.fixture(scope="module")
def tiny_checkpoints(checkpoint) -> dict[str, Path]:
    """The four float-parity checkpoints (the parametrized tests below use them all)."""
    from conftest import CASES

    return {name: checkpoint(name) for name in CASES}


@pytest.fixture(scope="module")
def exports(tiny_checkpoints, export) -> dict[str, Path]:
    return {name: export(src, "mlx") for name, src in tiny_checkpoints.items()}


@pytest.fixture(scope="module")
def references(tiny_checkpoints) -> dict[str, ReferenceRunner]:
    return {name: ReferenceRunner(src) for name, src in tiny_checkpoints.items()}


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory) -> Path:
    from l4export.demo import write_demo_checkpoint

    root = tmp_path_factory.mktemp("mlx_demo")
    return mlx_export(write_demo_checkpoint(root / "demo"), root / "demo_mlx")


# ---- export layout -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["scout_hub", "maverick_v5"])
def test_export_layout_is_mlx_lm_llama4(exports, tiny_checkpoints, name):
    out = exports[name]
    cfg = json.loads((out / "config.json").read_text())
    text = cfg["text_config"]
    assert cfg["model_type"] == "llama4" and text["model_type"] == "llama4_text"
    assert "rope_theta" in text and "rope_scaling" in text and "rope_parameters" not in text  # mlx-lm requires both
    shape = "scout" if name.startswith("scout") else "maverick"
    assert text["no_rope_layers"] == [1, 1, 1, 0]
    assert text["moe_layers"] == ([0, 1, 2, 3] if shape == "scout" else [1, 3])
    assert (text["rope_scaling"] is None) == (shape == "maverick")
    weights = mx.load(str(out / "model.safetensors"))
    vision = [k for k in weights if k.startswith(("vision_model.", "multi_modal_projector."))]
    assert all(k.startswith("language_model.") for k in weights if k not in vision)
    # the multimodal checkpoint keeps its vision tower under HF's names (mlx-vlm's layout); text-only has none
    assert bool(vision) == (shape == "scout") and ("vision_config" in cfg) == (shape == "scout")
    layer = 1  # MoE in both shapes
    gate = weights[f"language_model.model.layers.{layer}.feed_forward.experts.gate_proj.weight"]
    down = weights[f"language_model.model.layers.{layer}.feed_forward.experts.down_proj.weight"]
    experts = 16 if shape == "scout" else 128
    assert gate.shape == (experts, 32, 64) and down.shape == (experts, 64, 32)  # SwitchGLU [E, out, in]
    if shape == "maverick":
        assert weights["language_model.model.layers.0.feed_forward.gate_proj.weight"].shape == (96, 64)  # dense layer


def test_export_sharded_with_index_and_tokenizer(tmp_path):
    from l4export.demo import write_demo_checkpoint

    src = write_demo_checkpoint(tmp_path / "demo")
    out = mlx_export(src, tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).is_file()
    assert json.loads((out / "l4export.json").read_text())["format"] == "mlx"
    # Sharded and single-file exports hold the same model.
    single = mlx_export(src, tmp_path / "single")
    ids = prompt(10, vocab=256)
    np.testing.assert_array_equal(MlxRuntime(out).logits(ids), MlxRuntime(single).logits(ids))


# ---- runtime parity with transformers --------------------------------------------------------------


@pytest.mark.parametrize("name", ["scout_hub", "scout_v5", "maverick_hub", "maverick_v5"])
def test_runtime_parity_full_and_token_by_token(exports, references, name):
    rt = MlxRuntime(exports[name])
    assert rt.dtype_name == "float32"
    for n in PROMPT_LENGTHS:
        ids = prompt(n)
        ref = references[name].logits(ids)
        full = rt.logits(ids)
        step1 = rt.logits_incremental(ids, step=1)
        step3 = rt.logits_incremental(ids, step=3)  # steps that straddle chunk boundaries
        for what, got in (("full", full), ("token by token", step1), ("3 at a time", step3)):
            err = rel(got, ref)
            assert err <= RUNTIME_TOL, f"{name} len {n} {what}: {err:.2e}"


@pytest.mark.parametrize("name", ["scout_hub", "maverick_hub"])
def test_runtime_greedy_32_tokens_identical(exports, references, name):
    ids = prompt(CHUNK - 2)  # generation crosses chunk boundaries at 8, 16, 24, 32
    want = references[name].greedy(ids, 32)
    got = list(MlxRuntime(exports[name]).generate(ids, 32, stop=[]))
    assert got == want


def test_runtime_follows_config_where_mlx_lm_hard_codes(tmp_path):
    """NoPE on layer 0 (not (i+1)%4), MoE on layers 0 and 2 (not the step), top-2 routing, temperature from pos 3."""
    src = build(tmp_path / "custom", shape="maverick", style="v5", no_rope_layers=[0, 1, 1, 1], moe_layers=[0, 2],
                num_experts_per_tok=2, floor_scale=4, num_local_experts=8)
    # convert refuses top-k != 1 (the ONNX path needs it); export a top-1 copy and restore k=2 in the export.
    top1 = tmp_path / "top1"
    top1.mkdir()
    for f in src.iterdir():
        (top1 / f.name).symlink_to(f)
    cfg = json.loads((src / "config.json").read_text())
    (top1 / "config.json").unlink()
    (top1 / "config.json").write_text(json.dumps(dict(cfg, num_experts_per_tok=1)))
    out = mlx_export(top1, tmp_path / "out")
    ecfg = json.loads((out / "config.json").read_text())
    assert ecfg["text_config"]["no_rope_layers"] == [0, 1, 1, 1] and ecfg["text_config"]["moe_layers"] == [0, 2]
    ecfg["text_config"]["num_experts_per_tok"] = 2
    (out / "config.json").write_text(json.dumps(ecfg))
    rt, ref = MlxRuntime(out), ReferenceRunner(src)
    assert rt.spec.top_k == 2 and rt.spec.nope_layers == (0,) and rt.spec.moe_layers == (0, 2)
    ids = prompt(2 * CHUNK + 3)
    want = ref.logits(ids)
    assert rel(rt.logits(ids), want) <= RUNTIME_TOL
    assert rel(rt.logits_incremental(ids), want) <= RUNTIME_TOL
    assert list(rt.generate(ids[:3], 16, stop=[])) == ref.greedy(ids[:3], 16)


def test_chunked_cache_holds_at_most_one_chunk(exports):
    rt = MlxRuntime(exports["scout_hub"])
    ids = prompt(3 * CHUNK + 2)
    rt.reset()
    for i, tok in enumerate(ids, 1):
        rt.forward([tok])
        for layer, cache in zip(rt.spec.layers, rt.cache):
            if layer.chunked:  # only the current chunk (a full chunk stays until the next token starts a new one)
                assert cache.length == (i - 1) % CHUNK + 1 and cache.keys[0].shape[1] <= CHUNK
            else:
                assert cache.length == i  # global (NoPE) layers keep everything
    rt.logits(ids[: 3 * CHUNK + 1])  # one prefill across 3 boundaries keeps only the last chunk's one token
    assert [c.length for c, la in zip(rt.cache, rt.spec.layers) if la.chunked] == [1, 1, 1]


# ---- mlx-lm loads and runs our export -------------------------------------------------------------


@pytest.mark.parametrize("name", ["scout_hub", "maverick_hub", "maverick_v5"])
def test_mlx_lm_loads_export_within_its_epsilon(exports, references, name):
    from mlx_lm.utils import load_model

    model, _ = load_model(exports[name])
    for n in PROMPT_LENGTHS:
        ids = prompt(n)
        got = np.array(model(mx.array([ids]))[0].astype(mx.float32))
        err = rel(got, references[name].logits(ids))
        assert err <= MLX_LM_TOL, f"mlx-lm on our {name} export, len {n}: {err:.2e}"


def test_mlx_lm_load_and_generate(demo_export):
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(demo_export))
    text = mlx_lm.generate(model, tokenizer, "Hello", max_tokens=8)
    assert isinstance(text, str) and len(text) > 0
    # Same greedy tokens from our runtime and mlx-lm's generate_step on the same export.
    from mlx_lm.generate import generate_step

    rt = MlxRuntime(demo_export)
    ids = rt.encode("Hello")
    theirs = [int(tok) for tok, _logprobs in generate_step(mx.array(ids), model, max_tokens=8)]
    assert list(rt.generate(ids, 8, stop=[])) == theirs


# ---- runtime API, text, imports ------------------------------------------------------------------


def test_text_in_text_out_and_cli_run(demo_export):
    rt = load_runtime(demo_export)
    assert isinstance(rt, MlxRuntime)
    pieces = list(rt.generate_text("Hi", 6))
    assert pieces and all(isinstance(p, str) for p in pieces)
    res = CliRunner().invoke(main, ["run", str(demo_export), "--ids", "256,72,105", "-n", "5"])
    assert res.exit_code == 0, res.output
    assert len(res.output.split()) == 5


def test_runtime_imports_no_torch_transformers_onnx():
    code = ("import sys, l4export.runtimes.mlx; "
            "print([m for m in ('torch', 'transformers', 'onnx', 'onnxruntime', 'ml_dtypes', 'safetensors') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.stdout.strip() == "[]"


# ---- bad input ---------------------------------------------------------------------------------------


def one_line_error(res, code: int) -> str:
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.output
    return lines[0]


@pytest.mark.skipif(len(device_dtypes()) > 1, reason="this device runs every dtype")
def test_dtype_the_device_cannot_run_names_float32(demo_export):
    with pytest.raises(CapabilityError, match="float32"):
        MlxRuntime(demo_export, dtype="bfloat16")
    res = CliRunner().invoke(main, ["run", str(demo_export), "--ids", "1,2", "--dtype", "float16"])
    assert "float32" in one_line_error(res, 2)


def test_bfloat16_export_runs_upcast_on_cpu(tiny_checkpoints, references, tmp_path):
    out = tmp_path / "bf16"
    convert(tiny_checkpoints["scout_hub"], out, ExportOptions(format="mlx", dtype="bfloat16"))  # source is bf16: exact
    rt = MlxRuntime(out)
    assert rt.dtype_name == device_dtypes()[0]
    if rt.dtype_name == "float32":
        ids = prompt(CHUNK + 1)
        assert rel(rt.logits(ids), references["scout_hub"].logits(ids)) <= RUNTIME_TOL


def test_cli_refuses_like_onnx(scout, tmp_path):
    runner = CliRunner()
    out = tmp_path / "exists"
    out.mkdir()
    assert "--force" in one_line_error(runner.invoke(main, ["convert", str(scout), "-o", str(out), "--format", "mlx"]), 2)
    assert not any(out.iterdir())
    line = one_line_error(runner.invoke(main, ["convert", str(tmp_path / "nope"), "-o", str(tmp_path / "o"), "--format", "mlx"]), 2)
    assert "nope" in line
    # Unwritable output location (works as root too: the parent is a file).
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = runner.invoke(main, ["convert", str(scout), "-o", str(blocker / "out"), "--format", "mlx"])
    assert res.exit_code != 0 and "Traceback" not in res.output and str(blocker) in res.output
    # Not Llama 4.
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "llama4" in one_line_error(runner.invoke(main, ["convert", str(other), "-o", str(tmp_path / "o2"), "--format", "mlx"]), 2)
    # run on a folder that is not an export.
    res = runner.invoke(main, ["run", str(tmp_path / "nope"), "--ids", "1"])
    one_line_error(res, 2)


def test_interrupt_mid_write_leaves_nothing(scout, tmp_path, monkeypatch):
    """A real KeyboardInterrupt raised while the 5th tensor is read: no OUT, no temporary folder left."""
    real_load = LazyTensor.load
    calls = {"n": 0}

    def interrupted(self, dtype=None, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_load(self, dtype, **kw)

    monkeypatch.setattr(LazyTensor, "load", interrupted)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["convert", str(scout), "-o", str(out), "--format", "mlx"])
    assert res.exit_code == 130 and "Traceback" not in res.output
    assert calls["n"] == 5
    assert list(tmp_path.iterdir()) == []


def test_cli_verify_accepts_mlx_exports(exports, tiny_checkpoints):
    res = CliRunner().invoke(main, ["verify", str(exports["maverick_hub"]), "--reference",
                                    str(tiny_checkpoints["maverick_hub"]), "--greedy-tokens", "8"])
    assert res.exit_code == 0, res.output
    assert "(mlx, float32)" in res.output and "FAIL" not in res.output
