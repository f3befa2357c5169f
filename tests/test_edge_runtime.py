"""The runtimes are what apps embed at the edge: they run with numpy, the backend and tokenizers only.

Two proofs: (1) in this environment, a subprocess whose import system refuses torch, transformers, onnx,
onnx_ir, ml_dtypes, safetensors, click and tqdm; (2) a fresh virtual environment with only numpy, the backend
and tokenizers installed from PyPI (skipped when PyPI cannot be reached).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from click.testing import CliRunner

from l4export.cli import main

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ["torch", "transformers", "onnx", "onnx_ir", "onnxscript", "ml_dtypes", "safetensors", "click", "tqdm"]
BACKEND = {"onnx": ("onnxruntime", ["onnxruntime"]), "mlx": ("mlx", ["mlx[cpu]" if sys.platform == "linux" else "mlx"])}

SCRIPT = """
import json, sys
{guard}
from l4export.runtimes import load_runtime
rt = load_runtime(sys.argv[1])
ids = list(rt.generate(rt.encode("Hello"), 8))
text = "".join(rt.generate_text("Hello", 4))
bad = sorted(m for m in {forbidden} if m in sys.modules)
print(json.dumps({{"ids": ids, "text": text, "imported_forbidden": bad}}))
"""

GUARD = """
import importlib.abc
class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {forbidden}:
            raise ImportError('refused: ' + name)
sys.meta_path.insert(0, _Refuse())
"""


@pytest.fixture(scope="module", params=["onnx", "mlx"])
def export(request, tmp_path_factory):
    pytest.importorskip(BACKEND[request.param][0])
    root = tmp_path_factory.mktemp(f"edge-{request.param}")
    demo, out = root / "demo", root / "export"
    assert CliRunner().invoke(main, ["demo-checkpoint", str(demo)]).exit_code == 0
    result = CliRunner().invoke(main, ["convert", str(demo), "-o", str(out), "--format", request.param])
    assert result.exit_code == 0, result.output
    return request.param, out


def _run(python: str, export: Path, guard: bool) -> dict:
    code = SCRIPT.format(guard=GUARD.format(forbidden=FORBIDDEN) if guard else "", forbidden=FORBIDDEN)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([python, "-c", code, str(export)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_runtime_refusing_heavy_imports(export):
    fmt, path = export
    result = _run(sys.executable, path, guard=True)
    assert len(result["ids"]) == 8 and result["imported_forbidden"] == []
    # Same tokens as the runtime in the full environment.
    from l4export.runtimes import load_runtime

    rt = load_runtime(path)
    assert result["ids"] == list(rt.generate(rt.encode("Hello"), 8))


def test_runtime_in_fresh_venv(export, tmp_path):
    fmt, path = export
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    pkgs = ["numpy", "tokenizers", *BACKEND[fmt][1]]
    pip = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *pkgs],
                         capture_output=True, text=True, timeout=900)
    if pip.returncode != 0:
        pytest.skip(f"could not install {pkgs} from PyPI: {pip.stderr.strip().splitlines()[-1:]}")
    listed = subprocess.run([python, "-m", "pip", "list", "--format=json"], capture_output=True, text=True).stdout
    names = {p["name"].lower() for p in json.loads(listed)}
    assert not names & {"torch", "transformers", "onnx", "onnx-ir", "ml-dtypes", "safetensors"}  # the heavy ones
    result = _run(python, path, guard=False)
    assert len(result["ids"]) == 8 and result["imported_forbidden"] == []
