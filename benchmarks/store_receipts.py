"""Receipts per second of the server store alone: `Store.record_submission` from threads.

No network and no checks: each call streams a model of `--model-mb` MiB into a blob
writer (hash, write, fsync), then records it, as the exchange's upload threads do.
With one thread every receipt is its own transaction; with several, calls that wait
for the write lock are committed together (group commit). The store lives in a
fresh folder under `--dir` (on the disk being measured) and is removed afterwards.

    python benchmarks/store_receipts.py --receipts 400 --threads 1,16 --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from free_server.store import Store

KEY = "a" * 32


def receipts_per_second(folder: Path, receipts: int, threads: int, model_bytes: int) -> float:
    """Record `receipts` fresh models from `threads` threads; return receipts per second."""
    store = Store(folder, create=True)
    store.add_client("owner", key_id=KEY, public_key_pem="PEM")
    payloads = [os.urandom(model_bytes) for _ in range(receipts)]

    def receipt(index: int) -> None:
        with store.blob_writer(model_bytes) as writer:
            writer.write(payloads[index])
            store.record_submission(
                writer.finish(),
                client_key_id=KEY,
                manifest=b"manifest",
                signature=b"signature",
                nonce=index.to_bytes(16, "big"),
                task_metadata={},
            )

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(receipt, range(receipts)))
    elapsed = time.perf_counter() - start
    store.close()
    return receipts / elapsed


def main() -> None:
    """Measure each thread count in turn and write the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--receipts", type=int, default=400)
    parser.add_argument("--threads", default="1,16", help="comma-separated thread counts")
    parser.add_argument("--model-mb", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=Path("."), help="where the stores go")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model_bytes = int(args.model_mb * (1 << 20))
    runs = []
    for threads in (int(t) for t in args.threads.split(",")):
        for repeat in range(args.repeats):
            folder = Path(tempfile.mkdtemp(prefix="store-receipts-", dir=args.dir))
            try:
                rate = receipts_per_second(folder / "store", args.receipts, threads, model_bytes)
            finally:
                shutil.rmtree(folder)
            runs.append({"threads": threads, "repeat": repeat, "receipts_per_s": round(rate, 1)})
            print(f"{args.receipts} x {args.model_mb} MiB, {threads} threads: {rate:.0f}/s")
    result = {
        "command": "python benchmarks/store_receipts.py " + " ".join(sys.argv[1:]),
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
        "runs": runs,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
