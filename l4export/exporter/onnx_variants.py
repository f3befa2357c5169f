"""Graphs cut from the written decoder by proto surgery: they reuse model.onnx.data, so no weight is written twice.

    model.kv-<dtype>.onnx    the decoder with a quantized KV cache (int8 on CPU, fp8 on CUDA)
    embedding.onnx           input_ids + image_features -> inputs_embeds: the decoder's embedding lookup, then the
                             image features written over the <|patch|> positions, in order (exports with vision)
    model.embeds.onnx        the decoder reading inputs_embeds instead of input_ids (and its KV variants)

The surgery works on the ONNX protos without loading external data: initializers keep their references into
model.onnx.data (same folder), so each file is a few kilobytes of graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..folder import EMBEDDING_FILE, EMBEDS_FILE, MODEL_FILE
from ..spec import Llama4Spec

EMBED_SCOPE = "model.embed_tokens/"  # node-name prefix of the decoder's embedding lookup (DecoderBuilder.build)
ELEM = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16, "bfloat16": onnx.TensorProto.BFLOAT16}

# Run-time KV cache quantization (GroupQueryAttention's quantized cache): one small graph file per KV dtype beside
# the decoder, over the same weights file. ORT CPU runs int8 (per-channel scales); FP8 is CUDA-only (SM89+).
KV_VARIANTS = {"int8": ("PER_CHANNEL", 3), "fp8": ("PER_TENSOR", 17)}  # (quant type, TensorProto.INT8 / FLOAT8E4M3FN)


def kv_variant_file(kv_dtype: str, base: str = MODEL_FILE) -> str:
    return base.replace(".onnx", f".kv-{kv_dtype}.onnx")


def _load(out: Path, name: str) -> onnx.ModelProto:
    return onnx.load(str(out / name), load_external_data=False)


def write_kv_variant(out: Path, spec: Llama4Spec, kv_dtype: str, dtype: str, base: str = MODEL_FILE) -> str:
    """``model.kv-<dtype>.onnx`` (or ``model.embeds.kv-<dtype>.onnx``): the decoder ``base`` with a quantized KV
    cache. The cache inputs/outputs become int8 (or e4m3), each GroupQueryAttention quantizes what it appends with
    static scales that are inputs (``kv_scale.{i}.key`` / ``.value``, [1, Hkv, 1, D] per channel for int8, [1] for
    FP8), and each layer's new keys and values are outputs too (``new_key.{i}`` / ``new_value.{i}``), so
    that the runtime can choose and grow the scales as tokens arrive (runtimes/onnx.py)."""
    quant, elem = KV_VARIANTS[kv_dtype]
    m = _load(out, base)
    g = m.graph
    for v in list(g.input) + list(g.output):
        if v.name.startswith(("past_key_values.", "present.")):
            v.type.tensor_type.elem_type = elem
    shape = [1, spec.num_kv_heads, 1, spec.head_dim] if quant == "PER_CHANNEL" else [1]
    gqa = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    for i, node in enumerate(gqa):
        scales = [f"kv_scale.{i}.key", f"kv_scale.{i}.value"]
        while len(node.input) < 12:
            node.input.append("")
        node.input.extend(scales)
        node.attribute.extend([helper.make_attribute("k_quant_type", quant), helper.make_attribute("v_quant_type", quant),
                               helper.make_attribute("kv_cache_bit_width", 8)])
        for name in scales:  # inputs the runtime always feeds (no initializer default: ORT would warn about it)
            g.input.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape))
        for src, name in ((node.input[1], f"new_key.{i}"), (node.input[2], f"new_value.{i}")):
            g.node.append(helper.make_node("Identity", [src], [name], name=f"outputs/{name}"))
            g.output.append(helper.make_tensor_value_info(name, ELEM[dtype], None))
    name = kv_variant_file(kv_dtype, base)
    onnx.save(m, str(out / name))
    return name


GENAI_CONSTANTS = ("cache_start", "num_logits_to_keep")  # our runtime's inputs that onnxruntime-genai does not feed


def write_genai_decoder(out: Path, base: str) -> str:
    """``model.genai.onnx`` (or ``model.embeds.genai.onnx``): the decoder ``base`` with the standard I/O that
    onnxruntime-genai (and any plain ONNX Runtime caller) feeds: ``cache_start`` and ``num_logits_to_keep`` become
    constant zeros (every layer keeps its whole cache; logits for every position)."""
    m = _load(out, base)
    g = m.graph
    for name in GENAI_CONSTANTS:
        g.input.remove(next(v for v in g.input if v.name == name))
        g.initializer.append(numpy_helper.from_array(np.array(0, np.int64), name))
    name = base.replace(".onnx", ".genai.onnx")
    onnx.save(m, str(out / name))
    return name


def _embedding_nodes(g: onnx.GraphProto) -> tuple[list[onnx.NodeProto], str]:
    """The decoder's embedding lookup nodes and the name of the embeddings they produce ([B, S, H], compute dtype)."""
    nodes = [n for n in g.node if n.name.startswith(EMBED_SCOPE)]
    produced = {o for n in nodes for o in n.output}
    used_outside = {i for n in g.node if n not in nodes for i in n.input} & produced
    if not nodes or len(used_outside) != 1:
        raise RuntimeError(f"internal: {MODEL_FILE} has no single embedding lookup under {EMBED_SCOPE!r}")
    return nodes, used_outside.pop()


