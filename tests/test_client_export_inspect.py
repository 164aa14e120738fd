"""`free-client export` and `free-client inspect`: files, verdicts, exit codes, --json."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from foreign_models import build_foreign, export_foreign
from onnx_builders import copy, point_to_external, tiny_model
from safetensors.torch import save_file
from typer.testing import CliRunner

from free_client.cli import app
from free_client.export import ARCHITECTURES
from free_common.errors import ConfigError
from free_common.models.backbones import BACKBONES, build_backbone
from free_common.models.checkpoint import read_checkpoint, save_checkpoint
from free_common.models.export import INPUT_NAME
from free_common.models.metadata import read_metadata
from free_common.models.onnx_static import IntakeLimits, check_static, parse_model
from free_common.types import ChannelOrder, TaskMetadata

runner = CliRunner()
TASK = TaskMetadata(5, (1, 28, 28), ChannelOrder.GRAY, (0.5,), (0.25,), tuple("abcde"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("client")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(3)
    return build_backbone("conv4", 5, 1, 28).eval()


@pytest.fixture(scope="module")
def exported(folder: Path, model: torch.nn.Module) -> Path:
    """A checkpoint with full header metadata, exported (with the intake check) once."""
    checkpoint = folder / "teacher.safetensors"
    save_checkpoint(checkpoint, model, arch="conv4", width=32, task=TASK)
    out = folder / "teacher.onnx"
    result = runner.invoke(app, ["export", str(checkpoint), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "intake check: accept" in result.output
    return out


def test_export_writes_a_model_that_matches_the_weights(
    exported: Path, model: torch.nn.Module
) -> None:
    report = check_static(exported.read_bytes())
    assert report.task == TASK == read_metadata(report.model)
    assert report.op_counts["BatchNormalization"] == 4
    x = torch.randn(3, 1, 28, 28)
    (logits,) = ort.InferenceSession(str(exported)).run(None, {INPUT_NAME: x.numpy()})
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(logits), model(x), atol=1e-4)


def test_flags_win_over_the_checkpoint_and_fill_what_it_lacks(
    folder: Path, model: torch.nn.Module
) -> None:
    bare = folder / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(bare))
    out = folder / "bare.onnx"
    args = ["export", str(bare), "--arch", "conv4", "--out", str(out), "--no-check"]
    missing = runner.invoke(app, args)
    assert missing.exit_code != 0
    assert "--image-size" in str(missing.exception) or "--image-size" in missing.output
    done = runner.invoke(
        app, [*args, "--image-size", "28", "--mean", "0.1", "--std", "0.3", "--class-names",
              "v,w,x,y,z"],
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    task = check_static(out.read_bytes()).task
    assert task.num_classes == 5 and task.input_shape == (1, 28, 28)
    assert task.mean == (0.1,) and task.std == (0.3,)
    assert task.class_names == ("v", "w", "x", "y", "z")


def test_export_refuses_weights_of_another_architecture(folder: Path) -> None:
    checkpoint = folder / "resnet.safetensors"
    save_checkpoint(checkpoint, build_backbone("resnet10", 5, 1, 28), arch="resnet10", width=16,
                    task=TASK)  # fmt: skip
    result = runner.invoke(
        app, ["export", str(checkpoint), "--arch", "conv4", "--out", str(folder / "x.onnx")]
    )
    assert result.exit_code != 0
    assert "does not hold conv4 weights" in str(result.exception)
    assert not (folder / "x.onnx").exists()


def test_export_help_names_every_backbone() -> None:
    """--help lists the architectures without importing torch: the list must stay in step."""
    assert tuple(BACKBONES) == ARCHITECTURES
    result = runner.invoke(app, ["export", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0
    assert f"architecture: {', '.join(BACKBONES)}" in result.output


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned-marker",))


def test_export_never_unpickles_a_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    evil = tmp_path / "model.pt"
    evil.write_bytes(pickle.dumps({"w": _Payload()}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="not a safetensors file"):
        read_checkpoint(evil)
    assert not (tmp_path / "pwned-marker").exists()


def test_checkpoint_round_trip(folder: Path, model: torch.nn.Module) -> None:
    path = folder / "round.safetensors"
    save_checkpoint(path, model, arch="conv4", width=32, task=TASK)
    loaded = read_checkpoint(path)
    assert (loaded.arch, loaded.width, loaded.task) == ("conv4", 32, TASK)
    assert all(torch.equal(loaded.state[k], v) for k, v in model.state_dict().items())


def test_inspect_accepts_and_prints_what_the_server_sees(exported: Path) -> None:
    result = runner.invoke(app, ["inspect", str(exported)])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "accept" in text
    assert "image [batch, 1, 28, 28]" in text
    assert "5 (a, b, c, d, e)" in text
    assert "free.num_classes = 5" in text


def test_inspect_json_for_an_accepted_model(exported: Path) -> None:
    result = runner.invoke(app, ["inspect", str(exported), "--json"])
    assert result.exit_code == 0
    report = json.loads(result.output)
    assert report["verdict"] == "accept"
    assert report["reason"] == ""
    assert report["task"]["class_names"] == list("abcde")
    assert report["input"]["shape"] == ["batch", 1, 28, 28]
    assert report["num_batch_norms"] == 4


def test_inspect_json_for_a_refused_model(tmp_path: Path) -> None:
    model = copy(tiny_model())
    point_to_external(model.graph.initializer[0], "../../etc/passwd")
    path = tmp_path / "bad.onnx"
    path.write_bytes(model.SerializeToString())
    result = runner.invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 2
    report = json.loads(result.output)
    assert report["verdict"] == "refuse"
    assert report["refusal"] == "ExternalDataError"
    assert "self-contained" in report["reason"]
    assert report["declared"]["inputs"][0]["shape"] == ["batch", 1, 8, 8]


def test_inspect_text_for_a_file_that_is_not_onnx(tmp_path: Path) -> None:
    path = tmp_path / "notes.onnx"
    path.write_text("just some notes\n")
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 2
    assert "refuse (NotOnnxError)" in result.output


def test_inspect_console_script_exit_codes(exported: Path, tmp_path: Path) -> None:
    script = str(Path(sys.executable).parent / "free-client")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07")
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    refused = subprocess.run([script, "inspect", str(bad), "--json"], capture_output=True,
                             text=True, env=env, timeout=120, check=False)  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert json.loads(refused.stdout)["verdict"] == "refuse"
    missing = subprocess.run([script, "inspect", str(tmp_path / "none.onnx")], capture_output=True,
                             text=True, env=env, timeout=120, check=False)  # fmt: skip
    assert missing.returncode == 1
    assert "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def foreign(folder: Path) -> Path:
    """A model as torch.onnx writes it by default: no FREE metadata, batch 1, a Softmax head."""
    path = folder / "foreign.onnx"
    path.write_bytes(export_foreign(build_foreign("softmax-cnn"), dynamo=False))
    return path


def test_inspect_takes_the_task_flags_of_submit(foreign: Path) -> None:
    bare = runner.invoke(app, ["inspect", str(foreign)])
    assert bare.exit_code == 2
    assert "refuse (MetadataError)" in bare.output and "--mean" in bare.output
    flagged = runner.invoke(app, ["inspect", str(foreign), "--mean", "0.5", "--std", "0.25"])
    assert flagged.exit_code == 0, flagged.output
    text = flagged.output
    assert "classes  5" in text  # from the graph's declared [1, 5] output
    assert "rgb, mean [0.5, 0.5, 0.5]" in text
    assert "ends in Softmax" in text
    assert "fixed batch size of 1" in text
    assert "folded its batch norms" in text


def test_export_from_onnx_writes_the_metadata_and_leaves_the_graph(
    foreign: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tagged.onnx"
    result = runner.invoke(
        app,
        ["export", "--from-onnx", str(foreign), "--out", str(out), "--mean", "0.5",
         "--std", "0.25", "--class-names", "a,b,c,d,e"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "intake check: accept" in result.output
    tagged, source = (parse_model(p.read_bytes(), IntakeLimits()) for p in (out, foreign))
    assert tagged.graph == source.graph
    task = read_metadata(tagged)
    assert task is not None and task.class_names == tuple("abcde")
    assert runner.invoke(app, ["inspect", str(out)]).exit_code == 0


def test_export_needs_one_source(foreign: Path, tmp_path: Path, folder: Path) -> None:
    neither = runner.invoke(app, ["export", "--out", str(tmp_path / "x.onnx")])
    assert isinstance(neither.exception, ConfigError)
    assert "--from-onnx" in str(neither.exception)
    both = runner.invoke(
        app, ["export", str(folder / "teacher.safetensors"), "--from-onnx", str(foreign),
              "--out", str(tmp_path / "x.onnx")],
    )  # fmt: skip
    assert isinstance(both.exception, ConfigError)
    assert not (tmp_path / "x.onnx").exists()
