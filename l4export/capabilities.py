"""What the backends' kernels run, as data: compute dtypes per (format, target), and the shape limits of the fused
kernels the exporters use. The plan (plan.py) reads this table to pick, per layer and tensor, the fast form where
its limits hold and a correct fallback where they do not, before any weight is read; it refuses only where no
form runs.

    kernel (ONNX Runtime 1.22-1.32; mlx 0.26-0.32)     limit                           fallback the plan picks
    GroupQueryAttention (com.microsoft, CPU and CUDA)  head_size % 8 == 0              attention from plain ops
                                                                                       (MatMul, Softmax; exact)
    MatMulNBits, GatherBlockQuantized                  block in 128/64/32 dividing K   a smaller block, else float
    QMoE (block-wise int)                              one bits and block for fc1 and  one block dividing H and I
                                                       fc2 (it divides H and I)        for gate/up/down, else float
    MLX affine quantize (mx.quantize)                  group in 32/64/128 dividing K   a smaller group, else float
    MLX mxfp8                                          group 32 dividing K             float

    integer widths (INT_BITS): MatMulNBits / QMoE on CPU 2, 4, 8 (QMoE: one width per node); on CUDA 4, 8;
    GatherBlockQuantized 4, 8; MLX affine 2, 3, 4, 5, 6, 8. A recipe asking another width for a format is refused.

Measured, not assumed: tests/test_shapes.py converts and runs configs drawn across what transformers accepts.
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import CapabilityError, UsageError

# Which (format, target) pairs run which compute dtypes. One row per pair; adding a target is a row.
SUPPORTED: dict[tuple[str, str], tuple[str, ...]] = {
    ("onnx", "cpu"): ("float32", "float16"),  # ORT CPU MoE/QMoE: fp32 and fp16 only (no bf16 kernels)
    ("onnx", "cuda"): ("float16", "bfloat16"),  # ORT CUDA MoE/QMoE: fp16/bf16 only (no fp32)
    ("mlx", "any"): ("float32", "float16", "bfloat16"),
}

DTYPE_BYTES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}
GQA_HEAD_MULTIPLE = 8  # GroupQueryAttention: "head_size must be a multiple of 8" (CPU), the same on CUDA
GROUPS = (128, 64, 32)  # int group / block sizes that MatMulNBits, QMoE, GatherBlockQuantized and MLX all read
MXFP8_GROUP = 32  # MLX mxfp8: one e8m0 scale per 32 inputs, no other size

# Integer weight widths each kernel family reads (checked against onnxruntime 1.32 and mlx 0.32 in
# tests/test_low_bit.py). Keys: (format, target, "linear" | "embedding").
INT_BITS: dict[tuple[str, str, str], tuple[int, ...]] = {
    ("onnx", "cpu", "linear"): (2, 4, 8),  # MatMulNBits, QMoE
    ("onnx", "cuda", "linear"): (4, 8),
    ("onnx", "cpu", "embedding"): (4, 8),  # GatherBlockQuantized
    ("onnx", "cuda", "embedding"): (4, 8),
    ("mlx", "any", "linear"): (2, 3, 4, 5, 6, 8),
    ("mlx", "any", "embedding"): (2, 3, 4, 5, 6, 8),
}


def int_bits(fmt: str, target: str, embedding: bool = False) -> tuple[int, ...]:
    return INT_BITS[(fmt, target if fmt == "onnx" else "any", "embedding" if embedding else "linear")]


ATTENTION_FORMS = {
    "gqa": "com.microsoft GroupQueryAttention (fused, in-place KV cache)",
    "plain": "MatMul + Softmax over a cache written with Slice + Concat (head sizes GroupQueryAttention refuses)",
}


def check_dtype(fmt: str, dtype: str, target: str) -> None:
    if dtype not in DTYPE_BYTES:
        raise UsageError(f"--dtype {dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    key = (fmt, target if fmt == "onnx" else "any")
    if key not in SUPPORTED:
        raise UsageError(f"--target {target!r} is not supported for --format {fmt}; use cpu or cuda")
    if dtype not in SUPPORTED[key]:
        raise CapabilityError(f"--dtype {dtype} cannot run on {fmt} target {target}; use --dtype {' or '.join(SUPPORTED[key])}")


def default_dtype(fmt: str, target: str) -> str:
    """The compute dtype a format and target get when none is asked for: the first one they run."""
    return SUPPORTED.get((fmt, target if fmt == "onnx" else "any"), ("float32",))[0]


def attention_form(head_dim: int) -> str:
    """``gqa`` where GroupQueryAttention runs this head size, else ``plain``."""
    return "gqa" if head_dim % GQA_HEAD_MULTIPLE == 0 else "plain"


def fitting_group(group: int, dims: Iterable[int]) -> int | None:
    """``group`` if it divides every input dimension in ``dims``, else the largest of GROUPS that does; None when
    none does (the tensors stay float, as llama.cpp falls back to another block and mlx-lm leaves them float)."""
    dims = list(dims)
    for g in (group, *GROUPS):
        if all(d % g == 0 for d in dims):
            return g
    return None


__all__ = ["ATTENTION_FORMS", "DTYPE_BYTES", "GQA_HEAD_MULTIPLE", "GROUPS", "INT_BITS", "int_bits", "MXFP8_GROUP", "SUPPORTED", "attention_form",
           "check_dtype", "default_dtype", "fitting_group"]
