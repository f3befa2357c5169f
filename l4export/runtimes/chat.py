"""Chat on top of a runtime: the export's chat template, its stop tokens, streamed turns.

    messages = [{"role": "user", "content": "Hi"}]                  # or content parts: {"type": "text"/"image", ...}
    for piece in rt.chat(messages, max_new_tokens=64):             # text, streamed; stops at the end-of-turn tokens
        print(piece, end="")

The template is the export's own (``chat_template.jinja`` or ``tokenizer_config.json``'s ``chat_template``, copied
from the checkpoint at convert time), rendered the way transformers renders it (jinja2 sandbox, trim_blocks,
lstrip_blocks, ``add_generation_prompt``, ``bos_token``, ``raise_exception``, ``strftime_now``). An export without
one (the demo, the test checkpoints) gets Llama 4's turn format when its tokenizer has Llama 4's header tokens:

    <|begin_of_text|><|header_start|>user<|header_end|>\\n\\nHi<|eot|><|header_start|>assistant<|header_end|>\\n\\n

Stop tokens: the config's eos_token_id, generation_config.json's eos_token_id, and ``<|eot|>`` / ``<|eom|>`` /
``<|end_of_text|>`` when the tokenizer has them.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from ..errors import UsageError
from ..image import IMAGE_PLACEHOLDER
from ..spec import Llama4Spec


class Runtime(Protocol):
    """What chat needs of a runtime (base.Runtime is one): its folder, spec, tokenizer and text generation."""

    path: Path
    spec: Llama4Spec

    @property
    def tokenizer(self) -> Any: ...

    def generate_text(self, prompt: str, max_new_tokens: int, **kwargs: Any) -> Iterator[str]: ...

STOP_TOKENS = ("<|eot|>", "<|eom|>", "<|end_of_text|>")

# Llama 4's turn format, for exports that carry no template of their own (written here, from the format itself).
LLAMA4_FORMAT = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "<|header_start|>{{ m.role }}<|header_end|>\n\n"
    "{% if m.content is string %}{{ m.content }}"
    "{% else %}{% for c in m.content %}{% if c.type == 'image' %}<|image|>{% elif c.type == 'text' %}{{ c.text }}"
    "{% endif %}{% endfor %}{% endif %}<|eot|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}"
)


def _json(path) -> dict:
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError(f"{path}: not valid JSON; the export is damaged, convert it again") from None
    return data if isinstance(data, dict) else {}


def template(rt: Runtime, fallback: bool = True) -> str | None:
    """The export's chat template; else (``fallback``) Llama 4's format when the tokenizer knows its header tokens;
    else None."""
    f = rt.path / "chat_template.jinja"
    if f.is_file():
        return f.read_text()
    t = _json(rt.path / "tokenizer_config.json").get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    if isinstance(t, str):
        return t
    if not fallback:
        return None
    tj = rt.path / "tokenizer.json"
    if tj.is_file() and all(rt.tokenizer.token_to_id(s) is not None for s in ("<|header_start|>", "<|header_end|>", "<|eot|>")):
        return LLAMA4_FORMAT
    return None


def bos_text(rt: Runtime) -> str:
    bos = _json(rt.path / "tokenizer_config.json").get("bos_token")
    if isinstance(bos, dict):
        bos = bos.get("content")
    if isinstance(bos, str):
        return bos
    bid = rt.spec.bos_token_id
    if bid is None or not (rt.path / "tokenizer.json").is_file():
        return ""
    return rt.tokenizer.id_to_token(bid) or ""


def render(rt: Runtime, messages: Sequence[dict], add_generation_prompt: bool = True, fallback: bool = True,
           tools: list[dict] | None = None) -> str:
    """The prompt text of ``messages`` through the export's template (UsageError when it has none or refuses).
    ``tools``: function definitions (runtimes/tools.py): to the export's template as ``tools``, or into a system turn
    of the built-in Llama 4 format."""
    own = template(rt, fallback=False)
    source = own if own is not None else template(rt, fallback)
    extra: dict = {}
    if tools and own is not None:
        extra["tools"] = [{"type": "function", "function": f} for f in tools]
    elif own is None:  # the built-in format: tool turns as Llama 4 writes them, tools in the first system turn
        from .tools import as_turns, system_turn

        messages = as_turns(list(messages))
        if tools:
            sys = system_turn(tools)
            if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
                sys = {"role": "system", "content": f"{messages[0]['content']}\n\n{sys['content']}"}
                messages = messages[1:]
            messages = [sys, *messages]
    if source is None:
        raise UsageError(f"{rt.path}: no chat template (and no Llama 4 header tokens in tokenizer.json); use "
                         "generate_text / l4export run with a plain prompt")
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise UsageError("the chat template needs jinja2: pip install 'l4export[chat]'") from None

    def fail(msg: str):
        raise UsageError(f"the chat template refused the conversation: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=fail, strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    check_messages(messages)
    try:
        return env.from_string(source).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                              bos_token=bos_text(rt), **extra)
    except TemplateError as err:
        raise UsageError(f"{rt.path}: the chat template failed: {err}") from None


def check_messages(messages: Sequence[dict]) -> None:
    """Messages as OpenAI's chat API has them: a non-empty list of {"role": str, "content": str or parts}."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UsageError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise UsageError(f"message {n}: needs a 'role' string")
        content = m.get("content")
        if isinstance(content, str) or (content is None and m.get("tool_calls")):
            continue
        if not isinstance(content, list) or any(not isinstance(c, dict) or c.get("type") not in ("text", "image")
                                                for c in content):
            raise UsageError(f"message {n}: 'content' must be a string or a list of text/image parts")


def stop_ids(rt: Runtime) -> set[int]:
    """Where a turn ends: the config's and generation_config.json's eos ids, and Llama 4's end tokens."""
    ids = set(rt.spec.eos_token_ids)
    eos = _json(rt.path / "generation_config.json").get("eos_token_id")
    for e in eos if isinstance(eos, list) else [eos]:
        if isinstance(e, int) and not isinstance(e, bool):
            ids.add(e)
    if (rt.path / "tokenizer.json").is_file():
        ids |= {i for s in STOP_TOKENS if (i := rt.tokenizer.token_to_id(s)) is not None}
    return ids


def user_turn(text: str, images: int = 0) -> list[dict]:
    """One user message: ``images`` image parts, then the text (Llama 4 puts images first)."""
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]


def chat(rt: Runtime, messages: Sequence[dict], images: Sequence[Any] = (), max_new_tokens: int = 256,
         **sampling) -> Iterator[str]:
    """Stream the assistant's reply to ``messages`` (images fill the conversation's image parts, in order)."""
    prompt = render(rt, messages)
    if prompt.count(IMAGE_PLACEHOLDER) != len(images):
        raise UsageError(f"the conversation has {prompt.count(IMAGE_PLACEHOLDER)} image part(s) but {len(images)} "
                         "image(s) were given")
    # reuse: a conversation's next turn starts from the cache the previous one left (runtimes/base.Runtime.reuse)
    return rt.generate_text(prompt, max_new_tokens, images=images, add_bos=False, stop=sorted(stop_ids(rt)),
                            **{"reuse": True, **sampling})
