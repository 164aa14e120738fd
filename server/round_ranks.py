"""A meta round across processes: ``free-server start --workers N``.

With ``workers`` above 1 the ServerApp does not run the engine itself: it starts
the round under torch's own launcher (`free_common.bench.launch.launcher_command`,
``python -m torch.distributed.run --standalone --nproc-per-node N``) with this
module as the program. Every rank joins the process group
(`free_common.engine.distributed.init_from_env`: gloo on CPU, NCCL on CUDA) and
runs `free_server.rounds.run_meta_round` over the same store; the engine shares
each step's teachers out and sums their gradients across ranks, so N ranks learn
what one process would. Rank 0 writes the engine's checkpoints and publishes the
release (`free_server.release.publish_release`, signed with the server key); the
ServerApp then reads that release back from the store and pushes it.

A rank that dies fails the launch (the launcher stops the others); the round
fails with the exit status, and the next round resumes from the last checkpoint
in ``HOME/engine``, as a single-process round does.

Rank entry point::

    python -m free_server.round_ranks --home HOME --round-id ID --preset NAME
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

from free_common.bench.launch import launcher_command
from free_common.engine.distributed import init_from_env, shutdown
from free_common.errors import EngineError, FreeError
from free_common.security.canonical import record_from_canonical
from free_common.security.keys import load_private_key
from free_common.types import ReleaseManifest, Signed
from free_server.home import ServerHome
from free_server.records import ReleaseRow
from free_server.release import publish_release
from free_server.rounds import run_meta_round
from free_server.superlink import SuperLinkPaths

__all__ = ["main", "run_round_on_ranks"]

log = logging.getLogger("free_server.round_ranks")

_REASON = "round_ranks: rank 0 failed: "
"""How rank 0 logs the one-line reason a round failed (the ServerApp reads it back)."""


def run_round_on_ranks(
    home: ServerHome, round_id: int, preset: str, workers: int
) -> tuple[ReleaseRow, Signed[ReleaseManifest], bytes]:
    """Run round `round_id` on `workers` local ranks; return the release rank 0 published.

    The ranks' output goes to the round's log (``HOME/flower/rounds/round-<id>.log``).

    Raises
    ------
    EngineError
        The launch failed (a rank died or the round raised) or published nothing.
    """
    program = [
        "-m",
        "free_server.round_ranks",
        "--home",
        str(home.root.resolve()),
        "--round-id",
        str(round_id),
        "--preset",
        preset,
    ]
    log_file = SuperLinkPaths.of(home).round_log(round_id)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as out:
        before = out.tell()
        done = subprocess.run(
            launcher_command(workers, program), stdout=out, stderr=subprocess.STDOUT, check=False
        )
    if done.returncode != 0:
        with log_file.open("rb") as written:
            written.seek(before)
            reasons = [
                line.split(_REASON, 1)[1]
                for line in written.read().decode(errors="replace").splitlines()
                if _REASON in line
            ]
        why = reasons[0] if reasons else f"see {log_file}"
        raise EngineError(
            f"the round's {workers} ranks failed (launcher exit status {done.returncode}): {why}"
        )
    with home.open_store() as store:
        row = store.latest_release()
        if row is None or row.round_id != round_id:
            raise EngineError(f"the round's {workers} ranks ended without publishing a release")
        weights = store.blob_path(row.sha256).read_bytes()
    signed = Signed(record_from_canonical(row.manifest, ReleaseManifest), row.signature)
    return row, signed, weights


def main() -> None:
    """Run this rank's share of a round; rank 0 publishes the release."""
    parser = argparse.ArgumentParser(description="One rank of a free-server meta round.")
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--round-id", type=int, required=True)
    parser.add_argument("--preset", required=True)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    workers, _ = init_from_env("auto")
    home = ServerHome.open(args.home)
    try:
        with home.open_store() as store:
            output = run_meta_round(home, store, args.preset)
            if workers.is_main:
                row, _ = publish_release(
                    store, output, load_private_key(home.signing_key), round_id=args.round_id
                )
                log.info("rank 0 published release %d of round %d", row.version, args.round_id)
    except FreeError as exc:
        if workers.is_main:
            log.error("rank 0 failed: %s", exc.message)
        sys.exit(1)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
