"""The order: keyed permutations, block windows and rank slices."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slipstream.data._order import BlockWindowOrder, Permutation, RankSlice, make_order


@given(n=st.integers(0, 5000), key=st.integers(0, 2**63))
@settings(max_examples=60, deadline=None)
def test_permutation_is_a_bijection(n: int, key: int) -> None:
    out = Permutation(n, key)(np.arange(n, dtype=np.int64))
    assert sorted(out.tolist()) == list(range(n))


def test_permutation_depends_on_key_and_looks_random() -> None:
    n = 10_000
    a = Permutation(n, 1)(np.arange(n, dtype=np.int64))
    b = Permutation(n, 2)(np.arange(n, dtype=np.int64))
    assert not np.array_equal(a, b)
    assert abs(np.corrcoef(np.arange(n), a)[0, 1]) < 0.05  # no trace of the identity
    assert (a == np.arange(n)).sum() < 10  # about one fixed point expected


def test_permutation_of_a_billion_needs_no_index_array() -> None:
    p = Permutation(10**9, 7)
    window = p(np.arange(10**9 - 1000, 10**9, dtype=np.int64))
    assert window.min() >= 0 and window.max() < 10**9
    assert len(set(window.tolist())) == 1000


@given(sizes=st.lists(st.integers(1, 300), min_size=1, max_size=30), per_window=st.integers(1, 6))
@settings(max_examples=40, deadline=None)
def test_block_window_order_is_a_bijection(sizes: list[int], per_window: int) -> None:
    blocks = np.array(sizes, dtype=np.int64)
    n = int(blocks.sum())
    out = BlockWindowOrder(blocks, per_window, key=3)(np.arange(n, dtype=np.int64))
    assert sorted(out.tolist()) == list(range(n))


def test_block_window_order_reads_few_blocks_per_window() -> None:
    blocks = np.full(100, 50, dtype=np.int64)
    order = BlockWindowOrder(blocks, 4, key=9)
    first = order(np.arange(200, dtype=np.int64))  # the first window
    assert len(set((first // 50).tolist())) == 4


def test_make_order_reshuffles_every_epoch() -> None:
    pos = np.arange(100, dtype=np.int64)
    e0 = make_order(100, shuffle=True, seed=0, epoch=0, block_sizes=None, window=None)(pos)
    e1 = make_order(100, shuffle=True, seed=0, epoch=1, block_sizes=None, window=None)(pos)
    assert not np.array_equal(e0, e1)
    same = make_order(100, shuffle=True, seed=0, epoch=0, block_sizes=None, window=None)(pos)
    assert np.array_equal(e0, same)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("n", [0, 1, 10, 103])
def test_rank_slices_cover_each_position_once(world: int, n: int) -> None:
    parts = [RankSlice(n, 0, r, world).positions(0, 10**6) for r in range(world)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(n))


@pytest.mark.parametrize("even", ["pad", "drop"])
def test_even_slices_have_equal_lengths(even: str) -> None:
    for world in (2, 3, 5):
        lengths = {RankSlice(103, 0, r, world, even).length for r in range(world)}  # type: ignore[arg-type]
        assert len(lengths) == 1
    pad = np.concatenate([RankSlice(10, 0, r, 4, "pad").positions(0, 99) for r in range(4)])
    assert set(pad.tolist()) == set(range(10)) and len(pad) == 12


def test_rank_slice_from_an_origin_continues_the_global_order() -> None:
    # 4 ranks consumed 5 each (20 positions); 3 ranks continue from position 20
    rest = [RankSlice(50, 20, r, 3).positions(0, 99) for r in range(3)]
    assert sorted(np.concatenate(rest).tolist()) == list(range(20, 50))
