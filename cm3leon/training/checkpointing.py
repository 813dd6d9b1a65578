"""Training checkpoints on ``torch.distributed.checkpoint`` (DCP), written atomically, resumable at any
world size.

Layout of ``<root>/step-N/``::

    .metadata, __*_*.distcp   DCP: model and optimizer state (sharded as trained; DCP reshards on load)
    trainer.pt                 rank 0: step and token counters, non-finite-step counter, world size, config
    rank-R.pt                  per rank: its RNG states (torch, CUDA, numpy, python) and data-loader state
    manifest.json              every file with its size; written last

A checkpoint is written to ``step-N.tmp`` and renamed to ``step-N`` only when every rank has finished and
the manifest is on disk, so a crash, a full disk or an unwritable folder never leaves a ``step-N`` that
looks complete, and never touches older checkpoints. The newest ``keep`` checkpoints are kept.
:meth:`CheckpointManager.load_latest` takes the newest checkpoint that passes its manifest check and loads
without error, warning about (and skipping) damaged ones.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from .runtime import Runtime

__all__ = ["CheckpointError", "CheckpointManager", "Restored", "load_model_weights"]

_STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
TRAINER_FILE = "trainer.pt"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (the previous ones are intact) or none could be read."""


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it assumes a single process when there is no process group: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore",
                                message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _rank_file(rank: int) -> str:
    return f"rank-{rank}.pt"


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the complete-looking ``step-N`` folders under ``root``, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def _check_manifest(folder: Path) -> None:
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST}")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{folder}: unreadable {MANIFEST}: {err}") from None
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder}: missing {name}")
        if path.stat().st_size != size:
            raise CheckpointError(f"{folder}: {name} has {path.stat().st_size} bytes, the manifest says "
                                  f"{size}")


