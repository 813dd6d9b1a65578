"""Time and size of a full training checkpoint (model + AdamW state + trainer state) on one process.

Cases: the demo preset (vocabulary of the demo shapes corpus) and the paper's 350M preset. ``save`` writes
``step-N`` with :class:`CheckpointManager` (DCP + manifest + atomic rename); ``load`` restores it into a fresh
model and optimizer (what ``--resume`` does).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from cm3leon import CM3Leon, preset
from cm3leon.training.checkpointing import CheckpointManager
from cm3leon.training.runtime import Runtime, rng_state

CASES = {"demo": preset("demo", vocab_size=1557), "cm3leon-350m": preset("cm3leon-350m")}
ONE = Runtime(rank=0, world_size=1, device=torch.device("cpu"), owns_group=False)


def _model_and_optimizer(name: str):
    torch.manual_seed(0)
    model = CM3Leon(CASES[name])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():  # one step so the Adam moments exist, as in a running job
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("op", ["save", "load"])
def test_checkpoint(benchmark, bench_record, name, op):
    root = Path(tempfile.mkdtemp())
    model, optimizer = _model_and_optimizer(name)
    manager = CheckpointManager(root, keep=1, runtime=ONE)
    state = ({"step": 1, "tokens": 0, "bad_steps": 0, "skipped_steps": 0, "config": "{}"},
             {"rng": rng_state(), "loader": {}})
    manager.save(1, model, optimizer, *state)
    size = sum(p.stat().st_size for p in (root / "step-1").iterdir())
    params = f"{model.num_parameters() / 1e6:.0f}M params"
    bench_record(benchmark, case=f"checkpoint {op}: {name} ({params} + AdamW)",
                 impl="cm3leon", work=size, unit="GB/s", size_mib=round(size / 2**20, 1))
    if op == "save":
        benchmark.pedantic(lambda: manager.save(2, model, optimizer, *state), rounds=2, iterations=1)
    else:
        benchmark.pedantic(lambda: manager.load_latest(model, optimizer, log=lambda _: None), rounds=2,
                           iterations=1)
    shutil.rmtree(root)
