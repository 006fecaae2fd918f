"""Export one phase of a pruned U-Net to ONNX, and move the phase graphs' weights into one shared
file.

Every phase graph is the same U-Net with different blocks pruned, so the graphs hold the same
parameters. ``WeightStore`` keeps each distinct tensor (by content) once in ``weights.bin``;
each phase's ``.onnx`` file holds only its graph and points at offsets in that file through
ONNX external data. The runtime then maps ``weights.bin`` once and hands the same buffers to
every phase session.
"""

from __future__ import annotations

import hashlib
import warnings
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..files import publish, temp_prefix
from .manifest import OUTPUT_NAME, TensorSpec

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_OPSET = 17
# 14: the first opset with scaled dot-product attention's parts; 20: the TorchScript exporter's last.
OPSETS = range(14, 21)
# Smaller initializers (shape constants, scalars) stay inside each graph: sharing them saves
# nothing and keeps the graphs readable.
MIN_SHARED_BYTES = 1024
_ALIGNMENT = 64

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class UNetSignature(torch.nn.Module):
    """The U-Net behind the export contract: named positional inputs -> ``latent``.

    ``text_embeds`` and ``time_ids`` (SD-XL) go back into ``added_cond_kwargs``.
    """

    def __init__(self, unet: torch.nn.Module, input_names: list[str]):
        super().__init__()
        self.unet = unet
        self.input_names = list(input_names)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        named = dict(zip(self.input_names, tensors))
        added = {k: named.pop(k) for k in ("text_embeds", "time_ids") if k in named}
        return self.unet(
            named["sample"], named["timestep"], encoder_hidden_states=named["encoder_hidden_states"],
            added_cond_kwargs=added or None, return_dict=False,
        )[0]


def example_inputs(specs: dict[str, TensorSpec], seed: int = 0, device="cpu") -> dict[str, torch.Tensor]:
    """Random inputs of the given specs (timestep: 999, the first step's, for a scalar spec)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, spec in specs.items():
        if name == "timestep":
            tensors[name] = torch.full(spec.shape, 999.0, dtype=_TORCH_DTYPES[spec.dtype])
        else:
            tensors[name] = torch.randn(spec.shape, generator=generator).to(_TORCH_DTYPES[spec.dtype])
    return {k: v.to(device) for k, v in tensors.items()}


def export_phase(
    unet: torch.nn.Module,
    inputs: dict[str, TensorSpec],
    path: Path,
    exporter: str = "torchscript",
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export ``unet`` as it runs now (the caller has selected the phase with ``runner.use_phase``)
    to ``path``, with static shapes ``inputs`` and the output ``latent``.

    Weights go into external data next to ``path`` when the model is over 2 GB (both exporters
    do this themselves), so ``path`` should be in a directory of its own.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter={exporter!r} is not allowed; choose one of {list(EXPORTERS)}")
    device = next(unet.parameters()).device
    args = tuple(example_inputs(inputs, device=device).values())
    wrapper = UNetSignature(unet, list(inputs))
    names = dict(input_names=list(inputs), output_names=[OUTPUT_NAME])
    with torch.no_grad(), warnings.catch_warnings():
        # Static shapes are the point of a step-specialised graph: the tracer's warnings that a
        # size became a constant say nothing new.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        if exporter == "torchscript":
            torch.onnx.export(wrapper, args, str(path), opset_version=opset, dynamo=False,
                              do_constant_folding=True, **names)
        else:
            torch.onnx.export(wrapper, args, str(path), opset_version=max(opset, 18), dynamo=True,
                              external_data=True, **names)
    return Path(path)


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
        taken = {entry["name"] for entry in self.index.values()}
        new: list[tuple[str, dict, np.ndarray]] = []
        offset = self._end()
        for key, name, array in tensors:
            if key in self.index:
                continue
            # Tool-made names (onnx::MatMul_123, ONNX Runtime's reorder_token_7) differ between
            # graphs and could name another value in the next phase's graph; a parameter's module
            # path (unet.conv_in.weight) or a content name cannot.
            preferred = name if _is_parameter_path(name) else f"shared::{key[:16]}"
            unique = preferred if preferred not in taken else f"{preferred}__{key[:12]}"
            taken.add(unique)
            offset += -offset % _ALIGNMENT
            entry = {"name": unique, "offset": offset, "length": int(array.nbytes), "dtype": array.dtype.name,
                     "shape": list(array.shape)}
            self.index[key] = entry
            new.append((key, entry, array))
            offset += array.nbytes
        if new:
            self._append(new)
        return {key: self.index[key] for key, _, _ in tensors}

    def _end(self) -> int:
        return max((entry["offset"] + entry["length"] for entry in self.index.values()), default=0)

    def _append(self, new) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=temp_prefix(self.path.name), suffix=".part")
        os.close(fd)
        try:
            kept = min(self._end_before(new), self.path.stat().st_size if self.path.exists() else 0)
            if kept:
                with open(self.path, "rb") as source, open(tmp, "r+b") as target:
                    _copy_bytes(source, target, kept)
            with open(tmp, "r+b") as handle:
                for _, entry, array in new:
                    handle.seek(entry["offset"])
                    handle.write(np.ascontiguousarray(array).tobytes())
            publish(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _end_before(self, new) -> int:
        added = {key for key, _, _ in new}
        return max((e["offset"] + e["length"] for k, e in self.index.items() if k not in added), default=0)


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
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def share_weights(model, store: WeightStore, min_bytes: int = MIN_SHARED_BYTES):
    """Move every initializer of ``model`` (an ``onnx.ModelProto`` with its data loaded) of at
    least ``min_bytes`` into ``store`` and point the graph at it. Returns the model.

    Initializers are renamed to the store's name for their content, so every phase graph calls a
    given tensor by the same name (the runtime shares buffers by name). ``Identity`` nodes that
    only alias an initializer (the TorchScript exporter's way of naming a parameter twice) are
    folded away first.
    """
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    _fold_initializer_aliases(graph)
    kept, shared, renames = [], [], {}
    for tensor in graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.nbytes < min_bytes:
            kept.append(tensor)
        else:
            shared.append((content_key(array), tensor.name, array))
    entries = store.add(shared)
    placed = set()
    for key, name, array in shared:
        entry = entries[key]
        renames[name] = entry["name"]
        if entry["name"] in placed:  # same content twice in this graph: one initializer serves both
            continue
        placed.add(entry["name"])
        external = onnx.TensorProto(name=entry["name"], data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
                                    dims=array.shape, data_location=onnx.TensorProto.EXTERNAL)
        for field_name, value in (("location", store.path.name), ("offset", entry["offset"]),
                                  ("length", entry["length"])):
            external.external_data.add(key=field_name, value=str(value))
        kept.append(external)
    local = {t.name for t in kept if t.data_location != onnx.TensorProto.EXTERNAL}
    local |= {name for node in graph.node for name in node.output} | {i.name for i in graph.input}
    clashes = sorted(local & placed)
    if clashes:
        raise RuntimeError(f"shared weight names {clashes[:5]} also name other values of this graph")
    del graph.initializer[:]
    graph.initializer.extend(kept)
    _rename_inputs(graph, {old: new for old, new in renames.items() if old != new})
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
