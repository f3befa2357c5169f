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


def test_demo_writes_python_like_text(demo_checkpoint, export):
    """The quick start's promise: the trained demo continues code with code (greedy, so deterministic), through
    `run --prompt` (its chat template) and as a plain completion; not control bytes or replacement characters."""
    from l4export.runtimes import load_runtime

    out = export(demo_checkpoint, "onnx")
    r = CliRunner().invoke(main, ["run", str(out), "--prompt", "def fibonacci(n):", "-n", "80"])
    assert r.exit_code == 0, r.output
    rt = load_runtime(out)
    plain = "".join(rt.generate_text("class Parser:\n    def ", 80))
    words = {"def", "return", "self", "if", "for", "in", "None", "not", "import", "else", "class"}
    for text in (r.output, plain):
        printable = sum(c.isprintable() or c in "\n\t" for c in text) / max(len(text), 1)
        assert printable > 0.97 and "\ufffd" not in text, repr(text)
        assert words & set(text.replace("(", " ").replace(":", " ").replace(",", " ").split()), repr(text)
    assert len(words & set((r.output + " " + plain).replace("(", " ").replace(":", " ").replace(",", " ").split())) >= 3
