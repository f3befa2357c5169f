"""A small graph builder over onnx_ir: values are objects, node names are scoped and deterministic.

    g = GraphBuilder(opset=21, dtype=np.float16)
    with g.scope("model.layers.0"), g.scope("self_attn"):
        y = g.op("MatMul", x, w)             # node "model.layers.0/self_attn/MatMul_0"
    g.const(np.array([0, 0, -1], np.int64))  # small constant initializer
    g.weight("model.norm.weight", shape, dtype, loader)   # lazy initializer: bytes read only by ir.save
    g.cast(x, FP32)                           # Cast unless x is already float32 (or the graph is)

Node names are ``scope/OpType_n`` with ``n`` counted per scope and op type, so the same checkpoint always
gives the same graph, byte for byte.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from ..outputs import Arrays, checked, write_array

log = logging.getLogger(__name__)
MS_DOMAIN = "com.microsoft"
FP32 = ir.DataType.FLOAT


class _Weight(ir.LazyTensor):
    """An initializer read when it is due: ``tofile`` (what ir.save calls for external data) writes ``load()``'s
    array, or its leading-axis slices one at a time as they come (checked against the planned shape and dtype);
    anything that needs the whole array (an in-memory model) gets it joined."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype: np.dtype, load: Callable[[], Arrays]):
        self._load, self._planned = load, (name, tuple(shape), np.dtype(dtype))
        super().__init__(self._whole, dtype=ir.DataType.from_numpy(np.dtype(dtype)), shape=ir.Shape(shape), name=name)

    def _whole(self) -> ir.Tensor:
        parts = list(checked(*self._planned, self._load()))
        return ir.Tensor(parts[0] if len(parts) == 1 else np.concatenate(parts), name=self._planned[0])

    def tofile(self, file) -> None:
        write_array(file, *self._planned, self._load())

    def __repr__(self) -> str:
        return f"{self._repr_base()}(name={self.name!r})"


class GraphBuilder:
    """Nodes, initializers and I/O of one graph whose floating-point compute dtype is ``dtype``."""

    def __init__(self, opset: int = 21, dtype: Any = np.float32):
        self.opset = opset
        self.np_dtype = np.dtype(dtype)
        self.dt = ir.DataType.from_numpy(self.np_dtype)
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []
        self.inputs: list[ir.Value] = []
        self.outputs: list[ir.Value] = []
        self._scopes: list[str] = []
        self._counts: Counter[str] = Counter()
        self._consts: dict[tuple, ir.Value] = {}

    # ---- naming ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        self._scopes.append(name)
        try:
            yield
        finally:
            self._scopes.pop()

    def _name(self, op_type: str) -> str:
        prefix = "/".join(self._scopes)
        key = f"{prefix}/{op_type}"
        n = self._counts[key]
        self._counts[key] += 1
        return f"{key}_{n}" if prefix else f"{op_type}_{n}"

    # ---- values ----------------------------------------------------------------------------------
    def input(self, name: str, dtype: ir.DataType, shape: list[int | str]) -> ir.Value:
        v = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))
        self.inputs.append(v)
        return v

    def output(self, value: ir.Value, name: str, dtype: ir.DataType, shape: list[int | str]) -> ir.Value:
        """Name ``value`` as a graph output (through an Identity when it already has a name in use)."""
        with self.scope("outputs"):
            out = self.op("Identity", value)
        out.name = name
        out.type = ir.TensorType(dtype)
        out.shape = ir.Shape(shape)
        self.outputs.append(out)
        return out

    def const(self, array: np.ndarray | float | int | list, dtype: Any = None) -> ir.Value:
        """A small constant initializer (deduplicated by value)."""
        arr = np.asarray(array, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = f"const_{len(self._consts)}"
            v = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)), shape=ir.Shape(arr.shape),
                         const_value=ir.tensor(arr, name=name))
            self.initializers.append(v)
            self._consts[key] = v
        return self._consts[key]

    def i64(self, *values: int) -> ir.Value:
        return self.const(np.array(values, dtype=np.int64))

    def f32(self, value: float) -> ir.Value:
        return self.const(np.array(value, dtype=np.float32))

    def cast(self, x: ir.Value, dtype: ir.DataType) -> ir.Value:
        """Cast to ``dtype``. The float32 graph has no casts; in others a redundant Cast is harmless."""
        if dtype == self.dt == FP32 or (x.type is not None and x.type.dtype == dtype):
            return x
        y = self.op("Cast", x, to=dtype)
        y.type = ir.TensorType(dtype)
        return y

    def weight(self, name: str, shape: tuple[int, ...], dtype: np.dtype, load: Callable[[], Arrays]) -> ir.Value:
        """A lazy initializer: ``load`` runs when ir.save writes its bytes, and the array is dropped after. ``load``
        may return the tensor's leading-axis slices instead (an iterator): they are written one at a time."""
        irdtype = ir.DataType.from_numpy(np.dtype(dtype))
        v = ir.Value(name=name, type=ir.TensorType(irdtype), shape=ir.Shape(shape),
                     const_value=_Weight(name, shape, dtype, load))
        self.initializers.append(v)
        return v

    # ---- nodes -------------------------------------------------------------------------------------
    def op(self, op_type: str, *inputs: ir.Value | None, domain: str = "", outputs: int = 1,
           **attributes: Any) -> Any:
        attrs: Mapping[str, Any] = {k: v for k, v in attributes.items() if v is not None}
        node = ir.node(op_type, list(inputs), attrs, domain=domain, num_outputs=outputs, name=self._name(op_type))
        self.nodes.append(node)
        for i, out in enumerate(node.outputs):
            out.name = f"{node.name}/output_{i}"
        return node.outputs[0] if outputs == 1 else tuple(node.outputs)

    # ---- model -------------------------------------------------------------------------------------
    def model(self, doc: str = "", name: str = "llama4_text_decoder") -> ir.Model:
        graph = ir.Graph(self.inputs, self.outputs, nodes=self.nodes, initializers=self.initializers,
                         opset_imports={"": self.opset, MS_DOMAIN: 1}, name=name, doc_string=doc)
        return ir.Model(graph, ir_version=10, producer_name="l4export")


def save_model(model: ir.Model, out: Path, total_bytes: int, file: str, data: str) -> None:
    """Write ``file`` + its ``data`` file, streaming each weight from the checkpoint (one at a time)."""
    # a bar with -v only (quiet by default); it redraws on every tensor, so it moves on small models too
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"{file} weights", mininterval=0,
              disable=not log.isEnabledFor(logging.INFO)) as bar:

        def progress(tensor: ir.TensorProtocol, info: Any) -> None:
            bar.update(tensor.nbytes)

        ir.save(model, out / file, external_data=data, callback=progress, max_workers=1)
