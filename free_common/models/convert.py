"""Convert an allow-listed ONNX graph into a frozen, differentiable torch module.

Our own converter, instead of onnx2torch: that package lacks the opset 19+
forms of Reshape/Shape, and its torchvision dependency replaces the CPU torch
build on install (`reference/onnx.md`, section 0). Covering only
`onnx_static.ALLOWED_OPS` keeps the audit surface small, and the converter
never touches the filesystem: it refuses external data before it decodes any
tensor.

Layers with weights become real torch modules (``nn.Conv2d``, ``nn.BatchNorm1d``
/ ``nn.BatchNorm2d`` with the running statistics, ``nn.Linear``), so forward hooks
on batch norm work for statistics losses; the rest become small functional
modules. The result is in eval mode with every parameter frozen, and gradients
flow from the logits to the input image.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from free_common.errors import (
    ExternalDataError,
    InvalidModelError,
    UnsupportedOperatorError,
)

__all__ = ["CONVERTERS", "OnnxModule", "convert"]


class OnnxModule(nn.Module):
    """A frozen torch module that computes an ONNX graph, node by node.

    Attributes
    ----------
    layers
        One module per ONNX node that computes something, in graph order; keys are
        ``n<index>_<onnx node name>``.
    input_name, output_name
        Names of the graph's input and output.
    """

    def __init__(
        self,
        layers: nn.ModuleDict,
        plan: list[tuple[str, tuple[str, ...], str]],
        constants: dict[str, torch.Tensor],
        input_name: str,
        output_name: str,
    ) -> None:
        super().__init__()
        self.layers = layers
        self.input_name = input_name
        self.output_name = output_name
        self._plan = plan
        self._constant_slots: dict[str, str] = {}
        for index, (name, value) in enumerate(constants.items()):
            slot = f"const{index}"
            self.register_buffer(slot, value)
            self._constant_slots[name] = slot
        self.eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> OnnxModule:
        """Stay in eval mode whatever `mode` says: a teacher's running statistics never change."""
        del mode
        return super().train(False)

    @property
    def batch_norms(self) -> list[nn.modules.batchnorm._BatchNorm]:
        """The batch-norm layers, in graph order (for statistics losses via forward hooks)."""
        return [m for m in self.layers.values() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the graph output (logits) for the graph input `x`."""
        values: dict[str, torch.Tensor] = {self.input_name: x}
        for key, inputs, output in self._plan:
            args = [
                values[name] if name in values else getattr(self, self._constant_slots[name])
                for name in inputs
            ]
            values[output] = self.layers[key](*args)
        return values[self.output_name]


@dataclass
class _Context:
    """What a node converter may look up: constants known at conversion time and ranks."""

    constants: dict[str, np.ndarray]
    ranks: dict[str, int]

    def constant(self, node: onnx.NodeProto, index: int, what: str) -> np.ndarray:
        name = node.input[index] if index < len(node.input) else ""
        if name not in self.constants:
            raise UnsupportedOperatorError(
                f"{node.op_type} node {node.name!r:.60}: its {what} must be a constant "
                "(an initializer); export with static weights and shapes"
            )
        return self.constants[name]

    def optional_constant(self, node: onnx.NodeProto, index: int) -> np.ndarray | None:
        name = node.input[index] if index < len(node.input) else ""
        return self.constants.get(name) if name else None

    def rank(self, name: str) -> int:
        if name not in self.ranks:
            raise InvalidModelError(f"shape inference does not know the rank of {name!r:.60}")
        return self.ranks[name]


Converted = tuple[nn.Module, tuple[str, ...]]
"""A module and the names of the node inputs it takes at run time."""


class _Attributes:
    """Typed access to a node's attributes, with the ONNX defaults given by the caller."""

    def __init__(self, node: onnx.NodeProto) -> None:
        self._by_name = {a.name: a for a in node.attribute}

    def get_int(self, name: str, default: int) -> int:
        attr = self._by_name.get(name)
        return default if attr is None else int(attr.i)

    def get_float(self, name: str, default: float) -> float:
        attr = self._by_name.get(name)
        return default if attr is None else float(attr.f)

    def get_ints(self, name: str) -> tuple[int, ...] | None:
        attr = self._by_name.get(name)
        return None if attr is None else tuple(int(v) for v in attr.ints)

    def get_text(self, name: str, default: str) -> str:
        attr = self._by_name.get(name)
        return default if attr is None else bytes(attr.s).decode(errors="replace")


def _unsupported(node: onnx.NodeProto, problem: str) -> UnsupportedOperatorError:
    return UnsupportedOperatorError(f"{node.op_type} node {node.name!r:.60}: {problem}")


def _param(array: np.ndarray) -> nn.Parameter:
    return nn.Parameter(torch.tensor(array, dtype=torch.float32))


@dataclass(frozen=True)
class _Window:
    """Kernel, stride, symmetric padding and dilation of a 2-D Conv or pool node."""

    kernel: tuple[int, int] | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]


