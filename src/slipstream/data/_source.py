"""What the data is: the source protocols, and sources over arrays and ``.npy`` files.

A source holds locations (paths, URLs, shared-memory names), never copies of the data, so it
pickles in microseconds and a worker process never duplicates a dataset.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from slipstream._core import shm
from slipstream._core.errors import ArgumentError, CorruptDataError, SourceError
from slipstream.data._order import Int64s
from slipstream.data._tree import gather, tree_map


@runtime_checkable
class RandomAccess(Protocol):
    """A source of known length that reads any samples by index.

    ``read(indices)`` returns the samples as one collated batch (see ``_tree``).
    ``block_sizes`` groups indices that are cheap to read together (row groups); ``io_bound``
    says reads touch storage, so the engine reads ahead in a thread with a deadline.
    """

    name: str
    io_bound: bool
    block_sizes: Int64s | None

    def __len__(self) -> int: ...

    def read(self, indices: Int64s) -> Any: ...

    def for_workers(self, owner: contextlib.ExitStack, *, fork: bool) -> RandomAccess:
        """What worker processes get: light and safe to share (forked or pickled).

        Shared memory it creates is released by ``owner``.
        """
        ...


@runtime_checkable
class Sequential(Protocol):
    """A source read from a position onwards: shards read in order, or one (maybe endless) stream.

    ``num_shards`` is the number of independently readable shards, or ``None`` for one stream.
    ``iter_shard(shard, skip)`` yields the samples of one shard, starting after ``skip`` of them.
    """

    name: str
    num_shards: int | None

    def iter_shard(self, shard: int, skip: int) -> Iterator[Any]: ...


def _from_frame(data: Any) -> Any:
    if type(data).__name__ == "DataFrame" and hasattr(data, "columns"):
        return {str(c): data[c].to_numpy() for c in data.columns}
    return data


def _leaf_array(leaf: Any, where: str) -> np.ndarray | torch.Tensor:
    if isinstance(leaf, np.ndarray | torch.Tensor):
        if leaf.ndim == 0:
            raise ArgumentError(f"from_arrays: {where} is a scalar; every leaf needs a first axis")
        return leaf
    if isinstance(leaf, list):
        return np.asarray(leaf)
    raise ArgumentError(
        f"from_arrays: {where} is a {type(leaf).__name__}; allowed leaves are numpy arrays, "
        "torch tensors, lists, and pandas DataFrames (whole, or as dict values)"
    )


def _leaves(tree: Any, where: str = "data") -> list[tuple[str, Any]]:
    if isinstance(tree, dict):
        return [x for k, v in tree.items() for x in _leaves(v, f"{where}[{k!r}]")]
    if isinstance(tree, tuple):
        return [x for i, v in enumerate(tree) for x in _leaves(v, f"{where}[{i}]")]
    return [(where, tree)]


class ArraySource:
    """Samples from in-memory arrays: numpy arrays, torch tensors, dicts/tuples of them, DataFrames.

    A batch read is one fancy-index per array, so a pipeline over arrays runs at memory speed.
    """

    io_bound = False
    block_sizes: Int64s | None = None

    def __init__(self, data: Any, name: str = "arrays") -> None:
        self.name = name
        data = _from_frame(data)
        if isinstance(data, dict):
            data = {k: _from_frame(v) for k, v in data.items()}
        self._tree = _check_lengths(data, "from_arrays")
        self._n = _tree_len(self._tree)

    def __len__(self) -> int:
        return self._n

    def read(self, indices: Int64s) -> Any:
        return gather(self._tree, indices)

    def for_workers(self, owner: contextlib.ExitStack, *, fork: bool) -> RandomAccess:
        """Forked workers share the parent's pages; others map a copy in shared memory."""
        return self if fork else SharedArraySource.share(self._tree, self.name, owner)


