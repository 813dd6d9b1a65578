"""Can data preparation keep up with training? CM3 transform + packing tokens/s on one thread, beside the
train step's tokens/s on the same batches.

Documents are shapes-world caption-image documents at the demo scale: the caption through a BPE trained
on shapes captions, ``<break>``, then an 8x8 grid of image codes (random codes: the transform does not
look at their values). Both rows of the case handle one packed batch of at most 2048 tokens per call, so
the "speedup" column (the train step's median over the data row's) says how many times faster one thread
produces batches than one training process consumes them (> 1: data preparation keeps up).
"""
from __future__ import annotations

import pytest
import torch

from cm3leon import CM3Leon, preset
from cm3leon.data import CM3Source, PackedLoader, ShapesWorld, caption
from cm3leon.tokenizer import SPECIAL_TOKENS, TextTokenizer, Vocabulary

CONFIG = preset("demo")
TOKENS_PER_BATCH, MAX_SEQ_LEN, ROUNDS = 2048, 512, 40
CASE = f"data vs train step: demo preset, {TOKENS_PER_BATCH}-token packed batches of shapes documents"
IMAGE_CODES, GRID = 512, 8


@pytest.fixture(scope="module")
def source() -> CM3Source:
    world = ShapesWorld(seed=0)
    captions = [caption(world.scene(i)) for i in range(2000)]
    # text ids + specials + image codes must fit the demo model's vocabulary
    text_tok = TextTokenizer.train(captions, vocab_size=CONFIG.vocab_size - len(SPECIAL_TOKENS) - IMAGE_CODES)
    vocab = Vocabulary(text_size=text_tok.vocab_size, image_codes=IMAGE_CODES)
    assert len(vocab) <= CONFIG.vocab_size
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, IMAGE_CODES, (len(captions), GRID * GRID), generator=g)
    documents = [vocab.text_to_global(text_tok.encode(c)) + [vocab.break_id] + vocab.image_to_global(row)
                 for c, row in zip(captions, codes.tolist())]
    return CM3Source(documents, vocab, seed=0, max_seq_len=MAX_SEQ_LEN)


def _loader(source: CM3Source) -> PackedLoader:
    return PackedLoader(source, tokens_per_batch=TOKENS_PER_BATCH, max_seq_len=MAX_SEQ_LEN, seed=0)


def test_train_step(benchmark, bench_record, source):
    """Forward + backward of the demo model on one of those batches, CM3 loss weights (the consumer)."""
    torch.manual_seed(0)
    model = CM3Leon(CONFIG.replace(zero_init_output_proj=False)).train()
    batch = next(iter(_loader(source)))

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(batch.tokens, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
        loss = torch.nn.functional.cross_entropy(logits, batch.targets, reduction="none")
        ((loss * batch.loss_weights).sum() / batch.loss_weights.sum()).backward()

    step()
    bench_record(benchmark, case=CASE, impl="train step (consumer)", work=len(batch.tokens), unit="tok/s",
                 what="demo preset forward + backward")
    benchmark.pedantic(step, rounds=3, iterations=1)


def _bench_data(benchmark, bench_record, loader: PackedLoader, case: str) -> None:
    """One packed batch per call from an endless loader, on one thread (as one data-loading worker)."""
    batches = iter(loader)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        next(batches)                                   # warm up outside the timed rounds
        bench_record(benchmark, case=case, impl="cm3leon", work=None, unit=None,
                     what="CM3 transform + pack, 1 thread")
        produced = []
        benchmark.pedantic(lambda: produced.append(len(next(batches).tokens)), rounds=ROUNDS, iterations=1)
    finally:
        torch.set_num_threads(threads)
    # tokens per call: the mean over exactly the batches timed (they differ by less than one sequence)
    benchmark.extra_info.update(work=sum(produced) / len(produced), unit="tok/s")


def test_transform_and_pack(benchmark, bench_record, source):
    """The CM3 transform of every document of a batch + packing, on the shapes documents above."""
    _bench_data(benchmark, bench_record, _loader(source), CASE)


def test_transform_and_pack_paper_shapes(benchmark, bench_record):
    """The same on paper-shaped documents: 20 text ids, ``<break>``, 32x32 = 1024 image ids, paper
    vocabulary, 4096-token sequences, 8192-token batches (no model here: the figure to compare against is
    the paper-scale train step, far slower than the demo's)."""
    vocab = Vocabulary(text_size=56_320, image_codes=8192)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(*vocab.text_range, (20,), generator=g).tolist() + [vocab.break_id]
            + torch.randint(*vocab.image_range, (1024,), generator=g).tolist() for _ in range(300)]
    loader = PackedLoader(CM3Source(docs, vocab, seed=0, max_seq_len=4096), tokens_per_batch=8192,
                          max_seq_len=4096, seed=0)
    _bench_data(benchmark, bench_record, loader, "CM3 transform + pack: paper-shaped documents (1045 ids), "
                "8192-token batches")
