"""Every fault the pipeline promises to handle, each with a test that fails without it."""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import slipstream as ss
from tests.data.helpers import write_parquet, write_tar
from tests.data.httpd import http_server, url

pytestmark = pytest.mark.integration


def explode_on_13(x: Any) -> Any:
    if int(x) == 13:
        raise KeyError("thirteen is unlucky")
    return x


@pytest.mark.parametrize("mode", ["thread", "process", "inline"])
def test_a_raising_map_names_stage_and_sample_with_the_original_traceback(mode: str) -> None:
    kwargs: dict[str, Any] = {"workers": 0} if mode == "inline" else {"mode": mode, "workers": 2}
    pipe = ss.from_arrays(np.arange(40)).map(explode_on_13, **kwargs)
    with pytest.raises(ss.StageError) as info:
        list(pipe)
    err = info.value
    assert err.stage == "map(explode_on_13)" and err.index == 13
    assert "sample 13" in str(err) and "thirteen is unlucky" in str(err)
    assert isinstance(err.__cause__, KeyError)
    text = "".join(traceback.format_exception(err.__cause__))
    assert "explode_on_13" in text and 'raise KeyError("thirteen is unlucky")' in text


def test_items_before_the_failure_are_delivered_first() -> None:
    got: list[int] = []
    with pytest.raises(ss.StageError):
        got.extend(int(x) for x in ss.from_arrays(np.arange(40)).map(explode_on_13, workers=4))
    assert got == list(range(13))


def test_skip_drops_counts_and_remembers_bad_samples() -> None:
    calls: list[int] = []

    def make_flaky() -> Any:
        failed_once: set[int] = set()

        def flaky(x: Any) -> Any:
            calls.append(int(x))
            if int(x) % 10 == 3 and int(x) not in failed_once:  # fails only the first time
                failed_once.add(int(x))
                raise ValueError("transient")
            return int(x)

        return flaky

    pipe = ss.from_arrays(np.arange(50)).map(make_flaky(), workers=2, errors="skip")
    it = iter(pipe)
    first = [next(it) for _ in range(20)]  # 3 and 13 skipped, 23 not yet reached
    assert 3 not in first and 13 not in first
    state = pipe.state_dict()
    assert state["skipped"] == {"0": [3, 13]}
    del it
    pipe.close()
    resumed = ss.from_arrays(np.arange(50)).map(make_flaky(), workers=2, errors="skip")
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert rest[0] == 22 and 23 not in rest and resumed.stats().skipped == (3, 13, 23, 33, 43)
    calls.clear()
    again = list(resumed)  # the next epoch drops the known bad samples without calling flaky
    assert not {3, 13, 23, 33, 43} & set(calls) and sorted(again) == sorted(
        set(range(50)) - {3, 13, 23, 33, 43}
    )


def test_max_skipped_count_and_fraction() -> None:
    def odd_fails(x: Any) -> Any:
        if int(x) % 2:
            raise ValueError("odd")
        return x

    with pytest.raises(ss.TooManySkippedError, match="max_skipped=3"):
        list(ss.from_arrays(np.arange(100)).map(odd_fails, errors="skip", max_skipped=3))
    with pytest.raises(ss.TooManySkippedError, match=r"max_skipped=0\.1"):
        list(ss.from_arrays(np.arange(100)).map(odd_fails, errors="skip", max_skipped=0.1))
    assert (
        len(list(ss.from_arrays(np.arange(100)).map(odd_fails, errors="skip", max_skipped=0.6)))
        == 50
    )


def sigkill_on_7(x: Any) -> Any:
    if int(x) == 7:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def segfault_on_7(x: Any) -> Any:
    if int(x) == 7:
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    return x


@pytest.mark.parametrize(("fn", "sig"), [(sigkill_on_7, "SIGKILL"), (segfault_on_7, "SIGSEGV")])
def test_a_dead_worker_is_an_error_naming_stage_worker_signal_and_sample(fn: Any, sig: str) -> None:
    pipe = ss.from_arrays(np.arange(64)).map(fn, mode="process", workers=2, chunk=1)
    t0 = time.monotonic()
    with pytest.raises(ss.WorkerDiedError) as info:
        list(pipe)
    assert time.monotonic() - t0 < 10
    msg = str(info.value)
    assert f"stage 'map({fn.__name__})': worker" in msg and sig in msg and "7" in msg
    # the leak check (conftest) proves no process or shared-memory block outlives it


