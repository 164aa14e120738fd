"""Each operator added for ordinary exports: parity with onnxruntime, and its hostile forms.

Every graph is tiny ([N, 2, 6, 8] float input) and is checked against onnxruntime on a
batch size it was not folded at; every hostile form is refused with its own error.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from onnx_builders import init

from free_common.errors import (
    InvalidModelError,
    TensorLimitError,
    UnsupportedOperatorError,
)
from free_common.models.convert import convert
from free_common.models.shape_fold import fold_shapes

I64 = np.int64
F32 = np.float32
SHAPE = [2, 6, 8]


def _graph(
    nodes: list[onnx.NodeProto],
    initializers: list[TensorProto] = (),  # type: ignore[assignment]
    *,
    opset: int = 17,
    batch: int | str = "batch",
) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, *SHAPE])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _node(op: str, inputs: list[str], output: str = "y", **attrs: object) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [output], name=op.lower(), **attrs)


def _flatten_by_batch() -> list[onnx.NodeProto]:
    """The legacy exporter's ``x.view(x.size(0), -1)``: Shape, Gather, Unsqueeze, Concat."""
    return [
        _node("Shape", ["x"], "s"),
        _node("Gather", ["s", "zero"], "n", axis=0),
        _node("Unsqueeze", ["n", "axes0"], "n1"),
        _node("Concat", ["n1", "minus1"], "target", axis=0),
        _node("Reshape", ["x", "target"]),
    ]


_SHAPE_CONSTANTS = [
    init("zero", np.array(0, I64)),
    init("axes0", np.array([0], I64)),
    init("minus1", np.array([-1], I64)),
]

