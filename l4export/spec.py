"""The Llama 4 model spec: parsed once from config.json, frozen, typed.

Every per-layer fact the exporters and runtimes need (MoE or dense, RoPE or NoPE, chunked or global
attention, qk-norm) is derived here, from the config's own lists when it has them and from the
defaults transformers applies when it does not. Nothing downstream re-derives them (no ``(i + 1) % 4``).

Two layouts are read:
  * ``model_type: llama4`` with ``text_config`` (and ``vision_config``): ``Llama4ForConditionalGeneration``.
  * ``model_type: llama4_text``, flat: ``Llama4ForCausalLM``.
Two config styles are read:
  * the hub's (``rope_theta`` + ``rope_scaling``; no ``no_rope_layers``/``moe_layers``/``layer_types``/...),
  * transformers 5's (``rope_parameters``, ``layer_types``, ``no_rope_layers``, ``moe_layers``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import NotLlama4Error, SpecError, UsageError

Layout = Literal["multimodal", "text"]

# Defaults transformers 5 applies (configuration_llama4.py, Llama4TextConfig). The hub's configs omit
# several of these, and each one changes the maths, so they are written out here, once.
TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 202048,
    "hidden_size": 5120,
    "intermediate_size": 8192,
    "intermediate_size_mlp": 16384,
    "num_hidden_layers": 48,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 4096 * 32,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": None,
    "tie_word_embeddings": False,
    "num_experts_per_tok": 1,
    "num_local_experts": 16,
    "moe_layers": None,
    "interleave_moe_layer_step": 1,
    "use_qk_norm": True,
    "no_rope_layers": None,
    "no_rope_layer_interval": 4,
    "attention_chunk_size": 8192,
    "layer_types": None,
    "attn_temperature_tuning": True,
    "floor_scale": 8192,
    "attn_scale": 0.1,
    "attention_bias": False,
    "rope_theta": 500000.0,
}


@dataclass(frozen=True)
class RopeScaling:
    """llama3-style frequency scaling (Scout: factor 16, low 1, high 1, original 8192)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class LayerSpec:
    index: int
    is_moe: bool  # routed experts + shared expert; else a dense SwiGLU of width intermediate_size_mlp
    uses_rope: bool  # IMPORTANT: config `no_rope_layers[i] == 1` means the layer USES RoPE (inverted name)
    chunked: bool  # attention restricted to the query's chunk of attention_chunk_size (RoPE layers)
    qk_norm: bool  # weightless per-head L2 norm of q and k (use_qk_norm and uses_rope)
    temperature_tuning: bool  # NoPE layers scale q by 1 + attn_scale*log1p(floor((pos+1)/floor_scale))


@dataclass(frozen=True)
class Fp8Config:
    """compressed-tensors float-quantized checkpoints (e.g. Maverick-FP8)."""

    ignore: tuple[str, ...]  # module names and "re:" patterns left in bf16 (recorded; FP8 weights are dequantized)


