"""Published weights: a versioned shared-memory store on this machine, files for the others.

:class:`WeightStore` is a seqlock over one shared-memory block::

    [seq u64 | version i64 | published ns i64 | data bytes i64 | 32 spare] [tensor 0] [tensor 1] …

The one writer makes ``seq`` odd, copies the tensors in, sets version and time, then makes
``seq`` even again. A reader copies the data out between two reads of ``seq`` and keeps the copy
only if both reads are the same even number, so it never keeps a half-written model and never
makes the writer wait. (Each step is a C call that the interpreter makes in program order; on
x86-64 stores are seen in the order they are made, and glibc fences its non-temporal copies. The
hammer test in tests/live proves it on the machine that runs it.)

:class:`WeightFiles` writes each published version as ``weights/v<version>.safetensors``
(written to a temporary name, fsynced, renamed), for readers on other machines.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from slipstream._core import shm
from slipstream._core.errors import LifecycleError, SlipstreamError

_HEADER = 64
_ALIGN = 64


@dataclass(frozen=True)
class Slot:
    """Where one tensor lies in the store's data region."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "offset": self.offset,
            "nbytes": self.nbytes,
        }


def layout_of(weights: Mapping[str, torch.Tensor]) -> list[Slot]:
    """Each tensor's place in a data region, 64-byte aligned, in the mapping's order."""
    slots, offset = [], 0
    for name, t in weights.items():
        nbytes = t.numel() * t.element_size()
        dtype = str(t.dtype).removeprefix("torch.")
        slots.append(Slot(name, dtype, tuple(t.shape), offset, nbytes))
        offset += -(-nbytes // _ALIGN) * _ALIGN
    return slots


def _data_size(layout: list[Slot]) -> int:
    return max((s.offset + s.nbytes for s in layout), default=0)


class Snapshot:
    """One consistent version read from a store: ``version``, ``published`` (epoch seconds)
    and ``tensors`` (views of the reader's private copy)."""

    def __init__(self, version: int, published: float, tensors: dict[str, torch.Tensor]):
        self.version, self.published, self.tensors = version, published, tensors


class WeightStore:
    """The seqlock store (see the module docstring). One process writes; any number read.

    Create it with :meth:`create` in the run's owning process (children inherit it across
    fork and may write), or :meth:`attach` to it by name from another process to read.
    """

    def __init__(self, buf: Any, layout: list[Slot], name: str, owner: Any = None) -> None:
        self.name, self.layout, self._owner = name, layout, owner
        self._buf = buf
        self._header = np.ndarray((4,), dtype=np.int64, buffer=buf)
        self._data = torch.frombuffer(
            buf, dtype=torch.uint8, offset=_HEADER, count=_data_size(layout) or 1
        )

    @classmethod
    def create(cls, weights: Mapping[str, torch.Tensor]) -> WeightStore:
        layout = layout_of(weights)
        block = shm.create(_HEADER + _data_size(layout), what="the live weight store")
        np.ndarray((4,), dtype=np.int64, buffer=block.buf)[:] = 0
        return cls(block.buf, layout, block.name, owner=block)

    @classmethod
    def attach(cls, name: str, layout: list[Slot]) -> WeightStore:
        """Map the store ``name`` (written by a training run) for reading."""
        try:
            buf = shm.attach(name, _HEADER + _data_size(layout), writable=True)
        except FileNotFoundError as e:
            raise LifecycleError(f"the weight store {name!r} is gone (its run ended)") from e
        return cls(buf, layout, name)

    def describe(self) -> dict[str, Any]:
        """What :meth:`attach` needs, as JSON."""
        return {"name": self.name, "layout": [s.as_dict() for s in self.layout]}

    @property
    def version(self) -> int:
        """The newest complete version (-1 before the first); a hint until :meth:`read`."""
        return int(self._header[1]) if self._header[0] > 0 else -1

    def write(self, version: int, weights: Mapping[str, torch.Tensor]) -> None:
        """Publish ``weights`` (same names, shapes and dtypes as at creation) as ``version``."""
        header, data = self._header, self._data
        header[0] += 1  # odd: a write is under way
        for slot in self.layout:
            src = weights[slot.name].detach().reshape(-1).view(torch.uint8)
            data[slot.offset : slot.offset + slot.nbytes].copy_(src)  # device → host on a GPU
        header[1], header[2], header[3] = version, time.time_ns(), _data_size(self.layout)
        header[0] += 1  # even: complete

    def read(self, *, timeout: float = 5.0) -> Snapshot | None:
        """A consistent copy of the newest version, or ``None`` before the first write."""
        deadline = time.monotonic() + timeout
        header = self._header
        while time.monotonic() < deadline:
            before = int(header[0])
            if before == 0:
                return None
            if before % 2:
                os.sched_yield()  # the writer is mid-copy; it finishes in a memcpy's time
                continue
            version, published = int(header[1]), int(header[2]) / 1e9
            data = self._data.clone()
            if int(header[0]) == before:
                return Snapshot(version, published, self._views(data))
        raise LifecycleError(
            f"the weight store {self.name!r} stayed mid-write for {timeout:g} s "
            "(its writer died while publishing?)"
        )

    def _views(self, data: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            s.name: data[s.offset : s.offset + s.nbytes]
            .view(getattr(torch, s.dtype))
            .reshape(s.shape)
            for s in self.layout
        }

    def close(self) -> None:
        """Drop this process's mapping; the creating process also removes the block."""
        self._header = self._data = None  # type: ignore[assignment]
        if self._owner is not None:
            shm.release(self._owner)
        else:
            with contextlib.suppress(BufferError):
                self._buf.close()


def slots_from(described: list[dict[str, Any]]) -> list[Slot]:
    return [
        Slot(d["name"], d["dtype"], tuple(d["shape"]), int(d["offset"]), int(d["nbytes"]))
        for d in described
    ]


class WeightFiles:
    """``dir/v<version>.safetensors`` files: written atomically, the newest ``keep`` kept."""

    def __init__(self, directory: Path, keep: int = 5) -> None:
        self.dir, self.keep = directory, keep

    def path(self, version: int) -> Path:
        return self.dir / f"v{version:012d}.safetensors"

    def versions(self) -> list[int]:
        """Published versions on disk, oldest first."""
        if not self.dir.is_dir():
            return []
        names = (p.name for p in self.dir.iterdir())
        return sorted(
            int(n[1:-12]) for n in names if n.startswith("v") and n.endswith(".safetensors")
        )

    def write(self, version: int, tensors: Mapping[str, torch.Tensor], published: float) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.path(version)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        meta = {"version": str(version), "published": repr(published)}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        for old in self.versions()[: -self.keep]:
            with contextlib.suppress(FileNotFoundError):
                self.path(old).unlink()

    def read(self, version: int | None = None) -> Snapshot | None:
        """Version ``version`` (default: the newest), or ``None`` when there is none."""
        versions = self.versions()
        if version is None:
            if not versions:
                return None
            version = versions[-1]
        elif version not in versions:
            raise SlipstreamError(
                f"version {version} is not on disk in {self.dir}; kept versions: {versions}"
            )
        path = self.path(version)
        published = _published(path)
        return Snapshot(version, published, load_file(str(path)))


def _published(path: Path) -> float:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return float(header.get("__metadata__", {}).get("published", path.stat().st_mtime))
