"""The TensorRT-compatibility lint: each rule fires on a graph built to break it, and stays quiet
on the same graph written the allowed way."""

import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from atedm_compile import ops
from atedm_compile.export.lint import lint_file, lint_model


def _model(nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _value(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _rules(model):
    return sorted({issue.rule for issue in lint_model(model)})


def _topk(k):
    return _model([helper.make_node("TopK", ["x", "k"], ["values", "indices"], axis=-1)],
                  [_value("x", [2, 5000])], [_value("values", [2, k]), _value("indices", [2, k], TensorProto.INT64)],
                  [numpy_helper.from_array(torch.tensor([k]).numpy(), "k")])


def test_topk_with_constant_k_passes():
    assert _rules(_topk(3840)) == []


def test_topk_above_the_limit_fails():
    issues = lint_model(_topk(3841))
    assert [i.rule for i in issues] == ["topk-k"] and "K=3841 exceeds" in issues[0].message


def test_topk_with_computed_k_fails():
    model = _model([helper.make_node("TopK", ["x", "k"], ["values", "indices"])],
                   [_value("x", [2, 8]), _value("k", [1], TensorProto.INT64)],
                   [_value("values", [2, 3]), _value("indices", [2, 3], TensorProto.INT64)])
    assert "topk-k" in _rules(model)


@pytest.mark.parametrize("reduction, expected", [(None, []), ("none", []), ("add", ["scatter-reduction"])])
def test_scatter_reduction(reduction, expected):
    attributes = {"axis": 1} | ({"reduction": reduction} if reduction else {})
    node = helper.make_node("ScatterElements", ["data", "index", "update"], ["out"], **attributes)
    model = _model([node], [_value("data", [2, 8]), _value("index", [2, 3], TensorProto.INT64),
                            _value("update", [2, 3])], [_value("out", [2, 8])], opset=18)
    assert _rules(model) == expected


def test_dynamic_input_fails():
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_value("x", ["batch", 4])], [_value("y", ["batch", 4])])
    issues = lint_model(model)
    assert {i.rule for i in issues} == {"static-io"} and "['batch', 4]" in issues[0].message


def test_shape_from_values_fails_but_shape_from_shapes_passes():
    # Reshape to Shape(x): static. Reshape to a shape computed from x's values: data-dependent.
    by_shape = _model([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["y"])],
                      [_value("x", [2, 4])], [_value("y", [2, 4])])
    by_value = _model([helper.make_node("Cast", ["x"], ["s"], to=TensorProto.INT64),
                       helper.make_node("Reshape", ["x", "s"], ["y"])],
                      [_value("x", [2])], [_value("y", [2])])
    assert _rules(by_shape) == []
    assert _rules(by_value) == ["data-dependent-shape"]


def test_old_opset_fails():
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_value("x", [4])], [_value("y", [4])], opset=8)
    assert _rules(model) == ["opset"]


class _SelectByMask(torch.nn.Module):
    """Keeps the tokens above the mean score: the data-dependent selection AT-EDM must not use."""

    def forward(self, x):  # x: [B, N, C]
        scores = x.sum(-1)
        return x[scores > scores.mean()]


class _SelectTopK(torch.nn.Module):
    """The same idea the way ops does it: a static k, TopK and GatherElements."""

    def forward(self, x):
        index = ops.select_top_k(x.sum(-1), ops.keep_count(x.shape[1], 0.5))
        return ops.scatter_tokens(torch.zeros_like(x), index, ops.gather_tokens(x, index))


def _export(module, path):
    torch.onnx.export(module, (torch.randn(2, 16, 8),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    return path


def test_catches_an_exported_graph_with_a_forbidden_operator(tmp_path):
    issues = lint_file(_export(_SelectByMask(), tmp_path / "mask.onnx"))
    assert "NonZero" in {n.op_type for n in onnx.load(str(tmp_path / "mask.onnx")).graph.node}
    assert {"forbidden-op", "static-io"} <= {i.rule for i in issues}
    assert any("NonZero" in i.message for i in issues)


def test_passes_the_same_selection_written_with_topk(tmp_path):
    assert lint_file(_export(_SelectTopK(), tmp_path / "topk.onnx")) == []
