"""The bad-input catalogue: every case through the CLI, as a new user would hit it.

Each case asserts the exit code (2 usage, 1 bad data), exactly one ``error:`` line that names the problem, no
traceback, and, for commands that write, nothing left behind (no output folder, no temporary sibling). Inputs are
copies of the built-in demo checkpoint and of its exports, damaged in one way each.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from l4export.cli import main


@pytest.fixture(scope="module")
def demo(demo_checkpoint) -> Path:
    return demo_checkpoint


@pytest.fixture(scope="module")
def onnx_export(demo, export) -> Path:
    return export(demo, "onnx")


def _invoke(args: list[str]):
    return CliRunner().invoke(main, [str(a) for a in args])


def _check(result, code: int, needle: str) -> None:
    out = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == code, out
    assert "Traceback" not in out and (result.exception is None or isinstance(result.exception, SystemExit)), out
    errors = [ln for ln in result.stderr.replace("\r", "\n").splitlines() if ln.lower().startswith("error")]
    assert len(errors) == 1, result.stderr
    assert len(errors[0]) <= 200, errors[0]
    assert needle.lower() in result.stderr.lower(), (needle, result.stderr)


def _nothing_left(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not list(parent.glob(f".{name}.*")), list(parent.glob(f".{name}.*"))


# ---- damaged checkpoints: convert must refuse them before writing anything ---------------------------------------
def _config(ckpt: Path) -> dict:
    return json.loads((ckpt / "config.json").read_text())


def _set_text(key, value):
    def edit(ckpt: Path) -> None:
        cfg = _config(ckpt)
        if value is KeyError:
            cfg["text_config"].pop(key)
        else:
            cfg["text_config"][key] = value
        (ckpt / "config.json").write_text(json.dumps(cfg))

    return edit


def _write(name: str, data: bytes | str):
    def edit(ckpt: Path) -> None:
        p = ckpt / name
        p.write_bytes(data) if isinstance(data, bytes) else p.write_text(data)

    return edit


def _shard(ckpt: Path) -> Path:
    return sorted(ckpt.glob("*.safetensors"))[0]


def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


def _rewrite_header(path: Path, change) -> None:
    raw = path.read_bytes()
    n, header = _header(path)
    change(header)
    new = json.dumps(header).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def _truncate(ckpt: Path) -> None:
    p = _shard(ckpt)
    p.write_bytes(p.read_bytes()[:-1000])


def _overlap(ckpt: Path) -> None:
    def change(h: dict) -> None:  # the second tensor now starts inside the first
        items = sorted(((k, v) for k, v in h.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])
        a, b = items[0][1], items[1][1]
        size = b["data_offsets"][1] - b["data_offsets"][0]
        b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size]

    _rewrite_header(_shard(_any_with_two(ckpt)), change)


def _any_with_two(ckpt: Path) -> Path:
    return ckpt


def _poison(value: float, name_part: str = "self_attn.q_proj"):
    def edit(ckpt: Path) -> None:
        for shard in sorted(ckpt.glob("*.safetensors")):
            n, header = _header(shard)
            key = next((k for k in header if name_part in k), None)
            if key is None:
                continue
            begin = 8 + n + header[key]["data_offsets"][0]
            raw = bytearray(shard.read_bytes())
            word = np.array([value], np.float32).view(np.uint32)[0] >> 16  # the bf16 of value
            raw[begin : begin + 2] = int(word).to_bytes(2, "little")
            shard.write_bytes(bytes(raw))
            return
        raise AssertionError(name_part)

    return edit


def _index(change):
    def edit(ckpt: Path) -> None:
        p = ckpt / "model.safetensors.index.json"
        data = json.loads(p.read_text())
        change(data["weight_map"])
        p.write_text(json.dumps(data))

    return edit


def _rename_tensor(old_part: str, new_name: str):
    def edit(ckpt: Path) -> None:
        for shard in sorted(ckpt.glob("*.safetensors")):
            _, header = _header(shard)
            key = next((k for k in header if old_part in k), None)
            if key:
                _rewrite_header(shard, lambda h: h.__setitem__(new_name, h.pop(key)))
                _index(lambda m: m.__setitem__(new_name, m.pop(key)))(ckpt)
                return
        raise AssertionError(old_part)

    return edit


def _drop_tensor(part: str):
    def edit(ckpt: Path) -> None:
        for shard in sorted(ckpt.glob("*.safetensors")):
            _, header = _header(shard)
            key = next((k for k in header if part in k), None)
            if key:  # keep the bytes (the layout stays valid) under a name the table sets aside
                _rewrite_header(shard, lambda h: h.__setitem__("vision_model.unused", h.pop(key)))
                _index(lambda m: m.pop(key))(ckpt)
                return
        raise AssertionError(part)

    return edit


CHECKPOINT_CASES = {  # name: (damage, exit code, what the message names)
    "config-missing": (lambda c: (c / "config.json").unlink(), 2, "config.json: missing"),
    "config-not-json": (_write("config.json", "{not json"), 1, "not valid JSON"),
    "config-a-list": (_write("config.json", "[1, 2]"), 1, "expected a JSON object"),
    "not-llama4": (_write("config.json", json.dumps({"model_type": "bert"})), 2, "not Llama 4"),
    "hidden-size-string": (_set_text("hidden_size", "128"), 1, "hidden_size is '128'"),
    "hidden-size-missing": (_set_text("hidden_size", KeyError), 1, "hidden_size is missing"),
    "layers-zero": (_set_text("num_hidden_layers", 0), 1, "num_hidden_layers is 0"),
    "heads-negative": (_set_text("num_attention_heads", -4), 1, "num_attention_heads is -4"),
    "experts-zero": (_set_text("num_local_experts", 0), 1, "num_local_experts is 0"),
    "vocab-bool": (_set_text("vocab_size", True), 1, "vocab_size is True"),
    "eps-string": (_set_text("rms_norm_eps", "small"), 1, "rms_norm_eps is 'small'"),
    "rope-yarn": (_set_text("rope_scaling", {"rope_type": "yarn", "factor": 2.0}), 1, "rope type 'yarn'"),
    "no-weights": (lambda c: [p.unlink() for p in [*c.glob("*.safetensors"), c / "model.safetensors.index.json"]],
                   2, "no *.safetensors"),
    "shard-truncated": (_truncate, 1, "truncated"),
    "header-too-long": (lambda c: _shard(c).write_bytes(struct.pack("<Q", 10**12) + b"{}"), 1, "header length"),
    "header-not-json": (lambda c: _shard(c).write_bytes(struct.pack("<Q", 4) + b"{{{{"), 1, "header is not valid JSON"),
    "tensors-overlap": (_overlap, 1, "overlaps"),
    "nan-weight": (_poison(float("nan")), 1, "non-finite"),
    "inf-weight": (_poison(float("inf")), 1, "non-finite"),
    "index-names-missing-shard": (_index(lambda m: m.__setitem__(next(iter(m)), "model-09-of-09.safetensors")),
                                  1, "do not exist"),
    "index-lists-absent-tensor": (_index(lambda m: m.__setitem__("language_model.model.extra.weight",
                                                                  next(iter(m.values())))), 1, "index lists tensor"),
    "unknown-tensor": (_rename_tensor("layers.0.self_attn.q_proj", "language_model.model.layers.0.self_attn.q2.weight"),
                       1, "not Llama 4 text tensors"),
    "missing-tensor": (_drop_tensor("model.norm.weight"), 1, "missing tensor"),
    "wrong-shape": (_set_text("intermediate_size", 32), 1, "expected"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_damaged_checkpoint_is_refused_and_nothing_written(case, demo, tmp_path):
    damage, code, needle = CHECKPOINT_CASES[case]
    ckpt = shutil.copytree(demo, tmp_path / "ckpt")
    damage(ckpt)
    args = ["convert", ckpt, "-o", tmp_path / "out"] + (["--quant", "int4"] if case == "inf-weight" else [])
    _check(_invoke(args), code, needle)
    _nothing_left(tmp_path, "out")


# ---- convert: options, recipes, calibration, output paths -------------------------------------------------------
RECIPES = {
    "bad-toml": ("name = [", "not valid TOML"),
    "unknown-key": ('[[rule]]\nmatch = "*"\nscheme = "int4"\ncolour = "red"\n', "unknown key 'colour'"),
    "bad-scheme": ('[[rule]]\nmatch = "*"\nscheme = "int7"\n', "scheme 'int7'"),
    "width-onnx-cannot-run": ('[[rule]]\nmatch = "*.experts.*"\nscheme = "int3"\n', "int3-g32-asym has no onnx runtime"),
    "group-does-not-divide": ('[[rule]]\nmatch = "*.experts.*"\nscheme = "int4"\ngroup_size = 128\n', "group size 128"),
    "quantized-router": ('[[rule]]\nmatch = "*.router.weight"\nscheme = "int8"\n', "router"),
    "bad-regex": ('[[rule]]\nmatch = "re:(("\nscheme = "int4"\n', "bad regular expression"),
    "no-rules": ('name = "x"\n', "no [[rule]]"),
}


@pytest.mark.parametrize("case", list(RECIPES))
def test_bad_recipe_is_refused_before_reading(case, demo, tmp_path):
    text, needle = RECIPES[case]
    (tmp_path / "r.toml").write_text(text)
    _check(_invoke(["convert", demo, "-o", tmp_path / "out", "--quant", tmp_path / "r.toml"]), 2, needle)
    _nothing_left(tmp_path, "out")


def _calib(tmp: Path, text: str | bytes) -> Path:
    p = tmp / "calib.txt"
    p.write_bytes(text) if isinstance(text, bytes) else p.write_text(text)
    return p


CONVERT_CASES = {  # name: (extra args (tmp -> list), exit code, needle)
    "dtype-float64": (lambda t: ["--dtype", "float64"], 2, "--dtype 'float64'"),
    "bf16-on-cpu": (lambda t: ["--dtype", "bfloat16"], 2, "cannot run on onnx target cpu"),
    "quant-unknown": (lambda t: ["--quant", "int3"], 2, "not a preset"),
    "calib-without-quant": (lambda t: ["--calib", _calib(t, "hello\n")], 2, "--calib needs --quant"),
    "calib-missing": (lambda t: ["--quant", "int4", "--calib", t / "nope.txt"], 2, "nope.txt"),
    "calib-empty": (lambda t: ["--quant", "int4", "--calib", _calib(t, "\n\n")], 2, "calib"),
    "calib-binary": (lambda t: ["--quant", "int4", "--calib", _calib(t, b"\xff\xfe\x00")], 2, "calib"),
    "calib-samples-zero": (lambda t: ["--quant", "int4", "--calib", _calib(t, "a\n"), "--calib-samples", "0"],
                           2, "--calib-samples"),
    "mxfp8-on-onnx": (lambda t: ["--quant", _toml(t, '[[rule]]\nmatch = "*.experts.*"\nscheme = "mxfp8"\n')],
                      2, "mxfp8"),
    "level4-on-mlx": (lambda t: ["--format", "mlx", "--quant", _toml(t, '[[rule]]\nmatch = "*.experts.*"\n'
                                                                       'scheme = "int4"\ngroup_size = 32\n'
                                                                       'accuracy_level = 4\n')], 2, "accuracy_level"),
    "max-images-zero": (lambda t: ["--max-images", "0"], 2, "--max-images"),
    "format-unknown": (lambda t: ["--format", "gguf"], 2, "--format"),
}


def _toml(tmp: Path, text: str) -> Path:
    (tmp / "r.toml").write_text(text)
    return tmp / "r.toml"


@pytest.mark.parametrize("case", list(CONVERT_CASES))
def test_bad_convert_options(case, demo, tmp_path):
    extra, code, needle = CONVERT_CASES[case]
    _check(_invoke(["convert", demo, "-o", tmp_path / "out", *extra(tmp_path)]), code, needle)
    _nothing_left(tmp_path, "out")


def test_bad_output_paths(demo, tmp_path):
    (tmp_path / "a-file").write_text("x")
    _check(_invoke(["convert", demo, "-o", tmp_path / "a-file"]), 2, "is not a folder")
    _check(_invoke(["convert", demo, "-o", tmp_path / "a-file", "--force"]), 2, "is not a folder")
    (tmp_path / "exists").mkdir()
    _check(_invoke(["convert", demo, "-o", tmp_path / "exists"]), 2, "already exists")
    _check(_invoke(["convert", demo, "-o", tmp_path / "no" / "such" / "out"]), 2, "does not exist")
    _check(_invoke(["convert", demo, "-o", demo]), 2, "must not be the checkpoint folder")
    _check(_invoke(["convert", demo / "config.json", "-o", tmp_path / "o"]), 2, "checkpoint folder, not a file")
    _check(_invoke(["convert", tmp_path / "nowhere", "-o", tmp_path / "o"]), 2, "no such file or directory")
    _nothing_left(tmp_path, "o")


# ---- run ---------------------------------------------------------------------------------------------------------
RUN_CASES = {  # name: (args after EXPORT, exit code, needle)
    "id-past-vocab": (["--ids", "1,99999"], 2, "token ids must be in"),
    "id-negative": (["--ids", "-1"], 2, "token ids must be in"),
    "ids-not-numbers": (["--ids", "one,two"], 2, "--ids takes integers"),
    "n-zero": (["--ids", "1", "-n", "0"], 2, "--max-new-tokens"),
    "n-negative": (["--ids", "1", "-n", "-1"], 2, "--max-new-tokens"),
    "temperature-negative": (["--ids", "1", "--temperature", "-1"], 2, "--temperature"),
    "temperature-nan": (["--ids", "1", "--temperature", "nan"], 2, "--temperature"),
    "temperature-inf": (["--ids", "1", "--temperature", "inf"], 2, "--temperature"),
    "top-p-two": (["--ids", "1", "--top-p", "2"], 2, "--top-p"),
    "top-p-zero": (["--ids", "1", "--top-p", "0"], 2, "--top-p"),
    "dtype-on-onnx": (["--ids", "1", "--dtype", "float16"], 2, "--dtype chooses the MLX compute dtype"),
    "prompt-and-ids": (["--ids", "1", "--prompt", "x"], 2, "exactly one of --prompt or --ids"),
    "neither": ([], 2, "exactly one of --prompt or --ids"),
    "prefill-step-zero": (["--ids", "1", "--prefill-step", "0"], 2, "prefill step 0"),
    "prefill-step-past-chunk": (["--ids", "1", "--prefill-step", "100000"], 2, "larger than attention_chunk_size"),
    "kv-fp8-on-cpu": (["--ids", "1", "--kv-dtype", "fp8"], 2, "FP8 cache"),
    "kv-unknown": (["--ids", "1", "--kv-dtype", "int4"], 2, "--kv-dtype"),
    "prompt-too-long": (["--ids", ",".join(["5"] * 4097)], 2, "max_position_embeddings"),
    "provider-unknown": (["--ids", "1", "--provider", "tpu"], 2, "--provider"),
}


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_bad_run_options(case, onnx_export):
    args, code, needle = RUN_CASES[case]
    _check(_invoke(["run", onnx_export, *args]), code, needle)


def _damaged_export(onnx_export: Path, tmp: Path, damage) -> Path:
    out = shutil.copytree(onnx_export, tmp / "export")
    damage(out)
    return out


EXPORT_DAMAGE = {
    "not-an-export": (lambda e: (e / "l4export.json").unlink(), 2, "not an l4export export"),
    "info-not-json": (lambda e: (e / "l4export.json").write_text("{oops"), 1, "l4export.json: not the JSON object"),
    "graph-truncated": (lambda e: (e / "model.onnx").write_bytes((e / "model.onnx").read_bytes()[:500]), 1,
                        "cannot load"),
    "data-missing": (lambda e: (e / "model.onnx.data").unlink(), 1, "cannot load"),
    "data-truncated": (lambda e: (e / "model.onnx.data").write_bytes((e / "model.onnx.data").read_bytes()[:1000]), 1,
                       "cannot load"),
    "graph-missing": (lambda e: (e / "model.onnx").unlink(), 1, "no model.onnx"),
    "config-missing": (lambda e: (e / "config.json").unlink(), 1, "no config.json"),
}


@pytest.mark.parametrize("case", list(EXPORT_DAMAGE))
@pytest.mark.parametrize("command", ["run", "verify"])
def test_damaged_export_is_one_line(command, case, onnx_export, demo, tmp_path):
    damage, code, needle = EXPORT_DAMAGE[case]
    out = _damaged_export(onnx_export, tmp_path, damage)
    args = ["run", out, "--ids", "1,2"] if command == "run" else ["verify", out, "--reference", demo]
    _check(_invoke(args), code, needle)


@pytest.mark.mlx
def test_damaged_mlx_export_is_one_line(demo, export, tmp_path):
    out = shutil.copytree(export(demo, "mlx"), tmp_path / "mlx")
    shard = sorted(out.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    _check(_invoke(["run", out, "--ids", "1,2"]), 1, "mlx cannot read it")


# ---- a checkpoint without tokenizer.json -------------------------------------------------------------------------
def test_checkpoint_without_tokenizer_warns_and_its_export_refuses_text(demo, tmp_path):
    ckpt = shutil.copytree(demo, tmp_path / "ckpt")
    (ckpt / "tokenizer.json").unlink()
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "l4export.cli", "convert", str(ckpt), "-o", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    warned = [ln for ln in r.stderr.splitlines() if ln.startswith("WARNING")]
    assert len(warned) == 1 and "has no tokenizer.json" in warned[0] and "run --ids" in warned[0], r.stderr
    assert "next to config.json and convert again" in warned[0]
    for args in (["--prompt", "def f(x):"], ["--prompt", "hi", "--no-chat-template"]):
        r = _invoke(["run", out, *args])
        _check(r, 2, "no tokenizer.json, so it cannot tokenize text: give token ids (run --ids)")
        assert "next to its config.json and convert again" in r.stderr, r.stderr
    _check(_invoke(["chat", out], ), 2, "no tokenizer.json")
    r = _invoke(["run", out, "--ids", "1,2", "-n", "2"])
    assert r.exit_code == 0 and len(r.output.split()) == 2, r.output
    quiet = subprocess.run([sys.executable, "-m", "l4export.cli", "convert", str(demo), "-o", str(tmp_path / "o2")],
                           capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and "tokenizer" not in quiet.stderr, quiet.stderr  # a checkpoint with one: no word


# ---- verify, inspect -----------------------------------------------------------------------------------------
def test_bad_verify_options(onnx_export, demo, tmp_path, checkpoint):
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x01")
    v = ["verify", onnx_export, "--reference", demo]
    _check(_invoke([*v, "--prompts", tmp_path / "bin.txt"]), 2, "not UTF-8")
    _check(_invoke([*v, "--prompts", tmp_path / "none.txt"]), 2, "not found")
    _check(_invoke([*v, "--greedy-tokens", "-1"]), 2, "--greedy-tokens")
    r = _invoke([*v, "--json", tmp_path / "no" / "r.json"])  # refused before the run: no table printed
    _check(r, 2, "does not exist")
    assert "PASSED" not in r.output and "FAILED" not in r.output
    _check(_invoke([*v, "--junit", tmp_path]), 2, "is a folder")
    _check(_invoke(["verify", onnx_export, "--reference", checkpoint("maverick_hub")]), 2, "is not the model exported")


def test_inspect_an_export_and_check_its_manifest(onnx_export, tmp_path):
    r = _invoke(["inspect", onnx_export, "--check"])
    assert r.exit_code == 0 and "all intact" in r.output and "onnx / float32 / cpu" in r.output, r.output
    out = shutil.copytree(onnx_export, tmp_path / "e")
    data = bytearray((out / "model.onnx.data").read_bytes())
    data[100] ^= 1
    (out / "model.onnx.data").write_bytes(bytes(data))
    (out / "extra.txt").write_text("x")
    r = _invoke(["inspect", out, "--check"])
    assert r.exit_code == 1 and "changed model.onnx.data" in r.output and "unlisted extra.txt" in r.output, r.output
    _check(_invoke(["inspect", onnx_export, "--context", "0"]), 2, "--context")


# ---- faults: signals, stale temporary folders --------------------------------------------------------------------
def test_sigterm_during_convert_cleans_up(demo, tmp_path):
    """SIGTERM is handled as Ctrl-C: one line, exit 143, no output and no temporary folder left."""
    calib = _calib(tmp_path, "\n".join(f"sample {i} " * 40 for i in range(64)))
    cmd = [sys.executable, "-m", "l4export.cli", "convert", str(demo), "-o", str(tmp_path / "out"), "--quant", "int4",
           "--calib", str(calib), "--calib-samples", "64", "--calib-seqlen", "128"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".out.tmp-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "convert finished before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1].startswith("error: interrupted (SIGTERM)") and "Traceback" not in err, err
    _nothing_left(tmp_path, "out")


def test_stale_temporary_folder_is_removed_by_the_next_run(demo, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    stale = tmp_path / f".out.tmp-{dead.pid}-abc"
    stale.mkdir()
    (stale / "model.onnx").write_text("half")
    r = _invoke(["convert", demo, "-o", tmp_path / "out"])
    assert r.exit_code == 0 and not stale.exists() and (tmp_path / "out" / "manifest.sha256").is_file()
    assert oct(os.stat(tmp_path / "out").st_mode & 0o777) != oct(0o700)  # the user's umask, not mkdtemp's 0700


def test_sigkilled_convert_is_cleaned_by_the_next_convert_into_the_same_folder(demo, tmp_path):
    """SIGKILL cannot be handled: the killed run's temporary folder stays until the next convert into the same parent
    folder, on another output, removes it; a dead run's previous export moved aside goes back where its output is
    missing, else is removed; temporary folders of a live process, or named by another host, are kept."""
    from l4export.outputs import _host_tag

    calib = _calib(tmp_path, "\n".join(f"sample {i} " * 40 for i in range(64)))
    cmd = [sys.executable, "-m", "l4export.cli", "convert", str(demo), "-o", str(tmp_path / "killed"), "--quant",
           "int4", "--calib", str(calib), "--calib-samples", "64", "--calib-seqlen", "128"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".killed.tmp-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "convert finished before it could be killed"
    proc.kill()
    proc.wait(timeout=60)
    assert list(tmp_path.glob(".killed.tmp-*"))  # what the next run has to clean
    tag, other_tag = _host_tag(), "0" * 8 if _host_tag() != "0" * 8 else "1" * 8
    half_old = tmp_path / f".prev.old-{proc.pid}@{tag}-x1" / "prev"  # killed while replacing prev: prev is missing
    half_old.mkdir(parents=True)
    (half_old / "model.onnx").write_text("the previous export")
    (tmp_path / "done").mkdir()  # killed after the new export was in place: the old one goes
    (tmp_path / f".done.old-{proc.pid}@{tag}-x4" / "done").mkdir(parents=True)
    live = tmp_path / f".busy.tmp-{os.getppid()}@{tag}-x2"  # the process that started this test: alive
    far = tmp_path / f".far.tmp-{proc.pid}@{other_tag}-x3"  # another host's pid: not checkable here
    live.mkdir()
    far.mkdir()
    r = _invoke(["convert", demo, "-o", tmp_path / "other"])
    assert r.exit_code == 0 and (tmp_path / "other" / "manifest.sha256").is_file(), r.output
    _nothing_left(tmp_path, "killed")
    assert (tmp_path / "prev" / "model.onnx").read_text() == "the previous export"  # moved back, not lost
    assert live.is_dir() and far.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted([live.name, far.name])


@pytest.mark.parametrize("fmt", ["onnx", pytest.param("mlx", marks=pytest.mark.mlx)])
def test_reruns_are_byte_identical_manifest_included(fmt, demo, tmp_path):
    for name in ("a", "b"):
        assert _invoke(["convert", demo, "-o", tmp_path / name, "--format", fmt, "--quant", "int4"]).exit_code == 0
    a, b = ((tmp_path / n / "manifest.sha256").read_text() for n in ("a", "b"))
    assert a == b and len(a.splitlines()) >= 5
