"""pipeline_remote: 4,096 objects of 16 KiB from an HTTP server with 20 ms of latency per request.

The server (aiohttp, its own process, 127.0.0.1) sleeps 20 ms before each answer. DataLoader
reads one object per __getitem__ over a keep-alive connection per worker, with
num_workers ∈ {2, 8, 32}; slipstream's from_files keeps ``concurrency`` reads in flight from one
event loop. Peak memory is the PSS of the contender's whole process tree (server excluded).
Targets: ≥ 20× DataLoader with 2 workers, ≥ 2× DataLoader's best, peak memory ≤ DataLoader best's.
"""

from __future__ import annotations

import http.client
import multiprocessing as mp
import time
from typing import Any

import psutil
import torch

import slipstream as ss
from _common import PeakMemory, emit, log, parser

SIZE = 16 * 1024
LATENCY_S = 0.02


def serve(conn: Any) -> None:
    """The server process: answers GET /obj/<i> after LATENCY_S; sends its port when ready."""
    import asyncio

    from aiohttp import web

    body = b"x" * SIZE

    async def handle(_: web.Request) -> web.Response:
        await asyncio.sleep(LATENCY_S)
        return web.Response(body=body)

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/obj/{i}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        conn.send(site._server.sockets[0].getsockname()[1])  # ready: tell the port
        await asyncio.Event().wait()

    asyncio.run(main())


class HttpDataset(torch.utils.data.Dataset[bytes]):
    """What a DataLoader user writes: one request per sample, a connection kept per worker."""

    def __init__(self, port: int, n: int) -> None:
        self.port, self.n = port, n
        self._conn: http.client.HTTPConnection | None = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> bytes:
        if self._conn is None:
            self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        self._conn.request("GET", f"/obj/{i}")
        data = self._conn.getresponse().read()
        assert len(data) == SIZE
        return data


def run(loader: Any) -> tuple[float, int]:
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        n = sum(len(b) for b in loader)
        rate = n / (time.perf_counter() - t0)
    return rate, mem.peak


def collate_bytes(batch: list[bytes]) -> list[bytes]:
    return batch


def main() -> None:
    args = parser(__doc__).parse_args()
    n = 1024 if args.quick else 4096
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    server = ctx.Process(target=serve, args=(there,), daemon=True)
    server.start()
    port = here.recv()
    server_ps = psutil.Process(server.pid)
    log(f"server on 127.0.0.1:{port}")
    urls = [f"http://127.0.0.1:{port}/obj/{i}" for i in range(n)]
    results: dict[str, tuple[float, int]] = {}
    try:
        for workers in (2, 8, 32):
            loader = torch.utils.data.DataLoader(
                HttpDataset(port, n), batch_size=16, num_workers=workers, collate_fn=collate_bytes
            )
            results[f"dataloader-{workers}"] = run_excluding(loader, server_ps)
            log(
                f"DataLoader num_workers={workers}: "
                f"{results[f'dataloader-{workers}'][0]:,.0f} obj/s"
            )
        for concurrency in (64, 256):
            pipe = ss.from_files(urls, concurrency=concurrency).batch(16, collate=list)
            results[f"slipstream-{concurrency}"] = run_excluding(pipe, server_ps)
            pipe.close()
            log(
                f"slipstream concurrency={concurrency}: "
                f"{results[f'slipstream-{concurrency}'][0]:,.0f} obj/s"
            )
    finally:
        server.kill()
        server.join()
    dl = {k: v for k, v in results.items() if k.startswith("dataloader")}
    sl = {k: v for k, v in results.items() if k.startswith("slipstream")}
    best_dl = max(dl, key=lambda k: dl[k][0])
    best_ss = max(sl, key=lambda k: sl[k][0])
    emit(
        "pipeline_remote",
        {
            "objects_per_s": {k: round(v[0]) for k, v in results.items()},
            "peak_memory_mib": {k: round(v[1] / 2**20) for k, v in results.items()},
            "dataloader_best": best_dl,
            "slipstream_best": best_ss,
        },
        {
            "slipstream_vs_dataloader_2": round(sl[best_ss][0] / dl["dataloader-2"][0], 1),
            "slipstream_vs_dataloader_best": round(sl[best_ss][0] / dl[best_dl][0], 2),
            "slipstream_memory_vs_dataloader_best": round(sl[best_ss][1] / dl[best_dl][1], 3),
        },
        {"objects": n, "size": SIZE, "latency_s": LATENCY_S, "batch": 16, "quick": args.quick},
    )


def run_excluding(loader: Any, server: psutil.Process) -> tuple[float, int]:
    """Rate and peak memory of this process tree, without the server's share."""
    base = server.memory_full_info().pss
    rate, peak = run(loader)
    return rate, peak - base


if __name__ == "__main__":
    main()
