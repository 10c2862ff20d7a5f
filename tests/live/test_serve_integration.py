"""``ss.serve``: a real server on loopback answering from a run's newest weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as load_st
from safetensors.torch import load_file
from safetensors.torch import save as save_st

import slipstream as ss
from tests.live.helpers import (
    DigitsNet,
    digit_samples,
    predict,
    raw_exchange,
    request,
    train_digits,
    wait_for,
)

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("digits")
    train_digits(run, epochs=2, publish_every_steps=10)
    return run


@pytest.fixture
def server(finished_run: Path) -> Iterator[ss.Server]:
    with ss.serve(finished_run, port=0) as s:
        yield s


def _train_in_child(run: Path, epochs: int) -> subprocess.Popen[bytes]:
    code = (
        "import sys; from pathlib import Path; from tests.live.helpers import train_digits; "
        f"train_digits(Path(sys.argv[1]), epochs={epochs}, publish_every_steps=5)"
    )
    return subprocess.Popen([sys.executable, "-c", code, str(run)], cwd=ROOT)


def test_predictions_follow_the_weights_while_training_runs(tmp_path: Path) -> None:
    proc = _train_in_child(tmp_path, epochs=6)
    try:
        wait_for("a published version", lambda: "store" in _info(tmp_path) and _published(tmp_path))
        versions: list[int] = []
        with ss.serve(tmp_path, port=0) as server:
            assert request(server.url, "/version")[1]["source"] == "shared memory"
            x = digit_samples(4).tolist()
            while proc.poll() is None:
                status, body = predict(server.url, x)
                assert status == 200 and len(body["outputs"]) == 4
                versions.append(body["version"])
            assert proc.wait(60) == 0
            final = json.loads((tmp_path / "events.jsonl").read_text().splitlines()[-2])
            status, body = predict(server.url, x)  # after the run: its final version
            assert status == 200 and body["version"] == final["version"]
    finally:
        proc.kill()
        proc.wait()
    assert versions == sorted(versions) and len(set(versions)) >= 5, set(versions)


def _info(run: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((run / "live.json").read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _published(run: Path) -> bool:
    events = run / "events.jsonl"
    return events.exists() and '"kind": "weights"' in events.read_text()


def test_the_server_predicts_like_the_trained_model(finished_run: Path, server: ss.Server) -> None:
    status, body = predict(server.url, digit_samples(8).tolist())
    assert status == 200
    model = DigitsNet()
    newest = max((finished_run / "weights").iterdir())
    model.load_state_dict(load_file(str(newest)))
    expected = model(torch.from_numpy(digit_samples(8))).detach()
    assert np.allclose(body["outputs"], expected.numpy(), atol=1e-5)
    one = predict(server.url, digit_samples(1)[0].tolist())[1]  # one sample, no batch axis
    assert np.allclose(one["outputs"], expected[:1].numpy(), atol=1e-5)


def test_binary_safetensors_requests(server: ss.Server) -> None:
    body = save_st({"inputs": torch.from_numpy(digit_samples(3))})
    status, got = request(
        server.url, "/predict", body, headers={"Content-Type": "application/x-safetensors"}
    )
    assert status == 200
    outputs = load_st(got["raw"])["outputs"]
    assert outputs.shape == (3, 10)


@pytest.mark.parametrize(
    ("body", "ctype", "status", "message"),
    [
        (b"not json", "application/json", 400, "not JSON"),
        (b'{"x": 1}', "application/json", 422, "`inputs` array"),
        (b"[1, 2]", "application/json", 422, "`inputs` array"),
        (b'{"inputs": [1, 2, 3]}', "application/json", 422, "takes [1, 8, 8] per sample"),
        (b'{"inputs": [[1, 2], [3]]}', "application/json", 422, "rectangular"),
        (b'{"inputs": "abc"}', "application/json", 422, "rectangular"),
        (b'{"inputs": [true, false]}', "application/json", 422, "not booleans"),
        (b'{"inputs": []}', "application/json", 422, "per sample"),
        (b'{"inputs": 3}', "application/json", 422, "per sample"),
        (b"\x00\x01garbage", "application/x-safetensors", 400, "not a safetensors"),
    ],
)
def test_bad_requests_get_a_4xx_that_says_what_is_wrong(
    server: ss.Server, body: bytes, ctype: str, status: int, message: str
) -> None:
    got, answer = request(server.url, "/predict", body, headers={"Content-Type": ctype})
    assert got == status and message in answer["error"], answer


def test_nan_inputs_wrong_tensor_names_methods_and_paths(server: ss.Server) -> None:
    nan = np.full((1, 1, 8, 8), np.nan).tolist()
    assert predict(server.url, nan)[0] == 422
    wrong = save_st({"x": torch.zeros(1, 1, 8, 8)})
    status, body = request(
        server.url, "/predict", wrong, headers={"Content-Type": "application/x-safetensors"}
    )
    assert status == 422 and "named 'inputs'" in body["error"]
    assert request(server.url, "/predict")[0] == 405
    assert request(server.url, "/nowhere")[0] == 404


def test_an_oversized_body_gets_413_before_it_is_read(finished_run: Path) -> None:
    with ss.serve(finished_run, port=0, max_body_bytes=1000) as server:
        head = (
            b"POST /predict HTTP/1.1\r\nHost: "
            + server.url[7:].encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n"
        )
        answer = raw_exchange(server.url, head)  # no body sent: refused on the header alone
        assert answer.startswith(b"HTTP/1.1 413")
        chunked = (
            b"POST /predict HTTP/1.1\r\nHost: "
            + server.url[7:].encode()
            + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        body = b"".join(b"400\r\n" + b"x" * 1024 + b"\r\n" for _ in range(3))
        assert raw_exchange(server.url, chunked, body).startswith(b"HTTP/1.1 413")


class SlowNet(DigitsNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.2)  # a model slow enough for requests to queue
        return super().forward(x)


def test_too_many_concurrent_requests_get_429(finished_run: Path) -> None:
    results: list[int] = []
    with ss.serve(finished_run, model=SlowNet(), port=0, max_concurrency=2) as server:

        def one() -> None:
            results.append(predict(server.url, digit_samples(1).tolist())[0])

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert set(results) == {200, 429} and results.count(200) >= 2


def test_pin_rollback_and_unpin(finished_run: Path, server: ss.Server) -> None:
    newest = request(server.url, "/version")[1]["version"]
    kept = [int(p.name[1:13]) for p in sorted((finished_run / "weights").iterdir())]
    assert kept[-1] == newest
    status, body = request(server.url, "/pin", json.dumps({"version": kept[0]}).encode())
    assert status == 200 and body["version"] == kept[0] and body["pinned"]
    assert predict(server.url, digit_samples(1).tolist())[1]["version"] == kept[0]
    status, body = request(server.url, "/rollback", b"")
    assert status == 200 and body["version"] == newest and body["previous"] == kept[0]
    status, body = request(server.url, "/unpin", b"")
    assert status == 200 and not body["pinned"] and body["version"] == newest
    status, body = request(server.url, "/pin", b'{"version": 3}')
    assert status == 404 and "not on disk" in body["error"]
    assert request(server.url, "/pin", b'{"version": "x"}')[0] == 422


def test_host_header_and_token_rules(finished_run: Path, server: ss.Server) -> None:
    status, body = request(server.url, "/health", headers={"Host": "attacker.example:80"})
    assert status == 403 and "Host header" in body["error"]
    assert (
        request(
            server.url, "/health", headers={"Host": "localhost:" + server.url.rsplit(":", 1)[1]}
        )[0]
        == 200
    )
    with pytest.raises(ss.ArgumentError, match="token"):
        ss.serve(finished_run, host="0.0.0.0", port=0)
    with ss.serve(finished_run, host="0.0.0.0", port=0, token="s3cret") as exposed:
        url = "http://127.0.0.1:" + exposed.url.rsplit(":", 1)[1]
        assert request(url, "/health")[0] == 401
        assert request(url, "/health", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert request(url, "/health", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert request(url, "/health?token=s3cret")[0] == 200


def test_a_run_without_live_weights_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ss.ArgumentError, match=r"no live\.json"):
        ss.serve(tmp_path, port=0)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=40,
)
_shapes = st.lists(st.integers(0, 9), min_size=0, max_size=4)
_arrays = _shapes.flatmap(
    lambda shape: st.builds(
        lambda seed, dtype: (
            np.random.default_rng(seed).standard_normal(shape).astype(dtype).tolist()
        ),
        st.integers(0, 1000),
        st.sampled_from(["float32", "float64", "int64"]),
    )
)
_bodies = st.one_of(
    st.binary(max_size=300),
    _json_values.map(lambda v: json.dumps(v).encode()),
    _json_values.map(lambda v: json.dumps({"inputs": v}).encode()),
    _arrays.map(lambda a: json.dumps({"inputs": a}).encode()),
    st.builds(
        lambda shape, dtype: save_st({"inputs": torch.zeros(shape, dtype=dtype)}),
        _shapes,
        st.sampled_from([torch.float32, torch.float16, torch.int8, torch.bool, torch.float64]),
    ),
)


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=_bodies,
    ctype=st.sampled_from(["application/json", "application/x-safetensors", "text/plain", ""]),
    path=st.sampled_from(["/predict", "/predict", "/pin", "/version", "/x", "/health"]),
)
def test_no_request_ever_gets_a_5xx(
    fuzz_server: ss.Server, body: bytes, ctype: str, path: str
) -> None:
    status, answer = request(fuzz_server.url, path, body, headers={"Content-Type": ctype})
    assert status < 500, (status, answer)
    if status >= 400:
        assert answer.get("error"), answer


@pytest.fixture
def fuzz_server(finished_run: Path) -> Iterator[ss.Server]:
    with ss.serve(finished_run, port=0) as s:
        yield s


def test_the_serve_command_answers_and_stops_on_sigterm(finished_run: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "slipstream.cli", "serve", str(finished_run), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until it listens
        url = line.split(" at ")[1].split()[0]
        assert request(url, "/health")[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
