"""The single-process loop: parity with a hand-written loop, accumulation, callbacks, errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import slipstream as ss
from tests.train.helpers import cnn, pipes, same_weights, trainer


def test_single_equals_a_hand_written_loop() -> None:
    train, _ = pipes(n=640)
    model = cnn()
    history = trainer(model).fit(train, epochs=2)

    hand = cnn()
    opt = torch.optim.SGD(hand.parameters(), lr=0.05, momentum=0.9)
    ref, _ = pipes(n=640)
    for epoch in range(2):
        ref.set_epoch(epoch)
        for x, y in ref:
            opt.zero_grad()
            F.cross_entropy(hand(torch.as_tensor(x)), torch.as_tensor(y)).backward()
            opt.step()
    assert same_weights(model, hand)
    assert history.steps == 40 and len(history.epochs) == 2
    assert history.config["strategy"] == "single" and history.config["threads"] >= 1


def test_accumulating_k_batches_equals_one_batch_k_times_larger() -> None:
    plain = trainer(optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    plain.fit(pipes(batch=64, n=640)[0], epochs=1)
    accumulated = trainer(optimizer=lambda p: torch.optim.SGD(p, lr=0.1), accumulate=4)
    history = accumulated.fit(pipes(batch=16, n=640)[0], epochs=1)
    assert history.steps == 10
    for a, b in zip(plain.model.parameters(), accumulated.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_trains_digits_and_evaluates() -> None:
    train, test = pipes()
    t = trainer()
    history = t.fit(train, val=test, epochs=3)
    assert history["val_acc"][-1] > 0.9
    assert t.evaluate(test)["acc"] == pytest.approx(history["val_acc"][-1])
    assert history["loss"][0] > history["loss"][-1]


def test_bf16_clipping_and_a_scheduler() -> None:
    train, test = pipes()
    t = trainer(
        precision="bf16",
        clip_grad_norm=1.0,
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5),
    )
    history = t.fit(train, val=test, epochs=2)
    assert history["val_acc"][-1] > 0.8 and history.steps == 94
    assert history.config["precision"] == "bf16"


def test_a_custom_train_step_for_two_outputs() -> None:
    class TwoHeads(ss.Trainer):
        def train_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
            x, y = batch
            logits = self.module(x)
            loss = F.cross_entropy(logits, y) + 0.1 * logits.pow(2).mean()
            return {"loss": loss, "penalty": logits.pow(2).mean().detach()}

    history = TwoHeads(
        cnn(), optimizer=lambda p: torch.optim.Adam(p, lr=1e-3), loss=F.cross_entropy
    ).fit(pipes(n=320)[0], epochs=1)
    assert set(history.epochs[0]) >= {"loss", "penalty"} and history.steps == 10


def test_early_stopping_restores_the_best_weights() -> None:
    class Scripted(ss.Callback):  # a val_loss that improves once and then worsens
        def __init__(self) -> None:
            self.values = iter([3.0, 1.0, 2.0, 2.5, 2.7, 2.9])

        def on_epoch_end(self, fit: object, logs: dict[str, float]) -> None:
            logs["val_loss"] = next(self.values)

    stop = ss.EarlyStopping("val_loss", patience=1)
    seen: list[dict[str, torch.Tensor]] = []

    class Snap(ss.Callback):
        def on_epoch_end(self, fit: object, logs: dict[str, float]) -> None:
            seen.append({k: v.clone() for k, v in fit.weights().items()})  # type: ignore[attr-defined]

    t = trainer(callbacks=[Scripted(), Snap(), stop])
    history = t.fit(pipes(n=320)[0], epochs=6)
    assert len(history.epochs) == 3 and history.stopped_by.startswith("EarlyStopping")
    best = seen[1]
    assert all(torch.equal(t.model.state_dict()[k], best[k]) for k in best)


def test_timeout_stops_cleanly_with_a_checkpoint(tmp_path: Path) -> None:
    t = trainer(callbacks=[ss.Timeout(seconds=0.2), ss.Checkpoint(tmp_path, every_epochs=100)])
    history = t.fit(pipes(batch=8)[0], epochs=1000)
    assert history.stopped_by.startswith("Timeout")
    saved = ss.load_weights(tmp_path, cnn(seed=1))
    assert same_weights(saved, t.model)


def test_non_finite_losses_are_skipped_and_never_checkpointed(tmp_path: Path) -> None:
    class Poisoned(ss.Trainer):
        calls = 0

        def train_step(self, batch: object) -> dict[str, torch.Tensor]:
            out = super().train_step(batch)
            self.calls += 1
            if self.calls % 3 == 0:
                out["loss"] = out["loss"] * math.nan
            return out

    t = Poisoned(
        cnn(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05),
        loss=F.cross_entropy,
        callbacks=[ss.NonFiniteGuard("skip"), ss.Checkpoint(tmp_path)],
    )
    history = t.fit(pipes(n=320)[0], epochs=1)
    assert history.steps == 7  # 10 batches, 3 of them poisoned
    assert all(torch.isfinite(p).all() for p in t.model.parameters())

    stopping = Poisoned(
        cnn(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05),
        loss=F.cross_entropy,
        callbacks=[ss.NonFiniteGuard("stop")],
    )
    assert stopping.fit(pipes(n=320)[0], epochs=1).stopped_by.startswith("NonFiniteGuard")


def test_a_nan_model_is_not_written(tmp_path: Path) -> None:
    class Broken(ss.Callback):
        def on_step_end(self, fit: object) -> None:
            with torch.no_grad():
                next(fit.trainer.model.parameters()).fill_(math.nan)  # type: ignore[attr-defined]

    t = trainer(callbacks=[Broken(), ss.Checkpoint(tmp_path, every_steps=1)])
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        t.fit(pipes(n=64)[0], epochs=1)
    assert not (tmp_path / "latest").exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strategy": "horovod"}, r"strategy='horovod'.*'ddp'.*'hogwild'.*'localsgd'.*'single'"),
        ({"strategy": "hogwild", "workers": 0}, r"workers=0.*positive int"),
        ({"strategy": ss.Hogwild(workers=2), "workers": 2}, r"workers=.*strategy object"),
        ({"precision": "fp8"}, r"precision='fp8'.*'bf16'"),
        ({"precision": "fp16"}, r"fp16.*CUDA.*bf16"),
        ({"accumulate": 0}, r"accumulate=0"),
        ({"loss": None}, r"loss=None"),
        ({"optimizer": None}, r"optimizer=None"),
        ({"optimizer": 3}, r"optimizer.*factory"),
        ({"callbacks": [print]}, r"callbacks.*ss.Callback"),
        ({"schedule_every": "batch"}, r"schedule_every='batch'"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ss.ArgumentError, match=match):
        trainer(**kwargs)  # type: ignore[arg-type]


def test_bad_fit_arguments_and_batches() -> None:
    with pytest.raises(ss.ArgumentError, match="epochs=0"):
        trainer().fit(pipes()[0], epochs=0)
    with pytest.raises(ss.ArgumentError, match=r"inputs from targets.*'a'.*Trainer.split"):
        trainer().fit([{"a": torch.zeros(2, 1, 8, 8)}])
    with pytest.raises(ss.ArgumentError, match=r"must be a torch\.nn\.Module or a Keras 3 model"):
        ss.Trainer(object(), optimizer=lambda p: None, loss=F.cross_entropy)


def test_fit_together_trains_each_model_on_every_batch_read_once() -> None:
    reads = []

    def count(batch: object) -> object:
        reads.append(1)
        return batch

    x, y = __import__("tests.train.helpers", fromlist=["digits"]).digits()
    train = ss.from_arrays((x[:640], y[:640])).shuffle(seed=0).batch(32).map(count)
    a, b = trainer(cnn(seed=1)), trainer(cnn(seed=2))
    ha, hb = ss.fit_together([a, b], train, val=pipes()[1], epochs=2)
    assert len(reads) == 40 and ha.steps == hb.steps == 40
    solo = trainer(cnn(seed=1), threads=a.threads)
    solo.fit(ss.from_arrays((x[:640], y[:640])).shuffle(seed=0).batch(32), epochs=2)
    assert same_weights(solo.model, a.model)
    assert ha["val_acc"][-1] > 0.8 and hb["val_acc"][-1] > 0.8


class StopAt(ss.Callback):
    """Stops the run after update ``step`` (as a crash would, but with the final checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, fit: object) -> None:
        if fit.step == self.step:  # type: ignore[attr-defined]
            fit.stop("test")  # type: ignore[attr-defined]


