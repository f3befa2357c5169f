"""Packages the tests need only as oracles, installed without their dependencies into ``.cache/`` on first use.

    torchvision   transformers' Llama 4 image processor needs it; the registry's wheels are linked against CUDA torch
                  and break ``import transformers`` when they sit in site-packages beside torch==2.13.0 (CPU), so it
                  is only ever imported in a subprocess (tests/hf_image.py explains the rest)
    mlx-vlm       its llama4 model code reads our MLX export (the package's other dependencies, opencv, datasets,
                  mlx-audio, a web stack, are not needed for that and not installed)

A failed install fails the test that needed it (never a skip). docs/vision.md says the same.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def install(requirement: str, folder_name: str) -> Path:
    """A folder holding ``requirement`` (pip, no dependencies), installed there once; put it on sys.path to use it."""
    folder = ROOT / ".cache" / folder_name
    if (folder / ".complete").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", tmp, requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"installing {requirement} for the tests failed: {done.stderr.strip()[-500:]}")
        (Path(tmp) / ".complete").write_text(requirement)
        Path(tmp).rename(folder)
    return folder


def torchvision_version(torch_version: str) -> str:
    """The torchvision release built for a torch 2.x release: minor + 15 (2.13 -> 0.28)."""
    major, minor = (int(x) for x in torch_version.split("+")[0].split(".")[:2])
    if major != 2:
        raise RuntimeError(f"no torchvision mapping for torch {torch_version}")
    return f"0.{minor + 15}"


def torchvision_dir() -> Path:
    import torch

    version = torchvision_version(torch.__version__)
    return install(f"torchvision=={version}.*", f"torchvision-{version}")


MLX_VLM = "0.7.10"


def mlx_vlm_dir() -> Path:
    return install(f"mlx-vlm=={MLX_VLM}", f"mlx-vlm-{MLX_VLM}")
