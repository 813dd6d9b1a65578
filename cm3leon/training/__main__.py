"""Command line of the trainer.

    python -m cm3leon.training --config demo-pretrain [--set optim.lr=3e-4 ...] [--resume]
    torchrun --nproc-per-node 2 -m cm3leon.training --config demo-pretrain --set parallel.mode=ddp
    python -m cm3leon.training --config demo-pretrain --print-config > run.toml  # edit; --config run.toml
    python -m cm3leon.training --plot runs/demo-pretrain                         # loss.png from metrics

Exit status: 0 when training finished, 128 + signal number when SIGTERM/SIGINT stopped it (after saving a
checkpoint; run again with ``--resume``), 2 for a bad config or command line, 1 on other errors (e.g. too
many non-finite steps).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cm3leon._cli_args import output_dir_error

from .config import PRESETS, TrainingConfig, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cm3leon.training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo-pretrain",
                        help=f"a preset ({', '.join(PRESETS)}) or a .toml/.json file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config value (TOML value syntax), e.g. --set optim.lr=3e-4")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as TOML and exit")
    parser.add_argument("--plot", type=Path, metavar="RUN_DIR", help="write RUN_DIR/loss.png and exit")
    args = parser.parse_args(argv)
    if args.plot is not None:
        from .observe import plot_metrics

        metrics = args.plot / "metrics.jsonl"
        if not metrics.is_file():  # a bad argument: exit status 2, not a traceback
            parser.error(f"--plot {args.plot}: no metrics.jsonl there")
        print(plot_metrics(metrics, args.plot / "loss.png"))
        return 0
    try:
        config = load_config(args.config, args.overrides)
    except (TypeError, ValueError) as err:  # a bad config stops here, before any work, with exit status 2
        parser.error(str(err))
    if args.print_config:
        sys.stdout.write(config.to_toml())
        return 0
    if (problem := _path_error(config)) is not None:
        parser.error(problem)
    from .runtime import LaunchError
    from .trainer import Trainer

    try:
        trainer = Trainer(config)
    except LaunchError as err:  # e.g. parallel.mode='ddp' without torchrun: a command-line mistake
        parser.error(str(err))
    try:
        summary = trainer.fit(resume=args.resume)
    finally:
        trainer.close()
    if trainer.runtime.is_main:
        print(json.dumps(summary))
    return 128 + summary["interrupted"] if summary["interrupted"] else 0


def _path_error(config: TrainingConfig) -> str | None:
    """The first config path that cannot work, named with its key: an output folder blocked by a file or
    not writable, or a missing input. Found here, before the data is prepared (minutes), not as a traceback
    later."""
    outputs = {"out_dir": (config.out_dir, True),
               # an existing corpus folder is only read (its tokenizers are reused)
               "data.corpus_dir": (config.data.corpus_dir, not Path(config.data.corpus_dir).is_dir())}
    for key, (path, writable) in outputs.items():
        if (problem := output_dir_error(path, writable=writable)) is not None:
            return f"{key}={path!r}: {problem}"
    # (a missing checkpoint.init_from is the Trainer's LaunchError)
    inputs = {"data.memory_bank": config.data.memory_bank,
              "data.retrieval_encoder": config.data.retrieval_encoder}
    if config.data.source == "folder":  # webdataset shards may be brace patterns or URLs: not checked here
        inputs["data.path"] = config.data.path
    for key, path in inputs.items():
        if path and not Path(path).exists():
            return f"{key}={path!r}: no such file or folder"
    return None


if __name__ == "__main__":
    sys.exit(main())
