"""One exception hierarchy, rooted at :class:`SlipstreamError`.

Every message says what was received, what is allowed and what to do about it.
"""

from __future__ import annotations


class SlipstreamError(Exception):
    """Root of every error slipstream raises on purpose."""


class ArgumentError(SlipstreamError, ValueError):
    """A user-facing argument has a value that is not allowed."""


class MissingExtraError(SlipstreamError, ImportError):
    """An optional dependency is needed; the message names the extra that installs it."""


class LifecycleError(SlipstreamError, RuntimeError):
    """An object was used in a state that does not allow it (closed, exhausted, already running)."""


class StateError(SlipstreamError, ValueError):
    """A state dict cannot be loaded into this object."""


class SourceError(SlipstreamError, OSError):
    """Reading from a source failed; the message names the location."""


class CorruptDataError(SourceError):
    """A file exists but its content is not what its format requires."""


class SourceTimeoutError(SourceError, TimeoutError):
    """A read did not finish within its ``timeout`` (after any retries)."""


class PipelineError(SlipstreamError, RuntimeError):
    """A pipeline stage failed; subclasses say how."""


class StageError(PipelineError):
    """A user function raised inside a stage.

    ``stage`` is the stage's name, ``index`` the sample index (``None`` where the item has none);
    the original exception is ``__cause__``, with its traceback.
    """

    def __init__(self, message: str, *, stage: str, index: int | None) -> None:
        super().__init__(message)
        self.stage = stage
        self.index = index


class TooManySkippedError(PipelineError):
    """``errors="skip"`` dropped more samples than ``max_skipped`` allows."""


class WorkerDiedError(PipelineError):
    """A worker process exited without being asked to (killed by a signal, crashed)."""


class StallError(PipelineError, TimeoutError):
    """A stage made no progress within its deadline; the message says what it waited for."""


class CheckpointError(SlipstreamError, ValueError):
    """A checkpoint is missing, incomplete, unsafe to load or does not fit the model."""


class TrainingError(SlipstreamError, RuntimeError):
    """Training stopped on a failure; the message names the process (rank, worker) and cause."""
