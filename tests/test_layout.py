"""The layout and dependency rules of DESIGN.md section 2, read from the source.

The rules:
- `free_common` layers import only from the layers above them (1 config/errors/types,
  2 data/models/security, 3 inversion/memory/meta, 4 engine/wire), or from inside
  their own package;
- the algorithm layers import no grpc, flwr, typer, rich or generated code;
- `free_server` and `free_client` never import each other, and `free_common` neither;
- generated modules are imported only by `wire`, the servicer and the client's stub user.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {
    "free_common": ROOT / "free_common",
    "free_server": ROOT / "server",
    "free_client": ROOT / "client",
}

# free_common's first-level modules or packages, by layer (DESIGN.md section 2).
# `errors` is the root every layer raises from, so it sits above config and types.
LAYERS = {
    "errors": 0,
    "config": 1,
    "types": 1,
    "durable": 1,
    "lifetime": 1,
    "data": 2,
    "models": 2,
    "security": 2,
    "inversion": 3,
    "memory": 3,
    "meta": 3,
    "engine": 4,
    # DESIGN.md puts privacy beside inversion, but it inverts teachers with the
    # meta-generator: it sits below inversion, beside the engine.
    "privacy": 4,
    "wire": 4,
    "flower_app": 4,
}
# Not algorithm layers: the command-line tools and the terminal helpers they share.
CLI_PARTS = {"bench", "console"}
ALGORITHM_PARTS = {"data", "models", "inversion", "memory", "meta", "engine", "privacy"}
FORBIDDEN_IN_ALGORITHMS = (
    "grpc",
    "grpc_health",
    "flwr",
    "typer",
    "rich",
    "click",
    "free_common.proto",
    "free_common.console",
    "free_common.wire",
)
# The only modules allowed to import generated protobuf code.
PROTO_USERS = {"free_common.wire", "free_server.servicer", "free_client.stub"}


@dataclass(frozen=True)
class Import:
    """One imported module name, where it was imported, and by whom."""

    importer: str
    imported: str
    line: int


def _module_name(package: str, root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def _is_generated(path: Path) -> bool:
    return "_pb2" in path.name


def _imports() -> list[Import]:
    found: list[Import] = []
    for package, root in PACKAGE_DIRS.items():
        for path in sorted(root.rglob("*.py")):
            if _is_generated(path):
                continue
            name = _module_name(package, root, path)
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    found += [Import(name, alias.name, node.lineno) for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    found += [
                        Import(name, target, node.lineno)
                        for target in _from_targets(name, path, node)
                    ]
    return found


def _from_targets(importer: str, path: Path, node: ast.ImportFrom) -> list[str]:
    if node.level:
        base = importer.split(".")
        # A package's __init__ is the package itself; a module's parent is one level up.
        drop = node.level - 1 if path.name == "__init__.py" else node.level
        base = base[: len(base) - drop] if drop else base
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module or ""
    # `from pkg import sub` may import a submodule: judge each name as pkg.sub as well.
    return [module] + [f"{module}.{alias.name}" for alias in node.names]


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "free_common" and len(parts) > 1 else None


def _starts(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


IMPORTS = _imports()


def test_scan_sees_the_code() -> None:
    """Guard against a scan that silently finds nothing and so proves nothing."""
    importers = {imp.importer for imp in IMPORTS}
    assert {"free_common.errors", "free_server.cli", "free_client.cli"} <= importers


def test_free_common_layers_import_only_upward() -> None:
    bad = []
    for imp in IMPORTS:
        src, dst = _part(imp.importer), _part(imp.imported)
        if src is None or dst is None or src == dst or src not in LAYERS:
            continue
        if dst in CLI_PARTS or dst == "proto":
            continue  # judged by the rules below
        if dst not in LAYERS:
            # A submodule name from `from free_common import x` that is no layer is fine
            # only when it is a plain attribute such as __version__.
            if not dst.startswith("__"):
                bad.append(f"{imp.importer}:{imp.line} imports unknown part {imp.imported}")
            continue
        if LAYERS[dst] >= LAYERS[src]:
            bad.append(
                f"{imp.importer}:{imp.line} (layer {LAYERS[src]}) imports "
                f"{imp.imported} (layer {LAYERS[dst]})"
            )
    assert not bad, "\n".join(bad)


def test_algorithm_layers_stay_free_of_transport_and_cli() -> None:
    bad = [
        f"{imp.importer}:{imp.line} imports {imp.imported}"
        for imp in IMPORTS
        if _part(imp.importer) in ALGORITHM_PARTS
        and any(_starts(imp.imported, f) for f in FORBIDDEN_IN_ALGORITHMS)
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    ("side", "other"),
    [
        ("free_server", "free_client"),
        ("free_client", "free_server"),
        ("free_common", "free_server"),
        ("free_common", "free_client"),
    ],
)
def test_sides_never_import_each_other(side: str, other: str) -> None:
    bad = [
        f"{imp.importer}:{imp.line} imports {imp.imported}"
        for imp in IMPORTS
        if _starts(imp.importer, side) and _starts(imp.imported, other)
    ]
    assert not bad, "\n".join(bad)


def test_generated_code_has_few_importers() -> None:
    bad = [
        f"{imp.importer}:{imp.line} imports {imp.imported}"
        for imp in IMPORTS
        if _starts(imp.imported, "free_common.proto")
        and imp.imported != "free_common.proto"
        and not any(_starts(imp.importer, user) for user in PROTO_USERS)
    ]
    assert not bad, "\n".join(bad)


def test_top_level_layout() -> None:
    for name in (
        "pyproject.toml",
        "server",
        "client",
        "proto",
        "free_common",
        "tests",
        "docker",
        "README.md",
        "Makefile",
        ".ci/run",
    ):
        assert (ROOT / name).exists(), f"missing {name}"


def test_every_package_folder_is_declared() -> None:
    """setuptools gets an explicit package list (folders are renamed): keep it complete."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(config["packages"])
    found = set()
    for package, root in PACKAGE_DIRS.items():
        assert config["package-dir"][package] == root.name
        for init in root.rglob("__init__.py"):
            found.add(_module_name(package, root, init))
    assert found == declared


def test_no_generic_top_level_package_installed(tmp_path: Path) -> None:
    """Outside the source tree, only the namespaced import names exist."""
    probe = (
        "import importlib.util as u; "
        "print([n for n in ('server', 'client', 'free_server', 'free_client', 'free_common')"
        " if u.find_spec(n)])"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "['free_server', 'free_client', 'free_common']"
