"""Session fixtures: tiny Llama 4 checkpoints built with transformers (see builders.py), and their exports, each made
on first request and shared by every module of the session.

    checkpoint(name) -> Path    name: one of CASES (float parity) or QUANT_CASES (quantization)
    export(src, fmt, ...) -> Path   l4export convert, once per (checkpoint, format, dtype, target, recipe)
    scout, maverick             checkpoint("scout_hub"), checkpoint("maverick_hub")
    qscout, qmaverick           the quantization checkpoints (quantization modules override scout/maverick with them,
                                visibly, in a fixture of their own)
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from builders import build  # noqa: E402

CASES = {
    "scout_hub": dict(shape="scout", style="hub", dtype="bfloat16"),
    "scout_v5": dict(shape="scout", style="v5", dtype="float32"),
    "maverick_hub": dict(shape="maverick", style="hub", dtype="float32"),
    "maverick_v5": dict(shape="maverick", style="v5", dtype="bfloat16"),
}
# Quantization checkpoints. Group 64 (the int4 preset's experts) must divide the expert width, so experts are 64
# wide; the preset's group 128 for the other linears falls back to 64 here (hidden 64) and to 32 for Maverick's
# 96-wide dense MLPs (recipe.for_model). initializer_range 0.05 instead of 0.1: at 0.1 these random models route on
# knife-edge margins, and any weight perturbation (even FP8's) flips experts; at 0.05 quantization error, not
# chaos, is what is measured.
QUANT = dict(intermediate_size=64, initializer_range=0.05)
QUANT_CASES = {
    "qscout": dict(shape="scout", style="hub", dtype="bfloat16", **QUANT),
    "qmaverick": dict(shape="maverick", style="hub", dtype="float32", **QUANT),
    "qtop2": dict(shape="maverick", style="v5", dtype="float32", num_experts_per_tok=2, **QUANT),  # 2 experts a token
}


def _need_reference():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Callable[[str], Path]:
    """``checkpoint(name)``: the tiny checkpoint, built with transformers on first request."""
    _need_reference()
    root = tmp_path_factory.mktemp("ckpts")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build(root / name, **{**CASES, **QUANT_CASES}[name])
        return built[name]

    return get


@pytest.fixture(scope="session")
def export(tmp_path_factory) -> Callable[..., Path]:
    """``export(src, fmt="onnx", dtype="float32", target="cpu", quant=None)``: converted once per session (``quant``
    a preset name or a Recipe). Tests that damage an export copy it first."""
    from l4export.convert import ExportOptions, convert
    from l4export.quant.recipe import load_recipe

    root = tmp_path_factory.mktemp("exports")
    done: dict[tuple, Path] = {}

    def get(src: Path, fmt: str = "onnx", dtype: str = "float32", target: str = "cpu", quant=None) -> Path:
        key = (str(src), fmt, dtype, target, quant if isinstance(quant, str) or quant is None else repr(quant))
        if key not in done:
            recipe = load_recipe(quant) if isinstance(quant, str) else quant
            out = root / f"{len(done)}-{Path(src).name}-{fmt}-{dtype}-{target}"
            done[key] = convert(src, out, ExportOptions(format=fmt, dtype=dtype, target=target, quant=recipe))
        return done[key]

    return get


def _quant_module(request) -> bool:
    """The module quantizes (``pytestmark = pytest.mark.quant_checkpoints``): it gets conftest.QUANT_CASES'
    checkpoints as scout / maverick (float parity modules get the CASES ones)."""
    return request.node.get_closest_marker("quant_checkpoints") is not None


@pytest.fixture(scope="module")
def scout(request, checkpoint) -> Path:
    return checkpoint("qscout" if _quant_module(request) else "scout_hub")


@pytest.fixture(scope="module")
def maverick(request, checkpoint) -> Path:
    return checkpoint("qmaverick" if _quant_module(request) else "maverick_hub")


@pytest.fixture(scope="session")
def qscout(checkpoint) -> Path:
    return checkpoint("qscout")


@pytest.fixture(scope="session")
def qmaverick(checkpoint) -> Path:
    return checkpoint("qmaverick")


@pytest.fixture(scope="session")
def qtop2(checkpoint) -> Path:
    return checkpoint("qtop2")


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory) -> Path:
    """The built-in demo model (l4export demo-checkpoint), written once per session."""
    from l4export.demo import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("demo") / "demo")


@pytest.fixture(scope="session")
def random_demo(tmp_path_factory) -> Path:
    """The demo's architecture with random weights (``--seed 0``), for the gates calibrated on such models: the
    trained demo (hidden 128) is far more sensitive to int4/FP8 weights and int8 KV (docs/quantization.md has
    its figures), as a 128-wide trained model is; Scout's widths are 5120."""
    from l4export.demo import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("random_demo") / "demo", seed=0)


@pytest.fixture(params=list(CASES))
def any_checkpoint(request, checkpoint) -> Path:
    return checkpoint(request.param)


def pytest_collection_modifyitems(config, items):
    """Deliberate skips, decided at collection (never mid-test): ``gpu`` tests need ONNX Runtime's
    CUDAExecutionProvider, ``mlx`` tests need mlx, ``reference`` tests torch and transformers."""
    try:
        import onnxruntime as ort

        cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:
        cuda = False
    mlx = importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx.core") is not None
    reference = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
    skips = {"gpu": None if cuda else "needs a CUDA GPU (ONNX Runtime's CUDAExecutionProvider)",
             "mlx": None if mlx else "needs mlx (pip install 'l4export[mlx]')",
             "reference": None if reference else "needs torch and transformers (pip install 'l4export[reference]')"}
    for item in items:
        for marker, reason in skips.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
