"""The same pipeline feeding torch (DataLoader, Lightning) and Keras's own ``model.fit``."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch.utils.data

from slipstream._core.errors import LifecycleError
from slipstream._core.extras import require

if TYPE_CHECKING:
    from slipstream.data._pipeline import Pipeline


class TorchDataset(torch.utils.data.IterableDataset[Any]):
    """An ``IterableDataset`` over a pipeline; use ``DataLoader(ds, batch_size=None)``.

    The pipeline has its own workers: DataLoader's ``num_workers`` must stay 0, or each worker
    would run the whole pipeline again.
    """

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe

    def __iter__(self) -> Iterator[Any]:
        if torch.utils.data.get_worker_info() is not None:
            raise LifecycleError(
                "a slipstream pipeline runs its own workers; use DataLoader(..., num_workers=0, "
                "batch_size=None) (or pass pipe.as_torch() to Lightning directly)"
            )
        return iter(self.pipe)

    def __len__(self) -> int:
        return len(self.pipe)

    def set_epoch(self, epoch: int) -> None:
        self.pipe.set_epoch(epoch)


def keras_dataset(pipe: Pipeline) -> Any:
    """A ``keras.utils.PyDataset`` that serves the pipeline's batches in the pipeline's order.

    Batches should be ``(x, y)`` tuples or dicts of named inputs. The pipeline shuffles; the
    index Keras asks for (and so ``fit(shuffle=...)``) does not change which batch comes next.
    For a finite pipeline one Keras epoch is one pass: a pass Keras ends early (it reads one
    batch to build the model) is rewound. An infinite pipeline (``steps_per_epoch=``) continues
    from epoch to epoch.
    """
    return _keras_class()(pipe)


@functools.cache
def _keras_class() -> type:
    keras = require("keras", feature="as_keras()")

    class KerasDataset(keras.utils.PyDataset):  # type: ignore[misc,name-defined]
        def __init__(self, pipe: Pipeline) -> None:
            super().__init__(workers=1, use_multiprocessing=False)
            self.pipe = pipe
            self._it: Iterator[Any] | None = None
            self._begin: dict[str, Any] | None = None
            self._served = 0

        @property
        def num_batches(self) -> int | None:
            return self.pipe._length()

        def __getitem__(self, index: int) -> Any:
            if self._it is None:
                self._it = iter(self.pipe)
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                raise LifecycleError(
                    f"Keras asked for batch {index} but the pipeline's epoch has ended; "
                    "pass steps_per_epoch= no larger than the pipeline's batches per epoch"
                ) from None
            self._served += 1
            return tuple(batch) if isinstance(batch, list) else batch

        def on_epoch_begin(self) -> None:
            self._begin, self._served = self.pipe.state_dict(), 0

        def on_epoch_end(self) -> None:
            close = getattr(self._it, "close", None)
            if close is not None:
                close()
            self._it = None
            total = self.num_batches
            if total is not None and self._served < total and self._begin is not None:
                self.pipe.load_state_dict(self._begin)

    return KerasDataset