def _pair(node: onnx.NodeProto, values: tuple[int, ...], name: str) -> tuple[int, int]:
    if len(values) != 2:
        raise _unsupported(node, f"{name} {list(values)[:6]} is not 2-D; only 2-D is supported")
    return values[0], values[1]


def _window(node: onnx.NodeProto) -> _Window:
    attrs = _Attributes(node)
    auto_pad = attrs.get_text("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        raise _unsupported(
            node, f"auto_pad={auto_pad!r:.20} is not supported; export explicit pads"
        )
    pads = attrs.get_ints("pads") or (0, 0, 0, 0)
    if auto_pad == "VALID":
        pads = (0, 0, 0, 0)
    if len(pads) != 4 or pads[:2] != pads[2:]:
        raise _unsupported(node, f"pads {list(pads)[:8]} are not symmetric 2-D padding")
    kernel = attrs.get_ints("kernel_shape")
    return _Window(
        kernel=None if kernel is None else _pair(node, kernel, "kernel_shape"),
        stride=_pair(node, attrs.get_ints("strides") or (1, 1), "strides"),
        padding=(pads[0], pads[1]),
        dilation=_pair(node, attrs.get_ints("dilations") or (1, 1), "dilations"),
    )


def _conv(node: onnx.NodeProto, ctx: _Context) -> Converted:
    weight = ctx.constant(node, 1, "weight")
    bias = ctx.optional_constant(node, 2)
    if weight.ndim != 4:
        raise _unsupported(node, f"only 2-D convolutions are supported (weight {weight.shape})")
    groups = _Attributes(node).get_int("group", 1)
    win = _window(node)
    kernel = (int(weight.shape[2]), int(weight.shape[3]))
    if win.kernel is not None and win.kernel != kernel:
        raise InvalidModelError(f"Conv node {node.name!r:.60}: kernel_shape differs from weight")
    conv = nn.Conv2d(
        weight.shape[1] * groups,
        weight.shape[0],
        kernel,
        stride=win.stride,
        padding=win.padding,
        dilation=win.dilation,
        groups=groups,
        bias=bias is not None,
    )
    conv.weight = _param(weight)
    if bias is not None:
        conv.bias = _param(bias)
    return conv, (node.input[0],)


def _batch_norm(node: onnx.NodeProto, ctx: _Context) -> Converted:
    attrs = _Attributes(node)
    if attrs.get_int("training_mode", 0):
        raise _unsupported(node, "training-mode batch norm; export with model.eval()")
    scale, shift, mean, var = (
        ctx.constant(node, i, w)
        for i, w in enumerate(("scale", "bias", "mean", "variance"), start=1)
    )
    rank = ctx.rank(node.input[0])
    bn_class: type[nn.modules.batchnorm._BatchNorm]
    if rank == 4:
        bn_class = nn.BatchNorm2d
    elif rank in (2, 3):
        bn_class = nn.BatchNorm1d
    else:
        raise _unsupported(node, f"batch norm over a rank-{rank} tensor is not supported")
    bn = bn_class(scale.shape[0], eps=attrs.get_float("epsilon", 1e-5))
    bn.weight = _param(scale)
    bn.bias = _param(shift)
    bn.running_mean = torch.tensor(mean, dtype=torch.float32)
    bn.running_var = torch.tensor(var, dtype=torch.float32)
    return bn, (node.input[0],)


