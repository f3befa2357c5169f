"""runtimes/text.py's TextStream, with a real byte-level tokenizer (the demo's): the pieces join to the decoded text,
whole UTF-8 characters only, stop strings found across pieces, constant work per token."""

from __future__ import annotations

import json

import pytest

tokenizers = pytest.importorskip("tokenizers")

from l4export.demo import byte_tokenizer_json  # noqa: E402
from l4export.runtimes.text import TextStream  # noqa: E402

EOT = 300


@pytest.fixture(scope="module")
def tok():
    return tokenizers.Tokenizer.from_str(json.dumps(byte_tokenizer_json(320)))


def _run(tok, text: str, stop_ids=(), stop_strings=(), tail=()):
    """(pieces, finish, the longest id list decode was given) for the tokens of ``text`` then ``tail``."""
    seen = []

    def decode(ids):
        seen.append(len(ids))
        return tok.decode(ids, skip_special_tokens=False)

    stream = TextStream(decode, set(stop_ids), stop_strings)
    pieces = []
    for t in tok.encode(text, add_special_tokens=False).ids + list(tail):
        pieces.append(stream.push(t))
        if stream.finish:
            break
    pieces.append(stream.flush() if stream.finish is None else "")
    return [p for p in pieces if p], stream.finish, max(seen, default=0)


def test_pieces_join_to_the_text_whole_characters_only(tok):
    text = "naïve café — 日本語 🙂 done"
    pieces, finish, longest = _run(tok, text)
    assert "".join(pieces) == text and finish is None
    assert all("\ufffd" not in p for p in pieces)
    assert longest <= 4  # a character's bytes at most: no token is decoded twice with the whole text


def test_stop_string_across_tokens_ends_the_text_before_it(tok):
    pieces, finish, _ = _run(tok, "a = 1\n\nb = 2", stop_strings=["\n\n"])
    assert "".join(pieces) == "a = 1" and finish == "stop"


def test_a_stop_string_prefix_that_does_not_complete_is_shown(tok):
    pieces, finish, _ = _run(tok, "x\ny\n", stop_strings=["\n\n"])
    assert "".join(pieces) == "x\ny\n" and finish is None  # the held "\n" comes out at the end


def test_stop_token_ends_the_text_and_releases_what_was_held(tok):
    pieces, finish, _ = _run(tok, "end\n", stop_ids=[EOT], stop_strings=["\n\n"], tail=[EOT, 65])
    assert "".join(pieces) == "end\n" and finish == "stop"


def test_tokens_count_excludes_the_stop_token(tok):
    stream = TextStream(lambda ids: tok.decode(ids), {EOT})
    for t in [72, 105, EOT]:
        stream.push(t)
    assert stream.tokens == 2 and stream.finish == "stop" and stream.push(72) == ""
