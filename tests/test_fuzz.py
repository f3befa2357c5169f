"""Fuzzing the parsers with hypothesis: arbitrary bytes and structured mutations of valid inputs. Only l4export's own
error types may come out (each a one-line message), never a raw KeyError/TypeError/ValueError/struct.error."""

from __future__ import annotations

import copy
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l4export.checkpoint import read_header
from l4export.demo import demo_config
from l4export.errors import L4ExportError
from l4export.quant.recipe import load_recipe, parse_recipe
from l4export.spec import spec_from_config

# L4_FUZZ_EXAMPLES=2000 for a deeper run; 150 keeps the suite quick
FAST = settings(max_examples=int(os.environ.get("L4_FUZZ_EXAMPLES", 150)), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**9) | st.floats(allow_nan=True) | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
                    max_leaves=12)


def _one_line(err: L4ExportError) -> None:
    assert str(err) and "\n" not in str(err)


# ---- safetensors headers -------------------------------------------------------------------------------------
def _valid_file() -> bytes:
    header = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]}}
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(32)


@FAST
@given(st.binary(max_size=300))
def test_header_parser_on_arbitrary_bytes(tmp_path, data):
    p = tmp_path / "f.safetensors"
    p.write_bytes(data)
    try:
        read_header(p)
    except L4ExportError as err:
        _one_line(err)


@FAST
@given(st.dictionaries(st.sampled_from(["a", "b", "__metadata__", "c"]),
                       st.fixed_dictionaries({}, optional={"dtype": st.sampled_from(["F32", "BF16", "Q4", 3, None]),
                                                           "shape": JSON, "data_offsets": JSON}) | JSON, max_size=3),
       st.integers(0, 64))
def test_header_parser_on_mutated_headers(tmp_path, header, tail):
    raw = json.dumps(header).encode()
    p = tmp_path / "f.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(tail))
    try:
        tensors = read_header(p)
    except L4ExportError as err:
        _one_line(err)
        return
    size = p.stat().st_size
    for t in tensors.values():  # whatever was accepted lies inside the file, and reads
        assert 0 <= t.offset and t.offset + t.nbytes <= size
        t.read()


def test_valid_header_still_reads(tmp_path):
    p = tmp_path / "f.safetensors"
    p.write_bytes(_valid_file())
    assert set(read_header(p)) == {"a", "b"}


@FAST
@given(st.lists(st.tuples(st.text(min_size=1, max_size=6).filter(lambda n: n != "__metadata__"),
                          st.sampled_from(["F32", "F16", "BF16", "F8_E4M3", "I8", "U8", "U32", "I64"]),
                          st.lists(st.integers(0, 5), max_size=3)), max_size=4, unique_by=lambda t: t[0]),
       st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2))
def test_codec_round_trips(tmp_path, entries, metadata):
    """What encode_header writes, read_header (and the checkpoint's checks) read back: names, dtypes, shapes, order."""
    from l4export.safetensors_codec import DTYPES, encode_header

    typed = [(n, DTYPES[d], tuple(sh)) for n, d, sh in entries]
    head, data = encode_header(typed, metadata)
    p = tmp_path / "f.safetensors"
    p.write_bytes(head + bytes(data))
    tensors = read_header(p)
    assert [(n, t.dtype, t.shape) for n, t in tensors.items()] == typed and len(head) % 8 == 0
    assert sum(t.nbytes for t in tensors.values()) == data


# ---- config.json ------------------------------------------------------------------------------------------------
KEYS = ["vocab_size", "hidden_size", "intermediate_size", "intermediate_size_mlp", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok",
        "rms_norm_eps", "rope_theta", "rope_scaling", "attention_chunk_size", "no_rope_layers", "moe_layers",
        "layer_types", "interleave_moe_layer_step", "eos_token_id", "max_position_embeddings", "use_qk_norm"]