PARITY: dict[str, tuple[list[onnx.NodeProto], list[TensorProto], int]] = {
    "clip": (
        [_node("Clip", ["x", "lo", "hi"])],
        [init("lo", np.array(-0.5, F32)), init("hi", np.array(0.7, F32))],
        17,
    ),
    "clip-relu6": ([_node("Clip", ["x", "", "hi"])], [init("hi", np.array(0.2, F32))], 17),
    "hardswish": ([_node("HardSwish", ["x"])], [], 17),
    "hardsigmoid": ([_node("HardSigmoid", ["x"], alpha=0.3, beta=0.4)], [], 17),
    "gelu": ([_node("Gelu", ["x"])], [], 20),
    "gelu-tanh": ([_node("Gelu", ["x"], approximate="tanh")], [], 20),
    "erf": ([_node("Erf", ["x"])], [], 17),
    "softmax": ([_node("Softmax", ["x"], axis=1)], [], 17),
    "log-softmax": ([_node("LogSoftmax", ["x"], axis=-1)], [], 17),
    "layer-norm": (
        [_node("LayerNormalization", ["x", "scale", "bias"], axis=-1, epsilon=1e-5)],
        [
            init("scale", np.linspace(0.5, 1.5, 8, dtype=F32)),
            init("bias", np.linspace(-1, 1, 8, dtype=F32)),
        ],
        17,
    ),
    "layer-norm-2-axes": (
        [_node("LayerNormalization", ["x", "scale2"], axis=2)],
        [init("scale2", np.full((6, 8), 1.5, F32))],
        17,
    ),
    "transpose": ([_node("Transpose", ["x"], perm=[0, 2, 3, 1])], [], 17),
    "pad-constant": (
        [_node("Pad", ["x", "pads", "value"])],
        [init("pads", np.array([0, 0, 1, 2, 0, 0, 3, 1], I64)), init("value", np.array(0.5, F32))],
        17,
    ),
    "pad-reflect": (
        [_node("Pad", ["x", "pads2"], mode="reflect")],
        [init("pads2", np.array([0, 0, 1, 2, 0, 0, 2, 1], I64))],
        17,
    ),
    "pad-edge": (
        [_node("Pad", ["x", "pads2"], mode="edge")],
        [init("pads2", np.array([0, 0, 1, 2, 0, 0, 2, 1], I64))],
        17,
    ),
    "pad-axes": (
        [_node("Pad", ["x", "pads3", "", "axes3"])],
        [init("pads3", np.array([1, 2], I64)), init("axes3", np.array([-1], I64))],
        18,
    ),
    "shape-flatten": (_flatten_by_batch(), _SHAPE_CONSTANTS, 17),
    "gather": (
        [_node("Gather", ["x", "idx"], axis=2)],
        [init("idx", np.array([[5, 0], [-1, 2]], I64))],
        17,
    ),
    "gather-scalar": ([_node("Gather", ["x", "one"], axis=1)], [init("one", np.array(1, I64))], 17),
    "slice": (
        [_node("Slice", ["x", "st", "en", "ax", "sp"])],
        [
            init("st", np.array([1, -5], I64)),
            init("en", np.array([6, 2**62], I64)),
            init("ax", np.array([2, 3], I64)),
            init("sp", np.array([2, 1], I64)),
        ],
        17,
    ),
    "expand": (
        [_node("Expand", ["x", "eshape"])],
        [init("eshape", np.array([3, 1, 1, 1, 8], I64))],
        17,
    ),
    "where": (
        [_node("Where", ["cond", "x", "other"])],
        [init("cond", np.arange(8) % 3 == 0), init("other", np.full(8, -2.0, F32))],
        17,
    ),
    "pow": (
        [_node("Mul", ["x", "x"], "sq"), _node("Pow", ["sq", "p"])],
        [init("p", np.array(1.5, F32))],
        17,
    ),
    "sqrt-reciprocal": (
        [
            _node("Mul", ["x", "x"], "sq"),
            _node("Add", ["sq", "one_f"], "pos"),
            _node("Sqrt", ["pos"], "r"),
            _node("Reciprocal", ["r"]),
        ],
        [init("one_f", np.array(1.0, F32))],
        17,
    ),
    "split-concat": (
        [
            helper.make_node("Split", ["x", "sizes"], ["a", "b"], name="split", axis=3),
            _node("Concat", ["b", "a"], axis=3),
        ],
        [init("sizes", np.array([3, 5], I64))],
        17,
    ),
    "split-even": (
        [
            helper.make_node("Split", ["x"], ["a", "b"], name="split", axis=2, num_outputs=2),
            _node("Sub", ["a", "b"]),
        ],
        [],
        18,
    ),
    "cast-float": ([_node("Cast", ["x"], to=TensorProto.FLOAT)], [], 17),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_operator_matches_onnxruntime_on_any_batch(case: str) -> None:
    nodes, initializers, opset = PARITY[case]
    model = _graph(nodes, initializers, opset=opset)
    module = convert(model)
    images = np.random.default_rng(0).standard_normal((7, *SHAPE)).astype(F32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (want,) = session.run(None, {"x": images})
    x = torch.from_numpy(images).requires_grad_(True)
    got = module(x)
    assert got.shape == want.shape
    assert np.abs(got.detach().numpy() - want).max() < 1e-4
    (grad,) = torch.autograd.grad(got.sum(), x)  # differentiable, for inversion
    assert torch.isfinite(grad).all()


def test_shape_computations_fold_away_and_the_batch_is_filled_in_at_run_time() -> None:
    folded = fold_shapes(_graph(_flatten_by_batch(), _SHAPE_CONSTANTS))
    assert [n.op_type for n in folded.model.graph.node] == ["Reshape"]
    (affine,) = folded.batch_dependent.values()
    assert affine.at(4) == (4, -1)
    module = convert(_graph(_flatten_by_batch(), _SHAPE_CONSTANTS))
    assert module.graph.folded_nodes == 4
    assert module(torch.zeros(3, *SHAPE)).shape == (3, 96)


def test_a_fixed_batch_graph_runs_any_batch_in_groups() -> None:
    # A constant reshape target with the exported batch of 1 in it: exporters' default.
    model = _graph([_node("Reshape", ["x", "t"])], [init("t", np.array([1, -1], I64))], batch=1)
    module = convert(model)
    x = torch.randn(5, *SHAPE)
    assert module.graph.fixed_batch == 1
    assert torch.equal(module(x), x.reshape(5, -1))


def _refusal(nodes: list[onnx.NodeProto], initializers: list[TensorProto], opset: int = 17) -> None:
    convert(_graph(nodes, initializers, opset=opset))


HOSTILE: dict[str, tuple[list[onnx.NodeProto], list[TensorProto], type[Exception], str]] = {
    "softmax-axis-out-of-range": (
        [_node("Softmax", ["x"], axis=7)],
        [],
        InvalidModelError,
        "axis 7 is out of range",
    ),
    "gather-axis-out-of-range": (
        [_node("Gather", ["x", "one"], axis=-9)],
        [init("one", np.array(1, I64))],
        InvalidModelError,
        "out of range",
    ),
    "transpose-not-a-permutation": (
        [_node("Transpose", ["x"], perm=[0, 0, 1, 2])],
        [],
        InvalidModelError,
        "not a permutation",
    ),
    "layer-norm-axis": (
        [_node("LayerNormalization", ["x", "s"], axis=4)],
        [init("s", np.ones(8, F32))],
        InvalidModelError,
        "out of range",
    ),
    "negative-pad": (
        [_node("Pad", ["x", "neg"])],
        [init("neg", np.array([0, 0, -1, 0, 0, 0, 0, 0], I64))],
        UnsupportedOperatorError,
        "negative pads",
    ),
    "huge-pad": (
        [_node("Pad", ["x", "big"])],
        [init("big", np.array([0, 0, 0, 1000, 0, 0, 0, 0], I64))],
        TensorLimitError,
        "pads by 1000",
    ),
    "huge-expand-from-shape": (
        [
            _node("Shape", ["x"], "s"),
            _node("Mul", ["s", "k"], "big"),
            _node("Expand", ["x", "big"]),
        ],
        [init("k", np.array([1, 1, 4096, 4096], I64))],
        TensorLimitError,
        "expands to shape",
    ),
    "constant-of-shape-bomb-from-shape": (
        [
            _node("Shape", ["x"], "s"),
            _node("Mul", ["s", "k"], "big"),
            _node("ConstantOfShape", ["big"], "zeros"),
            _node("Add", ["x", "zeros"]),
        ],
        [init("k", np.array([1, 1000, 1000, 1000], I64))],
        TensorLimitError,
        "may create at most",
    ),
    "batch-squared": (
        [
            _node("Shape", ["x"], "s"),
            _node("Gather", ["s", "zero"], "n", axis=0),
            _node("Mul", ["n", "n"], "nn"),
            _node("Unsqueeze", ["nn", "axes0"], "nn1"),
            _node("Concat", ["nn1", "minus1"], "t", axis=0),
            _node("Reshape", ["x", "t"]),
        ],
        _SHAPE_CONSTANTS,
        UnsupportedOperatorError,
        "not an affine function of the batch size",
    ),
    "clip-min-above-max": (
        [_node("Clip", ["x", "hi", "lo"])],
        [init("lo", np.array(-1, F32)), init("hi", np.array(1, F32))],
        InvalidModelError,
        "exceeds max",
    ),
    "cast-to-int": (
        [_node("Cast", ["x"], to=TensorProto.INT64)],
        [],
        UnsupportedOperatorError,
        "cast to INT64",
    ),
    "negative-slice-step": (
        [_node("Slice", ["x", "st", "en", "ax", "sp"])],
        [
            init("st", np.array([5], I64)),
            init("en", np.array([0], I64)),
            init("ax", np.array([2], I64)),
            init("sp", np.array([-1], I64)),
        ],
        UnsupportedOperatorError,
        "only positive steps",
    ),
    "split-sizes-do-not-fit": (
        [
            helper.make_node("Split", ["x", "sz"], ["a", "b"], name="split", axis=3),
            _node("Add", ["a", "b"]),
        ],
        [init("sz", np.array([3, 2, 3], I64))],
        InvalidModelError,
        "do not fit",
    ),
    "gelu-unknown-approximation": (
        [_node("Gelu", ["x"], approximate="cubic")],
        [],
        UnsupportedOperatorError,
        "approximate",
    ),
    "where-on-a-run-time-condition": (
        [_node("Greater", ["x", "zero_f"], "c"), _node("Where", ["c", "x", "zero_f"])],
        [init("zero_f", np.array(0.0, F32))],
        UnsupportedOperatorError,
        "'Greater' is not supported",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_operator_forms_are_refused_with_a_reason(case: str) -> None:
    nodes, initializers, error, text = HOSTILE[case]
    with pytest.raises(error, match=text):
        _refusal(nodes, initializers, opset=20 if "gelu" in case else 17)


def test_large_constant_arithmetic_is_left_to_run_time_not_refused() -> None:
    # Two 40,000-value tables concatenated: more than a fold may make, but no shape bomb.
    table = np.linspace(-1, 1, 40_000, dtype=F32).reshape(1, 1, 5000, 8)
    nodes = [
        _node("Concat", ["t1", "t2"], "both", axis=2),
        _node("Slice", ["both", "st", "en", "ax"], "part"),
        _node("Add", ["x", "part"]),
    ]
    initializers = [
        init("t1", table),
        init("t2", -table),
        init("st", np.array([0], I64)),
        init("en", np.array([6], I64)),
        init("ax", np.array([2], I64)),
    ]
    module = convert(_graph(nodes, initializers))
    x = torch.zeros(2, *SHAPE)
    assert torch.equal(module(x), x + torch.from_numpy(table[:, :, :6]))
    assert module.graph.folded_nodes == 0
