"""How process workers hand results back: pickle protocol 5 with the array bytes out of band,
written into the worker's shared-memory arena and read there by the parent without a copy.
(The parent unpickles only bytes its own workers wrote, over private pipes and shared memory.)

Arena: one shared-memory block per worker, cut into ``SLOTS`` slots; a slot holds the results
of one chunk. The worker reserves a slot's pages on first use (``posix_fallocate``), so memory is
spent only as results need it, and a full ``/dev/shm`` sends the chunk through the pipe instead
of ending in SIGBUS. The parent lends a slot to the consumer as array views (zero copy) and gets
it back when the last view is dropped; while half the worker's slots are lent it copies instead,
so a consumer that keeps every batch still never waits on a slot.
"""

from __future__ import annotations

import ctypes
import io
import mmap
import os
import pickle
import threading
import weakref
from collections.abc import Callable
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np
import torch

SLOTS = 4

Layout = list[tuple[int, int]] | None  # (offset, length) of each out-of-band buffer, or in band


class _Pickler(pickle.Pickler):
    """Sends CPU tensors as numpy arrays, so their bytes go out of band (into shared memory)."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is torch.Tensor and obj.layout == torch.strided and obj.device.type == "cpu":
            try:
                return torch.from_numpy, (obj.detach().contiguous().numpy(),)
            except (TypeError, RuntimeError):  # dtypes numpy lacks (bfloat16)
                return NotImplemented
        return NotImplemented


class WorkerArena:
    """The worker's side: places a chunk's arrays in a slot and writes the rest after them.

    ``alloc`` hands out arrays inside the slot (collation stacks straight into shared memory);
    ``encode`` then finds those buffers already in place and copies only the others. Pages are
    reserved as they are first used.
    """

    def __init__(self, name: str, nbytes: int) -> None:
        self._fd = os.open(os.path.join("/dev/shm", name), os.O_RDWR)
        self._mm = mmap.mmap(self._fd, nbytes)
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(self._mm))
        self.slot_bytes = nbytes // SLOTS
        self._reserved = [0] * SLOTS
        self._slot, self._used = 0, 0

    def start(self, slot: int) -> None:
        """Begin filling ``slot`` (everything placed before in it is no longer needed)."""
        self._slot, self._used = slot, 0

    def _take(self, n: int) -> int | None:
        """Offset of ``n`` more bytes in the current slot (64-byte aligned), reserved."""
        pos = -(-self._used // 64) * 64
        if pos + n > self.slot_bytes:
            return None
        lo = self._slot * self.slot_bytes
        if pos + n > self._reserved[self._slot]:
            try:
                os.posix_fallocate(self._fd, lo, pos + n)
            except OSError:  # /dev/shm is full: this goes through the pipe
                return None
            self._reserved[self._slot] = pos + n
        self._used = pos + n
        return lo + pos

    def alloc(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray | None:
        offset = self._take(int(np.prod(shape)) * dtype.itemsize)
        if offset is None:
            return None
        return np.ndarray(shape, dtype, buffer=self._mm, offset=offset)

    def encode(self, outs: list[Any]) -> tuple[bytes, Layout]:
        buffers: list[pickle.PickleBuffer] = []
        f = io.BytesIO()
        _Pickler(f, protocol=5, buffer_callback=buffers.append).dump(outs)
        layout = []
        for b in buffers:
            raw = b.raw()
            offset = self._offset_of(raw)
            if offset is None:
                offset = self._take(raw.nbytes)
                if offset is None:
                    return encode_inband(outs), None
                self._mm[offset : offset + raw.nbytes] = raw
            layout.append((offset, raw.nbytes))
        return f.getvalue(), layout

    def _offset_of(self, raw: memoryview) -> int | None:
        """Where ``raw`` already lies in this slot (placed by ``alloc``), if it does."""
        if raw.nbytes == 0:
            return None
        address = np.frombuffer(raw, np.uint8).__array_interface__["data"][0]
        offset = address - self._base
        lo = self._slot * self.slot_bytes
        return offset if lo <= offset < lo + self.slot_bytes else None


def encode_inband(outs: list[Any]) -> bytes:
    f = io.BytesIO()
    _Pickler(f, protocol=5).dump(outs)
    return f.getvalue()


class ParentArena:
    """The parent's side of one worker's arena: decodes a slot as views, or as copies.

    ``release(slot)`` is called once the slot may be reused: at once after a copy, or when the
    last array viewing it is garbage collected (from whichever thread drops it).
    """

    def __init__(self, block: SharedMemory, release: Callable[[int], None]) -> None:
        assert block.buf is not None
        self._buf = block.buf
        self._release = release
        self._lock = threading.Lock()
        self.lent = 0

    def decode(self, meta: bytes, layout: Layout, slot: int) -> Any:
        if not layout:
            self._release(slot)
            return pickle.loads(meta, buffers=[])
        with self._lock:
            lend = self.lent < SLOTS // 2
            self.lent += lend
        if not lend:
            copies = [bytearray(self._buf[o : o + n]) for o, n in layout]
            self._release(slot)
            return pickle.loads(meta, buffers=copies)
        lo, hi = layout[0][0], layout[-1][0] + layout[-1][1]
        owner = (ctypes.c_char * (hi - lo)).from_buffer(self._buf, lo)  # keeps the slot lent
        weakref.finalize(owner, self._returned, slot)
        view = memoryview(owner).cast("B")
        return pickle.loads(meta, buffers=[view[o - lo : o - lo + n] for o, n in layout])

    def _returned(self, slot: int) -> None:
        with self._lock:
            self.lent -= 1
        self._release(slot)
