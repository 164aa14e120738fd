"""Static checks on the raw bytes of an untrusted ONNX model.

Nothing here runs the model or lets onnx touch the filesystem: the bytes are
parsed with ``ModelProto.ParseFromString`` (never ``onnx.load(path)``, which may
follow external-data references), and every external-data reference is refused
before any tensor is decoded, because onnx's own helpers and onnxruntime read
such references relative to the current directory even for models parsed from
bytes (`reference/onnx.md`, section 4).

The checks run in this order, so each kind of bad input gets its own reason:
size, protobuf parse, external data, operator domains, IR and opset range,
loops and subgraphs, node count, operator allow-list and attribute caps, tensor
caps and finiteness, one input and one output, task metadata, input and output
shapes against the metadata. They are cheap (linear in the file size), so the
server runs them before it acknowledges an upload; `free_common.models.intake`
repeats them in its worker and goes on to the checks that need to run the model.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, numpy_helper

from free_common.errors import (
    CustomOperatorError,
    ExternalDataError,
    InputShapeError,
    InvalidModelError,
    LoopError,
    MetadataError,
    ModelTooLarge,
    NonFiniteWeights,
    NotOnnxError,
    OpsetError,
    OutputShapeError,
    SubgraphError,
    TensorLimitError,
    UnsupportedOperatorError,
)
from free_common.models.metadata import read_dp, read_metadata
from free_common.types import DpGuarantee, TaskMetadata

__all__ = [
    "ALLOWED_OPS",
    "FOLDED_BATCH_NORM_WARNING",
    "IR_RANGE",
    "OPSET_RANGE",
    "IntakeLimits",
    "StaticReport",
    "check_static",
    "declared_task_shapes",
    "iter_tensors",
    "parse_model",
    "peek",
    "takes_channels_last",
]

IR_RANGE = (7, 11)
"""Inclusive range of ONNX IR versions accepted (torch's legacy exporter writes 8, dynamo 10)."""
OPSET_RANGE = (13, 23)
"""Inclusive range of the default-domain opset; the allow-listed operators change only
in the data types they accept over this range, never in meaning."""

ALLOWED_OPS = frozenset(
    {
        "Add",
        "AveragePool",
        "BatchNormalization",
        "Cast",
        "Clip",
        "Concat",
        "Constant",
        "ConstantOfShape",
        "Conv",
        "Div",
        "Dropout",
        "Equal",
        "Erf",
        "Expand",
        "Flatten",
        "Gather",
        "Gelu",
        "Gemm",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "HardSigmoid",
        "HardSwish",
        "Identity",
        "LayerNormalization",
        "LeakyRelu",
        "LogSoftmax",
        "MatMul",
        "MaxPool",
        "Mod",
        "Mul",
        "Pad",
        "Pow",
        "Range",
        "Reciprocal",
        "ReduceMean",
        "Relu",
        "Reshape",
        "Shape",
        "Sigmoid",
        "Slice",
        "Softmax",
        "Split",
        "Sqrt",
        "Squeeze",
        "Sub",
        "Tanh",
        "Transpose",
        "Unsqueeze",
        "Where",
    }
)
"""Operators a teacher may use. Shape, ConstantOfShape, Equal, Mod and Range only where
they compute shapes from the input size: the converter folds those into constants
(`shape_fold`) and refuses what does not fold, so no tensor size depends on run-time
values. No Tile, Resize, Loop or If."""

_MULTI_OUTPUT_OPS = frozenset({"Split"})

FOLDED_BATCH_NORM_WARNING = (
    "the model has convolutions but no BatchNormalization nodes: the exporter folded its batch "
    "norms into the convolutions (torch.onnx's default), or it never had any; where a preset "
    "matches batch-norm statistics (five.bn_weight) this model's recoveries get total "
    "variation in that prior's place (five.tv_weight_without_bn) and look less like your data "
    "(the default presets, as the official FREE code, match no statistics); to keep them, "
    "export with torch.onnx.export(..., dynamo=False, do_constant_folding=False)"
)
"""The warning for a convolutional model without batch-norm statistics."""

_LOOP_OPS = frozenset({"Loop", "Scan"})
_STANDARD_DOMAINS = frozenset({"", "ai.onnx"})
_TENSOR_DTYPES = {
    TensorProto.FLOAT: 4,
    TensorProto.INT64: 8,
    TensorProto.INT32: 4,
    TensorProto.BOOL: 1,
}
"""Data types a tensor of the file may have, with their sizes: float32 weights, integer
shapes and indices (tf2onnx writes int32), boolean masks."""
_SHAPE_ATTRIBUTES = frozenset({"kernel_shape", "pads", "strides", "dilations"})


@dataclass(frozen=True)
class IntakeLimits:
    """Caps intake enforces on an untrusted model and on the worker that examines it.

    The defaults fit teachers of a few MB (Conv4, narrow ResNets, MLPs on images
    up to 512 x 512) with a wide margin.
    """

    max_bytes: int = 64 * 2**20
    """Size of the ONNX file."""
    max_nodes: int = 4096
    max_tensor_elements: int = 2**24
    """Elements of any one weight tensor."""
    max_parameters: int = 2**25
    """Elements of all weight tensors together (128 MiB of float32)."""
    max_input_elements: int = 3 * 512 * 512
    """Elements of one input image."""
    max_activation_elements: int = 2**24
    """Elements per image of any intermediate tensor, after shape inference."""
    max_shape_attribute: int = 64
    """Largest kernel size, padding, stride or dilation."""
    max_metadata_chars: int = 256 * 1024
    memory_bytes: int = 4 * 2**30
    """Address-space limit of the intake worker."""
    timeout_s: float = 120.0
    """Wall-clock limit of the intake worker."""
    probe_batch: int = 4
    """Images in the onnxruntime-versus-torch parity probe."""
    max_fixed_batch: int = 64
    """Largest batch size a graph may fix (exporters fix 1 by default)."""
    atol: float = 1e-4
    rtol: float = 1e-4
    """Parity tolerance: ``|torch - ort| <= atol + rtol * |ort|`` for every logit."""


@dataclass(frozen=True)
class StaticReport:
    """What the static checks found in an accepted model.

    Attributes
    ----------
    model
        The parsed model; treat as read-only.
    task
        The task metadata in force: the caller's, else the model's.
    input_name, output_name
        Names of the single graph input and output.
    input_dims, output_dims
        Declared dimensions; the batch axis is a name (``"batch"``) or None.
    ir_version, opset
        IR version and default-domain opset.
    producer
        ``producer_name producer_version`` as written by the exporter.
    op_counts
        Number of nodes per operator type.
    num_parameters
        Elements of all weight tensors.
    metadata_props
        Every ``metadata_props`` entry, ours and others.
    warnings
        Things that are allowed but worth telling the owner.
    dp
        The DP guarantee the model declares (``free.dp_epsilon``, ``free.dp_delta``).
    """

    model: onnx.ModelProto
    task: TaskMetadata
    input_name: str
    output_name: str
    input_dims: tuple[int | str | None, ...]
    output_dims: tuple[int | str | None, ...]
    ir_version: int
    opset: int
    producer: str
    op_counts: dict[str, int]
    num_parameters: int
    metadata_props: dict[str, str]
    warnings: tuple[str, ...] = field(default=())
    dp: DpGuarantee | None = None


def parse_model(data: bytes, limits: IntakeLimits) -> onnx.ModelProto:
    """Parse `data` as a ModelProto held in memory, refusing what is not one.

    Raises
    ------
    ModelTooLarge, NotOnnxError
    """
    if len(data) > limits.max_bytes:
        raise ModelTooLarge(
            f"the model file has {len(data):,} bytes; the limit is {limits.max_bytes:,} "
            "(teachers are usually a few MB: export a smaller model)"
        )
    if not data:
        raise NotOnnxError("the file is empty; give the .onnx file written by the exporter")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RecursionError):
        raise NotOnnxError(
            "the file is not an ONNX model (protobuf decoding failed: other data, or a "
            "truncated file); give the .onnx file written by the exporter"
        ) from None
    size = model.ByteSize()
    model.DiscardUnknownFields()
    if model.ByteSize() != size:
        raise NotOnnxError(
            "the file holds fields an ONNX model does not have (another protobuf type, a damaged "
            "file, or a newer ONNX than the server knows); export with a current torch.onnx"
        )
    if not model.HasField("graph") or not model.ir_version or not model.opset_import:
        raise NotOnnxError(
            "the file parses but has no graph, IR version or opset import, so it is not an "
            "ONNX model (perhaps another protobuf message or a truncated file)"
        )
    return model


