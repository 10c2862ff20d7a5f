"""The training loop, strategies, backends, callbacks and checkpoints (DESIGN.md §3)."""

from slipstream.train._callbacks import Callback, Checkpoint, EarlyStopping, NonFiniteGuard, Timeout
from slipstream.train._checkpoint import load_weights
from slipstream.train._distributed import DDP, LocalSGD
from slipstream.train._fit import History
from slipstream.train._hogwild import Hogwild
from slipstream.train._strategies import Single
from slipstream.train._together import fit_together
from slipstream.train._trainer import Trainer

__all__ = [  # noqa: RUF022 (plain sorted order, as the test checks)
    "Callback",
    "Checkpoint",
    "DDP",
    "EarlyStopping",
    "History",
    "Hogwild",
    "LocalSGD",
    "NonFiniteGuard",
    "Single",
    "Timeout",
    "Trainer",
    "fit_together",
    "load_weights",
]
