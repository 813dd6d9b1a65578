"""Train step of a model with and without the fused linear + cross-entropy head loss.

    PYTHONPATH=. python bench/loss_train_step.py [preset] [vocab_size] [tokens] [pairs]

A step is forward + ``CM3Leon.loss`` + backward on one packed batch of random documents. "fused" is the model
as shipped (``cm3leon_kernels.linear_cross_entropy``); "plain" makes ``CM3Leon.loss`` take its plain
``F.linear`` + ``F.cross_entropy`` path. Steps of both are interleaved (pairs), so both see the same machine
load (one model serves both); peak memory is measured per step in a fresh process (bench/memory.py).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from memory import peak_extra_mib  # noqa: E402

import cm3leon.model as model_module  # noqa: E402
from cm3leon.config import preset  # noqa: E402


def _model_and_batch(name: str, vocab: int, tokens: int):
    torch.manual_seed(0)
    model = model_module.CM3Leon(preset(name, vocab_size=vocab)).train()
    length = min(tokens, model.config.max_seq_len)
    lengths = [length] * (tokens // length)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    n = int(cu[-1])
    batch = torch.randint(0, vocab, (n,)), torch.randint(0, vocab, (n,)), torch.ones(n)
    return model, batch, cu, length


def _step(mode: str, model, batch, cu, max_seqlen: int):
    supports = model_module.ck.linear_cross_entropy_supports

    def step():
        model_module.ck.linear_cross_entropy_supports = supports if mode == "fused" else (lambda w: False)
        try:
            model.zero_grad(set_to_none=True)
            model.loss(*batch, cu_seqlens=cu, max_seqlen=max_seqlen).backward()
        finally:
            model_module.ck.linear_cross_entropy_supports = supports
    return step


def make_step(mode: str, name: str, vocab: int, tokens: int):
    """A zero-argument train step of ``mode`` ("fused" or "plain") on fixed inputs."""
    return _step(mode, *_model_and_batch(name, vocab, tokens))


def main(argv: list[str]) -> None:
    name = argv[0] if argv else "demo"
    vocab = int(argv[1]) if len(argv) > 1 else 8192
    tokens = int(argv[2]) if len(argv) > 2 else 2048
    pairs = int(argv[3]) if len(argv) > 3 else 5
    modes = ("fused", "plain")
    print(f"{name} vocab={vocab} tokens={tokens} threads={torch.get_num_threads()}")
    # Memory first, one fresh process at a time; then one model in this process serves both modes, so a
    # large preset needs memory for one model only.
    mib = {mode: peak_extra_mib("loss_train_step:make_step", mode, name, vocab, tokens) for mode in modes}
    model, batch, cu, max_seqlen = _model_and_batch(name, vocab, tokens)
    steps = {mode: _step(mode, model, batch, cu, max_seqlen) for mode in modes}
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    for i in range(pairs + 1):
        for mode, step in steps.items():
            t0 = time.perf_counter()
            step()
            if i:  # the first pair warms up
                rates[mode].append(tokens / (time.perf_counter() - t0))
    ratios = [f / p for f, p in zip(rates["fused"], rates["plain"])]
    for mode in modes:
        print(f"  {mode}: {statistics.median(rates[mode]):.0f} tok/s, step peak extra {mib[mode]} MiB")
    print(f"  fused/plain tok/s: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main(sys.argv[1:])
