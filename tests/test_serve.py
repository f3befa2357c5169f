"""``l4export serve`` with the official ``openai`` client, against a real server started on a free local port, and
``rt.chat`` / ``l4export chat`` beside it: same text for the same seed, streamed or not, concurrent clients that do
not share a KV cache, a client that disconnects, bad requests that get a 400 and leave the server serving."""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from l4export.cli import main
from l4export.runtimes import load_runtime

openai = pytest.importorskip("openai")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(export, scout, tmp_path_factory):
    """(base URL, model name, export) of a server running in its own process for the module."""
    out = export(scout, "onnx")
    log = tmp_path_factory.mktemp("serve") / "server.log"
    proc, url = _start(out, log)
    yield url, "tiny-scout", out
    proc.terminate()
    proc.wait(timeout=30)


def _start(out: Path, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """``l4export serve`` on a free port in its own process, once it answers /health."""
    port = _free_port()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "l4export.cli", "serve", str(out), "--port", str(port),
                                 "--name", "tiny-scout", *extra], stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            return proc, url
        except (urllib.error.URLError, ConnectionError):
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"the server did not start: {log.read_text()}")


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key="not-needed", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def rt(served):
    return load_runtime(served[2])


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny-scout"]


def test_chat_completion_equals_rt_chat(client, rt):
    want = "".join(rt.chat(MESSAGES, 12, temperature=0.8, seed=7))
    r = client.chat.completions.create(model="tiny-scout", messages=MESSAGES, max_tokens=12, temperature=0.8, seed=7)
    assert r.choices[0].message.content == want and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens == len(rt.prompt_ids(_render(rt), add_bos=False)[0])
    stream = client.chat.completions.create(model="tiny-scout", messages=MESSAGES, max_tokens=12, temperature=0.8,
                                            seed=7, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want


def _render(rt) -> str:
    from l4export.runtimes.chat import render

    return render(rt, MESSAGES)


def test_completion_equals_generate_text(client, rt):
    from l4export.runtimes.chat import stop_ids

    want = "".join(rt.generate_text("def main(", 10, temperature=0.0, stop=sorted(stop_ids(rt))))
    r = client.completions.create(model="tiny-scout", prompt="def main(", max_tokens=10, temperature=0)
    assert r.choices[0].text == want


def test_image_part_is_preprocessed_like_the_runtime(client, rt):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 130, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is it?"}]}]
    r = client.chat.completions.create(model="tiny-scout", messages=msgs, max_tokens=6, temperature=0)
    ours = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    assert r.choices[0].message.content == "".join(rt.chat(ours, 6, images=[img], temperature=0))


def test_the_next_turn_reuses_the_cached_prefix(client, rt):
    """Turn 2 of a conversation starts from the cache turn 1 left: usage says how many prompt tokens were cached, and
    the reply is a cold run's."""
    turn1 = [{"role": "user", "content": "Tell me about the sea, the waves and the wind over them."}]
    r1 = client.chat.completions.create(model="tiny-scout", messages=turn1, max_tokens=8, temperature=0)
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "And the rain?"}]
    r2 = client.chat.completions.create(model="tiny-scout", messages=turn2, max_tokens=8, temperature=0)
    cold = load_runtime(rt.path)  # a fresh runtime: nothing cached
    assert r2.choices[0].message.content == "".join(cold.chat(turn2, 8, temperature=0)) and cold.reused == 0
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= rt.spec.attention_chunk_size and cached < r2.usage.prompt_tokens, r2.usage


def concurrently(run, args) -> None:
    """``run(a)`` for every ``a`` in ``args``, each in its own thread, all at once; returns when all are done."""
    threads = [threading.Thread(target=run, args=(a,)) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)


def test_concurrent_streams_do_not_share_a_cache(client, rt):
    prompts = [[{"role": "user", "content": f"Count to {n}."}] for n in (3, 9)]
    want = ["".join(rt.chat(m, 16, temperature=0)) for m in prompts]
    got: list[str | None] = [None, None]

    def run(i: int) -> None:
        s = client.chat.completions.create(model="tiny-scout", messages=prompts[i], max_tokens=16, temperature=0,
                                           stream=True)
        got[i] = "".join(c.choices[0].delta.content or "" for c in s if c.choices)

    concurrently(run, range(2))
    assert got == want


