"""Cost of a meta round against the size of the pool of accepted models it samples from.

For each pool size it makes a server home in a temporary folder, stores that many tiny
distinct accepted teachers (signed submissions, as intake leaves them), and runs the
server's own round code (`free_server.rounds.run_meta_round`) with the same steps each
time, in a fresh process per size so peak memory is that size's own. It reports the time
to store the pool, to list it for a round, the round's wall time, the process's peak RSS,
the memory bank's classes and the size of the engine checkpoint on disk (which holds the
bank), how many teachers the round converted (loaded), and how long converting every
teacher takes (what the round paid before it converted teachers only when drawn).

Usage::

    .venv/bin/python benchmarks/pool_scale.py --pools 24 240 1000 \\
        --out benchmarks/results/pool-scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

# The submissions are stored the way the test suite's harness stores them.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from flower_harness import store_submission

from free_client.keygen import generate_keys
from free_common.engine import StepFinished
from free_common.models.backbones import build_backbone
from free_common.models.export import to_onnx
from free_common.security.keys import key_id, load_private_key, public_key_pem
from free_common.types import ChannelOrder, TaskMetadata
from free_server import rounds
from free_server.home import create_home

TASK = TaskMetadata(5, (1, 16, 16), ChannelOrder.GRAY, (0.5,), (0.25,))
PRESET = {
    "base": "smoke",
    "learner": {"arch": "mlp", "width": 16, "channels": 1, "image_size": 16},
    "generator": {"latent_dim": 8, "width": 4, "image_size": 16, "channels": 1},
    "five": {"images_per_class": 2, "augment": {"crop_padding": 1}},
    "bell": {"maml": {"queries": 1, "inner_steps": 1}, "replay": {"episode_batch": 1}},
    "memory": {"capacity_per_class": 6},
    "steps": 20,
    "warmup_steps": 2,
    "teachers_per_step": 4,
    "checkpoint_every": 5,
    "seed": 7,
}


def _teachers(count: int) -> list[bytes]:
    """`count` distinct tiny MLP teachers: one export, its weights redrawn per teacher."""
    torch.manual_seed(0)
    template = onnx.load_from_string(to_onnx(build_backbone("mlp", 5, 1, 16, width=16), TASK))
    out = []
    for seed in range(count):
        rng = np.random.default_rng(seed)
        model = onnx.ModelProto()
        model.CopyFrom(template)
        for tensor in model.graph.initializer:
            value = numpy_helper.to_array(tensor)
            if value.dtype == np.float32 and "running_var" not in tensor.name:
                value = value + rng.normal(0, 0.05, value.shape).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
        out.append(model.SerializeToString())
    return out


def _one(pool: int, folder: Path) -> dict[str, Any]:
    home = create_home(folder / "home")
    (home.root / "presets").mkdir(exist_ok=True)
    (home.root / "presets" / "pool.json").write_text(json.dumps(PRESET))
    keys = generate_keys(folder / "owner")
    key = load_private_key(keys.client_key)
    models = _teachers(pool)
    started = time.perf_counter()
    with home.open_store() as store:
        store.add_client("owner", key_id=key_id(key.public_key()),
                         public_key_pem=public_key_pem(key.public_key()).decode())  # fmt: skip
        for data in models:
            store.set_verdict(store_submission(store, key, data, TASK), accepted=True)
    store_s = time.perf_counter() - started
    loads = 0
    real_load = rounds.load_teacher

    def counting_load(*args: Any, **kwargs: Any) -> Any:
        nonlocal loads
        loads += 1
        return real_load(*args, **kwargs)

    rounds.load_teacher = counting_load  # type: ignore[assignment]
    steps: list[float] = []
    with home.open_store() as store:
        started = time.perf_counter()
        listed = rounds.accepted_teachers(home, store)
        list_s = time.perf_counter() - started
        started = time.perf_counter()
        rounds.run_meta_round(
            home,
            store,
            "pool",
            device="cpu",
            on_event=lambda e: (
                steps.append(time.perf_counter()) if isinstance(e, StepFinished) else None
            ),
        )
        round_s = time.perf_counter() - started
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    round_loads = loads
    # What listing cost before teachers were converted lazily: every one of them, up front.
    started = time.perf_counter()
    for teacher in listed:
        teacher.load()
    eager_s = time.perf_counter() - started
    checkpoint = sum(
        p.stat().st_size for p in (home.root / rounds.ENGINE_DIR).rglob("*") if p.is_file()
    )
    manifest = json.loads((home.root / rounds.ENGINE_DIR / "checkpoint.json").read_text())
    return {
        "pool": pool,
        "listed": len(listed),
        "store_s": round(store_s, 2),
        "list_s": round(list_s, 3),
        "round_s": round(round_s, 2),
        "eager_load_all_s": round(eager_s, 2),
        "teachers_loaded": round_loads,
        "peak_rss_mb": round(peak_rss_mb, 1),
        "engine_dir_mb": round(checkpoint / 2**20, 2),
        "memory_classes": len(manifest.get("memory", []))
        if isinstance(manifest.get("memory"), list)
        else None,
        "steps": len(steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", type=int, nargs="+", default=[24, 240, 1000])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.one is not None:
        with tempfile.TemporaryDirectory() as folder:
            args.out.write_text(json.dumps(_one(args.one, Path(folder))))
        return
    rows = []
    for pool in args.pools:
        with tempfile.TemporaryDirectory() as folder:
            part = Path(folder, "row.json")
            subprocess.run(
                [sys.executable, __file__, "--one", str(pool), "--out", str(part)],
                check=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            rows.append(json.loads(part.read_text()))
        print(json.dumps(rows[-1]), flush=True)
    report = {"command": " ".join(["python", *sys.argv]), "preset": PRESET, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
