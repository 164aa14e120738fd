"""Static intake checks: every kind of bad model is refused with its own reason.

Models are built with onnx.helper (tests/onnx_builders.py); nothing is read from disk.
"""

from __future__ import annotations

import math
import random
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import descriptor_pb2
from onnx import TensorProto, helper
from onnx_builders import (
    TINY_TASK,
    OpenWatch,
    copy,
    init,
    point_to_external,
    tiny_bytes,
    tiny_model,
)

from free_common.errors import (
    CustomOperatorError,
    ExternalDataError,
    InputShapeError,
    IntakeError,
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
from free_common.models.onnx_static import IntakeLimits, check_static, peek
from free_common.types import ChannelOrder, TaskMetadata

Mutation = Callable[[onnx.ModelProto], None]


def _mutated(mutate: Mutation) -> bytes:
    model = copy(tiny_model())
    mutate(model)
    return model.SerializeToString()


def _initializer(model: onnx.ModelProto, name: str) -> TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def test_tiny_model_passes_and_is_described() -> None:
    report = check_static(tiny_bytes())
    assert report.task == TINY_TASK
    assert report.input_dims == ("batch", 1, 8, 8)
    assert report.output_dims == ("batch", 3)
    assert report.op_counts["BatchNormalization"] == 1
    assert report.num_parameters == 4 * 9 + 4 + 4 * 4 + 3 * 4 + 3
    assert report.warnings == ()


# --- not ONNX ---------------------------------------------------------------------------


def _other_protos() -> list[bytes]:
    tensor = helper.make_tensor("t", TensorProto.FLOAT, [2], [1.0, 2.0]).SerializeToString()
    graph = tiny_model().graph.SerializeToString()
    node = helper.make_node("Relu", ["a"], ["b"]).SerializeToString()
    descriptor = descriptor_pb2.FileDescriptorProto(name="x.proto", package="p").SerializeToString()
    return [tensor, graph, node, descriptor]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello, this is a text file\n",
        b"\x89PNG\r\n\x1a\n" + bytes(64),
        random.Random(0).randbytes(4096),
        *_other_protos(),
    ],
    ids=[
        "empty",
        "text",
        "png",
        "random",
        "tensor-proto",
        "graph-proto",
        "node-proto",
        "descriptor",
    ],
)
def test_bytes_that_are_not_onnx_are_refused(data: bytes) -> None:
    with pytest.raises(NotOnnxError, match=r"not an ONNX model|empty|fields an ONNX model"):
        check_static(data)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.99])
def test_truncated_files_are_refused(keep: float) -> None:
    data = tiny_bytes()
    with pytest.raises(IntakeError):
        check_static(data[: int(len(data) * keep)])


def test_oversized_file_is_refused_before_parsing() -> None:
    with pytest.raises(ModelTooLarge, match="bytes; the limit is 100"):
        check_static(tiny_bytes(), limits=IntakeLimits(max_bytes=100))


# --- external data: refused, and no file is opened ----------------------------------------


@pytest.fixture(scope="module")
def canary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("outside") / "secret.bin"
    path.write_bytes(np.arange(9, dtype=np.float32).tobytes() * 4)
    return path


@pytest.fixture
def watch(canary: Path) -> Iterator[OpenWatch]:
    watcher = OpenWatch(canary)
    yield watcher
    watcher.close()


def test_the_watch_sees_a_read_of_the_canary(canary: Path, watch: OpenWatch) -> None:
    # The detector the external-data tests rely on: a real read is seen.
    point = copy(tiny_model()).graph.initializer[0]
    point_to_external(point, canary.name)
    onnx.numpy_helper.to_array(point, base_dir=str(canary.parent))
    assert watch.events() > 0


def _external_cases(canary: Path) -> dict[str, str]:
    return {
        "plain-name": canary.name,
        "relative": "./" + canary.name,
        "parent": "../" * 8 + str(canary).lstrip("/"),
        "dotdot-inside": "a/../../" + canary.name,
        "absolute": str(canary),
        "empty": "",
    }