def test_disconnect_mid_stream_frees_the_model(served, client):
    url = served[0]
    body = json.dumps({"model": "tiny-scout", "messages": MESSAGES, "max_tokens": 2000, "stream": True,
                       "temperature": 0}).encode()
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        first = resp.readline()  # one event, then hang up
    assert first.startswith(b"data: ")
    r = client.chat.completions.create(model="tiny-scout", messages=MESSAGES, max_tokens=4, temperature=0)
    assert r.choices[0].message.content is not None  # the model was released, not held by the dead stream


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (json.dumps({"model": "tiny-scout"}).encode(), "messages"),
    (json.dumps({"model": "tiny-scout", "messages": "hi"}).encode(), "messages"),
    (json.dumps({"model": "tiny-scout", "messages": MESSAGES, "max_tokens": 0}).encode(), "max_tokens"),
    (json.dumps({"model": "tiny-scout", "messages": MESSAGES, "max_tokens": "8"}).encode(), "max_tokens"),
    (json.dumps({"model": "tiny-scout", "messages": MESSAGES, "temperature": -1}).encode(), "temperature"),
    (json.dumps({"model": "tiny-scout", "messages": MESSAGES, "top_p": 2}).encode(), "top_p"),
    (json.dumps({"model": "gpt-9", "messages": MESSAGES}).encode(), "model"),
    (json.dumps({"model": "tiny-scout", "messages": MESSAGES, "n": 2}).encode(), "n"),
    (json.dumps({"model": "tiny-scout", "messages": [{"role": "user", "content": [{"type": "audio"}]}]}).encode(),
     "messages"),
])
def test_bad_requests_get_a_400_and_the_server_keeps_serving(served, client, body, param):
    req = urllib.request.Request(f"{served[0]}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400
    error = json.loads(err.value.read())["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert client.models.list().data[0].id == "tiny-scout"


def test_chat_command_keeps_the_conversation(served, rt, tmp_path):
    """l4export chat: two turns, then /reset and the first turn again gives the first answer again."""
    r = CliRunner().invoke(main, ["chat", str(served[2]), "-n", "6"], input="Hello\nAgain\n/reset\nHello\n")
    assert r.exit_code == 0, r.output
    first = "".join(rt.chat([{"role": "user", "content": "Hello"}], 6))
    lines = r.output.splitlines()
    assert lines[0] == first and "(conversation reset)" in lines and lines[-1] == first


def test_run_stops_at_end_of_turn_unless_told_not_to(rt):
    from l4export.runtimes.chat import stop_ids

    eot = rt.tokenizer.token_to_id("<|eot|>")
    assert eot in stop_ids(rt) and set(rt.spec.eos_token_ids) <= stop_ids(rt)
    r = CliRunner().invoke(main, ["run", str(rt.path), "--ids", "1,2,3", "-n", "3", "--ignore-eos"])
    assert r.exit_code == 0 and len(r.output.split()) == 3


def test_serve_without_a_real_export_is_one_line(tmp_path):
    r = CliRunner().invoke(main, ["serve", str(tmp_path)])
    assert r.exit_code == 2 and "not an l4export export" in r.stderr
    assert Path(tmp_path).exists()


@pytest.fixture(scope="module")
def guarded(export, scout, tmp_path_factory):
    """A second server with an API key and small limits: (URL, log file)."""
    log = tmp_path_factory.mktemp("guarded") / "server.log"
    proc, url = _start(export(scout, "onnx"), log, "--api-key", "sesame", "--max-tokens", "4096",
                       "--max-body-bytes", "4096", "--max-queue", "0")
    yield url, log
    proc.terminate()
    proc.wait(timeout=30)


def _status(url: str, body: bytes | None = None, key: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_api_key_limits_health_and_the_request_log(guarded):
    url, log = guarded
    assert _status(f"{url}/health")[0] == 200  # no key needed
    code, err = _status(f"{url}/v1/models")
    assert code == 401 and err["error"]["type"] == "authentication_error"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0, timeout=120)
    r = client.chat.completions.create(model="tiny-scout", messages=MESSAGES, max_tokens=4, temperature=0)
    assert r.usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    code, err = _status(f"{url}/v1/chat/completions", json.dumps({"messages": MESSAGES, "max_tokens": 4097}).encode(),
                        "sesame")
    assert code == 400 and err["error"]["param"] == "max_tokens"
    code, err = _status(f"{url}/v1/chat/completions", json.dumps({"messages": MESSAGES, "pad": "x" * 5000}).encode(),
                        "sesame")
    assert code == 413 and "4096" in err["error"]["message"]
    for _ in range(50):  # the request line is written after the answer
        if "request:" in log.read_text():
            break
        time.sleep(0.1)
    line = next(ln for ln in log.read_text().splitlines() if "request:" in ln)
    assert "prompt tokens" in line and "cached" in line and "first token" in line and "tok/s" in line


def test_a_full_queue_gets_a_429(guarded):
    """--max-queue 0: one request runs, a second one at the same time is told to come back."""
    url, _ = guarded
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0, timeout=120)
    stream = client.chat.completions.create(model="tiny-scout", messages=MESSAGES, max_tokens=4096, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})  # seconds of tokens
    first = next(iter(stream))  # the stream holds its place until it ends
    code, err = _status(f"{url}/v1/chat/completions", json.dumps({"messages": MESSAGES, "max_tokens": 2}).encode(),
                        "sesame")
    assert first is not None and code == 429 and err["error"]["type"] == "rate_limit_error"
    stream.close()


