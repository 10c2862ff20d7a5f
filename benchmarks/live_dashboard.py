"""live_dashboard: how long a logged record takes to reach a browser's event stream.

Records are appended to a run's events.jsonl about 20 times a second (as the JSONL sink does);
a client process follows the dashboard's server-sent events and notes when each arrives. The
delay is arrival minus the record's own time. Target (the issue): within 1 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from _common import emit, log, parser
from slipstream.live._dashboard import POLL_S, DashboardProcess

HERE = Path(__file__).resolve().parent


def follow(url: str, n: int) -> None:
    """The client: read ``n`` events; print each one's delay (ms) as JSON."""
    delays = []
    with urllib.request.urlopen(url, timeout=60) as stream:
        print("connected", flush=True)  # the writer starts now
        for line in stream:
            if line.startswith(b"data: "):
                record = json.loads(line[6:])
                delays.append(1000 * (time.time() - record["time"]))
                if len(delays) == n:
                    break
    print(json.dumps(delays))


def main() -> None:
    args = parser(__doc__).parse_args()
    n = 100 if args.quick else 400
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        events = (run / "events.jsonl").open("a")
        dash = DashboardProcess([run])
        try:
            url = dash.url.rstrip("/") + "/events"
            code = f"from live_dashboard import follow; follow({url!r}, {n})"
            client = subprocess.Popen([sys.executable, "-c", code], cwd=HERE,
                                      stdout=subprocess.PIPE, text=True)  # fmt: skip
            assert client.stdout is not None
            client.stdout.readline()  # blocks until the client's stream is open
            for i in range(n):
                record = {"run": "r", "time": time.time(), "kind": "train", "step": i, "loss": 1.0}
                events.write(json.dumps(record) + "\n")
                events.flush()
                time.sleep(0.05)  # the pace of a run's records
            out, _ = client.communicate(timeout=60)
        finally:
            dash.close()
            events.close()
    delays = json.loads(out)
    q = np.percentile(delays, [50, 99])
    log(f"{len(delays)} records: p50 {q[0]:.1f} ms, p99 {q[1]:.1f} ms, max {max(delays):.1f} ms")
    emit(
        "live_dashboard",
        {"records": len(delays), "p50_ms": q[0], "p99_ms": q[1], "max_ms": max(delays)},
        {"p99_ms": q[1]},
        {"poll_s": POLL_S, "records_per_s": 20},
    )


if __name__ == "__main__":
    main()
