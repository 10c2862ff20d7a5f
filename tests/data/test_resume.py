"""The resume contract, once, over every source and stage, in thread and process modes.

Stop at the start, middle and end of epochs 0 and 1, restore into a fresh pipeline, and compare
every remaining item with an uninterrupted run; then again after changing world and workers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import slipstream as ss
from tests.data.helpers import write_files, write_parquet, write_tar

N = 45


def canon(x: Any) -> Any:
    """A comparable, hashable form of any sample or batch."""
    if isinstance(x, dict):
        return tuple(sorted((k, canon(v)) for k, v in x.items()))
    if isinstance(x, list | tuple):
        return tuple(canon(v) for v in x)
    if isinstance(x, np.ndarray | torch.Tensor):
        return canon(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    return x


def noisy(x: Any) -> Any:
    """A map that uses per-sample randomness, so any change of key or order shows."""
    v = x["id"] if isinstance(x, dict) else x
    return int(v) * 1000 + int(ss.sample_rng().integers(0, 1000))


async def anoisy(x: Any) -> Any:
    await asyncio.sleep(0)
    return noisy(x)


def first_field(batch: Any) -> Any:
    return batch["id"] if isinstance(batch, dict) else batch


Builder = Callable[[Path, str, int], ss.Pipeline]


def _arrays(_: Path) -> ss.Pipeline:
    return ss.from_arrays({"id": np.arange(N), "x": np.arange(N, dtype=np.float32) * 2})


def _npy(d: Path) -> ss.Pipeline:
    np.save(d / "id.npy", np.arange(N))
    return ss.from_numpy({"id": str(d / "id.npy")})


def _parquet(d: Path) -> ss.Pipeline:
    write_parquet(d / "a.parquet", N, row_group=7)
    return ss.from_parquet(str(d / "a.parquet"), columns=["id", "x"])


def _files(d: Path) -> ss.Pipeline:
    write_files(d, N)
    return ss.from_files(str(d / "*.bin"), concurrency=4)


def _tar(d: Path) -> ss.Pipeline:
    for s in range(4):
        write_tar(d / f"s{s}.tar", list(range(s * 12, min(N, s * 12 + 12))))
    return ss.from_tar(str(d / "s*.tar"))


def _stream(_: Path) -> ss.Pipeline:
    return ss.from_iterable(lambda: ({"id": i} for i in range(N)))


def _tar_id(s: dict[str, Any]) -> int:
    return int(s["__key__"][6:])


def _file_id(s: dict[str, Any]) -> int:
    return int.from_bytes(s["bytes"][:4], "little")


PIPELINES: dict[str, Builder] = {
    "arrays-shuffle-batch": lambda d, m, w: _arrays(d).shuffle(seed=3).batch(7),
    "arrays-map-batch": lambda d, m, w: (
        _arrays(d).shuffle(seed=3).map(noisy, mode=m, workers=w).batch(5)
    ),
    "arrays-map-filter-batch": lambda d, m, w: (
        _arrays(d).map(noisy, mode=m, workers=w).filter(lambda v: v % 3 != 0).batch(4)
    ),
    "npy-shuffle-map": lambda d, m, w: _npy(d).shuffle(seed=1).map(noisy, mode=m, workers=w),
    "parquet-shuffle-map-batch": lambda d, m, w: (
        _parquet(d).shuffle(seed=2).map(noisy, mode=m, workers=w).batch(6)
    ),
    "files-map": lambda d, m, w: _files(d).map(_file_id, mode=m, workers=w).map(noisy, workers=0),
    "tar-shuffle-map": lambda d, m, w: (
        _tar(d).shuffle(seed=4, window=5).map(_tar_id, mode=m, workers=w)
    ),
    "stream-map-batch": lambda d, m, w: _stream(d).map(noisy, mode=m, workers=w).batch(3),
    "batch-unbatch-map": lambda d, m, w: (
        _arrays(d).shuffle(seed=5).batch(8).unbatch().map(noisy, mode=m, workers=w)
    ),
    "batch-map-window-prefetch": lambda d, m, w: (
        _arrays(d)
        .shuffle(seed=6)
        .batch(4)
        .map(first_field, mode=m, workers=w)
        .shuffle(seed=1, window=3)
        .prefetch(2)
    ),
    "async-map-batch": lambda d, m, w: (
        _arrays(d).shuffle(seed=7).map(anoisy, concurrency=5).batch(4)
    ),
    "skip-errors": lambda d, m, w: (
        _arrays(d)
        .shuffle(seed=8)
        .map(_fail_on_sevens, mode=m, workers=w, errors="skip")
        .to_device("cpu")
    ),
}


def _fail_on_sevens(x: Any) -> Any:
    if int(x["id"]) % 7 == 0:
        raise ValueError(f"bad sample {x['id']}")
    return noisy(x)


def take_then_state(pipe: ss.Pipeline, epoch: int, count: int) -> tuple[list[Any], dict[str, Any]]:
    for _ in range(epoch):
        list(pipe)
    it = iter(pipe)
    taken = [canon(next(it)) for _ in range(count)]
    state = json.loads(json.dumps(pipe.state_dict()))  # it must survive JSON
    del it
    pipe.close()
    return taken, state


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("resume")


@pytest.mark.parametrize("mode", ["thread", "process"])
@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_resume_continues_exactly(name: str, mode: str, data_dir: Path) -> None:
    d = data_dir / f"{name}-{mode}"
    d.mkdir()
    build = PIPELINES[name]
    ref_pipe = build(d, mode, 2)
    reference = [[canon(x) for x in ref_pipe] for _ in range(4)]
    ref_pipe.close()
    assert reference[0]
    assert reference[0] != reference[1] or "shuffle" not in name
    for epoch in (0, 1):
        n = len(reference[epoch])
        for count in sorted({0, n // 2, n}):
            taken, state = take_then_state(build(d, mode, 2), epoch, count)
            assert taken == reference[epoch][:count]
            assert len(json.dumps(state)) < 1024, state
            resumed = build(d, mode, 3 if mode == "thread" else 1)  # other worker counts
            resumed.load_state_dict(state)
            rest = [canon(x) for x in resumed]
            following = [canon(x) for x in resumed]
            resumed.close()
            if count == n and not name.startswith("stream"):
                # a finite source knows its epoch ended with its last item: resume in the next
                assert (rest, following) == (reference[epoch + 1], reference[epoch + 2])
                continue
            assert taken + rest == reference[epoch], (epoch, count)
            assert following == reference[epoch + 1], (epoch, count)


ELASTIC = {
    "arrays": lambda d: _arrays(d).shuffle(seed=3).map(noisy, workers=2),
    "parquet": lambda d: _parquet(d).shuffle(seed=2).map(noisy, workers=2),
    "stream": lambda d: _stream(d).map(noisy, workers=2),
    "arrays-batch": lambda d: _arrays(d).shuffle(seed=3).batch(1).map(first_field, workers=1),
}


@pytest.mark.parametrize("name", sorted(ELASTIC))
@pytest.mark.parametrize(("world", "new_world"), [(2, 3), (3, 2), (4, 1)])
def test_resume_on_a_different_world_sees_every_sample_once(
    name: str, world: int, new_world: int, data_dir: Path
) -> None:
    d = data_dir / f"elastic-{name}-{world}-{new_world}"
    d.mkdir()
    build = ELASTIC[name]
    everything = sorted(canon(x) for x in build(d))
    seen: list[Any] = []
    states = []
    for rank in range(world):  # ranks in lockstep: each takes 4 items
        pipe = build(d).shard(rank, world)
        it = iter(pipe)
        seen += [canon(next(it)) for _ in range(4)]
        states.append(pipe.state_dict())
        del it
        pipe.close()
    assert all(s == states[0] for s in states)  # the same state on every rank
    for rank in range(new_world):
        pipe = build(d).shard(rank, new_world)
        pipe.load_state_dict(states[0])
        seen += [canon(x) for x in pipe]
        pipe.close()
    assert sorted(seen) == everything


def test_tar_refuses_a_different_world_with_a_reason(data_dir: Path) -> None:
    d = data_dir / "tar-world"
    d.mkdir()
    pipe = _tar(d).shard(0, 2)
    it = iter(pipe)
    next(it)
    state = pipe.state_dict()
    del it
    pipe.close()
    other = _tar(d).shard(0, 4)
    other.load_state_dict(state)
    with pytest.raises(ss.StateError, match="same number of ranks"):
        iter(other)


def test_unordered_map_resumes_without_repeating_or_losing(data_dir: Path) -> None:
    pipe = _arrays(data_dir).shuffle(seed=1).map(noisy, workers=3, ordered=False)
    full = sorted(canon(x) for x in pipe)
    pipe = _arrays(data_dir).shuffle(seed=1).map(noisy, workers=3, ordered=False)
    it = iter(pipe)
    taken = [canon(next(it)) for _ in range(17)]
    state = pipe.state_dict()
    del it
    pipe.close()
    resumed = _arrays(data_dir).shuffle(seed=1).map(noisy, workers=2, ordered=False)
    resumed.load_state_dict(state)
    assert sorted(taken + [canon(x) for x in resumed]) == full


def test_bad_states_are_refused_with_the_key_named() -> None:
    pipe = ss.from_arrays(np.arange(5))
    good = pipe.state_dict()
    with pytest.raises(ss.StateError, match="must be a dict"):
        pipe.load_state_dict([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ss.StateError, match=r"missing \['cursor'\]"):
        pipe.load_state_dict({k: v for k, v in good.items() if k != "cursor"})
    with pytest.raises(ss.StateError, match="epoch=-1"):
        pipe.load_state_dict({**good, "epoch": -1})
    with pytest.raises(ss.StateError, match="seed=4"):
        pipe.load_state_dict({**good, "seed": 4})