def _iter_graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """Yield every graph: the main one, subgraphs at any depth, training and function bodies."""
    stack: list[onnx.GraphProto] = [model.graph]
    for info in model.training_info:
        stack += [info.algorithm, info.initialization]
    for function in model.functions:
        for node in function.node:
            stack += _node_subgraphs(node)
    while stack:
        graph = stack.pop()
        yield graph
        for node in graph.node:
            stack += _node_subgraphs(node)


def _node_subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    graphs: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.HasField("g"):
            graphs.append(attr.g)
        graphs.extend(attr.graphs)
    return graphs


def iter_tensors(model: onnx.ModelProto) -> Iterator[tuple[str, TensorProto]]:
    """Every TensorProto the model holds, wherever it sits, with a name for messages."""
    for graph in _iter_graphs(model):
        for tensor in graph.initializer:
            yield tensor.name, tensor
        for sparse in graph.sparse_initializer:
            yield sparse.values.name, sparse.values
            yield sparse.indices.name, sparse.indices
        for node in graph.node:
            yield from _attribute_tensors(node)
    for function in model.functions:
        for node in function.node:
            yield from _attribute_tensors(node)


def _attribute_tensors(node: onnx.NodeProto) -> Iterator[tuple[str, TensorProto]]:
    for attr in node.attribute:
        label = f"{node.op_type} {node.name!r}.{attr.name}"
        if attr.HasField("t"):
            yield label, attr.t
        for tensor in attr.tensors:
            yield label, tensor
        if attr.HasField("sparse_tensor"):
            yield label, attr.sparse_tensor.values
            yield label, attr.sparse_tensor.indices
        for sparse in attr.sparse_tensors:
            yield label, sparse.values
            yield label, sparse.indices


