"""Export one phase of a pruned U-Net to ONNX: with the U-Net's weights (``export_phase``), or
traced on meta tensors without them and the weights made one at a time afterwards
(``export_graph_on_meta``, ``weight_arrays``). The phase graphs' weights then go into one shared
file (``shared_weights``, whose names this module re-exports).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from ..devices import resolve_dtype
from .contract import FEATURES_NAME, OUTPUT_NAME, TensorSpec
from .shared_weights import (MIN_SHARED_BYTES, WeightStore, content_key, external_initializers,  # noqa: F401
                             share_weights)

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_OPSET = 17
# 14: the first opset with scaled dot-product attention's parts; 20: the TorchScript exporter's last.
OPSETS = range(14, 21)


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
            tensors[name] = torch.full(spec.shape, 999.0, dtype=resolve_dtype(spec.dtype))
        else:
            tensors[name] = torch.randn(spec.shape, generator=generator).to(resolve_dtype(spec.dtype))
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

