"""pipeline_arrays: shuffled batches over 10^7 float32 rows of 64 features.

slipstream's ``from_arrays(...).shuffle().batch(256)`` against DataLoader(batch_size=256,
shuffle=True) over a TensorDataset of the same memory. Both run pinned to one core.
Targets: ≥ 10× DataLoader and ≥ 2 M samples/s on one core.
"""

from __future__ import annotations

import os

import numpy as np
import torch

import slipstream as ss
from _common import emit, log, parser, timed

BATCH = 256


def main() -> None:
    args = parser(__doc__).parse_args()
    rows = 10**6 if args.quick else 10**7
    measured = 2000 if args.quick else 8000  # batches timed for each contender
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core for everyone
    torch.set_num_threads(1)
    log(f"generating {rows:,} × 64 float32 ({rows * 64 * 4 / 2**30:.2f} GiB)")
    x = np.random.default_rng(0).random((rows, 64), dtype=np.float32)
    y = np.arange(rows, dtype=np.int64)

    def consume(it: object, n: int) -> int:
        count = 0
        for i, batch in enumerate(it):  # type: ignore[call-overload]
            count += len(batch[1])
            if i + 1 == n:
                break
        return count

    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
        batch_size=BATCH,
        shuffle=True,
    )
    dl_s, dl_n = timed(lambda: consume(loader, measured // 8))  # DataLoader is slow: fewer batches
    log(f"DataLoader: {dl_n / dl_s:,.0f} samples/s")
    pipe_np = ss.from_arrays((x, y)).shuffle(seed=0).batch(BATCH)
    ss_s, ss_n = timed(lambda: consume(pipe_np, measured))
    log(f"slipstream numpy: {ss_n / ss_s:,.0f} samples/s")
    pipe_t = ss.from_arrays((torch.from_numpy(x), torch.from_numpy(y))).shuffle(seed=0).batch(BATCH)
    st_s, st_n = timed(lambda: consume(pipe_t, measured))
    log(f"slipstream torch: {st_n / st_s:,.0f} samples/s")
    dl_rate, ss_rate, st_rate = dl_n / dl_s, ss_n / ss_s, st_n / st_s
    emit(
        "pipeline_arrays",
        {
            "dataloader_samples_per_s": round(dl_rate),
            "slipstream_numpy_samples_per_s": round(ss_rate),
            "slipstream_torch_samples_per_s": round(st_rate),
            "cores": 1,
        },
        {
            "numpy_vs_dataloader": round(ss_rate / dl_rate, 2),
            "torch_vs_dataloader": round(st_rate / dl_rate, 2),
        },
        {
            "rows": rows,
            "features": 64,
            "batch": BATCH,
            "batches_timed": measured,
            "quick": args.quick,
        },
    )


if __name__ == "__main__":
    main()
