"""Trainer step vs bare train step, interleaved in one process on the same batches (the comparison that
survives a shared machine: both halves of each pair see the same load).

    PYTHONPATH=. python bench/trainer_overhead.py [cm3leon|torch-sdpa] [pairs] [--cpu]

A pair: ``next(loader)`` + ``Trainer.train_step`` (LR, loss scaling, forward, backward, clipping, AdamW), then
forward + ``CM3Leon.loss`` + backward on the same batch. ``--cpu`` times CPU seconds on one thread
(``time.process_time``) instead of wall seconds. Prints median tokens/s of both and the pair ratios.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_training import BACKENDS, VOCAB, _config, _RandomDocuments  # noqa: E402

from cm3leon.training.data import TrainingData  # noqa: E402
from cm3leon.training.trainer import Trainer  # noqa: E402


def main(argv: list[str]) -> None:
    cpu = "--cpu" in argv
    args = [a for a in argv if a != "--cpu"]
    impl = args[0] if args else "cm3leon"
    pairs = int(args[1]) if len(args) > 1 else 8
    if cpu:
        torch.set_num_threads(1)
    clock = time.process_time if cpu else time.perf_counter
    data = TrainingData(vocab_size=VOCAB, train=_RandomDocuments())
    trainer = Trainer(_config(tempfile.mkdtemp()), data=data, attention_backend=BACKENDS[impl])
    batches, model = iter(trainer.loader), trainer.model
    trainer_rates, bare_rates = [], []
    for i in range(pairs + 1):
        t0 = clock()
        batch = next(batches)
        trainer.train_step([batch])
        t1 = clock()
        model.zero_grad(set_to_none=True)
        model.loss(batch.tokens, batch.targets, batch.loss_weights, cu_seqlens=batch.cu_seqlens,
                   max_seqlen=batch.max_seqlen).backward()
        t2 = clock()
        model.zero_grad(set_to_none=True)
        if i:  # the first pair warms up
            n = batch.tokens.numel()
            trainer_rates.append(n / (t1 - t0))
            bare_rates.append(n / (t2 - t1))
    ratios = [a / b for a, b in zip(trainer_rates, bare_rates)]
    print(f"{impl}: trainer {statistics.median(trainer_rates):.0f} tok/s, "
          f"bare {statistics.median(bare_rates):.0f} tok/s, trainer/bare median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max "
          f"{max(ratios):.3f}), {'CPU time, ' if cpu else ''}threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main(sys.argv[1:])
