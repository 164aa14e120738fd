"""Fold the shape-computing parts of an ONNX graph into constants, for the declared input size.

Exporters compute reshape targets at run time: the legacy exporter writes
``x.view(x.size(0), -1)`` as Shape -> Gather -> Unsqueeze -> Concat -> Reshape, and
attention layers derive head sizes from Shape -> Slice -> Cast -> Sqrt. With the image
size fixed by the task, every such value is known before the model runs, except for
the batch size. `fold_shapes` evaluates those subgraphs here, in numpy, at three batch
sizes, removes them, and hands the converter constants; a value that changes with the
batch (the ``x.size(0)`` above) must be affine in it, ``base + per_batch * N``, and is
kept as a `BatchAffine` the converter fills in at run time.

So the torch graph is static, no tensor size depends on run-time values, and every
value folded here is capped (`FOLD_MAX_ELEMENTS`) before numpy allocates it: a shape
bomb (``ConstantOfShape([2**20, 2**20])``) is refused, not computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from free_common.errors import InvalidModelError, TensorLimitError, UnsupportedOperatorError

__all__ = ["FOLD_MAX_ELEMENTS", "FOLD_ONLY_OPS", "BatchAffine", "FoldedGraph", "fold_shapes"]

FOLD_MAX_ELEMENTS = 1 << 16
"""Largest tensor a fold may create: shape vectors and scale factors are a handful of values."""

FOLD_ONLY_OPS = frozenset({"ConstantOfShape", "Equal", "Mod", "Range", "Shape"})
"""Operators accepted only where they fold away; the torch graph never runs them."""

_PROBE_BATCHES = (2, 3, 5)
"""Batch sizes the dynamic-batch graph is folded at: two fit the affine form, one checks it."""

_INTEGER = (np.int64, np.int32)
_ELEMENTWISE = frozenset({"Add", "Div", "Equal", "Mod", "Mul", "Sub", "Where"})


@dataclass(frozen=True)
class BatchAffine:
    """A folded integer vector whose entries are ``base + per_batch * N`` for a batch of N."""

    base: tuple[int, ...]
    per_batch: tuple[int, ...]

    def at(self, batch: int) -> tuple[int, ...]:
        """Return the value for a batch of `batch` images."""
        return tuple(b + p * batch for b, p in zip(self.base, self.per_batch, strict=True))


@dataclass(frozen=True)
class FoldedGraph:
    """A graph with its shape computations folded away.

    Attributes
    ----------
    model
        The input model less the folded nodes; each folded value a remaining node
        reads is an initializer (for a `BatchAffine` value, its value at batch 1).
    batch_dependent
        Initializers of `model` whose value depends on the batch size.
    fixed_batch
        The input's batch size when the model declares a number there, else None.
    folded_nodes
        How many nodes were folded.
    """

    model: onnx.ModelProto
    batch_dependent: dict[str, BatchAffine]
    fixed_batch: int | None
    folded_nodes: int


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _int_attr(node: onnx.NodeProto, name: str, default: int) -> int:
    value = _attr(node, name, default)
    assert isinstance(value, int)
    return value


def _capped(node: onnx.NodeProto, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Refuse before allocating a folded tensor of `shape` larger than the cap."""
    if any(d < 0 for d in shape):
        raise InvalidModelError(f"{node.op_type} node {node.name!r:.60} makes a negative shape")
    if math.prod(shape) > FOLD_MAX_ELEMENTS:
        raise TensorLimitError(
            f"{node.op_type} node {node.name!r:.60} computes a constant of shape {list(shape)[:8]}"
            f"; shape computations may create at most {FOLD_MAX_ELEMENTS:,} values"
        )
    return shape


def _axes_of(node: onnx.NodeProto, args: list[np.ndarray], index: int) -> list[int] | None:
    attr = _attr(node, "axes", None)
    if attr is not None:
        return [int(a) for a in attr]
    if len(args) > index:
        return [int(a) for a in args[index].reshape(-1)]
    return None


def _slice(node: onnx.NodeProto, args: list[np.ndarray]) -> np.ndarray:
    data, starts, ends = args[0], args[1].reshape(-1), args[2].reshape(-1)
    axes = args[3].reshape(-1) if len(args) > 3 else np.arange(len(starts))
    steps = args[4].reshape(-1) if len(args) > 4 else np.ones(len(starts), np.int64)
    index: list[slice] = [slice(None)] * data.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        if step == 0:
            raise InvalidModelError(f"Slice node {node.name!r:.60} has a step of 0")
        index[int(axis)] = slice(int(start), int(end), int(step))
    return data[tuple(index)]


