"""Worker processes of the multi-process trainer tests (spawned; gloo on CPU, one kernel thread each)."""
from __future__ import annotations

import datetime
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from training_fakes import fake_data

from cm3leon.training import load_config


def config(out, *extra):
    return load_config("tiny-pretrain", [f"out_dir='{out}'", "schedule.steps=4", "checkpoint.every=0",
                                         "logging.val_every=2", *extra])


def use_fake_loader() -> None:
    import cm3leon.training.trainer as trainer_module
    from training_fakes import GreedyLoader

    def make(source, config, *, seed, rank, world_size):
        return GreedyLoader(source, tokens_per_batch=config.data.tokens_per_batch,
                            max_seq_len=config.data.max_seq_len, seed=seed, rank=rank, world_size=world_size)

    trainer_module.make_loader = make


def full_state(trainer) -> dict[str, torch.Tensor]:
    """Full (unsharded) model and optimizer state, flattened to name -> tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer,
                                        options=StateDictOptions(full_state_dict=True))
    flat = {f"model.{k}": v for k, v in model_sd.items()}
    for name, state in optim_sd["state"].items():
        for key, value in state.items():
            flat[f"optim.{name}.{key}"] = value
    return {k: v.detach().clone() for k, v in flat.items()}


def fit(cfg, *, resume=False, stop_after=None):
    from cm3leon.training.trainer import Trainer

    trainer = Trainer(cfg, data=fake_data())
    if stop_after is not None:
        step = trainer.train_step

        def step_then_signal(batches):
            result = step(batches)
            if trainer.step == stop_after - 1 and trainer.runtime.rank == 0:  # only rank 0 is signalled
                os.kill(os.getpid(), signal.SIGTERM)
            return result

        trainer.train_step = step_then_signal
    summary = trainer.fit(resume=resume)
    return trainer, summary


def worker(rank: int, world: int, out: str, job: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        torch.set_num_threads(1)
        use_fake_loader()
        out_dir = Path(out)
        results = {}
        if job == "parallel":
            for mode in ("ddp", "fsdp"):
                trainer, _ = fit(config(out_dir / mode, f"parallel.mode='{mode}'"))
                results[mode] = full_state(trainer)
        elif job == "resume":
            mode = "parallel.mode='fsdp'"
            trainer, _ = fit(config(out_dir / "full", mode))
            results["full"] = full_state(trainer)
            _, summary = fit(config(out_dir / "cut", mode), stop_after=2)
            results["stopped_at"] = summary["step"]
            trainer, _ = fit(config(out_dir / "cut", mode), resume=True)
            results["resumed"] = full_state(trainer)
            # a one-process checkpoint (written by the parent) continued on two processes
            trainer, _ = fit(config(out_dir / "from1", mode), resume=True)
            results["from1"] = full_state(trainer)
        if rank == 0:
            torch.save(results, out_dir / f"{job}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Done and checked: leave without interpreter teardown. Destroying the trainers' leftover gloo/FSDP state
    # there sometimes aborted a rank (std::terminate on a still-joinable worker thread, "terminate called
    # without an active exception") after all the work had finished.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
