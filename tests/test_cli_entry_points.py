"""The three console scripts install, answer --help, and fail with one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("script", ["free-server", "free-client", "free-bench"])
def test_help_works(script: str) -> None:
    result = _run(script, "--help")
    assert result.returncode == 0, result.stderr
    assert f"Usage: {script}" in result.stdout


@pytest.mark.parametrize("script", ["free-server", "free-client", "free-bench"])
def test_unknown_command_is_a_usage_error_without_traceback(script: str) -> None:
    result = _run(script, "no-such-command")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "No such command" in result.stderr


# What a command line must not load before a command that needs it runs: each takes
# seconds to import, and `--help`, `keygen`, `submit` or `clients list` have no use for it.
HEAVY = ("torch", "flwr", "onnxruntime")


@pytest.mark.parametrize("module", ["free_client.cli", "free_server.cli"])
def test_command_line_loads_no_heavy_library(module: str) -> None:
    """Building every command and its options (what --help shows) stays torch-, flwr- and
    onnxruntime-free: commands that need them import them when they run."""
    probe = (
        "import importlib, sys, typer.main\n"
        f"app = importlib.import_module({module!r}).app\n"
        "group = typer.main.get_command(app)\n"
        "assert group.commands, 'no commands built'\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_judging_a_model_on_the_client_loads_no_heavy_library_in_its_process() -> None:
    """`free-client submit` and `inspect` judge the model first: that runs in a worker
    process, so the command's own process needs neither torch nor onnxruntime."""
    probe = (
        "import sys\n"
        "from onnx_builders import tiny_bytes\n"
        "from free_common.models.intake import run_intake\n"
        "assert run_intake(tiny_bytes()).accepted\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
