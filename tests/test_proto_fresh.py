"""The committed generated code in free_common/proto matches what proto/ generates now."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "free_common" / "proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _generated(folder: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.name.endswith(GENERATED_SUFFIXES)
    }


def _tool_note(committed: dict[str, bytes]) -> str:
    stamps = {
        m.decode()
        for text in committed.values()
        for m in re.findall(rb"GRPC_GENERATED_VERSION = '([^']+)'", text)
    }
    installed = metadata.version("grpcio-tools")
    if stamps and stamps != {installed}:
        return (
            f" (the committed code was made with grpcio-tools {', '.join(sorted(stamps))}, "
            f"this environment has {installed})"
        )
    return ""


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "proto" / "generate.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    fresh = _generated(tmp_path / "free_common" / "proto")
    committed = _generated(COMMITTED)
    assert fresh, "generate.py wrote nothing"
    assert set(fresh) == set(committed), (
        f"generated files differ: fresh {sorted(fresh)} vs committed {sorted(committed)}: "
        f"run make proto{_tool_note(committed)}"
    )
    stale = sorted(name for name in fresh if fresh[name] != committed[name])
    assert not stale, f"free_common/proto/{stale} is stale: run make proto{_tool_note(committed)}"
