"""Files the tests write for themselves, and small helpers."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import numpy as np


def write_parquet(path: Path, n: int, *, row_group: int, start: int = 0) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = np.arange(start, start + n)
    table = pa.table(
        {
            "id": ids,
            "x": ids.astype(np.float32) / 2,
            "blob": [f"row-{i}".encode() for i in ids],
            "vec": pa.FixedSizeListArray.from_arrays(
                pa.array(np.repeat(ids, 3).astype(np.float32)), 3
            ),
        }
    )
    pq.write_table(table, path, row_group_size=row_group)
    return path


def write_tar(path: Path, keys: list[int], *, fields: tuple[str, ...] = ("txt", "cls")) -> Path:
    with tarfile.open(path, "w") as tar:
        for k in keys:
            for ext in fields:
                data = f"{k}:{ext}".encode()
                info = tarfile.TarInfo(f"sample{k:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def write_files(root: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        p = root / f"f{i:04d}.bin"
        p.write_bytes(i.to_bytes(4, "little") * 8)
        paths.append(p)
    return paths


def ids(values: list[Any], key: str = "id") -> list[int]:
    return [int(v[key]) for v in values]