def _constant_of_shape(node: onnx.NodeProto, args: list[np.ndarray]) -> np.ndarray:
    shape = _capped(node, tuple(int(d) for d in args[0].reshape(-1)))
    fill = _attr(node, "value", None)
    value = np.zeros(1, np.float32) if fill is None else numpy_helper.to_array(fill)
    return np.full(shape, value.reshape(-1)[0], dtype=value.dtype)


def _expand(node: onnx.NodeProto, args: list[np.ndarray]) -> np.ndarray:
    target = tuple(int(d) for d in args[1].reshape(-1))
    shape = _capped(node, np.broadcast_shapes(args[0].shape, target))
    return np.broadcast_to(args[0], shape).copy()


def _range(node: onnx.NodeProto, args: list[np.ndarray]) -> np.ndarray:
    start, limit, delta = (a.reshape(()) for a in args)
    if delta == 0:
        raise InvalidModelError(f"Range node {node.name!r:.60} has a step of 0")
    _capped(node, (max(0, math.ceil((limit - start) / delta)),))
    return np.arange(start.item(), limit.item(), delta.item(), dtype=args[0].dtype)


def _divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.dtype in _INTEGER and b.dtype in _INTEGER:
        if (b == 0).any():
            raise InvalidModelError("a shape computation divides by zero")
        return np.asarray(np.trunc(a / b), dtype=a.dtype)  # ONNX integer Div truncates
    return np.asarray(a / b, dtype=a.dtype)


def _cast(node: onnx.NodeProto, args: list[np.ndarray]) -> np.ndarray:
    to = _int_attr(node, "to", TensorProto.FLOAT)
    return args[0].astype(helper.tensor_dtype_to_np_dtype(to))


def _gather(node: onnx.NodeProto, args: list[np.ndarray]) -> np.ndarray:
    axis = _int_attr(node, "axis", 0)
    data, indices = args
    if not -data.ndim <= axis < max(data.ndim, 1):
        raise InvalidModelError(f"Gather node {node.name!r:.60} has axis {axis} out of range")
    size = data.shape[axis]
    if ((indices < -size) | (indices >= size)).any():
        raise InvalidModelError(f"Gather node {node.name!r:.60} indexes past its input")
    return np.take(data, indices, axis=axis)


def _unsqueeze(node: onnx.NodeProto, args: list[np.ndarray]) -> np.ndarray:
    axes = _axes_of(node, args, 1) or []
    rank = args[0].ndim + len(axes)
    out = args[0]
    for axis in sorted(a % rank for a in axes):
        out = np.expand_dims(out, axis)
    return out


def _squeeze(node: onnx.NodeProto, args: list[np.ndarray]) -> np.ndarray:
    axes = _axes_of(node, args, 1)
    return np.squeeze(args[0]) if axes is None else np.squeeze(args[0], axis=tuple(axes))


def _reshape(node: onnx.NodeProto, args: list[np.ndarray]) -> np.ndarray:
    target = [int(d) for d in args[1].reshape(-1)]
    if not _int_attr(node, "allowzero", 0):
        target = [args[0].shape[i] if d == 0 else d for i, d in enumerate(target)]
    return args[0].reshape(target)


_Evaluator = Callable[[onnx.NodeProto, list[np.ndarray]], np.ndarray]

_EVALUATORS: dict[str, _Evaluator] = {
    "Add": lambda n, a: np.asarray(a[0] + a[1], dtype=a[0].dtype),
    "Cast": _cast,
    "Concat": lambda n, a: np.concatenate(a, axis=_int_attr(n, "axis", 0)),
    "ConstantOfShape": _constant_of_shape,
    "Div": lambda n, a: _divide(a[0], a[1]),
    "Equal": lambda n, a: np.equal(a[0], a[1]),
    "Expand": _expand,
    "Gather": _gather,
    "Identity": lambda n, a: a[0],
    "Mod": lambda n, a: (np.fmod if _int_attr(n, "fmod", 0) else np.mod)(a[0], a[1]),
    "Mul": lambda n, a: np.asarray(a[0] * a[1], dtype=a[0].dtype),
    "Range": _range,
    "Reciprocal": lambda n, a: np.asarray(1 / a[0], dtype=a[0].dtype),
    "Reshape": _reshape,
    "Slice": _slice,
    "Sqrt": lambda n, a: np.sqrt(a[0]),
    "Squeeze": _squeeze,
    "Sub": lambda n, a: np.asarray(a[0] - a[1], dtype=a[0].dtype),
    "Unsqueeze": _unsqueeze,
    "Where": lambda n, a: np.where(a[0], a[1], a[2]),
}
"""numpy evaluators of what shape computations use."""


