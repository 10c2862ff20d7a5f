"""Shared memory that cannot leak and cannot bus-error.

Blocks are created by the owning process (registered with Python's resource tracker, which
unlinks them even if the owner is killed) and reserved up front with ``posix_fallocate``, so a
small ``/dev/shm`` is a clear error at creation instead of a SIGBUS on first write. Other
processes attach by name with :func:`attach`, which maps the block without registering it again.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
from multiprocessing import shared_memory

import numpy as np

from slipstream._core.errors import SlipstreamError

_SHM_DIR = "/dev/shm"


class SharedMemoryFullError(SlipstreamError, OSError):
    """Not enough room in /dev/shm for a block."""


def shm_free_bytes() -> int | None:
    """Free bytes in /dev/shm, or ``None`` where there is no such mount."""
    try:
        st = os.statvfs(_SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def create(nbytes: int, *, what: str, reserve: bool = True) -> shared_memory.SharedMemory:
    """A new block of ``nbytes``; the caller owns it and must ``release`` it.

    With ``reserve`` every page is allocated now (a full /dev/shm is an error here, not a
    SIGBUS later); without it the user of the block reserves what it writes.
    """
    name = f"ss_{os.getpid()}_{secrets.token_hex(4)}"
    block = shared_memory.SharedMemory(name=name, create=True, size=max(1, nbytes))
    if reserve and hasattr(os, "posix_fallocate") and os.path.isdir(_SHM_DIR):
        try:
            fd = os.open(os.path.join(_SHM_DIR, name), os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, max(1, nbytes))
            finally:
                os.close(fd)
        except OSError as e:
            release(block)
            free = shm_free_bytes()
            raise SharedMemoryFullError(
                f"{what}: cannot reserve {nbytes / 2**20:.1f} MiB in {_SHM_DIR} "
                f"({'unknown' if free is None else f'{free / 2**20:.1f} MiB'} free): {e}. "
                "Give the machine more shared memory (docker run --shm-size=...) or use fewer "
                "process workers / a smaller shm_bytes="
            ) from e
    return block


def release(block: shared_memory.SharedMemory) -> None:
    """Close and unlink a block this process created; safe to call twice."""
    try:
        block.close()
    except BufferError:  # arrays still view it: they keep the mapping until they are dropped
        block._buf = block._mmap = None  # type: ignore[attr-defined]
    with contextlib.suppress(FileNotFoundError):
        block.unlink()


def attach(name: str, nbytes: int, *, writable: bool) -> mmap.mmap:
    """Map an existing block by name without registering it with a resource tracker."""
    path = os.path.join(_SHM_DIR, name)
    fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    try:
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        return mmap.mmap(fd, max(1, nbytes), access=access)
    finally:
        os.close(fd)


def array_view(buf: mmap.mmap | memoryview, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A numpy view of a mapped block."""
    return np.ndarray(shape, dtype=np.dtype(dtype), buffer=buf)
