"""The ONNX -> torch converter: every allow-listed operator against onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from onnx_builders import init, tiny_model

from free_common.errors import UnsupportedOperatorError
from free_common.models.convert import CONVERTERS, convert
from free_common.models.onnx_static import ALLOWED_OPS
from free_common.models.shape_fold import FOLD_ONLY_OPS

RNG = np.random.default_rng(0)
F32 = np.float32


def _w(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(F32)


def _model(
    nodes: list[onnx.NodeProto],
    initializers: list[TensorProto],
    in_shape: tuple[int, ...] = (2, 4, 6, 6),
    opset: int = 17,
) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *in_shape[1:]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    # The output's shape is left to inference, which the checker then holds the graph to.
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def _n(op: str, inputs: list[str], output: str = "y", **attrs: object) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [output], name=f"{op.lower()}_{output}", **attrs)


CASES: dict[str, tuple[list[onnx.NodeProto], list[TensorProto], tuple[int, ...], int]] = {
    "avgpool-exclude-pad": ([_n("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2],
                                pads=[1, 1, 1, 1])], [], (2, 4, 6, 6), 17),
    "avgpool-include-pad-ceil": ([_n("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2],
                                     pads=[1, 1, 1, 1], count_include_pad=1, ceil_mode=1)],
                                 [], (2, 4, 7, 7), 17),
    "maxpool-ceil-dilated": ([_n("MaxPool", ["x"], kernel_shape=[2, 2], strides=[2, 2],
                                 dilations=[2, 2], ceil_mode=1)], [], (2, 4, 9, 9), 17),
    "conv-groups-strided": ([_n("Conv", ["x", "w"], group=2, strides=[2, 2], dilations=[2, 2],
                                pads=[2, 2, 2, 2])], [init("w", _w(6, 2, 3, 3))], (2, 4, 8, 8), 17),
    "conv-valid": ([_n("Conv", ["x", "w", "b"], auto_pad="VALID")],
                   [init("w", _w(3, 4, 3, 3)), init("b", _w(3))], (2, 4, 6, 6), 17),
    "leaky-sigmoid-tanh": ([_n("LeakyRelu", ["x"], "a", alpha=0.2), _n("Sigmoid", ["a"], "b"),
                            _n("Tanh", ["b"])], [], (2, 4, 6, 6), 17),
    "reshape-zero-and-minus-one": ([_n("Reshape", ["x", "s"])],
                                   [init("s", np.array([0, -1], np.int64))], (2, 4, 6, 6), 17),
    "reshape-allowzero": ([_n("Reshape", ["x", "s"], allowzero=1)],
                          [init("s", np.array([-1, 4, 36], np.int64))], (2, 4, 6, 6), 17),
    "flatten-axis-2": ([_n("Flatten", ["x"], axis=2)], [], (2, 4, 6, 6), 17),
    "matmul-constant": ([_n("Flatten", ["x"], "f"), _n("MatMul", ["f", "m"])],
                        [init("m", _w(144, 5))], (2, 4, 6, 6), 17),
    "matmul-runtime": ([_n("MatMul", ["x", "x"])], [], (2, 4, 6, 6), 17),
    "binary-with-constants": ([_n("Sub", ["x", "c"], "a"), _n("Mul", ["a", "c"], "b"),
                               _n("Div", ["b", "d"], "e"), _n("Add", ["e", "x"])],
                              [init("c", _w(1, 4, 1, 1)), init("d", np.full((1,), 2.0, F32))],
                              (2, 4, 6, 6), 17),
    "constant-node-and-identity": ([_n("Constant", [], "k", value=helper.make_tensor(
        "k", TensorProto.FLOAT, [1, 4, 1, 1], _w(4).tolist())), _n("Identity", ["k"], "k2"),
        _n("Dropout", ["x"], "dx"), _n("Add", ["dx", "k2"])], [], (2, 4, 6, 6), 17),
    "reducemean-attr-axes": ([_n("ReduceMean", ["x"], axes=[2, 3], keepdims=0)], [],
                             (2, 4, 6, 6), 17),
    "reducemean-input-axes": ([_n("ReduceMean", ["x", "ax"], keepdims=1)],
                              [init("ax", np.array([-1], np.int64))], (2, 4, 6, 6), 18),
    "reducemean-all": ([_n("ReduceMean", ["x"], keepdims=0)], [], (2, 4, 6, 6), 17),
    "squeeze-unsqueeze": ([_n("GlobalMaxPool", ["x"], "p"), _n("Squeeze", ["p", "sq"], "s"),
                           _n("Unsqueeze", ["s", "uq"])],
                          [init("sq", np.array([2, 3], np.int64)),
                           init("uq", np.array([1, -1], np.int64))], (2, 4, 6, 6), 13),
    "concat": ([_n("Relu", ["x"], "r"), _n("Concat", ["x", "r"], axis=1)], [], (2, 4, 6, 6), 17),
    "gemm-alpha-beta-untransposed": ([_n("Flatten", ["x"], "f"), _n("Gemm", ["f", "w", "c"],
                                      alpha=0.5, beta=2.0)],
                                     [init("w", _w(144, 5)), init("c", _w(1, 5))],
                                     (2, 4, 6, 6), 17),
    "gemm-runtime-operands": ([_n("Flatten", ["x"], "f"), _n("Gemm", ["f", "f"], transA=1)], [],
                              (2, 4, 6, 6), 17),
    "batchnorm-rank-2": ([_n("Flatten", ["x"], "f"), _n("BatchNormalization",
                          ["f", "s", "b", "m", "v"], epsilon=1e-3)],
                         [init("s", _w(144)), init("b", _w(144)), init("m", _w(144)),
                          init("v", np.abs(_w(144)) + 0.1)], (2, 4, 6, 6), 17),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_operator_matches_onnxruntime_and_passes_gradients(case: str) -> None:
    nodes, initializers, in_shape, opset = CASES[case]
    model = _model(nodes, initializers, in_shape, opset)
    x = RNG.standard_normal((3, *in_shape[1:])).astype(F32)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    module = convert(model)
    image = torch.from_numpy(x).requires_grad_(True)
    got = module(image)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    got.square().sum().backward()
    assert image.grad is not None and torch.isfinite(image.grad).all()


def test_every_allowed_operator_has_a_converter() -> None:
    # Constant and the shape-only operators are folded at conversion, never layers.
    assert set(CONVERTERS) | {"Constant"} | FOLD_ONLY_OPS == set(ALLOWED_OPS)
    assert not FOLD_ONLY_OPS & set(CONVERTERS)


def test_converted_module_is_frozen_and_keeps_batch_norm_statistics() -> None:
    model = tiny_model()
    module = convert(model)
    (bn,) = module.batch_norms
    assert isinstance(bn, torch.nn.BatchNorm2d)
    mean = onnx.numpy_helper.to_array(
        next(t for t in model.graph.initializer if t.name == "bn.mean")
    )
    assert np.array_equal(bn.running_mean.numpy(), mean)
    module.train()
    assert not module.training and not bn.training
    seen: list[torch.Tensor] = []
    bn.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0]))
    module(torch.randn(4, 1, 8, 8) * 5 + 3)
    assert np.array_equal(bn.running_mean.numpy(), mean), "a forward pass changed the statistics"
    assert len(seen) == 1 and seen[0].shape == (4, 4, 8, 8)
    assert not any(p.requires_grad for p in module.parameters())


def test_convolutions_keep_their_weights_and_activations_channels_last() -> None:
    # The generator's images are channels-last; weights in the same layout spare mkldnn a
    # reorder of every activation (benchmarks/results/memory-format.md).
    module = convert(
        _model([_n("Conv", ["x", "w"], pads=[1, 1, 1, 1])], [init("w", _w(3, 4, 3, 3))])
    )
    (conv,) = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    images = torch.rand(2, 4, 6, 6).to(memory_format=torch.channels_last)
    assert module(images).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    ("node", "initializers", "message"),
    [
        (_n("Conv", ["x", "w"], pads=[0, 0, 1, 1]), [init("w", _w(3, 4, 3, 3))], "symmetric"),
        (_n("Conv", ["x", "w"], auto_pad="SAME_UPPER"), [init("w", _w(3, 4, 3, 3))], "auto_pad"),
        (_n("MaxPool", ["x"], kernel_shape=[2, 2], storage_order=1), [], "storage_order"),
        (_n("AveragePool", ["x"], kernel_shape=[2, 2], pads=[2, 2, 2, 2]), [], "half the kernel"),
        (_n("Reshape", ["x", "x"]), [], "must be a constant"),
    ],
)
def test_unsupported_forms_are_refused(
    node: onnx.NodeProto, initializers: list[TensorProto], message: str
) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([node], "g", [x], [y], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(UnsupportedOperatorError, match=message):
        convert(model)


def test_the_readme_lists_every_operator_intake_accepts() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## What models can I submit?")[1].split("\n## ")[0]
    assert all(f"`{op}`" in section for op in ALLOWED_OPS)
