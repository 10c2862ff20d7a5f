"""``slipstream demo``: the input pipeline end to end, with the figures that matter.

Writes a sharded JPEG dataset, measures the pipeline alone, trains a small CNN fed by it
(throughput and input stall), and resumes from a state taken mid-epoch.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import slipstream as ss
from slipstream.workloads._images import decode_augment, small_cnn, write_shards


def _pipeline(root: Path) -> ss.Pipeline:
    return (
        ss.from_parquet(str(root / "train-*.parquet"))
        .shuffle(seed=0)
        .map(decode_augment, workers=2)
        .batch(64)
        .prefetch(4)
    )


def _train(pipe: ss.Pipeline, steps: int) -> tuple[float, float, float]:
    """Steps of a small CNN on one thread; returns samples/s, stall share, final loss."""
    torch.manual_seed(0)
    net = small_cnn()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    wait, loss, samples = 0.0, torch.tensor(0.0), 0
    t_start = time.perf_counter()
    while samples < steps * 64:
        it = iter(pipe)
        while True:
            t0 = time.perf_counter()
            try:
                x, y = next(it)
            except StopIteration:
                break
            wait += time.perf_counter() - t0
            loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            samples += len(y)
            if samples >= steps * 64:
                break
    wall = time.perf_counter() - t_start
    return samples / wall, wait / wall, loss.item()


def _resume(root: Path, after: int) -> tuple[int, float, bool]:
    """State size in bytes, ms to the first batch after loading it, and whether batches match."""
    pipe = _pipeline(root)
    it = iter(pipe)
    for _ in range(after):
        next(it)
    state = json.loads(json.dumps(pipe.state_dict()))
    expected = next(it)
    pipe.close()
    t0 = time.perf_counter()
    fresh = _pipeline(root)
    fresh.load_state_dict(state)
    got = next(iter(fresh))
    ms = (time.perf_counter() - t0) * 1000
    fresh.close()
    same = all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    return len(json.dumps(state)), ms, same


def run(
    quick: bool = False, directory: Path | None = None, say: Callable[[str], None] = print
) -> None:
    """Run the demonstration; ``quick`` shrinks it to a few seconds."""
    images, steps = (1024, 30) if quick else (8192, 300)
    torch.set_num_threads(1)  # the model on one core, the pipeline's threads on the others
    with tempfile.TemporaryDirectory(prefix="slipstream-demo-") as tmp:
        root = directory or Path(tmp)
        t0 = time.perf_counter()
        paths = write_shards(root, images, shards=4)
        mib = sum(p.stat().st_size for p in paths) / 2**20
        say(
            f"wrote {len(paths)} Parquet shards ({images:,} JPEG images, {mib:.1f} MiB) to {root} "
            f"in {time.perf_counter() - t0:.1f} s"
        )
        say(
            "pipeline: parquet → shuffle → map(decode_augment, 2 threads) → batch(64) → prefetch(4)"
        )
        pipe = _pipeline(root)
        t0 = time.perf_counter()
        n = sum(len(y) for _, y in pipe)
        say(f"pipeline alone: {n / (time.perf_counter() - t0):,.0f} samples/s")
        pipe.close()
        pipe = _pipeline(root)  # a fresh one, so its stats are the training run's alone
        rate, stall, loss = _train(pipe, steps)
        say(
            f"small CNN (1 thread) fed by the pipeline: {rate:,.0f} samples/s, input stall "
            f"{100 * stall:.1f}% of wall time, final loss {loss:.3f}"
        )
        say("where the time went:\n" + str(pipe.stats()))
        pipe.close()
        size, ms, same = _resume(root, after=5)
        verdict = "identical to" if same else "DIFFERENT from"
        say(
            f"resume: the state after 5 batches is {size} bytes; a fresh pipeline loaded it "
            f"and gave its next batch in {ms:.0f} ms, {verdict} the uninterrupted run's"
        )
        if not same:
            raise ss.PipelineError("the resumed batch differs from the uninterrupted run")
