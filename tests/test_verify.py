"""``l4export verify``: metrics, prompts, thresholds, reports, and the CLI's exit codes on real exports."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("onnxruntime")

from l4export.cli import main  # noqa: E402
from l4export.errors import UsageError  # noqa: E402
from l4export.folder import ExportInfo, QuantInfo  # noqa: E402
from l4export.verify import THRESHOLDS, compare, read_prompts, threshold_for  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from builders import build  # noqa: E402


@pytest.fixture(scope="module")
def scout_export(scout, export) -> Path:
    return export(scout)


def test_compare_metrics():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(3, 50)).astype(np.float32)
    same = compare(ref, ref.copy())
    assert same["rel"] == 0 and same["kl"] == 0 and same["top1"] == 1 and same["cosine"] == pytest.approx(1)
    worse = ref.copy()
    worse[1] = -worse[1]
    m = compare(ref, worse)
    assert m["rel"] == pytest.approx(2 * np.abs(ref[1]).max() / np.abs(ref).max()) and m["cosine"] == pytest.approx(-1) and m["top1"] == pytest.approx(2 / 3)
    assert m["kl"] > 0.1
    nan = ref.copy()
    nan[0, 0] = np.nan
    assert compare(ref, nan)["rel"] == float("inf")


def test_thresholds_table():
    assert threshold_for(ExportInfo("onnx", "float32", "cpu")) == ("float32", THRESHOLDS["float32"])
    assert threshold_for(ExportInfo("onnx", "float16", "cpu"))[1].kl == 1e-3
    assert threshold_for(ExportInfo("mlx", "bfloat16", "cpu"))[1].kl == 1e-2
    assert threshold_for(ExportInfo("onnx", "float16", "cpu", quant=QuantInfo("int4-g32")))[0] == "int4"
    with pytest.raises(UsageError):
        threshold_for(ExportInfo("onnx", "float16", "cpu", quant=QuantInfo("mystery")))
    # exports that record their placement are gated by their lowest width, whatever the recipe's name
    placed = QuantInfo("mixed:3.0", tensors=2, schemes={"a": {"kind": "int4"}, "b": {"kind": "int2"}},
                       placement={"x": "a", "y": "b"})
    assert threshold_for(ExportInfo("mlx", "float32", "any", quant=placed))[0] == "int2"
    fp8 = QuantInfo("mystery", tensors=1, schemes={"f": {"kind": "fp8"}}, placement={"x": "f"})
    assert threshold_for(ExportInfo("onnx", "float32", "cpu", quant=fp8))[0] == "fp8"
    # per-expert widths count by their narrowest expert; a mixed export at 4+ bits by int3's row (it puts 4 bits where
    # the int4 preset keeps 8); a budget that placed nothing is judged as the float export it is
    each = QuantInfo("mixed:3.0:per-expert", tensors=1, allocation={"units": []},
                     schemes={"e": {"kind": "per-expert", "bits": [4, 2, 4]}}, placement={"x": "e"})
    assert threshold_for(ExportInfo("onnx", "float32", "cpu", quant=each))[0] == "int2"
    four = QuantInfo("mixed:5.0", tensors=1, allocation={"units": []}, schemes={"a": {"kind": "int4"}}, placement={"x": "a"})
    assert threshold_for(ExportInfo("onnx", "float32", "cpu", quant=four))[0] == "int3"
    none = QuantInfo("mixed:17888B", allocation={"units": []})
    assert threshold_for(ExportInfo("onnx", "float32", "cpu", quant=none))[0] == "float32"


def test_prompts_file(tmp_path, scout_export):
    from l4export.runtimes import load_runtime

    rt = load_runtime(scout_export)
    p = tmp_path / "prompts.txt"
    p.write_text("1, 5, 9\n\n7,8\n")
    assert read_prompts(p, rt) == [("line1", [1, 5, 9]), ("line3", [7, 8])]
    p.write_text("1, 99999\n")
    with pytest.raises(UsageError, match="outside the vocabulary"):
        read_prompts(p, rt)
    p.write_text("some text\n")
    assert read_prompts(p, rt) == [("line1", rt.encode("some text"))]  # text: the export's tokenizer
    (rt.path / "tokenizer.json").rename(tmp_path / "tokenizer.json")
    try:
        with pytest.raises(UsageError, match="tokenizer"):
            read_prompts(p, type(rt)(rt.path))
    finally:
        (tmp_path / "tokenizer.json").rename(rt.path / "tokenizer.json")


@pytest.mark.parametrize("line, bad", [("1, -5, 9", -5), ("-1", -1), ("+3, 300", 300), ("7, 99999999999999999999", 99999999999999999999)])
def test_prompts_file_ids_outside_the_vocabulary_are_refused(line, bad, tmp_path, scout, scout_export):
    """Every id of a --prompts file is checked (negative ones too, not read as text): one line naming the file, the
    prompt's number and the id, exit 2."""
    p = tmp_path / "prompts.txt"
    p.write_text(f"1, 2, 3\n\n{line}\n")  # the second prompt, on line 3
    r = CliRunner().invoke(main, ["verify", str(scout_export), "--reference", str(scout), "--prompts", str(p)])
    assert r.exit_code == 2, r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and len(errors[0]) <= 200 and "Traceback" not in r.output, r.output
    assert p.name in errors[0] and "prompt 2 (line 3)" in errors[0] and f"token id {bad}," in errors[0], errors[0]
    assert "vocabulary 0..299" in errors[0], errors[0]


