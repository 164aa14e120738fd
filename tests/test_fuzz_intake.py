"""Property-based fuzzing of the static model checks (`free_common.models.onnx_static`).

Mutants of valid teachers (`onnx_builders.tiny_model`, any seed and class count)
must end in acceptance or a typed `IntakeError`, never another exception: the
server runs these checks before its receipt, so any other exception would be an
``INTERNAL`` answer instead of a reason the owner can act on. Two kinds of mutant:
bytes changed, inserted or deleted anywhere in the file, and structured changes
onnx.helper can make (dims, data types, weight bytes, operators, inputs,
attributes, versions, graph inputs and outputs, nodes removed or repeated, shape
annotations). With no mutation at all, every model is accepted.

Two defects the fuzzing found (a metadata entry that is not UTF-8, weight bytes
that are not whole elements) are fixed; a regression test below keeps each.
"""

from __future__ import annotations

import onnx
from hostile_harness import length_delimited
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from onnx_builders import copy, tiny_model

from free_common.errors import IntakeError
from free_common.models.onnx_static import ALLOWED_OPS, check_static
from free_common.types import ChannelOrder, TaskMetadata

FUZZ = settings(max_examples=150, deadline=None)

_ELEMENT_BYTES = {TensorProto.FLOAT: 4, TensorProto.INT64: 8, TensorProto.DOUBLE: 8}


def _task(classes: int) -> TaskMetadata:
    return TaskMetadata(classes, (1, 8, 8), ChannelOrder.GRAY, (0.5,), (0.25,))


teachers = st.builds(
    lambda seed, classes: tiny_model(seed=seed, classes=classes, task=_task(classes)),
    st.integers(0, 1000),
    st.integers(2, 8),
)


def _parsed(data: bytes) -> onnx.ModelProto | None:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception:  # noqa: BLE001 (any parse failure: the checks refuse those themselves)
        return None
    return model


def _has_raw_metadata_bytes(model: onnx.ModelProto | None) -> bool:
    """Known defect 1: a metadata key or value that is not UTF-8 (proto2 keeps raw bytes)."""
    return model is not None and any(
        isinstance(p.key, bytes) or isinstance(p.value, bytes) for p in model.metadata_props
    )


def _has_ragged_raw_data(model: onnx.ModelProto | None) -> bool:
    """Known defect 2: weight bytes that are not a whole number of elements."""
    if model is None:
        return False
    for tensor in model.graph.initializer:
        size = _ELEMENT_BYTES.get(tensor.data_type)
        if size and tensor.raw_data and len(tensor.raw_data) % size:
            return True
    return False


def _judge(data: bytes) -> bool:
    """True when accepted, False for a typed refusal; anything else fails the test."""
    try:
        check_static(data)
    except IntakeError as error:
        assert error.message and "\n" not in error.message
        return False
    return True


@settings(max_examples=40, deadline=None)
@given(teachers)
def test_valid_teachers_from_the_same_strategy_are_accepted(model: onnx.ModelProto) -> None:
    assert _judge(model.SerializeToString())


@st.composite
def byte_mutants(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(teachers).SerializeToString())
    edits = st.tuples(
        st.sampled_from(["set", "flip", "insert", "delete"]),
        st.integers(0, 10**6),
        st.binary(min_size=1, max_size=8),
    )
    for kind, where, value in draw(st.lists(edits, min_size=1, max_size=4)):
        at = where % len(data)
        if kind == "set":
            data[at] = value[0]
        elif kind == "flip":
            data[at] ^= 1 << (value[0] % 8)
        elif kind == "insert":
            data[at:at] = value
        elif len(data) > len(value):
            del data[at : at + len(value)]
    return bytes(data)


@FUZZ
@given(byte_mutants())
def test_byte_mutants_are_accepted_or_refused_with_a_typed_error(data: bytes) -> None:
    _judge(data)


