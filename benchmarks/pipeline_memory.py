"""pipeline_memory: memory stays bounded as data grows, and process workers do not copy the data.

(a) Peak memory (PSS) streaming a whole shuffled epoch of a 1 GiB and of an 8 GiB Parquet
dataset (16 KiB binary rows, row groups of 1,024) through map + batch + prefetch; the data is
written, and each epoch streamed, by a fresh process of its own; median of three streams.
(b) With 8 process workers over a 2 GiB array source: growth of total memory (PSS of the process
tree plus /dev/shm in use) per worker while iterating, beside DataLoader's with 8 workers over
the same memory.
Targets: (a) the two peaks differ by ≤ 10%; (b) ≤ 100 MiB per worker.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import slipstream as ss
from _common import PeakMemory, emit, log, parser, tree_memory

ROW = 16 * 1024
ROW_GROUP = 1024


def write_dataset(root: Path, gib: float) -> int:
    rows = int(gib * 2**30 / ROW)
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per_file = 32 * ROW_GROUP
    for start in range(0, rows, per_file):
        n = min(per_file, rows - start)
        blob = rng.integers(0, 256, n * ROW, dtype=np.uint8).tobytes()
        images = pa.array([blob[i * ROW : (i + 1) * ROW] for i in range(n)], type=pa.binary())
        table = pa.table({"image": images, "label": np.arange(start, start + n) % 10})
        pq.write_table(
            table, root / f"part-{start // per_file:05d}.parquet", row_group_size=ROW_GROUP
        )
    return rows


def first_byte(row: dict[str, Any]) -> int:
    return row["image"][0] + int(row["label"])


def stream_peak(root: Path) -> tuple[int, int]:
    pipe = (
        ss.from_parquet(str(root / "*.parquet"))
        .shuffle(seed=0)
        .map(first_byte, workers=2)
        .batch(256)
        .prefetch(2)
    )
    with PeakMemory() as mem:
        n = sum(len(b) for b in pipe)
    pipe.close()
    return mem.peak, n


def shm_used() -> int:
    st = os.statvfs("/dev/shm")
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def total_memory() -> int:
    return tree_memory() + shm_used()


def scale(row: np.ndarray) -> np.ndarray:
    return row * 2


class Scaled(torch.utils.data.Dataset[torch.Tensor]):
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i] * 2


def growth_per_worker(make: Any, workers: int, batches: int) -> float:
    base = total_memory()
    peak = base
    loader = make()
    for i, _ in enumerate(loader):
        if i % 20 == 0:
            peak = max(peak, total_memory())
        if i == batches:
            break
    peak = max(peak, total_memory())
    del loader
    return (peak - base) / workers


def in_fresh_process(*argv: str) -> str:
    """Run this script with ``argv`` in a new interpreter; its last stdout line."""
    out = subprocess.run(
        [sys.executable, __file__, *argv], check=True, capture_output=True, text=True
    )
    return out.stdout.strip().splitlines()[-1]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--write", nargs=2, metavar=("DIR", "GIB"), help=argparse.SUPPRESS)
    p.add_argument("--stream", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.write:
        print(write_dataset(Path(args.write[0]), float(args.write[1])))
        return
    if args.stream:
        peak, n = stream_peak(Path(args.stream))
        print(json.dumps({"peak": peak, "rows": n}))
        return
    small, large = (0.125, 1.0) if args.quick else (1.0, 8.0)
    repeats = 1 if args.quick else 3  # a peak varies by about ±3% from run to run
    work = Path(tempfile.mkdtemp(dir="."))
    try:
        peaks = {}
        for gib in (small, large):
            root = work / f"{gib}"
            rows = int(in_fresh_process("--write", str(root), str(gib)))
            results = [json.loads(in_fresh_process("--stream", str(root))) for _ in range(repeats)]
            assert all(r["rows"] == rows for r in results)
            peaks[gib] = statistics.median(r["peak"] for r in results)
            log(f"{gib} GiB ({rows:,} rows) streamed: peak {peaks[gib] / 2**20:,.0f} MiB")
            shutil.rmtree(root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = (2 if not args.quick else 0.5) * 2**30 // (64 * 4)
    x = np.random.default_rng(0).random((int(rows), 64), dtype=np.float32)
    workers, batches = 8, 400
    ss_growth = growth_per_worker(
        lambda: iter(ss.from_arrays(x).map(scale, mode="process", workers=workers).batch(256)),
        workers,
        batches,
    )
    xt = torch.from_numpy(x)
    dl_growth = growth_per_worker(
        lambda: iter(torch.utils.data.DataLoader(Scaled(xt), batch_size=256, num_workers=workers)),
        workers,
        batches,
    )
    log(
        f"per worker: slipstream {ss_growth / 2**20:.0f} MiB, "
        f"DataLoader {dl_growth / 2**20:.0f} MiB"
    )
    emit(
        "pipeline_memory",
        {
            "parquet_peak_mib": {f"{k}GiB": round(v / 2**20) for k, v in peaks.items()},
            "array_source_gib": round(x.nbytes / 2**30, 2),
            "growth_per_worker_mib": {
                "slipstream": round(ss_growth / 2**20, 1),
                "dataloader": round(dl_growth / 2**20, 1),
            },
        },
        {
            "parquet_peak_large_vs_small": round(peaks[large] / peaks[small], 3),
            "slipstream_vs_dataloader_growth": round(ss_growth / dl_growth, 3)
            if dl_growth > 0
            else None,
        },
        {
            "row_bytes": ROW,
            "row_group": ROW_GROUP,
            "sizes_gib": [small, large],
            "stream_repeats": repeats,
            "workers": workers,
            "quick": args.quick,
        },
    )


if __name__ == "__main__":
    main()
