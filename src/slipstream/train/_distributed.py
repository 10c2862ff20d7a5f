"""``ddp`` and ``localsgd``: one training process per rank on torch.distributed.

Launch: inside an initialised process group, under ``torchrun`` (``RANK``/``WORLD_SIZE``),
``mpirun`` (``OMPI_COMM_WORLD_*``, ``PMI_*``) or ``srun`` (``SLURM_*``) the current process is
one rank; otherwise slipstream forks ``workers`` ranks on this machine (gloo on CPU, nccl on
GPU) and the caller's model receives rank 0's final weights.

Ranks agree before every step (``ddp``) or every ``sync_every`` updates (``localsgd``) on
whether to go on, so a rank out of data or told to stop never leaves its peers waiting in a
collective. Only rank 0 writes checkpoints; every rank reads them on resume. Under ``ddp`` a
checkpoint also holds every rank's RNG state, gathered at the save: ranks save at the same step,
rules on time reading a clock the ranks agree on each time they decide together. Under
``localsgd`` one taken where the ranks meet (an epoch's end, the run's end) holds every rank's
RNG and optimizer state.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed import PrefixStore, Store, TCPStore  # type: ignore[attr-defined]
from torch.nn.parallel import DistributedDataParallel

from slipstream._core.checks import positive_int, positive_number
from slipstream._core.errors import ArgumentError
from slipstream.train._callbacks import Checkpoint
from slipstream.train._fit import Fit, FitPlan, History, evaluate_sums, rng_state
from slipstream.train._group import Group
from slipstream.train._precision import Compiled
from slipstream.train._strategies import Local, describe, deterministic, prepare_module

if TYPE_CHECKING:
    from slipstream.train._trainer import Trainer


@dataclass(frozen=True)
class Cluster:
    """Where this process sits, read from its launcher's environment."""

    launcher: str
    rank: int
    world: int
    local_rank: int
    local_world: int
    addr: str
    port: int