def _pool(node: onnx.NodeProto, ctx: _Context) -> Converted:
    attrs = _Attributes(node)
    if ctx.rank(node.input[0]) != 4:
        raise _unsupported(node, "only 2-D pooling is supported")
    win = _window(node)
    if win.kernel is None:
        raise _unsupported(node, "kernel_shape is missing")
    if any(p > k // 2 for p, k in zip(win.padding, win.kernel, strict=True)):
        raise _unsupported(node, "padding larger than half the kernel is not supported")
    ceil_mode = bool(attrs.get_int("ceil_mode", 0))
    if node.op_type == "MaxPool":
        if attrs.get_int("storage_order", 0):
            raise _unsupported(node, "storage_order=1 is not supported")
        pool: nn.Module = nn.MaxPool2d(
            win.kernel, win.stride, win.padding, win.dilation, ceil_mode=ceil_mode
        )
        return pool, (node.input[0],)
    if win.dilation != (1, 1):
        raise _unsupported(node, "dilated average pooling is not supported")
    pool = nn.AvgPool2d(
        win.kernel,
        win.stride,
        win.padding,
        ceil_mode=ceil_mode,
        count_include_pad=bool(attrs.get_int("count_include_pad", 0)),
    )
    return pool, (node.input[0],)


def _global_pool(node: onnx.NodeProto, ctx: _Context) -> Converted:
    if ctx.rank(node.input[0]) != 4:
        raise _unsupported(node, "only 2-D global pooling is supported")
    pool = (
        nn.AdaptiveAvgPool2d(1) if node.op_type == "GlobalAveragePool" else nn.AdaptiveMaxPool2d(1)
    )
    return pool, (node.input[0],)


class _Flatten(nn.Module):
    """ONNX Flatten: ``[d0..dk-1 | dk..dn]`` to ``[prod(d0..dk-1), prod(dk..dn)]``."""

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.axis % x.dim() if self.axis < 0 else self.axis
        return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


class _Reshape(nn.Module):
    """ONNX Reshape with a constant target; 0 copies the input's axis unless allowzero."""

    def __init__(self, shape: tuple[int, ...], allowzero: bool) -> None:
        super().__init__()
        self.shape = shape
        self.allowzero = allowzero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        target = [
            x.shape[i] if s == 0 and not self.allowzero else s for i, s in enumerate(self.shape)
        ]
        return x.reshape(target)


def _flatten(node: onnx.NodeProto, ctx: _Context) -> Converted:
    return _Flatten(_Attributes(node).get_int("axis", 1)), (node.input[0],)


def _reshape(node: onnx.NodeProto, ctx: _Context) -> Converted:
    shape = ctx.constant(node, 1, "target shape")
    allowzero = bool(_Attributes(node).get_int("allowzero", 0))
    return _Reshape(tuple(int(s) for s in shape.reshape(-1)), allowzero), (node.input[0],)


def _gemm(node: onnx.NodeProto, ctx: _Context) -> Converted:
    attrs = _Attributes(node)
    alpha, beta = attrs.get_float("alpha", 1.0), attrs.get_float("beta", 1.0)
    trans_a, trans_b = bool(attrs.get_int("transA", 0)), bool(attrs.get_int("transB", 0))
    weight = ctx.optional_constant(node, 1)
    bias = ctx.optional_constant(node, 2)
    has_c = len(node.input) > 2 and node.input[2] != ""
    if weight is None or trans_a or (has_c and bias is None) or weight.ndim != 2:
        return _Gemm(alpha, beta, trans_a, trans_b), tuple(n for n in node.input if n)
    matrix = weight if trans_b else weight.T  # nn.Linear stores [out, in]
    linear = nn.Linear(matrix.shape[1], matrix.shape[0], bias=has_c)
    linear.weight = _param(alpha * matrix)
    if bias is not None:
        if bias.size not in (1, matrix.shape[0]):
            raise _unsupported(node, f"bias of shape {bias.shape} does not fit a linear layer")
        linear.bias = _param(np.broadcast_to(beta * bias.reshape(-1), (matrix.shape[0],)))
    return linear, (node.input[0],)


class _Gemm(nn.Module):
    """ONNX Gemm on run-time tensors: ``alpha * A' @ B' + beta * C``."""

    def __init__(self, alpha: float, beta: float, trans_a: bool, trans_b: bool) -> None:
        super().__init__()
        self.alpha, self.beta, self.trans_a, self.trans_b = alpha, beta, trans_a, trans_b

    def forward(self, a: torch.Tensor, b: torch.Tensor, *c: torch.Tensor) -> torch.Tensor:
        out = self.alpha * ((a.T if self.trans_a else a) @ (b.T if self.trans_b else b))
        return out + self.beta * c[0] if c else out


def _matmul(node: onnx.NodeProto, ctx: _Context) -> Converted:
    weight = ctx.optional_constant(node, 1)
    if weight is None or weight.ndim != 2:
        return _Function(operator.matmul), tuple(node.input)
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=False)
    linear.weight = _param(weight.T)
    return linear, (node.input[0],)