_NUMBERS = st.sampled_from([0, 1, 2, 3, 7, 64, -1, 2**31, 2**40, -(2**40)]) | st.integers(-10, 100)
_NAMES = st.sampled_from(["x", "c", "b", "r", "p", "f", "y", "conv.w", "fc.b", "", "zz"])
_OPS = st.sampled_from(
    [*sorted(ALLOWED_OPS), "Softmax", "Shape", "Loop", "If", "Expand"]
) | st.text("abcXYZ", max_size=6)
_ATTRIBUTE_NAMES = st.sampled_from(
    ["axis", "transA", "transB", "pads", "strides", "kernel_shape", "epsilon", "alpha"]
)


def _mutate(model: onnx.ModelProto, data: st.DataObject) -> None:
    """Apply one structural change, chosen and parametrised by hypothesis."""
    graph = model.graph
    kind = data.draw(st.integers(0, 11), label="kind")
    tensor = data.draw(st.sampled_from(list(graph.initializer)))
    node = data.draw(st.sampled_from(list(graph.node)))
    if kind == 0:
        if tensor.dims:
            tensor.dims[data.draw(st.integers(0, len(tensor.dims) - 1))] = data.draw(_NUMBERS)
        else:
            tensor.dims.append(data.draw(_NUMBERS))
    elif kind == 1:
        tensor.data_type = data.draw(st.integers(0, 25))
    elif kind == 2:
        cut = data.draw(st.integers(0, len(tensor.raw_data)))
        tensor.raw_data = tensor.raw_data[:cut] + data.draw(st.binary(max_size=16))
    elif kind == 3:
        node.op_type = data.draw(_OPS)
    elif kind == 4 and node.input:
        node.input[data.draw(st.integers(0, len(node.input) - 1))] = data.draw(_NAMES)
    elif kind == 5:
        value = data.draw(_NUMBERS | st.lists(_NUMBERS, min_size=1, max_size=4) | st.floats())
        name = data.draw(_ATTRIBUTE_NAMES)
        del node.attribute[:]
        node.attribute.append(helper.make_attribute(name, value))
    elif kind == 6:
        model.opset_import[0].version = data.draw(st.integers(0, 30))
    elif kind == 7:
        model.ir_version = data.draw(st.integers(0, 14))
    elif kind == 8:
        dims = [
            *graph.input[0].type.tensor_type.shape.dim,
            *graph.output[0].type.tensor_type.shape.dim,
        ]
        dim = data.draw(st.sampled_from(dims))
        if data.draw(st.booleans()):
            dim.dim_value = data.draw(_NUMBERS.filter(lambda n: n >= 0))
        else:
            dim.dim_param = data.draw(st.text("nbh", min_size=1, max_size=3))
    elif kind == 9 and len(graph.node) > 1:
        graph.node.remove(node)
    elif kind == 10:
        twin = onnx.NodeProto()
        twin.CopyFrom(node)
        graph.node.insert(data.draw(st.integers(0, len(graph.node))), twin)
    elif kind == 11:
        shape = data.draw(st.lists(_NUMBERS.filter(lambda n: n >= 0), max_size=5))
        graph.value_info.append(
            helper.make_tensor_value_info(data.draw(_NAMES), TensorProto.FLOAT, shape)
        )


@FUZZ
@given(teachers, st.data())
def test_structured_mutants_are_accepted_or_refused_with_a_typed_error(
    model: onnx.ModelProto, data: st.DataObject
) -> None:
    mutant = copy(model)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        _mutate(mutant, data)
    _judge(mutant.SerializeToString())


def test_metadata_key_that_is_not_utf8_gets_a_typed_refusal() -> None:
    entry = length_delimited(1, b"free.\xff") + length_delimited(2, b"1")
    data = tiny_model().SerializeToString() + length_delimited(
        14, entry
    )  # ModelProto.metadata_props
    assert _has_raw_metadata_bytes(_parsed(data))
    assert not _judge(data)


def test_weight_bytes_that_are_not_whole_elements_get_a_typed_refusal() -> None:
    model = copy(tiny_model())
    weight = next(t for t in model.graph.initializer if t.name == "conv.w")
    weight.raw_data += b"\0\0\0"
    assert _has_ragged_raw_data(model)
    assert not _judge(model.SerializeToString())
