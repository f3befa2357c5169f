"""Reproducible exports: the same checkpoint and options give the same bytes, every file and the manifest included.

Each case converts the same tiny checkpoint twice into fresh output folders of different names and compares every
file byte for byte: float and each preset in both formats, a calibrated int4 export (its quant_report.json and
plots included: timings go to the log, not into the export), and a calibrated export on a local Ray cluster
against the same export made in this process.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from l4export.cli import main
from l4export.convert import ExportOptions, convert
from l4export.quant.calib import CalibOptions
from l4export.quant.recipe import load_recipe


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text("\n".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(8)))
    return p


def assert_same_bytes(a: Path, b: Path) -> None:
    """``a`` and ``b`` hold the same files with the same bytes; their manifests are equal."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    assert Path("manifest.sha256") in files_a and len(files_a) >= 5, files_a
    assert (a / "manifest.sha256").read_bytes() == (b / "manifest.sha256").read_bytes()
    differ = [str(f) for f in files_a if (a / f).read_bytes() != (b / f).read_bytes()]
    assert not differ, f"files that differ between two runs: {differ}"


def _options(fmt: str, quant: str | None, calib: Path | None = None, ray: str | None = None) -> ExportOptions:
    c = None if calib is None else CalibOptions(path=calib, samples=4, seqlen=24)
    return ExportOptions(format=fmt, quant=None if quant is None else load_recipe(quant), calib=c,  # type: ignore[arg-type]
                         ray=ray)


@pytest.mark.parametrize("quant", [None, "int4", "int4-exact", "fp8"])
@pytest.mark.parametrize("fmt", ["onnx", "mlx"])
def test_two_conversions_give_the_same_bytes(fmt, quant, qscout, tmp_path):
    a = convert(qscout, tmp_path / "first", _options(fmt, quant))
    b = convert(qscout, tmp_path / "second-run", _options(fmt, quant))
    assert_same_bytes(a, b)


def test_calibrated_conversions_give_the_same_bytes_and_log_their_time(qscout, tmp_path, calib_text, caplog):
    """Through the CLI (--calib): quant_report.json records what was calibrated, and the log at INFO how long."""
    caplog.set_level(logging.INFO, logger="l4export")
    for name in ("first", "second-run"):
        r = CliRunner().invoke(main, ["convert", str(qscout), "-o", str(tmp_path / name), "--quant", "int4",
                                      "--calib", str(calib_text), "--calib-samples", "4", "--calib-seqlen", "24"])
        assert r.exit_code == 0, r.output
    assert (tmp_path / "first" / "quant_report.json").is_file()
    assert_same_bytes(tmp_path / "first", tmp_path / "second-run")
    timed = [r for r in caplog.records if r.levelno == logging.INFO and r.getMessage().startswith("calibration: ")]
    assert len(timed) == 2 and all(" s on " in r.getMessage() for r in timed), [r.getMessage() for r in timed]


def test_calibrated_on_ray_gives_the_bytes_of_a_plain_run(qscout, tmp_path, calib_text):
    pytest.importorskip("ray", reason="the distributed extra (Ray) is not installed")
    plain = convert(qscout, tmp_path / "plain", _options("onnx", "int4", calib_text))
    on_ray = convert(qscout, tmp_path / "on-ray", _options("onnx", "int4", calib_text, ray="local"))
    assert_same_bytes(plain, on_ray)
