"""One pass over a pipeline, and the pipeline's resumable state.

The state is a few integers: ``(seed, epoch, origin, world, cursor)`` plus the indices a
``map(errors="skip")`` stage dropped. ``origin`` is the global position where this epoch's
rank slicing starts (0 unless the state was resumed on a different number of ranks).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Any

from slipstream._core.errors import StateError
from slipstream._core.stats import PipelineStats, ProcessStats, StageStats, now
from slipstream.data._node import Ctx, Cursor, Item, Node
from slipstream.data._parallel import ErrorPolicy, InlineMapNode, ParallelMapNode

STATE_VERSION = 1
_KEYS = {"version", "seed", "epoch", "origin", "world", "cursor", "skipped"}


@dataclass(slots=True)
class State:
    """The mutable position of a pipeline, updated as the consumer receives items."""

    seed: int = 0
    epoch: int = 0
    origin: int = 0
    world: int = 1
    cursor: Cursor = None
    skipped: dict[int, list[int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "epoch": self.epoch,
            "origin": self.origin,
            "world": self.world,
            "cursor": self.cursor,
            "skipped": {str(k): list(v) for k, v in self.skipped.items()},
        }


def parse_state(state: object, *, seed: int) -> State:
    """Validate a state dict; every complaint names the key and what is allowed."""
    if not isinstance(state, dict):
        raise StateError(
            f"a pipeline state must be a dict from state_dict(); got {type(state).__name__}"
        )
    if (keys := set(state)) != _KEYS:
        raise StateError(
            f"not a pipeline state: missing {sorted(_KEYS - keys)}, "
            f"unexpected {sorted(keys - _KEYS)}"
        )
    if state["version"] != STATE_VERSION:
        raise StateError(f"pipeline state version {state['version']!r} is not {STATE_VERSION}")
    for key in ("seed", "epoch", "origin", "world"):
        if not isinstance(state[key], int) or state[key] < (key == "world"):
            raise StateError(
                f"pipeline state: {key}={state[key]!r} must be an int ≥ {int(key == 'world')}"
            )
    if state["seed"] != seed:
        raise StateError(
            f"the state was saved by a pipeline with seed={state['seed']} but this one has "
            f"seed={seed}; build the pipeline with the same seed to resume it"
        )
    skipped = state["skipped"]
    if not isinstance(skipped, dict) or not all(isinstance(v, list) for v in skipped.values()):
        raise StateError("pipeline state: skipped must map stage numbers to lists of indices")
    return State(
        state["seed"],
        state["epoch"],
        state["origin"],
        state["world"],
        state["cursor"],
        {int(k): [int(i) for i in v] for k, v in skipped.items()},
    )


def _innermost(cursor: Cursor) -> tuple[Cursor, bool]:
    """The source's cursor inside stage wrappers, and whether a wrapper was mid-way."""
    if isinstance(cursor, list) and cursor[:1] == ["u"]:
        inner, partial = _innermost(cursor[1])
        return inner, partial or bool(cursor[2])
    if isinstance(cursor, list):
        inner, partial = _innermost(cursor[0])
        return inner, partial or int(cursor[1]) != 0
    return cursor, False


def rebase(state: State, world: int, sharded_source: bool) -> State:
    """Re-express ``state`` for ``world`` ranks: positions consumed become the new origin."""
    if state.world == world:
        return state
    if state.cursor is None and state.origin == 0:  # nothing consumed: valid for any world
        return State(state.seed, state.epoch, 0, world, None, state.skipped)
    if sharded_source:
        raise StateError(
            f"this state was saved with world={state.world} and this pipeline runs with "
            f"world={world}; a sharded sequential source (tar) resumes only on the same number "
            "of ranks. Resume with the same world, or use a random-access source (parquet, npy)"
        )
    inner, partial = _innermost(state.cursor)
    if partial:
        warnings.warn(
            "resuming on a different number of ranks from the middle of a batch or shuffle "
            "window: that batch or window is read again",
            RuntimeWarning,
            stacklevel=3,
        )
    consumed = 0 if inner is None else int(inner)
    return State(
        state.seed, state.epoch, state.origin + consumed * state.world, world, None, state.skipped
    )


