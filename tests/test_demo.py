"""The built-in tiny checkpoint: deterministic, torch-free, readable by transformers, with a working tokenizer."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from l4export.checkpoint import Checkpoint
from l4export.cli import main


def test_demo_is_deterministic_and_torch_free(tmp_path):
    code = (
        "import sys; from l4export.demo import write_demo_checkpoint; "
        f"write_demo_checkpoint({str(tmp_path / 'a')!r}); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'demo imported torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert CliRunner().invoke(main, ["demo-checkpoint", str(tmp_path / "b")]).exit_code == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "model.safetensors.index.json" in files and "tokenizer.json" in files
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_demo_existing_out_refused(tmp_path):
    (tmp_path / "x").mkdir()
    result = CliRunner().invoke(main, ["demo-checkpoint", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--force" in result.output


def test_demo_loads_in_transformers_with_same_counts(tmp_path):
    pytest.importorskip("torch")
    from builders import count_text_params

    from l4export.demo import write_demo_checkpoint

    path = write_demo_checkpoint(tmp_path / "demo")
    ckpt = Checkpoint(path)
    assert ckpt.spec.layout == "multimodal" and ckpt.spec.num_experts == 16
    assert count_text_params(path) == ckpt.spec.total_params


def test_demo_tokenizer_round_trip(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from l4export.demo import BOS, write_demo_checkpoint

    path = write_demo_checkpoint(tmp_path / "demo")
    tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    text = "Llama 4 — ünïcode ✓"
    enc = tok.encode(text)
    assert enc.ids[0] == BOS and max(enc.ids) < Checkpoint(path).spec.vocab_size
    assert tok.decode(enc.ids, skip_special_tokens=True) == text
    assert enc.ids[1:] == list(text.encode("utf-8"))  # byte level: one id per byte
    assert np.all(np.asarray(enc.ids[1:]) < 256)
