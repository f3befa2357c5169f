"""Graphs cut from the written decoder by proto surgery: they reuse model.onnx.data, so no weight is written twice.

    model.kv-<dtype>.onnx    the decoder with a quantized KV cache (int8 on CPU, fp8 on CUDA)
    embedding.onnx           input_ids + image_features -> inputs_embeds: the decoder's embedding lookup, then the
                             image features written over the <|patch|> positions, in order (exports with vision)
    model.embeds.onnx        the decoder reading inputs_embeds instead of input_ids (and its KV variants)
    model.batch.onnx         one decode token for each of B sequences, each at its own length (continuous batching)

The surgery works on the ONNX protos without loading external data: initializers keep their references into
model.onnx.data (same folder), so each file is a few kilobytes of graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..folder import BATCH_FILE, EMBEDDING_FILE, EMBEDS_FILE, KV_PREFILL_KEY, MODEL_FILE
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
    if kv_dtype == "int8":
        _dequantized_prefill(g, gqa, dtype)
        helper.set_model_props(m, {**{p.key: p.value for p in m.metadata_props}, KV_PREFILL_KEY: "dequantized"})
    name = kv_variant_file(kv_dtype, base)
    onnx.save(m, str(out / name))
    return name


def _dequantized_prefill(g: onnx.GraphProto, gqa: list[onnx.NodeProto], dtype: str) -> None:
    """Each int8 GroupQueryAttention becomes If(this step has more than one token):

    - one token (decode): the int8 node as it was, appending to the cache in place (past and present are one buffer;
      ORT hands the If's bound output down to the node);
    - several (prefill): a float GroupQueryAttention over the cached rows dequantized (cast x per-channel scale) and
      the step's float keys and values. It writes nothing to the cache (present: 0 rows): the runtime quantizes the
      step's keys and values (``new_key`` / ``new_value``) into it afterwards, growing the scales first if they do
      not fit, so no step runs twice. Why: ORT's CPU kernel attends over an int8 cache 3.6x slower than over a float
      one when a step has many queries (benchmarks/bench_kv_prefill.py); dequantizing the cached rows once per step
      costs one pass over them."""
    elem = ELEM[dtype]
    g.initializer.extend([numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
                          (("kv_prefill/one", 1), ("kv_prefill/zero", [0]), ("kv_prefill/axis", [2]),
                           ("kv_prefill/index1", 1))])
    for n in reversed([  # S, the step's tokens, from position_ids [1, S] (both decoders have it); first in order
        helper.make_node("Shape", ["position_ids"], ["kv_prefill/shape"], name="kv_prefill/Shape_0"),
        helper.make_node("Gather", ["kv_prefill/shape", "kv_prefill/index1"], ["kv_prefill/S"], axis=0,
                         name="kv_prefill/Gather_0"),
        helper.make_node("Greater", ["kv_prefill/S", "kv_prefill/one"], ["kv_prefill/many"], name="kv_prefill/Greater_0"),
    ]):
        g.node.insert(0, n)
    for i, node in enumerate(gqa):
        at = list(g.node).index(node)
        g.node.remove(node)
        g.node.insert(at, helper.make_node("If", ["kv_prefill/many"], list(node.output), name=f"{node.name}/If",
                                           then_branch=_float_branch(node, i, elem), else_branch=_int8_branch(node, i, elem)))


def _int8_branch(node: onnx.NodeProto, i: int, elem: int) -> onnx.GraphProto:
    inner = onnx.NodeProto()
    inner.CopyFrom(node)
    outs = [f"kv_prefill/{i}/int8/{j}" for j in range(3)]
    del inner.output[:]
    inner.output.extend(outs)
    types = (elem, onnx.TensorProto.INT8, onnx.TensorProto.INT8)
    return helper.make_graph([inner], f"kv_prefill_{i}_int8", [],
                             [helper.make_tensor_value_info(o, t, None) for o, t in zip(outs, types)])


def _float_branch(node: onnx.NodeProto, i: int, elem: int) -> onnx.GraphProto:
    p = f"kv_prefill/{i}/float"
    seqlens, scales = node.input[5], node.input[12:14]
    nodes = [  # rows held before this step: seqlens_k + 1 - S (seqlens_k counts this step's rows, minus one)
        helper.make_node("Cast", [seqlens], [f"{p}/seqlens"], to=onnx.TensorProto.INT64),
        helper.make_node("Add", [f"{p}/seqlens", "kv_prefill/one"], [f"{p}/total"]),
        helper.make_node("Sub", [f"{p}/total", "kv_prefill/S"], [f"{p}/held"]),
    ]
    past = []
    for j, (cache, scale) in enumerate(zip(node.input[3:5], scales)):
        q = f"{p}/{j}"
        nodes += [helper.make_node("Slice", [cache, "kv_prefill/zero", f"{p}/held", "kv_prefill/axis"], [f"{q}/rows"]),
                  helper.make_node("Cast", [f"{q}/rows"], [f"{q}/f32"], to=onnx.TensorProto.FLOAT),
                  helper.make_node("Mul", [f"{q}/f32", scale], [f"{q}/deq"])]
        if elem != onnx.TensorProto.FLOAT:
            nodes.append(helper.make_node("Cast", [f"{q}/deq"], [f"{q}/past"], to=elem))
        past.append(nodes[-1].output[0])
        nodes.append(helper.make_node("Slice", [cache, "kv_prefill/zero", "kv_prefill/zero", "kv_prefill/axis"],
                                      [f"{q}/none"]))  # present: no rows (the runtime writes them)
    inputs = list(node.input[:12])
    inputs[3:5] = past
    while inputs and not inputs[-1]:
        inputs.pop()
    attrs = [a for a in node.attribute if a.name not in ("k_quant_type", "v_quant_type", "kv_cache_bit_width")]
    gqa = helper.make_node("GroupQueryAttention", inputs, [f"{p}/out", f"{p}/k_all", f"{p}/v_all"],
                           domain="com.microsoft", name=f"{p}/GroupQueryAttention")
    gqa.attribute.extend(attrs)
    nodes.append(gqa)
    outs = [(f"{p}/out", elem), (f"{p}/0/none", onnx.TensorProto.INT8), (f"{p}/1/none", onnx.TensorProto.INT8)]
    return helper.make_graph(nodes, f"kv_prefill_{i}_float", [], [helper.make_tensor_value_info(o, t, None) for o, t in outs])


BATCH_INPUTS = ("seqlens_k", "total_sequence_length", "seqlens_k.chunked", "total_sequence_length.chunked")


def write_batch_decoder(out: Path) -> str:
    """``model.batch.onnx``: the decoder for a step of one token in each of B sequences of different lengths, their
    caches the rows of one [B, Hkv, R, D] buffer per layer (runtimes/batch.py). Why its own graph: the decoder derives
    every sequence's key count from one attention_mask width and one cache_start, so all rows would share a length.
    Here GroupQueryAttention's per-row key counts are inputs, as int32 (keys held after this step, minus one):

        seqlens_k [B], total_sequence_length []                  global (NoPE) layers: all of a row's tokens
        seqlens_k.chunked [B], total_sequence_length.chunked []  chunked layers: a row's tokens since its chunk began

    A chunked layer's buffer holds only the current chunk (the runtime starts it again at each chunk boundary), so
    the chunk bias is dropped: every held key is in the query's chunk. The NoPE layers' attention temperature comes
    from position_ids [B, 1] (each row's own position; in the decoder, the shared cache position: the same number).
    attention_mask, cache_start and num_logits_to_keep go (the last is 0: a step's one position)."""
    m = _load(out, MODEL_FILE)
    g = m.graph
    producer = {o: n for n in g.node for o in n.output}
    for node in (n for n in g.node if n.op_type == "GroupQueryAttention"):
        chunked = producer[node.input[5]].name.startswith("chunks/")
        node.input[5], node.input[6] = BATCH_INPUTS[2:] if chunked else BATCH_INPUTS[:2]
        if len(node.input) > 10:
            node.input[10] = ""  # the chunk bias
        while node.input and not node.input[-1]:
            node.input.pop()
    temperature = [n for n in g.node if n.name.startswith("temperature/")]
    if temperature:  # Cast(q_pos) ... Reshape([1, S, 1]) -> Cast(position_ids) ... Reshape([B, S, 1])
        temperature[0].input[0] = "position_ids"
        next(n for n in temperature if n.op_type == "Reshape").input[1] = "batch/temperature_shape"
        g.initializer.append(numpy_helper.from_array(np.array([0, -1, 1], np.int64), "batch/temperature_shape"))
    _constant_input(g, "num_logits_to_keep", 0)
    for i, name in enumerate(BATCH_INPUTS):
        g.input.append(helper.make_tensor_value_info(name, onnx.TensorProto.INT32, ["batch_size"] if i % 2 == 0 else []))
    _prune(g)
    onnx.save(m, str(out / BATCH_FILE))
    return BATCH_FILE


def _constant_input(g: onnx.GraphProto, name: str, value: int) -> None:
    """Graph input ``name`` becomes a constant int64 initializer of that name (nothing feeds it any more)."""
    g.input.remove(next(v for v in g.input if v.name == name))
    g.initializer.append(numpy_helper.from_array(np.array(value, np.int64), name))


def _prune(g: onnx.GraphProto) -> None:
    """Drop the nodes whose outputs nothing reads, then the inputs and initializers nothing reads."""
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    for v in [v for v in g.input if v.name not in used]:
        g.input.remove(v)
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)


GENAI_CONSTANTS = ("cache_start", "num_logits_to_keep")  # our runtime's inputs that onnxruntime-genai does not feed


def write_genai_decoder(out: Path, base: str) -> str:
    """``model.genai.onnx`` (or ``model.embeds.genai.onnx``): the decoder ``base`` with the standard I/O that
    onnxruntime-genai (and any plain ONNX Runtime caller) feeds: ``cache_start`` and ``num_logits_to_keep`` become
    constant zeros (every layer keeps its whole cache; logits for every position)."""
    m = _load(out, base)
    g = m.graph
    for name in GENAI_CONSTANTS:
        _constant_input(g, name, 0)
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
    g.input.remove(ids)  # (not _prune: an input some shapes leave unread stays; the genai variant and runtimes feed it)
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
