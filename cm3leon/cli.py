"""The ``cm3leon`` command line (also ``python -m cm3leon``).

``cm3leon generate --checkpoint DIR --task TASK ...`` runs one generation task of :mod:`cm3leon.pipeline` and
writes a PNG grid (image tasks: one row per prompt, one column per sample, best first when re-ranked) or prints
text (caption, vqa, infill). ``cm3leon train ...`` hands its arguments to ``python -m cm3leon.training``.

Bad input (a missing checkpoint, an unreadable image or one of the wrong size or mode, a prompt longer than the
model's context, an unknown task or option) prints one ``cm3leon: error: ...`` line on stderr and exits with
status 2.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import runpy
import sys
from collections.abc import Sequence

import torch

__all__ = ["main"]

IMAGE_TASKS = ("text-to-image", "edit", "structure", "grounded")
TEXT_TASKS = ("caption", "vqa", "infill")
TASKS = IMAGE_TASKS + TEXT_TASKS
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cm3leon", description="CM3Leon generation and training.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    gen = sub.add_parser("generate", help="run a generation task of a checkpoint directory")
    gen.add_argument("--checkpoint", required=True, help="checkpoint directory (see docs/generation.md)")
    gen.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
    gen.add_argument("--prompt", action="append", default=[],
                     help="caption (text-to-image, structure), instruction (edit), question (vqa) or text with "
                          "<mask> spans (infill); repeat for several prompts")
    gen.add_argument("--image", action="append", default=[],
                     help="input PNG: the image to caption / question / edit, the structure condition, or an "
                          "image segment after the text (infill); repeat to pair with several prompts")
    gen.add_argument("--kind", choices=("edges", "segmentation"), help="structure task: the condition's kind")
    gen.add_argument("--box", action="append", default=[], metavar="DESCRIPTION:X0,Y0,X1,Y1",
                     help="grounded task: an object and its pixel box, e.g. 'large red circle:2,2,14,14'")
    gen.add_argument("--samples", type=int, default=8, help="images per prompt (image tasks)")
    gen.add_argument("--strategy", choices=("topp", "cdk", "mix"), default="mix",
                     help="image sampling: top-p + CFG, contrastive decoding, or half each")
    gen.add_argument("--guidance", type=float, default=None,
                     help="CFG scale (default 3; edit uses the image/text scales 1.5 and 7.5)")
    gen.add_argument("--retrieved", type=int, default=0, help="retrieved documents to prepend (needs a bank)")
    gen.add_argument("--no-rerank", action="store_true", help="keep sampling order (no image-text re-ranking)")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="text tasks: longest output")
    gen.add_argument("--temperature", type=float, default=None,
                     help="sampling temperature (default: 1 for images, 0 = greedy for text)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", help="PNG grid to write (image tasks)")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="model dtype for decoding")
    gen.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    gen.add_argument("--quiet", action="store_true", help="no progress bars")
    sub.add_parser("train", help="train a model (python -m cm3leon.training; arguments pass through)",
                   add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cm3leon`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["train"]:
            return _train(argv[1:])
        args = _parser().parse_args(argv)
        return _generate(args)
    except (UsageError, ValueError, TypeError, OSError, ImportError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"cm3leon: error: {message}", file=sys.stderr)
        return 2


def _train(argv: list[str]) -> int:
    if importlib.util.find_spec("cm3leon.training") is None:
        raise UsageError("cm3leon train needs the cm3leon.training package, which this installation lacks")
    saved = sys.argv
    sys.argv = ["cm3leon train", *argv]
    try:
        runpy.run_module("cm3leon.training", run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .generate import compile_decode_step
    from .pipeline import ImageDecoding, load_bundle
    from .pipeline.image_io import make_grid, read_image, write_png

    if args.task not in TASKS:
        raise UsageError(f"unknown task {args.task!r}; choose from {', '.join(TASKS)}")
    if args.task in IMAGE_TASKS and not args.out:
        raise UsageError(f"--task {args.task} writes images: give --out grid.png")
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise UsageError(f"--out {args.out}: its folder does not exist")
    if args.out and os.path.isdir(args.out):  # else an IsADirectoryError after all the sampling
        raise UsageError(f"--out {args.out}: is a folder; give the PNG file to write")
    if args.task == "grounded" and not args.box:
        raise UsageError("--task grounded needs --box, e.g. --box 'large red circle:2,2,14,14'")
    needs_prompt = args.task != "caption" and args.task != "grounded"
    if needs_prompt and not args.prompt:
        raise UsageError(f"--task {args.task} needs --prompt")
    needs_image = args.task in ("caption", "vqa", "edit", "structure")
    if needs_image and not args.image:
        raise UsageError(f"--task {args.task} needs --image")
    bundle = load_bundle(args.checkpoint, device=_device(args.device), dtype=DTYPES[args.dtype])
    pipe = bundle.pipeline(progress=not args.quiet,
                           decode_step=compile_decode_step(bundle.model) if args.compile else None)
    images = [read_image(path, pipe.image_size, name="--image") for path in args.image]
    decoding = ImageDecoding() if args.temperature is None else ImageDecoding(temperature=args.temperature)
    text_kwargs = dict(max_new_tokens=args.max_new_tokens, seed=args.seed,
                       temperature=0.0 if args.temperature is None else args.temperature)
    image_kwargs = dict(n_samples=args.samples, decoding=decoding, seed=args.seed)
    task = args.task
    if task == "text-to-image":
        rerank = not args.no_rerank and bundle.scorer is not None
        result = pipe.text_to_image(args.prompt, strategy=args.strategy, retrieved=args.retrieved, rerank=rerank,
                                    guidance_scale=3.0 if args.guidance is None else args.guidance, **image_kwargs)
    elif task == "edit":
        scales = (1.5, 7.5) if args.guidance is None else (1.5, args.guidance)
        result = pipe.edit(images, _paired(args.prompt, images), guidance_scale=scales, **image_kwargs)
    elif task == "structure":
        if args.kind is None:
            raise UsageError("--task structure needs --kind edges or --kind segmentation")
        result = pipe.structure_to_image(images, args.kind, _paired(args.prompt, images), strategy=args.strategy,
                                         guidance_scale=3.0 if args.guidance is None else args.guidance,
                                         **image_kwargs)
    elif task == "grounded":
        result = pipe.grounded([[_box(b) for b in args.box]], strategy=args.strategy,
                               guidance_scale=3.0 if args.guidance is None else args.guidance, **image_kwargs)
    elif task == "caption":
        _print_lines(pipe.image_to_text(images, retrieved=args.retrieved, **text_kwargs))
        return 0
    elif task == "vqa":
        _print_lines(pipe.answer(images, _paired(args.prompt, images), retrieved=args.retrieved, **text_kwargs))
        return 0
    else:  # infill: every prompt is a document's text, followed by the images (if any) as image segments
        results = pipe.infill([[p, *images] for p in args.prompt], **text_kwargs)
        _print_lines([r.segments[0] for r in results])
        return 0
    write_png(make_grid(result.images), args.out)
    print(f"wrote {result.images.shape[0]}x{result.images.shape[1]} images to {args.out}", file=sys.stderr)
    return 0


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device name (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: only cpu and cuda are supported")
    return device


def _paired(prompts: list[str], images: list[torch.Tensor]) -> list[str]:
    """One prompt for every image (a single prompt is shared)."""
    if len(prompts) == 1:
        return prompts * len(images)
    if len(prompts) != len(images):
        raise UsageError(f"give one --prompt per --image (or one for all): got {len(prompts)} and {len(images)}")
    return prompts


def _box(spec: str) -> tuple[str, tuple[int, int, int, int]]:
    description, _, coords = spec.rpartition(":")
    try:
        box = tuple(int(c) for c in coords.split(","))
    except ValueError:
        box = ()
    if not description.strip() or len(box) != 4:
        raise UsageError(f"--box must look like 'large red circle:2,2,14,14', got {spec!r}")
    return description.strip(), box


def _print_lines(lines: list[str]) -> None:
    for line in lines:
        print(line)