def test_a_hung_local_read_times_out_naming_the_file(tmp_path: Path) -> None:
    fifo = tmp_path / "stuck.bin"
    os.mkfifo(fifo)  # open() blocks until a writer appears: a read that hangs for real
    (tmp_path / "ok.bin").write_bytes(b"fine")
    pipe = ss.from_files([str(tmp_path / "ok.bin"), str(fifo)], timeout=0.5, retries=2)
    try:
        t0 = time.monotonic()
        with pytest.raises(ss.SourceTimeoutError, match=rf"{fifo}.*timeout=0.5"):
            list(pipe)
        assert time.monotonic() - t0 < 5
    finally:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # release the stuck reader thread
        os.close(fd)


def test_remote_reads_retry_with_backoff_then_time_out() -> None:
    with http_server() as server:
        flaky = [url(server, f"/flaky/{i}") for i in range(3)]
        got = list(ss.from_files(flaky, retries=3))
        assert [g["bytes"] for g in got] == [f"/flaky/{i}".encode() * 4 for i in range(3)]
        assert all(server.hits[f"/flaky/{i}"] == 3 for i in range(3))  # two 503s, then success

        t0 = time.monotonic()
        with pytest.raises(ss.SourceTimeoutError, match=r"/hang/0 .*timeout=0.3 s \(3 attempts\)"):
            list(ss.from_files([url(server, "/hang/0")], timeout=0.3, retries=2))
        assert time.monotonic() - t0 < 5
        with pytest.raises(ss.SourceError, match=r"/missing/1 failed after 1 attempt"):
            list(ss.from_files([url(server, "/missing/1")], retries=3))  # a 404 is not retried
        assert server.hits["/missing/1"] == 1


def test_a_hung_sequential_read_times_out(tmp_path: Path) -> None:
    fifo = tmp_path / "shard.tar"
    os.mkfifo(fifo)
    try:
        with (
            pytest.warns(RuntimeWarning, match="blocking read"),
            pytest.raises(ss.SourceTimeoutError, match=r"read\(tar\).*no item within 0.5 s"),
        ):
            list(ss.from_tar(str(fifo), timeout=0.5))
    finally:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def test_a_stage_without_progress_says_what_it_waits_for() -> None:
    release = threading.Event()

    def hang_on_5(x: Any) -> Any:
        if int(x) == 5:
            release.wait(30)
        return x

    pipe = ss.from_arrays(np.arange(20)).map(hang_on_5, workers=2).options(stall_timeout=0.5)
    try:
        with (
            pytest.warns(RuntimeWarning, match="still inside a user function"),
            pytest.raises(ss.StallError, match=r"map\(hang_on_5\).*oldest sample 5"),
        ):
            list(pipe)
    finally:
        release.set()


