"""Precision (fp32, bf16 autocast, fp16 with a gradient scaler) and torch.compile with fallback."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Literal

import torch

from slipstream._core.checks import one_of
from slipstream._core.errors import ArgumentError

PrecisionName = Literal["fp32", "bf16", "fp16"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """How forward passes run on ``device``: an autocast context, and a scaler for fp16."""

    def __init__(self, name: PrecisionName, device: torch.device) -> None:
        self.name = one_of("precision", name, ("fp32", "bf16", "fp16"))
        self.device = device
        if name == "fp16" and device.type != "cuda":
            raise ArgumentError(
                f"`precision='fp16'` needs a CUDA device (this run is on {device.type}); "
                "use precision='bf16' on CPU"
            )

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.name])

    def scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device.type) if self.name == "fp16" else None


class Compiled(torch.nn.Module):
    """``torch.compile(module)`` that falls back to ``module`` (with a warning saying why) when
    compiling fails at the first call."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.eager = module
        self.compiled: Any = torch.compile(module)
        self.failed: str | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed is None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # any compiler failure: the eager module still works
                self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                warnings.warn(
                    f"compile=True: torch.compile failed ({self.failed}); training on without it",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return self.eager(*args, **kwargs)
