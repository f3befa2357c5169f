"""Byte layouts of the targets, from a ``QTensor``. Each packer is checked against the real runtime op in
tests/test_quant_pack.py (onnxruntime MatMulNBits / QMoE, mlx ``mx.dequantize``).

ORT (onnx-runtime-facts.md §3, §7): 4-bit codes are packed along K, two per byte, **low nibble = even
element**; scales are ``[N, K/block]``; zero points packed the same way, ``[N, ceil(K/block/2)]``.

    MatMulNBits  B [N, K/block, block*bits/8]   scales [N, K/block]   zero_points [N, ceil(K/block*bits/8)]
    MatMulBlockQuantizedFp8Weight  B e4m3 [N, K]   b_scale float32 [N, K/block]   (per channel: block = K)
    QMoE fp8     fc1 e4m3 [E, 2I, H] rows [gate; up] (swiglu_fusion=2)   scales [E, N/b, K/b] square tiles
    QMoE fc1     [E, 2I, H*bits/8]  rows interleaved g0,u0,g1,u1,...  (swiglu_fusion=1)
    QMoE fc2     [E, H, I*bits/8]   scales [E, N, K/block]   zero points [E, N, ceil(K/block*bits/8)]

MLX affine: ``w = scale*q + bias``, q in [0, 2^bits-1], packed little-end-first into uint32
(element j of a word at bits [j*bits, (j+1)*bits)); mxfp8: e4m3 bytes packed 4 per uint32, e8m0 scales uint8.

Every width (2, 3, 4, 5, 6, 8) is one layout in both: the codes of a row as a little-endian bit stream, element j at
bits [j*bits, (j+1)*bits) (``pack_codes``); MLX reads the stream as uint32 words, ORT as bytes. At 2 bits ORT's
default zero point is 2 (``2^(bits-1)``), the symmetric code offset.
"""

from __future__ import annotations

import numpy as np

