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
