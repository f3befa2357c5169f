"""The runtimes are what apps embed at the edge: they run with numpy, the backend and tokenizers only.

Each export runs in an isolated interpreter (``python -I -S``: no site-packages, no PYTHONPATH) whose only
third-party packages are numpy, the backend (onnxruntime, or mlx), tokenizers and l4export itself, linked into a
private folder, and whose import system also refuses the heavy packages by name. It must generate the same tokens
as the runtime in the full environment. Nothing is installed, so the test cannot skip for want of a network.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from l4export.convert import ExportOptions, convert
from l4export.demo import write_demo_checkpoint

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ["torch", "transformers", "onnx", "onnx_ir", "onnxscript", "ml_dtypes", "safetensors", "click", "tqdm"]
# what each format's runtime may import: importable names -> the folders (and native libs) that carry them
ALLOWED = {"onnx": ("numpy", "onnxruntime", "tokenizers"), "mlx": ("numpy", "mlx", "tokenizers")}

SCRIPT = """
import importlib.abc, json, sys
sys.path.insert(0, sys.argv[2])
class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {forbidden}:
            raise ImportError('refused: ' + name)
sys.meta_path.insert(0, _Refuse())
from l4export.runtimes import load_runtime
rt = load_runtime(sys.argv[1])
if len(sys.argv) > 3:  # an image: the prompt's tokens and features, as an app would build them
    prompt, feats = rt.prompt_ids("Hello", [sys.argv[3]])
    ids = list(rt.generate(prompt, 8, features=feats, stop=[]))
    text = "".join(rt.generate_text("Hello", 4, images=[sys.argv[3]]))
else:
    ids = list(rt.generate(rt.encode("Hello"), 8))
    text = "".join(rt.generate_text("Hello", 4))
third_party = sorted({{m.split('.')[0] for m, mod in sys.modules.items()
                      if getattr(mod, '__file__', None) and sys.argv[2] in mod.__file__}})
print(json.dumps({{"ids": ids, "text": text, "third_party": third_party}}))
"""


def _isolated_site(tmp: Path, names: tuple[str, ...]) -> Path:
    """A folder holding links to only ``names`` (with their bundled native libraries) and l4export."""
    import importlib.util

    site = tmp / "site"
    site.mkdir()
    for name in (*names, "l4export"):
        spec = importlib.util.find_spec(name)
        folder = Path(next(iter(spec.submodule_search_locations)))
        (site / name).symlink_to(folder)
        dist = "pillow" if name == "PIL" else name  # the wheel's name, which names its vendored libraries
        for libs in folder.parent.glob(f"{dist}*.libs"):  # auditwheel's vendored shared libraries
            (site / libs.name).symlink_to(libs)
    return site


@pytest.mark.parametrize("fmt", ["onnx", pytest.param("mlx", marks=pytest.mark.mlx)])
def test_runtime_with_only_numpy_backend_and_tokenizers(fmt, tmp_path):
    pytest.importorskip(ALLOWED[fmt][1])
    demo = write_demo_checkpoint(tmp_path / "demo")
    out = convert(demo, tmp_path / "export", ExportOptions(format=fmt))
    site = _isolated_site(tmp_path, ALLOWED[fmt])
    code = SCRIPT.format(forbidden=FORBIDDEN)
    run = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(out), str(site)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(result["third_party"]) <= {*ALLOWED[fmt], "l4export"}, result["third_party"]
    assert ALLOWED[fmt][1] in result["third_party"]  # the backend really ran
    from l4export.runtimes import load_runtime

    rt = load_runtime(out)
    assert result["ids"] == list(rt.generate(rt.encode("Hello"), 8)) and len(result["ids"]) == 8


@pytest.mark.parametrize("fmt", ["onnx", pytest.param("mlx", marks=pytest.mark.mlx)])
def test_images_need_only_pillow_more(fmt, tmp_path, export, scout):
    """With the vision path, images add Pillow (decoding) and nothing else: no torch, torchvision, ml_dtypes."""
    import numpy as np
    from PIL import Image

    pytest.importorskip(ALLOWED[fmt][1])
    out = export(scout, fmt)
    image = tmp_path / "picture.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 130, 3), dtype=np.uint8)).save(image)
    site = _isolated_site(tmp_path, (*ALLOWED[fmt], "PIL"))
    run = subprocess.run([sys.executable, "-I", "-S", "-c", SCRIPT.format(forbidden=FORBIDDEN + ["torchvision"]),
                          str(out), str(site), str(image)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(result["third_party"]) <= {*ALLOWED[fmt], "PIL", "l4export"}, result["third_party"]
    assert "PIL" in result["third_party"]
    from l4export.runtimes import load_runtime

    rt = load_runtime(out)
    prompt, feats = rt.prompt_ids("Hello", [image])
    assert result["ids"] == list(rt.generate(prompt, 8, features=feats, stop=[]))