from .schemes import FP8, Fp8, Int, MxFp8, QTensor


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 codes [..., K] (K even, values < 16) -> [..., K/2]; low nibble = even element."""
    q = q.astype(np.uint8)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [..., K] -> [..., K*bits/8] bytes: a little-endian bit stream along K (K*bits a multiple of 8)."""
    if bits == 8:
        return q.astype(np.uint8)
    if bits == 4:
        return pack_nibbles(q)
    if bits == 2:
        q = q.astype(np.uint8).reshape(*q.shape[:-1], -1, 4)
        return (q[..., 0] | q[..., 1] << 2 | q[..., 2] << 4 | q[..., 3] << 6).astype(np.uint8)
    # 3, 5, 6: codes do not tile a byte; through bits (rows a block at a time keep the temporaries small)
    rows = q.reshape(-1, q.shape[-1])
    out = np.empty((rows.shape[0], q.shape[-1] * bits // 8), np.uint8)
    step = max(1, (1 << 22) // max(1, q.shape[-1] * bits))
    shifts = np.arange(bits, dtype=np.uint8)
    for r in range(0, rows.shape[0], step):
        b = (rows[r : r + step, :, None] >> shifts) & 1
        out[r : r + step] = np.packbits(b.reshape(b.shape[0], -1), axis=-1, bitorder="little")
    return out.reshape(*q.shape[:-1], out.shape[-1])


def zero_points(qt: QTensor, bits: int) -> np.ndarray:
    """Zero points [..., groups] packed as the codes, the last byte padded (ORT: ceil(groups*bits/8) bytes)."""
    z = qt.zero
    per_byte = 8 // bits if 8 % bits == 0 else 8
    if pad := -z.shape[-1] % per_byte:
        z = np.concatenate([z, np.zeros(z.shape[:-1] + (pad,), np.uint8)], axis=-1)
    packed = pack_codes(z, bits)
    return packed[..., : (qt.zero.shape[-1] * bits + 7) // 8]


def _need_int(qt: QTensor) -> Int:
    if not isinstance(qt.scheme, Int):
        raise TypeError(f"{qt.scheme.name} has no integer layout")
    return qt.scheme


def interleave_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rows a0, b0, a1, b1, ... along axis 1 (QMoE fc1 with swiglu_fusion=1: gate, up, gate, up, ...)."""
    out = np.empty((a.shape[0], 2 * a.shape[1]) + a.shape[2:], dtype=a.dtype)
    out[:, 0::2], out[:, 1::2] = a, b
    return out


def to_matmulnbits(qt: QTensor, scale_dtype: np.dtype | type = np.float32) -> dict[str, np.ndarray | int | None]:
    """One dense linear ``[N, K]`` as MatMulNBits inputs and attributes (``Y = A @ W^T``). Zero points only for
    asymmetric schemes: symmetric codes are stored ``q+8`` and MatMulNBits' default zero point reads them."""
    s = _need_int(qt)
    n, k = qt.shape
    blk = s.group_size
    b = pack_codes(qt.q, s.bits).reshape(n, k // blk, blk * s.bits // 8)
    return {"B": b, "scales": qt.scale.astype(scale_dtype), "zero_points": None if s.symmetric else zero_points(qt, s.bits),
            "K": k, "N": n, "bits": s.bits, "block_size": blk}


def qmoe_weights(*qts: QTensor) -> np.ndarray:
    """Packed codes of one QMoE input: fc1 from (gate, up), rows interleaved; fc2 from (down,)."""
    bits = _need_int(qts[0]).bits
    packed = [pack_codes(qt.q, bits) for qt in qts]
    return packed[0] if len(packed) == 1 else interleave_rows(*packed)


def qmoe_scales(*qts: QTensor, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """Scales of one QMoE input ``[E, N, K/block]`` (fc1: gate and up interleaved, as the codes)."""
    scales = [qt.scale for qt in qts]
    return (scales[0] if len(scales) == 1 else interleave_rows(*scales)).astype(dtype)


def qmoe_zero_points(*qts: QTensor) -> np.ndarray:
    """Packed zero points of one QMoE input (asymmetric schemes)."""
    bits = _need_int(qts[0]).bits
    zps = [zero_points(qt, bits) for qt in qts]
    return zps[0] if len(zps) == 1 else interleave_rows(*zps)


def to_mlx(qt: QTensor) -> dict[str, np.ndarray]:
    """``{"weight": uint32, "scales": ..., ["biases": ...]}`` as ``mx.quantize`` lays them out."""
    s = qt.scheme
    if isinstance(s, Int):
        w = np.ascontiguousarray(pack_codes(qt.q, s.bits)).view("<u4").astype(np.uint32, copy=False)
        scale = qt.scale.astype(np.float32)
        return {"weight": w, "scales": scale, "biases": (-qt.zero.astype(np.float32) * scale).astype(np.float32)}
    if isinstance(s, MxFp8):
        b = qt.q.view(np.uint8).astype(np.uint32).reshape(*qt.shape[:-1], qt.shape[-1] // 4, 4)
        w = np.bitwise_or.reduce(b << (np.arange(4, dtype=np.uint32) * 8), axis=-1).astype(np.uint32)
        e8m0 = (np.round(np.log2(qt.scale)) + 127).astype(np.uint8)
        return {"weight": w, "scales": e8m0}
    raise TypeError(f"{s.name} has no MLX layout; MLX stores FP8 as mxfp8 (re-quantize with MxFp8)")


def mlx_config_entry(qt_or_scheme) -> dict:
    """The per-path ``quantization`` entry mlx-lm reads (explicit values, never null)."""
    s = qt_or_scheme.scheme if isinstance(qt_or_scheme, QTensor) else qt_or_scheme
    if isinstance(s, Int):
        return {"group_size": s.group_size, "bits": s.bits, "mode": "affine"}
    if isinstance(s, MxFp8):
        return {"group_size": 32, "bits": 8, "mode": "mxfp8"}
    raise TypeError(f"{s.name} has no MLX mode")


def to_onnx_fp8(qt: QTensor) -> dict[str, np.ndarray]:
    """FP8 weight for ``DequantizeLinear(axis=-2)``: e4m3 ``[..., out, in]`` and float32 scales ``[..., out]``."""
    if not isinstance(qt.scheme, Fp8) or qt.scheme.block_size:
        raise TypeError(f"{qt.scheme.name} is not per-channel FP8")
    return {"weight": qt.q.astype(FP8), "scale": qt.scale[..., 0].astype(np.float32)}


def to_matmul_fp8(qt: QTensor) -> dict[str, np.ndarray | int]:
    """One dense linear ``[N, K]`` as ``com.microsoft.MatMulBlockQuantizedFp8Weight`` inputs (``Y = A @ B_scaledᵀ``):
    ``B`` e4m3 ``[N, K]`` (row-major, not transposed), float32 ``b_scale [N, ceil(K/block_size)]``.

    Per-channel FP8 is ``block_size = K`` (one scale per row, ``b_scale [N, 1]``); the kernel only asks for a
    positive block size (``matmul_block_scaled_fp8.cc``). Square-block FP8 uses ``block_size = b`` with each
    tile's scale repeated over its ``b`` rows, which is exactly ``QTensor.scale``."""
    s = qt.scheme
    if not isinstance(s, Fp8) or qt.q.ndim != 2:
        raise TypeError(f"{s.name} {list(qt.shape)} is not a 2-D FP8 weight")
    n, k = qt.shape
    return {"B": qt.q.astype(FP8), "b_scale": np.ascontiguousarray(qt.scale, dtype=np.float32),
            "block_size": s.block_size or k}


def to_qmoe_fp8(gate: QTensor, up: QTensor, down: QTensor) -> dict[str, np.ndarray | int]:
    """Stacked block-FP8 experts as ``QMoE(quant_type='fp8', block_size=b, swiglu_fusion=2)``.

        fc1 e4m3 [E, 2I, H]  rows [gate; up] (concatenated)   fc1_scales float32 [E, 2I/b, H/b]
        fc2 e4m3 [E, H, I]                                      fc2_scales float32 [E, H/b, I/b]

    Why concatenated (swiglu_fusion=2) and not interleaved: a ``b x b`` tile of interleaved rows would mix gate
    and up rows under one scale, which is not how gate and up were quantized. With I % b == 0 every tile lies in
    one of them."""
    s = gate.scheme
    if not (isinstance(s, Fp8) and s.block_size and up.scheme == s and isinstance(down.scheme, Fp8)
            and down.scheme.block_size == s.block_size):
        raise ValueError("QMoE fp8 needs gate, up and down as square-block FP8 with one block size")
    return {"fc1": np.concatenate([gate.q, up.q], axis=1).astype(FP8),
            "fc1_scales": np.concatenate([s.block_scales(gate), s.block_scales(up)], axis=1),
            "fc2": down.q.astype(FP8), "fc2_scales": down.scheme.block_scales(down), "block_size": s.block_size}