@dataclass(frozen=True)
class VisionSpec:
    """The early-fusion vision path (``vision_config`` + the top-level token ids), read from the checkpoint's own
    config: transformers' Llama4VisionConfig class defaults (hidden 768, image 448, output 7680) are not Scout's."""

    hidden_size: int  # 1408
    num_layers: int  # 34
    num_heads: int  # 16
    intermediate_size: int  # 5632: the encoder MLP width and the adapter's input (the pixel-shuffled width)
    image_size: int  # 336: one tile
    patch_size: int  # 14
    num_channels: int
    pixel_shuffle_ratio: float  # 0.5
    projector_input_dim: int  # 4096
    projector_output_dim: int  # 4096
    vision_output_dim: int  # 4096: the projector's input
    rope_theta: float  # 10000
    norm_eps: float  # 1e-5 (nn.LayerNorm)
    image_token_id: int  # 200092 <|patch|>: the positions image features replace
    boi_token_id: int | None  # 200080 <|image_start|>
    eoi_token_id: int | None  # 200081 <|image_end|>

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """Image features per tile after the pixel shuffle: (336/14)^2 * 0.5^2 = 144."""
        return int(round(self.patches_per_side**2 * self.pixel_shuffle_ratio**2))

    def rope_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin [P*P + 1, head_dim/2] float32 of the vision 2D RoPE, as ``Llama4VisionRotaryEmbedding`` computes
        them (float32 throughout): pairs [0, D/4) turn with the patch's column + 1, pairs [D/4, D/2) with its row + 1,
        and the class token (last row) not at all. They depend only on the tile size: constants of the model."""
        side = self.patches_per_side
        idx = np.arange(side * side)
        freq_dim = self.head_dim // 2
        exps = np.arange(0, freq_dim, 2)[: freq_dim // 2].astype(np.float32) / np.float32(freq_dim)
        freq = np.float32(1.0) / np.power(np.float32(self.rope_theta), exps)
        fx = (idx % side + 1).astype(np.float32)[:, None] * freq[None, :]
        fy = (idx // side + 1).astype(np.float32)[:, None] * freq[None, :]
        angles = np.concatenate([np.concatenate([fx, fy], axis=1), np.zeros((1, freq_dim), np.float32)])
        return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@dataclass(frozen=True)
class Llama4Spec:
    layout: Layout
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # width of the routed and the shared experts
    intermediate_size_mlp: int  # width of the dense MLP layers
    num_experts: int
    top_k: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    attention_chunk_size: int | None
    attn_temperature_tuning: bool
    floor_scale: float
    attn_scale: float
    use_qk_norm: bool
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    layers: tuple[LayerSpec, ...]
    torch_dtype: str
    fp8: Fp8Config | None = None
    vision: VisionSpec | None = None  # None: a text-only checkpoint
    config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # the raw file

    # ---- derived facts -------------------------------------------------------------------------
    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(layer.index for layer in self.layers if layer.is_moe)

    @property
    def nope_layers(self) -> tuple[int, ...]:
        return tuple(layer.index for layer in self.layers if not layer.uses_rope)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_params(self, layer: LayerSpec) -> int:
        h = self.hidden_size
        attn = h * self.q_size * 2 + h * self.kv_size * 2  # q, o, k, v
        norms = 2 * h
        if layer.is_moe:
            ffn = self.num_experts * h + 3 * self.num_experts * h * self.intermediate_size
            ffn += 3 * h * self.intermediate_size  # shared expert
        else:
            ffn = 3 * h * self.intermediate_size_mlp
        return attn + norms + ffn

    @property
    def total_params(self) -> int:
        """Parameters of the text model (embeddings, layers, final norm, lm_head)."""
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return embed + head + self.hidden_size + sum(self.layer_params(la) for la in self.layers)

    @property
    def active_params(self) -> int:
        """Parameters touched per token: everything but the routed experts not in the top-k."""
        unused = self.num_experts - self.top_k
        per_expert = 3 * self.hidden_size * self.intermediate_size
        return self.total_params - sum(unused * per_expert for la in self.layers if la.is_moe)

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies [head_dim/2], float32, computed as transformers does."""
        d = self.head_dim
        inv = (1.0 / (np.float32(self.rope_theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))).astype(
            np.float32
        )
        rs = self.rope_scaling
        if rs is None:
            return inv
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = (2 * math.pi / inv).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv / np.float32(rs.factor), inv).astype(np.float32)
        # IMPORTANT: Scout has low == high, so the smoothing band is empty and its formula divides by 0;
        # `where` keeps the NaN out (llama-models #322, llama.cpp #12889).
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        if medium.any():
            smooth = (rs.original_max_position_embeddings / wavelen[medium] - rs.low_freq_factor) / (
                rs.high_freq_factor - rs.low_freq_factor
            )
            s = scaled[medium]
            scaled[medium] = ((1 - smooth) * s / rs.factor + smooth * s).astype(np.float32)
        return scaled.astype(np.float32)

    def attn_temperature(self, positions: np.ndarray) -> np.ndarray:
        """The q multiplier of NoPE layers at absolute cache positions (1.0 below floor_scale - 1)."""
        p = np.asarray(positions, dtype=np.float32)
        return (np.log1p(np.floor((p + 1.0) / np.float32(self.floor_scale))) * np.float32(self.attn_scale) + 1.0).astype(
            np.float32
        )

    def text_config(self) -> dict[str, Any]:
        """The text config as in the file (flat for llama4_text, text_config for llama4)."""
        return dict(self.config.get("text_config", self.config))


# ---- parsing -------------------------------------------------------------------------------------


