"""The export folder's contract (folder.py): l4export.json written once by convert as an ExportInfo, read back the
same; both formats record the same quantization section; a damaged one is one line."""

from __future__ import annotations

import json

import pytest

from l4export.errors import ExportError
from l4export.folder import EXPORT_INFO, ExportInfo, QuantInfo, read_export_info
from l4export.quant.recipe import scheme_from_record


@pytest.mark.parametrize("fmt", ["onnx", pytest.param("mlx", marks=pytest.mark.mlx)])
def test_export_info_round_trips(fmt, export, random_demo):
    out = export(random_demo, fmt, quant="int4")
    info = read_export_info(out)
    assert json.loads((out / EXPORT_INFO).read_text()) == info.to_json()
    assert info.format == fmt and info.quantization == "int4" and getattr(info, fmt) and not getattr(info, {"onnx": "mlx", "mlx": "onnx"}[fmt])
    q = info.quant
    assert q == QuantInfo("int4", False, None, q.tensors, q.adapted, q.schemes, q.placement) and q.tensors > 0
    # every quantized tensor is placed, and each scheme reads back as the one that wrote it
    assert len(q.placement) == q.tensors and set(q.placement.values()) == set(q.schemes)
    assert all(scheme_from_record(r, k).name == k for k, r in q.schemes.items())
    assert q.schemes[q.placement["model.layers.0.feed_forward.experts.down_proj"]]["kind"] == "int4"


@pytest.mark.mlx
def test_both_formats_record_the_same_quantization(export, random_demo):
    onnx, mlx = (read_export_info(export(random_demo, f, quant="int4")).quant for f in ("onnx", "mlx"))
    assert (onnx.recipe, onnx.tensors, onnx.adapted, list(onnx.placement)) == (mlx.recipe, mlx.tensors, mlx.adapted, list(mlx.placement))

    def weights(q):  # the same weights; ONNX also records its kernels' activation precision (MLX has none)
        return {n: {k: v for k, v in q.schemes[s].items() if k != "accuracy_level"} for n, s in q.placement.items()}

    assert weights(onnx) == weights(mlx)


def test_float_export_has_no_quant_section(export, random_demo):
    info = read_export_info(export(random_demo))
    assert info.quant is None and info.quantization is None and json.loads((export(random_demo) / EXPORT_INFO).read_text())["quant"] is None


def test_a_damaged_export_info_is_one_line(tmp_path):
    (tmp_path / EXPORT_INFO).write_text(json.dumps({"format": "onnx", "dtype": "float32"}))
    with pytest.raises(ExportError, match="'target' is missing") as err:
        read_export_info(tmp_path)
    assert "\n" not in str(err.value)
    ExportInfo("onnx", "float32", "cpu").write(tmp_path)
    assert read_export_info(tmp_path) == ExportInfo("onnx", "float32", "cpu")