def write_embeds_decoder(out: Path, spec: Llama4Spec, dtype: str) -> str:
    """``model.embeds.onnx``: the decoder with input ``inputs_embeds`` [B, S, H] (compute dtype) in place of
    ``input_ids``; the embedding lookup and the initializers only it read are gone (they live in embedding.onnx)."""
    m = _load(out, MODEL_FILE)
    g = m.graph
    nodes, embeds = _embedding_nodes(g)
    for n in nodes:
        g.node.remove(n)
    for n in g.node:  # Shape(input_ids) -> Shape(inputs_embeds): dim 1 is S either way
        for j, name in enumerate(n.input):
            if name in (embeds, "input_ids"):
                n.input[j] = "inputs_embeds"
    used = {i for n in g.node for i in n.input}
    for init in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(init)
    ids = next(v for v in g.input if v.name == "input_ids")
    new = helper.make_tensor_value_info("inputs_embeds", ELEM[dtype], ["batch_size", "sequence_length", spec.hidden_size])
    g.input.insert(list(g.input).index(ids), new)
    g.input.remove(ids)
    onnx.save(m, str(out / EMBEDS_FILE))
    return EMBEDS_FILE


def write_embedding_model(out: Path, spec: Llama4Spec, dtype: str) -> str:
    """``embedding.onnx``: input_ids [B, L] int64 + image_features [P, H] -> inputs_embeds [B, L, H].

    The decoder's own lookup (Gather, or GatherBlockQuantized for an int8 table) over the same initializers, then
    ScatterND at the positions where input_ids == image_token_id, row-major: the i-th <|patch|> token gets the i-th
    image feature row, as transformers' masked_scatter. P may be 0 (text only: onnxruntime-genai's decode steps, or a
    prompt with a <|patch|> token and no image: it embeds as the token it is, as in transformers)."""
    src = _load(out, MODEL_FILE).graph
    nodes, embeds = _embedding_nodes(src)
    needed = {i for n in nodes for i in n.input}
    inits = [t for t in src.initializer if t.name in needed]
    pid = numpy_helper.from_array(np.array(spec.vision.image_token_id, np.int64), "image_token_id")
    consts = [numpy_helper.from_array(np.array([0], np.int64), "image/zero"),
              numpy_helper.from_array(np.array([0], np.int64), "image/axis0")]
    scatter = [
        helper.make_node("Equal", ["input_ids", "image_token_id"], ["is_patch"], name="image/Equal_0"),
        helper.make_node("NonZero", ["is_patch"], ["patch_index_t"], name="image/NonZero_0"),  # [2, N]
        helper.make_node("Transpose", ["patch_index_t"], ["patch_index_all"], perm=[1, 0], name="image/Transpose_0"),
        # the first P of the N <|patch|> positions: P = 0 (no image: a <|patch|> token in text embeds as a token, as in
        # transformers), P = N with images (the runtimes check the counts before)
        helper.make_node("Shape", ["image_features"], ["features_shape"], name="image/Shape_0"),
        helper.make_node("Gather", ["features_shape", "image/zero"], ["num_features"], axis=0, name="image/Gather_0"),
        helper.make_node("Slice", ["patch_index_all", "image/zero", "num_features", "image/axis0"], ["patch_index"],
                         name="image/Slice_0"),
        helper.make_node("ScatterND", [embeds, "patch_index", "image_features"], ["inputs_embeds"], name="image/ScatterND_0"),
    ]
    h, elem = spec.hidden_size, ELEM[dtype]
    graph = helper.make_graph(
        list(nodes) + scatter, "llama4_embedding",
        [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["batch_size", "sequence_length"]),
         helper.make_tensor_value_info("image_features", elem, ["num_image_tokens", h])],
        [helper.make_tensor_value_info("inputs_embeds", elem, ["batch_size", "sequence_length", h])],
        initializer=inits + [pid] + consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)],
                              producer_name="l4export", ir_version=10)
    onnx.save(model, str(out / EMBEDDING_FILE))
    return EMBEDDING_FILE
