"""Parameter averaging across ranks that overlaps compute (``localsgd``).

At a sync point a rank snapshots its parameters and starts an all-reduce of the snapshot without
waiting; it keeps training. At the next sync point it waits for that average (usually long done)
and sets its parameters to the new global point plus the progress it made since the snapshot.
The global point is the plain average, or with ``outer_lr`` an outer SGD step with Nesterov
momentum on the averaged change (DiLoCo).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class Averager:
    """Owned by one rank's training thread; each call is a collective every rank makes."""

    def __init__(
        self, params: list[torch.nn.Parameter], outer_lr: float | None, momentum: float
    ) -> None:
        self.params = params
        self.outer_lr, self.momentum = outer_lr, momentum
        self.anchor = self._flat()
        self.velocity = torch.zeros_like(self.anchor)
        self.pending: tuple[Any, torch.Tensor, torch.Tensor] | None = None

    def _flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    @torch.no_grad()
    def _set(self, flat: torch.Tensor) -> None:
        for p, chunk in zip(
            self.params, torch.split(flat, [p.numel() for p in self.params]), strict=True
        ):
            p.copy_(chunk.view_as(p))

    def sync(self) -> None:
        """Apply the average in flight, then start averaging the current parameters."""
        self._apply()
        snapshot = self._flat()
        total = snapshot.clone()
        work = dist.all_reduce(total, async_op=True)  # runs while the next steps compute
        self.pending = (work, total, snapshot)

    def _apply(self) -> None:
        if self.pending is None:
            return
        work, total, snapshot = self.pending
        self.pending = None
        work.wait()  # blocks only if the all-reduce is still running
        average = total / dist.get_world_size()
        target = self._outer(average)
        self._set(target + (self._flat() - snapshot))
        self.anchor = target

    def _outer(self, average: torch.Tensor) -> torch.Tensor:
        if self.outer_lr is None:
            return average
        change = self.anchor - average  # the pseudo-gradient of DiLoCo's outer step
        self.velocity.mul_(self.momentum).add_(change)
        return self.anchor - self.outer_lr * (change + self.momentum * self.velocity)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The global point and the outer momentum: the same on every rank."""
        return {"anchor": self.anchor, "velocity": self.velocity}

    def load_state_dict(self, state: dict[str, torch.Tensor] | None) -> None:
        """Continue from a checkpoint's global point (``None``: one saved before checkpoints
        held it, so from the weights just loaded, with no outer momentum). An average that
        was in flight at the save is not in the checkpoint."""
        self.pending = None
        if state is None:
            self.anchor = self._flat()
            self.velocity = torch.zeros_like(self.anchor)
        else:
            self.anchor = state["anchor"].to(self.anchor.device)
            self.velocity = state["velocity"].to(self.anchor.device)

    @torch.no_grad()
    def finish(self) -> None:
        """Settle: apply what is in flight, then average so every rank holds the same weights."""
        self._apply()
        flat = self._flat()
        dist.all_reduce(flat)  # blocks
        flat /= dist.get_world_size()
        self._set(flat)
        self.anchor = flat
