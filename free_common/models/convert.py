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
from typing import Literal

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from free_common.errors import (
    ExternalDataError,
    InvalidModelError,
    TensorLimitError,
    UnsupportedOperatorError,
)
from free_common.models.onnx_static import IntakeLimits, takes_channels_last
from free_common.models.shape_fold import FOLD_ONLY_OPS, BatchAffine, fold_shapes

__all__ = ["CONVERTERS", "GraphForm", "OnnxModule", "OutputHead", "convert"]

OutputHead = Literal["logits", "softmax", "log_softmax"]
"""What a teacher's graph outputs: logits, or (log-)probabilities of a final (Log)Softmax."""


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
        plan: list[tuple[str, tuple[str, ...], tuple[str, ...]]],
        constants: dict[str, torch.Tensor],
        input_name: str,
        output_name: str,
        graph: GraphForm,
    ) -> None:
        super().__init__()
        self.layers = layers
        self.input_name = input_name
        self.output_name = output_name
        self.graph = graph
        self._plan = plan
        self._constant_slots: dict[str, str] = {}
        for index, (name, value) in enumerate(constants.items()):
            slot = f"const{index}"
            self.register_buffer(slot, value)
            self._constant_slots[name] = slot
        self.eval()
        self.requires_grad_(False)
        # Channels-last, as the generator's images (`free_common.inversion.generator`).
        self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def train(self, mode: bool = True) -> OnnxModule:
        """Stay in eval mode whatever `mode` says: a teacher's running statistics never change."""
        del mode
        return super().train(False)

    @property
    def batch_norms(self) -> list[nn.modules.batchnorm._BatchNorm]:
        """The batch-norm layers, in graph order (for statistics losses via forward hooks)."""
        return [m for m in self.layers.values() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits for images `x` ``[N, C, H, W]``, whatever N the graph declares.

        A graph exported with a fixed batch size runs that many images at a time
        (the last group padded with zeros); an NHWC graph gets its input transposed.
        """
        if self.graph.channels_last:
            x = x.permute(0, 2, 3, 1)
        size = self.graph.fixed_batch
        if size is None or x.shape[0] == size:
            return self._run(x)
        count = x.shape[0]
        pad = -count % size
        if pad:
            x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
        return torch.cat([self._run(group) for group in torch.split(x, size)])[:count]

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        values: dict[str, torch.Tensor] = {self.input_name: x}
        for key, inputs, outputs in self._plan:
            args = [
                values[name] if name in values else getattr(self, self._constant_slots[name])
                for name in inputs
            ]
            result = self.layers[key](*args)
            if len(outputs) == 1:
                values[outputs[0]] = result
            else:
                values.update(zip(outputs, result, strict=True))
        return values[self.output_name]


@dataclass(frozen=True)
class GraphForm:
    """How a converted graph meets the engine's ``[N, C, H, W]`` images and logits.

    Attributes
    ----------
    fixed_batch
        The batch size the graph was exported with, when it declares one (the
        module then runs that many images at a time); None for a dynamic batch.
    channels_last
        The graph takes ``[N, H, W, C]`` (Keras / tf2onnx): the module transposes.
    head
        ``"logits"``, or the output operator that was removed so the module returns
        the logits beneath it: ``"softmax"`` or ``"log_softmax"``.
    folded_nodes
        Shape-computing nodes folded into constants at conversion (`shape_fold`).
    """

    fixed_batch: int | None = None
    channels_last: bool = False
    head: OutputHead = "logits"
    folded_nodes: int = 0


@dataclass
class _Context:
    """What a node converter may look up: constants known at conversion time, ranks, limits."""

    constants: dict[str, np.ndarray]
    ranks: dict[str, int]
    batch_dependent: dict[str, BatchAffine]
    graph_input: str
    limits: IntakeLimits

    def constant(self, node: onnx.NodeProto, index: int, what: str) -> np.ndarray:
        name = node.input[index] if index < len(node.input) else ""
        if name in self.batch_dependent:
            raise _unsupported(
                node,
                f"its {what} depends on the batch size; only Reshape and Expand targets may "
                "(export with a fixed batch size)",
            )
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
    """ONNX Reshape with a constant target; 0 copies the input's axis unless allowzero.

    A target that depends on the batch size (`BatchAffine`) is filled in from the
    graph input's batch, passed as a second argument.
    """

    def __init__(self, shape: tuple[int, ...] | BatchAffine, allowzero: bool) -> None:
        super().__init__()
        self.shape = shape
        self.allowzero = allowzero

    def forward(self, x: torch.Tensor, *graph_input: torch.Tensor) -> torch.Tensor:
        shape = _at_batch(self.shape, graph_input)
        target = [x.shape[i] if s == 0 and not self.allowzero else s for i, s in enumerate(shape)]
        return x.reshape(target)


def _shape_operand(
    node: onnx.NodeProto, ctx: _Context, what: str
) -> tuple[tuple[int, ...] | BatchAffine, tuple[str, ...]]:
    """Input 1 of `node` as a constant shape, or as the batch-dependent one folding found.

    A batch-dependent shape is filled in at run time from the graph input's batch, so
    the graph input becomes the module's second argument.
    """
    affine = ctx.batch_dependent.get(node.input[1])
    if affine is not None:
        return affine, (node.input[0], ctx.graph_input)
    return tuple(int(s) for s in ctx.constant(node, 1, what).reshape(-1)), (node.input[0],)


def _at_batch(
    shape: tuple[int, ...] | BatchAffine, graph_input: tuple[torch.Tensor, ...]
) -> tuple[int, ...]:
    return shape.at(graph_input[0].shape[0]) if isinstance(shape, BatchAffine) else shape


def _flatten(node: onnx.NodeProto, ctx: _Context) -> Converted:
    return _Flatten(_Attributes(node).get_int("axis", 1)), (node.input[0],)


def _reshape(node: onnx.NodeProto, ctx: _Context) -> Converted:
    allowzero = bool(_Attributes(node).get_int("allowzero", 0))
    shape, inputs = _shape_operand(node, ctx, "target shape")
    return _Reshape(shape, allowzero), inputs


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


def _axis(node: onnx.NodeProto, axis: int, rank: int) -> int:
    """`axis` in ``[0, rank)``, or a refusal naming the node."""
    if not -rank <= axis < rank:
        raise InvalidModelError(
            f"{node.op_type} node {node.name!r:.60}: axis {axis} is out of range for a "
            f"rank-{rank} tensor"
        )
    return axis % rank


def _scalar(node: onnx.NodeProto, ctx: _Context, index: int) -> float | None:
    value = ctx.optional_constant(node, index)
    if len(node.input) > index and node.input[index] and value is None:
        raise _unsupported(node, f"input {index} must be a constant")
    if value is not None and value.size != 1:
        raise _unsupported(node, f"input {index} must be a single value")
    return None if value is None else float(value.reshape(-1)[0])


class _Clip(nn.Module):
    def __init__(self, low: float | None, high: float | None) -> None:
        super().__init__()
        self.low, self.high = low, high

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, self.low, self.high)


def _clip(node: onnx.NodeProto, ctx: _Context) -> Converted:
    attrs = _Attributes(node)
    # Before opset 11 the bounds were attributes; since, optional constant inputs.
    low = _scalar(node, ctx, 1) if len(node.input) > 1 else attrs.get_float("min", -math.inf)
    high = _scalar(node, ctx, 2) if len(node.input) > 2 else attrs.get_float("max", math.inf)
    low = None if low is None or low == -math.inf else low
    high = None if high is None or high == math.inf else high
    if low is not None and high is not None and low > high:
        raise InvalidModelError(f"Clip node {node.name!r:.60}: min {low:g} exceeds max {high:g}")
    return _Clip(low, high), (node.input[0],)


class _HardSigmoid(nn.Module):
    def __init__(self, alpha: float, beta: float) -> None:
        super().__init__()
        self.alpha, self.beta = alpha, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.alpha * x + self.beta, 0.0, 1.0)


def _hard_sigmoid(node: onnx.NodeProto, ctx: _Context) -> Converted:
    attrs = _Attributes(node)
    return _HardSigmoid(attrs.get_float("alpha", 0.2), attrs.get_float("beta", 0.5)), (
        node.input[0],
    )


def _gelu(node: onnx.NodeProto, ctx: _Context) -> Converted:
    approximate = _Attributes(node).get_text("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise _unsupported(node, f"approximate={approximate!r:.20} is not 'none' or 'tanh'")
    return nn.GELU(approximate=approximate), (node.input[0],)


def _unary(node: onnx.NodeProto, ctx: _Context) -> Converted:
    functions: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "Erf": torch.erf,
        "HardSwish": nn.functional.hardswish,
        "Reciprocal": torch.reciprocal,
        "Sqrt": torch.sqrt,
    }
    return _Function(functions[node.op_type]), (node.input[0],)


class _Softmax(nn.Module):
    def __init__(self, axis: int, log: bool) -> None:
        super().__init__()
        self.axis, self.log = axis, log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.log_softmax if self.log else torch.softmax)(x, dim=self.axis)


def _softmax(node: onnx.NodeProto, ctx: _Context) -> Converted:
    axis = _axis(node, _Attributes(node).get_int("axis", -1), ctx.rank(node.input[0]))
    return _Softmax(axis, node.op_type == "LogSoftmax"), (node.input[0],)


class _LayerNorm(nn.Module):
    """ONNX LayerNormalization: normalize over the axes from `axis` on, then scale and shift."""

    def __init__(self, axis: int, eps: float, scale: np.ndarray, bias: np.ndarray | None) -> None:
        super().__init__()
        self.axis, self.eps = axis, eps
        self.weight = _param(scale)
        self.bias = None if bias is None else _param(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.layer_norm(x, x.shape[self.axis :], eps=self.eps) * self.weight
        return y if self.bias is None else y + self.bias


def _layer_norm(node: onnx.NodeProto, ctx: _Context) -> Converted:
    attrs = _Attributes(node)
    axis = _axis(node, attrs.get_int("axis", -1), ctx.rank(node.input[0]))
    scale = ctx.constant(node, 1, "scale")
    module = _LayerNorm(
        axis, attrs.get_float("epsilon", 1e-5), scale, ctx.optional_constant(node, 2)
    )
    return module, (node.input[0],)


class _Permute(nn.Module):
    def __init__(self, perm: tuple[int, ...]) -> None:
        super().__init__()
        self.perm = perm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(self.perm)


def _transpose(node: onnx.NodeProto, ctx: _Context) -> Converted:
    rank = ctx.rank(node.input[0])
    perm = _Attributes(node).get_ints("perm") or tuple(reversed(range(rank)))
    if sorted(perm) != list(range(rank)):
        raise InvalidModelError(
            f"Transpose node {node.name!r:.60}: perm {list(perm)[:8]} is not a permutation of "
            f"the {rank} axes"
        )
    return _Permute(perm), (node.input[0],)


class _Pad(nn.Module):
    def __init__(self, pads: tuple[int, ...], mode: str, value: float) -> None:
        super().__init__()
        self.pads, self.mode, self.value = pads, mode, value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "constant":
            return nn.functional.pad(x, self.pads, value=self.value)
        # torch pads the last two axes of a 4-D tensor in reflect / replicate mode.
        return nn.functional.pad(x, self.pads, mode=self.mode)


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}


def _pad(node: onnx.NodeProto, ctx: _Context) -> Converted:
    attrs = _Attributes(node)
    rank = ctx.rank(node.input[0])
    mode = attrs.get_text("mode", "constant")
    if mode not in _PAD_MODES:
        raise _unsupported(node, f"mode {mode!r:.20} is not constant, reflect or edge")
    pads = attrs.get_ints("pads")  # before opset 11
    if pads is None:
        pads = tuple(int(p) for p in ctx.constant(node, 1, "pads").reshape(-1))
    value = _scalar(node, ctx, 2) if len(node.input) > 2 else attrs.get_float("value", 0.0)
    axes = _axes(node, ctx, 3)
    axes = tuple(_axis(node, a, rank) for a in axes) if axes else tuple(range(rank))
    if len(pads) != 2 * len(axes):
        raise InvalidModelError(
            f"Pad node {node.name!r:.60}: {len(pads)} pads for {len(axes)} axes"
        )
    if any(p < 0 for p in pads):
        raise _unsupported(node, f"negative pads {list(pads)[:8]} (cropping) are not supported")
    if any(p > ctx.limits.max_shape_attribute for p in pads):
        raise TensorLimitError(
            f"Pad node {node.name!r:.60} pads by {max(pads)}; values above "
            f"{ctx.limits.max_shape_attribute} are refused"
        )
    begin = dict(zip(axes, pads[: len(axes)], strict=True))
    end = dict(zip(axes, pads[len(axes) :], strict=True))
    padded = [a for a in range(rank) if begin.get(a, 0) or end.get(a, 0)]
    if mode != "constant" and (rank != 4 or any(a < 2 for a in padded)):
        raise _unsupported(node, f"{mode} padding is supported on the image axes of NCHW only")
    last = min(padded, default=rank)  # torch lists (begin, end) from the last axis back
    flat = tuple(p for a in range(rank - 1, last - 1, -1) for p in (begin.get(a, 0), end.get(a, 0)))
    return _Pad(flat, _PAD_MODES[mode], 0.0 if value is None else value), (node.input[0],)


class _Gather(nn.Module):
    indices: torch.Tensor

    def __init__(self, axis: int, indices: np.ndarray) -> None:
        super().__init__()
        self.axis = axis
        self.register_buffer("indices", torch.tensor(indices, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[self.axis]
        flat = torch.remainder(self.indices.reshape(-1), size)  # negative indices count back
        out = x.index_select(self.axis, flat)
        shape = (*x.shape[: self.axis], *self.indices.shape, *x.shape[self.axis + 1 :])
        return out.reshape(shape)


def _gather(node: onnx.NodeProto, ctx: _Context) -> Converted:
    rank = ctx.rank(node.input[0])
    axis = _axis(node, _Attributes(node).get_int("axis", 0), rank)
    indices = ctx.constant(node, 1, "indices")
    return _Gather(axis, indices), (node.input[0],)


class _Slice(nn.Module):
    def __init__(self, index: tuple[slice, ...]) -> None:
        super().__init__()
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.index]


def _slice(node: onnx.NodeProto, ctx: _Context) -> Converted:
    rank = ctx.rank(node.input[0])
    starts = ctx.constant(node, 1, "starts").reshape(-1)
    ends = ctx.constant(node, 2, "ends").reshape(-1)
    axes = ctx.optional_constant(node, 3)
    steps = ctx.optional_constant(node, 4)
    axis_list = range(len(starts)) if axes is None else axes.reshape(-1)
    step_list = [1] * len(starts) if steps is None else steps.reshape(-1)
    if not len(starts) == len(ends) == len(axis_list) == len(step_list):
        raise InvalidModelError(
            f"Slice node {node.name!r:.60}: starts, ends, axes differ in length"
        )
    index = [slice(None)] * rank
    for start, end, axis, step in zip(starts, ends, axis_list, step_list, strict=True):
        if step <= 0:
            raise _unsupported(node, f"step {int(step)}: only positive steps are supported")
        # Python slices clamp like ONNX; INT64_MAX ends mean "to the end".
        index[_axis(node, int(axis), rank)] = slice(int(start), int(end), int(step))
    return _Slice(tuple(index)), (node.input[0],)


class _Expand(nn.Module):
    def __init__(self, shape: tuple[int, ...] | BatchAffine) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor, *graph_input: torch.Tensor) -> torch.Tensor:
        return x.expand(np.broadcast_shapes(tuple(x.shape), _at_batch(self.shape, graph_input)))


def _expand(node: onnx.NodeProto, ctx: _Context) -> Converted:
    shape, inputs = _shape_operand(node, ctx, "shape")
    per_image = shape.at(1) if isinstance(shape, BatchAffine) else shape
    if any(s < 0 for s in per_image):
        raise InvalidModelError(f"Expand node {node.name!r:.60}: negative shape {list(per_image)}")
    if math.prod(per_image) > ctx.limits.max_activation_elements:
        raise TensorLimitError(
            f"Expand node {node.name!r:.60} expands to shape {list(per_image)[:8]} "
            f"({math.prod(per_image):,} values per image); the limit is "
            f"{ctx.limits.max_activation_elements:,}"
        )
    return _Expand(shape), inputs


def _where(node: onnx.NodeProto, ctx: _Context) -> Converted:
    condition = ctx.constant(node, 0, "condition")
    inputs = tuple(n for n in node.input[1:])
    return _Select(torch.tensor(condition.astype(bool))), inputs


class _Select(nn.Module):
    """``where(condition, a, b)`` with a constant condition."""

    condition: torch.Tensor

    def __init__(self, condition: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("condition", condition)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(self.condition, a, b)


def _pow(node: onnx.NodeProto, ctx: _Context) -> Converted:
    exponent = ctx.optional_constant(node, 1)
    if exponent is not None and exponent.size == 1:
        power = float(exponent.reshape(-1)[0])
        return _Function(lambda x: torch.pow(x, power)), (node.input[0],)
    return _Function(torch.pow), (node.input[0], node.input[1])


class _Split(nn.Module):
    def __init__(self, axis: int, sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.axis, self.sizes = axis, list(sizes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(x, self.sizes, dim=self.axis)


def _split(node: onnx.NodeProto, ctx: _Context) -> Converted:
    attrs = _Attributes(node)
    axis = _axis(node, attrs.get_int("axis", 0), ctx.rank(node.input[0]))
    given = attrs.get_ints("split")
    split = ctx.optional_constant(node, 1)
    sizes = given if given is not None else None if split is None else tuple(split.reshape(-1))
    outputs = len(node.output)
    if sizes is None:
        # Even parts: opset 18 num_outputs, or as many as there are outputs.
        return _SplitEven(axis, attrs.get_int("num_outputs", outputs)), (node.input[0],)
    if len(sizes) != outputs or any(s < 0 for s in sizes):
        raise InvalidModelError(f"Split node {node.name!r:.60}: sizes {list(sizes)[:8]} do not fit")
    return _Split(axis, tuple(int(s) for s in sizes)), (node.input[0],)


class _SplitEven(nn.Module):
    def __init__(self, axis: int, parts: int) -> None:
        super().__init__()
        self.axis, self.parts = axis, parts

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        size = -(-x.shape[self.axis] // self.parts)  # ONNX: the last part may be smaller
        return torch.split(x, size, dim=self.axis)


def _cast(node: onnx.NodeProto, ctx: _Context) -> Converted:
    to = _Attributes(node).get_int("to", TensorProto.FLOAT)
    if to != TensorProto.FLOAT:
        name = TensorProto.DataType.Name(to) if to in TensorProto.DataType.values() else to
        raise _unsupported(
            node, f"a cast to {name} at run time; teachers compute in float32 (export in float32)"
        )
    return nn.Identity(), (node.input[0],)


CONVERTERS: dict[str, Callable[[onnx.NodeProto, _Context], Converted]] = {
    "Add": _binary,
    "AveragePool": _pool,
    "BatchNormalization": _batch_norm,
    "Cast": _cast,
    "Clip": _clip,
    "Concat": _concat,
    "Conv": _conv,
    "Div": _binary,
    "Dropout": _identity,
    "Erf": _unary,
    "Expand": _expand,
    "Flatten": _flatten,
    "Gather": _gather,
    "Gelu": _gelu,
    "Gemm": _gemm,
    "GlobalAveragePool": _global_pool,
    "GlobalMaxPool": _global_pool,
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _unary,
    "Identity": _identity,
    "LayerNormalization": _layer_norm,
    "LeakyRelu": _activation,
    "LogSoftmax": _softmax,
    "MatMul": _matmul,
    "MaxPool": _pool,
    "Mul": _binary,
    "Pad": _pad,
    "Pow": _pow,
    "Reciprocal": _unary,
    "ReduceMean": _reduce_mean,
    "Relu": _activation,
    "Reshape": _reshape,
    "Sigmoid": _activation,
    "Slice": _slice,
    "Softmax": _softmax,
    "Split": _split,
    "Sqrt": _unary,
    "Squeeze": _squeeze,
    "Sub": _binary,
    "Tanh": _activation,
    "Transpose": _transpose,
    "Unsqueeze": _unsqueeze,
    "Where": _where,
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


def _strip_head(graph: onnx.GraphProto, ranks: dict[str, int]) -> tuple[str, OutputHead]:
    """Find the logits: the graph output, or the input of a final (Log)Softmax over classes."""
    output = graph.output[0].name
    last = next((n for n in graph.node if output in n.output), None)
    if last is None or last.op_type not in ("Softmax", "LogSoftmax"):
        return output, "logits"
    rank = ranks.get(last.input[0], 2)
    axis = _Attributes(last).get_int("axis", -1)
    if rank != 2 or axis % rank != 1:
        return output, "logits"
    return last.input[0], "softmax" if last.op_type == "Softmax" else "log_softmax"


def convert(model: onnx.ModelProto, limits: IntakeLimits | None = None) -> OnnxModule:
    """Build a frozen torch module that computes `model`'s logits from ``[N, C, H, W]`` images.

    Shape computations are folded first (`shape_fold`); a final Softmax or
    LogSoftmax over the classes is left out, so the module returns the logits
    beneath it (`GraphForm.head` says which was removed); an NHWC graph gets its
    input transposed, and one exported with a fixed batch size runs in groups of it.

    Parameters
    ----------
    model
        A model that passed `free_common.models.onnx_static.check_static`.
    limits
        Caps on what the graph may create (an Expand's size, a Pad's width);
        `IntakeLimits()` when omitted.

    Returns
    -------
    OnnxModule
        In eval mode, parameters frozen, batch norm kept as real modules.

    Raises
    ------
    UnsupportedOperatorError
        An operator or a form of it (e.g. asymmetric padding) the converter lacks.
    TensorLimitError
        The graph would create a tensor over the limits.
    InvalidModelError
        The graph is inconsistent (unknown inputs, missing ranks, out-of-range axes).
    """
    folded = fold_shapes(model)
    graph = folded.model.graph
    constants = {t.name: _decode(t) for t in graph.initializer}
    ranks = _ranks(folded.model)
    weights = set(constants)
    input_name = next(v.name for v in graph.input if v.name not in weights)
    ctx = _Context(constants, ranks, folded.batch_dependent, input_name, limits or IntakeLimits())
    output_name, head = _strip_head(graph, ranks)
    layers = nn.ModuleDict()
    plan: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = []
    produced = {input_name}
    for node in graph.node:
        if output_name in produced:
            break  # only the removed (Log)Softmax head is left
        if node.op_type == "Constant":
            constants[node.output[0]] = _constant_value(node)
            continue
        if node.op_type == "Identity" and node.input[0] in constants:
            # The legacy exporter shares equal initializers (e.g. fresh BN weights) via Identity.
            constants[node.output[0]] = constants[node.input[0]]
            continue
        converter = CONVERTERS.get(node.op_type)
        if converter is None:
            where = (
                " where it cannot be computed from the input size alone"
                if node.op_type in FOLD_ONLY_OPS
                else ""
            )
            raise UnsupportedOperatorError(f"operator {node.op_type!r:.40} is not supported{where}")
        module, inputs = converter(node, ctx)
        unknown = [n for n in inputs if n not in produced and n not in constants]
        if unknown:
            raise InvalidModelError(
                f"{node.op_type} node {node.name!r:.60} reads {unknown[0]!r:.60}, which no "
                "earlier node or initializer provides"
            )
        key = _layer_key(len(layers), node)
        layers[key] = module
        outputs = tuple(node.output)
        plan.append((key, inputs, outputs))
        produced.update(outputs)
    if output_name not in produced:
        raise InvalidModelError(f"no node computes the graph output {output_name!r:.60}")
    runtime_constants = {
        name: torch.tensor(constants[name])
        for _, inputs, _ in plan
        for name in inputs
        if name not in produced
    }
    form = GraphForm(
        fixed_batch=folded.fixed_batch,
        channels_last=takes_channels_last(graph, input_name),
        head=head,
        folded_nodes=folded.folded_nodes,
    )
    return OnnxModule(layers, plan, runtime_constants, input_name, output_name, form)
