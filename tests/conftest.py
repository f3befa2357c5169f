"""Session fixtures: tiny Llama 4 checkpoints built with transformers (see builders.py)."""

from __future__ import annotations

import sys
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


def _need_reference():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """All four tiny checkpoints, built once per session."""
    _need_reference()
    root = tmp_path_factory.mktemp("ckpts")
    return {name: build(root / name, **kw) for name, kw in CASES.items()}


def _shaped(request, shape: str) -> Path:
    """A module that sets ``QUANT_FIXTURES = True`` gets the quantization checkpoints (QUANT below)."""
    if getattr(request.module, "QUANT_FIXTURES", False):
        return request.getfixturevalue("quant_checkpoints")[shape]
    return request.getfixturevalue("tiny_checkpoints")[f"{shape}_hub"]


@pytest.fixture(scope="module")
def scout(request) -> Path:
    return _shaped(request, "scout")


@pytest.fixture(scope="module")
def maverick(request) -> Path:
    return _shaped(request, "maverick")


# Quantization fixtures. Group 64 (the int4 preset's experts) must divide the expert width, so experts are 64
# wide; the preset's group 128 for the other linears falls back to 64 here (hidden 64) and to 32 for Maverick's
# 96-wide dense MLPs (recipe.for_model). initializer_range 0.05 instead of 0.1: at 0.1 these random models route on
# knife-edge margins, and any weight perturbation (even FP8's) flips experts; at 0.05 quantization error, not
# chaos, is what is measured.
QUANT = dict(intermediate_size=64, initializer_range=0.05)


@pytest.fixture(scope="session")
def quant_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Scout (hub layout, bf16) and Maverick (hub layout, fp32) shaped for the quantization tests."""
    _need_reference()
    root = tmp_path_factory.mktemp("qckpts")
    return {"scout": build(root / "scout", shape="scout", style="hub", dtype="bfloat16", **QUANT),
            "maverick": build(root / "maverick", shape="maverick", style="hub", dtype="float32", **QUANT)}


@pytest.fixture(params=list(CASES))
def any_checkpoint(request, tiny_checkpoints) -> Path:
    return tiny_checkpoints[request.param]