def test_logprobs_are_the_models_own(client, rt):
    """Chat logprobs (with top_logprobs) and completions logprobs, streamed and not, against the runtime's logits."""
    r = client.chat.completions.create(model="tiny-scout", messages=MESSAGES, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(e.top_logprobs) == 3 for e in content)
    assert all(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob for e in content)
    assert all(abs(e.logprob - e.top_logprobs[0].logprob) < 1e-9 for e in content)  # greedy: the best one
    # the first token's against the runtime: log_softmax of the prompt's last logits
    ids, _ = rt.prompt_ids(_render(rt), add_bos=False)
    x = rt.logits(ids)[-1].astype(np.float64)
    lp = x - x.max() - np.log(np.exp(x - x.max()).sum())
    assert abs(content[0].logprob - lp.max()) < 1e-4
    s = client.chat.completions.create(model="tiny-scout", messages=MESSAGES, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=3, stream=True)
    streamed = [e for c in s if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    # (the second request reuses the first one's prompt from the prompt cache: the same logits within 1e-5)
    assert np.allclose([e.logprob for e in streamed], [e.logprob for e in content], rtol=0, atol=1e-5)
    c = client.completions.create(model="tiny-scout", prompt="def main(", max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == c.usage.completion_tokens
    assert all(len(t) <= 2 for t in lp.top_logprobs) and "".join(lp.tokens).startswith(c.choices[0].text[:1])
    # streamed, each token's text_offset continues from the chunks before it: the same offsets as the whole answer
    # (JSON keeps this random model to one-byte characters, so its tokens stream as chunks of their own)
    ask = dict(model="tiny-scout", prompt="def main(", max_tokens=12, temperature=0, logprobs=1,
               extra_body={"response_format": {"type": "json_object"}})
    whole = client.completions.create(**ask)
    s = client.completions.create(**ask, stream=True)
    chunks = [c.choices[0].logprobs for c in s if c.choices and c.choices[0].logprobs]
    assert len(chunks) >= 2 and [o for ch in chunks for o in ch.text_offset] == whole.choices[0].logprobs.text_offset
    code, err = _status(f"{client.base_url}chat/completions".replace("/v1/chat", "/v1/chat"),
                        json.dumps({"messages": MESSAGES, "top_logprobs": 3}).encode())
    assert code == 400 and err["error"]["param"] == "top_logprobs"


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                              "maximum": 99},
                                           "colour": {"enum": ["red", "green", "blue"]}},
          "required": ["ok", "n", "colour"], "additionalProperties": False}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_answers_parse_and_validate(client, temperature):
    """response_format json_schema: the answer is the schema's, greedy or sampled (a random model left to itself
    writes no JSON at all)."""
    for seed in range(3):
        r = client.chat.completions.create(model="tiny-scout", messages=MESSAGES, max_tokens=64, temperature=temperature,
                                           seed=seed, response_format={"type": "json_schema", "json_schema": {
                                               "name": "answer", "schema": SCHEMA}})
        value = json.loads(r.choices[0].message.content)
        assert set(value) == {"ok", "n", "colour"} and isinstance(value["ok"], bool)
        assert isinstance(value["n"], int) and 0 <= value["n"] <= 99 and value["colour"] in ("red", "green", "blue")
        assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="tiny-scout", messages=MESSAGES, max_tokens=200, temperature=0,
                                       response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "length" or isinstance(json.loads(r.choices[0].message.content), dict)


