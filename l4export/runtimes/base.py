"""What every runtime shares: the Python API apps embed, sampling, tokenizer handling.

A backend implements ``_reset()`` (drop the KV cache) and ``_step(ids, n_logits)`` (run new tokens of one chunk
through the cache, return the logits of the last n of them). Everything else is here, once: prompts in steps,
ids checked, sampling, text:

    rt = load_runtime("out/")              # ONNX or MLX export
    rt.logits([1, 2, 3])                    # [T, V] full forward from an empty cache
    for tok in rt.generate(ids, 32):        # streams token ids
    rt.generate_text("Hello", 32)           # text in, text out (needs tokenizer.json)

This module needs numpy only (tokenizers when text is used).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ExportError, ImageError, L4ExportError, UsageError, wrap
from ..folder import read_export_info
from ..image import IMAGE_PLACEHOLDER
from ..spec import Llama4Spec, VisionSpec, load_spec
from .text import TextStream

if TYPE_CHECKING:
    from ..image import ImageTokenIds, ProcessedImage

ENGINES = {"onnx": "ONNX Runtime", "mlx": "MLX"}

log = logging.getLogger(__name__)


DEFAULT_PREFILL_STEP = 2048  # tokens per prefill step (capped by attention_chunk_size)


@dataclass(frozen=True, eq=False)
class Snapshot:
    """A runtime's cached sequence, copied out (``Runtime.snapshot``): its ids and the cache's valid rows."""

    ids: tuple[int, ...]
    state: Any
    nbytes: int


class Runtime(ABC):
    """A loaded export with a KV cache for one sequence.

    Prompts are run in steps (``prefill_step`` tokens, never crossing a chunk boundary of the chunked layers, so a
    chunked layer's cache never holds more than one chunk), and logits are computed only where they are asked for:
    ``generate`` needs the last position of a prompt, ``logits`` every position."""

    format: str = ""

    def __init__(self, path: str | Path, prefill_step: int | None = None):
        self.path = Path(path)
        self.info = read_export_info(self.path)
        if not (self.path / "config.json").is_file():
            raise ExportError(f"{self.path}: no config.json; the export is incomplete, convert it again")
        self.spec: Llama4Spec = load_spec(self.path)
        self._tokenizer = None
        self.prefill_step = check_prefill_step(prefill_step, self.spec)
        self.pos = 0  # tokens in the cache
        self.history: list[int] | None = []  # the ids the cache holds (None: not reusable, e.g. image features)
        self.reused = 0  # tokens the last generate(reuse=True) took from the cache instead of running them
        self.last_logits: np.ndarray | None = None  # the logits the last generated token was drawn from

    # ---- backend -------------------------------------------------------------------------------
    @abstractmethod
    def _reset(self) -> None:
        """Drop the KV cache."""

    def _save(self) -> tuple[Any, int]:
        """A copy of the cache's valid rows (host memory) and its bytes; ``_load`` puts one back. Override both."""
        raise NotImplementedError

    def _load(self, state: Any) -> None:
        raise NotImplementedError

    def _truncate(self, pos: int) -> None:
        """Keep positions [0, pos) of the cache (chunked layers: [chunk start of pos, pos)); ``pos`` is at most
        ``self.pos`` and either in the current chunk or on a chunk boundary. Backends that can, override it."""
        raise NotImplementedError

    @property
    def can_reuse(self) -> bool:
        """Whether the cache can be cut back to a prefix (``reuse``)."""
        return True

    @abstractmethod
    def _step(self, ids: list[int], n_logits: int, features: np.ndarray | None = None) -> np.ndarray:
        """Run ``ids`` (within one chunk) at positions ``self.pos`` ..; return the logits [n_logits, V] float32 of the
        last ``n_logits`` of them (n_logits >= 1). ``features`` [P, H]: the image features of the P <|patch|> tokens
        among ``ids``, in order (they replace those tokens' embeddings); None: plain token embeddings."""

    def _encode_tiles(self, pixel_values: np.ndarray) -> np.ndarray:
        """Image tiles [N, 3, S, S] float32 -> image features [N * tokens_per_tile, hidden] float32."""
        raise ImageError(f"{self.path}: the {self.format} runtime cannot run this export's vision model")

    @contextmanager
    def running(self) -> Iterator[None]:
        """Around the backend's work: a failure inside the engine (ONNX Runtime's kernels, MLX) becomes one
        ExportError line, the engine's message shortened in it and whole in ``detail`` (the CLI's -v)."""
        try:
            yield
        except Exception as err:
            if isinstance(err, L4ExportError) or not engine_failure(err):
                raise
            log.debug("%s failed", ENGINES.get(self.format, self.format), exc_info=err)
            raise wrap(ExportError, self.path, f"{ENGINES.get(self.format, self.format)} failed", err,
                       "convert it again") from err

    # ---- shared API ----------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the sequence (empty KV cache)."""
        self.pos = 0
        self.history = []
        self._reset()

    def snapshot(self) -> Snapshot | None:
        """The sequence the cache holds, copied out (None when it cannot be reused: see ``reuse``)."""
        if not self.history or not self.can_reuse:
            return None
        state, nbytes = self._save()
        return Snapshot(tuple(self.history), state, nbytes)

    def restore(self, snap: Snapshot) -> None:
        """Make ``snap``'s sequence the cached one (then ``reuse`` starts from it)."""
        self.reset()
        self.reserve(len(snap.ids))
        self._load(snap.state)
        self.pos, self.history = len(snap.ids), list(snap.ids)

    def reuse(self, ids: Sequence[int]) -> int:
        """Keep the longest prefix of the cached sequence that ``ids`` starts with (at most all but its last token,
        whose logits are needed) and return its length: the tokens of ``ids`` still to run start there.

        Exact: global layers keep every key; a chunked layer holds only the current chunk, so a prefix ending before
        it is cut back to the start of its own chunk, and that chunk's tokens (< attention_chunk_size) run again."""
        ids = list(ids)
        held = self.history if self.can_reuse else None
        n = reusable(held, ids, self.pos, self.spec.attention_chunk_size) if held else 0
        if n == 0:
            self.reset()
            return 0
        if n < self.pos:
            self._truncate(n)
        self.pos, self.history = n, held[:n]
        return n

    def reserve(self, tokens: int) -> None:
        """A hint: the sequence will reach ``tokens`` tokens (backends may size their caches once)."""

    def steps(self, n: int) -> list[tuple[int, int]]:
        """[a, b) pieces of ``n`` new tokens: at most prefill_step each, none crossing a chunk boundary."""
        chunk, out, a = self.spec.attention_chunk_size or 0, [], 0
        while a < n:
            room = chunk - (self.pos + a) % chunk if chunk else n - a
            b = a + min(self.prefill_step, room, n - a)
            out.append((a, b))
            a = b
        return out

    def forward(self, ids: Sequence[int], last_only: bool = False, features: np.ndarray | None = None) -> np.ndarray:
        """Run ``ids`` after what the cache holds; return their logits [len(ids), V] (``last_only``: [1, V], the last
        position's) as float32. ``features``: image features for the <|patch|> tokens of ``ids``, one row each, in
        order (``image_features``); None: every token is embedded as a token."""
        ids = self.check_ids(ids)
        patch = self.check_features(ids, features)
        if features is not None and len(features):  # a <|patch|> embedded from image features is not its id
            self.history = None
        pieces = self.steps(len(ids))
        out, used = [], 0
        for n, (a, b) in enumerate(pieces):
            want = 1 if last_only else b - a  # a step always computes at least its last position's logits
            rows = 0 if features is None else sum(i == patch for i in ids[a:b])
            with self.running():
                logits = self._step(ids[a:b], want, None if features is None else features[used : used + rows])
            used += rows
            self.pos += b - a
            if self.history is not None:  # what the cache holds, step by step (a failed step adds nothing)
                self.history.extend(ids[a:b])
            if not last_only or n == len(pieces) - 1:
                out.append(logits)
        return out[0] if len(out) == 1 else np.concatenate(out, axis=0)

    def check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        if not ids:
            raise UsageError("forward needs at least one token id")
        if min(ids) < 0 or max(ids) >= self.spec.vocab_size:
            raise UsageError(f"token ids must be in 0..{self.spec.vocab_size - 1}; got {min(ids)}..{max(ids)}")
        if self.pos + len(ids) > self.spec.max_position_embeddings:
            raise UsageError(f"{self.pos + len(ids)} tokens exceed max_position_embeddings "
                             f"({self.spec.max_position_embeddings}); use a shorter prompt or fewer new tokens")
        return ids

    def check_features(self, ids: list[int], features: np.ndarray | None) -> int | None:
        """The <|patch|> id, after checking that ``features`` has one row per <|patch|> token of ``ids``."""
        if features is None:
            return None
        vs = self.vision
        if vs is None:
            raise ImageError(f"{self.path}: this export has no vision model (a text-only checkpoint, or converted with "
                             "--text-only); convert the multimodal checkpoint without --text-only to run images")
        n = sum(i == vs.image_token_id for i in ids)
        if n != len(features):
            raise ImageError(f"the prompt has {n} <|patch|> image tokens but the images give {len(features)} image "
                             "features; build the prompt with prompt_ids() (one <|image|> per image)")
        return vs.image_token_id

    def logits(self, ids: Sequence[int], features: np.ndarray | None = None) -> np.ndarray:
        """Logits [T, V] of one full forward over ``ids`` from an empty cache (``features``: see ``forward``)."""
        self.reset()
        self.reserve(len(ids))
        return self.forward(list(ids), features=features)

    def logits_incremental(self, ids: Sequence[int], step: int = 1, features: np.ndarray | None = None) -> np.ndarray:
        """Logits [T, V] feeding ``ids`` ``step`` tokens at a time through the KV cache."""
        self.reset()
        ids = list(ids)
        self.reserve(len(ids))
        patch = self.check_features(ids, features)
        out, used = [], 0
        for i in range(0, len(ids), step):
            piece = ids[i : i + step]
            rows = 0 if features is None else sum(t == patch for t in piece)
            out.append(self.forward(piece, features=None if features is None else features[used : used + rows]))
            used += rows
        return np.concatenate(out, axis=0)

    def generate(self, ids: Sequence[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = 0, stop: Sequence[int] | None = None,
                 features: np.ndarray | None = None, reuse: bool = False, constraint: Any = None) -> Iterator[int]:
        """Stream up to ``max_new_tokens`` token ids after the prompt ``ids`` (greedy when temperature is 0).
        ``features``: the prompt's image features (``prompt_ids``); generated tokens are always plain tokens.
        ``reuse``: start from the longest prefix of ``ids`` the cache already holds (the previous turn of a
        conversation: ``self.reused`` says how many tokens were not run again); the logits are a cold run's.
        ``constraint``: a grammar (runtimes/constrain.py) every token must follow; generation ends with its value."""
        if not ids:
            raise UsageError("generate needs at least one prompt token")
        rng = np.random.default_rng(seed)
        stop_ids = set(self.spec.eos_token_ids if stop is None else stop)
        ids = list(ids)
        start = self.reuse(ids) if reuse and features is None else 0
        if not start:
            self.reset()
        self.reused = start
        self.reserve(len(ids) + max_new_tokens)
        logits = self.forward(ids[start:], last_only=True, features=features)[-1]
        for n in range(max_new_tokens):
            tok = pick(logits, constraint, temperature, top_p, rng)
            self.last_logits = logits  # what ``tok`` was drawn from (the server's logprobs read it)
            yield tok
            if constraint is not None:
                constraint.accept(tok)
            if tok in stop_ids or n == max_new_tokens - 1 or (constraint is not None and constraint.done):
                return  # (the last token is not run: nothing would read its logits)
            logits = self.forward([tok])[-1]

    # ---- text ------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            tj = require_tokenizer(self.path)
            try:
                from tokenizers import Tokenizer
            except ImportError:
                raise UsageError("text in and out needs the tokenizers package: pip install tokenizers") from None
            self._tokenizer = Tokenizer.from_file(str(tj))
        return self._tokenizer

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        bos = self.spec.bos_token_id
        return ([bos] if add_bos and bos is not None else []) + ids

    def chat(self, messages: Sequence[dict], max_new_tokens: int = 256, images: Sequence[Any] = (), **sampling
             ) -> Iterator[str]:
        """Stream the assistant's reply to a conversation (``[{"role": "user", "content": "Hi"}, ...]``) through the
        export's chat template, stopping at its end-of-turn tokens (runtimes/chat.py)."""
        from .chat import chat

        return chat(self, messages, images, max_new_tokens, **sampling)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def generate_text(self, prompt: str, max_new_tokens: int = 64, images: Sequence[Any] = (), add_bos: bool = True,
                      stop_strings: Sequence[str] = (), **kw) -> Iterator[str]:
        """Stream decoded text pieces for a prompt (with ``images``: paths, PIL images or arrays, one ``<|image|>``
        placeholder per image in the prompt, or none to put them before the text). ``add_bos`` False for a prompt
        that already starts with the BOS token's text (a rendered chat template). The stop token or stop string that
        ends the text is not part of it (runtimes/text.py: constant work per token)."""
        ids, features = self.prompt_ids(prompt, images, add_bos)
        stops = set(self.spec.eos_token_ids if kw.get("stop") is None else kw["stop"])
        stream = TextStream(self.decode, stops, stop_strings)
        for tok in self.generate(ids, max_new_tokens, features=features, **kw):
            piece = stream.push(tok)
            if piece:
                yield piece
            if stream.finish:
                return
        if tail := stream.flush():
            yield tail


    # ---- images ------------------------------------------------------------------------------------
    @property
    def vision(self) -> VisionSpec | None:
        """The vision path this export runs, or None (text only)."""
        return self.spec.vision if self.info.vision else None

    @property
    def max_images(self) -> int:
        return int((self.info.vision or {}).get("max_images", 0))

    def process_images(self, images: Sequence[Any]) -> list[ProcessedImage]:
        """Preprocess images as transformers' Llama 4 processor does (``l4export.image``)."""
        from ..image import preprocess

        vs = self.vision
        if vs is None:
            self.check_features([], np.zeros((0, 1)))  # the one-line "no vision model" error
        if len(images) > self.max_images:
            raise ImageError(f"{len(images)} images given; this export takes at most {self.max_images} per prompt "
                             "(convert with --max-images N for more)")
        patches = int(self.info.vision.get("max_patches", 16))
        return [preprocess(im, vs.image_size, patches, where=f"image {n + 1}") for n, im in enumerate(images)]

    def image_features(self, processed: Sequence[ProcessedImage]) -> np.ndarray:
        """Features [sum of tiles * tokens_per_tile, hidden] float32 of preprocessed images, in order."""
        with self.running():
            rows = [self._encode_tiles(p.pixel_values) for p in processed]
        return np.concatenate(rows) if rows else np.zeros((0, self.spec.hidden_size), np.float32)

    def image_token_ids(self) -> ImageTokenIds:
        """Llama 4's image tokens, from the export's tokenizer (<|patch|> is the config's image_token_index)."""
        from ..image import IMAGE_TOKENS, ImageTokenIds

        ids = {t: self.tokenizer.token_to_id(t) for t in IMAGE_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ImageError(f"{self.path}: tokenizer.json lacks {', '.join(missing)}; images need Llama 4's tokenizer")
        if ids["<|patch|>"] != self.vision.image_token_id:
            raise ImageError(f"{self.path}: tokenizer.json puts <|patch|> at {ids['<|patch|>']} but config.json's "
                             f"image_token_index is {self.vision.image_token_id}; fix one of them")
        return ImageTokenIds(*(ids[t] for t in IMAGE_TOKENS))

    def prompt_ids(self, prompt: str, images: Sequence[Any] = (), add_bos: bool = True
                   ) -> tuple[list[int], np.ndarray | None]:
        """Token ids of a text prompt with images, and the images' features (None without images).

        Each ``<|image|>`` placeholder becomes its image's tokens (Llama4Processor's layout: tiles of <|patch|>
        tokens with separators, the global tile last); a prompt with no placeholder gets the images first."""
        from ..image import image_token_ids

        if not images:
            if IMAGE_PLACEHOLDER in prompt:
                raise ImageError(f"the prompt has {prompt.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} placeholder(s) "
                                 "but no image was given; pass --image FILE for each")
            return self.encode(prompt, add_bos), None
        processed = self.process_images(images)
        if IMAGE_PLACEHOLDER not in prompt:
            prompt = IMAGE_PLACEHOLDER * len(images) + prompt
        pieces = prompt.split(IMAGE_PLACEHOLDER)
        if len(pieces) - 1 != len(images):
            raise ImageError(f"the prompt has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholders but {len(images)} "
                             "images were given; use one per image, or none to put the images before the text")
        tok, per_tile = self.image_token_ids(), self.vision.tokens_per_tile
        ids = self.encode(pieces[0], add_bos)
        for p, text in zip(processed, pieces[1:]):
            ids += image_token_ids(p.grid, per_tile, tok) + self.encode(text, add_bos=False)
        return ids, self.image_features(processed)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def reusable(held: Sequence[int], ids: Sequence[int], pos: int, chunk: int | None) -> int:
    """How many leading ``ids`` a cache holding ``held`` (``pos`` tokens) can keep, exactly: their common prefix, but
    never the last id (its logits are needed), and cut back to a chunk start when it ends before the current chunk
    (a chunked layer holds only the current chunk; that chunk's tokens run again)."""
    n = common_prefix(held, list(ids[: min(len(ids) - 1, pos)]))
    if n < chunk_start(pos, chunk):
        n = chunk_start(n, chunk)
    return n


def chunk_start(pos, chunk: int | None):
    """Where the attention chunk holding absolute position ``pos`` starts (0 without chunks); ``pos`` an int or an
    array of them. A chunked layer's cache holds positions chunk_start(pos) .. pos."""
    return (pos // chunk) * chunk if chunk else 0


def require_tokenizer(path: Path) -> Path:
    """The export's tokenizer.json; a one-line error when there is none (text was asked of it)."""
    tj = Path(path) / "tokenizer.json"
    if not tj.is_file():
        raise UsageError(f"{path}: no tokenizer.json, so it cannot tokenize text: give token ids (run --ids), or copy "
                         "the model's tokenizer.json next to its config.json and convert again")
    return tj


def engine_failure(err: BaseException) -> bool:
    """An error raised inside an engine at run time: ONNX Runtime's (RuntimeError from run_with_iobinding, or its
    own Fail/InvalidArgument/... types from run) or MLX's (RuntimeError, ValueError)."""
    return isinstance(err, (RuntimeError, ValueError)) or type(err).__module__.split(".")[0] in ("onnxruntime", "mlx")


def check_prefill_step(step: int | None, spec: Llama4Spec) -> int:
    """The prefill step: at most attention_chunk_size (a step never crosses a chunk boundary)."""
    chunk = spec.attention_chunk_size or 0
    if step is None:
        return min(DEFAULT_PREFILL_STEP, chunk) if chunk else DEFAULT_PREFILL_STEP
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise UsageError(f"prefill step {step!r} must be a positive number of tokens (e.g. {DEFAULT_PREFILL_STEP})")
    if chunk and step > chunk:
        raise UsageError(f"prefill step {step} is larger than attention_chunk_size {chunk}: a step never crosses a chunk "
                         f"boundary; use a step of at most {chunk}")
    return step


def pick(logits: np.ndarray, constraint: Any, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """The next token: ``sample`` over the tokens ``constraint`` (a grammar, or None) allows."""
    return sample(logits if constraint is None else constraint.mask(logits), temperature, top_p, rng)


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; else temperature + nucleus (top-p) sampling."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]
        mask = np.zeros_like(p)
        mask[keep] = p[keep]
        p = mask / mask.sum()
    return int(rng.choice(len(p), p=p))
