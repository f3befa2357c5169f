"""``l4export serve``: an OpenAI-compatible HTTP server over one export (FastAPI + uvicorn, the ``serve`` extra).

    GET  /v1/models              the one model served (its name: the export folder's, or --name)
    POST /v1/chat/completions    messages -> the assistant's reply, through the export's chat template
    POST /v1/completions         prompt -> its continuation
    stream: true                 server-sent events, one chunk per decoded piece (pieces made within 2 ms: one
                                 chunk), then ``data: [DONE]``

Requests take ``max_tokens`` (``max_completion_tokens``), ``temperature``, ``top_p``, ``seed``, ``stop`` (a string
or up to 4), ``n`` = 1, vLLM's ``ignore_eos``, and ``logprobs`` (chat: ``true`` with ``top_logprobs`` 0..20;
completions: 0..5; the model's own log-probabilities, before temperature), ``response_format`` (``json_object``,
``json_schema``: enforced token by token with llguidance, runtimes/constrain.py, so the answer parses and validates
unless max_tokens cuts it); answers carry ``usage`` (prompt, cached and completion tokens) and ``finish_reason``
("stop" at
an end-of-turn token or a stop string, "length" at max_tokens). Image parts (``image_url`` with a ``data:`` URL) go
through the same preprocessing as ``rt.generate_text(images=...)``.

By default one runtime, one KV cache: requests run one at a time (a lock; the others wait their turn, at most
--max-queue of them: 429 beyond), generation runs in a worker thread, and a client that disconnects mid-stream stops
its generation at the next token and frees the model. A request starts from the longest prefix of its prompt the
cache holds (the previous request's, or one of --prompt-cache kept sequences: a conversation's next turn), exactly
(``usage.prompt_tokens_details.cached_tokens``). With ``--parallel N`` (continuous batching, runtimes/batch.py) N
requests decode together in one batched step, each in a slot of --ctx-size tokens that keeps its sequence for the
next turn; new requests join between steps, a long prompt runs in pieces between them. Bad
requests get a 400 with an OpenAI-style error object (401 without the --api-key, 413 for a body over
--max-body-bytes); the server keeps serving. ``GET /health`` answers without a key. One log line per request:
prompt and cached tokens, time to first token, tokens per second.
"""

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .errors import L4ExportError, UsageError
from .openai_api import (
    BadRequest,
    Request,
    _chunk,
    _error,
    _logprob,
    _messages,
    _number,
    _stop,
    _whole,
    _with,
)
from .runtimes.prompt_cache import PromptCache
from .runtimes.text import TextStream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What one server accepts (``l4export serve`` options); beyond them a clear 4xx, never a stalled server."""

    api_key: str | None = None  # checked on every route (Authorization: Bearer KEY); None: open (localhost)
    max_body_bytes: int = 32 << 20  # 413 beyond (images arrive as base64 in the body)
    max_tokens: int = 8192  # a request asking more: 400
    max_queue: int = 16  # requests waiting for the model beyond the running one: 429
    prompt_cache: int = 4  # sequences kept beside the live one (conversations that alternate), at most...
    prompt_cache_bytes: int = 2 << 30  # ...this many bytes of KV copies
    parallel: int = 1  # sequences decoded together (> 1: continuous batching, runtimes/batch.py)
    ctx_size: int | None = None  # tokens each of those sequences may hold (None: max_position_embeddings, <= 8192)


class Server:
    """The model, its lock and the request logic (no web framework here: create_app wraps it)."""

    def __init__(self, rt: Any, name: str, limits: Limits = Limits()):
        from .runtimes.chat import stop_ids

        self.rt, self.name, self.limits = rt, name, limits
        self.lock = threading.Lock()
        self.stop_ids = sorted(stop_ids(rt))
        self.waiting = 0  # requests admitted and not finished (the running one included)
        self.kept = PromptCache(limits.prompt_cache, limits.prompt_cache_bytes)
        self.count = threading.Lock()
        self.engine = None  # with --parallel N > 1: N slots decoded together, each keeping its own prompt cache
        if limits.parallel > 1:
            from .runtimes.batch import BatchEngine

            ctx = limits.ctx_size or min(rt.spec.max_position_embeddings, 8192)
            self.engine = BatchEngine(rt, limits.parallel, ctx)
            log.info("%d slots of %d tokens: %.1f MB of KV cache", limits.parallel, ctx, self.engine.cache_bytes / 1e6)

    def admit(self) -> bool:
        """Take a place in the queue (False: the queue is full: 429)."""
        with self.count:
            if self.waiting >= self.limits.max_queue + self.limits.parallel:
                return False
            self.waiting += 1
            return True

    def leave(self) -> None:
        with self.count:
            self.waiting -= 1

    def parse(self, body: Any, chat: bool) -> Request:
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.name:
            raise BadRequest(f"model '{model}' is not served here; this server serves '{self.name}'", "model")
        if body.get("n", 1) != 1:
            raise BadRequest("only n = 1 is supported", "n")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        common = dict(max_tokens=_number({"max_tokens": max_tokens}, "max_tokens", 256, 1, self.limits.max_tokens,
                                         integer=True),
                      temperature=_number(body, "temperature", 1.0, 0, 2), top_p=_number(body, "top_p", 1.0, 1e-9, 1),
                      seed=_number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True), stop=_stop(body),
                      stream=bool(body.get("stream", False)), ignore_eos=body.get("ignore_eos") is True)
        if chat:  # logprobs: true (+ top_logprobs 0..20); completions: logprobs 0..5
            if body.get("logprobs") not in (None, True, False):
                raise BadRequest("'logprobs' must be true or false", "logprobs")
            top = _number(body, "top_logprobs", 0, 0, 20, integer=True)
            if body.get("top_logprobs") is not None and body.get("logprobs") is not True:
                raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
            common["logprobs"] = top if body.get("logprobs") is True else None
        else:
            common["logprobs"] = _number(body, "logprobs", None, 0, 5, integer=True)
        common["grammar"] = self._grammar(body.get("response_format"), common["ignore_eos"])
        if chat:
            from .runtimes.chat import render

            messages, images = _messages(body)
            tools = self._tools(body, common)
            try:
                return Request(render(self.rt, messages, tools=tools), images, add_bos=False, tools=tools, **common)
            except UsageError as err:
                raise BadRequest(str(err), "messages") from None
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("'prompt' must be a non-empty string", "prompt")
        return Request(prompt, **common)

    def _tools(self, body: dict, common: dict) -> list[dict] | None:
        """``tools`` and ``tool_choice``: the functions to offer (None: none); ``required`` or a named function
        constrains the answer to a call (common["grammar"])."""
        if body.get("tools") is None:
            return None
        from .runtimes.constrain import JsonGrammar
        from .runtimes.tools import call_schema, check_tools

        try:
            tools = check_tools(body["tools"])
            choice = body.get("tool_choice", "auto")
            fn = choice.get("function") if isinstance(choice, dict) else None
            named = fn.get("name") if isinstance(fn, dict) else None
            if isinstance(choice, dict) and not isinstance(named, str):
                raise UsageError("'tool_choice' as an object must be {type: function, function: {name}}")
            if choice == "none":
                return None
            if choice == "required" or named is not None:
                common["grammar"] = JsonGrammar(self.rt, call_schema(tools, named), [] if common["ignore_eos"]
                                                else self.stop_ids)
            elif choice != "auto":
                raise UsageError("'tool_choice' must be none, auto, required or {type: function, function: {name}}")
        except UsageError as err:
            raise BadRequest(str(err), "tools" if "tools" in str(err) else "tool_choice") from None
        return tools

    def _grammar(self, fmt: Any, ignore_eos: bool) -> Any:
        """response_format: text (None), json_object (any object) or json_schema ({"schema": {...}}), compiled now."""
        if fmt is None or fmt == {"type": "text"}:
            return None
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_object":
            schema = None
        elif kind == "json_schema" and isinstance(fmt.get("json_schema"), dict) and isinstance(
                fmt["json_schema"].get("schema", {}), dict):
            schema = fmt["json_schema"].get("schema") or None
        else:
            raise BadRequest("'response_format' must be {type: text}, {type: json_object} or {type: json_schema, "
                             "json_schema: {name, schema}}", "response_format")
        from .runtimes.constrain import JsonGrammar

        try:
            return JsonGrammar(self.rt, schema, [] if ignore_eos else self.stop_ids)
        except UsageError as err:
            raise BadRequest(str(err), "response_format") from None

    def generate(self, req: Request, cancel: threading.Event) -> Iterator[tuple[str, dict]]:
        """(text piece, info) as decoded; the last item's info has finish_reason and usage. One request at a time
        holds the runtime (the lock), or with --parallel, the batch engine's worker runs them together."""
        if self.engine is not None:
            yield from self._answer(req, cancel, self._batched)
            return
        with self.lock:
            yield from self._answer(req, cancel, self._serial)

    def _serial(self, req: Request, ids: list[int], features: Any, seed: int, stops: list[int], cancel: Any):
        """(token, logits) from the runtime itself, after the prompt cache picked the sequence it starts from."""
        rt = self.rt
        if features is None:
            self.kept.pick(rt, ids)  # the kept sequence with the longest common prefix becomes the live one
        tokens = rt.generate(ids, req.max_tokens, temperature=req.temperature, top_p=req.top_p, seed=seed, stop=stops,
                             features=features, reuse=True, constraint=req.grammar)  # the previous request's prefix
        return ((tok, rt.last_logits) for tok in tokens), lambda: rt.reused

    def _batched(self, req: Request, ids: list[int], features: Any, seed: int, stops: list[int], cancel: Any):
        """(token, logits) from the batch engine; ``cancel`` frees the slot."""
        from .runtimes.batch import Job

        job = self.engine.submit(Job(ids, req.max_tokens, req.temperature, req.top_p, seed, frozenset(stops),
                                     req.grammar, features, cancel))
        return job.tokens(), lambda: job.reused

    def _answer(self, req: Request, cancel: threading.Event, source: Any) -> Iterator[tuple[str, dict]]:
        rt = self.rt
        t0 = time.perf_counter()
        with self.engine.busy if self.engine is not None and req.images else contextlib.nullcontext():
            ids, features = rt.prompt_ids(req.prompt, req.images, add_bos=req.add_bos)  # (images: the engine's runtime)
        first, pending = None, []  # pending: logprob entries of tokens whose text has not gone out yet
        seed = req.seed if req.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "little")
        stops = [] if req.ignore_eos else self.stop_ids
        stream = TextStream(rt.decode, stops, req.stop)  # the API's and the CLI's rule (runtimes/text.py)
        tokens, reused = source(req, ids, features, seed, stops, cancel)
        for tok, logits in tokens:
            first = first or time.perf_counter()
            if cancel.is_set():
                _log_request(len(ids), reused(), t0, first, stream.tokens, "cancelled")
                return
            if req.logprobs is not None:
                pending.append(_logprob(rt, logits, tok, req.logprobs))
            if piece := stream.push(tok):
                yield piece, _with(pending)
            if stream.finish:
                break
        cancel.set()  # (a stop string ended it early: the batch engine frees the slot)
        if stream.finish is None and (tail := stream.flush()):
            yield tail, _with(pending)
        n = stream.tokens
        if stream.finish is None and req.grammar is not None and req.grammar.done:
            stream.finish = "stop"  # the JSON value is complete
        usage = {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n,
                 "prompt_tokens_details": {"cached_tokens": reused()}}
        _log_request(len(ids), reused(), t0, first, n, stream.finish or "length")
        yield "", {"finish_reason": stream.finish or "length", "usage": usage, **_with(pending)}