def test_a_bad_response_format_is_a_400(served):
    for fmt in ({"type": "xml"}, {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}):
        code, err = _status(f"{served[0]}/v1/chat/completions",
                            json.dumps({"messages": MESSAGES, "response_format": fmt}).encode())
        assert code == 400 and err["error"]["param"] == "response_format", err


def test_required_and_named_tool_choice_always_call_a_tool(client):
    """tool_choice required / a named function: the answer is a call whose arguments match the tool's schema (a
    random model would never write one), streamed as tool_call deltas too; then a role: tool turn goes back in."""
    from test_tools import TOOLS

    for choice, want in (("required", {"weather", "time"}), ({"type": "function", "function": {"name": "time"}},
                                                               {"time"})):
        for temperature in (0.0, 1.0):
            r = client.chat.completions.create(model="tiny-scout", messages=MESSAGES, tools=TOOLS, tool_choice=choice,
                                               max_tokens=64, temperature=temperature, seed=3)
            call = r.choices[0].message.tool_calls[0]
            args = json.loads(call.function.arguments)
            assert r.choices[0].finish_reason == "tool_calls" and call.function.name in want and call.id
            assert (set(args) == {"city", "days"} and args["city"] in ("Oslo", "Lima") and 1 <= args["days"] <= 7
                    if call.function.name == "weather" else args["zone"] in ("UTC", "CET"))
    stream = client.chat.completions.create(model="tiny-scout", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                            max_tokens=64, temperature=0, stream=True)
    chunks = list(stream)
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].function.name in ("weather", "time") and deltas[0].id
    assert isinstance(json.loads(deltas[0].function.arguments), dict)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    follow = MESSAGES + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "12:00"}]
    r = client.chat.completions.create(model="tiny-scout", messages=follow, tools=TOOLS, max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    r = client.chat.completions.create(model="tiny-scout", messages=MESSAGES, tools=TOOLS, tool_choice="none",
                                       max_tokens=4, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content is not None


def test_tool_prompts_carry_the_tools(rt):
    from test_tools import WEATHER

    from l4export.runtimes.chat import render

    text = render(rt, MESSAGES, tools=[WEATHER])
    assert '"name": "weather"' in text and text.index("weather") < text.index("Say something.")
    back = render(rt, MESSAGES + [{"role": "tool", "content": "sunny"}])
    assert "<|header_start|>ipython<|header_end|>" in back


def test_a_stream_gives_its_queue_place_back_once_even_unstarted(rt):
    """A streamed request holds its queue place until its stream ends; a stream never started (the client left
    before the response was sent: an async generator that never ran has no finally) gives it back when dropped,
    and a finished one gives it back exactly once."""
    import asyncio
    import gc

    from l4export.serve import Server, admitted_stream

    server = Server(rt, "demo")

    async def events():
        yield "a"
        yield "b"

    assert server.admit() and server.waiting == 1
    dropped = admitted_stream(server, events())
    del dropped
    gc.collect()
    assert server.waiting == 0

    async def drain(gen) -> list:
        return [e async for e in gen]

    assert server.admit()
    gen = admitted_stream(server, events())
    assert asyncio.run(drain(gen)) == ["a", "b"] and server.waiting == 0
    del gen
    gc.collect()
    assert server.waiting == 0  # not given back twice