def _rope(cfg: dict[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    params = cfg.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise SpecError(f"{where}: rope_parameters must be an object, found {params!r}"[:300])
    if params:  # transformers 5 style
        check_fields(params, f"{where}: rope_parameters", (), (), ("rope_theta",))
        theta = float(params.get("rope_theta") or cfg.get("rope_theta") or TEXT_DEFAULTS["rope_theta"])
        scaling = params if params.get("rope_type", params.get("type", "default")) != "default" else None
    else:  # hub style
        theta = float(cfg.get("rope_theta") or TEXT_DEFAULTS["rope_theta"])
        scaling = cfg.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise SpecError(f"{where}: rope_scaling must be an object or null, found {scaling!r}"[:300])
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise SpecError(f"{where}: rope type {kind!r} is not supported (Llama 4 uses 'llama3' or none)")
    try:
        return theta, RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(
                scaling.get("original_max_position_embeddings", cfg.get("max_position_embeddings"))
            ),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise SpecError(f"{where}: llama3 rope scaling lacks or mangles {e}; add factor, low/high_freq_factor") from None


def _int_list(cfg: dict[str, Any], key: str, where: str, allowed: tuple[int, ...] | None = None) -> list[int] | None:
    v = cfg.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or any(isinstance(x, bool) or not isinstance(x, int) for x in v) or (
            allowed is not None and any(x not in allowed for x in v)):
        kind = f"of {' or '.join(map(str, allowed))}" if allowed else "of integers"
        raise SpecError(f"{where}: {key} must be a list {kind}, found {v!r}"[:300])
    return v


def _per_layer(cfg: dict[str, Any], n: int, where: str) -> tuple[LayerSpec, ...]:
    interval = cfg.get("no_rope_layer_interval") or TEXT_DEFAULTS["no_rope_layer_interval"]
    no_rope = _int_list(cfg, "no_rope_layers", where, (0, 1))
    if not no_rope:  # IMPORTANT: an empty list means "the default", as in transformers
        no_rope = [int((i + 1) % interval != 0) for i in range(n)]
    if len(no_rope) < n:
        raise SpecError(f"{where}: no_rope_layers has {len(no_rope)} entries for {n} layers")
    moe = _int_list(cfg, "moe_layers", where)
    if moe is None:
        step = cfg.get("interleave_moe_layer_step") or 1
        moe = list(range(step - 1, n, step))
    moe_set = set(moe)
    if any(i < 0 or i >= n for i in moe_set):
        raise SpecError(f"{where}: moe_layers names layers outside 0..{n - 1}: {sorted(moe_set)}")
    types = cfg.get("layer_types")
    if types is not None and not isinstance(types, list):
        types = [types]
    if types is None:
        types = ["chunked_attention" if r else "full_attention" for r in no_rope[:n]]
    if len(types) != n or any(t not in ("chunked_attention", "full_attention") for t in types):
        raise SpecError(f"{where}: layer_types must be {n} of 'chunked_attention'/'full_attention', found {types}")
    chunk = cfg.get("attention_chunk_size", TEXT_DEFAULTS["attention_chunk_size"])
    qk = bool(cfg.get("use_qk_norm", True))
    tuning = bool(cfg.get("attn_temperature_tuning", True))
    return tuple(
        LayerSpec(
            index=i,
            is_moe=i in moe_set,
            uses_rope=bool(no_rope[i]),
            chunked=types[i] == "chunked_attention" and chunk is not None,
            qk_norm=qk and bool(no_rope[i]),
            temperature_tuning=tuning and not bool(no_rope[i]),
        )
        for i in range(n)
    )


def _layout(config: dict[str, Any], where: str) -> tuple[dict[str, Any], Layout]:
    """The text config and the layout: ``llama4`` + text_config (multimodal) or flat ``llama4_text``."""
    mt = config.get("model_type")
    if mt == "llama4":
        if not isinstance(config.get("text_config"), dict):
            raise SpecError(f"{where}: model_type 'llama4' needs a 'text_config' object")
        return config["text_config"], "multimodal"
    if mt == "llama4_text":
        return config, "text"
    arch = config.get("architectures")
    raise NotLlama4Error(f"{where}: model_type is {mt!r} (architectures {arch}), not Llama 4; expected 'llama4' or 'llama4_text'")


def _fp8(config: dict[str, Any], cfg: dict[str, Any], where: str) -> Fp8Config | None:
    """A compressed-tensors FP8 source, or None. Only a block with a quant_method describes a quantized source
    checkpoint; mlx-lm's copy of its own "quantization" block (in our MLX exports) has none and describes the export."""
    quant = config.get("quantization_config") or cfg.get("quantization_config")
    if not quant or "quant_method" not in quant:
        return None
    if quant.get("quant_method") != "compressed-tensors":
        raise SpecError(f"{where}: quantization_config.quant_method {quant.get('quant_method')!r} is not supported; "
                        "only compressed-tensors FP8 checkpoints are read (or dequantize the checkpoint first)")
    return Fp8Config(ignore=tuple(quant.get("ignore") or ()))


def _checked(cfg: dict[str, Any], get: Any, where: str) -> tuple[int, int, int]:
    """(heads, kv heads, head_dim), after refusing what is not Llama 4."""
    heads = int(get("num_attention_heads"))
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or int(get("hidden_size")) // heads)
    if heads % kv:
        raise SpecError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    if get("hidden_act") != "silu":
        raise SpecError(f"{where}: hidden_act {get('hidden_act')!r} is not supported (Llama 4 uses 'silu')")
    if get("attention_bias"):
        raise SpecError(f"{where}: attention_bias=true is not Llama 4 (its projections have no bias)")
    return heads, kv, head_dim


def _vision(config: dict[str, Any], where: str) -> VisionSpec | None:
    """The vision path of a multimodal config, or None. Every structural key must be in the file."""
    v = config.get("vision_config")
    if not isinstance(v, dict):
        return None
    need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size", "patch_size",
            "pixel_shuffle_ratio", "projector_input_dim", "projector_output_dim", "vision_output_dim")
    missing = [k for k in need if v.get(k) is None]
    if missing:
        raise SpecError(f"{where}: vision_config lacks {', '.join(missing)}; l4export does not fill them from "
                        "transformers' class defaults (they are not Scout's); add them or convert with --text-only")
    ints = tuple(k for k in need if k != "pixel_shuffle_ratio") + ("num_channels",)
    check_fields(v, f"{where}: vision_config", (), ints, ("pixel_shuffle_ratio", "norm_eps"))
    theta = v.get("rope_theta") or (v.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    vs = VisionSpec(
        hidden_size=int(v["hidden_size"]), num_layers=int(v["num_hidden_layers"]), num_heads=int(v["num_attention_heads"]),
        intermediate_size=int(v["intermediate_size"]), image_size=int(v["image_size"]), patch_size=int(v["patch_size"]),
        num_channels=int(v.get("num_channels", 3)), pixel_shuffle_ratio=float(v["pixel_shuffle_ratio"]),
        projector_input_dim=int(v["projector_input_dim"]), projector_output_dim=int(v["projector_output_dim"]),
        vision_output_dim=int(v["vision_output_dim"]), rope_theta=float(theta), norm_eps=float(v.get("norm_eps", 1e-5)),
        image_token_id=int(config.get("image_token_index", 200092)), boi_token_id=config.get("boi_token_index"),
        eoi_token_id=config.get("eoi_token_index"))
    side, r = vs.patches_per_side, vs.pixel_shuffle_ratio
    if vs.image_size % vs.patch_size or (side * r) % 1 or vs.hidden_size % vs.num_heads:
        raise SpecError(f"{where}: vision_config image_size {vs.image_size} / patch_size {vs.patch_size} / "
                        f"pixel_shuffle_ratio {r} / heads {vs.num_heads} do not tile; this is not a Llama 4 vision tower")
    if not 0 <= vs.image_token_id < int(config.get("text_config", config).get("vocab_size", vs.image_token_id + 1)):
        raise SpecError(f"{where}: image_token_index {vs.image_token_id} is outside the vocabulary; fix config.json")
    if vs.intermediate_size != int(round(vs.hidden_size / r**2)):
        raise SpecError(f"{where}: vision_config intermediate_size {vs.intermediate_size} must be hidden_size / "
                        f"pixel_shuffle_ratio^2 = {int(round(vs.hidden_size / r ** 2))} (the adapter reads the pixel-shuffled width)")
    return vs


# Keys every Llama 4 config states (the hub's and transformers 5's): never filled from defaults, since a default
# (hidden 5120, ...) would turn a damaged config into a wrong export or a misleading shape error later.
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "num_local_experts")
POSITIVE_INTS = REQUIRED + ("intermediate_size_mlp", "head_dim", "num_experts_per_tok", "max_position_embeddings",
                            "attention_chunk_size", "interleave_moe_layer_step", "no_rope_layer_interval")
POSITIVE_FLOATS = ("rms_norm_eps", "rope_theta", "floor_scale")


def check_fields(cfg: dict[str, Any], where: str, required: tuple[str, ...] = REQUIRED,
                 ints: tuple[str, ...] = POSITIVE_INTS, floats: tuple[str, ...] = POSITIVE_FLOATS) -> None:
    """Required keys present; integer keys integers >= 1 (not strings, floats or booleans); float keys numbers > 0.
    One line naming the key, its value and the fix."""
    for key in required:
        if cfg.get(key) is None:
            raise SpecError(f"{where}: {key} is missing; every Llama 4 config states it (l4export does not guess it)")
    for key in ints:
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise SpecError(f"{where}: {key} is {v!r}; it must be an integer >= 1 (a JSON number, not a string)")
    for key in floats:
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
            raise SpecError(f"{where}: {key} is {v!r}; it must be a number > 0")


def spec_from_config(config: dict[str, Any], where: str = "config.json") -> Llama4Spec:
    """Parse a config dict (either layout, either style) into a Llama4Spec."""
    cfg, layout = _layout(config, where)
    check_fields(cfg, where)

    def get(key: str) -> Any:  # the file's value, or transformers' default when absent or null
        value = cfg.get(key)
        return TEXT_DEFAULTS[key] if value is None else value

    n = int(get("num_hidden_layers"))
    heads, kv, head_dim = _checked(cfg, get, where)
    theta, scaling = _rope(cfg, where)
    eos = cfg.get("eos_token_id", TEXT_DEFAULTS["eos_token_id"])
    eos_list = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if any(isinstance(e, bool) or not isinstance(e, int) for e in eos_list):
        raise SpecError(f"{where}: eos_token_id must be a token id or a list of them, found {eos!r}"[:300])
    eos_ids = tuple(eos_list)
    for key in ("bos_token_id", "pad_token_id"):
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise SpecError(f"{where}: {key} must be a token id (an integer >= 0) or null, found {v!r}"[:300])
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return Llama4Spec(
        layout=layout, vocab_size=int(get("vocab_size")), hidden_size=int(get("hidden_size")), num_layers=n,
        num_heads=heads, num_kv_heads=kv, head_dim=head_dim, intermediate_size=int(get("intermediate_size")),
        intermediate_size_mlp=int(get("intermediate_size_mlp")), num_experts=int(get("num_local_experts")),
        top_k=int(get("num_experts_per_tok")), rms_norm_eps=float(get("rms_norm_eps")), rope_theta=theta,
        rope_scaling=scaling, attention_chunk_size=cfg.get("attention_chunk_size", TEXT_DEFAULTS["attention_chunk_size"]),
        attn_temperature_tuning=bool(cfg.get("attn_temperature_tuning", True)), floor_scale=float(get("floor_scale")),
        attn_scale=float(get("attn_scale")), use_qk_norm=bool(cfg.get("use_qk_norm", True)),
        max_position_embeddings=int(get("max_position_embeddings")),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
        bos_token_id=cfg.get("bos_token_id", TEXT_DEFAULTS["bos_token_id"]), eos_token_ids=eos_ids,
        pad_token_id=cfg.get("pad_token_id"), layers=_per_layer(cfg, n, where), torch_dtype=dtype,
        fp8=_fp8(config, cfg, where), config=config,
        vision=_vision(config, where) if layout == "multimodal" else None,
    )


def load_spec(path: str | Path) -> Llama4Spec:
    """Read ``path/config.json`` (or a config.json path) into a spec."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such file or directory; pass a Llama 4 checkpoint folder")
    cfg_path = p / "config.json" if p.is_dir() else p
    if not cfg_path.is_file():
        raise UsageError(f"{cfg_path}: missing; a Hugging Face checkpoint folder has a config.json beside its weights")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise SpecError(f"{cfg_path}: expected a JSON object")
    return spec_from_config(config, where=str(cfg_path))