def cluster_from_env(env: Mapping[str, str] = os.environ) -> Cluster | None:
    """This process's rank and peers under torchrun, mpirun or srun; ``None`` when launched
    alone."""
    for launcher, rank, world, local, local_world in (
        ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
        (
            "mpirun",
            "OMPI_COMM_WORLD_RANK",
            "OMPI_COMM_WORLD_SIZE",
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "OMPI_COMM_WORLD_LOCAL_SIZE",
        ),
        ("mpirun", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
        ("srun", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
    ):
        if rank in env and world in env:
            return _cluster(env, launcher, rank, world, local, local_world)
    return None


def _cluster(env: Mapping[str, str], launcher: str, *keys: str) -> Cluster:
    rank, world, local, local_world = (int(env.get(k, "0").split("(")[0] or 0) for k in keys)
    addr = env.get("MASTER_ADDR") or env.get("SLURM_LAUNCH_NODE_IPADDR")
    if not addr:
        raise ArgumentError(
            f"launched by {launcher} (rank {rank} of {world}) but MASTER_ADDR is not set; "
            "export MASTER_ADDR (the address of rank 0's machine) and MASTER_PORT"
        )
    port = int(env.get("MASTER_PORT", "29500"))
    return Cluster(launcher, rank, world, local, local_world or world, addr, port)


def launching_rank(env: Mapping[str, str] = os.environ) -> int:
    """This process's global rank as its launcher set it (0 when launched alone)."""
    for key in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        if key in env:
            return int(env[key])
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Ranked:
    """Launching and the rank bookkeeping shared by ``DDP`` and ``LocalSGD``."""

    name = "ranked"

    def __init__(self, workers: int = 2, *, backend: str | None = None, timeout: float = 60.0):
        self.workers = positive_int("workers", workers)
        self.backend = backend
        self.timeout = float(timeout)
        positive_number("timeout", timeout)
        self.rank, self.world, self.threads = 0, self.workers, 0
        self.flag_allreduces = 0
        self.started, self.agreed = time.monotonic(), 0.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self, trainer: Trainer) -> dict[str, Any]:
        info = describe(self, trainer, self.threads)
        info["workers"] = self.world
        info["allreduces"] = self.allreduces()
        return info

    def allreduces(self) -> dict[str, int]:
        """Collectives this rank made so far, by purpose."""
        return {"flags": self.flag_allreduces}

    def clock(self) -> float:
        return self.agreed

    def rng_states(self, own: dict[str, Any]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _gather(self, own: Any) -> list[Any]:
        """Every rank's ``own``, on rank 0 (a collective: every rank calls it at this point)."""
        gathered: list[Any] = [None] * self.world if self.is_main else []
        dist.gather_object(own, gathered if self.is_main else None, dst=0)  # blocks
        return gathered

    def _backend(self, trainer: Trainer) -> str:
        return self.backend or ("nccl" if trainer.device.type == "cuda" else "gloo")

    def launch(self, trainer: Trainer, plan: FitPlan) -> History:
        if dist.is_available() and dist.is_initialized():
            return self._run(trainer, plan, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        cluster = cluster_from_env()
        if cluster is None:
            return self._spawn(trainer, plan)
        self._init(
            trainer, self._rendezvous(cluster), cluster.rank, cluster.world, cluster.local_rank
        )
        try:
            return self._run(trainer, plan, cluster.local_world)
        finally:
            dist.destroy_process_group()

    def _rendezvous(self, cluster: Cluster) -> str | Store:
        """Where the ranks meet: the launcher's address, or under torchrun the store its agent
        keeps, with this attempt's keys apart (the agent keeps one store across restarts, and
        a restarted rank must not read the addresses of the ranks that died)."""
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
            return f"tcp://{cluster.addr}:{cluster.port}"
        store = TCPStore(
            cluster.addr,
            cluster.port,
            cluster.world,
            is_master=False,
            timeout=datetime.timedelta(seconds=self.timeout),
        )
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return PrefixStore(f"slipstream/attempt-{attempt}", store)

    def _init(
        self, trainer: Trainer, meet: str | Store, rank: int, world: int, local_rank: int
    ) -> None:
        if trainer.device.type == "cuda":
            trainer.device = torch.device("cuda", local_rank % torch.cuda.device_count())
            torch.cuda.set_device(trainer.device)  # where nccl's object collectives go
        dist.init_process_group(
            self._backend(trainer),
            init_method=meet if isinstance(meet, str) else None,
            store=None if isinstance(meet, str) else meet,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=self.timeout),
        )

    def _spawn(self, trainer: Trainer, plan: FitPlan) -> History:
        url = f"tcp://127.0.0.1:{free_port()}"
        n = self.workers

        def rank_main(rank: int, conn: Any) -> Any:
            self._init(trainer, url, rank, n, rank)
            # a rank that raises leaves the group up and exits (``Group``), so its error reaches
            # the parent before its peers fail on connections it closed
            history = self._run(trainer, plan, n)
            dist.destroy_process_group()
            weights = {k: v.cpu() for k, v in trainer.model.state_dict().items()}
            return (history.as_dict(), weights) if rank == 0 else None

        group = Group(f"{self.name} rank", n, rank_main)
        try:
            results: dict[int, Any] = {}
            with group.forwarding_signals() as signals:
                while len(results) < n:
                    got = group.recv(timeout=None)  # wakes on a result, an error or a death
                    if got is not None:
                        results[got[0]] = got[1][1]
        finally:
            group.close(grace=5.0)
        history, weights = results[0]
        trainer.model.load_state_dict(weights)
        if signals:  # the ranks stopped on the signal passed on: name what this process got
            history["stopped_by"] = f"signal {signals[0]}"
        return History(**history)

    def _run(self, trainer: Trainer, plan: FitPlan, local_world: int) -> History:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.started, self.agreed = time.monotonic(), 0.0
        self.threads = trainer.set_threads(local_world)
        prepare_module(trainer)
        self.inner = trainer.module
        self._wrap(trainer)
        self.local = Local(trainer, plan.train, {"rank": self.rank})
        try:
            with deterministic(trainer.deterministic):
                return Fit(trainer, plan, self).run()
        finally:
            # The DDP wrapper holds the process group: dropped here, the group's destructor
            # joins its gloo threads at ``destroy_process_group``. A thread left running frees
            # a collective's tensors late, needs the GIL for it, and aborts the process if the
            # interpreter is exiting ("terminate called without an active exception").
            trainer.module = self.inner

    def _wrap(self, trainer: Trainer) -> None:
        """Wrap the module for this strategy (DDP does); called once per rank."""

    def train_epoch(self, fit: Fit) -> dict[str, float]:
        raise NotImplementedError

    def _any(self, flag: bool) -> bool:
        """Whether any rank's ``flag`` is set (a collective every rank makes). The ranks agree
        on the clock on the way: the most seconds any of them has run (see ``clock``)."""
        self.flag_allreduces += 1
        mine = [float(flag), time.monotonic() - self.started]
        t = torch.tensor(mine, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # blocks until every rank asks
        self.agreed = float(t[1])
        return bool(t[0])

    def _comm_device(self) -> torch.device:
        return next(self.inner.parameters()).device  # gloo: CPU tensors; nccl: the rank's GPU

    def _reduce(self, packed: torch.Tensor) -> torch.Tensor:
        t = packed.to(self._comm_device())
        dist.all_reduce(t)  # blocks: sums figures over ranks
        return t.cpu()

    def evaluate(self, fit: Fit, pipe: Iterable[Any]) -> dict[str, float]:
        trainer = fit.trainer
        module, trainer.module = trainer.module, self.inner  # no collectives in eval forwards
        try:
            averages = evaluate_sums(trainer, pipe)
        finally:
            trainer.module = module
        return averages.result(self._reduce(averages.packed()))

    def state_dict(self, fit: Fit) -> dict[str, Any]:
        return self.local.state_dict()

    def load_state_dict(self, fit: Fit, state: dict[str, Any]) -> None:
        self.local.load_state_dict(fit, state)


class DDP(_Ranked):
    """Synchronous data parallel: gradients all-reduced every step by DistributedDataParallel.

    ``workers`` ranks when slipstream spawns them; under a launcher the launcher's world.
    ``timeout``: seconds a collective may wait for a peer before failing the run.
    """

    name = "ddp"

    def __init__(
        self,
        workers: int = 2,
        *,
        backend: str | None = None,
        timeout: float = 60.0,
        find_unused_parameters: bool = False,
    ) -> None:
        super().__init__(workers, backend=backend, timeout=timeout)
        self.find_unused = find_unused_parameters
        self.gradient_allreduces = 0

    def allreduces(self) -> dict[str, int]:
        return {"gradients": self.gradient_allreduces, "flags": self.flag_allreduces}

    def rng_states(self, own: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank's, gathered on rank 0 (ranks step in lockstep, so all save together)."""
        return self._gather(own)

    def _wrap(self, trainer: Trainer) -> None:
        ids = [trainer.device.index] if trainer.device.type == "cuda" else None
        model = trainer.model
        ddp = DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=self.find_unused
        )
        ddp.register_comm_hook(self, _counting_allreduce)
        trainer.module = Compiled(ddp) if trainer.compile else ddp

    def train_epoch(self, fit: Fit) -> dict[str, float]:
        averages = self.local.epoch(fit, Together(self, fit), fit.after_update)
        return averages.result(self._reduce(averages.packed()))


class Together:
    """Ranks decide every step together: whether any was told to stop (before fetching, so a
    stopped rank's pipeline still points at the batch it did not train on), then whether any
    is out of data."""

    def __init__(self, strategy: _Ranked, fit: Fit) -> None:
        self.s, self.fit = strategy, fit

    def before(self) -> bool:
        if self.s._any(self.fit.stopping):
            self.fit.stop("another rank stopped the run")  # no-op on the rank that did
            return False
        return True

    def after(self, has_batch: bool) -> bool:
        return not self.s._any(not has_batch)


class Periodic:
    """``localsgd`` ranks decide together only at sync points; a rank told to stop or out of
    data joins its peers' next sync point to tell them."""

    def __init__(self, strategy: LocalSGD, fit: Fit) -> None:
        self.s, self.fit, self.together = strategy, fit, Together(strategy, fit)

    def _due(self) -> bool:
        return self.s.since_sync >= self.s.sync_every

    def before(self) -> bool:
        return self.together.before() if self._due() or self.fit.stopping else True

    def after(self, has_batch: bool) -> bool:
        if not self._due():
            if has_batch:
                return True
            self.together.before()  # the pair of collectives the peers make at a sync point
        if not self.together.after(has_batch):
            return False
        self.s.averager.sync()  # starts the next average, applies the previous one
        self.s.param_allreduces += 1
        self.s.since_sync = 0
        return True


def _counting_allreduce(state: DDP, bucket):  # type: ignore[no-untyped-def]
    # DDP checks that ``bucket`` is unannotated or annotated with the class itself
    state.gradient_allreduces += 1
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    return allreduce_hook(dist.group.WORLD, bucket)  # type: ignore[arg-type]


class LocalSGD(_Ranked):
    """Each rank steps alone; parameters are averaged every ``sync_every`` updates.

    The average is an all-reduce started without waiting: the ranks take their next
    ``sync_every`` steps while it runs, and apply it (plus their progress since) at the next sync.
    With ``outer_lr`` the averaged change drives an outer SGD with Nesterov momentum
    (``outer_momentum``), as DiLoCo does; without it the average is taken as it is.
    """

    name = "localsgd"

    def __init__(
        self,
        workers: int = 2,
        *,
        sync_every: int = 8,
        outer_lr: float | None = None,
        outer_momentum: float = 0.9,
        backend: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        super().__init__(workers, backend=backend, timeout=timeout)
        self.sync_every = positive_int("sync_every", sync_every)
        self.outer_lr = positive_number("outer_lr", outer_lr, allow_none=True)
        if not 0.0 <= float(outer_momentum) < 1.0:
            raise ArgumentError(f"`outer_momentum={outer_momentum!r}` must be in [0, 1)")
        self.outer_momentum = float(outer_momentum)
        self.param_allreduces = 0
        self.since_sync = 0
        self._ranks: list[tuple[dict[str, Any], dict[str, Any]]] | None = None  # _snapshot

    def _wrap(self, trainer: Trainer) -> None:
        from slipstream.train._averaging import Averager

        self._ranks = None
        with torch.no_grad():  # every rank starts from rank 0's weights, as DDP's ranks do
            for tensor in trainer.model.state_dict().values():
                dist.broadcast(tensor, src=0)
        self.averager = Averager(
            list(trainer.model.parameters()), self.outer_lr, self.outer_momentum
        )

    def allreduces(self) -> dict[str, int]:
        return {"parameters": self.param_allreduces, "flags": self.flag_allreduces}

    def rng_states(self, own: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank's, at a save before any rank steps again after an epoch (its end, the
        run's end); within an epoch rank 0's alone (see ``_snapshot``)."""
        if self._ranks is None:
            return [own]
        return [own, *(rng for rng, _ in self._ranks[1:])]

    def state_dict(self, fit: Fit) -> dict[str, Any]:
        outer = self.averager.state_dict()
        state = {**self.local.state_dict(), "outer": outer, "since_sync": self.since_sync}
        if self._ranks is not None:  # every rank's optimizer state: here it differs by rank
            state["ranks"] = [self.local.stepper.state_dict(), *(s for _, s in self._ranks[1:])]
        return state

    def load_state_dict(self, fit: Fit, state: dict[str, Any]) -> None:
        self.local.load_state_dict(fit, state)
        ranks = state.get("ranks")
        if ranks is not None and len(ranks) == self.world:  # else every rank takes rank 0's
            self.local.stepper.load_state_dict(ranks[self.rank])
        self.averager.load_state_dict(state.get("outer"))
        self.since_sync = int(state.get("since_sync", 0))

    def _snapshot(self, fit: Fit) -> list[tuple[dict[str, Any], dict[str, Any]]] | None:
        """Every rank's RNG and optimizer state as the epoch's training ends, on rank 0, for a
        checkpoint saved before the ranks step again. A collective, made where the ranks meet
        anyway, and only by runs that checkpoint. Saves within an epoch cannot gather: ranks
        save at equal step counts, but with unequal shards a rank out of data already waits at
        the next sync point, and its step count falls behind."""
        if not any(isinstance(cb, Checkpoint) for cb in fit.callbacks):
            return None
        gathered = self._gather((rng_state(), self.local.stepper.state_dict()))
        return gathered if self.is_main else None

    def train_epoch(self, fit: Fit) -> dict[str, float]:
        averages = self.local.epoch(fit, Periodic(self, fit), lambda: self._updated(fit))
        self.averager.finish()  # blocks: every rank leaves the epoch with the same weights
        self.param_allreduces += 1
        self.since_sync = 0
        self._ranks = self._snapshot(fit)
        return averages.result(self._reduce(averages.packed()))

    def _updated(self, fit: Fit) -> None:
        self.since_sync += 1
        self._ranks = None
        fit.after_update()