def _check_lengths(data: Any, who: str) -> Any:
    leaves = _leaves(data)
    arrays = {where: _leaf_array(leaf, where) for where, leaf in leaves}
    lengths = {where: len(a) for where, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{w}: {n}" for w, n in lengths.items())
        raise ArgumentError(f"{who}: every array needs the same length; got {detail}")
    it = iter(arrays.values())
    return tree_map(lambda _: next(it), data)


def _tree_len(tree: Any) -> int:
    while isinstance(tree, dict | tuple):
        tree = next(iter(tree.values())) if isinstance(tree, dict) else tree[0]
    return len(tree)


@dataclass(frozen=True, slots=True)
class _SharedLeaf:
    """Where one array lives in shared memory (a leaf, so ``tree_map`` does not walk into it)."""

    block: str
    dtype: str
    shape: tuple[int, ...]
    is_tensor: bool


class SharedArraySource:
    """Arrays copied once into shared memory; pickles as block names and maps them on arrival.

    Leaves that cannot be shared (object arrays) travel as they are.
    """

    io_bound = False
    block_sizes: Int64s | None = None

    def __init__(self, specs: Any, name: str, n: int) -> None:
        self.name = name
        self._specs = specs  # the data's structure, with a _SharedLeaf (or the array) per leaf
        self._tree: Any = None
        self._n = n

    @classmethod
    def share(cls, tree: Any, name: str, owner: contextlib.ExitStack) -> SharedArraySource:
        def put(leaf: Any) -> Any:
            is_tensor = isinstance(leaf, torch.Tensor)
            arr = leaf.numpy() if is_tensor else leaf
            if arr.dtype == object:
                return arr
            block = shm.create(arr.nbytes, what=f"sharing {name} with process workers")
            owner.callback(shm.release, block)
            assert block.buf is not None
            shm.array_view(block.buf, arr.dtype.str, arr.shape)[...] = arr
            return _SharedLeaf(block.name, arr.dtype.str, tuple(arr.shape), is_tensor)

        return cls(tree_map(put, tree), name, _tree_len(tree))

    def __len__(self) -> int:
        return self._n

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "_specs": self._specs, "_n": self._n, "_tree": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def _attach(self) -> Any:
        def get(spec: Any) -> Any:
            if not isinstance(spec, _SharedLeaf):
                return spec
            nbytes = int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize
            view = shm.attach(spec.block, nbytes, writable=False)
            arr = shm.array_view(view, spec.dtype, spec.shape)
            return torch.from_numpy(arr) if spec.is_tensor else arr

        return tree_map(get, self._specs)

    def read(self, indices: Int64s) -> Any:
        if self._tree is None:
            self._tree = self._attach()
        return gather(self._tree, indices)

    def for_workers(self, owner: contextlib.ExitStack, *, fork: bool) -> RandomAccess:
        return self


def load_npy(path: str) -> np.ndarray:
    """Memory-map one ``.npy`` file, or raise naming the file and what is wrong with it."""
    if not os.path.exists(path):
        raise SourceError(f"from_numpy: no such file: {path}")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CorruptDataError(f"from_numpy: {path} is not a valid .npy file: {e}") from e
    if not isinstance(arr, np.ndarray) or arr.ndim == 0:
        raise CorruptDataError(f"from_numpy: {path} holds no array with a first axis")
    return arr


class NpySource:
    """Samples from ``.npy`` files, memory-mapped: workers map the same pages, nothing is copied.

    ``paths`` is one path, or a dict/tuple of paths giving the sample's structure.
    """

    io_bound = False
    block_sizes: Int64s | None = None

    def __init__(self, paths: Any, name: str = "numpy") -> None:
        self.name = name
        self._paths = paths
        self._tree = _check_lengths(tree_map(load_npy, paths), "from_numpy")
        self._n = _tree_len(self._tree)

    def __len__(self) -> int:
        return self._n

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "_paths": self._paths}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["_paths"], state["name"])  # type: ignore[misc]

    def read(self, indices: Int64s) -> Any:
        return gather(self._tree, indices)

    def for_workers(self, owner: contextlib.ExitStack, *, fork: bool) -> RandomAccess:
        return self