@pytest.mark.parametrize(
    "case", ["plain-name", "relative", "parent", "dotdot-inside", "absolute", "empty"]
)
def test_external_data_in_initializers_is_refused_without_reading(
    case: str, canary: Path, watch: OpenWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Relative names would resolve against the working directory: put the canary there.
    monkeypatch.chdir(canary.parent)
    location = _external_cases(canary)[case]
    data = _mutated(lambda m: point_to_external(_initializer(m, "conv.w"), location))
    with pytest.raises(ExternalDataError, match="external data") as info:
        check_static(data)
    assert "self-contained" in str(info.value)
    assert watch.events() == 0


def test_external_data_in_a_constant_node_is_refused(canary: Path, watch: OpenWatch) -> None:
    def mutate(model: onnx.ModelProto) -> None:
        value = helper.make_tensor("k", TensorProto.FLOAT, [1], [2.0])
        point_to_external(value, str(canary))
        model.graph.node.insert(0, helper.make_node("Constant", [], ["k"], value=value))

    with pytest.raises(ExternalDataError):
        check_static(_mutated(mutate))
    assert watch.events() == 0


def test_external_data_inside_a_subgraph_is_refused_as_external_data(canary: Path) -> None:
    branch_value = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
    point_to_external(branch_value, str(canary))
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["o"], value=branch_value)],
        "branch",
        [],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1])],
    )

    def mutate(model: onnx.ModelProto) -> None:
        model.graph.node.append(
            helper.make_node("If", ["cond"], ["z"], then_branch=branch, else_branch=branch)
        )

    with pytest.raises(ExternalDataError):
        check_static(_mutated(mutate))


# --- operators and versions ---------------------------------------------------------------


def test_custom_domain_is_refused() -> None:
    def mutate(model: onnx.ModelProto) -> None:
        model.opset_import.append(helper.make_opsetid("com.evil", 1))
        model.graph.node[2].op_type = "EvilOp"
        model.graph.node[2].domain = "com.evil"

    with pytest.raises(CustomOperatorError, match=r"com\.evil"):
        check_static(_mutated(mutate))


def test_contrib_domain_node_is_refused_even_without_its_import() -> None:
    def mutate(model: onnx.ModelProto) -> None:
        model.graph.node[2].op_type = "Gelu"
        model.graph.node[2].domain = "com.microsoft"

    with pytest.raises(CustomOperatorError, match=r"com\.microsoft"):
        check_static(_mutated(mutate))


def test_model_local_functions_are_refused() -> None:
    def mutate(model: onnx.ModelProto) -> None:
        model.functions.append(
            helper.make_function(
                "",
                "MyRelu",
                ["a"],
                ["b"],
                [helper.make_node("Relu", ["a"], ["b"])],
                [helper.make_opsetid("", 17)],
            )
        )

    with pytest.raises(CustomOperatorError, match="local function"):
        check_static(_mutated(mutate))


@pytest.mark.parametrize(("opset", "ir"), [(9, 8), (30, 8), (17, 3), (17, 12)])
def test_opset_and_ir_out_of_range_are_refused(opset: int, ir: int) -> None:
    def mutate(model: onnx.ModelProto) -> None:
        model.opset_import[0].version = opset
        model.ir_version = ir

    with pytest.raises(OpsetError, match="outside the supported range"):
        check_static(_mutated(mutate))


@pytest.mark.parametrize("op", ["Tile", "Resize", "NonZero", "TopK", "ScatterND"])
def test_operators_off_the_allow_list_are_refused(op: str) -> None:
    def mutate(model: onnx.ModelProto) -> None:
        model.graph.node[2].op_type = op

    with pytest.raises(UnsupportedOperatorError, match=f"'{op}' is not supported"):
        check_static(_mutated(mutate))


def test_training_mode_batch_norm_is_refused() -> None:
    def mutate(model: onnx.ModelProto) -> None:
        model.graph.node[1].output.extend(["running_mean_out", "running_var_out"])

    with pytest.raises(UnsupportedOperatorError, match="3 outputs"):
        check_static(_mutated(mutate))


def test_if_subgraph_is_refused() -> None:
    branch = helper.make_graph(
        [helper.make_node("Identity", ["f"], ["o"])],
        "branch",
        [],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)],
    )

    def mutate(model: onnx.ModelProto) -> None:
        model.graph.node.insert(
            5, helper.make_node("If", ["cond"], ["f2"], then_branch=branch, else_branch=branch)
        )

    with pytest.raises(SubgraphError, match="subgraph"):
        check_static(_mutated(mutate))


def test_training_graphs_are_refused() -> None:
    def mutate(model: onnx.ModelProto) -> None:
        model.training_info.add().algorithm.CopyFrom(helper.make_graph([], "train", [], []))

    with pytest.raises(SubgraphError, match="training"):
        check_static(_mutated(mutate))


