"""Quantization schemes as data: each a frozen dataclass with a bit-exact ``quantize``/``dequantize`` pair.

Every scheme works on ``w [..., out, in]`` and is vectorised over the leading axes, so a stacked expert
tensor ``[E, out, in]`` gets scales per expert, per output row, per group of ``group_size`` input columns;
never one scale across experts.

    grouped view:  w [..., out, in] -> wg [..., out, G, g]      G = in / g, one (scale, zero) per [.., out, G]

The grouped view is also what GPTQ (gptq.py) uses: ``fit`` picks (scale, zero) for a group and
``snap`` rounds values onto that group's grid, one column at a time.

Code conventions (what the packers in ``pack.py`` expect):
  * ``Int`` (int4 / int8): ``QTensor.q`` holds **unsigned** codes in [0, 2^bits - 1]; dequant is
    ``(q - zero) * scale``. Symmetric schemes have ``zero = 2^(bits-1)`` (8 for int4): the "q+8" ORT and
    MLX (``bias = -8*scale``) both read.
  * ``Fp8``: ``q`` is ``ml_dtypes.float8_e4m3fn``, scale per output channel per expert (``[..., out, 1]``),
    or per ``b x b`` tile (``block_size=b``; stored per row, ``[..., out, in/b]``, equal within a tile).
  * ``MxFp8``: ``q`` is e4m3 and ``scale`` is a power of two (stored as e8m0 by the packer), group 32.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, Union

import ml_dtypes
import numpy as np

from ..errors import RecipeError

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_MAX = 448.0
FP8_BLOCKS = (0, 16, 32, 64, 128)  # 0: per output channel; else square b x b tiles
ACCURACY_LEVELS = (0, 4)  # ONNX Runtime accuracy_level of integer kernels: 0 float, 4 int8 activations
ROWS = 256  # output rows fitted, encoded or decoded at a time: each step makes float32 temporaries the size of
# its input several times over, a few hundred MB apiece for one real-width [8192, 5120] projection


@dataclass(frozen=True)
class QTensor:
    """A quantized tensor: codes, scales (and zero points), and the scheme that reads them."""

    scheme: "Scheme"
    q: np.ndarray  # [..., out, in] codes (uint8 for Int, float8_e4m3fn for Fp8/MxFp8)
    scale: np.ndarray  # [..., out, G] float32
    zero: np.ndarray | None  # [..., out, G] uint8 (Int), else None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    def lead(self, a: int, b: int) -> QTensor:
        """Rows (experts of a stack) [a, b): views, nothing copied (a ``PerExpert`` scheme sliced with them)."""
        return QTensor(plain(self.scheme, a, b), self.q[a:b], self.scale[a:b], None if self.zero is None else self.zero[a:b])

    def rows(self, r: slice | np.ndarray) -> QTensor:
        """Output rows ``r`` (axis -2) of every leading entry: scales and zero points are per row as well."""
        pick = lambda a: None if a is None else a[..., r, :]  # noqa: E731
        return QTensor(self.scheme, pick(self.q), pick(self.scale), pick(self.zero))

    def dequantize(self) -> np.ndarray:
        """float32 weights, ``ROWS`` output rows at a time into one array (same values as all at once)."""
        if self.q.ndim < 2 or self.q.shape[-2] <= ROWS:
            return self.scheme.dequantize(self)
        out = np.empty(self.q.shape, np.float32)
        for a in range(0, out.shape[-2], ROWS):
            out[..., a : a + ROWS, :] = self.scheme.dequantize(self.rows(slice(a, a + ROWS)))
        return out

    @property
    def nbytes(self) -> int:
        """Storage in the packed form (codes + scales + zero points)."""
        bits = getattr(self.scheme, "bits", 8)
        scale_bytes = 1 if isinstance(self.scheme, MxFp8) else 2 if isinstance(self.scheme, Int) else 4
        scales = self.scale.size
        if isinstance(self.scheme, Fp8) and self.scheme.block_size:
            scales //= self.scheme.block_size  # one stored scale per tile, not per row
        n = self.q.size * bits // 8 + scales * scale_bytes
        if self.zero is not None and not getattr(self.scheme, "symmetric", False):
            n += (self.zero.size * bits + 7) // 8
        return n


class Scheme(Protocol):
    name: str

    def group_for(self, in_dim: int) -> int: ...
    def fit(self, wg: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]: ...
    def snap(self, wg: np.ndarray, scale: np.ndarray, zero: np.ndarray | None) -> np.ndarray: ...
    def encode(self, wg: np.ndarray, scale: np.ndarray, zero: np.ndarray | None) -> np.ndarray: ...
    def quantize(self, w: np.ndarray) -> QTensor: ...
    def dequantize(self, qt: QTensor) -> np.ndarray: ...


def assembled(parts: Iterable[tuple[slice, QTensor]], n: int, axis: int) -> QTensor:
    """One QTensor of ``n`` along ``axis`` (0: experts or rows of a matrix; -2: output rows) from ``(rows, part)``
    pairs, written into arrays made once (no concatenation: the whole codes are in memory once, beside one part).
    A single part that covers all is returned as it is."""
    out: QTensor | None = None
    for r, qt in parts:
        if out is None and r.start in (0, None) and (r.stop is None or r.stop >= n):
            return qt
        at = (r,) if axis == 0 else (..., r, slice(None))
        if out is None:
            full = lambda x: None if x is None else np.empty(x.shape[:axis % x.ndim] + (n,) + x.shape[axis % x.ndim + 1:], x.dtype)  # noqa: E731
            out = QTensor(qt.scheme, full(qt.q), full(qt.scale), full(qt.zero))
        for dst, src in zip((out.q, out.scale, out.zero), (qt.q, qt.scale, qt.zero)):
            if src is not None:
                dst[at] = src
    assert out is not None
    return out


def grouped(w: np.ndarray, g: int) -> np.ndarray:
    """[..., out, in] -> [..., out, in/g, g] (a view)."""
    return w.reshape(*w.shape[:-1], w.shape[-1] // g, g)


def _check_group(name: str, in_dim: int, g: int) -> None:
    if in_dim % g:
        raise RecipeError(f"{name}: group size {g} does not divide the input dimension {in_dim}; use a divisor of {in_dim}")


class _Base:
    """quantize/dequantize in terms of fit/encode (shared by every scheme)."""

    row_tile = 1  # output rows that share a scale (Fp8 blocks): a row step never splits them

    def quantize(self, w: np.ndarray) -> QTensor:
        w = np.asarray(w, dtype=np.float32)
        g = self.group_for(w.shape[-1])
        _check_group(self.name, w.shape[-1], g)

        def part(r: slice) -> QTensor:
            wg = grouped(w[..., r, :], g)
            scale, zero = self.fit(wg)
            q = self.encode(wg, scale, zero).reshape(wg.shape[:-2] + (-1,))
            return QTensor(self, q, scale[..., 0], None if zero is None else zero[..., 0])

        return self._by_rows(w, part)

    def with_scales(self, w: np.ndarray, scale: np.ndarray, zero: np.ndarray | None) -> QTensor:
        """Encode ``w`` on given grids (``scale``/``zero`` [..., out, G]), e.g. after GPTQ."""
        g = self.group_for(w.shape[-1])

        def part(r: slice) -> QTensor:
            wg = grouped(np.asarray(w[..., r, :], dtype=np.float32), g)
            z = None if zero is None else zero[..., r, :]
            q = self.encode(wg, scale[..., r, :, None], None if z is None else z[..., None])
            return QTensor(self, q.reshape(wg.shape[:-2] + (-1,)), scale[..., r, :], z)

        return self._by_rows(w, part)

    def _by_rows(self, w: np.ndarray, part) -> QTensor:
        """``part(rows)`` over every output row at once, or (more than ``ROWS`` rows) a step of rows at a time
        into arrays made once: the same codes and scales, a step's temporaries instead of the tensor's."""
        if w.ndim < 2:
            return part(slice(None))
        n = w.shape[-2]
        step = -(-ROWS // self.row_tile) * self.row_tile
        if n <= step:
            return part(slice(None))
        return assembled(((slice(a, a + step), part(slice(a, a + step))) for a in range(0, n, step)), n, -2)

    def rtn(self, w: np.ndarray) -> np.ndarray:
        """Round-to-nearest fake quantization (float32, same shape)."""
        return self.dequantize(self.quantize(w))


def _fp16_exact(scale: np.ndarray) -> np.ndarray:
    """Integer scales are kept on the float16 grid, so an fp16 copy of them (QMoE scales in any graph,
    MatMulNBits in fp16 graphs, MLX fp16 exports) is exact: the stored bytes dequantize to ``dequantize()``
    in every layout. Rounded *up* (at most 2^-10 relative), so no code saturates that did not before;
    halves the scale bytes next to float32."""
    s = np.asarray(scale, dtype=np.float32)
    h = s.astype(np.float16)
    h = np.where(h.astype(np.float32) < s, np.nextafter(h, np.float16(np.inf)), h)
    return h.astype(np.float32)


INT_WIDTHS = (2, 3, 4, 5, 6, 8)  # every width some kernel reads (capabilities.INT_BITS says which reads which)


@dataclass(frozen=True)
class Int(_Base):
    """Integer weights, grouped along the input dim. Symmetric int4 uses ``scale = absmax/8`` and codes
    ``clip(round(w/scale), -8, 7) + 8`` (Meta's ``int4_row_quantize``; +0.3 dB SQNR over absmax/7 on
    Gaussian and Laplacian rows, see docs/quantization.md). Asymmetric uses min/max and an integer zero
    point, so ORT (``(q - zp)*scale``) and MLX (``scale*q + bias``, ``bias = -zp*scale``) read the same grid.
    """

    bits: int = 4
    group_size: int = 32
    symmetric: bool = True
    # ONNX Runtime's MatMulNBits/QMoE/GatherBlockQuantized compute: 0 = float activations (exact with respect to
    # the dequantized weights), 4 = activations quantized to int8 per block (ORT CPU's fast integer kernels). The
    # weights are the same either way; MLX has no such kernel and reads only the weights.
    accuracy_level: int = 0

    def __post_init__(self) -> None:
        if self.bits not in INT_WIDTHS:
            raise RecipeError(f"int scheme: bits={self.bits} is not supported; use one of {', '.join(map(str, INT_WIDTHS))}")
        if self.group_size not in (16, 32, 64, 128):
            raise RecipeError(f"int{self.bits}: group_size={self.group_size} is not supported; use 32, 64 or 128")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise RecipeError(f"int{self.bits}: accuracy_level={self.accuracy_level} is not supported; use 0 (float "
                              "activations, exact) or 4 (int8 activations, ONNX Runtime CPU's fast kernels)")

    @property
    def name(self) -> str:
        acc = f"-acc{self.accuracy_level}" if self.accuracy_level else ""
        return f"int{self.bits}-g{self.group_size}-{'sym' if self.symmetric else 'asym'}{acc}"

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def group_for(self, in_dim: int) -> int:
        return self.group_size

    def fit(self, wg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        half = 1 << (self.bits - 1)
        if self.symmetric:
            amax = np.abs(wg).max(axis=-1, keepdims=True)
            scale = _fp16_exact(amax / np.float32(half))
            scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)  # all-zero group: any scale
            zero = np.full(scale.shape, half, dtype=np.uint8)
            return scale, zero
        lo = np.minimum(wg.min(axis=-1, keepdims=True), 0.0)  # the grid must contain 0 exactly
        hi = np.maximum(wg.max(axis=-1, keepdims=True), 0.0)
        scale = _fp16_exact((hi - lo) / np.float32(self.qmax))
        scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
        zero = np.clip(np.round(-lo / scale), 0, self.qmax).astype(np.uint8)
        return scale, zero

    def encode(self, wg: np.ndarray, scale: np.ndarray, zero: np.ndarray | None) -> np.ndarray:
        q = np.round(wg / scale) + zero.astype(np.float32)
        return np.clip(q, 0, self.qmax).astype(np.uint8)

    def snap(self, wg: np.ndarray, scale: np.ndarray, zero: np.ndarray | None) -> np.ndarray:
        return ((self.encode(wg, scale, zero).astype(np.float32) - zero.astype(np.float32)) * scale).astype(np.float32)

    def dequantize(self, qt: QTensor) -> np.ndarray:
        g = self.group_for(qt.q.shape[-1])
        qg = grouped(qt.q, g).astype(np.float32)
        out = (qg - qt.zero[..., None].astype(np.float32)) * qt.scale[..., None]
        return out.reshape(qt.q.shape).astype(np.float32)


@dataclass(frozen=True)
class Fp8(_Base):
    """FP8 E4M3 (``float8_e4m3fn``) weights, ``scale = absmax/448``, per expert.

    * ``block_size=0`` (default): one float32 scale per output channel (Meta's ``quantize_fp8_per_row``);
      ``QTensor.scale`` is ``[..., out, 1]``.
    * ``block_size=b``: one scale per ``b x b`` square tile (DeepSeek-V3 / Qwen3 FP8 checkpoints, QMoE
      ``quant_type='fp8'``). ``QTensor.scale`` keeps the per-row grouped view ``[..., out, in/b]``, each tile's
      scale repeated over its ``b`` rows, so GPTQ (which fits one group of columns over all rows at once) and
      every per-row reader work unchanged; ``block_scales`` gives the compact ``[..., out/b, in/b]`` tiles.

    ``activation="static"`` asks calibration for input scales (``absmax/448`` per expert, layer max for experts
    without tokens); "dynamic" records none.
    """

    activation: Literal["dynamic", "static"] = "dynamic"
    block_size: int = 0

    def __post_init__(self) -> None:
        if self.activation not in ("dynamic", "static"):
            raise RecipeError(f"fp8: activation={self.activation!r} is not one of dynamic, static")
        if self.block_size not in FP8_BLOCKS:
            raise RecipeError(f"fp8: block_size={self.block_size} is not supported; use 128 (or 16, 32, 64), "
                              "or leave it out for per-channel scales")

    bits = 8

    @property
    def name(self) -> str:
        return f"fp8-e4m3-block{self.block_size}" if self.block_size else "fp8-e4m3-channel"

    def group_for(self, in_dim: int) -> int:
        return self.block_size or in_dim

    @property
    def row_tile(self) -> int:  # type: ignore[override]
        return self.block_size or 1

    def fit(self, wg: np.ndarray) -> tuple[np.ndarray, None]:
        amax = np.abs(wg).max(axis=-1, keepdims=True)  # [..., out, G, 1]
        if self.block_size:  # max over the b rows of each tile, repeated back onto every row
            b, out = self.block_size, wg.shape[-3]
            if out % b:
                raise RecipeError(f"{self.name}: block size {b} does not divide the output dimension {out}; "
                                  f"use a block size that divides {out}")
            tiles = amax.reshape(*amax.shape[:-3], out // b, b, *amax.shape[-2:]).max(axis=-3, keepdims=True)  # [.., out/b, 1, G, 1]
            amax = np.broadcast_to(tiles, (*tiles.shape[:-3], b, *tiles.shape[-2:])).reshape(amax.shape)
        scale = (amax / np.float32(FP8_MAX)).astype(np.float32)
        return np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32), None

    def encode(self, wg: np.ndarray, scale: np.ndarray, zero: None) -> np.ndarray:
        # IMPORTANT: float8_e4m3fn has no inf; anything past 448 becomes NaN, so clip first.
        return np.clip(wg / scale, -FP8_MAX, FP8_MAX).astype(FP8)

    def snap(self, wg: np.ndarray, scale: np.ndarray, zero: None) -> np.ndarray:
        return (self.encode(wg, scale, None).astype(np.float32) * scale).astype(np.float32)

    def dequantize(self, qt: QTensor) -> np.ndarray:
        # one float32 multiply per element, q * scale[row, column group] (the per-channel case is G = 1)
        qg = grouped(qt.q, self.group_for(qt.q.shape[-1])).astype(np.float32)
        return (qg * qt.scale[..., None]).reshape(qt.q.shape).astype(np.float32)

    def block_scales(self, qt: QTensor) -> np.ndarray:
        """The compact tile scales ``[..., out/b, in/b]`` (block schemes only): one row per tile of rows."""
        if not self.block_size:
            raise TypeError(f"{self.name} has per-channel scales, not square blocks")
        return np.ascontiguousarray(qt.scale[..., :: self.block_size, :]).astype(np.float32)


@dataclass(frozen=True)
class MxFp8(_Base):
    """MLX ``mode="mxfp8"``: e4m3 elements, one power-of-two (e8m0) scale per 32 inputs. The exponent is
    ``ceil(log2(amax/448))`` (so no element saturates), which is what ``mx.quantize(mode="mxfp8")`` does:
    codes and scales match it bit for bit (tests/test_quant_schemes.py)."""

    group_size: int = 32
    bits = 8
    name = "mxfp8"

    def __post_init__(self) -> None:
        if self.group_size != 32:
            raise RecipeError(f"mxfp8: group_size={self.group_size}; MLX's mxfp8 uses 32")

    def group_for(self, in_dim: int) -> int:
        return self.group_size

    def fit(self, wg: np.ndarray) -> tuple[np.ndarray, None]:
        amax = np.abs(wg).max(axis=-1, keepdims=True).astype(np.float32)
        # ceil(log2(amax/448)) computed exactly from the float32 bits: ratio = m * 2^ex, m in [0.5, 1)
        m, ex = np.frexp((amax / np.float32(FP8_MAX)).astype(np.float32))
        e = np.where(m > 0.5, ex, ex - 1)
        e = np.where(amax > 0, e, 0)  # an all-zero group gets scale 1 (as mx.quantize)
        return np.exp2(np.clip(e, -127, 127).astype(np.float64)).astype(np.float32), None

    encode = Fp8.encode
    snap = Fp8.snap

    def dequantize(self, qt: QTensor) -> np.ndarray:
        qg = grouped(qt.q, self.group_size).astype(np.float32)
        return (qg * qt.scale[..., None]).reshape(qt.q.shape).astype(np.float32)


@dataclass(frozen=True)
class PerExpert:
    """A stack of routed experts [E, out, in] at their own widths: ``schemes[e]`` quantizes expert e (the mixed
    allocator's per-expert placement, ``mixed.allocate(per_expert=True)``). One group size, zero-point form and
    accuracy level for all, only the bits differ, so the stack's codes, scales and zero points keep one shape and
    every reader of a run of experts of one width (``at``) sees a plain ``Int``."""

    schemes: tuple[Int, ...]

    def __post_init__(self) -> None:
        first = self.schemes[0]
        for s in self.schemes:
            if (s.group_size, s.symmetric, s.accuracy_level) != (first.group_size, first.symmetric, first.accuracy_level):
                raise RecipeError(f"per-expert widths: {s.name} and {first.name} differ in more than their bits; "
                                  "experts of one tensor share the group size, zero points and accuracy level")

    @property
    def name(self) -> str:
        f = self.schemes[0]
        acc = f"-acc{f.accuracy_level}" if f.accuracy_level else ""
        return f"experts-g{f.group_size}-{'sym' if f.symmetric else 'asym'}{acc}:{''.join(str(s.bits) for s in self.schemes)}"

    @property
    def group_size(self) -> int:
        return self.schemes[0].group_size

    @property
    def symmetric(self) -> bool:
        return self.schemes[0].symmetric

    @property
    def accuracy_level(self) -> int:
        return self.schemes[0].accuracy_level

    @property
    def bits(self) -> int:
        """The widest expert's width (what a reader that takes one width must run)."""
        return max(s.bits for s in self.schemes)

    def group_for(self, in_dim: int) -> int:
        return self.group_size

    def at(self, a: int, b: int) -> "Int | PerExpert":
        """The scheme of experts [a, b): an ``Int`` when they share one width."""
        part = self.schemes[a:b]
        return part[0] if len(set(part)) == 1 else PerExpert(part)

    def runs(self, runs: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        """``runs`` split where the width changes (each run: one ``Int``)."""
        out = []
        for a, b in runs:
            start = a
            for e in range(a + 1, b):
                if self.schemes[e] != self.schemes[start]:
                    out.append((start, e))
                    start = e
            out.append((start, b))
        return out

    def widths(self) -> list[tuple[Int, tuple[int, ...]]]:
        """Each width's scheme and its experts (ascending), narrowest first."""
        found: dict[Int, list[int]] = {}
        for e, s in enumerate(self.schemes):
            found.setdefault(s, []).append(e)
        return [(s, tuple(found[s])) for s in sorted(found, key=lambda s: s.bits)]

    def quantize(self, w: np.ndarray) -> QTensor:
        """w [E, out, in], expert e by schemes[e]; codes, scales, zero points stacked, the scheme this one."""
        if w.ndim != 3 or w.shape[0] != len(self.schemes):
            raise ValueError(f"{self.name}: expects [{len(self.schemes)}, out, in] experts, got {list(w.shape)}")
        parts = ((slice(a, b), self.at(a, b).quantize(w[a:b])) for a, b in self.runs([(0, w.shape[0])]))
        qt = assembled(parts, w.shape[0], 0)
        return QTensor(self, qt.q, qt.scale, qt.zero)

    def dequantize(self, qt: QTensor) -> np.ndarray:
        out = np.empty(qt.q.shape, np.float32)
        for a, b in self.runs([(0, qt.q.shape[0])]):
            s = self.at(a, b)
            out[a:b] = s.dequantize(QTensor(s, qt.q[a:b], qt.scale[a:b], None if qt.zero is None else qt.zero[a:b]))
        return out

    def rtn(self, w: np.ndarray) -> np.ndarray:
        return self.dequantize(self.quantize(w))


def plain(scheme: "AnyScheme", a: int, b: int) -> "AnyScheme":
    """The scheme experts [a, b) of a stack take (a ``PerExpert`` sliced; any other scheme as it is)."""
    return scheme.at(a, b) if isinstance(scheme, PerExpert) else scheme


AnyScheme = Union[Int, Fp8, MxFp8, PerExpert]


def scheme_record(s: AnyScheme) -> dict[str, Any]:
    """A scheme as l4export.json records it ({"kind": ..., options}); ``recipe.scheme_from_record`` reads it back."""
    if isinstance(s, Int):
        return {"kind": f"int{s.bits}", "group_size": s.group_size, "symmetric": s.symmetric,
                "accuracy_level": s.accuracy_level}
    if isinstance(s, Fp8):
        return {"kind": "fp8", "activation": s.activation, "block_size": s.block_size}
    if isinstance(s, PerExpert):
        return {"kind": "per-expert", "bits": [e.bits for e in s.schemes], "group_size": s.group_size,
                "symmetric": s.symmetric, "accuracy_level": s.accuracy_level}
    return {"kind": "mxfp8"}


def sqnr_db(ref: np.ndarray, approx: np.ndarray, axis: tuple[int, ...] | None = None) -> np.ndarray:
    """10·log10(‖ref‖² / ‖ref − approx‖²); +inf when exact, finite otherwise."""
    ref = np.asarray(ref, dtype=np.float64)
    err = ((ref - np.asarray(approx, dtype=np.float64)) ** 2).sum(axis=axis)
    return db((ref**2).sum(axis=axis), err)


def db(sig, err):
    """10·log10(sig / err), +inf where err is 0 (scalars or arrays)."""
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(np.where(err > 0, sig / np.where(err > 0, err, 1.0), np.inf))
