"""slipstream: fast deep-learning training on large datasets.

>>> import slipstream as ss
>>> pipe = ss.from_arrays({"x": x, "y": y}).shuffle(seed=0).map(augment).batch(256).prefetch(4)
"""

from slipstream import metrics
from slipstream._core.errors import (
    ArgumentError,
    CheckpointError,
    CorruptDataError,
    LifecycleError,
    MissingExtraError,
    PipelineError,
    SlipstreamError,
    SourceError,
    SourceTimeoutError,
    StageError,
    StallError,
    StateError,
    TooManySkippedError,
    TrainingError,
    WorkerDiedError,
)
from slipstream._core.stats import PipelineStats, ProcessStats, StageStats
from slipstream.data import (
    Pipeline,
    from_arrays,
    from_files,
    from_iterable,
    from_numpy,
    from_parquet,
    from_tar,
    sample_rng,
    sample_seed,
)
from slipstream.live import Live, Server, serve
from slipstream.train import (
    DDP,
    Callback,
    Checkpoint,
    EarlyStopping,
    History,
    Hogwild,
    LocalSGD,
    NonFiniteGuard,
    Single,
    Timeout,
    Trainer,
    fit_together,
    load_weights,
)
from slipstream.tune import TuneResult, tune

__version__ = "0.1.0"

__all__ = [  # noqa: RUF022 (plain sorted order, as the test checks)
    "ArgumentError",
    "Callback",
    "Checkpoint",
    "CheckpointError",
    "CorruptDataError",
    "DDP",
    "EarlyStopping",
    "History",
    "Hogwild",
    "LifecycleError",
    "Live",
    "LocalSGD",
    "MissingExtraError",
    "NonFiniteGuard",
    "Pipeline",
    "PipelineError",
    "PipelineStats",
    "ProcessStats",
    "Server",
    "Single",
    "SlipstreamError",
    "SourceError",
    "SourceTimeoutError",
    "StageError",
    "StageStats",
    "StallError",
    "StateError",
    "Timeout",
    "TooManySkippedError",
    "Trainer",
    "TrainingError",
    "TuneResult",
    "WorkerDiedError",
    "fit_together",
    "from_arrays",
    "from_files",
    "from_iterable",
    "from_numpy",
    "from_parquet",
    "from_tar",
    "load_weights",
    "metrics",
    "sample_rng",
    "sample_seed",
    "serve",
    "tune",
]