@pytest.mark.parametrize("op", ["Loop", "Scan"])
def test_loops_are_refused(op: str) -> None:
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])],
    )

    def mutate(model: onnx.ModelProto) -> None:
        model.graph.initializer.append(init("trip", np.array(2**62, dtype=np.int64)))
        attrs = {"body": body} if op == "Loop" else {"body": body, "num_scan_inputs": 1}
        model.graph.node.insert(0, helper.make_node(op, ["trip", ""], ["never"], **attrs))

    with pytest.raises(LoopError, match=f"{op} node"):
        check_static(_mutated(mutate))


def test_too_many_nodes_is_refused() -> None:
    with pytest.raises(ModelTooLarge, match="nodes"):
        check_static(tiny_bytes(), limits=IntakeLimits(max_nodes=3))


# --- tensors and shapes -------------------------------------------------------------------


def test_gigantic_declared_tensor_is_refused_without_allocating() -> None:
    def mutate(model: onnx.ModelProto) -> None:
        weight = _initializer(model, "conv.w")
        weight.ClearField("raw_data")
        del weight.dims[:]
        weight.dims.extend([100_000, 100_000, 1000])
        weight.raw_data = b"\0\0\0\0"

    data = _mutated(mutate)
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(TensorLimitError, match="declares shape"):
        check_static(data)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert time.perf_counter() - started < 1.0
    assert peak < 16 * 2**20


def test_tensor_carrying_fewer_values_than_declared_is_refused() -> None:
    def mutate(model: onnx.ModelProto) -> None:
        weight = _initializer(model, "conv.w")
        weight.raw_data = weight.raw_data[:8]

    with pytest.raises(TensorLimitError, match="carries 2"):
        check_static(_mutated(mutate))


def test_parameter_total_over_cap_is_refused() -> None:
    with pytest.raises(TensorLimitError, match="weight values"):
        check_static(tiny_bytes(), limits=IntakeLimits(max_parameters=50))


def test_gigantic_declared_input_shape_is_refused() -> None:
    big = TaskMetadata(3, (1, 1024, 1024), ChannelOrder.GRAY, (0.5,), (0.25,))

    def mutate(model: onnx.ModelProto) -> None:
        dims = model.graph.input[0].type.tensor_type.shape.dim
        dims[2].dim_value = dims[3].dim_value = 1024

    with pytest.raises(TensorLimitError, match="values per image"):
        check_static(_mutated(mutate), task=big, limits=IntakeLimits(max_input_elements=2**16))


def test_gigantic_declared_intermediate_shape_is_refused() -> None:
    def mutate(model: onnx.ModelProto) -> None:
        model.graph.value_info.append(
            helper.make_tensor_value_info("c", TensorProto.FLOAT, ["batch", 4, 2**40, 2**40])
        )

    with pytest.raises(TensorLimitError, match="no axis may exceed"):
        check_static(_mutated(mutate))


def test_gigantic_padding_is_refused() -> None:
    def mutate(model: onnx.ModelProto) -> None:
        pads = next(a for a in model.graph.node[0].attribute if a.name == "pads")
        pads.ints[:] = [10**9] * 4

    with pytest.raises(TensorLimitError, match="pads"):
        check_static(_mutated(mutate))


@pytest.mark.parametrize(("name", "bad"), [("conv.w", math.nan), ("bn.var", math.inf)])
def test_non_finite_weights_are_refused(name: str, bad: float) -> None:
    def mutate(model: onnx.ModelProto) -> None:
        tensor = _initializer(model, name)
        values = onnx.numpy_helper.to_array(tensor).copy()
        values.flat[1] = bad
        tensor.CopyFrom(init(name, values))

    with pytest.raises(NonFiniteWeights, match=f"'{name}' contains NaN or Inf"):
        check_static(_mutated(mutate))


def test_float64_weights_are_refused() -> None:
    def mutate(model: onnx.ModelProto) -> None:
        tensor = _initializer(model, "fc.b")
        tensor.CopyFrom(init("fc.b", onnx.numpy_helper.to_array(tensor).astype(np.float64)))

    with pytest.raises(UnsupportedOperatorError, match="DOUBLE"):
        check_static(_mutated(mutate))


def test_sparse_initializers_are_refused() -> None:
    def mutate(model: onnx.ModelProto) -> None:
        values = init("sp", np.ones(1, np.float32))
        indices = init("sp_i", np.zeros(1, np.int64))
        model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4]))

    with pytest.raises(UnsupportedOperatorError, match="sparse"):
        check_static(_mutated(mutate))