def _check_external_data(model: onnx.ModelProto) -> None:
    for name, tensor in iter_tensors(model):
        if tensor.data_location == TensorProto.EXTERNAL or len(tensor.external_data) > 0:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            raise ExternalDataError(
                f"tensor {name!r:.80} refers to external data {location!r:.80}; intake takes one "
                "self-contained file: export without external data (torch.onnx.export(..., "
                "external_data=False) or onnx.save_model(..., save_as_external_data=False))"
            )


def _check_domains(model: onnx.ModelProto) -> int:
    domains = {o.domain for o in model.opset_import}
    custom = sorted(domains - _STANDARD_DOMAINS)
    if custom:
        raise CustomOperatorError(
            f"the model imports operator domain(s) {', '.join(map(repr, custom))[:120]}; only the "
            "standard ONNX domain is accepted: export with standard operators only"
        )
    if model.functions:
        raise CustomOperatorError(
            f"the model defines {len(model.functions)} local function(s); only standard ONNX "
            "operators are accepted: export without custom functions"
        )
    for graph in _iter_graphs(model):
        for node in graph.node:
            if node.domain not in _STANDARD_DOMAINS:
                raise CustomOperatorError(
                    f"node {node.op_type!r:.40} uses operator domain {node.domain!r:.60}; only the "
                    "standard ONNX domain is accepted: export with standard operators only"
                )
    versions = {int(o.version) for o in model.opset_import if o.domain in _STANDARD_DOMAINS}
    if len(versions) != 1:
        raise OpsetError("the model imports the standard domain at several opset versions")
    return versions.pop()


