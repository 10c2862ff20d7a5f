"""pipeline_decode: JPEG decode + resize + normalise of 160×160 images into 128×128 tensors.

The limit is cores × the single-core rate of the same function (measured here, pinned to one
core). Beside it the benchmark measures the machine's own ceiling: one process per core running
the function with no pipeline at all (on shared vCPUs this is below cores × single-core rate).
slipstream (threads and processes) against DataLoader at each num_workers (persistent workers).
Every contender is timed over whole epochs after a warm-up, in interleaved rounds; the figure
is the median of the rounds, as this machine's speed drifts.
Targets: slipstream ≥ 90% of the limit and ≥ 1.2× DataLoader's best.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

import slipstream as ss
from _common import emit, log, parser
from _images import decode, make_jpegs

BATCH = 64


def _pinned_rate(jpegs: list[bytes], core: int, out: Any) -> None:
    os.sched_setaffinity(0, {core})
    for j in jpegs[:30]:
        decode(j)
    t0 = time.perf_counter()
    for j in jpegs:
        decode(j)
    out.put(len(jpegs) / (time.perf_counter() - t0))


def bare_rate(jpegs: list[bytes], cores: list[int]) -> float:
    """Images/s of one process per core running decode alone, summed (no pipeline)."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_pinned_rate, args=(jpegs, c, q)) for c in cores]
    for p in procs:
        p.start()
    total = sum(q.get() for _ in procs)
    for p in procs:
        p.join()
    return total


def epoch_rate(loader: Iterable[Any]) -> float:
    t0 = time.perf_counter()
    n = sum(len(batch) for batch in loader)
    return n / (time.perf_counter() - t0)


class JpegDataset(torch.utils.data.Dataset[np.ndarray]):
    def __init__(self, jpegs: list[bytes]) -> None:
        self.jpegs = jpegs

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, i: int) -> np.ndarray:
        return decode(self.jpegs[i])


def decode_sample(sample: dict[str, Any]) -> np.ndarray:
    return decode(sample["jpg"])


def contenders(jpegs: list[bytes], cores: int) -> dict[str, Callable[[], float]]:
    loaders: dict[str, Any] = {}
    for w in (0, 1, 2, 3, 4):
        loaders[f"dataloader-{w}"] = torch.utils.data.DataLoader(
            JpegDataset(jpegs), batch_size=BATCH, num_workers=w, persistent_workers=w > 0
        )
    source = ss.from_arrays({"jpg": np.array(jpegs, dtype=object)})
    for w in (cores, cores + 1):
        loaders[f"slipstream-thread-{w}"] = source.map(decode_sample, workers=w).batch(BATCH)
    loaders[f"slipstream-process-{cores}"] = source.map(
        decode_sample, mode="process", workers=cores
    ).batch(BATCH)
    for loader in loaders.values():
        epoch_rate(loader)  # warm-up: workers start, caches fill
    return {name: (lambda lo=loader: epoch_rate(lo)) for name, loader in loaders.items()}


def main() -> None:
    args = parser(__doc__).parse_args()
    n, rounds = (600, 2) if args.quick else (2000, 5)
    core_ids = sorted(os.sched_getaffinity(0))
    cores = len(core_ids)
    torch.set_num_threads(1)
    jpegs = make_jpegs(n)
    runs: dict[str, list[float]] = {"single_core": [], "bare_all_cores": []}
    timed = contenders(jpegs, cores)
    for r in range(rounds):
        runs["single_core"].append(bare_rate(jpegs, core_ids[:1]))
        runs["bare_all_cores"].append(bare_rate(jpegs, core_ids))
        for name, run in timed.items():
            runs.setdefault(name, []).append(run())
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in runs.items()))
    med = {k: statistics.median(v) for k, v in runs.items()}
    limit = cores * med["single_core"]
    dl = {k: v for k, v in med.items() if k.startswith("dataloader")}
    sl = {k: v for k, v in med.items() if k.startswith("slipstream")}
    best_dl, best_ss = max(dl, key=dl.__getitem__), max(sl, key=sl.__getitem__)
    emit(
        "pipeline_decode",
        {
            "img_per_s_median": {k: round(v) for k, v in med.items()},
            "limit_img_per_s": round(limit),
            "machine_ceiling_vs_limit": round(med["bare_all_cores"] / limit, 3),
            "dataloader_best": best_dl,
            "slipstream_best": best_ss,
        },
        {
            "slipstream_best_vs_limit": round(sl[best_ss] / limit, 3),
            "slipstream_best_vs_machine_ceiling": round(sl[best_ss] / med["bare_all_cores"], 3),
            "dataloader_best_vs_limit": round(dl[best_dl] / limit, 3),
            "slipstream_best_vs_dataloader_best": round(sl[best_ss] / dl[best_dl], 3),
        },
        {
            "images": n,
            "rounds": rounds,
            "size_in": 160,
            "size_out": 128,
            "batch": BATCH,
            "cores": cores,
            "quick": args.quick,
        },
    )
    for loader in timed.values():
        del loader


if __name__ == "__main__":
    main()
