"""onnxruntime-genai's genai_config.json for an ONNX export: which graph files it runs and their I/O names."""

from __future__ import annotations

from typing import Any

from ..folder import EMBEDDING_FILE, VISION_FILE
from ..spec import Llama4Spec


def genai_config(spec: Llama4Spec, target: str, decoder_file: str, vision: bool = False) -> dict[str, Any]:
    """onnxruntime-genai's genai_config.json over the decoder ``decoder_file`` (genai's copy of model.onnx, or of
    model.embeds.onnx with vision). Text: model.type 'decoder' (genai rejects 'llama4_text'). With vision: the
    three-model layout (vision, embedding, decoder on inputs_embeds) under type 'gemma3', the one genai pipeline that
    runs vision.onnx on pixel_values alone (genai has no Llama 4 type; docs/vision.md)."""
    cfg = _genai_text_config(spec, target, decoder_file)
    if not vision:
        return cfg
    provider = cfg["model"]["decoder"]["session_options"]
    decoder = cfg["model"]["decoder"]
    decoder["inputs"] = {"inputs_embeds": "inputs_embeds", **{k: v for k, v in decoder["inputs"].items() if k != "input_ids"}}
    cfg["model"]["type"] = "gemma3"
    cfg["model"]["embedding"] = {"filename": EMBEDDING_FILE, "session_options": dict(provider),
                                 "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
                                 "outputs": {"inputs_embeds": "inputs_embeds"}}
    cfg["model"]["vision"] = {"filename": VISION_FILE, "session_options": dict(provider),
                              "inputs": {"pixel_values": "pixel_values"}, "outputs": {"image_features": "image_features"}}
    return cfg


def _genai_text_config(spec: Llama4Spec, target: str, decoder_file: str) -> dict[str, Any]:
    provider = [{"cuda": {}}] if target == "cuda" else []
    eos = list(spec.eos_token_ids) or [0]
    return {
        "model": {
            "type": "decoder",
            "bos_token_id": spec.bos_token_id if spec.bos_token_id is not None else eos[0],
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": spec.pad_token_id if spec.pad_token_id is not None else eos[0],
            "context_length": spec.max_position_embeddings,
            "vocab_size": spec.vocab_size,
            "decoder": {
                "filename": decoder_file,
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden_size,
                "num_attention_heads": spec.num_heads,
                "num_key_value_heads": spec.num_kv_heads,
                "num_hidden_layers": spec.num_layers,
                "session_options": {"log_id": "l4export", "provider_options": provider},
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {
            "max_length": min(spec.max_position_embeddings, 4096),
            "do_sample": False,
            "num_beams": 1,
            "num_return_sequences": 1,
            # On: one [B, Hkv, max_length, D] buffer per layer that GroupQueryAttention appends to in place (as our
            # runtime does; off, genai copies every layer's cache into a new present each step). genai keeps every
            # layer's whole cache, chunked ones included (cache_start stays 0; the chunk bias keeps each query in its
            # chunk), and passes attention_mask [B, T] with T the tokens so far, which is what the graph counts.
            "past_present_share_buffer": True,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
