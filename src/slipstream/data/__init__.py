"""The input pipeline: sources, order, stages, engine and adapters (DESIGN.md §2)."""

from slipstream.data._api import (
    from_arrays,
    from_files,
    from_iterable,
    from_numpy,
    from_parquet,
    from_tar,
)
from slipstream.data._pipeline import Pipeline
from slipstream.data._rng import sample_rng, sample_seed

__all__ = [
    "Pipeline",
    "from_arrays",
    "from_files",
    "from_iterable",
    "from_numpy",
    "from_parquet",
    "from_tar",
    "sample_rng",
    "sample_seed",
]
