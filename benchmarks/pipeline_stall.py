"""pipeline_stall: a small CNN training loop fed by the pipeline with a CPU-heavy transform.

The same loop runs on pre-made in-memory batches (no input work at all), fed by slipstream
with one worker decoding and augmenting JPEGs on the other core (a thread, then a process), and
fed by DataLoader (one worker process, same transform). Input stall is the time the loop waits in
``next``; the pipeline has the capacity when its throughput alone exceeds the loop's. Figures
are medians of interleaved rounds.
Target: slipstream's input stall ≤ 5% of step time.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from PIL import Image

import slipstream as ss
from _common import emit, log, parser
from _images import MEAN, STD, make_jpegs

BATCH = 64


def augment(jpeg: bytes, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Decode a 96×96 JPEG, random-resized-crop to 32×32, maybe flip, normalise."""
    img = Image.open(io.BytesIO(jpeg)).convert("RGB")
    side = int(rng.integers(48, 97))
    x0, y0 = (int(v) for v in rng.integers(0, 97 - side, 2))
    img = img.resize((32, 32), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
    x = (np.asarray(img, dtype=np.float32) / 255 - MEAN) / STD
    if rng.random() < 0.5:
        x = x[:, ::-1]
    return np.ascontiguousarray(x.transpose(2, 0, 1)), int(rng.integers(0, 10))


def ss_augment(sample: dict[str, Any]) -> tuple[np.ndarray, int]:
    return augment(sample["jpg"], ss.sample_rng())


class AugmentDataset(torch.utils.data.Dataset[Any]):
    def __init__(self, jpegs: list[bytes]) -> None:
        self.jpegs = jpegs

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return augment(self.jpegs[i], np.random.default_rng(i))


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(64 * 8 * 8, 10),
    )  # fmt: skip


def train(batches: Iterable[Any], steps: int) -> dict[str, float]:
    """Runs ``steps`` steps; returns wall time, time waiting for input, and step time."""
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    it = iter(batches)
    wait = step = 0.0
    t_start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        x, y = next(it)
        t1 = time.perf_counter()
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()  # CPU: the step is done when this returns
        t2 = time.perf_counter()
        wait += t1 - t0
        step += t2 - t1
    wall = time.perf_counter() - t_start
    return {
        "wall_s": wall,
        "wait_s": wait,
        "step_s": step,
        "stall_of_step": wait / step,
        "stall_of_wall": wait / wall,
    }


def repeat(batches: list[Any]) -> Iterable[Any]:
    while True:
        yield from batches


def endless(make: Any) -> Iterable[Any]:
    while True:
        yield from make()


def main() -> None:
    args = parser(__doc__).parse_args()
    steps, rounds = (60, 1) if args.quick else (300, 3)
    torch.set_num_threads(1)  # the model on one core, the input pipeline on the other
    jpegs = make_jpegs(4096 if not args.quick else 1024, size=96)
    source = ss.from_arrays({"jpg": np.array(jpegs, dtype=object)}).shuffle(seed=0)
    pipes = {
        mode: source.map(ss_augment, mode=mode, workers=1).batch(BATCH).prefetch(4)
        for mode in ("thread", "process")
    }
    alone = time.perf_counter()
    n = sum(len(b[1]) for b in pipes["thread"])
    pipe_rate = n / (time.perf_counter() - alone)
    premade = [b for _, b in zip(range(32), pipes["thread"], strict=False)]
    loader = torch.utils.data.DataLoader(
        AugmentDataset(jpegs),
        batch_size=BATCH,
        shuffle=True,
        num_workers=1,
        persistent_workers=True,
    )
    feeds = {
        "premade": lambda: repeat(premade),
        **{f"slipstream_{m}": (lambda p=pipe: endless(lambda: p)) for m, pipe in pipes.items()},
        "dataloader": lambda: endless(lambda: loader),
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in feeds}
    for r in range(rounds):  # interleaved rounds: this machine's speed drifts
        order = list(feeds)
        for name in order[r % len(order) :] + order[: r % len(order)]:  # rotate: no order bias
            runs[name].append(train(feeds[name](), steps))
        log(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]['wall_s']:.1f} s" for k, v in runs.items()))
    med = {
        name: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for name, rs in runs.items()
    }
    base = med["premade"]
    loop_rate = steps * BATCH / base["wall_s"]
    log(
        f"pipeline alone {pipe_rate:,.0f} samples/s; training loop alone {loop_rate:,.0f} samples/s"
    )
    fed = {m: med[f"slipstream_{m}"] for m in pipes}
    dl = med["dataloader"]
    for mode, r in fed.items():
        log(
            f"slipstream {mode}: stall {100 * r['stall_of_step']:.1f}% of step time, "
            f"wall {r['wall_s']:.1f} s"
        )
    log(
        f"DataLoader: stall {100 * dl['stall_of_step']:.1f}% of step time, "
        f"wall {dl['wall_s']:.1f} s"
    )
    emit(
        "pipeline_stall",
        {
            "pipeline_alone_samples_per_s": round(pipe_rate),
            "loop_alone_samples_per_s": round(loop_rate),
            "premade": {k: round(v, 4) for k, v in base.items()},
            **{f"slipstream_{m}": {k: round(v, 4) for k, v in r.items()} for m, r in fed.items()},
            "dataloader": {k: round(v, 4) for k, v in dl.items()},
        },
        {
            **{
                f"slipstream_{m}_stall_of_step": round(r["stall_of_step"], 4)
                for m, r in fed.items()
            },
            "dataloader_stall_of_step": round(dl["stall_of_step"], 4),
            **{
                f"slipstream_{m}_wall_vs_premade": round(r["wall_s"] / base["wall_s"], 3)
                for m, r in fed.items()
            },
            "dataloader_wall_vs_premade": round(dl["wall_s"] / base["wall_s"], 3),
        },
        {
            "steps": steps,
            "rounds": rounds,
            "batch": BATCH,
            "model_threads": 1,
            "pipeline_workers": 1,
            "quick": args.quick,
        },
    )
    for pipe in pipes.values():
        pipe.close()


if __name__ == "__main__":
    main()
