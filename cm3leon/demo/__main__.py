"""``python -m cm3leon.demo [--out out/demo] [--scale demo|study|toy]``: the whole recipe end to end."""
from __future__ import annotations

import argparse
import sys

from cm3leon._cli_args import output_dir_error

from .run import run_demo
from .scales import SCALES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cm3leon.demo", description=__doc__)
    parser.add_argument("--out", default="out/demo", help="run folder (rerunning skips finished stages)")
    parser.add_argument("--scale", default="demo", choices=sorted(SCALES), help="how big a run (default: demo)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if (problem := output_dir_error(args.out)) is not None:  # a traceback at the first stage otherwise
        parser.error(f"--out {args.out}: {problem}")
    try:
        run_demo(args.out, args.scale, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted: rerun the same command to resume from {args.out}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
