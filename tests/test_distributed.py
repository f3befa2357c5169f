"""--ray: conversion and calibration on a local Ray cluster give the bytes of a single-process run.

One local cluster (2 CPUs) serves the module; ``RayWorkers`` joins it (as ``--ray auto`` would). Calibration runs
with one expert per job (``expert_batch_bytes=1``) so that each MoE layer is 16 jobs spread over both workers.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from l4export.convert import ExportOptions, convert
from l4export.distributed import KILL_ENV
from l4export.quant.calib import CalibOptions
from l4export.quant.recipe import load_recipe

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))



@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray", reason="the distributed extra (Ray) is not installed")
    pytest.importorskip("torch")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text("\n".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(8)))
    return p


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file of an export, l4export.json, quant_report.json and the manifest included (--ray records
    nothing of how it ran; the calibration's seconds go to the log)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    assert "model.onnx.data" in out or any(k.endswith(".safetensors") for k in out)
    return out


def _options(fmt: str, calib: Path | None, ray_address: str | None, quant: str = "int4") -> ExportOptions:
    c = None if calib is None else CalibOptions(path=calib, samples=4, seqlen=24, expert_batch_bytes=1)
    return ExportOptions(format=fmt, quant=load_recipe(quant), calib=c, ray=ray_address)  # type: ignore[arg-type]


def _pair(src: Path, tmp: Path, fmt: str, calib: Path | None, quant: str = "int4") -> tuple[dict, dict]:
    one = convert(src, tmp / "one", _options(fmt, calib, None, quant))
    many = convert(src, tmp / "ray", _options(fmt, calib, "auto", quant))
    return digests(one), digests(many)


@pytest.mark.parametrize("fmt", ["onnx", "mlx"])
def test_ray_round_to_nearest_is_byte_identical(cluster, qscout, tmp_path, fmt):
    one, many = _pair(qscout, tmp_path, fmt, None)
    assert one == many


@pytest.mark.parametrize("fmt", ["onnx", "mlx"])
def test_ray_calibration_is_byte_identical(cluster, qscout, tmp_path, calib_text, fmt):
    one, many = _pair(qscout, tmp_path, fmt, calib_text)
    assert one == many


@pytest.mark.parametrize("quant", ["mixed:3.5:per-projection", "mixed:3.5:per-expert"])
def test_ray_mixed_low_bit_calibration_is_byte_identical(cluster, qscout, tmp_path, calib_text, quant):
    """mixed:3.5 calibrated: the measurement pass, then GPTQ at 2 to 8 bits as Ray jobs, give the bytes of one
    process; per expert too (a batch's experts at several widths, appended to one stack)."""
    one, many = _pair(qscout, tmp_path, "onnx", calib_text, quant)
    assert one == many


def test_ray_per_expert_round_to_nearest_is_byte_identical(cluster, qscout, tmp_path):
    """Round to nearest ahead of the writer: jobs of one width each, stacked again in the spill."""
    one, many = _pair(qscout, tmp_path, "onnx", None, "mixed:3.5:per-expert")
    assert one == many


def test_lost_worker_is_retried(cluster, qscout, tmp_path, calib_text, monkeypatch, caplog):
    """The worker of job 3 exits mid-run (os._exit); Ray runs the job again and the bytes do not change."""
    one = digests(convert(qscout, tmp_path / "one", _options("onnx", calib_text, None)))
    monkeypatch.setenv(KILL_ENV, "3")
    out = tmp_path / "ray"
    many = digests(convert(qscout, out, _options("onnx", calib_text, "auto")))
    assert one == many
    assert "the worker of job 3 was killed once" in caplog.text
    assert not any(p.name == ".killed" for p in out.rglob("*"))  # the hook's marker went with the temporary files


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "l4export.cli", *args], capture_output=True, text=True, timeout=300)


def test_unreachable_address_is_one_line(qscout, tmp_path):
    pytest.importorskip("ray", reason="the distributed extra (Ray) is not installed")
    out = tmp_path / "o"
    r = _cli("convert", str(qscout), "-o", str(out), "--quant", "int4", "--ray", "ray://127.0.0.1:1")
    assert r.returncode == 2, r.stderr
    assert "cannot reach a Ray cluster" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".o.tmp-*"))


def test_ray_without_the_extra_is_one_line(qscout, tmp_path):
    """Ray hidden from the interpreter (sys.modules['ray'] = None): the one-line install hint, nothing written."""
    out = tmp_path / "o"
    code = ("import sys; sys.modules['ray'] = None; from l4export.cli import main; "
            f"main(['convert', {str(qscout)!r}, '-o', {str(out)!r}, '--quant', 'int4', '--ray', 'local'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "pip install 'l4export[distributed]'" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


def test_tmp_dir_must_be_a_writable_folder(qscout, tmp_path):
    r = _cli("convert", str(qscout), "-o", str(tmp_path / "o"), "--quant", "int4", "--tmp-dir", str(tmp_path / "nope"))
    assert r.returncode == 2 and "--tmp-dir is not a writable folder" in r.stderr, r.stderr
    r = _cli("convert", str(qscout), "-o", str(tmp_path / "o"), "--quant", "int4", "--ray", "local",
             "--tmp-dir", str(tmp_path))
    assert r.returncode == 2 and "filesystem every node shares" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_not_enough_disk_is_refused_before_any_weight_is_read(tmp_path):
    """A Scout-width checkpoint as a sparse file (headers real, no data): its fp32 export needs more than this
    disk's free space (layers chosen from the free space), so convert refuses at once, writing nothing."""
    import shutil

    from l4export.demo import write_synthetic
    from bench_real_width import scout_config

    free = shutil.disk_usage(tmp_path).free
    per_layer = 4 * 2.1e9  # fp32 bytes of one Scout MoE layer (16 experts of 3 x 5120 x 8192, attention, shared)
    layers = int(free / per_layer) + 2
    src = write_synthetic(tmp_path / "ck", scout_config(layers, vision_layers=0), fill="sparse")
    r = _cli("convert", str(src), "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and "GB free but this export needs about" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    assert not list(tmp_path.glob(".o.tmp-*"))
