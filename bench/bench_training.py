"""Trainer throughput against the bare packed train step of the same model (bench_model.py's case).

The bare step is forward + weighted cross entropy + backward on one 2048-token packed batch. The trainer case
is one step of the trainer over the same geometry (2048-token budgets of 100-400-token sequences, drawn
through the real packed loader), so its extra time is the loader and packing, AdamW, gradient clipping, the LR
schedule and the step's bookkeeping. Both with our kernels and with PyTorch SDPA attention.
"""
from __future__ import annotations

import shutil
import tempfile

import pytest
import torch

from cm3leon import CM3Leon
from cm3leon.baselines import SDPA
from cm3leon.model import KERNELS
from cm3leon.objective import CM3Example
from cm3leon.training import load_config
from cm3leon.training.data import TrainingData
from cm3leon.training.trainer import Trainer

BACKENDS = {"cm3leon": KERNELS, "torch-sdpa": SDPA}
VOCAB = 1024
TOKENS = 2048
STEPS = 1000


class _RandomDocuments:
    """Example ``i``: 100-400 random tokens (the lengths bench_model.py packs), all weighted."""

    def __len__(self) -> int:
        return 10_000

    def __getitem__(self, i: int) -> CM3Example:
        g = torch.Generator().manual_seed(i)
        n = int(torch.randint(100, 400, (1,), generator=g))
        return CM3Example(torch.randint(0, VOCAB, (n,), generator=g), torch.ones(n), 0)


def _config(out: str):
    return load_config("demo-pretrain", [f"out_dir='{out}'", f"schedule.steps={STEPS}", "schedule.warmup=1",
                                         "checkpoint.every=0", "checkpoint.export=false", "logging.every=1",
                                         "logging.val_every=0", "logging.progress=false",
                                         "logging.plot=false",
                                         f"data.tokens_per_batch={TOKENS}",
                                         "model.overrides.zero_init_output_proj=false"])


@pytest.mark.parametrize("impl", list(BACKENDS))
def test_trainer_step(benchmark, bench_record, impl):
    """One trainer step: the next packed batch from the loader, then ``Trainer.train_step`` (LR, loss
    scaling, forward, backward, clipping, AdamW, counters)."""
    out = tempfile.mkdtemp()
    trainer = Trainer(_config(out), data=TrainingData(vocab_size=VOCAB, train=_RandomDocuments()),
                      attention_backend=BACKENDS[impl])
    batches = iter(trainer.loader)
    trained = []

    def step():
        batch = next(batches)
        trained.append(int(batch.tokens.numel()))
        trainer.train_step([batch])

    step()
    bench_record(benchmark, case="train step: demo preset, 2048 packed tokens", impl=f"trainer/{impl}",
                 work=TOKENS, unit="tok/s")
    benchmark.pedantic(step, rounds=5, iterations=1)
    # throughput on the tokens actually trained (the loader leaves part of each budget unused)
    benchmark.extra_info["work"] = sum(trained[1:]) / len(trained[1:])
    shutil.rmtree(out, ignore_errors=True)


@pytest.mark.parametrize("impl", list(BACKENDS))
def test_bare_train_step(benchmark, bench_record, impl):
    """Forward + CM3Leon.loss + backward of one 2048-token packed batch, nothing else (bench_model.py's
    train step, with the loss the trainer uses)."""
    torch.manual_seed(0)
    arch = load_config("demo-pretrain").model.architecture(VOCAB).replace(zero_init_output_proj=False)
    model = CM3Leon(arch, attention_backend=BACKENDS[impl]).train()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(100, 400, (64,), generator=g)
    lengths = lengths[: int((lengths.cumsum(0) <= TOKENS).sum())]
    lengths[-1] += TOKENS - lengths.sum()
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).int()])
    tokens = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    weights = torch.ones(TOKENS)

    def step():
        model.zero_grad(set_to_none=True)
        model.loss(tokens, tokens.roll(-1), weights, cu_seqlens=cu, max_seqlen=int(lengths.max())).backward()

    step()
    bench_record(benchmark, case="train step: demo preset, 2048 packed tokens", impl=f"bare/{impl}",
                 work=TOKENS, unit="tok/s")
    benchmark.pedantic(step, rounds=3, iterations=1)
