"""The Llama 4 decoder layer in torch, float32: transformers' ``Llama4TextDecoderLayer`` re-implemented from the spec.

This is l4export's one torch copy of the layer. Calibration (``quant/calib/``) runs it in pieces, with a capture
hook on the input of every linear; ``layer_forward`` is the whole layer. The tests hold it to transformers' own
decoder layers (``runtimes/reference.py``, which runs the transformers model itself and copies none of this).
torch is imported inside the functions, so importing this module needs no torch.
"""

from __future__ import annotations

from typing import Callable

from .spec import LayerSpec, Llama4Spec


def rms(x, w, eps: float):
    """RMSNorm over the last axis, times the weight ``w``."""
    import torch

    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def attention_core(h, W: dict, la: LayerSpec, spec: Llama4Spec, inv_freq):
    """h [T, H] (already input_layernorm'ed) -> attention output before o_proj [T, nh*D]."""
    import torch

    t = h.shape[0]
    nh, nkv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    q = linear(h, W, "self_attn.q_proj.weight").view(t, nh, d)  # (T, nh, D)
    k = linear(h, W, "self_attn.k_proj.weight").view(t, nkv, d)  # (T, nkv, D)
    v = linear(h, W, "self_attn.v_proj.weight").view(t, nkv, d)
    pos = torch.arange(t, device=h.device, dtype=torch.float32)
    if la.uses_rope:
        # IMPORTANT: complex, interleaved pairs (2i, 2i+1) ("traditional"), not rotate_half.
        ang = pos[:, None] * inv_freq[None, :]  # (T, D/2)
        cos, sin = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]

        def rot(x):
            x0, x1 = x[..., 0::2], x[..., 1::2]
            return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)

        q, k = rot(q), rot(k)
    if la.qk_norm:  # IMPORTANT: weightless per-head L2 norm, after RoPE, eps = rms_norm_eps
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + spec.rms_norm_eps)
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + spec.rms_norm_eps)
    if la.temperature_tuning:  # NoPE layers: q *= 1 + attn_scale·log1p(floor((pos+1)/floor_scale))
        temp = torch.log1p(torch.floor((pos + 1.0) / spec.floor_scale)) * spec.attn_scale + 1.0
        q = q * temp[:, None, None]
    rep = nh // nkv
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (T, nh, D)
    scores = torch.einsum("qhd,khd->hqk", q, k) * d**-0.5  # (nh, T, T)
    i = torch.arange(t, device=h.device)
    allowed = i[None, :] <= i[:, None]
    if la.chunked and spec.attention_chunk_size:
        c = spec.attention_chunk_size
        allowed = allowed & (i[None, :] // c == i[:, None] // c)
    scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", p, v).reshape(t, nh * d)


def route(h2, W: dict, k: int = 1):
    """Top-k routing: (expert indices [T, k], scores s [T, k]) with s = sigmoid(logit) of each chosen expert."""
    import torch

    logits = linear(h2, W, "feed_forward.router.weight")  # (T, E)
    if k == 1:
        top, idx = logits.max(dim=-1, keepdim=True)
    else:
        top, idx = torch.topk(logits, k, dim=-1)
    return idx, torch.sigmoid(top)


def routed_inputs(h2, idx, s, e: int):
    """The rows of the tokens that chose expert ``e`` (any rank) and its input s_e * h2 there: ([n], [n, H]).
    IMPORTANT: the router score scales the expert INPUT."""
    hit = idx == e  # [T, k]
    rows = hit.any(dim=-1).nonzero(as_tuple=True)[0]
    return rows, h2[rows] * (s * hit).sum(dim=-1)[rows, None]


def attention_block(x, W: dict, la: LayerSpec, spec: Llama4Spec, inv_freq, cap: Callable):
    """x [T, H] -> (x + attention [T, H], h2 = post_attention_layernorm of it [T, H])."""
    h = rms(x, W["input_layernorm.weight"], spec.rms_norm_eps)
    cap("self_attn.q_proj.weight", -1, h)
    a = attention_core(h, W, la, spec, inv_freq)
    cap("self_attn.o_proj.weight", -1, a)
    x = x + linear(a, W, "self_attn.o_proj.weight")
    return x, rms(x, W["post_attention_layernorm.weight"], spec.rms_norm_eps)


def mlp(h2, W: dict, p: str, cap: Callable):
    """SwiGLU MLP ``p`` (the dense MLP or the shared expert) on h2 [T, H] -> [T, H]."""
    import torch.nn.functional as F

    cap(p + "gate_proj.weight", -1, h2)
    m = F.silu(linear(h2, W, p + "gate_proj.weight"))
    m *= linear(h2, W, p + "up_proj.weight")
    cap(p + "down_proj.weight", -1, m)
    return linear(m, W, p + "down_proj.weight")


class RowBuffer:
    """One float32 buffer that 16-bit weight rows are made float32 in, reused call after call. A fresh ``.float()``
    of each 2048-row step (42 MB at Scout width) is a fresh mapping, faulted in page by page: in calibration's
    expert Hessian pass that was 2.6 M page faults and 40% of the time. Rows already float32 (float32 weights, or
    rows a ``_Dequantized`` made) are returned as they are."""

    def __init__(self):
        self._buf = None

    def rows(self, w, a: int, b: int):
        """w[a:b] as float32, valid until the next call."""
        import torch

        part = w[a:b]
        if part.dtype == torch.float32:
            return part
        n = part.numel()
        if self._buf is None or self._buf.numel() < n or self._buf.device != part.device:
            self._buf = torch.empty(n, dtype=torch.float32, device=part.device)
        return self._buf[:n].view(part.shape).copy_(part)


def expert_hidden(xe, gate, up, rows: int = 2048, buf: RowBuffer | None = None):
    """One routed expert's intermediate silu(G xe) ⊙ (U xe): xe [n, H], gate/up [I, H] -> [n, I], float32.

    gate/up may be held in a 16-bit float (calibration keeps a real-width expert as stored: 84 MB each in bf16,
    168 MB in float32): they are made float32 ``rows`` of I at a time, in ``buf`` (a caller calling again and again
    passes one)."""
    import torch.nn.functional as F

    buf = buf or RowBuffer()
    out = xe.new_empty((xe.shape[0], gate.shape[0]))
    for a in range(0, gate.shape[0], rows):
        g = F.silu(xe @ buf.rows(gate, a, a + rows).T)  # (before ``buf`` is refilled with up's rows)
        out[:, a : a + rows] = g * (xe @ buf.rows(up, a, a + rows).T)
    return out


ROW_BYTES = 32 << 20  # times_t's default step: output rows of at most 32 MB of float32 weights at a time


def linear(x, W, name: str):
    """x @ W[name].T -> [T, out] float32. ``W[name]`` is a float32 tensor or anything ``times_t`` reads:
    calibration's weights (``calib.weights._Weights``) hand out matrices as stored (16-bit, or quantized codes) and a
    buffer ``W.buf`` to make their rows float32 in, so that a 16384-wide one is never float32 whole (0.34 GB)."""
    return times_t(x, W[name], buf=getattr(W, "buf", None))


def times_t(x, w, rows: int | None = None, buf: RowBuffer | None = None):
    """x @ w.T for x [n, in], w [out, in] in any float dtype (or anything sliced into float rows), made float32
    ``rows`` output rows at a time (default: ``ROW_BYTES`` of them) -> [n, out] float32. A float32 w is stepped
    through the same way, so a stored 16-bit w and its float32 copy give the same bits."""
    buf = buf or RowBuffer()
    rows = rows or max(1, ROW_BYTES // (4 * w.shape[1]))
    out = x.new_empty((x.shape[0], w.shape[0]))
    for a in range(0, w.shape[0], rows):
        out[:, a : a + rows] = x @ buf.rows(w, a, a + rows).T
    return out


def layer_forward(x, W: dict, la: LayerSpec, spec: Llama4Spec, inv_freq, capture: Callable | None = None):
    """One decoder layer on one sample x [T, H] with all of its weights in ``W`` (experts stacked [E, out, in]).
    ``capture(name_in_layer, expert, inputs)`` sees the input of every linear (expert=-1 for non-expert linears).
    The calibration driver runs the same maths in pieces (routed experts in batches); this is the whole layer."""
    import torch

    cap = capture or (lambda *a: None)
    x, h2 = attention_block(x, W, la, spec, inv_freq, cap)
    if not la.is_moe:
        return x + mlp(h2, W, "feed_forward.", cap)
    out = mlp(h2, W, "feed_forward.shared_expert.", cap)
    idx, s = route(h2, W, spec.top_k)
    routed = torch.zeros_like(out)
    ex = "feed_forward.experts."
    for e in torch.unique(idx).tolist():
        rows, xe = routed_inputs(h2, idx, s, e)
        cap(ex + "gate_proj", e, xe)
        me = expert_hidden(xe, W[ex + "gate_proj"][e], W[ex + "up_proj"][e])
        cap(ex + "down_proj", e, me)
        routed[rows] += me @ W[ex + "down_proj"][e].T
    return x + out + routed


__all__ = ["attention_block", "attention_core", "expert_hidden", "layer_forward", "linear", "mlp", "rms", "route",
           "routed_inputs",
           "times_t"]
