"""Automatic sharding under a real torch.distributed process group (two gloo processes)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

WORKER = r"""
import json, os, sys
import numpy as np
import torch.distributed as dist
import slipstream as ss

dist.init_process_group("gloo")
pipe = ss.from_arrays(np.arange(101)).shuffle(seed=2).map(lambda x: int(x), workers=2).batch(8)
seen = [int(v) for b in pipe for v in b]
state = pipe.state_dict()
dist.destroy_process_group()
print(json.dumps({"rank": int(os.environ["RANK"]), "seen": seen, "world": state["world"]}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_initialised_process_group_shards_the_pipeline(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True
            )
        )
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        results.append(json.loads(out.strip().splitlines()[-1]))
    a, b = sorted(results, key=lambda r: r["rank"])
    assert a["world"] == b["world"] == 2
    assert not set(a["seen"]) & set(b["seen"])
    assert sorted(a["seen"] + b["seen"]) == list(range(101))