@pytest.mark.parametrize("stateful", [True, False], ids=["pipeline", "plain-iterable"])
def test_fit_together_resumes_each_model_where_its_checkpoint_was(
    tmp_path: Path, stateful: bool
) -> None:
    def train() -> object:
        pipe = pipes(n=640)[0]  # 20 batches an epoch
        return pipe if stateful else list(pipe)  # a list: the same order every epoch, no state

    def pair(stops: tuple[int, int] = (0, 0)) -> list[ss.Trainer]:
        return [
            trainer(cnn(seed=i), threads=1, callbacks=[
                ss.Checkpoint(tmp_path / str(i), every_steps=4), StopAt(stops[i])
            ])
            for i in range(2)
        ]  # fmt: skip

    whole = pair()
    ss.fit_together(whole, train(), epochs=3)
    for d in ("0", "1"):
        __import__("shutil").rmtree(tmp_path / d)

    first = pair(stops=(7, 26))  # model 0 stops in epoch 0, model 1 in epoch 1
    ha, hb = ss.fit_together(first, train(), epochs=3)
    assert (ha.steps, hb.steps) == (7, 26)
    again = pair()
    ha, hb = ss.fit_together(again, train(), epochs=3, resume=[tmp_path / "0", tmp_path / "1"])
    assert ha.steps == hb.steps == 60
    for a, b in zip(whole, again, strict=True):
        assert same_weights(a.model, b.model)
    with pytest.raises(ss.ArgumentError, match=r"one run directory.*per trainer"):
        ss.fit_together(pair(), train(), resume=[tmp_path / "0"])


