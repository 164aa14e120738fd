"""Regenerate the protobuf and gRPC code in free_common/proto/ from proto/ (`make proto`).

The sources live under proto/free_common/proto/, a path that mirrors the import
path, so the generated modules import each other as `free_common.proto.x_pb2`.
Each source yields `x_pb2.py`, `x_pb2.pyi` (mypy-protobuf), `x_pb2_grpc.py` and
`x_pb2_grpc.pyi`. Generated files of sources that no longer exist are removed.

The output depends only on the sources and on the versions of grpcio-tools and
mypy-protobuf (their version stamps are part of it), so tests/test_proto_fresh.py
can compare a fresh run with the committed files byte for byte.

Usage: python proto/generate.py [--out DIR]   (DIR defaults to the repository root)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
PACKAGE_DIR = Path("free_common", "proto")
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def proto_sources() -> list[Path]:
    """Return the .proto files, relative to the proto root, in a stable order."""
    return sorted(p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def is_generated(path: Path) -> bool:
    """Tell whether a file name is one this script writes."""
    return path.name.endswith(GENERATED_SUFFIXES)


def _plugin(name: str) -> str:
    # `make proto` runs the venv's python without activating the venv, so the
    # plugins are looked up next to the interpreter before PATH.
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: install the dev extra (pip install -e '.[dev]')")
    return found


def generate(out_root: Path) -> list[Path]:
    """Compile every source into ``out_root/free_common/proto`` and return the files written.

    Parameters
    ----------
    out_root
        Root under which the package path ``free_common/proto`` is written.

    Returns
    -------
    list[Path]
        The generated files, sorted.
    """
    sources = proto_sources()
    if not sources:
        raise SystemExit(f"no .proto files under {PROTO_ROOT / PACKAGE_DIR}")
    well_known = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as scratch:
        # Compile into a scratch tree first, so a failed run leaves the package intact.
        tmp = Path(scratch)
        args = [
            "grpc_tools.protoc",
            f"--proto_path={PROTO_ROOT}",
            f"--proto_path={well_known}",
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *(str(s) for s in sources),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed (see the message above)")
        target = out_root / PACKAGE_DIR
        target.mkdir(parents=True, exist_ok=True)
        for stale in target.iterdir():
            if is_generated(stale):
                stale.unlink()
        written = []
        for produced in sorted((tmp / PACKAGE_DIR).iterdir()):
            if is_generated(produced):
                dest = target / produced.name
                dest.write_bytes(produced.read_bytes())
                written.append(dest)
    return written


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root")
    options = parser.parse_args(argv)
    for path in generate(options.out):
        print(path)


if __name__ == "__main__":
    main()