def policies(chain: list[Node]) -> dict[int, ErrorPolicy]:
    """The error policies of the map stages, by stage number."""
    maps = [n for n in chain if isinstance(n, InlineMapNode | ParallelMapNode)]
    return {n.stage: n.policy for n in maps if n.stage >= 0}


def add_stats(a: StageStats, b: StageStats) -> StageStats:
    """Figures of two passes of the same stage, summed (queue depth from the later)."""
    return StageStats(
        b.name,
        a.items + b.items,
        a.busy_s + b.busy_s,
        a.wait_input_s + b.wait_input_s,
        a.wait_output_s + b.wait_output_s,
        b.queue_depth,
        b.queue_capacity,
        b.workers,
        b.skipped,
        _add_processes(a.processes, b.processes),
    )


def _add_processes(
    a: tuple[ProcessStats, ...], b: tuple[ProcessStats, ...]
) -> tuple[ProcessStats, ...]:
    """Worker processes of two passes, summed by worker index (pid and memory from the later)."""
    by_index = {p.index: p for p in a}
    for p in b:
        if (q := by_index.get(p.index)) is not None:
            p = replace(p, items=q.items + p.items, busy_s=q.busy_s + p.busy_s)
        by_index[p.index] = p
    return tuple(by_index[i] for i in sorted(by_index))


class Run:
    """One pass: owns the node chain; updates the shared :class:`State` per item delivered.

    With ``lookahead`` the pass fetches one item ahead, so the epoch is known to be complete
    when its last item is delivered (a consumer that stops after ``len(pipe)`` items, as
    Lightning and Keras do, still ends the epoch). An error met while looking ahead is raised
    at the next call, after the items before it were delivered.
    """

    def __init__(self, head: Node, state: State, ctx: Ctx, on_close: Any, lookahead: bool) -> None:
        self.head, self.state, self._on_close, self.lookahead = head, state, on_close, lookahead
        self.items, self.started = 0, now()
        self._inline = type(head).next is Node.next  # not a node that serves its own
        self.closed = False
        self.ended = False
        self._ahead: Item | Exception | None = None
        head.start(ctx, state.cursor)

    def _fetch(self) -> Item | Exception:
        head = self.head
        try:
            if not self._inline:
                return head.next()
            if head.skip:  # Node.next, inlined: a call would cost more than the countdown
                item = head._next()
                head.skip -= 1
                return item
            return head.timed_next()
        except Exception as e:  # StopIteration included: kept until it is this item's turn
            return e

    def next(self) -> Any:
        if self.closed:
            raise StopIteration
        try:
            current = self._fetch() if self._ahead is None else self._ahead
            self._ahead = None
            if isinstance(current, Exception):
                self.ended = isinstance(current, StopIteration)
                self.close()
                raise current
            if self.lookahead:
                self._ahead = self._fetch()
        except BaseException:
            self.close()
            raise
        self.state.cursor = current.cursor
        self.items += 1
        if isinstance(self._ahead, StopIteration):
            self.ended = True
            self.close()
        return current.value

    @property
    def stall(self) -> float:
        """Seconds the consumer spent waiting in ``next`` (the head stage's time)."""
        return self.head.total()

    def close(self) -> None:
        # An exception looked ahead holds, through its traceback, the frames of whoever called
        # ``next`` (and their locals: a DDP-wrapped model, say) in a cycle with this pass;
        # dropped here, they go when their callers return, not at the next garbage collection.
        self._ahead = None
        if not self.closed:
            self.closed = True
            self.head.close()
            self._on_close(self)


class PipelineIterator:
    """Iterates one pass; leaving the loop early or dropping it shuts the pass down."""

    def __init__(self, run: Run) -> None:
        self._run = run

    def __iter__(self) -> PipelineIterator:
        return self

    def __next__(self) -> Any:
        return self._run.next()

    def close(self) -> None:
        self._run.close()

    def __del__(self) -> None:
        self._run.close()


def empty_stats() -> PipelineStats:
    return PipelineStats((), 0, 0.0, 0.0)
