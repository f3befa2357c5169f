"""The OpenAI API's shapes, without a web framework: requests parsed and checked (``BadRequest``: a 400 naming the
parameter), answers and stream chunks built, logprobs in both APIs' forms. serve.py serves them."""

import base64
import io
import json
import time
from dataclasses import dataclass, field
from typing import Any


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class Request:
    """A validated completion request."""

    prompt: str  # the text to continue (chat: rendered through the template)
    images: list = field(default_factory=list)
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    add_bos: bool = True
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens (benchmarks)
    logprobs: int | None = None  # None: none; k >= 0: each token's log-probability and its k most likely alternatives
    tools: list | None = None  # the functions the answer may call (tool_choice not "none"): its calls are parsed
    grammar: Any = None  # response_format json_object / json_schema: a runtimes.constrain.JsonGrammar (used once)


def _number(body: dict, key: str, default: float, lo: float, hi: float, integer: bool = False) -> Any:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) or not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        raise BadRequest(f"'{key}' must be {kind} in [{lo:g}, {hi:g}], got {v!r}", key)
    return v


def _stop(body: dict) -> list[str]:
    s = body.get("stop")
    stops = [] if s is None else [s] if isinstance(s, str) else s
    if not isinstance(stops, list) or len(stops) > 4 or any(not isinstance(x, str) or not x for x in stops):
        raise BadRequest("'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    return stops


def _image(part: dict) -> Any:
    url = (part.get("image_url") or {}).get("url") if isinstance(part.get("image_url"), dict) else part.get("image_url")
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise BadRequest("image parts must be 'image_url' with a data: URL (data:image/png;base64,...)", "messages")
    try:
        from PIL import Image

        img = Image.open(io.BytesIO(base64.b64decode(url.split(";base64,", 1)[1], validate=True)))
        img.load()
        return img
    except Exception:
        raise BadRequest("an image part's data: URL is not a readable base64 image", "messages") from None


def _messages(body: dict) -> tuple[list[dict], list]:
    """OpenAI messages -> template messages (text and image parts) and the images, in order."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("'messages' must be a non-empty list of {role, content}", "messages")
    out, images = [], []
    for n, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{n}] needs a 'role' string", "messages")
        content = m.get("content")
        if m["role"] == "assistant" and m.get("tool_calls"):  # the model's earlier calls, as the API returned them
            calls = m["tool_calls"]
            if not isinstance(calls, list) or any(not _is_call(c) for c in calls):
                raise BadRequest(f"messages[{n}].tool_calls must be a list of {{function: {{name, arguments}}}} with "
                                 "arguments a JSON object in a string", "messages")
            out.append({"role": "assistant", "content": content if isinstance(content, str) else None,
                        "tool_calls": calls})
            continue
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise BadRequest(f"messages[{n}].content must be a string or a list of parts", "messages")
        parts = []
        for p in content:
            kind = p.get("type") if isinstance(p, dict) else None
            if kind == "text" and isinstance(p.get("text"), str):
                parts.append({"type": "text", "text": p["text"]})
            elif kind == "image_url":
                images.append(_image(p))
                parts.append({"type": "image"})
            else:
                raise BadRequest(f"messages[{n}] has a part that is not text or image_url", "messages")
        out.append({"role": m["role"], "content": parts})
    return out, images


def _is_call(c: Any) -> bool:
    f = c.get("function") if isinstance(c, dict) else None
    if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(f.get("arguments", "{}"), str):
        return False
    try:
        return isinstance(json.loads(f.get("arguments") or "{}"), dict)
    except json.JSONDecodeError:
        return False


def _logprob(rt: Any, logits: Any, tok: int, top: int) -> dict:
    """A token's log-probability under the model (raw logits, before temperature), and the ``top`` most likely."""
    import numpy as np

    x = logits.astype(np.float64)
    lp = x - x.max() - np.log(np.exp(x - x.max()).sum())
    best = np.argsort(-lp, kind="stable")[:top]
    text = lambda t: rt.decode([int(t)])
    return {"token": text(tok), "logprob": float(lp[tok]), "bytes": list(text(tok).encode()),
            "top_logprobs": [{"token": text(t), "logprob": float(lp[t]), "bytes": list(text(t).encode())} for t in best]}


def _with(pending: list) -> dict:
    """The pending logprob entries, handed out once (with the text they belong to)."""
    if not pending:
        return {}
    out = {"logprobs": list(pending)}
    pending.clear()
    return out


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 413: "invalid_request_error",
               429: "rate_limit_error", 503: "server_error"}


def _error(message: str, param: str | None = None, status: int = 400):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                                   "param": param, "code": None}}, status_code=status)


def _chunk(kind: str, rid: str, name: str, piece: str, info: dict, offset: int = 0) -> dict:
    """One streamed chunk; ``offset``: the length of the tokens' text streamed before it (completions' text_offset
    counts from the start of the answer, across chunks)."""
    finish = info.get("finish_reason")
    if kind == "chat":
        choice = {"index": 0, "delta": {"content": piece} if piece else {}, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": piece, "finish_reason": finish}
        obj = "text_completion"
    if "logprobs" in info:
        choice["logprobs"] = _logprobs(kind, info["logprobs"], offset)
    out = {"id": rid, "object": obj, "created": int(time.time()), "model": name, "choices": [choice]}
    if "usage" in info:
        out["usage"] = info["usage"]
    return out


def _logprobs(kind: str, entries: list[dict], offset: int = 0) -> dict:
    """OpenAI's shapes: chat {"content": [entries]}; completions the legacy parallel lists (text_offset: each
    token's start in the answer's text, from ``offset``)."""
    if kind == "chat":
        return {"content": entries}
    offsets, at = [], offset
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def _whole(kind: str, rid: str, name: str, text: str, info: dict, logprobs: list | None = None) -> dict:
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": info["finish_reason"]}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": info["finish_reason"]}
        obj = "text_completion"
    if logprobs is not None:
        choice["logprobs"] = _logprobs(kind, logprobs)
    return {"id": rid, "object": obj, "created": int(time.time()), "model": name, "choices": [choice],
            "usage": info["usage"]}
