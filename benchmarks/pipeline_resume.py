"""pipeline_resume: resuming mid-epoch on a 10^9-sample source.

The source is a memory-mapped .npy file of 10^9 uint32 sample ids (4 GB on disk, written
first). slipstream's state is taken after 1,000 batches of epoch 3, then a
fresh pipeline loads it and the time to its first batch is measured; the next batches must equal
the uninterrupted run's. The same state moved to position n/2 (5×10^8) (states are integers, so any
position has this size) measures that the cost does not grow with the position.

Peer: DataLoader cannot resume; what users do is skip batches to the position (Accelerate's
skip_first_batches). Its shuffled start-up (RandomSampler lists every index) is measured at 10^8,
where that list still fits in memory.
Targets: resume ≤ 100 ms, state ≤ 1 KiB.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import slipstream as ss
from _common import emit, log, parser

BATCH = 256


def build(path: Path) -> ss.Pipeline:
    return ss.from_numpy(str(path)).shuffle(seed=0).map(lambda v: int(v), workers=2).batch(BATCH)


def resume_ms(path: Path, state: dict) -> tuple[float, list]:
    t0 = time.perf_counter()
    pipe = build(path)
    pipe.load_state_dict(state)
    it = iter(pipe)
    first = next(it)
    ms = (time.perf_counter() - t0) * 1000
    rest = [next(it) for _ in range(4)]
    pipe.close()
    return ms, [first, *rest]


def dataloader_skip(n: int, skip: int) -> tuple[float, float]:
    class Index(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int) -> int:
            return i

    loader = torch.utils.data.DataLoader(Index(), batch_size=BATCH, shuffle=True)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    startup = time.perf_counter() - t0
    for _ in range(skip - 1):
        next(it)
    return startup, time.perf_counter() - t0


def main() -> None:
    args = parser(__doc__).parse_args()
    n = 10**7 if args.quick else 10**9
    with tempfile.TemporaryDirectory(dir=".") as d:
        path = Path(d) / "big.npy"
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint32, shape=(n,))
        step = 10**7
        for lo in range(0, n, step):
            arr[lo : lo + step] = np.arange(lo, min(n, lo + step), dtype=np.uint32)
        arr.flush()
        del arr
        log(f"wrote {n:.0e} sample ids")
        pipe = build(path)
        for _ in range(3):
            pipe.set_epoch(pipe.epoch + 1)
        it = iter(pipe)
        for _ in range(1000):
            next(it)
        state = json.loads(json.dumps(pipe.state_dict()))
        expected = [next(it) for _ in range(5)]
        pipe.close()
        state_bytes = len(json.dumps(state).encode())
        ms_at_256k, got = resume_ms(path, state)
        same = all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
        assert same, "resumed batches differ from the uninterrupted run"
        middle = {**state, "cursor": n // 2 // BATCH * BATCH}
        ms_at_mid, _ = resume_ms(path, middle)
        log(
            f"state {state_bytes} B; resume {ms_at_256k:.1f} ms at 256,000, "
            f"{ms_at_mid:.1f} ms at n/2"
        )
    dl_n = 10**6 if args.quick else 10**8
    startup, skip_s = dataloader_skip(dl_n, 1000)
    log(
        f"DataLoader over {dl_n:.0e}: first batch after {startup:.2f} s, "
        f"1000 batches skipped in {skip_s:.2f} s"
    )
    emit(
        "pipeline_resume",
        {
            "state_bytes": state_bytes,
            "slipstream_resume_ms_at_256000": round(ms_at_256k, 1),
            "slipstream_resume_ms_at_middle": round(ms_at_mid, 1),
            "dataloader_samples": dl_n,
            "dataloader_first_batch_s": round(startup, 2),
            "dataloader_skip_1000_batches_s": round(skip_s, 2),
        },
        {"dataloader_skip_vs_slipstream_resume": round(skip_s * 1000 / ms_at_256k, 1)},
        {"samples": n, "batch": BATCH, "quick": args.quick, "state": state},
    )


if __name__ == "__main__":
    main()