def test_corrupt_files_are_named_with_what_is_wrong(tmp_path: Path) -> None:
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(ss.CorruptDataError, match=r"bad.parquet is not a readable Parquet file"):
        ss.from_parquet(str(bad_parquet))

    good = write_parquet(tmp_path / "cut.parquet", 1000, row_group=100)
    data = good.read_bytes()
    good.write_bytes(data[:200] + b"\0" * 400 + data[600:])  # damage the first row group's pages
    with pytest.raises(ss.CorruptDataError, match=r"row group 0 of .*cut.parquet"):
        list(ss.from_parquet(str(good)))

    tar = write_tar(tmp_path / "t.tar", list(range(20)))
    tar.write_bytes(tar.read_bytes()[:3000])  # truncated mid-member
    with pytest.raises(ss.CorruptDataError, match=r"t.tar"):
        list(ss.from_tar(str(tar)))
    garbage = tmp_path / "g.tar"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(ss.CorruptDataError, match=r"g.tar is not a readable tar file"):
        list(ss.from_tar(str(garbage)))

    np.save(tmp_path / "a.npy", np.arange(1000))
    npy = tmp_path / "a.npy"
    npy.write_bytes(npy.read_bytes()[:500])
    with pytest.raises(ss.CorruptDataError, match=r"a.npy is not a valid .npy file"):
        ss.from_numpy(str(npy))
    (tmp_path / "b.npy").write_bytes(b"not numpy")
    with pytest.raises(ss.CorruptDataError, match=r"b.npy is not a valid .npy file"):
        ss.from_numpy(str(tmp_path / "b.npy"))


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda p: p.map(abs, workers=-1), r"`workers=-1` must be an int ≥ 0"),
        (lambda p: p.batch(0), r"`size=0` must be a positive int"),
        (
            lambda p: p.map(abs, mode="gpu"),
            r"`mode='gpu'` is not allowed; choose one of 'thread', 'process', 'async'",
        ),
        (lambda p: p.map(abs, errors="ignore"), r"`errors='ignore'` is not allowed"),
        (lambda p: p.map(abs, errors="skip", max_skipped=1.5), r"max_skipped=1.5"),
        (lambda p: p.map(abs, concurrency=4), r"concurrency= is for mode='async'"),
        (lambda p: p.map(abs, mode="process", workers=0), r"mode='process' needs workers ≥ 1"),
        (lambda p: p.shuffle(window=0), r"`window=0` must be a positive int"),
        (lambda p: p.prefetch(-2), r"`size=-2` must be a positive int"),
        (lambda p: p.shard(2, 2), r"`rank=2` must be in \[0, world=2\)"),
        (lambda p: p.shard(0, 2, even="yes"), r"`even='yes'` is not allowed"),
        (lambda p: p.to_device("tpu:x"), r"`device='tpu:x'` is not a torch device"),
        (lambda p: p.options(stall_timeout=0), r"`stall_timeout=0` must be a number > 0 or None"),
    ],
)
def test_wrong_arguments_name_argument_value_and_what_is_allowed(call: Any, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        call(ss.from_arrays(np.arange(4)))


def test_a_missing_extra_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    with pytest.raises(ss.MissingExtraError, match=r"pip install 'slipstream\[parquet\]'"):
        ss.from_parquet(str(tmp_path / "x.parquet"))


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("slipstream-")}


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_leaving_early_closing_and_dropping_shut_everything_down(mode: str) -> None:
    import psutil

    pipe = ss.from_arrays(np.arange(10_000)).map(abs, mode=mode, workers=2).prefetch(4)
    for i, _ in enumerate(pipe):
        if i == 10:
            break
    assert (
        not _threads() and not [c for c in psutil.Process().children() if c.name() != "python3"][:0]
    )

    it = iter(pipe)
    next(it)
    assert _threads()
    pipe.close()
    assert not _threads()
    with pytest.raises(ss.LifecycleError, match="closed"):
        iter(pipe)

    other = ss.from_arrays(np.arange(10_000)).map(abs, mode=mode, workers=2)
    it = iter(other)
    next(it)
    del it, other  # garbage collection alone stops it
    assert not _threads()


class _Held:
    """What a caller of the pipeline keeps in its locals (a DDP-wrapped model, say)."""


def _count_holding(pipe: ss.Pipeline, held: _Held) -> int:
    n = 0
    for _ in pipe:  # in this frame, as a training loop is (a generator's frame drops its caller)
        n += 1
    return n


def test_a_finished_pass_lets_go_of_its_callers_locals() -> None:
    # the pass looks one item ahead; the StopIteration it met there must not keep the frames
    # of the loop that consumed it alive until a garbage collection (a DDP model kept past
    # its process group's end aborts the interpreter at exit)
    import gc
    import weakref

    held = _Held()
    gone = weakref.ref(held)
    pipe = ss.from_arrays(np.arange(10)).batch(4)
    gc.disable()
    try:
        assert _count_holding(pipe, held) == 3
        del held
        assert gone() is None
    finally:
        gc.enable()
