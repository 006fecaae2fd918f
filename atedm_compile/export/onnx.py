"""Export one phase of a pruned U-Net to ONNX, and move the phase graphs' weights into one shared
file.

Every phase graph is the same U-Net with different blocks pruned, so the graphs hold the same
parameters. ``WeightStore`` keeps each distinct tensor (by content) once in ``weights.bin``;
each phase's ``.onnx`` file holds only its graph and points at offsets in that file through
ONNX external data. The runtime then maps ``weights.bin`` once and hands the same buffers to
every phase session.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..files import publish, temp_prefix
from .manifest import FEATURES_NAME, OUTPUT_NAME, TensorSpec

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


def graph_module(unet: torch.nn.Module, input_names: list[str], role: str | None = None,
                 branch: int | None = None) -> tuple[torch.nn.Module, list[str]]:
    """(module, output names) of one graph: ``UNetSignature`` -> ``latent`` (role None: a build
    without cached steps); ``caching.FullStep`` -> ``latent``, ``deep_features`` (``full``);
    ``caching.CachedStep`` (the inputs end with ``deep_features``) -> ``latent`` (``cached``)."""
    if role is None:
        return UNetSignature(unet, input_names), [OUTPUT_NAME]
    from ..caching import CachedStep, FullStep

    if role == "full":
        return FullStep(unet, branch, input_names), [OUTPUT_NAME, FEATURES_NAME]
    if role == "cached":
        return CachedStep(unet, branch, input_names), [OUTPUT_NAME]
    raise ValueError(f"role={role!r} is not allowed; choose 'full', 'cached' or None")


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
    role: str | None = None,
    branch: int | None = None,
) -> Path:
    """Export ``unet`` as it runs now (the caller has selected the phase with ``runner.use_phase``)
    to ``path``, with static shapes ``inputs`` and the output ``latent`` (a full or cached step of a
    build with cached steps: ``role`` and ``branch``, see ``graph_module``).

    Weights go into external data next to ``path`` when the model is over 2 GB (both exporters
    do this themselves), so ``path`` should be in a directory of its own.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter={exporter!r} is not allowed; choose one of {list(EXPORTERS)}")
    device = next(unet.parameters()).device
    args = tuple(example_inputs(inputs, device=device).values())
    wrapper, outputs = graph_module(unet, list(inputs), role, branch)
    names = dict(input_names=list(inputs), output_names=outputs)
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


UNFOLDED = "unfolded.onnx"


def export_graph_on_meta(unet: torch.nn.Module, inputs: dict[str, TensorSpec], directory: Path,
                         opset: int = DEFAULT_OPSET, role: str | None = None, branch: int | None = None) -> None:
    """Export ``unet``, whose parameters are on the meta device (the caller has selected the phase
    with ``runner.use_phase``), with the TorchScript exporter without computing anything: two
    graphs without weights in ``directory``, ``model.onnx`` (the graph ``export_phase`` makes,
    constant folding included, taking the weights as inputs) and ``unfolded.onnx`` (the graph
    before constant folding, where ``weight_arrays`` finds how the folded weights are made).
    ``role``, ``branch``: a full or cached step of a build with cached steps (``graph_module``).
    """
    from .metatrace import tracing_on_meta

    args = tuple(example_inputs(inputs, device="meta").values())
    wrapper, outputs = graph_module(unet, list(inputs), role, branch)
    for name, fold in (("model.onnx", True), (UNFOLDED, False)):
        with torch.no_grad(), warnings.catch_warnings(), tracing_on_meta():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(wrapper, args, str(Path(directory) / name), opset_version=opset, dynamo=False,
                              do_constant_folding=fold, export_params=False, input_names=list(inputs),
                              output_names=outputs)


