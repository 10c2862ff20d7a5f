"""Nested samples: dicts, tuples and lists of arrays, tensors, numbers and objects.

A *batch* is the collated form of a list of samples: the same structure with each leaf stacked
(numpy arrays and numbers into one array, tensors into one tensor, other objects into a list).
Random-access sources read batches directly in this form, so a batch gathered in one vectorised
read equals the collation of the samples read one by one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from slipstream._core.errors import ArgumentError

Collate = Callable[[list[Any]], Any]
# Where a collated leaf may be placed: (shape, numpy dtype) -> an empty array, or None.
Alloc = Callable[[tuple[int, ...], np.dtype[Any]], "np.ndarray | None"]


def tree_map(fn: Callable[[Any], Any], tree: Any) -> Any:
    """Apply ``fn`` to every leaf of ``tree`` (dicts, tuples and lists are structure)."""
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, tuple | list):
        return type(tree)(tree_map(fn, v) for v in tree)
    return fn(tree)


def _stack_leaf(items: list[Any], alloc: Alloc | None) -> Any:
    first = items[0]
    if isinstance(first, torch.Tensor):
        out = _placed(alloc, (len(items), *first.shape), first.dtype)
        return torch.stack(items) if out is None else torch.stack(items, out=torch.from_numpy(out))
    if isinstance(first, np.ndarray):
        out = _placed(alloc, (len(items), *first.shape), first.dtype)
        return np.stack(items) if out is None else np.stack(items, out=out)
    if isinstance(first, np.generic | bool | int | float | complex):
        return np.asarray(items)
    return list(items)


def _placed(alloc: Alloc | None, shape: tuple[int, ...], dtype: Any) -> np.ndarray | None:
    if alloc is None:
        return None
    if isinstance(dtype, torch.dtype):
        try:
            dtype = torch.empty(0, dtype=dtype).numpy().dtype
        except TypeError:  # no numpy twin (bfloat16): stack the usual way
            return None
    np_dtype = np.dtype(dtype)
    return None if np_dtype.hasobject else alloc(shape, np_dtype)


def collate(samples: Sequence[Any], alloc: Alloc | None = None) -> Any:
    """Stack a list of samples of one structure into a batch.

    ``alloc`` may place stacked arrays (a process worker puts them in shared memory).

    >>> collate([{"x": np.zeros(2), "y": 1}, {"x": np.ones(2), "y": 0}])["y"]
    array([1, 0])
    """
    first = samples[0]
    if isinstance(first, dict):
        keys = first.keys()
        for s in samples:
            if not isinstance(s, dict) or s.keys() != keys:
                got = sorted(s.keys()) if isinstance(s, dict) else type(s).__name__
                raise ArgumentError(
                    f"batch: samples differ in structure: {sorted(keys)} and {got}; "
                    "pass collate= to batch samples of varying structure"
                )
        return {k: collate([s[k] for s in samples], alloc) for k in keys}
    if isinstance(first, tuple | list):
        if any(len(s) != len(first) for s in samples):
            raise ArgumentError(
                "batch: sequence samples differ in length; pass collate= for ragged data"
            )
        return type(first)(collate(list(col), alloc) for col in zip(*samples, strict=True))
    try:
        return _stack_leaf(list(samples), alloc)
    except (RuntimeError, ValueError) as e:  # shapes differ
        raise ArgumentError(
            f"batch: cannot stack leaves of different shapes ({e}); pass collate= for ragged data"
        ) from e


class Stacker:
    """Collates ``n`` samples given one at a time; the result is :func:`collate`'s.

    Each array or tensor leaf is copied into its batch as soon as its sample arrives, so the
    samples never all live at once: the copy reads from cache, and memory is reused rather than
    grown and given back by a whole batch each time (which costs a page fault per 4 KiB). A
    sample whose structure, shapes or dtypes differ from the first hands the rest to
    :func:`collate`, which gives the same result, or error, as for the list. Samples smaller
    than ``AS_MADE_BYTES`` are listed and collated at the end: for them the per-sample
    bookkeeping (1 to 5 µs) costs more than it saves.
    """

    AS_MADE_BYTES = 64 << 10

    def __init__(self, n: int, alloc: Alloc | None = None) -> None:
        self._n, self._alloc = n, alloc
        self._form: Any = None  # the first sample's structure (see _form)
        self._columns: list[Any] = []  # per leaf: its batch (an array or tensor) or a list
        self._count = 0
        # the samples, collated at the end: small ones, or all once one does not fit
        self._samples: list[Any] | None = None

    def add(self, sample: Any) -> None:
        if self._samples is not None:
            self._samples.append(sample)
            return
        if self._count == 0:
            leaves = self._begin(sample)
            if leaves is None:
                return
        else:
            leaves = _flat(sample, self._form)
            if leaves is None or not all(map(_fits, self._columns, leaves)):
                self._samples = [self._sample(j) for j in range(self._count)] + [sample]
                return
        for column, leaf in zip(self._columns, leaves, strict=True):
            if isinstance(column, list):
                column.append(leaf)
            else:
                column[self._count] = leaf
        self._count += 1

    def result(self) -> Any:
        if self._samples is not None:
            return collate(self._samples, self._alloc)
        done = [
            _stack_leaf(c, None) if isinstance(c, list) else c[: self._count] for c in self._columns
        ]
        return _build(self._form, iter(done))

    def _begin(self, first: Any) -> list[Any] | None:
        """Set up the batch from its first sample; its leaves, or ``None`` if the samples are
        only listed."""
        self._form = _form(first)
        leaves = _flat(first, self._form) or []
        if sum(map(_nbytes, leaves)) < self.AS_MADE_BYTES:
            self._samples = [first]
            return None
        self._columns = [self._column(leaf) for leaf in leaves]
        return leaves

    def _column(self, leaf: Any) -> Any:
        shape = (self._n, *getattr(leaf, "shape", ()))
        if isinstance(leaf, torch.Tensor) and leaf.layout == torch.strided:
            if leaf.requires_grad:
                return []
            placed = _placed(self._alloc, shape, leaf.dtype)
            if placed is not None:
                return torch.from_numpy(placed)
            return torch.empty(shape, dtype=leaf.dtype, device=leaf.device)
        if isinstance(leaf, np.ndarray) and not leaf.dtype.hasobject:
            placed = _placed(self._alloc, shape, leaf.dtype)
            return np.empty(shape, leaf.dtype) if placed is None else placed
        return []

    def _sample(self, j: int) -> Any:
        return _build(self._form, iter([c[j] for c in self._columns]))


def _nbytes(leaf: Any) -> int:
    if isinstance(leaf, torch.Tensor):
        return leaf.nelement() * leaf.element_size()
    return leaf.nbytes if isinstance(leaf, np.ndarray) else 0


def _form(sample: Any) -> Any:
    """A sample's structure: ``None`` for a leaf, else (type, dict keys or None, children)."""
    if isinstance(sample, dict):
        return (dict, tuple(sample), [_form(v) for v in sample.values()])
    if isinstance(sample, tuple | list):
        return (type(sample), None, [_form(v) for v in sample])
    return None