# --- input, output, metadata --------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        (["batch", 1, 16, 16], "task metadata says"),
        (["batch", 3, 8, 8], "task metadata says"),
        (["batch", 64], "a teacher takes images"),
        (["batch", 1, "h", "w"], "must be fixed numbers"),
        ([0, 1, 8, 8], "fixed batch size 0"),
        ([65, 1, 8, 8], "fixed batch size 65"),
    ],
)
def test_wrong_input_shape_is_refused(shape: list[int | str], message: str) -> None:
    def mutate(model: onnx.ModelProto) -> None:
        model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, shape))

    with pytest.raises(InputShapeError, match=message):
        check_static(_mutated(mutate))


def test_two_inputs_are_refused() -> None:
    def mutate(model: onnx.ModelProto) -> None:
        model.graph.input.append(
            helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["batch", 1, 8, 8])
        )

    with pytest.raises(InputShapeError, match="2 inputs"):
        check_static(_mutated(mutate))


def test_two_outputs_are_refused() -> None:
    def mutate(model: onnx.ModelProto) -> None:
        model.graph.output.append(helper.make_tensor_value_info("f", TensorProto.FLOAT, None))

    with pytest.raises(OutputShapeError, match="2 outputs"):
        check_static(_mutated(mutate))


def test_output_that_disagrees_with_declared_classes_is_refused() -> None:
    four = TaskMetadata(4, (1, 8, 8), ChannelOrder.GRAY, (0.5,), (0.25,))
    with pytest.raises(OutputShapeError, match="declares 4 classes"):
        check_static(tiny_bytes(task=four))


def test_caller_metadata_wins_over_the_model() -> None:
    four = TaskMetadata(4, (1, 8, 8), ChannelOrder.GRAY, (0.5,), (0.25,))
    with pytest.raises(OutputShapeError, match="declares 4 classes"):
        check_static(tiny_bytes(), task=four)
    assert check_static(tiny_bytes(task=four), task=TINY_TASK).task == TINY_TASK


def test_missing_metadata_is_refused_with_what_to_do() -> None:
    with pytest.raises(MetadataError, match="free-client export"):
        check_static(tiny_bytes(task=None))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("free.num_classes", "three", "not valid JSON"),
        ("free.mean", "[NaN]", "not valid JSON"),
        ("free.channel_order", "cmyk", "channel_order must be one of"),
        ("free.class_names", '["a", "b"]', "class_names"),
        ("free.metadata_version", "9", "metadata_version"),
        ("free.owner_secret", "1", "unknown metadata key"),
    ],
)
def test_malformed_metadata_is_refused(key: str, value: str, message: str) -> None:
    def mutate(model: onnx.ModelProto) -> None:
        props = {p.key: p.value for p in model.metadata_props}
        props[key] = value
        del model.metadata_props[:]
        for k, v in props.items():
            model.metadata_props.add(key=k, value=v)

    with pytest.raises(MetadataError, match=message):
        check_static(_mutated(mutate))


def test_repeated_metadata_key_is_refused() -> None:
    def mutate(model: onnx.ModelProto) -> None:
        model.metadata_props.add(key="free.num_classes", value="3")

    with pytest.raises(MetadataError, match="repeats a key"):
        check_static(_mutated(mutate))


def test_oversized_metadata_is_refused() -> None:
    def mutate(model: onnx.ModelProto) -> None:
        model.metadata_props.add(key="note", value="x" * 300_000)

    with pytest.raises(ModelTooLarge, match="metadata_props"):
        check_static(_mutated(mutate))


def test_conv_without_batch_norm_passes_with_a_warning() -> None:
    model = tiny_model()
    bn = model.graph.node[1]
    model.graph.node.remove(bn)
    model.graph.node[1].input[0] = "c"
    report = check_static(model.SerializeToString())
    assert any("BatchNormalization" in w for w in report.warnings)


def test_peek_describes_a_refused_model_without_judging_it() -> None:
    declared = peek(_mutated(lambda m: point_to_external(_initializer(m, "fc.w"), "/etc/passwd")))
    assert declared is not None
    assert declared["inputs"] == [{"name": "x", "shape": ["batch", 1, 8, 8]}]
    assert declared["metadata_props"]["free.num_classes"] == "3"
    assert peek(b"not onnx at all") is None


def test_make_helper_builds_models_the_checker_accepts() -> None:
    onnx.checker.check_model(tiny_model(), full_check=True)