def weight_arrays(model, unfolded, state: dict[str, torch.Tensor], user_inputs, progress=None):
    """(name, array) of every weight that ``model`` (from ``export_graph_on_meta``) takes as a
    graph input, one at a time: parameters from ``state`` (``UNetSignature``'s state dict, real
    values), folded weights (a transposed or reshaped parameter, a constant the exporter
    computed) by running the nodes that make them in ``unfolded`` on the parameters they read.
    ``user_inputs``: the graph's own inputs (sample...); ``progress``: called with each array's bytes."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    user = set(user_inputs)
    consumers: dict[str, tuple[str, int]] = {}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, (node.name, index))
    nodes = {node.name: node for node in unfolded.graph.node}
    producer = {out: node for node in unfolded.graph.node for out in node.output}
    order = {id(node): i for i, node in enumerate(unfolded.graph.node)}
    unfolded_inputs = {i.name: i for i in unfolded.graph.input}
    for value in model.graph.input:
        name = value.name
        if name in user:
            continue
        if name in state:
            array = state[name].detach().cpu().numpy()
        else:
            where = consumers.get(name)
            node = nodes.get(where[0]) if where else None
            if node is None or len(node.input) <= where[1]:
                raise RuntimeError(f"cannot tell how the exporter made the weight {name!r}: its consumer "
                                   f"{where} is not in the graph before constant folding")
            target = node.input[where[1]]
            chain, reads, stack = {}, {}, [target]
            while stack:
                current = stack.pop()
                if current in unfolded_inputs:
                    reads[current] = unfolded_inputs[current]
                elif current in producer and id(producer[current]) not in chain:
                    chain[id(producer[current])] = producer[current]
                    stack.extend(i for i in producer[current].input if i)
                elif current not in producer:
                    raise RuntimeError(f"weight {name!r}: {current!r} is neither made in the graph nor an input")
            if any(n in user for n in reads):
                raise RuntimeError(f"weight {name!r} depends on the graph's inputs {sorted(set(reads) & user)}")
            graph = helper.make_graph(sorted(chain.values(), key=lambda n: order[id(n)]), "fold",
                                      list(reads.values()), [helper.make_value_info(target, helper.TypeProto())])
            folded = helper.make_model(graph, opset_imports=unfolded.opset_import, ir_version=unfolded.ir_version)
            feed = {n: state[n].detach().cpu().numpy() for n in reads}
            array = np.asarray(ReferenceEvaluator(folded).run(None, feed)[0])
            del feed
        expected = value.type.tensor_type
        if list(array.shape) != [d.dim_value for d in expected.shape.dim] or \
                helper.np_dtype_to_tensor_dtype(array.dtype) != expected.elem_type:
            raise RuntimeError(f"weight {name!r}: made {array.dtype}{list(array.shape)}, the graph expects "
                               f"{helper.tensor_dtype_to_np_dtype(expected.elem_type)}"
                               f"{[d.dim_value for d in expected.shape.dim]}")
        if progress is not None:
            progress(array.nbytes)
        yield name, array


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
        state = {"offset": self._end(), "handle": None, "tmp": None}

        def put(key: str, name: str, array: np.ndarray) -> dict:
            if key in self.index:
                return self.index[key]
            if state["handle"] is None:
                state["tmp"], state["handle"] = self._start_copy(state["offset"])
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
            if state["handle"] is not None:
                state["handle"].close()
                publish(state["tmp"], self.path)
        except BaseException:
            self.index = saved
            if state["handle"] is not None:
                state["handle"].close()
                Path(state["tmp"]).unlink(missing_ok=True)
            raise

    def _end(self) -> int:
        return max((entry["offset"] + entry["length"] for entry in self.index.values()), default=0)

    def _start_copy(self, kept: int):
        """A temporary file holding the first ``kept`` bytes of the store, open for writing."""
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=temp_prefix(self.path.name), suffix=".part")
        os.close(fd)
        try:
            kept = min(kept, self.path.stat().st_size if self.path.exists() else 0)
            handle = open(tmp, "r+b")
            if kept:
                with open(self.path, "rb") as source:
                    _copy_bytes(source, handle, kept)
            return tmp, handle
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


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