def test_verify_cli_passes_and_writes_reports(tmp_path, scout, scout_export):
    r = CliRunner().invoke(main, ["verify", str(scout_export), "--reference", str(scout), "--greedy-tokens", "8",
                                  "--json", str(tmp_path / "r.json"), "--junit", str(tmp_path / "r.xml")])
    assert r.exit_code == 0, r.output + r.stderr
    assert "PASSED: 4/4" in r.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and [x["tokens"] for x in report["results"]] == [1, 7, 9, 24]
    assert all(x["greedy_match"] == 8 for x in report["results"])
    suite = ET.parse(tmp_path / "r.xml").getroot()
    assert suite.get("tests") == "4" and suite.get("failures") == "0"


def test_verify_cli_fails_on_other_weights(tmp_path, scout_export):
    """Same config, other weights: logits disagree, exit 1 (no traceback)."""
    other = build(tmp_path / "other", shape="scout", style="hub", dtype="bfloat16", seed=1)
    r = CliRunner().invoke(main, ["verify", str(scout_export), "--reference", str(other), "--greedy-tokens", "4",
                                  "--junit", str(tmp_path / "r.xml")])
    assert r.exit_code == 1, r.output
    assert "FAILED" in r.output and "Traceback" not in r.output
    assert int(ET.parse(tmp_path / "r.xml").getroot().get("failures")) >= 1


def test_verify_cli_rejects_other_architecture(scout_export, maverick):
    r = CliRunner().invoke(main, ["verify", str(scout_export), "--reference", str(maverick)])
    assert r.exit_code == 2, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is not the model exported" in errors[0] and "Traceback" not in r.stderr


@pytest.mark.parametrize("quant", ["int4", "fp8"])
def test_verify_passes_on_the_demo_quantized_exports(quant, random_demo, export):
    """The fast presets stay inside verify's own gates on the demo architecture (int4: accuracy_level 4)."""
    from l4export.verify import verify

    report = verify(export(random_demo, "onnx", quant=quant), random_demo, greedy_tokens=8)
    assert report.threshold_key == quant and report.passed, report.table()


