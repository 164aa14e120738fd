"""Hostile ONNX models, uploaded by an enrolled owner to the real exchange server.

The model intake tests (`test_intake_static.py`, `test_intake_worker.py`) call the
intake functions; here the same kinds of model travel the whole way: signed
manifest, TLS, the auth interceptor, streaming to a temporary file, the static
checks, the store. Each model is built by code (onnx.helper, or protobuf bytes by
hand for what onnx.helper refuses to build), nothing is read from a file.

The server runs in a working directory holding ``canary.bin`` and ``weights.bin``
(a hard link to a secret in another folder), its home holds ``canary.bin`` too, and
the external-data references point at exactly those files, by plain name, through
the hard link, by ``..`` traversal and by absolute path: the cases
`reference/onnx.md` section 4 saw onnx and onnxruntime follow. For each model: the
refusal (status and the line naming the problem) comes before any receipt, nothing
is stored, no canary is opened or read (inotify, which sees reads in C++ code and
in other processes), no file outside ``store/`` appears or changes, and the next
honest owner's upload succeeds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from exchange_harness import TASK, Owner, client, enroll, make_owner, new_home, serving
from hostile_harness import (
    Sandbox,
    honest_upload,
    length_delimited,
    store_view,
    varint,
    wait_for_no_temp_files,
    working_directory,
)
from onnx import TensorProto, helper
from onnx_builders import copy, init, make, point_to_external, tiny_model

from free_client.uploader import upload
from free_common.errors import ServerRefused
from free_common.types import ChannelOrder, TaskMetadata
from free_server.config import LimitSettings
from free_server.runtime import ServerRuntime

MAX_UPLOAD = 512 * 1024


@dataclass(frozen=True)
class World:
    runtime: ServerRuntime
    sandbox: Sandbox
    mallory: Owner
    honest: Owner


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("hostile-models")
    home = new_home(
        root / "home", limits=LimitSettings(max_upload_bytes=MAX_UPLOAD, chunk_bytes=64 * 1024)
    )
    sandbox = Sandbox.create(root, home)
    mallory = enroll(home, make_owner(root / "keys", "mallory"))
    honest = enroll(home, make_owner(root / "keys", "honest"))
    with working_directory(sandbox.cwd), serving(home) as runtime:
        yield World(runtime, sandbox, mallory, honest)


# --- builders ---------------------------------------------------------------------------------

Mutation = Callable[[onnx.ModelProto], None]


def _mutated(mutate: Mutation, model: onnx.ModelProto | None = None) -> bytes:
    out = copy(model or tiny_model(seed=5))
    mutate(out)
    return bytes(out.SerializeToString())


def _weight(model: onnx.ModelProto, name: str) -> TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def _external(location: Callable[[Sandbox], str]) -> Callable[[Sandbox], bytes]:
    def build(sandbox: Sandbox) -> bytes:
        return _mutated(lambda m: point_to_external(_weight(m, "conv.w"), location(sandbox)))

    return build


def _external_constant(sandbox: Sandbox) -> bytes:
    def mutate(model: onnx.ModelProto) -> None:
        value = helper.make_tensor("k", TensorProto.FLOAT, [1], [2.0])
        point_to_external(value, str(sandbox.home / "canary.bin"))
        model.graph.node.insert(0, helper.make_node("Constant", [], ["k"], value=value))

    return _mutated(mutate)


def _custom_domain(model: onnx.ModelProto) -> None:
    model.opset_import.append(helper.make_opsetid("com.evil", 1))
    model.graph.node[2].op_type, model.graph.node[2].domain = "EvilOp", "com.evil"


def _contrib_op(model: onnx.ModelProto) -> None:
    model.graph.node[2].op_type, model.graph.node[2].domain = "Gelu", "com.microsoft"


def _local_function(model: onnx.ModelProto) -> None:
    body = [helper.make_node("Relu", ["a"], ["b"])]
    model.functions.append(
        helper.make_function("", "MyRelu", ["a"], ["b"], body, [helper.make_opsetid("", 17)])
    )


def _versions(opset: int, ir: int) -> Mutation:
    def mutate(model: onnx.ModelProto) -> None:
        model.opset_import[0].version, model.ir_version = opset, ir

    return mutate


def _constant_of_shape_bomb() -> bytes:
    """A few hundred bytes that would fill 4 TiB: ConstantOfShape([2^20, 2^20])."""
    value = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["big"], value=value),
        helper.make_node("Flatten", ["x"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w"], ["y"], transB=1),
    ]
    weights = [
        init("shape", np.array([2**20, 2**20], np.int64)),
        init("w", np.ones((3, 64), np.float32)),
    ]
    return bytes(make(nodes, weights, output_shape=["batch", 3]).SerializeToString())


def _expand_bomb() -> bytes:
    """Expand a tiny input to [1, 1, 2^20, 2^20]: one constant shape, 4 TiB of output."""
    nodes = [
        helper.make_node("Expand", ["x", "shape"], ["big"]),
        helper.make_node("Flatten", ["x"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w"], ["y"], transB=1),
    ]
    weights = [
        init("shape", np.array([1, 1, 2**20, 2**20], np.int64)),
        init("w", np.ones((3, 64), np.float32)),
    ]
    return bytes(make(nodes, weights, output_shape=["batch", 3]).SerializeToString())


def _endless_loop(model: onnx.ModelProto) -> None:
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])],
    )
    model.graph.initializer.append(init("trip", np.array(2**62, dtype=np.int64)))
    model.graph.node.insert(0, helper.make_node("Loop", ["trip", ""], ["never"], body=body))


def _if_subgraph(model: onnx.ModelProto) -> None:
    branch = helper.make_graph(
        [helper.make_node("Identity", ["f"], ["o"])],
        "branch",
        [],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)],
    )
    model.graph.node.insert(
        5, helper.make_node("If", ["cond"], ["f2"], then_branch=branch, else_branch=branch)
    )


def _nesting_bomb(depth: int = 60) -> bytes:
    """A valid model plus one If node whose branches nest `depth` graphs deep.

    Written as protobuf bytes by hand (ModelProto.graph 7, GraphProto.node 1,
    NodeProto.op_type 4 and attribute 5, AttributeProto.name 1, g 6, type 20):
    onnx.helper cannot build what protobuf's own depth limit refuses to parse.
    """
    graph = b""
    for _ in range(depth):
        attribute = (
            length_delimited(1, b"then_branch")
            + length_delimited(6, graph)
            + varint(20 << 3)
            + varint(5)
        )
        graph = length_delimited(1, length_delimited(4, b"If") + length_delimited(5, attribute))
    return bytes(tiny_model(seed=5).SerializeToString()) + length_delimited(7, graph)


def _gigantic_tensor(model: onnx.ModelProto) -> None:
    weight = _weight(model, "conv.w")
    del weight.dims[:]
    weight.dims.extend([100_000, 100_000, 1000])
    weight.raw_data = b"\0\0\0\0"


def _short_tensor(model: onnx.ModelProto) -> None:
    weight = _weight(model, "conv.w")
    weight.raw_data = weight.raw_data[:8]


def _gigantic_intermediate(model: onnx.ModelProto) -> None:
    model.graph.value_info.append(
        helper.make_tensor_value_info("c", TensorProto.FLOAT, ["batch", 4, 2**40, 2**40])
    )


def _gigantic_pads(model: onnx.ModelProto) -> None:
    next(a for a in model.graph.node[0].attribute if a.name == "pads").ints[:] = [10**9] * 4


def _replace_weight(name: str, change: Callable[[np.ndarray], np.ndarray]) -> Mutation:
    def mutate(model: onnx.ModelProto) -> None:
        tensor = _weight(model, name)
        tensor.CopyFrom(init(name, change(onnx.numpy_helper.to_array(tensor).copy())))

    return mutate


def _with_nan(values: np.ndarray) -> np.ndarray:
    values.flat[1] = np.nan
    return values


def _sparse(model: onnx.ModelProto) -> None:
    values, indices = init("sp", np.ones(1, np.float32)), init("sp_i", np.zeros(1, np.int64))
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4]))


def _training_batch_norm(model: onnx.ModelProto) -> None:
    model.graph.node[1].output.extend(["running_mean_out", "running_var_out"])


def _second_input(model: onnx.ModelProto) -> None:
    model.graph.input.append(
        helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["batch", 1, 8, 8])
    )


def _colour_input(model: onnx.ModelProto) -> None:
    model.graph.input[0].CopyFrom(
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])
    )


def _props(extra: dict[str, str]) -> Mutation:
    def mutate(model: onnx.ModelProto) -> None:
        for key, value in extra.items():
            model.metadata_props.add(key=key, value=value)

    return mutate


def _non_utf8_metadata_key() -> bytes:
    """metadata_props (ModelProto field 14) whose key is not UTF-8: onnx.proto is proto2,
    so the parser keeps the raw bytes."""
    entry = length_delimited(1, b"free.\xff\xfe") + length_delimited(2, b"1")
    return bytes(tiny_model(seed=5).SerializeToString()) + length_delimited(14, entry)


def _evil_pickle() -> bytes:
    """A protocol-0 pickle that would run ``touch PWNED`` if anything unpickled it."""
    return b"cos\nsystem\n(S'touch PWNED'\ntR."


FOUR_CLASSES = TaskMetadata(4, (1, 8, 8), ChannelOrder.GRAY, (0.5,), (0.25,))

Build = Callable[[Sandbox], bytes]


def _fixed(data: bytes) -> Build:
    return lambda _sandbox: data


def _m(mutate: Mutation) -> Build:
    return lambda _sandbox: _mutated(mutate)


INVALID = "INVALID_ARGUMENT"
CASES: list[object] = [
    ("external-plain-name", _external(lambda s: "canary.bin"), INVALID, "external data"),
    ("external-hard-link", _external(lambda s: "weights.bin"), INVALID, "external data"),
    (
        "external-traversal",
        _external(lambda s: "../" * 12 + str(s.home / "canary.bin").lstrip("/")),
        INVALID,
        "external data",
    ),
    (
        "external-dotdot-inside",
        _external(lambda s: "a/../../outside/secret.bin"),
        INVALID,
        "external data",
    ),
    ("external-absolute", _external(lambda s: str(s.secret)), INVALID, "external data"),
    ("external-in-a-constant", _external_constant, INVALID, "external data"),
    ("custom-domain", _m(_custom_domain), INVALID, "com.evil"),
    ("contrib-operator", _m(_contrib_op), INVALID, "com.microsoft"),
    ("local-function", _m(_local_function), INVALID, "local function"),
    ("opset-from-the-future", _m(_versions(30, 8)), INVALID, "outside the supported range"),
    ("ir-from-the-future", _m(_versions(17, 12)), INVALID, "outside the supported range"),
    (
        "constant-of-shape-bomb",
        _fixed(_constant_of_shape_bomb()),
        INVALID,
        "would create a tensor of shape",
    ),
    ("expand-bomb", _fixed(_expand_bomb()), INVALID, "would create a tensor of shape"),
    ("loop-of-2^62", _m(_endless_loop), INVALID, "Loop node"),
    ("if-subgraph", _m(_if_subgraph), INVALID, "subgraph"),
    ("protobuf-nesting-bomb", _fixed(_nesting_bomb()), INVALID, "not an ONNX model"),
    ("declares-40-terabytes", _m(_gigantic_tensor), INVALID, "declares shape"),
    ("carries-fewer-values", _m(_short_tensor), INVALID, "carries 2"),
    ("gigantic-intermediate", _m(_gigantic_intermediate), INVALID, "no axis may exceed"),
    ("gigantic-padding", _m(_gigantic_pads), INVALID, "pads"),
    ("nan-weights", _m(_replace_weight("conv.w", _with_nan)), INVALID, "contains NaN or Inf"),
    (
        "float64-weights",
        _m(_replace_weight("fc.b", lambda v: v.astype(np.float64))),
        INVALID,
        "DOUBLE",
    ),
    ("sparse-initializer", _m(_sparse), INVALID, "sparse"),
    ("training-batch-norm", _m(_training_batch_norm), INVALID, "3 outputs"),
    ("two-inputs", _m(_second_input), INVALID, "2 inputs"),
    ("colour-input-for-grey-task", _m(_colour_input), INVALID, "task metadata says"),
    (
        "four-logits-for-three-classes",
        _fixed(bytes(tiny_model(seed=5, classes=4, task=FOUR_CLASSES).SerializeToString())),
        INVALID,
        "declares 3 classes",
    ),
    (
        "unknown-free-metadata",
        _m(_props({"free.owner_secret": "1"})),
        INVALID,
        "unknown metadata key",
    ),
    ("oversized-metadata", _m(_props({"note": "x" * 300_000})), INVALID, "metadata_props"),
    (
        "file-over-the-upload-cap",
        _m(_props({"note": "x" * MAX_UPLOAD})),
        "RESOURCE_EXHAUSTED",
        f"at most {MAX_UPLOAD:,}",
    ),
    ("random-bytes", _fixed(np.random.default_rng(1).bytes(4096)), INVALID, "not an ONNX model"),
    (
        "truncated-model",
        _fixed(bytes(tiny_model(seed=5).SerializeToString())[:500]),
        INVALID,
        "ONNX",
    ),
    (
        "tensor-not-model",
        _fixed(helper.make_tensor("t", TensorProto.FLOAT, [2], [1.0, 2.0]).SerializeToString()),
        INVALID,
        "ONNX model",
    ),
    ("pickle-that-runs-a-command", _fixed(_evil_pickle()), INVALID, "not an ONNX model"),
    ("non-utf8-metadata-key", _fixed(_non_utf8_metadata_key()), INVALID, "metadata"),
]


def _ids() -> list[str]:
    # pytest.param entries are ParameterSets (named tuples whose values hold the case).
    return [str(getattr(c, "values", c)[0]) for c in CASES]  # type: ignore[index]


@pytest.mark.parametrize(("name", "build", "code", "text"), CASES, ids=_ids())
def test_hostile_model_is_refused_before_the_receipt_and_touches_nothing(
    world: World, name: str, build: Build, code: str, text: str
) -> None:
    data = build(world.sandbox)
    home = world.runtime.home
    before = store_view(home)
    with world.sandbox.untouched():
        with pytest.raises(ServerRefused) as refused, client(world.runtime, world.mallory) as c:
            upload(c, world.mallory.key, data, TASK, notify=lambda _line: None)
        wait_for_no_temp_files(home)
    assert refused.value.status == code, (name, refused.value.message)
    assert text in refused.value.message, refused.value.message
    assert "\n" not in refused.value.message
    # The server names no path of its own (it may quote the path the model carries).
    assert str(home.root) not in refused.value.message or str(home.root).encode() in data
    assert store_view(home) == before
    assert not (world.sandbox.cwd / "PWNED").exists()
    assert honest_upload(world.runtime, world.honest).record.client_id == world.honest.key_id


def test_the_same_builders_leave_a_model_the_server_accepts(world: World) -> None:
    # The baseline the mutations start from is acknowledged, so each refusal above is the
    # mutation's doing.
    with client(world.runtime, world.mallory) as c:
        receipt = upload(
            c, world.mallory.key, _mutated(lambda m: None), TASK, notify=lambda _line: None
        )
    assert receipt.record.client_id == world.mallory.key_id


def test_the_watch_sees_onnx_follow_a_reference_through_the_working_directory(
    world: World,
) -> None:
    # What the refusals above prevent, done on purpose: onnx resolves a relative location
    # against the working directory and reads the canary there.
    model = onnx.ModelProto()
    model.ParseFromString(_external(lambda s: "canary.bin")(world.sandbox))
    with (
        pytest.raises(AssertionError, match="canary was opened"),
        world.sandbox.untouched(),
    ):
        onnx.numpy_helper.to_array(_weight(model, "conv.w"), base_dir="")
