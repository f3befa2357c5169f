"""transformers' Llama 4 image processor and processor, run in a subprocess, as the oracle of l4export.image.

Why a subprocess: ``Llama4ImageProcessor`` needs torchvision, and the registry's torchvision wheels are linked
against CUDA torch, so their compiled ops (torchvision::nms, ...) do not load beside torch==2.13.0 (CPU); importing
torchvision then fails in its op registrations. The processor's resize and normalize paths use none of those ops.
So the matching torchvision wheel is installed without dependencies into ``.cache/`` (never into site-packages,
where it would break ``import transformers`` for everything else), and the worker imports it with its two
registration modules stubbed out (tests/side_packages.py installs it, once, on first use). docs/vision.md says the same.

    hf_image.process(images, tile, max_patches)            -> [(pixel_values float32, (rows, cols)), ...]
    hf_image.input_ids(text, images, tile, max_patches, tokenizer_json) -> list[int]
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

from side_packages import torchvision_dir


def _run(request: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.pkl", Path(tmp) / "out.pkl"
        src.write_bytes(pickle.dumps(request))
        done = subprocess.run([sys.executable, __file__, str(torchvision_dir()), str(src), str(dst)],
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"the transformers processor worker failed:\n{done.stderr[-3000:]}")
        return pickle.loads(dst.read_bytes())


def process(images: list, tile: int, max_patches: int) -> list[tuple]:
    """transformers' pixel_values (bf16 -> float32) and (rows, cols) of each image (PIL images or arrays)."""
    return _run({"what": "pixels", "images": images, "tile": tile, "max_patches": max_patches})["out"]


def input_ids(text: str, images: list, tile: int, max_patches: int, tokenizer_json: Path) -> list[int]:
    """Llama4Processor's input_ids for ``text`` with ``<|image|>`` placeholders (no special tokens added)."""
    req = {"what": "ids", "images": images, "tile": tile, "max_patches": max_patches, "text": text,
           "tokenizer": json.loads(Path(tokenizer_json).read_text())}
    return _run(req)["out"]


def _worker(tv_dir: str, src: str, dst: str) -> None:
    import types

    sys.path.insert(0, tv_dir)
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        sys.modules[name] = types.ModuleType(name)  # they register kernels for ops whose library cannot load
    from transformers.models.llama4.image_processing_llama4 import Llama4ImageProcessor

    req = pickle.loads(Path(src).read_bytes())
    proc = Llama4ImageProcessor(size={"height": req["tile"], "width": req["tile"]}, max_patches=req["max_patches"])
    if req["what"] == "pixels":
        out = []
        for im in req["images"]:
            r = proc(images=[im], return_tensors="pt")
            out.append((r["pixel_values"].float().numpy(), tuple(int(v) for v in r["aspect_ratios"][0])))
    else:
        from tokenizers import Tokenizer
        from transformers import Llama4Processor, PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(req["tokenizer"])))
        processor = Llama4Processor(image_processor=proc, tokenizer=tok, patch_size=14, pixel_shuffle_ratio=0.5)
        r = processor(text=[req["text"]], images=req["images"], add_special_tokens=False)
        out = [int(i) for i in r["input_ids"][0]]
    Path(dst).write_bytes(pickle.dumps({"out": out}))


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
