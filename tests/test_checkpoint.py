"""The checkpoint reader: canonical tensors equal transformers' parameters; FP8 per-expert layout; bad input."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

from l4export.checkpoint import Checkpoint
from l4export.cli import main
from l4export.errors import UsageError
from l4export.outputs import PendingTensor, write_sharded

torch = pytest.importorskip("torch")


def test_canonical_tensors_equal_transformers_parameters(any_checkpoint):
    from l4export.runtimes.reference import load_reference

    ckpt = Checkpoint(any_checkpoint)
    sd = {k: v.float().numpy() for k, v in load_reference(any_checkpoint).state_dict().items()}
    i = ckpt.spec.intermediate_size
    for name, t in ckpt.tensors.items():
        got = t.load(np.float32)
        assert got.shape == t.shape
        if name.endswith("experts.gate_proj"):
            want = sd[name.replace("gate_proj", "gate_up_proj")][..., :i].transpose(0, 2, 1)
        elif name.endswith("experts.up_proj"):
            want = sd[name.replace("up_proj", "gate_up_proj")][..., i:].transpose(0, 2, 1)
        elif name.endswith("experts.down_proj"):
            want = sd[name].transpose(0, 2, 1)
        else:
            want = sd[name]
        np.testing.assert_array_equal(got, want, err_msg=name)


_SLICES = (slice(0, 1), slice(3, 7), slice(5, None), slice(None, None), slice(2, 2))


def _assert_slices_equal_full(ckpt: Checkpoint) -> int:
    """Every stacked expert tensor: load(experts=s) == load()[s], bit for bit, in the source dtype and float32."""
    checked = 0
    for name, t in ckpt.tensors.items():
        if not t.is_experts:
            with pytest.raises(UsageError, match="not a stacked expert tensor"):
                t.load(experts=slice(0, 1))
            continue
        for dtype in (None, np.float32):
            full = t.load(dtype)
            for s in _SLICES:
                got = t.load(dtype, experts=s)
                assert got.dtype == full.dtype and got.shape == full[s].shape, (name, s)
                np.testing.assert_array_equal(got.view(np.uint8), full[s].view(np.uint8), err_msg=f"{name} {s}")
        checked += 1
    with pytest.raises(UsageError, match="contiguous"):
        next(t for t in ckpt.tensors.values() if t.is_experts).load(experts=slice(0, 4, 2))
    return checked


def test_expert_slices_equal_full_loads(any_checkpoint):
    """HF fused layouts (gate_up_proj [E, H, 2I], down_proj [E, I, H]) in bf16 and fp32, both config styles."""
    ckpt = Checkpoint(any_checkpoint)
    assert _assert_slices_equal_full(ckpt) == 3 * sum(la.is_moe for la in ckpt.spec.layers)


def test_multimodal_layout_maps_vision_apart(scout, maverick):
    """The vision tower and projector are rows of their own (HF names, shapes from vision_config), never text tensors."""
    from l4export.names import vision_shapes

    ckpt = Checkpoint(scout)
    shapes = vision_shapes(ckpt.spec.vision, ckpt.spec.hidden_size)
    assert {n: t.shape for n, t in ckpt.vision.items()} == shapes and not ckpt.ignored and not ckpt.vision_missing()
    assert not any("vision" in n or "projector" in n for n in ckpt.tensors)
    assert Checkpoint(maverick).vision == {} and Checkpoint(maverick).spec.vision is None


def test_unknown_or_misshapen_vision_tensor_is_an_error(tmp_path, scout):
    from safetensors.torch import load_file, save_file

    from l4export.errors import MappingError

    for change, msg in (("extra", "not Llama 4 text tensors"), ("shape", "vision_config")):
        src = shutil.copytree(scout, tmp_path / change)
        f = next(p for p in sorted(src.glob("*.safetensors")) if any(k.startswith("vision_model.") for k in load_file(p)))
        data = load_file(f)
        if change == "extra":
            data["vision_model.surprise.weight"] = data["vision_model.class_embedding"].clone()
        else:
            data["vision_model.class_embedding"] = data["vision_model.class_embedding"][:-1].clone()
        save_file(data, f)
        idx = src / "model.safetensors.index.json"
        if idx.is_file() and change == "extra":
            meta = json.loads(idx.read_text())
            meta["weight_map"]["vision_model.surprise.weight"] = f.name
            idx.write_text(json.dumps(meta))
        with pytest.raises(MappingError, match=msg):
            Checkpoint(src)


def _fp8_checkpoint(src: Path, out: Path) -> Path:
    """Rewrite a text checkpoint as compressed-tensors FP8: routed experts unfused per expert, e4m3 + per-row scale."""
    ckpt = Checkpoint(src)
    pending = []
    for name, t in ckpt.tensors.items():
        if ".experts." in name:
            w = t.load(np.float32)  # [E, out, in]
            scale = np.abs(w).max(axis=-1, keepdims=True) / 448.0  # [E, out, 1]
            q = (w / scale).astype(ml_dtypes.float8_e4m3fn)
            for e in range(w.shape[0]):
                base = name.replace("experts.", f"experts.{e}.") + ".weight"
                pending.append(PendingTensor(base, q[e].shape, q.dtype, lambda a=q[e]: a))
                pending.append(PendingTensor(base + "_scale", scale[e].shape, np.dtype(ml_dtypes.bfloat16),
                                             lambda a=scale[e]: a.astype(ml_dtypes.bfloat16)))
        else:
            pending.append(PendingTensor(name, t.shape, t.dtype, t.load))
    out.mkdir()
    write_sharded(out, pending, max_shard_bytes=1 << 20)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized",
                                  "ignore": ["lm_head", "re:.*self_attn.*", "re:.*router", "re:.*shared_expert.*"]}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_fp8_per_expert_checkpoint(maverick, tmp_path):
    fp8 = Checkpoint(_fp8_checkpoint(maverick, tmp_path / "fp8"))
    ref = Checkpoint(maverick)
    assert fp8.spec.fp8 is not None
    assert fp8.spec.fp8.ignore == ("lm_head", "re:.*self_attn.*", "re:.*router", "re:.*shared_expert.*")
    for name, t in fp8.tensors.items():
        if ".experts." not in name:
            np.testing.assert_array_equal(t.load(), ref[name].load())
            continue
        assert t.is_fp8 and t.dtype == np.float32
        q, s = t.load_fp8()
        assert q.dtype == ml_dtypes.float8_e4m3fn and s.shape == t.shape[:-1] + (1,)
        deq = t.load()
        np.testing.assert_array_equal(deq, q.astype(np.float32) * s)
        w = ref[name].load(np.float32)
        assert np.abs(deq - w).max() <= np.abs(w).max() * 0.07  # e4m3 keeps 3 mantissa bits
    info = json.loads(CliRunner().invoke(main, ["inspect", str(tmp_path / "fp8"), "--json"]).output)
    assert info["fp8_checkpoint"] and "float8_e4m3fn" in info["dtypes"]


def test_fp8_per_expert_slices_equal_full_loads(maverick, tmp_path):
    """The per-expert FP8 layout (one tensor + scale per expert): dequantized and raw (load_fp8) slices."""
    fp8 = Checkpoint(_fp8_checkpoint(maverick, tmp_path / "fp8"))
    assert _assert_slices_equal_full(fp8) == 6
    for t in fp8.tensors.values():
        if t.is_experts:
            q, s = t.load_fp8()
            for sl in _SLICES:
                qs, ss = t.load_fp8(experts=sl)
                np.testing.assert_array_equal(qs.view(np.uint8), q[sl].view(np.uint8))
                np.testing.assert_array_equal(ss, s[sl])


# ---- bad input: one line, the right exit code, no traceback -----------------------------------------------


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    text = result.output.strip()
    assert "Traceback" not in text
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return result.exit_code, text


def _copy(src: Path, tmp: Path) -> Path:
    dst = tmp / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _shards(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def test_missing_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    code, text = _run("inspect", tmp_path)
    assert code == 2 and "config.json" in text and "missing" in text and len(text.splitlines()) == 1


def test_missing_folder(tmp_path):
    code, text = _run("inspect", tmp_path / "nope")
    assert code == 2 and "no such file" in text


def test_not_llama4(maverick, tmp_path):
    ck = _copy(maverick, tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (ck / "config.json").write_text(json.dumps(cfg))
    code, text = _run("inspect", ck)
    assert code == 2 and "'mistral'" in text and "not Llama 4" in text and len(text.splitlines()) == 1


def test_truncated_shard(maverick, tmp_path):
    ck = _copy(maverick, tmp_path)
    shard = _shards(ck)[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    code, text = _run("inspect", ck)
    assert code == 1 and shard.name in text and "truncated" in text and len(text.splitlines()) == 1


def test_header_length_larger_than_file(maverick, tmp_path):
    ck = _copy(maverick, tmp_path)
    shard = _shards(ck)[0]
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 10)
    shard.write_bytes(bytes(data))
    code, text = _run("inspect", ck)
    assert code == 1 and shard.name in text and "header length" in text and "larger than the file" in text


def test_index_names_missing_shard(maverick, tmp_path):
    ck = _copy(maverick, tmp_path)
    shard = _shards(ck)[1]
    shard.unlink()
    code, text = _run("inspect", ck)
    assert code == 1 and "index.json" in text and shard.name in text and "do not exist" in text


def _rewrite_single(src: Path, tmp: Path, edit) -> Path:
    """Copy a checkpoint into one safetensors file, letting ``edit`` change the {name: array} dict."""
    from l4export.checkpoint import read_header

    tensors = {}
    for f in _shards(src):
        for name, s in read_header(f).items():
            tensors[name] = s.read()
    edit(tensors)
    out = tmp / "edited"
    out.mkdir()
    shutil.copy(src / "config.json", out / "config.json")
    write_sharded(out, [PendingTensor(n, a.shape, a.dtype, lambda a=a: a) for n, a in tensors.items()], 1 << 40)
    return out


def test_missing_tensor(maverick, tmp_path):
    ck = _rewrite_single(maverick, tmp_path, lambda t: t.pop("model.layers.2.self_attn.k_proj.weight"))
    code, text = _run("inspect", ck)
    assert code == 1 and "missing tensor model.layers.2.self_attn.k_proj.weight" in text and "[32, 64]" in text


def test_wrong_shape(maverick, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.q_proj.weight"] = t["model.layers.0.self_attn.q_proj.weight"][:32]

    ck = _rewrite_single(maverick, tmp_path, edit)
    code, text = _run("inspect", ck)
    assert code == 1 and "model.layers.0.self_attn.q_proj.weight" in text and "[32, 64]" in text and "expected [64, 64]" in text


def test_unknown_tensor_names(maverick, tmp_path):
    def edit(t):
        t["model.layers.0.mystery.weight"] = np.zeros(3, np.float32)
        t["model.layers.0.feed_forward.router.weight"] = np.zeros((128, 64), np.float32)  # layer 0 is dense

    ck = _rewrite_single(maverick, tmp_path, edit)
    code, text = _run("inspect", ck)
    assert code == 1 and "2 tensor name(s)" in text and "model.layers.0.mystery.weight" in text
    assert "model.layers.0.feed_forward.router.weight" in text


def test_check_reports_non_finite(maverick, tmp_path):
    def edit(t):
        t["model.norm.weight"] = t["model.norm.weight"].copy()
        t["model.norm.weight"][3] = np.nan

    ck = _rewrite_single(maverick, tmp_path, edit)
    result = CliRunner().invoke(main, ["inspect", str(ck), "--check", "--json"])
    assert result.exit_code == 1
    assert json.loads(result.output)["check"]["non_finite"] == {"model.norm.weight": 1}
    ok = CliRunner().invoke(main, ["inspect", str(maverick), "--check"])
    assert ok.exit_code == 0 and "all finite" in ok.output


def test_inspect_json_keys(any_checkpoint):
    from l4export.spec import load_spec

    result = CliRunner().invoke(main, ["inspect", str(any_checkpoint), "--json"])
    info = json.loads(result.output)
    spec = load_spec(any_checkpoint)
    assert info["total_params"] == spec.total_params and info["active_params"] == spec.active_params
    assert isinstance(info["total_params"], int) and isinstance(info["active_params"], int)
    table = CliRunner().invoke(main, ["inspect", str(any_checkpoint)]).output
    assert f"{spec.total_params:,} total" in table and "RoPE / NoPE" in table
