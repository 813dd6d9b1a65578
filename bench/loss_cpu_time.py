"""One-thread CPU time of the fused linear + cross-entropy against F.linear + F.cross_entropy.

    PYTHONPATH=.:bench python bench/loss_cpu_time.py [tokens] [repeats]

Builds bench_loss.py's inputs (D 1024, V 65536, fp32) for ``tokens`` tokens, pins torch to one thread, warms
both implementations up, then times ``repeats`` alternating calls of each with ``time.process_time`` (CPU time
is far less sensitive to other jobs on the machine than wall time) and prints the best of each and the ratio,
for forward + backward and for forward only.
"""
from __future__ import annotations

import sys
import time

import torch
from bench_loss import IMPLS, MODES, make_call

from cm3leon.machine import describe_machine


def best_cpu_seconds(calls: dict, repeats: int) -> dict[str, float]:
    """Best process_time of each zero-argument call over ``repeats`` alternating rounds (after a warm-up)."""
    for call in calls.values():
        call()
    best = {name: float("inf") for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            t0 = time.process_time()
            call()
            best[name] = min(best[name], time.process_time() - t0)
    return best


def main(argv: list[str]) -> None:
    tokens = int(argv[0]) if argv else 1152
    repeats = int(argv[1]) if len(argv) > 1 else 3
    torch.set_num_threads(1)
    print(f"{describe_machine()}; T {tokens}, D 1024, V 65536, fp32, 1 thread, best of {repeats}")
    ours, theirs = IMPLS
    for mode in MODES:
        best = best_cpu_seconds({impl: make_call(impl, mode, tokens, 1024, 65536) for impl in IMPLS}, repeats)
        print(f"  {mode}: {ours} {best[ours]:.2f} s, {theirs} {best[theirs]:.2f} s, "
              f"speed-up {best[theirs] / best[ours]:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
