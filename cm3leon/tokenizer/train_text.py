"""Command line: train the byte-level BPE on the texts of the built-in shapes world's documents.

    python -m cm3leon.tokenizer.train_text --examples 6000 --vocab-size 1024 --out runs/tokenizer/text.json

The corpus is every text segment of ``cm3leon.data.tasks.sft_examples`` (all task families, round-robin:
captions, edit instructions, VQA, grounding and structure prompts), so the vocabulary covers the demo's
templates.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from cm3leon._cli_args import int_at_least, output_file_error
from cm3leon.data import ShapesWorld
from cm3leon.data.tasks import sft_examples

from .text import TextTokenizer

__all__ = ["main", "shapes_corpus"]


def shapes_corpus(n_examples: int, seed: int = 0, image_size: int = 32) -> list[str]:
    """Text segments of ``n_examples`` shapes-world SFT examples (tasks round-robin)."""
    world = ShapesWorld(image_size=image_size, seed=seed)
    return [seg for ex in sft_examples(world, n_examples) for seg in ex.segments() if isinstance(seg, str)]


def main(argv: list[str] | None = None) -> TextTokenizer:
    """Parses arguments, trains, saves; returns the tokenizer."""
    p = argparse.ArgumentParser(prog="python -m cm3leon.tokenizer.train_text", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int_at_least(1), default=6000,
                   help="shapes-world examples in the corpus")
    # 256 byte symbols are the smallest byte-level vocabulary (TextTokenizer.train's own bound)
    p.add_argument("--vocab-size", type=int_at_least(256), default=1024,
                   help="BPE vocabulary size (paper: 56320)")
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--out", type=Path, default=Path("runs/tokenizer/text.json"))
    args = p.parse_args(argv)
    if (problem := output_file_error(args.out)) is not None:  # checked before training, not after
        p.error(f"--out {args.out}: {problem}")
    corpus = shapes_corpus(args.examples, seed=args.seed)
    tok = TextTokenizer.train(corpus, vocab_size=args.vocab_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(args.out)
    n_tokens = sum(len(ids) for ids in tok.encode_batch(corpus))
    print(json.dumps({"texts": len(corpus), "vocab_size": tok.vocab_size,
                      "bytes_per_token": sum(len(t.encode()) for t in corpus) / max(1, n_tokens)}))
    return tok


if __name__ == "__main__":
    main()