def _check_versions(model: onnx.ModelProto, opset: int) -> None:
    if not IR_RANGE[0] <= model.ir_version <= IR_RANGE[1]:
        raise OpsetError(
            f"ONNX IR version {model.ir_version} is outside the supported range "
            f"{IR_RANGE[0]}-{IR_RANGE[1]}; export with a torch release from 2023 on"
        )
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        raise OpsetError(
            f"opset {opset} is outside the supported range {OPSET_RANGE[0]}-{OPSET_RANGE[1]}; "
            "export with torch.onnx.export(..., opset_version=17)"
        )


def _check_control_flow(model: onnx.ModelProto) -> None:
    if model.training_info:
        raise SubgraphError(
            "the model carries training graphs (training_info); export an inference-only model"
        )
    for node in model.graph.node:
        if node.op_type in _LOOP_OPS:
            raise LoopError(
                f"the model holds a {node.op_type} node; loops are not accepted: export a "
                "feed-forward classifier"
            )
        if _node_subgraphs(node):
            raise SubgraphError(
                f"node {node.op_type!r:.40} holds a subgraph; control flow (If and the like) is "
                "not accepted: export a feed-forward classifier"
            )


def _check_nodes(graph: onnx.GraphProto, limits: IntakeLimits) -> Counter[str]:
    if len(graph.node) > limits.max_nodes:
        raise ModelTooLarge(
            f"the model has {len(graph.node):,} nodes; the limit is {limits.max_nodes:,}"
        )
    counts: Counter[str] = Counter()
    for node in graph.node:
        if node.op_type not in ALLOWED_OPS:
            raise UnsupportedOperatorError(
                f"operator {node.op_type!r:.40} is not supported; teachers may use "
                f"{', '.join(sorted(ALLOWED_OPS))}"
            )
        if len(node.output) != 1 and node.op_type not in _MULTI_OUTPUT_OPS:
            raise UnsupportedOperatorError(
                f"{node.op_type} node {node.name!r:.60} has {len(node.output)} outputs; only the "
                "inference form with one output is supported: export with model.eval()"
            )
        for attr in node.attribute:
            if attr.name in _SHAPE_ATTRIBUTES and any(
                abs(v) > limits.max_shape_attribute for v in attr.ints
            ):
                raise TensorLimitError(
                    f"{node.op_type} node {node.name!r:.60} declares {attr.name} "
                    f"{list(attr.ints)[:8]}; values above {limits.max_shape_attribute} are refused"
                )
        counts[node.op_type] += 1
    return counts


_SHAPE_INPUT_OPS = {"ConstantOfShape": 0, "Expand": 1}
"""Operators that create a tensor of a shape given as an input, and which input."""


def _check_created_shapes(graph: onnx.GraphProto, limits: IntakeLimits) -> None:
    """Refuse a ConstantOfShape or Expand whose constant shape exceeds the per-image cap.

    Reads the shape without decoding anything large: the cheap half of the check the
    converter completes for shapes computed from the input size.
    """
    shapes: dict[str, TensorProto] = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            shapes[node.output[0]] = node.attribute[0].t
    for node in graph.node:
        index = _SHAPE_INPUT_OPS.get(node.op_type)
        if index is None or len(node.input) <= index or node.input[index] not in shapes:
            continue
        tensor = shapes[node.input[index]]
        if tensor.data_type != TensorProto.INT64 or math.prod(tensor.dims) > 16:
            continue
        dims = [int(d) for d in numpy_helper.to_array(tensor).reshape(-1)]
        # A constant shape is the whole tensor: a fixed batch, if any, is in it.
        if math.prod(abs(d) for d in dims) > limits.max_activation_elements:
            raise TensorLimitError(
                f"{node.op_type} node {node.name!r:.60} would create a tensor of shape "
                f"{dims[:8]}; the limit is {limits.max_activation_elements:,} values per image"
            )


