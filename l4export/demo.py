"""A built-in tiny Llama 4: deterministic, Scout-shaped, written with numpy alone (no torch, no network).

Scout-shaped means: the multimodal layout (``language_model.`` keys, ``model_type: llama4`` + ``text_config``),
the hub's config style (``rope_theta`` + llama3 ``rope_scaling`` with low == high, no per-layer lists),
16 experts with top-1 routing on every layer, qk-norm, and a NoPE layer every 4th layer. A byte-level
tokenizer.json and Llama 4's chat template are written beside it so that text goes in and out.

Its weights are trained: ``l4export/demo_weights.safetensors`` (3.9 MB, bf16), made by
``scripts/train_demo.py`` on this Python's standard library sources and on chat turns built from its functions, so
the quick start prints Python-like text. `--seed N` gives the same architecture with random weights drawn from N.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from .names import assemble, canonical_shapes, source_layout, vision_shapes
from .outputs import PendingTensor, atomic_output_dir, write_sharded
from .safetensors_codec import encode_header
from .spec import Llama4Spec, spec_from_config

SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>",
            "<|finetune_right_pad|>", "<|reserved_0|>")
BOS, EOS, EOT, PAD = 256, 257, 261, 262

DEMO_TEXT_CONFIG = {
    "model_type": "llama4_text",
    "vocab_size": 272,
    "hidden_size": 128,
    "intermediate_size": 64,
    "intermediate_size_mlp": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                     "original_max_position_embeddings": 64},
    "num_local_experts": 16,
    "num_experts_per_tok": 1,
    "interleave_moe_layer_step": 1,
    "use_qk_norm": True,
    "attention_chunk_size": 32,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": BOS,
    "eos_token_id": [EOS, EOT],
    "pad_token_id": PAD,
    "torch_dtype": "bfloat16",
}


def demo_config() -> dict:
    return {
        "architectures": ["Llama4ForConditionalGeneration"],
        "model_type": "llama4",
        "text_config": dict(DEMO_TEXT_CONFIG),
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
    }


def bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: printable bytes map to themselves, the rest to code points from 256 up."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer_json(vocab_size: int, specials: dict[str, int] | None = None) -> dict:
    """A tokenizers-format byte-level BPE with no merges: ids 0..255 are bytes, 256.. are specials (``specials``:
    more special tokens at given ids, e.g. Llama 4's image tokens; the other ids are reserved tokens)."""
    alphabet = bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    names = {256 + i: tok for i, tok in enumerate(SPECIALS)} | {i: tok for tok, i in (specials or {}).items()}
    added = []
    for i in range(256, vocab_size):
        tok = names.get(i, f"<|reserved_{i}|>")
        vocab[tok] = i
        added.append({"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": False, "special": True})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": SPECIALS[0], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": SPECIALS[0], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {SPECIALS[0]: {"id": SPECIALS[0], "ids": [BOS], "tokens": [SPECIALS[0]]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }


def write_checkpoint(out: str | Path, config: dict, make: Callable[[str, tuple[int, ...]], np.ndarray],
                     dtype: Any = ml_dtypes.bfloat16, max_shard_bytes: int | None = None, force: bool = False,
                     tokenizer: bool = True, files: dict[str, str] | None = None) -> Path:
    """Write a checkpoint in HF's layout (``names.source_layout``: fused gate_up_proj, input-major experts) whose
    canonical tensors are ``make(name, shape)`` (float32), made when their bytes are due, one source tensor at a
    time; plus the byte-level tokenizer. Written atomically. The demo and the benchmarks' synthetic models use it.
    A config with a ``vision_config`` gets the vision tower and projector too (HF names)."""
    spec = spec_from_config(config)
    shapes = canonical_shapes(spec)
    dtype = np.dtype(dtype)
    pending = [PendingTensor(src, shape, dtype, lambda held=held, op=op: assemble(
        op, [make(n, shapes[n]) for n in held]).astype(dtype)) for src, (shape, held, op) in source_layout(spec, spec.layout).items()]
    if spec.vision is not None:
        pending += [PendingTensor(n, shape, dtype, lambda n=n, shape=shape: make(n, shape).astype(dtype))
                    for n, shape in vision_shapes(spec.vision, spec.hidden_size).items()]
    total = sum(p.nbytes for p in pending)
    with atomic_output_dir(out, force=force) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_sharded(tmp, pending, max_shard_bytes=max_shard_bytes or total // 2 + 1)
        if tokenizer:
            write_tokenizer(tmp, spec)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
    return Path(out)


def write_tokenizer(folder: Path, spec: Llama4Spec, specials: dict[str, int] | None = None) -> None:
    """The byte-level tokenizer files (tokenizer.json, tokenizer_config.json, generation_config.json)."""
    (folder / "tokenizer.json").write_text(json.dumps(byte_tokenizer_json(spec.vocab_size, specials)))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": SPECIALS[0], "eos_token": SPECIALS[5], "pad_token": SPECIALS[6],
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": spec.max_position_embeddings,
    }, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({
        "bos_token_id": BOS, "eos_token_id": [EOS, EOT], "pad_token_id": PAD}, indent=2))


WEIGHTS = Path(__file__).with_name("demo_weights.safetensors")


def trained_weights() -> Callable[[str, tuple[int, ...]], np.ndarray]:
    """The trained demo tensors (canonical names), read with l4export's own safetensors reader (numpy only)."""
    from .checkpoint import read_header

    tensors = read_header(WEIGHTS)

    def make(name: str, shape: tuple[int, ...]) -> np.ndarray:
        t = tensors[name]
        if t.shape != tuple(shape):
            raise RuntimeError(f"internal: {WEIGHTS.name} holds {name} as {t.shape}, the demo config wants {shape}")
        return t.read().astype(np.float32)

    return make


def write_demo_checkpoint(out: str | Path, seed: int | None = None, force: bool = False) -> Path:
    """Write the tiny Scout-shaped checkpoint to ``out`` (config, 2 bf16 shards + index, tokenizer, chat template):
    the trained weights, or random ones drawn from ``seed``."""
    from .runtimes.chat import LLAMA4_FORMAT

    make = trained_weights() if seed is None else _random_weights(seed)
    return write_checkpoint(out, demo_config(), make, force=force, files={"chat_template.jinja": LLAMA4_FORMAT})


def _random_weights(seed: int) -> Callable[[str, tuple[int, ...]], np.ndarray]:
    rng = np.random.default_rng(seed)

    def make(name: str, shape: tuple[int, ...]) -> np.ndarray:  # called in canonical order
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        # 0.04: at larger scales these random weights route on knife-edge margins, so any quantization flips
        # experts and verify measures chaos, not quantization error (tests/conftest.py QUANT says the same)
        return (0.04 * rng.standard_normal(shape)).astype(np.float32)

    return make


# ---- synthetic checkpoints at any width (benchmarks, and the tests of what real widths refuse) -----------------
def write_synthetic(out: str | Path, config: dict, fill: str = "random", seed: int = 0) -> Path:
    """A checkpoint of ``config`` in HF's layout, one ``model.safetensors`` written straight from numpy, a tensor
    at a time (nothing like a model in memory): ``fill="random"``: bfloat16 weights of random sign and mantissa
    with magnitudes in [2^-7, 2^-6) (norms 1.0), made from random bits, fast enough for Scout widths;
    ``fill="sparse"``: a sparse file of zeros (headers are real, no data written: for what must be refused before
    any weight is read). Written atomically, with the byte-level tokenizer."""
    spec = spec_from_config(config)
    shapes = {src: shape for src, (shape, _, _) in source_layout(spec, spec.layout).items()}
    if spec.vision is not None:
        shapes.update(vision_shapes(spec.vision, spec.hidden_size))
    bf16 = np.dtype(ml_dtypes.bfloat16)
    head, data = encode_header(((n, bf16, sh) for n, sh in shapes.items()), {"format": "pt", "l4export": f"synthetic-{fill}"})
    rng = np.random.default_rng(seed)
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        with open(tmp / "model.safetensors", "wb") as f:
            f.write(head)
            if fill == "sparse":
                f.truncate(len(head) + data)
            else:
                for name, shape in shapes.items():
                    _write_random(f, name, shape, rng)
        write_tokenizer(tmp, spec)
    return Path(out)


def _write_random(f: Any, name: str, shape: tuple[int, ...], rng: np.random.Generator, block: int = 1 << 26) -> None:
    n = int(np.prod(shape, dtype=np.int64))
    if "norm" in name.rsplit(".", 1)[0].rsplit(".", 1)[-1] or name.endswith("norm.weight"):
        f.write(np.full(n, 0x3F80, np.uint16).tobytes())  # bfloat16 1.0
        return
    for a in range(0, n, block):
        bits = rng.integers(0, 1 << 16, min(block, n - a), dtype=np.uint16)
        f.write(((bits & 0x807F) | 0x3C00).astype(np.uint16).tobytes())  # sign, mantissa random; exponent 2^-7
