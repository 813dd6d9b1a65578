"""Where the time of a CFG text -> image decode goes: share of matmuls, attention, sampling and the rest.

    python bench/profile_generate.py --case demo --dtype fp32 --impl cm3leon [--threads 1]

Profiles one warmed-up run of ``bench_generate``'s workload with ``torch.profiler`` and prints the top ops by
self CPU time and the share of the total spent in matmuls (``aten::mm``/``addmm``/``bmm``; inside a compiled
step, inductor's extern matmul calls are the same aten ops).
"""
from __future__ import annotations

import argparse

import torch
from bench_generate import CASES, DTYPES, IMPLS, runner
from torch.profiler import ProfilerActivity, profile

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int8pack_mm")
ATTENTION = ("cm3leon::flash_attn_kvcache", "aten::_scaled_dot_product_flash_attention_for_cpu")
SAMPLING = ("cm3leon::cfg_sample", "cm3leon::contrastive_sample", "aten::sort", "aten::multinomial",
            "aten::exponential_", "aten::softmax", "aten::_softmax", "aten::cumsum")


def shares(case: str, dtype: str, impl: str) -> dict[str, float]:
    run = runner(case, dtype, impl)
    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    for e in top:
        print(f"  {e.key:55s} {e.self_cpu_time_total / 1e3:9.1f} ms  {100 * e.self_cpu_time_total / total:5.1f}%  "
              f"{e.count} calls")
    pick = lambda names: sum(e.self_cpu_time_total for e in events if e.key in names) / total  # noqa: E731
    return {"matmul": pick(MATMULS), "attention": pick(ATTENTION), "sampling": pick(SAMPLING)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=list(CASES), default="demo")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--impl", choices=IMPLS, action="append")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for impl in args.impl or IMPLS:
        print(f"{args.case} {args.dtype} {impl} (threads {torch.get_num_threads()}):")
        result = shares(args.case, args.dtype, impl)
        print("  shares: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in result.items()))


if __name__ == "__main__":
    main()