def _carried_elements(tensor: TensorProto) -> int:
    if tensor.HasField("raw_data"):
        whole, rest = divmod(len(tensor.raw_data), _TENSOR_DTYPES[tensor.data_type])
        # A ragged tail is never a whole element count: report it as a mismatch.
        return -1 if rest else whole
    if tensor.data_type == TensorProto.FLOAT:
        return len(tensor.float_data)
    if tensor.data_type == TensorProto.INT64:
        return len(tensor.int64_data)
    return len(tensor.int32_data)  # int32 and bool are both stored there


def _check_tensors(model: onnx.ModelProto, limits: IntakeLimits) -> int:
    if model.graph.sparse_initializer:
        raise UnsupportedOperatorError("the model has sparse initializers; export dense weights")
    total = 0
    for name, tensor in iter_tensors(model):
        if any(d < 0 for d in tensor.dims):
            raise InvalidModelError(
                f"tensor {name!r:.80} has a negative dimension {list(tensor.dims)}"
            )
        elements = math.prod(tensor.dims)
        if elements > limits.max_tensor_elements:
            raise TensorLimitError(
                f"tensor {name!r:.80} declares shape {list(tensor.dims)[:8]} ({elements:.3g} "
                f"elements); the limit is {limits.max_tensor_elements:,} per tensor"
            )
        if tensor.data_type not in _TENSOR_DTYPES:
            known = tensor.data_type in TensorProto.DataType.values()
            dtype = TensorProto.DataType.Name(tensor.data_type) if known else tensor.data_type
            raise UnsupportedOperatorError(
                f"tensor {name!r:.80} has data type {dtype}; only float32 weights, int32/int64 "
                "shapes and bool masks are supported: export in float32"
            )
        carried = _carried_elements(tensor)
        if carried != elements:
            carries = "bytes that are not whole elements" if carried < 0 else f"{carried:,}"
            raise TensorLimitError(
                f"tensor {name!r:.80} declares {elements:,} elements of shape "
                f"{list(tensor.dims)[:8]} but carries {carries}; the file is damaged or forged"
            )
        total += elements
        if total > limits.max_parameters:
            raise TensorLimitError(
                f"the model holds more than {limits.max_parameters:,} weight values; "
                "export a smaller model"
            )
        if tensor.data_type == TensorProto.FLOAT:
            values = numpy_helper.to_array(tensor)
            if not np.isfinite(values).all():
                raise NonFiniteWeights(
                    f"tensor {name!r:.80} contains NaN or Inf values; retrain or fix the weights "
                    "before exporting"
                )
    return total


def _value_dims(value: onnx.ValueInfoProto) -> tuple[int | str | None, ...] | None:
    tensor_type = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not tensor_type.HasField("shape"):
        return None
    return tuple(
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
        for d in tensor_type.shape.dim
    )


def _graph_io(
    graph: onnx.GraphProto, limits: IntakeLimits
) -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto]:
    weights = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in weights]
    if len(inputs) != 1:
        raise InputShapeError(
            f"the model has {len(inputs)} inputs; a teacher takes exactly one (a batch of images)"
        )
    if len(graph.output) != 1:
        raise OutputShapeError(
            f"the model has {len(graph.output)} outputs; a teacher returns exactly one "
            "(the class logits)"
        )
    for value in (*graph.input, *graph.output, *graph.value_info):
        dims = _value_dims(value)
        if dims is None:
            continue
        if any(isinstance(d, int) and d > limits.max_activation_elements for d in dims):
            raise TensorLimitError(
                f"value {value.name!r:.80} declares shape {list(dims)[:8]}; no axis may exceed "
                f"{limits.max_activation_elements:,}"
            )
    return inputs[0], graph.output[0]


def takes_channels_last(graph: onnx.GraphProto, input_name: str) -> bool:
    """Tell whether the graph takes NHWC images and transposes them to NCHW first (tf2onnx)."""
    first = next((n for n in graph.node if input_name in n.input), None)
    if first is None or first.op_type != "Transpose":
        return False
    perm = next((tuple(a.ints) for a in first.attribute if a.name == "perm"), None)
    return perm == (0, 3, 1, 2)


