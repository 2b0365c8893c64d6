"""A small ``onnx.helper`` wrapper that collects nodes and initializers under readable, unique names.

Names are hierarchical (``<block>.<attention>/q_rope/Mul``), given in a fixed order, so equal inputs
build byte-identical graphs. A node's output tensor is named like the node (``name:i`` for output ``i > 0``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
from onnx import NodeProto, TensorProto, helper, numpy_helper


class GraphBuilder:
    """Nodes and initializers of one graph; :meth:`op` adds a node, :meth:`const` an initializer."""

    def __init__(self) -> None:
        self.nodes: list[NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._scopes: list[str] = []
        self._used: set[str] = set()

    @contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Prefix every name made inside the block with ``name/``."""
        self._scopes.append(name)
        try:
            yield
        finally:
            self._scopes.pop()

    def _name(self, name: str) -> str:
        """``name`` under the current scopes; a second use of the same full name is a programming error."""
        full = "/".join([*self._scopes, name])
        if full in self._used:
            raise ValueError(f"duplicate name {full!r} in the ONNX graph")
        self._used.add(full)
        return full

    def const(self, name: str, array: np.ndarray | TensorProto, *, scoped: bool = True) -> str:
        """Add ``array`` (numpy, ml_dtypes sub-byte types packed by ``numpy_helper``) as an initializer."""
        full = self._name(name) if scoped else self._claim(name)
        if isinstance(array, TensorProto):
            tensor = TensorProto()
            tensor.CopyFrom(array)
            tensor.name = full
        else:
            tensor = numpy_helper.from_array(np.asarray(array, order="C"), full)  # keeps 0-d scalars
        self.initializers.append(tensor)
        return full

    def _claim(self, full: str) -> str:
        if full in self._used:
            raise ValueError(f"duplicate name {full!r} in the ONNX graph")
        self._used.add(full)
        return full

    def op(self, op_type: str, inputs: Sequence[str], name: str | None = None, *, outputs: int = 1,
           output_names: Sequence[str] | None = None, **attrs: Any) -> Any:
        """Add a node ``op_type(inputs)``; return its output name, or the list of names for ``outputs > 1``.

        ``output_names`` names the outputs explicitly (unscoped, e.g. the graph's ``logits``).
        """
        full = self._name(name or op_type)
        if output_names is None:
            output_names = [full if i == 0 else f"{full}:{i}" for i in range(outputs)]
        else:
            for out in output_names:
                if out != full:
                    self._claim(out)
        self.nodes.append(helper.make_node(op_type, list(inputs), list(output_names), name=full, **attrs))
        return output_names[0] if len(output_names) == 1 else list(output_names)