def _write_manifest(folder: Path) -> None:
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    tmp = folder / (MANIFEST + ".part")
    with open(tmp, "w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(folder / MANIFEST)


class Restored(NamedTuple):
    """What :meth:`CheckpointManager.load_latest` hands back besides the model and optimizer state."""

    folder: Path
    trainer: dict[str, Any]          # rank 0's counters, config and the saving world size
    rank: dict[str, Any] | None      # this rank's RNG and loader state (None: no such rank in the saved run)
    all_ranks: list[dict[str, Any]]  # every saved rank's, for resuming at another world size


class CheckpointManager:
    """Saves and restores the whole training state under ``root`` (``step-N`` folders, newest ``keep`` kept).

    ``model`` and ``optimizer`` may be plain, DDP-wrapped-inner or FSDP2-sharded: their state goes through
    ``torch.distributed.checkpoint.state_dict``, so a checkpoint written by N ranks loads on M ranks.
    """

    def __init__(self, root: str | os.PathLike, keep: int, runtime: Runtime) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.runtime = runtime

    # ---- save ---------------------------------------------------------------------------------------------
    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             trainer_state: dict[str, Any], rank_state: dict[str, Any]) -> Path:
        """Writes ``step-N``. ``trainer_state`` comes from rank 0, ``rank_state`` from every rank. On any
        rank's failure the partial folder is removed on every rank and :class:`CheckpointError` raised."""
        rt = self.runtime
        final = self.root / f"step-{step}"
        tmp = self.root / f"step-{step}.tmp"
        error = None
        try:
            if rt.is_main:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
                tmp.mkdir()
        except OSError as err:
            error = err
        self._agree(error, tmp, "create")
        model_sd, optim_sd = get_state_dict(model, optimizer)
        try:
            with _single_process_quiet():
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
            torch.save(rank_state, tmp / _rank_file(rt.rank))
            if rt.is_main:
                torch.save({**trainer_state, "world_size": rt.world_size}, tmp / TRAINER_FILE)
        except Exception as err:  # noqa: BLE001 - any failure of any rank must abort the save on all ranks
            error = err
        self._agree(error, tmp, "write")
        try:
            if rt.is_main:
                _write_manifest(tmp)
                if final.exists():  # the same step saved again (e.g. a stop right after a resume)
                    shutil.rmtree(final)
                tmp.rename(final)
                self._prune()
        except OSError as err:
            error = err
        self._agree(error, tmp, "finish")
        return final

    def _agree(self, error: BaseException | None, tmp: Path, what: str) -> None:
        """All ranks learn whether any failed; on failure the partial folder goes and every rank raises."""
        failed = torch.tensor([0 if error is None else 1])
        self.runtime.all_reduce(failed)
        if failed.item():
            self.runtime.barrier()
            if self.runtime.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            reason = f": {error}" if error is not None else " on another rank"
            raise CheckpointError(f"saving checkpoint {tmp.name} failed ({what}){reason}; older checkpoints "
                                  f"in {self.root} are untouched") from error
        self.runtime.barrier()

    def _prune(self) -> None:
        for _, folder in step_dirs(self.root)[self.keep:]:
            shutil.rmtree(folder, ignore_errors=True)

    # ---- load ---------------------------------------------------------------------------------------------
    def load_latest(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    log: Callable[[str], None] = print) -> Restored | None:
        """Restores model and optimizer from the newest usable checkpoint and returns the rest of its state,
        or None when there is no checkpoint at all. Damaged checkpoints are skipped with a warning; if every
        one is damaged, :class:`CheckpointError` is raised."""
        candidates = self.runtime.broadcast_object([p for _, p in step_dirs(self.root)])
        if not candidates:
            return None
        for folder in candidates:
            error = None
            try:
                _check_manifest(folder)
                result = self._load(folder, model, optimizer)
            except Exception as err:  # noqa: BLE001 - a damaged checkpoint shows up as any kind of error
                error, result = err, None
            failed = torch.tensor([0 if error is None else 1])
            self.runtime.all_reduce(failed)
            if not failed.item():
                log(f"resumed from {folder}")
                return result
            message = f"skipping damaged checkpoint {folder}: {error or 'failed on another rank'}"
            warnings.warn(message, stacklevel=2)
            log(message)
        raise CheckpointError(f"no usable checkpoint under {self.root} (all {len(candidates)} are damaged)")

    def _load(self, folder: Path, model, optimizer) -> Restored:
        trainer_state = torch.load(folder / TRAINER_FILE, weights_only=False)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        ranks = [torch.load(folder / _rank_file(r), weights_only=False)
                 for r in range(trainer_state["world_size"])]
        mine = ranks[self.runtime.rank] if self.runtime.rank < len(ranks) else None
        return Restored(folder, trainer_state, mine, ranks)


def load_model_weights(model: torch.nn.Module, source: str | os.PathLike, runtime: Runtime) -> Path:
    """Initialises ``model``'s weights (only) from a training checkpoint: a ``step-N`` folder, or a folder of
    them (the newest complete one is used), or a ``cm3leon.save`` ``.safetensors`` file. Returns the path
    used. Used to start SFT from a pretraining run."""
    path = Path(source)
    if path.is_file():
        # cm3leon.load checks the file's format, config and checksums (a damaged file used to load silently)
        # and raises cm3leon.CheckpointError (a ValueError) naming it.
        from cm3leon.checkpoint import load

        full = load(path).state_dict()
        expected = {name: tuple(t.shape) for name, t in get_model_state_dict(model).items()}
        found = {name: tuple(t.shape) for name, t in full.items()}
        if found != expected:
            diff = sorted(n for n in expected.keys() | found.keys() if expected.get(n) != found.get(n))
            raise ValueError(f"checkpoint.init_from={str(source)!r}: its weights do not fit the model "
                             f"(e.g. {diff[0]!r}: {found.get(diff[0])} in the file, {expected.get(diff[0])} "
                             f"in the model)")
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True))
        return path
    if not _STEP_DIR.match(path.name):
        dirs = step_dirs(path)
        if not dirs:
            raise ValueError(f"checkpoint.init_from={str(source)!r}: no step-N checkpoint folder or "
                             ".safetensors file there")
        path = dirs[0][1]
    _check_manifest(path)
    state = {"model": get_model_state_dict(model)}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    return path