def declared_task_shapes(
    model: onnx.ModelProto,
) -> tuple[tuple[int, int, int] | None, int | None]:
    """Read the image shape ``(C, H, W)`` and class count a model's graph declares.

    Either is None when the graph leaves it open or declares a shape no teacher has;
    an NHWC input counts when a transpose to NCHW comes first.
    """
    weights = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in weights]
    image: tuple[int, int, int] | None = None
    if len(inputs) == 1:
        dims = _value_dims(inputs[0]) or ()
        if len(dims) == 4 and all(isinstance(d, int) and d > 0 for d in dims[1:]):
            a, b, c = (int(d) for d in dims[1:] if isinstance(d, int))
            image = (c, a, b) if takes_channels_last(model.graph, inputs[0].name) else (a, b, c)
    classes: int | None = None
    if len(model.graph.output) == 1:
        out = _value_dims(model.graph.output[0]) or ()
        if len(out) == 2 and isinstance(out[1], int) and out[1] > 1:
            classes = out[1]
    return image, classes


def _check_input(
    value: onnx.ValueInfoProto, task: TaskMetadata, limits: IntakeLimits, channels_last: bool
) -> tuple[int | str | None, ...]:
    if value.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise InputShapeError(
            f"input {value.name!r:.60} is not a float32 tensor; teachers take float32 images"
        )
    dims = _value_dims(value)
    channels, height, width = task.input_shape
    want = f"[batch, {channels}, {height}, {width}]"
    if channels_last:
        want += f" (or [batch, {height}, {width}, {channels}] transposed first)"
    if dims is None or len(dims) != 4:
        raise InputShapeError(
            f"input {value.name!r:.60} has shape {list(dims) if dims else 'unknown'}; "
            f"a teacher takes images {want}"
        )
    image = dims[1:]
    if not all(isinstance(d, int) and d > 0 for d in image):
        raise InputShapeError(
            f"input {value.name!r:.60} has shape {list(dims)}; channels, height and width must be "
            f"fixed numbers, {want}"
        )
    if math.prod(d for d in image if isinstance(d, int)) > limits.max_input_elements:
        raise TensorLimitError(
            f"input {value.name!r:.60} declares images of shape {list(image)}; the limit is "
            f"{limits.max_input_elements:,} values per image"
        )
    expected = (height, width, channels) if channels_last else task.input_shape
    if tuple(image) != expected:
        raise InputShapeError(
            f"input {value.name!r:.60} has shape {list(dims)} but the task metadata says {want}; "
            "export with the image size the model was trained on, or fix the metadata"
        )
    if isinstance(dims[0], int) and not 1 <= dims[0] <= limits.max_fixed_batch:
        raise InputShapeError(
            f"input {value.name!r:.60} has a fixed batch size {dims[0]}; export with batch 1 or "
            "a dynamic batch axis (torch.onnx.export(..., dynamic_axes={'input': {0: 'batch'}}))"
        )
    return dims


def _check_output(value: onnx.ValueInfoProto, task: TaskMetadata) -> tuple[int | str | None, ...]:
    if value.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise OutputShapeError(f"output {value.name!r:.60} is not a float32 tensor of logits")
    dims = _value_dims(value)
    if dims is None:
        return ()  # undeclared: the onnxruntime probe checks the real shape
    if len(dims) != 2 or (isinstance(dims[1], int) and dims[1] != task.num_classes):
        raise OutputShapeError(
            f"output {value.name!r:.60} has shape {list(dims)}, but the task declares "
            f"{task.num_classes} classes: a teacher returns logits [batch, {task.num_classes}]"
        )
    return dims


