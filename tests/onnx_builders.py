"""Small ONNX models built with onnx.helper, for intake and converter tests.

`tiny_model()` is a valid teacher (Conv, BN, Relu, GAP, Flatten, Gemm on 1x8x8
images, 3 classes) with FREE metadata; tests mutate a copy to make each kind of
bad model.
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from free_common.models.metadata import write_metadata
from free_common.types import ChannelOrder, TaskMetadata

TINY_TASK = TaskMetadata(
    num_classes=3, input_shape=(1, 8, 8), channel_order=ChannelOrder.GRAY, mean=(0.5,), std=(0.25,)
)


def init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def make(
    nodes: list[onnx.NodeProto],
    initializers: list[TensorProto],
    *,
    input_shape: list[int | str] | None = None,
    output_shape: list[int | str] | None = None,
    task: TaskMetadata | None = TINY_TASK,
    opset: int = 17,
    ir_version: int = 8,
    input_name: str = "x",
    output_name: str = "y",
) -> onnx.ModelProto:
    """A model with one float input and output, the given nodes and FREE metadata."""
    x = helper.make_tensor_value_info(
        input_name, TensorProto.FLOAT, input_shape or ["batch", 1, 8, 8]
    )
    y = helper.make_tensor_value_info(output_name, TensorProto.FLOAT, output_shape)
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version
    )
    if task is not None:
        write_metadata(model, task)
    return model


def tiny_model(
    seed: int = 0, classes: int = 3, task: TaskMetadata | None = TINY_TASK
) -> onnx.ModelProto:
    """Conv(1->4) BN Relu GAP Flatten Gemm(4->classes) on [N, 1, 8, 8]."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    initializers = [
        init("conv.w", rng.standard_normal((4, 1, 3, 3)).astype(f32)),
        init("conv.b", rng.standard_normal(4).astype(f32)),
        init("bn.scale", rng.uniform(0.5, 1.5, 4).astype(f32)),
        init("bn.bias", rng.standard_normal(4).astype(f32)),
        init("bn.mean", rng.standard_normal(4).astype(f32)),
        init("bn.var", rng.uniform(0.5, 2.0, 4).astype(f32)),
        init("fc.w", rng.standard_normal((classes, 4)).astype(f32)),
        init("fc.b", rng.standard_normal(classes).astype(f32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization",
            ["c", "bn.scale", "bn.bias", "bn.mean", "bn.var"],
            ["b"],
            name="bn",
            epsilon=1e-5,
        ),
        helper.make_node("Relu", ["b"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["y"], name="fc", transB=1),
    ]
    return make(nodes, initializers, output_shape=["batch", classes], task=task)


def tiny_bytes(task: TaskMetadata | None = TINY_TASK) -> bytes:
    return bytes(tiny_model(task=task).SerializeToString())


def copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def point_to_external(tensor: TensorProto, location: str) -> None:
    """Turn `tensor` into an external-data reference to `location` (its bytes dropped)."""
    length = 4 * int(np.prod(tensor.dims))
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


class OpenWatch:
    """Counts opens and reads of one file by any process (Linux inotify).

    Python's audit hooks miss reads done in C++ (onnx, onnxruntime) and in other
    processes (the intake worker); inotify sees them all.
    """

    _IN_ACCESS = 0x001
    _IN_OPEN = 0x020

    def __init__(self, path: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        watch = libc.inotify_add_watch(self._fd, os.fsencode(path), self._IN_OPEN | self._IN_ACCESS)
        if watch < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")

    def events(self) -> int:
        """Open/access events since the last call."""
        count = 0
        while True:
            try:
                chunk = os.read(self._fd, 4096)
            except BlockingIOError:
                return count
            offset = 0
            while offset < len(chunk):
                _, _, _, name_len = struct.unpack_from("iIII", chunk, offset)
                offset += 16 + name_len
                count += 1

    def close(self) -> None:
        os.close(self._fd)
