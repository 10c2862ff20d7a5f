"""Which sample comes when: computed, never stored.

- :class:`Permutation` is a keyed pseudo-random permutation of ``[0, n)`` (a Feistel network
  with cycle-walking) evaluated on arrays of positions, so a 10^9-sample dataset shuffles globally
  without an index array.
- :class:`BlockWindowOrder` is for sources whose random reads are costly (Parquet row groups,
  shards): block order is permuted globally and samples are permuted inside windows of a few
  blocks, so each block is read once per epoch while the order stays well mixed.
- :class:`RankSlice` cuts the global order by rank: rank ``r`` of ``world`` takes positions
  ``origin + r + k * world``. The pipeline's state is then ``(epoch, origin, k)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

Int64s = npt.NDArray[np.int64]
Even = Literal["pad", "drop"] | None

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def mix64(*parts: int) -> int:
    """A stable 64-bit hash of a few integers (splitmix64 steps); not Python's salted ``hash``."""
    z = 0x9E3779B97F4A7C15
    for p in parts:
        z = (z ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 31
        z = z * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 29
    return z


def _mix(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A bijection of ``[0, n)`` chosen by ``key``; O(1) memory, vectorised.

    >>> p = Permutation(10, key=7)
    >>> sorted(p(np.arange(10)).tolist()) == list(range(10))
    True
    """

    def __init__(self, n: int, key: int, rounds: int = 6) -> None:
        self.n = n
        half = max(1, ((max(n, 2) - 1).bit_length() + 1) // 2)
        self._half = np.uint64(half)
        self._mask = np.uint64((1 << half) - 1)
        self._keys = [np.uint64(mix64(key, i)) for i in range(rounds)]

    def _feistel(self, x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        left, right = x >> self._half, x & self._mask
        for k in self._keys:
            left, right = right, left ^ (_mix(right ^ k) & self._mask)
        return (left << self._half) | right

    def __call__(self, positions: Int64s) -> Int64s:
        if self.n <= 1:
            return positions.copy()
        y = self._feistel(positions.astype(np.uint64))
        out = y >= np.uint64(self.n)
        while out.any():  # cycle-walking: the domain is < 4n, so few repeats are ever needed
            y[out] = self._feistel(y[out])
            out = y >= np.uint64(self.n)
        return y.astype(np.int64)


class Order(Protocol):
    """Maps epoch positions ``[0, n)`` to sample indices."""

    n: int

    def __call__(self, positions: Int64s) -> Int64s: ...


class Identity:
    """Positions are indices: no shuffle."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, positions: Int64s) -> Int64s:
        return positions


class BlockWindowOrder:
    """Global block order, sample shuffle inside windows of ``blocks_per_window`` blocks.

    Memory is O(number of blocks) (metadata), never O(number of samples).
    """

    def __init__(self, block_sizes: Int64s, blocks_per_window: int, key: int) -> None:
        self.n = int(block_sizes.sum())
        starts = np.concatenate([[0], np.cumsum(block_sizes)[:-1]]).astype(np.int64)
        nb = len(block_sizes)
        order = Permutation(nb, mix64(key, 1))(np.arange(nb, dtype=np.int64))
        self._starts = starts[order]
        sizes = block_sizes[order]
        self._cum = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._k = blocks_per_window
        self._win_bounds = self._cum[:: self._k]
        if self._win_bounds[-1] != self.n:
            self._win_bounds = np.append(self._win_bounds, self.n)
        self._key = key

    def __call__(self, positions: Int64s) -> Int64s:
        win = np.searchsorted(self._win_bounds, positions, side="right") - 1
        out = np.empty_like(positions)
        for w in np.unique(win):
            sel = win == w
            lo, hi = int(self._win_bounds[w]), int(self._win_bounds[w + 1])
            offsets = Permutation(hi - lo, mix64(self._key, 2, int(w)))(positions[sel] - lo) + lo
            block = np.searchsorted(self._cum, offsets, side="right") - 1
            out[sel] = self._starts[block] + offsets - self._cum[block]
        return out


def make_order(
    n: int, *, shuffle: bool, seed: int, epoch: int, block_sizes: Int64s | None, window: int | None
) -> Order:
    """The order of one epoch: identity, a global permutation, or a block-window shuffle.

    ``window`` is in samples; with ``block_sizes`` it is rounded to whole blocks.
    """
    if not shuffle:
        return Identity(n)
    key = mix64(seed, epoch)
    if block_sizes is None or window is None or window >= n:
        return Permutation(n, key)
    mean = max(1.0, float(block_sizes.mean()))
    return BlockWindowOrder(block_sizes, max(1, round(window / mean)), key)


@dataclass(frozen=True, slots=True)
class RankSlice:
    """The positions one rank reads in one epoch: ``origin + rank + k * world`` for ``k < length``.

    ``even="drop"`` trims every rank to the same count, ``"pad"`` wraps around to the start of the
    order so every rank gets the same count; ``None`` gives each sample exactly once.
    """

    n: int
    origin: int
    rank: int
    world: int
    even: Even = None

    @property
    def end(self) -> int:
        if self.even == "drop":
            return self.n // self.world * self.world
        if self.even == "pad":
            return -(-self.n // self.world) * self.world
        return self.n

    @property
    def length(self) -> int:
        first = self.origin + self.rank
        return max(0, -(-(self.end - first) // self.world))

    def positions(self, k0: int, count: int) -> Int64s:
        """Epoch positions of this rank's items ``k0 .. k0+count-1`` (wrapped when padding)."""
        ks = np.arange(k0, min(k0 + count, self.length), dtype=np.int64)
        pos = self.origin + self.rank + ks * self.world
        return pos % self.n if self.n else pos
