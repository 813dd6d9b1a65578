"""Command line: train the image tokenizer on the built-in shapes world and evaluate it on held-out scenes.

    python -m cm3leon.tokenizer.train_image --steps 1500 --out runs/tokenizer

Writes ``<out>/image_tokenizer.safetensors`` (checkpoint), ``<out>/train_log.json`` (loss history) and
``<out>/eval.json`` (held-out PSNR, training time, and the share of decoded reconstructions that the shapes
scorer ``cm3leon.data.metrics.prompt_alignment`` reads exactly as their scene).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cm3leon._cli_args import int_at_least, output_dir_error, positive_float
from cm3leon.data import ShapesWorld
from cm3leon.data.metrics import prompt_alignment

from .image import ImageTokenizer
from .image_config import ImageTokenizerConfig
from .image_training import train_image_tokenizer
from .metrics import psnr

__all__ = ["evaluate", "main"]

HELD_OUT_SEED_OFFSET = 1_000_003  # held-out scenes come from a different world seed than training scenes


def evaluate(tokenizer: ImageTokenizer, world, n: int) -> dict[str, float]:
    """Held-out PSNR (on uint8 reconstructions, what a consumer sees) and the scorer's read rate of the
    reconstructions (objects read exactly as the scene's)."""
    images = world.images(n, start=0)
    recon = tokenizer.reconstruct(images, as_uint8=True)
    values = psnr(images, recon)
    result: dict[str, float] = {"heldout_images": n, "psnr_mean_db": float(values.mean()),
                                "psnr_median_db": float(values.median()), "psnr_min_db": float(values.min()),
                                # the whole set as one image: PSNR of the mean squared error
                                "psnr_of_mean_mse_db": float(psnr(images.reshape(1, -1), recon.reshape(1, -1))[0])}
    result.update(_scorer_rates(world, recon, n))
    return result


def _scorer_rates(world, recon: torch.Tensor, n: int) -> dict[str, float]:
    """Share of reconstructions the shapes scorer reads back exactly as their scene (prompt alignment 1.0),
    and the mean alignment."""
    scores = [prompt_alignment(recon[i], scene) for i, scene in enumerate(world.scenes(n, start=0))]
    return {"scorer_read_rate": sum(s == 1.0 for s in scores) / n,
            "scorer_mean_alignment": sum(scores) / n}


def main(argv: list[str] | None = None) -> dict:
    """Parses arguments, trains, saves, evaluates; returns the evaluation dict (also written to eval.json)."""
    p = argparse.ArgumentParser(prog="python -m cm3leon.tokenizer.train_image", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo", help="ImageTokenizerConfig preset (demo, paper, tiny)")
    p.add_argument("--steps", type=int_at_least(1), default=1500)
    p.add_argument("--batch-size", type=int_at_least(1), default=64)
    p.add_argument("--lr", type=positive_float, default=2e-3)
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--threads", type=int_at_least(0), default=0,
                   help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--eval-images", type=int_at_least(1), default=500,
                   help="held-out scenes for PSNR / scorer")
    p.add_argument("--out", type=Path, default=Path("runs/tokenizer"))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help="override a config field, e.g. --set codebook_size=1024 --set 'channel_mult=[1,2]'")
    args = p.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            p.error(f"--set {item}: the value must be JSON, e.g. --set codebook_size=1024")
    try:  # an unknown preset or field, or a value out of range, is a bad argument: found before training
        config = ImageTokenizerConfig.preset(args.preset, **overrides)
    except (TypeError, ValueError) as err:
        p.error(f"--preset/--set: {err}")
    if (problem := output_dir_error(args.out)) is not None:
        p.error(f"--out {args.out}: {problem}")
    if args.threads:
        torch.set_num_threads(args.threads)

    world = ShapesWorld(image_size=config.image_size, seed=args.seed)
    heldout = ShapesWorld(image_size=config.image_size, seed=args.seed + HELD_OUT_SEED_OFFSET)
    cpu0 = time.process_time()  # CPU time next to wall time: on shared cores wall time alone misleads
    result = train_image_tokenizer(config, world, args.steps, batch_size=args.batch_size, lr=args.lr,
                                   seed=args.seed, progress=not args.no_progress)
    train_cpu_seconds = time.process_time() - cpu0
    args.out.mkdir(parents=True, exist_ok=True)
    result.tokenizer.save(args.out / "image_tokenizer.safetensors")
    (args.out / "train_log.json").write_text(json.dumps(result.history, indent=1))
    t0 = time.perf_counter()
    metrics = evaluate(result.tokenizer, heldout, args.eval_images)
    metrics.update(train_seconds=result.seconds, train_cpu_seconds=train_cpu_seconds,
                   eval_seconds=time.perf_counter() - t0, steps=args.steps,
                   batch_size=args.batch_size, threads=torch.get_num_threads(), config=config.to_dict())
    (args.out / "eval.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps({k: v for k, v in metrics.items() if k != "config"}, indent=1))
    return metrics


if __name__ == "__main__":
    main()
