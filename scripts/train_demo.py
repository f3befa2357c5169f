"""Train the built-in demo model: a tiny Scout-shaped Llama 4 MoE that writes Python-like text.

    python scripts/train_demo.py [--steps 3000] [--batch 16]     (needs torch + transformers; ~15 min on 2 cores)

The architecture is ``l4export.demo.DEMO_TEXT_CONFIG`` (multimodal layout at export time; 16 experts, top-1, qk-norm,
llama3 RoPE scaling, a NoPE layer every 4th, chunked attention of 32), trained with transformers' own
``Llama4ForCausalLM`` on the bytes of this Python's standard library (PSF license): half of each batch raw source
windows, half chat turns built from its functions (the user gives a function's signature and docstring, the assistant
answers with its body), in Llama 4's turn format, so that both ``l4export run`` and ``l4export chat`` print code.
The MoE block runs sparsely while training (each token through its top-1 expert: the same maths as transformers'
dense all-expert form); evaluation is transformers' unmodified forward.

Writes ``l4export/demo_weights.safetensors``: the canonical tensors (names.py) in bfloat16, which
``l4export demo-checkpoint`` turns into a checkpoint with numpy alone. Deterministic for a given torch build.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from l4export.demo import BOS, EOT, demo_config  # noqa: E402

SEQ = 256
OUT = ROOT / "l4export" / "demo_weights.safetensors"
HEADER = {"user": b"<|header_start|>user<|header_end|>\n\n", "assistant": b"<|header_start|>assistant<|header_end|>\n\n"}


def sources() -> list[tuple[str, bytes]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [(p.name, p.read_bytes()) for p in sorted(stdlib.glob("*.py")) if p.is_file()]


def chat_samples(files: list[tuple[str, bytes]]) -> list[tuple[str, str]]:
    """(signature + docstring, body) of the standard library's functions of 3 to 30 lines."""
    out = []
    for _, src in files:
        try:
            text = src.decode("utf-8")
            tree = ast.parse(text)
        except (SyntaxError, UnicodeDecodeError):
            continue
        lines = text.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not 3 <= node.end_lineno - node.lineno <= 30:
                continue
            body = node.body[1:] if ast.get_docstring(node) and len(node.body) > 1 else node.body
            head = "\n".join(lines[node.lineno - 1 : body[0].lineno - 1]).strip()
            code = "\n".join(lines[body[0].lineno - 1 : node.end_lineno])
            if head and code.strip():
                out.append((head, code))
    return out


def encode_chat(head: str, body: str) -> list[int]:
    """Llama 4's turn format with the byte tokenizer's ids: specials as ids, text as bytes."""
    from l4export.demo import SPECIALS

    ids = {s: 256 + i for i, s in enumerate(SPECIALS)}
    seq = [BOS]
    for role, text in (("user", f"Write the body of:\n{head}"), ("assistant", body)):
        seq += [ids["<|header_start|>"]] + list(role.encode()) + [ids["<|header_end|>"]] + list(b"\n\n")
        seq += list(text.encode()) + [EOT]
    return seq


def batch_of(rng: np.random.Generator, data: np.ndarray, chats: list[list[int]], n: int) -> np.ndarray:
    """n rows of BOS + SEQ ids: half raw source windows, half chat samples (padded with more source)."""
    rows = []
    for i in range(n):
        if i % 2 and chats:
            row = chats[int(rng.integers(len(chats)))][: SEQ + 1]
        else:
            row = [BOS]
        s = int(rng.integers(0, len(data) - SEQ))
        row = row + data[s : s + SEQ + 1 - len(row)].tolist()
        rows.append(row[: SEQ + 1])
    return np.array(rows, np.int64)


def config():
    from transformers import Llama4TextConfig

    text = dict(demo_config()["text_config"])
    rs = text.pop("rope_scaling")
    text["rope_parameters"] = {"rope_theta": text.pop("rope_theta"), **rs}
    for key in ("model_type", "torch_dtype"):
        text.pop(key, None)
    cfg = Llama4TextConfig(**text, initializer_range=0.02)
    cfg._attn_implementation = "sdpa"
    return cfg


def train(steps: int, batch: int, lr: float, seed: int = 0):
    import torch
    from transformers import Llama4ForCausalLM
    from transformers.models.llama4 import modeling_llama4

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_quant_quality import _sparse_moe_forward, adamw_cosine, train_step

    torch.manual_seed(seed)
    files = sources()
    data = np.frombuffer(b"\n".join(src for _, src in files), np.uint8).astype(np.int64)
    chats = [encode_chat(h, b) for h, b in chat_samples(files)]
    rng = np.random.default_rng(seed)
    model = Llama4ForCausalLM(config()).float().train()
    opt, sched = adamw_cosine(model, lr, steps, floor=0.05)
    modeling_llama4.Llama4TextMoe.forward = _sparse_moe_forward
    t0 = time.perf_counter()
    for step in range(steps):
        ids = torch.from_numpy(batch_of(rng, data, chats, batch))
        loss = train_step(model, opt, sched, ids)
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}/{steps} loss {loss:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return model, {"steps": steps, "batch": batch, "seq": SEQ, "lr": lr, "seed": seed, "chat_samples": len(chats),
                   "train_seconds": round(time.perf_counter() - t0, 1), "final_loss": round(loss.item(), 4)}


def save(model, info: dict) -> None:
    """The canonical tensors (stacked experts [E, out, in]) in bfloat16."""
    import ml_dtypes
    import torch

    from l4export.names import canonical_shapes
    from l4export.outputs import PendingTensor, write_safetensors
    from l4export.spec import spec_from_config

    spec = spec_from_config(demo_config())
    params = {n: p.detach().float() for n, p in model.named_parameters()}
    bf16 = np.dtype(ml_dtypes.bfloat16)

    def canonical(name: str) -> np.ndarray:
        if ".experts." in name:
            pre, which = name.rsplit(".", 1)
            if which == "down_proj":
                return params[f"{pre}.down_proj"].transpose(1, 2).numpy()
            gate_up = params[f"{pre}.gate_up_proj"]
            half = gate_up.shape[-1] // 2
            part = gate_up[..., :half] if which == "gate_proj" else gate_up[..., half:]
            return part.transpose(1, 2).numpy()
        return params[name].numpy()

    with torch.no_grad():
        pending = [PendingTensor(n, shape, bf16, lambda n=n: canonical(n).astype(bf16))
                   for n, shape in canonical_shapes(spec).items()]
        write_safetensors(OUT, pending, metadata={"l4export": "demo", "train": json.dumps(info)})
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.1f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    model, info = train(args.steps, args.batch, args.lr)
    save(model, info)


if __name__ == "__main__":
    main()