class _Function(nn.Module):
    """A stateless torch function of the node's run-time inputs."""

    def __init__(self, function: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.function = function

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.function(*args)

    def extra_repr(self) -> str:
        return getattr(self.function, "__name__", "")


_BINARY = {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": operator.truediv}


def _binary(node: onnx.NodeProto, ctx: _Context) -> Converted:
    return _Function(_BINARY[node.op_type]), (node.input[0], node.input[1])


def _activation(node: onnx.NodeProto, ctx: _Context) -> Converted:
    if node.op_type == "LeakyRelu":
        return nn.LeakyReLU(_Attributes(node).get_float("alpha", 0.01)), (node.input[0],)
    modules: dict[str, Callable[[], nn.Module]] = {
        "Relu": nn.ReLU,
        "Sigmoid": nn.Sigmoid,
        "Tanh": nn.Tanh,
    }
    return modules[node.op_type](), (node.input[0],)


def _identity(node: onnx.NodeProto, ctx: _Context) -> Converted:
    if node.op_type == "Dropout" and len([n for n in node.input if n]) > 1:
        mode = ctx.optional_constant(node, 2)
        if mode is None or bool(mode.reshape(-1)[0]):
            raise _unsupported(node, "dropout in training mode; export with model.eval()")
    return nn.Identity(), (node.input[0],)


def _axes(node: onnx.NodeProto, ctx: _Context, index: int) -> tuple[int, ...] | None:
    """Axes from the attribute (older opsets) or a constant input (newer ones)."""
    attr = _Attributes(node).get_ints("axes")
    if attr is not None:
        return attr
    axes = ctx.optional_constant(node, index)
    if len(node.input) > index and node.input[index] and axes is None:
        raise _unsupported(node, "axes must be a constant")
    return None if axes is None else tuple(int(a) for a in axes.reshape(-1))


class _ReduceMean(nn.Module):
    def __init__(self, axes: tuple[int, ...] | None, keepdims: bool) -> None:
        super().__init__()
        self.axes, self.keepdims = axes, keepdims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axes = self.axes if self.axes is not None else tuple(range(x.dim()))
        return x.mean(dim=axes, keepdim=self.keepdims)


def _reduce_mean(node: onnx.NodeProto, ctx: _Context) -> Converted:
    attrs = _Attributes(node)
    axes = _axes(node, ctx, 1)
    if not axes and attrs.get_int("noop_with_empty_axes", 0):
        return nn.Identity(), (node.input[0],)
    return _ReduceMean(axes or None, bool(attrs.get_int("keepdims", 1))), (node.input[0],)


class _Squeeze(nn.Module):
    def __init__(self, axes: tuple[int, ...] | None) -> None:
        super().__init__()
        self.axes = axes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.squeeze() if self.axes is None else x.squeeze(self.axes)


class _Unsqueeze(nn.Module):
    def __init__(self, axes: tuple[int, ...]) -> None:
        super().__init__()
        self.axes = axes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rank = x.dim() + len(self.axes)
        for axis in sorted(a % rank for a in self.axes):
            x = x.unsqueeze(axis)
        return x


def _squeeze(node: onnx.NodeProto, ctx: _Context) -> Converted:
    return _Squeeze(_axes(node, ctx, 1)), (node.input[0],)


def _unsqueeze(node: onnx.NodeProto, ctx: _Context) -> Converted:
    axes = _axes(node, ctx, 1)
    if not axes:
        raise _unsupported(node, "Unsqueeze needs constant axes")
    return _Unsqueeze(axes), (node.input[0],)


class _Concat(nn.Module):
    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, dim=self.axis)


def _concat(node: onnx.NodeProto, ctx: _Context) -> Converted:
    return _Concat(_Attributes(node).get_int("axis", 0)), tuple(node.input)


CONVERTERS: dict[str, Callable[[onnx.NodeProto, _Context], Converted]] = {
    "Add": _binary,
    "AveragePool": _pool,
    "BatchNormalization": _batch_norm,
    "Concat": _concat,
    "Conv": _conv,
    "Div": _binary,
    "Dropout": _identity,
    "Flatten": _flatten,
    "Gemm": _gemm,
    "GlobalAveragePool": _global_pool,
    "GlobalMaxPool": _global_pool,
    "Identity": _identity,
    "LeakyRelu": _activation,
    "MatMul": _matmul,
    "MaxPool": _pool,
    "Mul": _binary,
    "ReduceMean": _reduce_mean,
    "Relu": _activation,
    "Reshape": _reshape,
    "Sigmoid": _activation,
    "Squeeze": _squeeze,
    "Sub": _binary,
    "Tanh": _activation,
    "Unsqueeze": _unsqueeze,
}
"""One converter per allow-listed operator except Constant, which is folded at conversion."""


def _decode(tensor: TensorProto) -> np.ndarray:
    if tensor.data_location == TensorProto.EXTERNAL or len(tensor.external_data) > 0:
        raise ExternalDataError(
            f"tensor {tensor.name!r:.60} refers to external data; give one self-contained file"
        )
    return np.asarray(numpy_helper.to_array(tensor))


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    if len(node.attribute) != 1:
        raise InvalidModelError(f"Constant node {node.name!r:.60} needs exactly one value")
    attr = node.attribute[0]
    if attr.name == "value":
        return _decode(attr.t)
    if attr.name in ("value_float", "value_floats"):
        return np.asarray(helper.get_attribute_value(attr), dtype=np.float32)
    if attr.name in ("value_int", "value_ints"):
        return np.asarray(helper.get_attribute_value(attr), dtype=np.int64)
    raise _unsupported(node, f"constant of kind {attr.name!r} is not supported")


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    return {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in (*graph.input, *graph.value_info, *graph.output)
        if v.type.tensor_type.HasField("shape")
    }


def _layer_key(index: int, node: onnx.NodeProto) -> str:
    label = re.sub(r"[^0-9A-Za-z_]+", "_", node.name or node.op_type).strip("_")[:60]
    return f"n{index}_{label}"


def convert(model: onnx.ModelProto) -> OnnxModule:
    """Build a frozen torch module that computes `model`'s single output from its input.

    Parameters
    ----------
    model
        A model that passed `free_common.models.onnx_static.check_static`.

    Returns
    -------
    OnnxModule
        In eval mode, parameters frozen, batch norm kept as real modules.

    Raises
    ------
    UnsupportedOperatorError
        An operator or a form of it (e.g. asymmetric padding) the converter lacks.
    InvalidModelError
        The graph is inconsistent (unknown inputs, missing ranks).
    """
    graph = model.graph
    constants = {t.name: _decode(t) for t in graph.initializer}
    ctx = _Context(constants, _ranks(model))
    weights = set(constants)
    input_name = next(v.name for v in graph.input if v.name not in weights)
    layers = nn.ModuleDict()
    plan: list[tuple[str, tuple[str, ...], str]] = []
    produced = {input_name}
    for node in graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = _constant_value(node)
            continue
        if node.op_type == "Identity" and node.input[0] in constants:
            # The legacy exporter shares equal initializers (e.g. fresh BN weights) via Identity.
            constants[node.output[0]] = constants[node.input[0]]
            continue
        converter = CONVERTERS.get(node.op_type)
        if converter is None:
            raise UnsupportedOperatorError(f"operator {node.op_type!r:.40} is not supported")
        module, inputs = converter(node, ctx)
        unknown = [n for n in inputs if n not in produced and n not in constants]
        if unknown:
            raise InvalidModelError(
                f"{node.op_type} node {node.name!r:.60} reads {unknown[0]!r:.60}, which no "
                "earlier node or initializer provides"
            )
        key = _layer_key(len(layers), node)
        layers[key] = module
        plan.append((key, inputs, node.output[0]))
        produced.add(node.output[0])
    output_name = graph.output[0].name
    if output_name not in produced:
        raise InvalidModelError(f"no node computes the graph output {output_name!r:.60}")
    runtime_constants = {
        name: torch.tensor(constants[name])
        for _, inputs, _ in plan
        for name in inputs
        if name not in produced
    }
    return OnnxModule(layers, plan, runtime_constants, input_name, output_name)