def _log_request(prompt: int, cached: int, t0: float, first: float | None, tokens: int, how: str) -> None:
    """One line per request, as llama-server prints: prompt and cached tokens, time to first token, tokens/s."""
    end = time.perf_counter()
    rate = (tokens - 1) / (end - first) if first and tokens > 1 and end > first else 0.0
    log.info("request: %d prompt tokens (%d cached), first token %.0f ms, %d tokens at %.1f tok/s, %s", prompt,
             cached, 1000 * ((first or end) - t0), tokens, rate, how)


class _Handoff:
    """Items from the generation thread to the event loop. Waking the loop costs a syscall and a GIL hand-off (py-spy
    on the demo at ~3,000 tokens/s: a fifth of the generation thread's time went to ``call_soon_threadsafe``), so the
    worker wakes a waiting loop only when ``interval`` has passed since the last wake or the item ends the stream;
    items made in between go out together, as one event. A token waits at most about max(interval, one token's
    time); a model slower than ``interval`` per token streams every token as it comes."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = 0.002):
        self.loop, self.interval = loop, interval
        self.items: deque = deque()
        self.lock = threading.Lock()
        self.waiter: asyncio.Future | None = None
        self.woken = 0.0

    def put(self, item: Any, last: bool = False) -> None:
        """From the worker thread."""
        with self.lock:
            self.items.append(item)
            now = time.perf_counter()
            if self.waiter is None or (not last and now - self.woken < self.interval):
                return
            waiter, self.waiter, self.woken = self.waiter, None, now
        self.loop.call_soon_threadsafe(lambda: waiter.done() or waiter.set_result(None))

    async def get(self) -> list:
        """Everything put since the last call (waits for at least one item)."""
        while True:
            with self.lock:
                if self.items:
                    items = list(self.items)
                    self.items.clear()
                    return items
                self.waiter = waiter = self.loop.create_future()
            await waiter


async def _stream(server: Server, req: Request, kind: str, rid: str):
    """Server-sent events from the worker thread; a disconnect (the task is cancelled) stops the generation."""
    loop = asyncio.get_running_loop()
    handoff = _Handoff(loop)
    cancel = threading.Event()

    def work() -> None:
        try:
            for item in server.generate(req, cancel):
                handoff.put(item, last="finish_reason" in item[1])
        except L4ExportError as err:
            handoff.put(("", {"error": str(err)}), last=True)
        finally:
            handoff.put(None, last=True)

    streamed = [0]  # the length of the tokens' text sent so far (completions' text_offset runs across chunks)

    def event(piece: str, info: dict) -> str:
        if "error" in info:
            return f"data: {json.dumps({'error': {'message': info['error'], 'type': 'invalid_request_error'}})}\n\n"
        chunk = _chunk(kind, rid, server.name, piece, info, streamed[0])
        streamed[0] += sum(len(e["token"]) for e in info.get("logprobs", []))
        return f"data: {json.dumps(chunk)}\n\n"

    worker = loop.run_in_executor(None, work)
    try:
        done = False
        while not done:
            pieces = ""  # the text pieces taken together: one event; the last item or an error: one of its own
            for item in await handoff.get():
                if item is None:
                    done = True
                elif item[1]:
                    if pieces:
                        yield event(pieces, {})
                        pieces = ""
                    yield event(*item)
                else:
                    pieces += item[0]
            if pieces:
                yield event(pieces, {})
        yield "data: [DONE]\n\n"
    finally:
        cancel.set()  # a disconnect lands here: the worker stops at its next token and releases the model
        await asyncio.shield(worker)


class _Place:
    """One admitted request's queue place, given back once: when its stream ends, or, for a stream never started
    (the client left before the response was sent), when the stream is garbage collected."""

    def __init__(self, server: Server):
        self.server, self.held = server, True
        self.lock = threading.Lock()

    def release(self) -> None:
        with self.lock:
            held, self.held = self.held, False
        if held:
            self.server.leave()


def admitted_stream(server: Server, events):
    """``events`` holding the queue place ``server.admit()`` took, until the stream ends, the client leaves, or the
    stream is dropped unstarted (an async generator that never ran has no ``finally`` to run)."""
    place = _Place(server)

    async def stream():
        try:
            async for e in events:
                yield e
        finally:
            place.release()

    gen = stream()
    weakref.finalize(gen, place.release)
    return gen


def _tool_answer(req: Request, rid: str, name: str, items: list, streaming) -> Any:
    """A chat answer with tools offered: its calls as ``tool_calls`` (finish_reason "tool_calls"), else its text;
    streamed as one delta per call (or the text), then the finish chunk."""
    from .runtimes.tools import parse_calls

    text, info = "".join(p for p, _ in items), dict(items[-1][1])
    calls = parse_calls(text, req.tools)
    entries = [e for _, i in items for e in i.get("logprobs", [])] if req.logprobs is not None else None
    whole = _whole("chat", rid, name, text, info, entries)
    if calls is not None:
        made = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": c} for c in calls]
        whole["choices"][0]["message"] = {"role": "assistant", "content": None, "tool_calls": made}
        whole["choices"][0]["finish_reason"] = info["finish_reason"] = "tool_calls"
    if not req.stream:
        return whole

    def events():
        head = {k: whole[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
        deltas = ([{"role": "assistant", "tool_calls": [{"index": i, **c}]} for i, c in enumerate(made)]
                  if calls is not None else [{"role": "assistant", "content": text}])
        for d in deltas:
            yield f"data: {json.dumps(head | {'choices': [{'index': 0, 'delta': d, 'finish_reason': None}]})}\n\n"
        end = {"index": 0, "delta": {}, "finish_reason": info["finish_reason"]}
        yield f"data: {json.dumps(head | {'choices': [end], 'usage': info['usage']})}\n\n"
        yield "data: [DONE]\n\n"

    return streaming(events(), media_type="text/event-stream")


def _guard(limits: Limits):
    """Middleware: the API key on every route but /health; the body size before the body is read."""

    async def guard(http, call_next):
        key = limits.api_key
        if key is not None and http.url.path != "/health" and http.headers.get("authorization", "") != f"Bearer {key}":
            return _error("invalid or missing API key (Authorization: Bearer KEY)", status=401)
        size = http.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limits.max_body_bytes:
            return _error(f"the request body is {int(size)} bytes; this server takes at most {limits.max_body_bytes}",
                          status=413)
        return await call_next(http)

    return guard


def create_app(server: Server):
    from fastapi import FastAPI
    from fastapi import Request as HttpRequest
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import StreamingResponse

    app = FastAPI(title="l4export", docs_url=None, redoc_url=None)
    limits = server.limits

    app.middleware("http")(_guard(limits))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.name, "waiting": server.waiting}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": 0, "owned_by": "l4export"}]}

    async def complete(http: HttpRequest, kind: str):
        raw = await http.body()
        if len(raw) > limits.max_body_bytes:  # (a body sent without content-length)
            return _error(f"the request body is over {limits.max_body_bytes} bytes", status=413)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error("the request body is not JSON")
        try:
            req = server.parse(body, chat=kind == "chat")
        except BadRequest as err:
            return _error(str(err), err.param)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if not server.admit():
            return _error(f"{server.waiting} requests are already waiting (--max-queue {limits.max_queue}); "
                          "retry later", status=429)
        if req.stream and req.tools is None:
            return StreamingResponse(admitted_stream(server, _stream(server, req, kind, rid)), media_type="text/event-stream")
        try:  # (with tools the whole answer is needed to know whether it is a call: made, then sent)
            items = await run_in_threadpool(lambda: list(server.generate(req, threading.Event())))
        except UsageError as err:  # the request's own (a prompt longer than the context): 400
            return _error(str(err))
        except L4ExportError as err:
            return _error(str(err), status=503)
        finally:
            server.leave()
        if req.tools is not None:
            return _tool_answer(req, rid, server.name, items, StreamingResponse)
        entries = [e for _, info in items for e in info.get("logprobs", [])] if req.logprobs is not None else None
        return _whole(kind, rid, server.name, "".join(p for p, _ in items), items[-1][1], entries)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        return await complete(http, "chat")

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await complete(http, "text")

    return app


def serve(export: str, host: str = "127.0.0.1", port: int = 8080, name: str | None = None, limits: Limits = Limits(),
          **runtime_options) -> None:
    """Load the export and serve it until interrupted."""
    from pathlib import Path

    try:
        import uvicorn
    except ImportError:
        raise UsageError("l4export serve needs the serve extra: pip install 'l4export[serve]'") from None
    from .runtimes import load_runtime

    rt = load_runtime(export, **runtime_options)
    server = Server(rt, name or Path(export).resolve().name, limits)
    if limits.api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who reaches it can use it (--api-key KEY)", host)
    log.warning("serving %s as '%s' on http://%s:%d/v1", export, server.name, host, port)
    try:
        uvicorn.run(create_app(server), host=host, port=port, log_level="warning")
    finally:
        if server.engine is not None:
            server.engine.close()
