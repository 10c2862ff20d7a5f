"""Checkpoints: one directory per save, written atomically, loaded without unpickling objects.

Layout of a run directory::

    runs/digits/
      step-000000200/        model.safetensors, state.pt, trainer.json
      step-000000400/
      latest                 the name of the newest complete checkpoint (replaced last)
      best                   the name of the best one, when a monitor is set

A checkpoint is written into ``.tmp-…`` in the same parent, every file fsynced, then renamed to
its final name; only then is ``latest`` replaced (write, fsync, rename). A crash at any moment
leaves ``latest`` naming a complete checkpoint. A run directory holds one run: a run saves into
one that holds checkpoints only when it resumed from its ``latest`` (``claim``). ``state.pt``
holds tensors, numbers, strings and containers only and is read with
``torch.load(weights_only=True)``: a file that needs the unpickler to build arbitrary objects is
refused.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slipstream._core.errors import CheckpointError

FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
WEIGHTS, STATE, META = "model.safetensors", "state.pt", "trainer.json"


@dataclass(frozen=True)
class Loaded:
    """A checkpoint read back: model weights, tensor state and JSON metadata."""

    path: Path
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]
    meta: dict[str, Any]


def step_name(step: int) -> str:
    return f"step-{step:09d}"


def write(
    root: Path,
    name: str,
    weights: Mapping[str, torch.Tensor],
    state: Mapping[str, Any],
    meta: Mapping[str, Any],
) -> Path:
    """Write a complete checkpoint ``root/name`` and point ``latest`` at it."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    if not final.exists():  # else this run saved this step already, or resumed from it
        tmp = root / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(
            {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}, tmp / WEIGHTS
        )
        torch.save(dict(state), tmp / STATE)
        (tmp / META).write_text(json.dumps({"format": FORMAT, **meta}, indent=1))
        for f in (WEIGHTS, STATE, META):
            _fsync(tmp / f)
        _fsync(tmp)
        tmp.rename(final)
    point(root, "latest", name)
    return final


def point(root: Path, pointer: str, name: str) -> None:
    """Atomically make ``root/pointer`` name ``name``."""
    tmp = root / f".{pointer}.tmp-{os.getpid()}"
    tmp.write_text(name + "\n")
    _fsync(tmp)
    os.replace(tmp, root / pointer)
    _fsync(root)


def prune(root: Path, keep: int, protect: Iterable[str]) -> None:
    """Delete all but the newest ``keep`` checkpoints, never one named in ``protect``."""
    names = _names(root)
    for name in names[: max(len(names) - keep, 0)]:
        if name not in protect:
            shutil.rmtree(root / name, ignore_errors=True)


def clean_partial(root: Path) -> None:
    """Remove what a crashed writer left behind: temporary directories and pointer files, and
    checkpoints renamed into place after ``latest`` that a crash kept it from naming (the run
    that resumes redoes them)."""
    if not root.is_dir():
        return
    for p in root.glob(".*tmp-*"):
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    latest = _latest(root)
    for name in _names(root):
        if name > latest:
            shutil.rmtree(root / name, ignore_errors=True)


def claim(root: Path, resumed: Path | None) -> None:
    """Check that a run may save into ``root``: it holds no checkpoints, or the run continues
    from its ``latest`` (``resumed``: the checkpoint the run started from). Anything else would
    mix two runs' checkpoints, and a resume would quietly continue whichever ``latest`` named."""
    names = _names(root) if root.is_dir() else []
    latest = _latest(root)
    if not names or (resumed is not None and resumed.resolve() == (root / latest).resolve()):
        return
    held = f"{str(root)!r} already holds checkpoints up to {names[-1]}"
    if resumed is None:
        raise CheckpointError(
            f"{held} and this run starts afresh, so its checkpoints would mix with them. To "
            f"continue that run, resume it (`fit(resume={str(root)!r})`, `slipstream train "
            "--resume`); to start over, save into an empty directory or delete this one"
        )
    raise CheckpointError(
        f"{held} and this run resumed from {str(resumed)!r}, not from that directory's latest "
        f"({latest}), so its checkpoints would mix with them. Give Checkpoint another "
        "directory for this run"
    )


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if _STEP_DIR.match(p.name))


def _latest(root: Path) -> str:
    """The name ``latest`` holds; "" (before every name) when there is none."""
    pointer = root / "latest"
    return pointer.read_text().strip() if pointer.is_file() else ""


def resolve(path: str | os.PathLike[str]) -> Path:
    """A checkpoint directory from itself or from a run directory (through ``latest``)."""
    p = Path(path)
    if (p / WEIGHTS).is_file():
        return p
    pointer = p / "latest"
    if not pointer.is_file():
        raise CheckpointError(
            f"{str(p)!r} is neither a checkpoint (no {WEIGHTS}) nor a run directory with a "
            "'latest' pointer; pass the directory a Checkpoint callback wrote to"
        )
    target = p / pointer.read_text().strip()
    if not (target / WEIGHTS).is_file():
        raise CheckpointError(f"{str(pointer)!r} names {target.name!r}, which is not complete")
    return target


def read(path: str | os.PathLike[str]) -> Loaded:
    """Read the checkpoint at ``path`` (a checkpoint or a run directory)."""
    where = resolve(path)
    try:
        weights = load_file(where / WEIGHTS)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{str(where / WEIGHTS)!r} is not a readable safetensors file: {e}"
        ) from e
    meta = _read_meta(where / META)
    state = _read_state(where / STATE) if (where / STATE).exists() else {}
    return Loaded(where, weights, state, meta)


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{str(path)!r} is missing or not JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a slipstream checkpoint of format {FORMAT}")
    return meta


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{str(path)!r} carries a pickled Python object, and loading it would run code from "
            "the file; slipstream loads checkpoints only as tensors, numbers and strings "
            f"(torch.load(weights_only=True)) and refuses this one. Detail: {str(e)[:300]}"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r} must hold a dict; got {type(state).__name__}")
    return state


def load_weights(path: str | os.PathLike[str], model: torch.nn.Module) -> torch.nn.Module:
    """Load a checkpoint's weights into ``model`` for inference; returns ``model``.

    >>> ss.load_weights("runs/digits", model).eval()
    """
    weights = read(path).weights if not str(path).endswith(".safetensors") else load_file(path)
    apply_weights(model, weights, str(path))
    return model


def apply_weights(model: torch.nn.Module, weights: Mapping[str, torch.Tensor], where: str) -> None:
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    wrong = [k for k in own if k in weights and own[k].shape != weights[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"the weights in {where!r} do not fit this model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}; build the model with the "
            "same architecture as the run that saved them"
        )
    model.load_state_dict(dict(weights))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