def check_static(
    data: bytes, *, task: TaskMetadata | None = None, limits: IntakeLimits | None = None
) -> StaticReport:
    """Run every static check on the bytes of an untrusted ONNX model.

    Parameters
    ----------
    data
        The whole file, held in memory.
    task
        Task metadata given by the owner outside the file (``submit`` flags); it
        wins over the model's own ``metadata_props``.
    limits
        Caps; `IntakeLimits()` when omitted.

    Returns
    -------
    StaticReport
        What was found, for the model that passed.

    Raises
    ------
    IntakeError
        A subclass naming the first problem found, with what to do about it.
    """
    limits = limits or IntakeLimits()
    model = parse_model(data, limits)
    _check_external_data(model)
    opset = _check_domains(model)
    _check_versions(model, opset)
    _check_control_flow(model)
    op_counts = _check_nodes(model.graph, limits)
    num_parameters = _check_tensors(model, limits)
    _check_created_shapes(model.graph, limits)
    input_value, output_value = _graph_io(model.graph, limits)
    # onnx's proto2 parser hands back bytes, not str, for entries that are not UTF-8.
    props = model.metadata_props
    if any(not isinstance(p.key, str) or not isinstance(p.value, str) for p in props):
        raise MetadataError("a metadata_props entry is not UTF-8 text; re-export the model")
    props_chars = sum(len(p.key) + len(p.value) for p in model.metadata_props)
    if props_chars > limits.max_metadata_chars:
        raise ModelTooLarge(
            f"metadata_props hold {props_chars:,} characters; the limit is "
            f"{limits.max_metadata_chars:,}"
        )
    own_task = read_metadata(model)
    dp = read_dp(model)
    task = task or own_task
    if task is None:
        raise MetadataError(
            "the model carries no FREE task metadata (free.* metadata_props): give --mean and "
            "--std (and --num-classes, --input-shape where the graph does not say them) to "
            "`free-client inspect` and `submit`, or write them into the file with "
            "`free-client export --from-onnx`"
        )
    channels_last = takes_channels_last(model.graph, input_value.name)
    input_dims = _check_input(input_value, task, limits, channels_last)
    output_dims = _check_output(output_value, task)
    warnings: list[str] = []
    if op_counts["Conv"] and not op_counts["BatchNormalization"]:
        warnings.append(FOLDED_BATCH_NORM_WARNING)
    if isinstance(input_dims[0], int):
        warnings.append(
            f"the model was exported with a fixed batch size of {input_dims[0]}: it is accepted "
            "and runs that many images at a time, which makes inversion slower; export with a "
            "dynamic batch axis (dynamic_axes={'input': {0: 'batch'}}) for speed"
        )
    return StaticReport(
        model=model,
        task=task,
        input_name=input_value.name,
        output_name=output_value.name,
        input_dims=input_dims,
        output_dims=output_dims,
        ir_version=model.ir_version,
        opset=opset,
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        op_counts=dict(sorted(op_counts.items())),
        num_parameters=num_parameters,
        metadata_props={p.key: p.value for p in model.metadata_props},
        warnings=tuple(warnings),
        dp=dp,
    )


def peek(data: bytes, limits: IntakeLimits | None = None) -> dict[str, Any] | None:
    """Describe what a model declares, without judging it: for showing refused models.

    Reads only declared fields (input and output names and shapes, metadata_props,
    IR version and opsets); no tensor is decoded. None when the bytes do not parse.
    """
    try:
        model = parse_model(data, limits or IntakeLimits())
    except (NotOnnxError, ModelTooLarge):
        return None
    weights = {t.name for t in model.graph.initializer}

    def values(items: Iterator[onnx.ValueInfoProto]) -> list[dict[str, Any]]:
        return [
            {"name": v.name[:100], "shape": list(_value_dims(v) or ())[:8]} for v in list(items)[:4]
        ]

    return {
        "inputs": values(v for v in model.graph.input if v.name not in weights),
        "outputs": values(iter(model.graph.output)),
        "metadata_props": {p.key[:100]: p.value[:200] for p in model.metadata_props[:32]},
        "ir_version": model.ir_version,
        "opsets": {o.domain[:60] or "ai.onnx": o.version for o in model.opset_import[:8]},
    }
