"""Prompt reuse (issue 28): a runtime keeps its sequence and a new prompt starts from the longest prefix the cache holds
(``Runtime.reuse``, ``generate(..., reuse=True)``), with the logits and greedy tokens of a cold run. The tiny models'
attention chunk is 8 tokens: prefixes ending inside the current chunk, on a boundary, and in an earlier chunk (the
chunked layers no longer hold it: it runs again from its start)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from l4export.runtimes import load_runtime

sys.path.insert(0, str(Path(__file__).parent))
from builders import build  # noqa: E402

FORMATS = ["onnx", pytest.param("mlx", marks=pytest.mark.mlx)]
RNG = np.random.default_rng(7)
A = [1] + RNG.integers(4, 300, 20).tolist()  # 21 tokens: 2 chunks and 5 more


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    """head_dim 20: the ONNX export's plain-op attention, whose cache holds exactly the valid rows."""
    return build(tmp_path_factory.mktemp("plain") / "ckpt", "scout", head_dim=20)


def _cold(rt, ids: list[int]) -> np.ndarray:
    return rt.logits(ids)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("keep", [19, 16, 11, 3])  # inside the current chunk, on its boundary, an earlier chunk
def test_a_reused_prefix_gives_a_cold_runs_logits(fmt, keep, scout, export):
    rt = load_runtime(export(scout, fmt))
    new = A[:keep] + RNG.integers(4, 300, 6).tolist()
    cold = _cold(rt, new)
    list(rt.generate(A, 3))  # the cache now holds A and two generated tokens
    start = rt.reuse(new)
    chunk = rt.spec.attention_chunk_size
    assert start == (keep if keep >= (len(A) + 2) // chunk * chunk else keep // chunk * chunk)
    warm = rt.forward(new[start:])
    np.testing.assert_allclose(warm, cold[start:], rtol=0, atol=1e-5 * np.abs(cold).max())


def test_plain_attention_cache_is_cut_too(plain, export):
    rt = load_runtime(export(plain, "onnx"))
    assert rt.plain
    for keep in (19, 16, 11):
        new = A[:keep] + [5, 6, 7]
        cold = _cold(rt, new)
        list(rt.generate(A, 3))
        start = rt.reuse(new)
        np.testing.assert_allclose(rt.forward(new[start:]), cold[start:], rtol=0, atol=1e-5 * np.abs(cold).max())


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_second_turn_generates_what_a_cold_run_does(fmt, scout, export):
    rt = load_runtime(export(scout, fmt))
    first = list(rt.generate(A, 6, stop=[]))
    turn2 = A + first[:-1] + [17, 18, 19, 20]  # the reply as the cache holds it, then the next message
    cold = list(rt.generate(turn2, 8, stop=[]))
    list(rt.generate(A, 6, stop=[]))
    warm = list(rt.generate(turn2, 8, stop=[], reuse=True))
    assert warm == cold and rt.reused >= 16  # two whole chunks of the history were not run again


def test_what_cannot_be_reused_is_run_cold(scout, export):
    rt = load_runtime(export(scout, "onnx"), kv_dtype="int8")  # the scales follow the whole history
    list(rt.generate(A, 2))
    list(rt.generate(A + [9, 9], 2, reuse=True))
    assert rt.reused == 0
    rt = load_runtime(export(scout, "onnx"))
    list(rt.generate(A, 2))
    list(rt.generate(A, 1, reuse=True))  # the same prompt: only its last token runs again, for its logits
    assert rt.reused == len(A) - 1
    list(rt.generate([1, 99, 98], 2, reuse=True))  # only BOS in common, in a chunk the chunked layers no longer hold
    assert rt.reused == 0
    list(rt.generate(A, 2, reuse=True))
    assert rt.reused == 1  # BOS, in the chunk the cache holds
    # image features replace the <|patch|> tokens' embeddings: ids no longer say what the cache holds
    from l4export.image import image_token_ids

    processed = rt.process_images([RNG.integers(0, 255, (56, 56, 3)).astype(np.uint8)])
    ids = [1, *image_token_ids(processed[0].grid, rt.vision.tokens_per_tile, rt.image_token_ids()), 5, 6]
    list(rt.generate(ids, 2, features=rt.image_features(processed)))
    list(rt.generate(ids, 2, reuse=True))
    assert rt.reused == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_snapshot_restores_a_sequence_exactly(fmt, scout, export):
    rt = load_runtime(export(scout, fmt))
    list(rt.generate(A, 4, stop=[]))
    snap = rt.snapshot()
    held = list(rt.history)
    list(rt.generate([1, 7, 7, 7, 7], 3, stop=[]))  # another conversation overwrites the cache
    rt.restore(snap)
    assert rt.history == held and rt.pos == len(held)
    new = held + [11, 12, 13]
    start = rt.reuse(new)
    assert start == len(held)
    np.testing.assert_allclose(rt.forward(new[start:]), _cold(rt, new)[start:], rtol=0, atol=1e-5 * 50)


def test_the_server_keeps_alternating_conversations(scout, export):
    """Two conversations taking turns: each finds its own prefix in the prompt cache (the Server, no HTTP)."""
    from l4export.serve import Limits, PromptCache, Server

    rt = load_runtime(export(scout, "onnx"))
    server = Server(rt, "x", Limits(prompt_cache=2))
    one, two = A, [1] + RNG.integers(4, 300, 19).tolist()
    for ids in (one, two):
        server.kept.pick(rt, ids)
        list(rt.generate(ids, 2, reuse=True))
    server.kept.pick(rt, one + [5, 6])
    list(rt.generate(one + [5, 6], 2, reuse=True))
    assert rt.reused == len(one)  # conversation one came back from the cache
    assert [len(s.ids) for s in server.kept.items] == [len(two) + 1]  # and two waits there
    assert isinstance(server.kept, PromptCache)


@pytest.mark.mlx
def test_a_bfloat16_mlx_snapshot_round_trips(scout, export):
    """The MLX runtime's default dtype for a bf16 checkpoint is bf16, which numpy cannot hold: snapshots stay in MLX."""
    rt = load_runtime(export(scout, "mlx", dtype="bfloat16"))
    list(rt.generate(A, 3, stop=[]))
    snap = rt.snapshot()
    assert snap is not None and snap.nbytes > 0
    list(rt.generate([1, 9, 9], 2, stop=[]))
    rt.restore(snap)
    assert rt.reuse(list(snap.ids) + [4]) == len(snap.ids)


def test_a_failed_step_leaves_history_and_cache_agreeing(scout, export, monkeypatch):
    rt = load_runtime(export(scout, "onnx"))
    list(rt.generate(A, 2, stop=[]))
    held = list(rt.history)

    def boom(*a, **k):
        raise RuntimeError("engine failure")

    monkeypatch.setattr(rt, "_step", boom)
    with pytest.raises(Exception, match="engine failure"):  # (an ExportError line for the caller)
        rt.forward([5, 6, 7])
    assert rt.history == held and rt.pos == len(held)
