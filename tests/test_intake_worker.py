"""Full intake in the bounded worker: checker, shape caps, onnxruntime probe, parity, limits.

Each test starts one worker process (about a second): these are the refusals only
running the model can find, plus the worker's own defences.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from exchange_harness import intake_worker_pids
from onnx import helper
from onnx_builders import TINY_TASK, OpenWatch, copy, init, make, point_to_external, tiny_model

from free_common.errors import (
    ExternalDataError,
    IntakeResourceError,
    IntakeTimeout,
    InvalidModelError,
    OutputShapeError,
    ParityError,
    RuntimeProbeError,
    TensorLimitError,
)
from free_common.models.intake import IntakeResult, load_teacher, run_intake, run_intake_file
from free_common.models.onnx_static import IntakeLimits
from free_common.models.static_worker import header_for
from free_common.types import ChannelOrder, TaskMetadata


def _assert_refused(result: IntakeResult, kind: type[Exception], text: str) -> None:
    assert not result.accepted
    assert result.refusal == kind.__name__, result.reason
    assert text in result.reason
    assert isinstance(result.error(), kind)
    assert result.to_dict()["verdict"] == "refuse"


def test_valid_model_is_accepted_with_a_summary() -> None:
    result = run_intake(tiny_model().SerializeToString())
    assert result.accepted, result.reason
    assert result.error() is None
    summary = result.summary
    assert summary is not None
    assert summary.task == TINY_TASK
    assert summary.input_shape == ("batch", 1, 8, 8)
    assert summary.num_batch_norms == 1
    assert summary.max_abs_diff < 1e-4
    as_dict = result.to_dict()
    assert as_dict["verdict"] == "accept"
    assert as_dict["reason"] == ""
    assert as_dict["task"]["num_classes"] == 3
    json.dumps(as_dict)


def test_dangling_node_input_fails_the_checker() -> None:
    model = copy(tiny_model())
    model.graph.node[4].input[0] = "nowhere"
    _assert_refused(
        run_intake(model.SerializeToString()), InvalidModelError, "onnx's checker refuses"
    )


def test_real_output_width_that_disagrees_with_the_classes_is_refused() -> None:
    four = TaskMetadata(4, (1, 8, 8), ChannelOrder.GRAY, (0.5,), (0.25,))
    model = copy(tiny_model(task=four))
    # Declare a named class axis, so only running the model shows it gives 3 logits.
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "classes"
    _assert_refused(run_intake(model.SerializeToString()), OutputShapeError, "declares 4 classes")


def test_infinite_logits_are_refused() -> None:
    model = copy(tiny_model())
    model.graph.node[-1].output[0] = "pre"
    model.graph.initializer.append(init("zero", np.zeros(1, np.float32)))
    model.graph.node.append(helper.make_node("Div", ["pre", "zero"], ["y"]))
    _assert_refused(run_intake(model.SerializeToString()), RuntimeProbeError, "NaN or Inf logits")


def _wide_model(channels: int) -> bytes:
    """A 1x1 conv to `channels` maps on 512x512 images: small file, large activations."""
    task = TaskMetadata(3, (1, 512, 512), ChannelOrder.GRAY, (0.5,), (0.25,))
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("GlobalAveragePool", ["c"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.w"], ["y"], transB=1),
    ]
    initializers = [
        init("w", rng.standard_normal((channels, 1, 1, 1)).astype(np.float32)),
        init("fc.w", rng.standard_normal((3, channels)).astype(np.float32)),
    ]
    model = make(
        nodes,
        initializers,
        input_shape=["batch", 1, 512, 512],
        output_shape=["batch", 3],
        task=task,
    )
    return model.SerializeToString()


def test_gigantic_intermediate_tensor_is_refused_after_shape_inference() -> None:
    _assert_refused(run_intake(_wide_model(128)), TensorLimitError, "values per image")


def test_memory_limit_stops_an_allocation_bomb() -> None:
    # 256 maps of 512x512 for 4 probe images: 1 GiB for one activation, over a 1.2 GiB cap
    # that already holds torch and onnxruntime. The activation cap is lifted so the
    # worker's memory limit is what stops it.
    limits = IntakeLimits(max_activation_elements=2**30, memory_bytes=int(1.2 * 2**30))
    _assert_refused(
        run_intake(_wide_model(256), limits=limits), IntakeResourceError, "bytes of memory"
    )


def _slow_model(layers: int) -> bytes:
    """3x3 convolutions of 64 maps on 128x128 images: a second or more of probing."""
    task = TaskMetadata(3, (1, 128, 128), ChannelOrder.GRAY, (0.5,), (0.25,))
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1])]
    initializers = [init("w0", 0.3 * rng.standard_normal((64, 1, 3, 3)).astype(np.float32))]
    for i in range(1, layers + 1):
        nodes.append(helper.make_node("Conv", [f"c{i - 1}", f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        weight = 0.04 * rng.standard_normal((64, 64, 3, 3)).astype(np.float32)
        initializers.append(init(f"w{i}", weight))
    nodes += [
        helper.make_node("GlobalAveragePool", [f"c{layers}"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.w"], ["y"], transB=1),
    ]
    initializers.append(init("fc.w", rng.standard_normal((3, 64)).astype(np.float32)))
    shapes = {"input_shape": ["batch", 1, 128, 128], "output_shape": ["batch", 3]}
    return make(nodes, initializers, task=task, **shapes).SerializeToString()


def test_timeout_stops_the_worker() -> None:
    # A tiny model is judged in well under 0.2 s by a forked worker; this one takes seconds.
    result = run_intake(_slow_model(16), limits=IntakeLimits(timeout_s=0.2))
    _assert_refused(result, IntakeTimeout, "longer than 0.2 s")
    assert intake_worker_pids() == []


def test_parity_failure_is_refused() -> None:
    # onnxruntime and torch round differently (about 1e-6 here); a zero tolerance must refuse.
    limits = IntakeLimits(atol=0.0, rtol=0.0)
    result = run_intake(tiny_model().SerializeToString(), limits=limits)
    _assert_refused(result, ParityError, "disagree by up to")


def test_worker_refuses_external_data_itself_and_reads_nothing(tmp_path: Path) -> None:
    # Bypass the parent's static checks and run the worker in the canary's own folder,
    # the worst case for relative references.
    canary = tmp_path / "weights.bin"
    canary.write_bytes(np.ones(36, np.float32).tobytes())
    model = copy(tiny_model())
    point_to_external(model.graph.initializer[0], canary.name)
    watch = OpenWatch(canary)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "free_common.models.intake_worker"],
            input=header_for(None, IntakeLimits()) + model.SerializeToString(),
            capture_output=True,
            cwd=tmp_path,
            timeout=120,
            check=True,
        )
        assert watch.events() == 0
    finally:
        watch.close()
    reply = json.loads(done.stdout.decode().splitlines()[-1])
    assert reply["ok"] is False
    assert reply["refusal"] == ExternalDataError.__name__


def test_load_teacher_raises_the_typed_refusal() -> None:
    model = copy(tiny_model())
    point_to_external(model.graph.initializer[0], "w.bin")
    with pytest.raises(ExternalDataError, match="self-contained"):
        load_teacher(model.SerializeToString())


def test_load_teacher_gives_a_frozen_differentiable_module() -> None:
    teacher = load_teacher(tiny_model().SerializeToString())
    assert teacher.summary is not None
    assert teacher.task == TINY_TASK
    assert teacher.input_shape == (1, 8, 8)
    assert teacher.num_classes == 3
    assert not teacher.module.training
    assert all(not p.requires_grad for p in teacher.module.parameters())
    images = torch.rand(2, 1, 8, 8, requires_grad=True)
    logits = teacher.module(teacher.normalize(images))
    assert logits.shape == (2, 3)
    logits.sum().backward()
    assert images.grad is not None
    assert torch.allclose(teacher.normalize(torch.full((1, 1, 1, 1), 0.75)), torch.ones(1))


def test_load_teacher_of_an_accepted_model_skips_the_worker() -> None:
    data = tiny_model().SerializeToString()
    again = load_teacher(data, already_accepted=True)
    assert again.summary is None
    reference = onnx.numpy_helper.to_array(tiny_model().graph.initializer[0])
    assert np.array_equal(again.module.layers["n0_conv"].weight.numpy(), reference)


def test_a_niced_intake_worker_runs_below_its_parent_and_still_decides(tmp_path: Path) -> None:
    # The server runs intake 10 nice levels down so receipts win the CPU; the worker
    # must really run at that priority, and still give its verdict.
    model = tmp_path / "model.onnx"
    model.write_bytes(tiny_model().SerializeToString())
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    seen: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for pid in intake_worker_pids():
                with contextlib.suppress(OSError):
                    seen.append(os.getpriority(os.PRIO_PROCESS, pid))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = run_intake_file(model, task=TINY_TASK, niceness=5)
    finally:
        done.set()
        watcher.join()
    assert result.accepted, result.reason
    # The first look may come between the worker's start and its renicing.
    assert seen and max(seen) == min(mine + 5, 19)
