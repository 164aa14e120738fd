"""Where the CPU goes under `load.py`: /proc CPU times and a py-spy profile, summarized.

Two sources, one job each:

- `cpu_seconds` and `thread_cpu` read user+system time from ``/proc``: of the
  exchange process (and, apart, of its threads grouped by name, so gRPC's own
  C threads show beside the Python handler threads), of its worker processes,
  and of the load generator's processes. These are exact and cost nothing.
- `profile_split` reads a py-spy profile in its ``raw`` (collapsed stacks)
  format, recorded with ``--native`` so C frames under a Python frame show, and
  sorts every sample into the categories of docs/performance.md by the first
  frame, from the leaf up, that names one (`CATEGORIES`). Samples no rule names
  stay ``other``, so the split never hides what it could not place.
- `thread_states` reads a py-spy profile recorded with ``--idle --threads``
  (`start_wait_profiler`): every thread sampled whatever it does, so for each
  group of threads it gives where their time goes, waits included (an upload
  thread waiting for its next chunk, for the store's lock, for a static check).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK")

# Leaf-first substrings of frame names. Order matters: a hashing frame under a
# servicer frame is hashing, so the more specific rules come first.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("tls", ("ssl", "aes", "gcm", "tsi_", "SSL_", "EVP_", "bssl", "crypto_", "ChaCha", "ghash")),
    ("hashing", ("sha256", "SHA256", "hashlib", "sha2")),
    ("signature checks", ("ed25519", "Ed25519", "verify_call", "signing.py", "signature_is_valid")),
    ("protobuf", ("upb", "protobuf", "_pb2", "Deserialize", "FromString", "wire.py")),
    ("SQLite", ("sqlite", "store.py", "audit.py")),
    (
        "disk writes and fsync",
        ("fsync", "fdatasync", "blobs.py", "__write", "write (", "os.replace"),
    ),
    ("static checks (waiting on workers)", ("static_checks.py",)),
    (
        "gRPC core and HTTP/2",
        ("grpc", "chttp2", "cygrpc", "_server.py", "completion_queue", "epoll"),
    ),
)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User+system CPU seconds of a process, and of its children already reaped."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / _TICK
    reaped = (int(fields[13]) + int(fields[14])) / _TICK
    return own, reaped


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of a process's threads, summed by thread name without its digits."""
    by_name: Counter[str] = Counter()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            text = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        by_name[_thread_group(name)] += (int(fields[11]) + int(fields[12])) / _TICK
    return dict(by_name)


def _thread_group(name: str) -> str:
    """'exchange-upload_3' -> 'exchange-upload': threads of one pool counted together."""
    return re.sub(r"[\d_-]+$", "", name) or name


def _start_py_spy(pid: int, out: Path, rate: int, flags: list[str]) -> subprocess.Popen[bytes]:
    """Run ``py-spy record`` on `pid` with `flags`, raw format into `out`."""
    py_spy = Path(sys.executable).parent / "py-spy"
    command = [str(py_spy), "record", "--pid", str(pid), *flags, "--rate", str(rate)]
    command += ["--format", "raw", "--output", str(out)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def start_profiler(pid: int, out: Path, rate: int = 50) -> subprocess.Popen[bytes]:
    """Start py-spy on `pid` (native frames, raw format); stop it with `stop_profiler`."""
    # --gil: only the thread holding the GIL is sampled, so the profile is the
    # exchange's Python CPU time, not threads waiting for the lock or for I/O.
    return _start_py_spy(pid, out, rate, ["--gil"])


def start_wait_profiler(pid: int, out: Path, rate: int = 40) -> subprocess.Popen[bytes]:
    """Start py-spy on every thread of `pid`, idle ones too (raw format, thread names)."""
    # --nonblocking: pausing the process for each sample of every thread halved the
    # receipts/s of the run it measured; unpaused samples may tear, but rarely.
    return _start_py_spy(pid, out, rate, ["--idle", "--threads", "--nonblocking"])


def stop_profiler(process: subprocess.Popen[bytes]) -> None:
    """End py-spy with SIGINT, which makes it write its output."""
    process.send_signal(2)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()


# What a perf sample is, by the shared object it ran in (first match wins). grpcio
# links BoringSSL into cygrpc without symbols, so TLS shows inside "gRPC core";
# the benchmark's --insecure run gives its cost apart (docs/performance.md).
PERF_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("hashing (sha256, OpenSSL)", ("libcrypto",)),
    ("signature checks (Ed25519, cryptography)", ("_rust.abi3",)),
    ("protobuf (upb)", ("_message.", "upb")),
    ("SQLite", ("sqlite",)),
    ("gRPC core and TLS (cygrpc)", ("cygrpc",)),
    ("kernel (loopback TCP, page cache writes, fsync, page faults)", ("[kernel", "[unknown]")),
    ("Python interpreter (incl. GC)", ("libpython", "_asyncio", "select.")),
    ("libc (memcpy, malloc, locks)", ("libc.so", "ld-linux", "libstdc++", "libm.so", "[vdso]")),
)
_WORKERS = "python"  # the comm of worker processes; the exchange's threads are named otherwise