def _shape_of(node: onnx.NodeProto, dims: tuple[int, ...]) -> np.ndarray:
    rank = len(dims)
    start, end = _int_attr(node, "start", 0), _int_attr(node, "end", rank)
    return np.asarray(dims[slice(start, end)], dtype=np.int64)


def _static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise InvalidModelError(
            f"shape inference fails: {str(exc).splitlines()[0][:200]}"
        ) from None
    graph = inferred.graph
    shapes: dict[str, tuple[int, ...]] = {}
    for value in (*graph.input, *graph.value_info, *graph.output):
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        dims = tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(int(d.dim_value) for d in dims)
    return shapes


def _with_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    weights = {t.name for t in fixed.graph.initializer}
    for value in fixed.graph.input:
        if value.name not in weights:
            dim = value.type.tensor_type.shape.dim[0]
            dim.Clear()
            dim.dim_value = batch
    return fixed


def _small_initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Decode the initializers small enough to take part in folding (weights never do)."""
    return {
        t.name: np.asarray(numpy_helper.to_array(t))
        for t in model.graph.initializer
        if math.prod(t.dims) <= FOLD_MAX_ELEMENTS
    }


def _fold_once(probe: onnx.ModelProto, known: dict[str, np.ndarray], folded: set[int]) -> bool:
    """One pass over `probe`'s nodes in graph order; True when a node was folded."""
    shapes: dict[str, tuple[int, ...]] = {}
    if any(n.op_type == "Shape" for i, n in enumerate(probe.graph.node) if i not in folded):
        shapes = _static_shapes(_without(probe, folded, known))
    progress = False
    for index, node in enumerate(probe.graph.node):
        if index in folded:
            continue
        inputs = [name for name in node.input if name]
        if node.op_type == "Constant":
            value = _constant(node)
            if value is None:
                continue  # a large constant is a weight: the converter reads it
            known[node.output[0]] = value
        elif node.op_type == "Shape" and node.input[0] in shapes:
            known[node.output[0]] = _shape_of(node, shapes[node.input[0]])
        elif node.op_type in _EVALUATORS and all(name in known for name in inputs):
            args = [known[name] for name in inputs]
            if node.op_type == "Expand" and args[0].dtype not in _INTEGER:
                continue  # broadcasting a weight (a class token) over the batch: run time
            if node.op_type in _ELEMENTWISE:
                _capped(node, np.broadcast_shapes(*(a.shape for a in args)))
            if node.op_type in ("Reshape", "Expand", "Slice", "Unsqueeze", "Squeeze"):
                args = [args[0], *(a.astype(np.int64) for a in args[1:])]
            value = np.asarray(_EVALUATORS[node.op_type](node, args))
            if value.size > FOLD_MAX_ELEMENTS:
                continue  # arithmetic on weights (a Concat of two tables), not a shape: run time
            known[node.output[0]] = value
        else:
            continue
        folded.add(index)
        progress = True
    return progress


def _constant(node: onnx.NodeProto) -> np.ndarray | None:
    """Return a Constant node's value, or None when it is too large to fold."""
    if len(node.attribute) != 1:
        raise InvalidModelError(f"Constant node {node.name!r:.60} needs exactly one value")
    attr = node.attribute[0]
    if attr.type == onnx.AttributeProto.TENSOR:
        if math.prod(attr.t.dims) > FOLD_MAX_ELEMENTS:
            return None
        return np.asarray(numpy_helper.to_array(attr.t))
    if len(attr.floats) + len(attr.ints) > FOLD_MAX_ELEMENTS:
        return None
    value = helper.get_attribute_value(attr)
    if attr.name.startswith("value_float"):
        return np.asarray(value, dtype=np.float32)
    if attr.name.startswith("value_int"):
        return np.asarray(value, dtype=np.int64)
    raise UnsupportedOperatorError(
        f"Constant node {node.name!r:.60}: a constant of kind {attr.name!r:.30} is not supported"
    )


def _fold_at(model: onnx.ModelProto, batch: int | None) -> tuple[set[int], dict[str, np.ndarray]]:
    """Fold at one batch size; the folded node indices and every folded value."""
    probe = model if batch is None else _with_batch(model, batch)
    known = _small_initializers(probe)
    folded: set[int] = set()
    # Folding one Reshape target can make the next Shape static: repeat to a fixed point.
    while _fold_once(probe, known, folded):
        pass
    return folded, known


