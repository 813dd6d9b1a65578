"""The training stages of the demo: tokenizers and corpus, dual encoder and memory bank, retrieval-augmented
CM3 pretraining, SFT. Each stage writes into its own folder of the run and records its results there, so a
rerun skips what has finished (and the trainer resumes an interrupted stage from its checkpoints)."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch

from cm3leon.data import ShapesCaptions, ShapesWorld
from cm3leon.pipeline.bundle import DUAL_ENCODER_FILE, MEMORY_BANK_FILE, RETRIEVAL_DIR
from cm3leon.retrieval import DualEncoder, MemoryBank, RetrievalDocument, embed_documents, train_dual_encoder
from cm3leon.tokenizer.train_image import HELD_OUT_SEED_OFFSET, evaluate
from cm3leon.training import Trainer, load_config
from cm3leon.training.datasets import ShapesCorpus, prepare_shapes_corpus

from .run_folder import RunFolder
from .scales import DemoScale

# The share of documents left plain during pretraining: the layout text-to-image prompts use must be seen
# (docs/objective.md); the paper's objective transforms every document.
TRANSFORM_PROBABILITY = 0.5


def corpus_stage(run: RunFolder, scale: DemoScale, seed: int, progress: bool) -> tuple[ShapesCorpus, dict]:
    """Trains (or loads) the text BPE and the image tokenizer, tokenizes the pretraining documents."""
    folder = run.stage_dir("corpus")
    corpus = prepare_shapes_corpus(folder, text_vocab_size=scale.text_vocab_size,
                                   text_examples=scale.text_examples, image_tokenizer=scale.image_tokenizer,
                                   image_tokenizer_steps=scale.image_tokenizer_steps, seed=seed, progress=progress)
    result = run.result("corpus")
    if result is None:
        corpus.documents("text_to_image", scale.documents, seed=seed, progress=progress)
        heldout = ShapesWorld(image_size=corpus.image_tokenizer.config.image_size, seed=seed + HELD_OUT_SEED_OFFSET)
        with torch.inference_mode():
            quality = evaluate(corpus.image_tokenizer, heldout, max(scale.prompts, 16))
        result = run.finish("corpus", {"text_vocab_size": corpus.text_tokenizer.vocab_size,
                                       "vocabulary_size": len(corpus.vocabulary), **quality})
    return corpus, result


def retrieval_stage(run: RunFolder, scale: DemoScale, corpus: ShapesCorpus, seed: int, progress: bool) -> dict:
    """Trains the dual encoder on the corpus scenes and fills the memory bank with the corpus documents."""
    result = run.result("retrieval")
    if result is not None:
        return result
    folder = run.stage_dir("retrieval")
    world = ShapesWorld(image_size=corpus.image_tokenizer.config.image_size, seed=seed)
    pairs = ShapesCaptions(world, scale.documents)
    trained = train_dual_encoder("demo", pairs, corpus.text_tokenizer, scale.encoder_steps, seed=seed,
                                 batch_size=min(128, len(pairs)),
                                 progress=progress, checkpoint=folder / DUAL_ENCODER_FILE)
    token_ids = corpus.documents("text_to_image", scale.documents, seed=seed)
    documents = [RetrievalDocument(text, image, token_ids=list(ids))
                 for (image, text), ids in zip((pairs[i] for i in range(len(pairs))), token_ids)]
    bank = MemoryBank(trained.encoder.embed_dim)
    bank.add(documents, embed_documents(documents, trained.encoder, corpus.text_tokenizer, progress=progress))
    bank.save(folder / MEMORY_BANK_FILE)
    return run.finish("retrieval", {"encoder_steps": scale.encoder_steps, "encoder_seconds": trained.seconds,
                                    "final_contrastive_loss": trained.history[-1]["loss"] if trained.history else None,
                                    "bank_documents": len(bank)})


def _trainer_overrides(run: RunFolder, scale: DemoScale, seed: int, stage: str, progress: bool) -> list[str]:
    corpus = run.root / "corpus"
    return [f"out_dir={run.root / stage}", f"seed={seed}", f"model.preset={scale.model_preset}",
            f"data.corpus_dir={corpus}", f"data.documents={scale.documents}",
            f"data.text_vocab_size={scale.text_vocab_size}", f"data.text_examples={scale.text_examples}",
            f"data.image_tokenizer={scale.image_tokenizer}",
            f"data.image_tokenizer_steps={scale.image_tokenizer_steps}",
            f"data.tokens_per_batch={scale.tokens_per_batch}", f"data.max_seq_len={scale.max_seq_len}",
            f"data.val_documents={max(8, scale.prompts)}",
            f"logging.progress={'true' if progress else 'false'}", "logging.plot=true"]


def train_stage(run: RunFolder, scale: DemoScale, seed: int, stage: str, *, retrieval: bool,
                init_from: str | None, progress: bool) -> dict:
    """Pretraining (``init_from`` None) or SFT (from a pretraining run's checkpoints) through the trainer;
    the export folder gets the retrieval files so generation can retrieve and re-rank."""
    result = run.result(stage)
    if result is not None:
        return result
    sft = init_from is not None
    overrides = _trainer_overrides(run, scale, seed, stage, progress)
    steps = scale.sft_steps if sft else scale.pretrain_steps
    overrides += [f"schedule.steps={steps}", f"schedule.warmup={max(1, steps // 10)}",
                  f"checkpoint.every={max(1, steps // 4)}"]
    if sft:
        overrides.append(f"checkpoint.init_from={init_from}")
    else:
        overrides.append(f"data.transform_probability={TRANSFORM_PROBABILITY}")
    retrieval_dir = run.root / "retrieval"
    if retrieval and not sft:
        overrides += [f"data.memory_bank={retrieval_dir / MEMORY_BANK_FILE}",
                      f"data.retrieval_encoder={retrieval_dir / DUAL_ENCODER_FILE}"]
    config = load_config("demo-sft" if sft else "demo-pretrain", overrides)
    start = time.perf_counter()
    trainer = Trainer(config)
    try:
        summary = trainer.fit(resume=True)
    finally:
        trainer.close()
    if summary.get("interrupted"):
        raise KeyboardInterrupt(f"{stage} was interrupted; rerun the demo to resume it")
    export = Path(config.out_dir)
    (export / RETRIEVAL_DIR).mkdir(exist_ok=True)
    for name in (DUAL_ENCODER_FILE, MEMORY_BANK_FILE):
        shutil.copyfile(retrieval_dir / name, export / RETRIEVAL_DIR / name)
    return run.finish(stage, {**_plain(summary), "wall_seconds": time.perf_counter() - start,
                              "retrieval": retrieval and not sft, "steps": steps})


def _plain(summary: dict[str, Any]) -> dict[str, Any]:
    """The JSON-friendly part of a trainer summary."""
    return {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) or v is None}


def load_encoder(run: RunFolder) -> DualEncoder:
    return DualEncoder.load(run.root / "retrieval" / DUAL_ENCODER_FILE)
