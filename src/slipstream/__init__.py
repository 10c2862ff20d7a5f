"""slipstream: fast deep-learning training on large datasets.

>>> import slipstream as ss
>>> pipe = ss.from_arrays({"x": x, "y": y}).shuffle(seed=0).map(augment).batch(256).prefetch(4)
"""

from slipstream._core.errors import (
    ArgumentError,
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
    WorkerDiedError,
)
from slipstream._core.stats import PipelineStats, StageStats
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

__version__ = "0.1.0"

__all__ = [
    "ArgumentError",
    "CorruptDataError",
    "LifecycleError",
    "MissingExtraError",
    "Pipeline",
    "PipelineError",
    "PipelineStats",
    "SlipstreamError",
    "SourceError",
    "SourceTimeoutError",
    "StageError",
    "StageStats",
    "StallError",
    "StateError",
    "TooManySkippedError",
    "WorkerDiedError",
    "from_arrays",
    "from_files",
    "from_iterable",
    "from_numpy",
    "from_parquet",
    "from_tar",
    "sample_rng",
    "sample_seed",
]