def test_fit_together_lets_one_model_stop_early() -> None:
    class StopAtOne(ss.Callback):
        def on_epoch_end(self, fit: object, logs: dict[str, float]) -> None:
            fit.stop("done")  # type: ignore[attr-defined]

    a, b = trainer(callbacks=[StopAtOne()]), trainer()
    ha, hb = ss.fit_together([a, b], pipes(n=320)[0], epochs=3)
    assert len(ha.epochs) == 1 and len(hb.epochs) == 3
    with pytest.raises(ss.ArgumentError, match="strategy='hogwild'"):
        ss.fit_together([trainer(strategy="hogwild", workers=2)], pipes()[0])


class Bag(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bag = torch.nn.EmbeddingBag(6, 3, mode="mean")

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.bag(*inputs)  # type: ignore[no-any-return]


def test_batches_of_flat_tokens_count_documents_not_tokens() -> None:
    """A batch of (flat token ids, offsets) and labels holds as many samples as labels: the
    mean loss over two batches weighs each document once, however many tokens it has."""
    long = (
        (torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3]), torch.tensor([0, 5])),
        torch.tensor([0, 1]),
    )
    short = ((torch.tensor([4, 5]), torch.tensor([0, 1])), torch.tensor([2, 2]))
    t = ss.Trainer(Bag(), optimizer=lambda p: torch.optim.SGD(p, lr=0.1), loss=F.cross_entropy)
    got = t.evaluate([long, short])["loss"]
    with torch.no_grad():
        each = [F.cross_entropy(t.model(x), y, reduction="sum") for x, y in (long, short)]
    assert got == pytest.approx(float(sum(each)) / 4, rel=1e-6)