def _flat(sample: Any, form: Any) -> list[Any] | None:
    """The leaves of ``sample`` in ``form``'s order, or ``None`` if its structure differs."""
    if form is None:
        return [sample]
    kind, keys, children = form
    if kind is dict:
        if not isinstance(sample, dict) or sample.keys() != set(keys):
            return None
        parts = [_flat(sample[k], f) for k, f in zip(keys, children, strict=True)]
    else:
        if not isinstance(sample, tuple | list) or len(sample) != len(children):
            return None
        parts = [_flat(v, f) for v, f in zip(sample, children, strict=True)]
    if any(p is None for p in parts):
        return None
    return [leaf for p in parts if p is not None for leaf in p]


def _fits(column: Any, leaf: Any) -> bool:
    """Whether ``leaf`` can be copied into ``column`` with the result :func:`collate` gives."""
    if isinstance(column, list):
        return True
    if isinstance(column, torch.Tensor) and isinstance(leaf, torch.Tensor):
        return (
            leaf.shape == column.shape[1:]
            and leaf.dtype == column.dtype
            and leaf.device == column.device
            and leaf.layout == torch.strided
            and not leaf.requires_grad
        )
    return (
        type(column) is type(leaf) is np.ndarray
        and leaf.shape == column.shape[1:]
        and leaf.dtype == column.dtype
    )


def _build(form: Any, leaves: Iterator[Any]) -> Any:
    if form is None:
        return next(leaves)
    kind, keys, children = form
    if kind is dict:
        return {k: _build(f, leaves) for k, f in zip(keys, children, strict=True)}
    return kind(_build(f, leaves) for f in children)


def batch_len(batch: Any) -> int:
    """Number of samples in a collated batch (the length of its first leaf)."""
    while isinstance(batch, dict | tuple | list) and not _is_leaf_list(batch):
        batch = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return len(batch)


def leaves(batch: Any) -> list[Any]:
    """The leaves of a collated batch (a list of non-containers is one leaf: ragged data)."""
    if isinstance(batch, dict):
        return [leaf for v in batch.values() for leaf in leaves(v)]
    if isinstance(batch, tuple) or (isinstance(batch, list) and not _is_leaf_list(batch)):
        return [leaf for v in batch for leaf in leaves(v)]
    return [batch]


def _is_leaf_list(x: Any) -> bool:
    return isinstance(x, list) and (not x or not isinstance(x[0], dict | tuple | list))


def take(batch: Any, k: int) -> Any:
    """Sample ``k`` of a collated batch."""
    if isinstance(batch, dict):
        return {key: take(v, k) for key, v in batch.items()}
    if isinstance(batch, tuple) or (isinstance(batch, list) and not _is_leaf_list(batch)):
        return type(batch)(take(v, k) for v in batch)
    return batch[k]


def uncollate(batch: Any) -> list[Any]:
    """Split a collated batch into its samples (the inverse of :func:`collate`)."""
    return [take(batch, k) for k in range(batch_len(batch))]


def gather(batch: Any, indices: np.ndarray) -> Any:
    """Rows ``indices`` of every leaf, as one batch (a vectorised read)."""

    def rows(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor):  # index_select is ~4x faster than tensor[idx]
            return torch.index_select(leaf, 0, torch.from_numpy(indices).to(leaf.device))
        if isinstance(leaf, np.ndarray):
            picked = leaf[indices]
            return picked.tolist() if picked.dtype == object else picked
        return [leaf[i] for i in indices]

    if isinstance(batch, dict):
        return {k: gather(v, indices) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(gather(v, indices) for v in batch)
    return rows(batch)