@FAST
@given(st.lists(st.tuples(st.sampled_from(KEYS), JSON), min_size=1, max_size=4), st.booleans())
def test_config_parser_on_mutations(changes, vision):
    cfg = copy.deepcopy(demo_config())
    if vision:
        cfg["vision_config"] = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                "intermediate_size": 128, "image_size": 56, "patch_size": 14, "pixel_shuffle_ratio": 0.5,
                                "projector_input_dim": 64, "projector_output_dim": 64, "vision_output_dim": 64}
    for key, value in changes:
        target = cfg["vision_config"] if vision and key in cfg["vision_config"] and len(key) % 2 else cfg["text_config"]
        target[key] = value
    try:
        spec = spec_from_config(cfg)
    except L4ExportError as err:
        _one_line(err)
        return
    assert spec.num_layers >= 1 and spec.hidden_size >= 1 and len(spec.layers) == spec.num_layers


@FAST
@given(JSON)
def test_config_parser_on_arbitrary_json(value):
    try:
        spec_from_config(value if isinstance(value, dict) else {"model_type": "llama4", "text_config": value})
    except L4ExportError as err:
        _one_line(err)


# ---- recipes --------------------------------------------------------------------------------------------------
@FAST
@given(st.text(max_size=200))
def test_recipe_parser_on_arbitrary_text(tmp_path, text):
    p = tmp_path / "r.toml"
    p.write_text(text, encoding="utf-8")
    try:
        load_recipe(str(p))
    except L4ExportError as err:
        _one_line(err)


RULE = st.fixed_dictionaries({}, optional={"match": JSON | st.sampled_from(["*", "re:((", "re:.*experts.*"]),
                                           "scheme": st.sampled_from(["int4", "int8", "fp8", "mxfp8", "float", "int3"]) | JSON,
                                           "group_size": JSON | st.sampled_from([32, 64, 128, 0, -1]),
                                           "symmetric": JSON, "accuracy_level": JSON, "block_size": JSON,
                                           "activation": JSON | st.sampled_from(["static", "dynamic"])})


@FAST
@given(st.fixed_dictionaries({}, optional={"name": JSON, "rule": st.lists(RULE, max_size=3) | JSON}))
def test_recipe_parser_on_structured_mutations(data):
    try:
        recipe = parse_recipe(data, "r.toml")
    except L4ExportError as err:
        _one_line(err)
        return
    shapes = {"model.layers.0.feed_forward.experts.gate_proj": (16, 64, 128), "model.norm.weight": (128,)}
    try:
        recipe.validate(shapes)
        for name in shapes:
            recipe.scheme_for(name)
    except L4ExportError as err:
        _one_line(err)


# ---- prompts and ids ----------------------------------------------------------------------------------------------
@FAST
@given(st.text(max_size=40))
def test_ids_option_parser(text):
    import click

    from l4export.cli import _parse_ids

    try:
        ids = _parse_ids(text)
    except click.BadParameter:
        return
    assert all(isinstance(i, int) for i in ids)


@pytest.fixture(scope="module")
def runtime(demo_checkpoint, export):
    from l4export.runtimes import load_runtime

    return load_runtime(export(demo_checkpoint, "onnx"))


@FAST
@given(st.binary(max_size=200))
def test_prompts_file_parser(tmp_path, runtime, data):
    from l4export.verify import read_prompts

    p = tmp_path / "prompts.txt"
    p.write_bytes(data)
    try:
        prompts = read_prompts(Path(p), runtime)
    except L4ExportError as err:
        _one_line(err)
        return
    assert prompts and all(0 <= i < runtime.spec.vocab_size for _, ids in prompts for i in ids)


@FAST
@given(st.lists(st.integers(-5, 400), max_size=6))
def test_forward_ids_are_checked(runtime, ids):
    try:
        out = runtime.logits(ids)
    except L4ExportError as err:
        _one_line(err)
        return
    assert out.shape == (len(ids), runtime.spec.vocab_size) and np.isfinite(out).all()
