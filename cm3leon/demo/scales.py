"""How big each demo run is: ``toy`` (seconds; the test suite runs it), ``demo`` (``make demo``: about a
quarter of an hour on 2 CPU cores) and ``study`` (``make study``: longer training, three seeds, a
retrieval-free run beside the retrieval-augmented one)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DemoScale:
    """Sizes of one demo run.

    Attributes:
        model_preset: ``cm3leon.PRESETS`` name of the generator.
        image_tokenizer / image_tokenizer_steps: ``ImageTokenizerConfig`` preset and its training steps.
        text_vocab_size / text_examples: the BPE's size and training texts.
        documents: caption-image documents of the pretraining corpus (also the memory bank).
        encoder_steps: dual-encoder training steps.
        pretrain_steps / sft_steps: optimizer steps of each stage; tokens_per_batch: packed tokens per step.
        max_seq_len: longest training sequence.
        prompts: held-out prompts per evaluation row; samples: images per prompt in the decoding rows.
        guidance_scales: the CFG sweep.
        seeds: seeds of the whole recipe (the report gives each figure per seed and their spread).
        retrieval_free_run: also train without retrieval (the study's control).
    """

    model_preset: str
    image_tokenizer: str
    image_tokenizer_steps: int
    text_vocab_size: int
    text_examples: int
    documents: int
    encoder_steps: int
    pretrain_steps: int
    sft_steps: int
    tokens_per_batch: int
    max_seq_len: int
    prompts: int
    samples: int = 8
    guidance_scales: tuple[float, ...] = (1.0, 2.0, 3.0, 5.0, 7.0)
    seeds: tuple[int, ...] = (0,)
    retrieval_free_run: bool = False


SCALES: dict[str, DemoScale] = {
    "toy": DemoScale(model_preset="tiny", image_tokenizer="tiny", image_tokenizer_steps=4, text_vocab_size=300,
                     text_examples=200, documents=48, encoder_steps=3, pretrain_steps=3, sft_steps=2,
                     tokens_per_batch=512, max_seq_len=256, prompts=4, samples=2, guidance_scales=(1.0, 3.0)),
    "demo": DemoScale(model_preset="demo", image_tokenizer="demo", image_tokenizer_steps=700,
                      text_vocab_size=1024, text_examples=6000, documents=4000, encoder_steps=300,
                      pretrain_steps=1500, sft_steps=300, tokens_per_batch=2048, max_seq_len=512, prompts=32),
    "study": DemoScale(model_preset="demo", image_tokenizer="demo", image_tokenizer_steps=1500,
                       text_vocab_size=1024, text_examples=6000, documents=8000, encoder_steps=1000,
                       pretrain_steps=3000, sft_steps=600, tokens_per_batch=2048, max_seq_len=512, prompts=128,
                       seeds=(0, 1, 2), retrieval_free_run=True),
}