def start_perf(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    """Sample every thread of `pid` on-CPU with perf, when perf is installed."""
    perf = shutil.which("perf")
    if perf is None:
        return None
    command = [perf, "record", "-F", "499", "-p", str(pid), "-o", str(out), "--quiet"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def perf_split(data: Path) -> dict[str, Any]:
    """The exchange's on-CPU samples per category, and the share its worker children took.

    Returns ``{"exchange": {category: fraction}, "worker_processes_share": fraction}``;
    worker processes forked during the recording (intake) are sampled too and
    counted apart.
    """
    result = subprocess.run(
        ["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", "comm,dso,sym"],
        capture_output=True,
        text=True,
        check=False,
    )
    counts: Counter[str] = Counter()
    workers = everything = 0.0
    for line in result.stdout.splitlines():
        found = re.match(r"\s*([\d.]+)%\s+(\S+)\s+(\S+)\s+\[[.k]\]\s+(.*)", line)
        if found is None:
            continue
        share, comm = float(found.group(1)) / 100, found.group(2)
        everything += share
        if comm == _WORKERS:
            workers += share
            continue
        dso = found.group(3)
        name = next(
            (n for n, needles in PERF_CATEGORIES if any(x in dso for x in needles)), "other"
        )
        counts[name] += share
    total = sum(counts.values()) or 1.0
    return {
        "exchange": {name: round(share / total, 3) for name, share in counts.most_common()},
        "worker_processes_share": round(workers / (everything or 1.0), 3),
    }


def _category(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for name, needles in CATEGORIES:
            if any(needle in frame for needle in needles):
                return name
    return "other"


def _samples(raw: Path) -> Iterator[tuple[str, int]]:
    """Each (stack, sample count) of a py-spy ``raw`` profile, frames joined by ';'."""
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            yield stack, int(count)


def profile_split(raw: Path) -> dict[str, float]:
    """Share of samples per category in a py-spy ``raw`` profile (fractions summing to 1)."""
    counts: Counter[str] = Counter()
    for stack, count in _samples(raw):
        counts[_category(stack)] += count
    total = sum(counts.values()) or 1
    return {name: counts[name] / total for name, _ in counts.most_common()}


def top_frames(raw: Path, limit: int = 15) -> list[tuple[str, float]]:
    """The leaf frames that hold the most samples, with their shares."""
    counts: Counter[str] = Counter()
    for stack, count in _samples(raw):
        counts[stack.split(";")[-1]] += count
    total = sum(counts.values()) or 1
    return [(frame, n / total) for frame, n in counts.most_common(limit)]


# py-spy's --threads frame: 'thread (0x7f...)' or 'thread (1234): exchange-upload_3'.
_THREAD_FRAME = re.compile(r"^thread \([^)]*\)(?::\s*(?P<name>.*))?$")


def _function(frame: str) -> str:
    """'Store._read (free_server/store.py:120)' -> 'Store._read'."""
    return frame.split(" (", 1)[0]


def thread_states(raw: Path, depth: int = 2, limit: int = 4) -> dict[str, list[tuple[str, float]]]:
    """Per group of threads (names without their numbers), its most common states.

    A state is the innermost `depth` functions of a sample's stack; each share is of
    that group's samples, so the shares of one group sum to at most 1.
    """
    groups: dict[str, Counter[str]] = {}
    for stack, count in _samples(raw):
        frames = stack.split(";")
        match = _THREAD_FRAME.match(frames[0])
        if match is None:
            continue  # recorded without --threads
        name = match.group("name") or "unnamed"
        group = _thread_group(name)
        state = ";".join(_function(f) for f in frames[1:][-depth:]) or "(no Python frame)"
        groups.setdefault(group, Counter())[state] += count
    totals = {group: sum(counts.values()) for group, counts in groups.items()}
    return {
        group: [(state, n / totals[group]) for state, n in groups[group].most_common(limit)]
        for group in sorted(groups, key=lambda group: -totals[group])
    }
