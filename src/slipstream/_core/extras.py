"""Optional dependencies: import them by name, or fail with the extra that installs them."""

from __future__ import annotations

import importlib
from types import ModuleType

from slipstream._core.errors import MissingExtraError

# module name -> the extra of slipstream that installs it
_EXTRA_OF = {
    "pyarrow": "parquet",
    "pyarrow.parquet": "parquet",
    "fsspec": "remote",
    "aiohttp": "remote",
    "PIL": "images",
    "keras": "keras",
    "rich": "live",
    "rich.progress": "live",
    "starlette": "live",
    "uvicorn": "live",
    "tensorboard": "tensorboard",
    "sklearn": "workloads",
    "sklearn.datasets": "workloads",
}


def require(module: str, *, feature: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming the extra to install.

    >>> np = require("numpy", feature="arrays")
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = _EXTRA_OF.get(module, "all")
        raise MissingExtraError(
            f"{feature} needs the optional package '{module.split('.')[0]}', which is not "
            f"installed; install it with: pip install 'slipstream[{extra}]'"
        ) from e
