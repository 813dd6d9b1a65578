"""Prints the benchmark comparison table from a pytest-benchmark JSON file.

Usage: python bench/report.py .benchmarks/latest.json [--markdown]

For each case: every implementation's median time, its throughput, and the speedup of cm3leon over it
(baseline median / cm3leon median; > 1 means cm3leon is faster).
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from cm3leon.machine import describe_machine


def rows(data: dict) -> list[list[str]]:
    by_case: dict[str, list[dict]] = defaultdict(list)
    for b in data["benchmarks"]:
        by_case[b["group"] or b["name"]].append(b)
    out = []
    for case, items in by_case.items():
        ours = [b for b in items if b["extra_info"].get("impl") == "cm3leon"]
        ours_median = ours[0]["stats"]["median"] if ours else None
        for b in sorted(items, key=lambda b: b["extra_info"].get("impl") != "cm3leon"):
            info = b["extra_info"]
            median = b["stats"]["median"]
            rate = ""
            if info.get("work") and info.get("unit"):
                scale = {"G": 1e9, "T": 1e12}.get(info["unit"][0], 1.0)  # GFLOP/s, TFLOP/s, GB/s; tok/s
                rate = f"{info['work'] / median / scale:.1f} {info['unit']}"
            speedup = "" if ours_median is None or info.get("impl") == "cm3leon" else \
                f"{median / ours_median:.2f}x"
            notes = ", ".join(f"{k}={v}" for k, v in info.items()
                              if k not in ("impl", "work", "unit", "threads"))
            out.append([case, info.get("impl", b["name"]), f"{median * 1e3:.3f}", rate, speedup, notes])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", type=Path)
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table (for the README)")
    args = parser.parse_args()
    data = json.loads(args.json.read_text())
    header = ["case", "impl", "median ms", "throughput", "cm3leon speedup", "notes"]
    table = rows(data)
    print(f"machine: {describe_machine()}; torch threads: "
          f"{data['benchmarks'][0]['extra_info'].get('threads') if data['benchmarks'] else '?'}")
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for r in table:
            print("| " + " | ".join(r) + " |")
        return
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    for r in [header, ["-" * w for w in widths], *table]:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)))


if __name__ == "__main__":
    main()