def test_router_near_tie_is_reported_not_failed_and_hides_no_fault(tmp_path, scout, export):
    """Layer 0's router gets two identical rows (experts 0 and 1): wherever they are the top two, the choice between
    them is a tie that summation order decides. verify reports the first such token (position, layer, margin) and
    gates only the tokens before it; the same export with a 1% error in lm_head still fails."""
    import shutil

    from safetensors.torch import load_file, save_file

    from builders import patch_initializer
    from l4export.verify import verify

    src = shutil.copytree(scout, tmp_path / "tie")
    name = "language_model.model.layers.0.feed_forward.router.weight"
    for f in src.glob("*.safetensors"):
        tensors = load_file(f)
        if name in tensors:
            tensors[name][1] = tensors[name][0]
            save_file(tensors, f, metadata={"format": "pt"})
    out = export(src, "onnx")
    report = verify(out, src, greedy_tokens=8)
    assert report.passed, report.table()
    ties = [r for r in report.results if r.tie is not None]
    assert ties and all(r.tie["layer"] == 0 and r.tie["margin"] < 1e-4 for r in ties), report.table()
    # tokens after the tie are set apart (prompt or greedy), the ones before it are still judged
    assert all(r.judged < r.tokens or r.greedy_total < 8 for r in ties), report.table()
    assert all(r.judged + r.greedy_total > 0 for r in ties), report.table()
    assert "router near-tie at token" in report.table()
    broken = shutil.copytree(out, tmp_path / "broken")
    patch_initializer(broken, "lm_head.weight", lambda w: w * np.float32(1.01))
    assert not verify(broken, src, greedy_tokens=8).passed


# ---- an export ONNX Runtime loads but cannot run ----------------------------------------------------------------
def _fails_at_run_time(export: Path) -> None:
    """Every GroupQueryAttention told it has twice its heads, in every graph: ONNX Runtime loads them and fails in the
    kernel on the first step, with a message of 250+ characters."""
    import onnx

    hit = 0
    for graph in sorted(export.glob("*.onnx")):
        m = onnx.load(str(graph), load_external_data=False)
        for node in (n for n in m.graph.node if n.op_type == "GroupQueryAttention"):
            next(a for a in node.attribute if a.name == "num_heads").i *= 2
            hit += 1
        onnx.save(m, str(graph))
    assert hit, f"no GroupQueryAttention in {export} to damage"


@pytest.fixture(scope="module")
def failing_export(scout_export, tmp_path_factory) -> Path:
    """An export under a long folder name (its error line must still fit 200 characters) that fails at run time."""
    import shutil

    out = shutil.copytree(scout_export, tmp_path_factory.mktemp("failing") / ("a-long-folder-name-" * 4 + "export"))
    _fails_at_run_time(out)
    return out


def _one_error_line(stderr: str) -> str:
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and len(errors[0]) <= 200 and "Traceback" not in stderr, stderr
    return errors[0]


@pytest.mark.parametrize("command", ["verify", "run"])
def test_run_time_failure_in_onnx_runtime_is_one_short_line(command, failing_export, scout):
    args = ["verify", failing_export, "--reference", scout] if command == "verify" else ["run", failing_export, "--ids", "1,2"]
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 1 and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    line = _one_error_line(r.stderr)
    assert "ONNX Runtime failed (GroupQueryAttention: kv_hidden_size / kv_num_heads must" in line, line
    assert line.endswith("); convert it again (-v for the full message)") and failing_export.name[-30:] in line, line


def test_verbose_shows_the_whole_onnx_runtime_message(failing_export, scout):
    """Through a real process: the short line alone by default, ONNX Runtime's whole message too with -v."""
    def cli(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "l4export.cli", *flags, "verify", str(failing_export), "--reference",
                               str(scout)], capture_output=True, text=True, timeout=300)

    quiet, verbose = cli(), cli("-v")
    assert quiet.returncode == 1 and verbose.returncode == 1, quiet.stderr + verbose.stderr
    assert _one_error_line(quiet.stderr) == _one_error_line(verbose.stderr)
    assert "the full message:" not in quiet.stderr, quiet.stderr
    shown = [ln for ln in verbose.stderr.splitlines() if "l4export: the full message:" in ln]
    full = "Name:'model.layers.0/self_attn/sdpa/GroupQueryAttention_0' Status Message: kv_hidden_size"
    assert len(shown) == 1 and full in shown[0] and len(shown[0]) > 250, verbose.stderr