def _without(
    model: onnx.ModelProto, folded: set[int], known: dict[str, np.ndarray]
) -> onnx.ModelProto:
    """`model` with the folded nodes replaced by initializers of the values they made."""
    if not folded:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    outputs = {o for i in folded for o in model.graph.node[i].output}
    kept = [n for i, n in enumerate(model.graph.node) if i not in folded]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    needed = {name for n in kept for name in n.input} & outputs
    out.graph.initializer.extend(numpy_helper.from_array(known[name], name) for name in needed)
    return out


def _folded_value(name: str, values: list[np.ndarray]) -> np.ndarray | BatchAffine:
    first = values[0]
    if all(v.shape == first.shape and np.array_equal(v, first) for v in values):
        return first
    (b1, b2, b3) = _PROBE_BATCHES
    v1, v2, v3 = (v.astype(np.int64).reshape(-1) for v in values)
    if (
        first.dtype not in _INTEGER
        or first.ndim > 1
        or len({v.shape for v in values}) > 1
        or ((v2 - v1) % (b2 - b1)).any()
    ):
        raise UnsupportedOperatorError(
            f"the value {name!r:.60} is computed from the batch size in a way the converter "
            "cannot fold; export with a fixed batch size, or with torch.flatten / nn.Flatten "
            "instead of view(x.size(0), -1)"
        )
    per_batch = (v2 - v1) // (b2 - b1)
    base = v1 - per_batch * b1
    if not np.array_equal(base + per_batch * b3, v3):
        raise UnsupportedOperatorError(
            f"the value {name!r:.60} is not an affine function of the batch size; export "
            "with a fixed batch size"
        )
    return BatchAffine(tuple(int(v) for v in base), tuple(int(v) for v in per_batch))


def fold_shapes(model: onnx.ModelProto) -> FoldedGraph:
    """Fold `model`'s shape computations, for its declared image size, into constants.

    Parameters
    ----------
    model
        A model that passed the static checks (one input, its image axes fixed).

    Returns
    -------
    FoldedGraph
        The model less its folded nodes; values that depend on the batch size are
        listed in `FoldedGraph.batch_dependent`.

    Raises
    ------
    TensorLimitError
        A shape computation would create more than `FOLD_MAX_ELEMENTS` values.
    UnsupportedOperatorError
        A value depends on the batch size other than as ``base + k * N``.
    InvalidModelError
        Shape inference fails, or a shape computation is malformed.
    """
    weights = {t.name for t in model.graph.initializer}
    graph_input = next(v for v in model.graph.input if v.name not in weights)
    batch_dim = graph_input.type.tensor_type.shape.dim[0]
    fixed_batch = int(batch_dim.dim_value) if batch_dim.HasField("dim_value") else None
    if not any(n.op_type in FOLD_ONLY_OPS or n.op_type == "Constant" for n in model.graph.node):
        return FoldedGraph(model, {}, fixed_batch, 0)
    batches: tuple[int | None, ...] = (None,) if fixed_batch is not None else _PROBE_BATCHES
    runs = [_fold_at(model, batch) for batch in batches]
    folded, _ = runs[0]
    if any(other != folded for other, _ in runs[1:]):
        raise UnsupportedOperatorError(
            "which shape computations fold depends on the batch size; export with a fixed "
            "batch size"
        )
    outputs = {o for i in folded for o in model.graph.node[i].output}
    kept = [n for i, n in enumerate(model.graph.node) if i not in folded]
    needed = sorted({name for n in kept for name in n.input} & outputs)
    batch_dependent: dict[str, BatchAffine] = {}
    constants: dict[str, np.ndarray] = {}
    for name in needed:
        value = _folded_value(name, [known[name] for _, known in runs])
        if isinstance(value, BatchAffine):
            batch_dependent[name] = value
            constants[name] = np.asarray(value.at(1), dtype=np.int64)
        else:
            constants[name] = value
    graph_output = model.graph.output[0].name
    if graph_output in outputs:
        raise InvalidModelError("the model's output is a constant; it ignores its input")
    result = onnx.ModelProto()
    result.CopyFrom(model)
    del result.graph.node[:]
    result.graph.node.extend(kept)
    result.graph.initializer.extend(
        numpy_helper.from_array(value, name) for name, value in constants.items()
    )
    return FoldedGraph(result, batch_dependent, fixed_batch, len(folded))
