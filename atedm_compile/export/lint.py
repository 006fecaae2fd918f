"""TensorRT-compatibility lint of an ONNX graph, runnable without TensorRT.

The rules are the deployment facts the pruning ops were written for (PAPER.md section 5):

- ``forbidden-op``: no operator whose output shape depends on data (NonZero, Unique, ...) and no
  custom-domain operator.
- ``topk-k``: TopK's K is a constant (an initializer or a Constant node) and at most 3840.
- ``scatter-reduction``: ScatterElements / ScatterND without a reduction.
- ``static-io``: every graph input and output has a fully static shape.
- ``data-dependent-shape``: no shape-like operand (Reshape's shape, Expand's shape, Slice's
  bounds, ...) is computed from tensor values; shapes of tensors (``Shape``) are fine, since the
  inputs are static.
- ``opset``: the default-domain opset is one the TensorRT 10 ONNX parser reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MAX_TOPK = 3840
OPSETS = range(9, 21)
FORBIDDEN_OPS = ("NonZero", "Unique", "Compress", "NonMaxSuppression", "StringNormalizer", "TfIdfVectorizer")
# Operand positions that TensorRT needs at build time (shape tensors).
SHAPE_OPERANDS = {
    "Reshape": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "ConstantOfShape": (0,),
    "Slice": (1, 2, 3, 4),
    "Range": (0, 1, 2),
    "Resize": (2, 3),
    "Upsample": (1,),
    "Pad": (1, 3),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "Split": (1,),
    "OneHot": (1,),
    "TopK": (1,),
    "ReduceSum": (1,),
    "ReduceMean": (1,),
    "ReduceMax": (1,),
}
# Outputs that carry only shapes, never values of the graph inputs.
_SHAPE_SOURCES = ("Shape", "Size")


@dataclass(frozen=True)
class LintIssue:
    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.node}: {self.message}"


def lint_model(model) -> list[LintIssue]:
    """Lint an ``onnx.ModelProto`` (external data need not be loaded). Returns the issues found."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    issues: list[LintIssue] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset not in OPSETS:
        issues.append(LintIssue("opset", "model", f"default-domain opset {opset} is outside {OPSETS.start}.."
                                                  f"{OPSETS.stop - 1}, what the TensorRT 10 ONNX parser reads"))
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if not value.type.tensor_type.HasField("shape") or any(not d.HasField("dim_value") for d in dims):
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
            issues.append(LintIssue("static-io", value.name, f"shape {shape} is not static"))

    constants: dict[str, object] = {t.name: t for t in graph.initializer}
    initializers = set(constants)
    tainted = {i.name for i in graph.input if i.name not in initializers}
    for node in graph.node:
        where = node.name or f"{node.op_type}({', '.join(node.output)})"
        if node.domain not in ("", "ai.onnx"):
            issues.append(LintIssue("forbidden-op", where, f"custom-domain operator {node.domain}::{node.op_type}"))
        if node.op_type in FORBIDDEN_OPS:
            issues.append(LintIssue("forbidden-op", where, f"{node.op_type} has a data-dependent output shape"))
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    constants[node.output[0]] = attribute.t
        if node.op_type in ("ScatterElements", "ScatterND"):
            reduction = next((a.s.decode() for a in node.attribute if a.name == "reduction"), "none")
            if reduction != "none":
                issues.append(LintIssue("scatter-reduction", where,
                                        f"{node.op_type} with reduction={reduction!r}: TensorRT rejects it or "
                                        f"computes it wrongly; use no reduction"))
        if node.op_type == "TopK":
            k_name = node.input[1] if len(node.input) > 1 else None
            if k_name not in constants:
                issues.append(LintIssue("topk-k", where, f"K ({k_name}) is computed, not a constant"))
            else:
                k = int(numpy_helper.to_array(constants[k_name]).reshape(-1)[0])
                if k > MAX_TOPK:
                    issues.append(LintIssue("topk-k", where, f"K={k} exceeds TensorRT's limit of {MAX_TOPK}"))
        for position in SHAPE_OPERANDS.get(node.op_type, ()):
            if position < len(node.input) and node.input[position] in tainted:
                issues.append(LintIssue("data-dependent-shape", where,
                                        f"operand {position} ({node.input[position]}) is computed from tensor "
                                        f"values, so the output shape depends on the data"))
        if node.op_type not in _SHAPE_SOURCES and any(name in tainted for name in node.input):
            tainted.update(node.output)
        for attribute in node.attribute:
            if attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                issues.append(LintIssue("forbidden-op", where, f"{node.op_type} with a subgraph: control flow "
                                                               f"is not allowed in a phase graph"))
    return issues


def lint_file(path: Path) -> list[LintIssue]:
    """``onnx.checker`` (it reads the external data files too) and ``lint_model`` of one file."""
    import onnx

    onnx.checker.check_model(str(path), full_check=False)
    return lint_model(onnx.load(str(path), load_external_data=False))
