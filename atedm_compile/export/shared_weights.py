"""The phase graphs' weights in one shared file.

Every phase graph is the same U-Net with different blocks pruned, so the graphs hold the same
parameters. ``WeightStore`` keeps each distinct tensor (by content) once in ``weights.bin``;
each phase's ``.onnx`` file holds only its graph and points at offsets in that file through
ONNX external data. The runtime then maps ``weights.bin`` once and hands the same buffers to
every phase session.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import numpy as np

from ..files import replacing

# Smaller initializers (shape constants, scalars) stay inside each graph: sharing them saves
# nothing and keeps the graphs readable.
MIN_SHARED_BYTES = 1024
_ALIGNMENT = 64


class WeightStore:
    """Distinct weight tensors, each once, in one file; keyed by the sha256 of dtype, shape and bytes.

    ``index``: content key -> {name, offset, length, dtype, shape}. The file only grows by tensors
    not in the index: offsets already handed out stay valid, so phase graphs written earlier keep
    working, and bytes past the indexed ones (another writer's, an older build's) are dropped.
    """

    def __init__(self, path: Path, index: dict | None = None):
        self.path = Path(path)
        self.index: dict[str, dict] = dict(index or {})

    def add(self, tensors: list[tuple[str, str, np.ndarray]]) -> dict[str, dict]:
        """Store (key, preferred name, array) triples not stored yet; return the entry of every key.

        The new file is written under a temporary name and renamed over the old one.
        """
        with self.appending() as put:
            return {key: put(key, name, array) for key, name, array in tensors}

    @contextlib.contextmanager
    def appending(self):
        """``put(key, preferred name, array) -> entry``: tensors written one at a time as they are
        given (the caller need not hold them all), into a copy of the file that replaces it when
        the block ends; an error leaves the file and the index as they were."""
        saved = dict(self.index)
        taken = {entry["name"] for entry in self.index.values()}
        state = {"offset": self._end(), "handle": None}
        with contextlib.ExitStack() as stack:

            def put(key: str, name: str, array: np.ndarray) -> dict:
                if key in self.index:
                    return self.index[key]
                if state["handle"] is None:  # the first new tensor: a copy of the indexed bytes to append to
                    state["handle"] = stack.enter_context(open(stack.enter_context(replacing(self.path)), "r+b"))
                    kept = min(state["offset"], self.path.stat().st_size if self.path.exists() else 0)
                    if kept:
                        with open(self.path, "rb") as source:
                            _copy_bytes(source, state["handle"], kept)
                # Tool-made names (onnx::MatMul_123, ONNX Runtime's reorder_token_7) differ between
                # graphs and could name another value in the next phase's graph; a parameter's module
                # path (unet.conv_in.weight) or a content name cannot.
                preferred = name if _is_parameter_path(name) else f"shared::{key[:16]}"
                unique = preferred if preferred not in taken else f"{preferred}__{key[:12]}"
                taken.add(unique)
                offset = state["offset"] + -state["offset"] % _ALIGNMENT
                entry = {"name": unique, "offset": offset, "length": int(array.nbytes), "dtype": array.dtype.name,
                         "shape": list(array.shape)}
                state["handle"].seek(offset)
                state["handle"].write(memoryview(np.ascontiguousarray(array)).cast("B"))
                self.index[key] = entry
                state["offset"] = offset + array.nbytes
                return entry

            try:
                yield put
            except BaseException:
                self.index = saved
                raise

    def _end(self) -> int:
        return max((entry["offset"] + entry["length"] for entry in self.index.values()), default=0)


def _copy_bytes(source, target, count: int, chunk: int = 1 << 24) -> None:
    while count > 0:
        block = source.read(min(chunk, count))
        if not block:
            break
        target.write(block)
        count -= len(block)


def _is_parameter_path(name: str) -> bool:
    return "." in name and "/" not in name and ":" not in name and not name.startswith(".")


def content_key(array: np.ndarray) -> str:
    digest = hashlib.sha256(f"{array.dtype.str}{tuple(array.shape)}".encode())
    digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return digest.hexdigest()


def share_weights(model, store: WeightStore, min_bytes: int = MIN_SHARED_BYTES, arrays=None):
    """Move every initializer of ``model`` (an ``onnx.ModelProto`` with its data loaded) of at
    least ``min_bytes`` into ``store`` and point the graph at it. Returns the model.

    Initializers are renamed to the store's name for their content, so every phase graph calls a
    given tensor by the same name (the runtime shares buffers by name). ``Identity`` nodes that
    only alias an initializer (the TorchScript exporter's way of naming a parameter twice) are
    folded away first.

    ``arrays``: for a graph exported without its weights (they are graph inputs), an iterable of
    (name, array) pairs that produces them one at a time: each is written, then dropped, so the
    weights are never held twice; they become the graph's initializers.
    """
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    if arrays is None:
        _fold_initializer_aliases(graph)
        tensors = [(t.name, numpy_helper.to_array(t), t) for t in graph.initializer]
    else:
        tensors = ((name, array, None) for name, array in arrays)
    kept, renames, placed, given = [], {}, set(), set()
    with store.appending() as put:
        for name, array, tensor in tensors:
            given.add(name)
            if array.nbytes < min_bytes:
                kept.append(tensor if tensor is not None else numpy_helper.from_array(array, name))
                continue
            entry = put(content_key(array), name, array)
            renames[name] = entry["name"]
            if entry["name"] in placed:  # same content twice in this graph: one initializer serves both
                continue
            placed.add(entry["name"])
            external = onnx.TensorProto(name=entry["name"], dims=array.shape, data_location=onnx.TensorProto.EXTERNAL,
                                        data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
            for field_name, value in (("location", store.path.name), ("offset", entry["offset"]),
                                      ("length", entry["length"])):
                external.external_data.add(key=field_name, value=str(value))
            kept.append(external)
    if arrays is not None:
        inputs = [i for i in graph.input if i.name not in given]
        del graph.input[:]
        graph.input.extend(inputs)
    local = {t.name for t in kept if t.data_location != onnx.TensorProto.EXTERNAL}
    local |= {name for node in graph.node for name in node.output} | {i.name for i in graph.input}
    clashes = sorted(local & placed)
    if clashes:
        raise RuntimeError(f"shared weight names {clashes[:5]} also name other values of this graph")
    del graph.initializer[:]
    graph.initializer.extend(kept)
    _rename_inputs(graph, {old: new for old, new in renames.items() if old != new})
    if arrays is not None:
        _fold_initializer_aliases(graph)
    return model


def _fold_initializer_aliases(graph) -> None:
    initializers = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias: dict[str, str] = {}
    nodes = []
    for node in graph.node:
        source = alias.get(node.input[0], node.input[0]) if node.input else None
        if node.op_type == "Identity" and source in initializers and node.output[0] not in outputs:
            alias[node.output[0]] = source
        else:
            nodes.append(node)
    if alias:
        del graph.node[:]
        graph.node.extend(nodes)
        _rename_inputs(graph, alias)


def _rename_inputs(graph, mapping: dict[str, str]) -> None:
    """Rename tensor uses in the graph and its subgraphs (If / Loop bodies)."""
    import onnx

    if not mapping:
        return
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _rename_inputs(attribute.g, mapping)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    _rename_inputs(subgraph, mapping)
    for output in graph.output:
        if output.name in mapping:
            output.name = mapping[output.name]


def external_initializers(model) -> list[str]:
    """Names of the initializers whose data lives in an external file."""
    import onnx

    return [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
