"""Quantized MLX exports: mlx-lm loads them, our runtime reads them exactly, and their accuracy vs transformers.

Oracles:
  * mlx-lm 0.32 (``load_model`` / ``mlx_lm.load`` + generation) for the layout and config "quantization" block;
  * ``mx.dequantize`` of the stored tensors, run through our runtime as a float export: the quantized runtime
    (``quantized_matmul`` / ``gather_qmm``) must give the same logits (float tolerance);
  * transformers' Llama 4 (float32) for the quantization error, as KL(transformers || export) per token.
Figures are logged (run with ``-o log_cli=true --log-cli-level=INFO`` to see them) and quoted in docs/quantization.md.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

mx = pytest.importorskip("mlx.core")

from l4export.cli import main  # noqa: E402
from l4export.runtimes.mlx import MlxRuntime  # noqa: E402
from l4export.runtimes.reference import ReferenceRunner  # noqa: E402
from l4export.verify import THRESHOLDS  # noqa: E402

# this module quantizes: scout / maverick are conftest.QUANT_CASES' checkpoints
pytestmark = pytest.mark.quant_checkpoints


log = logging.getLogger(__name__)

PROMPT = np.random.default_rng(7).integers(4, 256, 40).tolist()  # crosses several 8-token chunks
PARITY_TOL = 1e-5  # max|Δ| / max|logit|: quantized kernels vs float matmuls on the dequantized weights
INT4_KL_MAX = THRESHOLDS["int4"].kl  # verify's own gate; measured ~0.005-0.01 on these tiny random models
FP8_KL_MAX = 0.01  # mxfp8 experts only; measured ~5e-5-2e-3


def kl(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean over tokens of KL(softmax(ref) || softmax(got))."""
    lp = ref - ref.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = got - got.max(-1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def cli_convert(src: Path, out: Path, *args: str) -> Path:
    res = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--format", "mlx", *args])
    assert res.exit_code == 0, res.output
    return out


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


@pytest.fixture(scope="module")
def quant_exports(scout, maverick, export) -> dict[tuple[str, str], Path]:
    return {(name, q): export(src, "mlx", quant=None if q == "float" else q)
            for name, src in (("scout", scout), ("maverick", maverick)) for q in ("float", "int4", "fp8")}


@pytest.fixture(scope="module")
def refs(scout, maverick) -> dict[str, np.ndarray]:
    return {name: ReferenceRunner(src).logits(PROMPT) for name, src in (("scout", scout), ("maverick", maverick))}


# ---- layout and config ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["scout", "maverick"])
def test_int4_export_layout_and_config(quant_exports, name):
    out = quant_exports[name, "int4"]
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization"]
    assert cfg["quantization_config"] == q
    assert {k: q[k] for k in ("group_size", "bits", "mode")} in ({"group_size": 64, "bits": 4, "mode": "affine"},
                                                                {"group_size": 64, "bits": 8, "mode": "affine"})
    w = mx.load(str(out / "model.safetensors"))
    moe = [la for la in range(4) if f"language_model.model.layers.{la}.feed_forward.router.weight" in w]
    assert moe
    for la in moe:
        p = f"language_model.model.layers.{la}.feed_forward."
        assert q[p + "router"] is False and w[p + "router.weight"].dtype == mx.float32
        for proj in ("gate_proj", "up_proj", "down_proj"):
            entry = q[p + "experts." + proj]
            assert entry == {"group_size": 64, "bits": 4, "mode": "affine"}  # explicit, never null
            wt, sc, bi = (w[f"{p}experts.{proj}.{k}"] for k in ("weight", "scales", "biases"))
            e, o = sc.shape[:2]
            assert wt.dtype == mx.uint32 and e == cfg["text_config"]["num_local_experts"]
            assert wt.shape == (e, o, sc.shape[-1] * 64 * 4 // 32) and bi.shape == sc.shape  # per-expert scales
            assert q[p + "shared_expert." + proj]["bits"] == 4
    # the preset's int8 group 128 falls back to 64 for these 64-input tensors (recipe.for_model)
    assert q["language_model.model.layers.0.self_attn.q_proj"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    assert q["language_model.lm_head"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    assert q["language_model.model.embed_tokens"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    if name == "maverick":  # its dense MLPs' down_proj reads 96 inputs: the preset falls back to group 32
        assert q["language_model.model.layers.0.feed_forward.down_proj"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    assert all(v is False or (isinstance(v, dict) and None not in v.values()) for k, v in q.items() if "." in k)


def test_fp8_becomes_mxfp8(quant_exports):
    out = quant_exports["scout", "fp8"]
    q = json.loads((out / "config.json").read_text())["quantization"]
    p = "language_model.model.layers.0.feed_forward."
    assert q[p + "experts.gate_proj"] == {"group_size": 32, "bits": 8, "mode": "mxfp8"}
    assert q[p + "shared_expert.gate_proj"] is False and q[p + "router"] is False
    w = mx.load(str(out / "model.safetensors"))
    assert w[p + "experts.gate_proj.scales"].dtype == mx.uint8 and p + "experts.gate_proj.biases" not in w


# ---- mlx-lm loads and generates ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["scout", "maverick"])
@pytest.mark.parametrize("q", ["int4", "fp8"])
def test_mlx_lm_loads_quantized_export(quant_exports, name, q):
    import mlx.nn as nn
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    out = quant_exports[name, q]
    model, _ = load_model(out)
    kinds = {type(m).__name__ for _, m in model.named_modules()}
    assert "QuantizedSwitchLinear" in kinds
    assert isinstance(model.language_model.model.layers[-1].feed_forward.router, nn.Linear)
    got = np.array(model(mx.array([PROMPT]))[0].astype(mx.float32))
    ours = MlxRuntime(out).logits(PROMPT)
    # mlx-lm and our runtime on the same quantized weights (its qk-norm eps differs: test_mlx.py's 2e-3)
    assert float(np.abs(got - ours).max() / np.abs(ours).max()) <= 2e-3
    toks = [int(t) for t, _ in generate_step(mx.array(PROMPT[:5]), model, max_tokens=4)]
    assert len(toks) == 4


def test_mlx_lm_load_and_generate_text(tmp_path):
    import mlx_lm

    from l4export.demo import write_demo_checkpoint

    out = cli_convert(write_demo_checkpoint(tmp_path / "demo"), tmp_path / "demo_int4", "--quant", "int4")
    model, tokenizer = mlx_lm.load(str(out))
    text = mlx_lm.generate(model, tokenizer, "Hello", max_tokens=6)
    assert isinstance(text, str) and len(text) > 0


# ---- our runtime: same dequantized weights, same logits ------------------------------------------------


def dequantized_float_export(qexport: Path, dest: Path) -> Path:
    """A float export holding ``mx.dequantize`` of every stored quantized tensor (config without quantization)."""
    shutil.copytree(qexport, dest)
    cfg = json.loads((dest / "config.json").read_text())
    qcfg = cfg.pop("quantization")
    cfg.pop("quantization_config")
    (dest / "config.json").write_text(json.dumps(cfg))
    w = mx.load(str(dest / "model.safetensors"))
    out = {}
    for name, arr in w.items():
        if name.endswith((".biases",)) or (name.endswith(".weight") and name[: -len(".weight")] + ".scales" in w):
            continue
        if name.endswith(".scales"):
            module = name[: -len(".scales")]
            e = qcfg[module]
            out[module + ".weight"] = mx.dequantize(w[module + ".weight"], arr, w.get(module + ".biases"),
                                                    group_size=e["group_size"], bits=e["bits"], mode=e["mode"])
        else:
            out[name] = arr
    mx.save_safetensors(str(dest / "model.safetensors"), out, metadata={"format": "mlx"})
    return dest


@pytest.mark.parametrize("name", ["scout", "maverick"])
@pytest.mark.parametrize("q", ["int4", "fp8"])
def test_runtime_matches_dequantized_float_export(quant_exports, tmp_path, name, q):
    qexp = quant_exports[name, q]
    rt_q = MlxRuntime(qexp)
    assert rt_q.q  # the quantized kernels are in use
    rt_f = MlxRuntime(dequantized_float_export(qexp, tmp_path / "dq"))
    assert not rt_f.q
    a, b = rt_q.logits(PROMPT), rt_f.logits(PROMPT)
    err = float(np.abs(a - b).max() / np.abs(b).max())
    log.info("%s %s: quantized kernels vs dequantized float export: %.2e relative", name, q, err)
    assert err <= PARITY_TOL
    # and incrementally (KV cache) the same
    inc = rt_q.logits_incremental(PROMPT[:12], step=5)
    assert float(np.abs(inc - a[:12]).max() / np.abs(a).max()) <= PARITY_TOL


@pytest.mark.parametrize("name", ["scout", "maverick"])
def test_kl_vs_transformers(quant_exports, refs, name):
    ref = refs[name]
    f = kl(ref, MlxRuntime(quant_exports[name, "float"]).logits(PROMPT))
    k4 = kl(ref, MlxRuntime(quant_exports[name, "int4"]).logits(PROMPT))
    k8 = kl(ref, MlxRuntime(quant_exports[name, "fp8"]).logits(PROMPT))
    sizes = {q: size(quant_exports[name, q]) for q in ("float", "int4", "fp8")}
    log.info("%s KL vs transformers: float %.1e, int4 %.2e, mxfp8 %.2e; bytes %s", name, f, k4, k8, sizes)
    assert f < 1e-6
    assert 0 < k4 <= INT4_KL_MAX and 0 < k8 <= FP8_KL_MAX
    assert sizes["int4"] < sizes["fp8"] < sizes["float"]


# ---- calibration -----------------------------------------------------------------------------------------


def test_calibrated_export_and_report(scout, quant_exports, refs, tmp_path):
    calib = tmp_path / "calib.jsonl"  # the fixtures have no tokenizer.json: token ids
    rng = np.random.default_rng(1)
    calib.write_text("\n".join(json.dumps({"input_ids": rng.integers(4, 256, 32).tolist()}) for _ in range(16)))
    out = cli_convert(scout, tmp_path / "scout_gptq", "--quant", "int4", "--calib", str(calib),
                      "--calib-samples", "16", "--calib-seqlen", "32")
    report = json.loads((out / "quant_report.json").read_text())
    assert report["calibration"]["samples"] == 16 and report["calibration"]["tokens"] == 16 * 32
    assert not list(out.glob("l4export-calib-*")) and not list(out.parent.glob(".*"))  # spilled codes are gone
    for png in report["plots"]:
        assert (out / png).stat().st_size > 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"] == json.loads((quant_exports["scout", "int4"] / "config.json").read_text())["quantization"]
    ref = refs["scout"]
    k_gptq = kl(ref, MlxRuntime(out).logits(PROMPT))
    k_rtn = kl(ref, MlxRuntime(quant_exports["scout", "int4"]).logits(PROMPT))
    log.info("scout int4 KL vs transformers: RTN %.2e, GPTQ %.2e", k_rtn, k_gptq)
    # A tiny random model: no strict ordering, but calibration must not be clearly worse than RTN.
    assert k_gptq <= 1.5 * k_rtn + 1e-3


def test_calibrated_export_from_text(tmp_path):
    from l4export.demo import write_demo_checkpoint

    src = write_demo_checkpoint(tmp_path / "demo")
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog.\nHello, world! 1 2 3\nLlama 4 mixture of experts\n")
    out = cli_convert(src, tmp_path / "demo_gptq", "--quant", "int4", "--calib", str(calib), "--calib-seqlen", "16")
    assert (out / "quant_report.json").is_file() and (out / "tokens_per_expert.png").is_file()
    rt = MlxRuntime(out)
    assert rt.q and np.isfinite(rt.logits(rt.encode("Hello"))).all()


# ---- bad input: one line, exit 2, nothing written ---------------------------------------------------------


def _bad(src: Path, tmp_path: Path, *args: str, expect: str) -> None:
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--format", "mlx", *args])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and expect in lines[0], res.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporary sibling


def test_group_size_not_dividing(scout, tmp_path):
    recipe = tmp_path / "g128.toml"  # routed experts have input dims 64
    recipe.write_text('[[rule]]\nmatch = "*.feed_forward.experts.*"\nscheme = "int4"\ngroup_size = 128\n')
    _bad(scout, tmp_path, "--quant", str(recipe), expect="does not divide")


def test_unknown_recipe_key(scout, tmp_path):
    recipe = tmp_path / "typo.toml"
    recipe.write_text('[[rule]]\nmatch = "*.feed_forward.experts.*"\nscheme = "int4"\ngroup_sise = 32\n')
    _bad(scout, tmp_path, "--quant", str(recipe), expect="group_sise")


def test_empty_calibration_file(scout, tmp_path):
    calib = tmp_path / "empty.txt"
    calib.write_text("\n  \n")
    _bad(scout, tmp_path, "--quant", "int4", "--calib", str(calib), expect="no calibration samples")
