"""Trace a model for the TorchScript ONNX exporter without computing anything: parameters and
inputs on the meta device, so an SD-XL U-Net at 1024 px traces in seconds and no memory.

The JIT tracer cannot run meta tensors by itself: the meta kernels written in Python read
tensor sizes, which the tracer turns into traced tensors, and fail. ``MetaTracing`` runs every
operator's meta kernel on a worker thread (no tracing state there) below the tracer, which still
records the operator as it would for real tensors. ``aten::convolution`` is the one operator the
tracer leaves to the one it calls (``aten::_convolution``); as the worker computes it in one go,
its node is recorded here, with the arguments the real call gives it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _run_below_autograd(func, args, kwargs):
    with torch._C._AutoDispatchBelowADInplaceOrView():
        return func(*args, **kwargs)


class MetaTracing(TorchDispatchMode):
    """Runs operators on meta tensors while ``torch.jit`` traces them (see the module docstring)."""

    def __enter__(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="meta-trace")
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._pool.shutdown()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and kwargs.get("device") is not None \
                and torch.device(kwargs["device"]).type == "cpu" and args[0].device.type == "meta":
            # Only the tracer's message about an untraced output prints a tensor: give it zeros.
            return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        out = self._pool.submit(_run_below_autograd, func, args, kwargs).result()
        if func is torch.ops.aten.convolution.default and torch._C._get_tracing_state() is not None:
            _record_convolution(args, out)
        return out


def _record_convolution(args, out: torch.Tensor) -> None:
    """Add the ``aten::_convolution`` node that tracing the real call records."""
    state = torch._C._get_tracing_state()
    graph = state.graph()
    x, weight, bias, stride, padding, dilation, transposed, output_padding, groups = args
    cudnn = torch.backends.cudnn

    def constant(value):
        return graph.insertConstant(value)

    def int_list(values):
        node = graph.create("prim::ListConstruct", [constant(int(v)) for v in values])
        node.output().setType(torch._C.ListType.ofInts())
        return graph.insertNode(node).output()

    def traced(tensor):
        value = torch._C._get_value_trace(tensor)
        if value is None:
            raise RuntimeError("meta tracing: a convolution's input is not traced")
        return value

    deterministic = cudnn.deterministic or torch.are_deterministic_algorithms_enabled()
    inputs = [traced(x), traced(weight), traced(bias) if bias is not None else graph.insertConstant(None),
              int_list(stride), int_list(padding), int_list(dilation), constant(bool(transposed)),
              int_list(output_padding), constant(int(groups)), constant(bool(cudnn.benchmark)),
              constant(bool(deterministic)), constant(bool(cudnn.enabled)), constant(bool(cudnn.allow_tf32))]
    node = graph.insertNode(graph.create("aten::_convolution", inputs))
    node.output().inferTypeFrom(out)
    torch._C._set_value_trace(out, node.output())


@contextlib.contextmanager
def tracing_on_meta():
    """Within it, ``torch.onnx.export(dynamo=False)`` traces its model under ``MetaTracing``; the
    exporter's own passes after the trace (which run operators on constants) run as usual."""
    from torch.onnx._internal.torchscript_exporter import utils

    original = utils._trace_and_get_graph_from_model

    def traced(model, args):
        with MetaTracing():
            graph, out = original(model, args)
        _constants_on_cpu(graph)
        return graph, out

    # Deduplicating initializers compares their values, which meta tensors do not have; equal
    # weights are stored once by content when they are written (``WeightStore``).
    dedup = torch._C._jit_pass_onnx_deduplicate_initializers
    utils._trace_and_get_graph_from_model = traced
    torch._C._jit_pass_onnx_deduplicate_initializers = lambda graph, params, training: params
    try:
        yield
    finally:
        utils._trace_and_get_graph_from_model = original
        torch._C._jit_pass_onnx_deduplicate_initializers = dedup


def _constants_on_cpu(graph) -> None:
    """Point the trace's device constants at the CPU: the exporter's constant propagation runs
    nodes with constant inputs (``arange``, ``zeros``... on the activations' device), and their
    values must be real to become the graph's constants."""
    for node in list(graph.nodes()):
        if node.kind() == "prim::Constant" and node.output().type().kind() == "DeviceObjType" \
                and node.output().toIValue().type == "meta":
            with graph.insert_point_guard(node):
                cpu = graph.insertConstant(torch.device("cpu"))
            node.output().replaceAllUsesWith(cpu)
            node.destroy()
