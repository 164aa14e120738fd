"""The docker files use the project's real commands and options.

No Docker engine runs here, so the images are not built in tests; instead every
`free-server`, `free-client` and `free-bench` command line in docker/ is resolved
against the installed CLIs, option by option, so the files cannot drift from them.
"""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
import typer

from free_client.cli import app as client_app
from free_common.bench.cli import app as bench_app
from free_server.cli import app as server_app

DOCKER = Path(__file__).resolve().parent.parent / "docker"
APPS = {"free-server": server_app, "free-client": client_app, "free-bench": bench_app}


def _command_lines() -> list[tuple[str, str]]:
    found = []
    for path in sorted(DOCKER.iterdir()):
        # Leave comments out, join continued lines, take each free-* call up to a separator.
        code = "\n".join(
            ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")
        )
        text = re.sub(r"\\\n\s*", " ", code)
        for match in re.finditer(r"\b(free-(?:server|client|bench))\s([^\n;|&\"\]]*)", text):
            found.append((path.name, f"{match.group(1)} {match.group(2)}".strip()))
    return found


def _resolve(line: str) -> tuple[click.Command, list[str]]:
    words = line.split()
    command: click.Command = typer.main.get_command(APPS[words[0]])
    rest = words[1:]
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        sub = command.get_command(click.Context(command), rest[0])
        assert sub is not None, f"no command {rest[0]!r} in {line!r}"
        command, rest = sub, rest[1:]
    return command, rest


LINES = _command_lines()


def test_docker_files_mention_the_commands() -> None:
    names = {line.split()[1] for _, line in LINES if len(line.split()) > 1}
    assert {"init", "start", "keygen", "submit", "join", "zoo"} <= names


@pytest.mark.parametrize(("file", "line"), LINES, ids=[f"{f}:{ln[:40]}" for f, ln in LINES])
def test_each_command_line_resolves(file: str, line: str) -> None:
    command, rest = _resolve(line)
    known = {opt for param in command.params for opt in param.opts + param.secondary_opts}
    for word in rest:
        if word.startswith("--"):
            assert word.split("=")[0] in known, f"{file}: {word} is no option of {line!r}"
