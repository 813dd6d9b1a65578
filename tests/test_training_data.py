"""Training data: the cached shapes corpus, the SFT task mixture, real data (image folder, WebDataset)."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from cm3leon.data import ShapesWorld, export_shapes_folder
from cm3leon.data.shapes import caption, render
from cm3leon.training import load_config
from cm3leon.training.datasets import TaskMixture, prepare_shapes_corpus, sft_task_weights
from cm3leon.training.realdata import expand_shards, real_documents
from cm3leon.training.runtime import Runtime

TINY = dict(text_vocab_size=300, text_examples=200, image_tokenizer="tiny", image_tokenizer_steps=20, seed=0,
            progress=False)
ONE = Runtime(rank=0, world_size=1, device=torch.device("cpu"), owns_group=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    # one thread: the tiny tokenizer's small convolutions only lose to thread synchronisation on shared cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield prepare_shapes_corpus(tmp_path_factory.mktemp("corpus"), **TINY)
    finally:
        torch.set_num_threads(threads)


def test_corpus_is_trained_once_then_loaded_and_refuses_other_settings(corpus):
    again = prepare_shapes_corpus(corpus.root, **TINY)
    assert again.vocabulary == corpus.vocabulary
    assert torch.equal(again.image_tokenizer.codebook.weight, corpus.image_tokenizer.codebook.weight)
    assert len(corpus.vocabulary) == 21 + corpus.text_tokenizer.vocab_size + 64
    with pytest.raises(ValueError, match="made with"):
        prepare_shapes_corpus(corpus.root, **{**TINY, "text_vocab_size": 400})


def test_documents_are_caption_break_image_and_cached(corpus):
    docs = corpus.documents("text_to_image", 6, start=3)
    world = ShapesWorld(image_size=16, seed=0)
    for i, doc in enumerate(docs):
        text, grid = corpus.codec.decode(doc)
        assert text == caption(world.scene(3 + i)) and tuple(grid.shape) == (4, 4)
    cache = next(corpus.root.glob("documents-text_to_image-*"))
    torch.save([[1, 2, 3]] * 6, cache)  # the cache is what a second call returns
    assert corpus.documents("text_to_image", 6, start=3) == [[1, 2, 3]] * 6
    edit = corpus.codec.decode(corpus.documents("edit", 1)[0])
    assert isinstance(edit[0], str) and edit[0].startswith("Edit first image") and len(edit) == 4


def test_damaged_corpus_files_and_bad_counts_raise_naming_them(corpus, tmp_path):
    import shutil

    root = shutil.copytree(corpus.root, tmp_path / "corpus")
    (root / "corpus.json").write_text("{cut")  # was a bare JSONDecodeError naming no file
    with pytest.raises(ValueError, match=r"corpus\.json: not a readable corpus manifest"):
        prepare_shapes_corpus(root, **TINY)
    corpus.documents("caption", 2, start=40)
    cache = next(corpus.root.glob("documents-caption-seed0-40-2.pt"))
    cache.write_bytes(cache.read_bytes()[:40])  # was torch's RuntimeError naming no file
    with pytest.raises(ValueError, match=f"{cache.name}: damaged document cache"):
        corpus.documents("caption", 2, start=40)
    with pytest.raises(ValueError, match="n must be a non-negative int"):  # cached an empty list before
        corpus.documents("caption", -1)


def test_sft_task_weights_balance_tasks_within_the_ratio_caps():
    assert sft_task_weights({"a": 50, "b": 50}) == {"a": 0.5, "b": 0.5}
    w = sft_task_weights({"big": 1000, "mid": 100, "tiny": 1})
    natural = {"big": 1000 / 1101, "mid": 100 / 1101, "tiny": 1 / 1101}
    ratios = {t: w[t] / natural[t] for t in w}
    # before renormalising: big 0.37x (1/3 of the tasks / its 91% share), mid 3x (capped), tiny 3x (capped)
    assert ratios["mid"] == pytest.approx(ratios["tiny"])
    assert ratios["mid"] / ratios["big"] == pytest.approx(3 / ((1 / 3) / natural["big"]))
    with pytest.raises(ValueError, match="counts"):
        sft_task_weights({"a": 0})


def test_task_mixture_follows_the_weights_deterministically():
    sources = {"a": list(range(10)), "b": list(range(100, 103))}
    mix = TaskMixture(sources, {"a": 0.75, "b": 0.25}, length=40, seed=1)
    items = [mix[i] for i in range(len(mix))]
    assert len(mix) == 40 and sum(i >= 100 for i in items) == 10
    assert sorted(i for i in items if i < 100) == sorted(list(range(10)) * 3)  # a's 30 slots cycle its source
    assert [TaskMixture(sources, {"a": 0.75, "b": 0.25}, length=40, seed=1)[i] for i in range(40)] == items
    with pytest.raises(ValueError, match="same tasks"):
        TaskMixture(sources, {"a": 1.0}, length=40, seed=1)
    # weights are proportions: a table of 4 or 160 slots used to come out for length 40
    for scale in (0.1, 4.0):
        scaled = TaskMixture(sources, {"a": 0.75 * scale, "b": 0.25 * scale}, length=40, seed=1)
        assert [scaled[i] for i in range(len(scaled))] == items
    with pytest.raises(ValueError, match="non-negative"):
        TaskMixture(sources, {"a": -0.5, "b": 1.5}, length=40, seed=1)
    with pytest.raises(ValueError, match=r"\['b'\] are empty"):  # was a ZeroDivisionError on indexing
        TaskMixture({"a": [1], "b": []}, {"a": 0.5, "b": 0.5}, length=40, seed=1)


def _write_shards(root, world, n, per_shard):
    paths = []
    for s in range(0, n, per_shard):
        path = root / f"shard-{s // per_shard:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s, min(s + per_shard, n)):
                from PIL import Image
                buf = io.BytesIO()
                Image.fromarray(render(world.scene(i))).save(buf, format="PNG")
                text = caption(world.scene(i)).encode()
                meta = json.dumps({"caption": caption(world.scene(i))}).encode()
                for name, data in ((f"{i:05d}.png", buf.getvalue()),
                                   (f"{i:05d}.txt" if i % 2 else f"{i:05d}.json", text if i % 2 else meta)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def test_folder_and_webdataset_shards_give_the_same_documents(corpus, tmp_path):
    world = ShapesWorld(image_size=16, seed=5)
    export_shapes_folder(world, tmp_path / "folder", 7)
    _write_shards(tmp_path, world, 7, 3)
    assert expand_shards(str(tmp_path / "shard-{000..002}.tar")) == [str(tmp_path / f"shard-00{i}.tar")
                                                                     for i in range(3)]
    base = ["data.corpus_dir='" + str(corpus.root) + "'", "logging.progress=false"]
    folder = load_config("tiny-pretrain", [*base, "data.source='folder'",
                                           f"data.path='{tmp_path / 'folder'}'"])
    shards = load_config("tiny-pretrain", [*base, "data.source='webdataset'",
                                           f"data.path='{tmp_path}/shard-{{000..002}}.tar'"])
    from_folder = real_documents(folder, corpus, ONE)
    from_shards = real_documents(shards, corpus, ONE)
    assert from_folder == from_shards and len(from_folder) == 7
    assert corpus.codec.decode(from_folder[2])[0] == caption(world.scene(2))
    # resumable: finished shards are read back, only missing ones are tokenized again
    shard_cache = next(p for p in (corpus.root / "tokenized").iterdir() if len(list(p.glob("*.pt"))) == 3)
    before = {p.name: p.stat().st_mtime_ns for p in shard_cache.iterdir()}
    (shard_cache / "000001.pt").unlink()
    again = real_documents(shards, corpus, ONE)
    after = {p.name: p.stat().st_mtime_ns for p in shard_cache.iterdir()}
    assert again == from_shards
    assert after["000000.pt"] == before["000000.pt"] and "000001.pt" in after


def test_an_edited_folder_is_tokenized_again(corpus, tmp_path):
    world = ShapesWorld(image_size=16, seed=7)
    export_shapes_folder(world, tmp_path / "folder", 1)  # a folder with one image
    cfg = load_config("tiny-pretrain", [f"data.corpus_dir='{tmp_path / 'c'}'", "logging.progress=false",
                                        "data.source='folder'", f"data.path='{tmp_path / 'folder'}'"])
    assert len(real_documents(cfg, corpus, ONE)) == 1
    export_shapes_folder(world, tmp_path / "folder", 3)
    # the cache was keyed on the path alone: the stale single document came back
    docs = real_documents(cfg, corpus, ONE)
    assert len(docs) == 3 and corpus.codec.decode(docs[2])[0] == caption(world.scene(2))


def test_ranks_tokenize_disjoint_shards(corpus, tmp_path):
    world = ShapesWorld(image_size=16, seed=6)
    _write_shards(tmp_path, world, 6, 2)
    cfg = load_config("tiny-pretrain", ["data.corpus_dir='" + str(corpus.root / "r") + "'",
                                        "logging.progress=false", "data.source='webdataset'",
                                        f"data.path='{tmp_path}/shard-{{000..002}}.tar'"])
    rank1 = Runtime(rank=1, world_size=2, device=torch.device("cpu"), owns_group=False)
    with pytest.raises(FileNotFoundError):  # rank 1 alone writes shard 1, then cannot read shards 0 and 2
        real_documents(cfg, corpus, rank1)
    assert [p.name for p in (corpus.root / "r" / "tokenized").glob("*/*.pt")] == ["000001.pt"]
    assert len(real_documents(cfg, corpus, ONE)) == 6


def test_build_data_for_both_stages(corpus):
    pytest.importorskip("cm3leon.data.packing")
    from cm3leon.training.datasets import build_data

    base = ["data.corpus_dir='" + str(corpus.root) + "'", "logging.progress=false", "data.documents=14",
            "data.val_documents=7"]
    pre = build_data(load_config("tiny-pretrain", base), ONE)
    assert len(pre.train) == 14 and len(pre.validation) == 7 and pre.vocab_size == len(corpus.vocabulary)
    ex = pre.train[0]
    assert ex.tokens[0] == corpus.vocabulary.eos_id and ex.tokens[-1] == corpus.vocabulary.eos_id
    assert [f.name for f in pre.tokenizer_files] == ["text.json", "image_tokenizer.safetensors", "vocabulary.json"]
    sft = build_data(load_config("tiny-pretrain", [*base, "stage='sft'"]), ONE)
    assert len(sft.train) == 14 and len(sft.validation) == 7  # 2 documents of each of the 7 tasks
    assert np.unique(sft.train.table[:, 0]).tolist() == list(range(7))
    # val_documents = 0 turns validation off in both stages (SFT used to build one document per task)
    none = [*base[:3], "data.val_documents=0"]
    assert build_data(load_config("tiny-pretrain", none), ONE).validation is None
    assert build_data(load_config("tiny-pretrain", [*none, "stage='sft'"]), ONE).validation is None


def test_trainer_runs_from_the_shapes_corpus_and_exports_for_generation(corpus, tmp_path):
    pytest.importorskip("cm3leon.data.packing")
    import cm3leon
    from cm3leon.training import Trainer

    config = load_config("tiny-pretrain", ["data.corpus_dir='" + str(corpus.root) + "'",
                                           f"out_dir='{tmp_path}'",
                                           "schedule.steps=2", "logging.val_every=2", "threads=1"])
    summary = Trainer(config).fit()
    assert summary["step"] == 2 and 0 < summary["val_loss"] < 10
    model = cm3leon.load(tmp_path / "model.safetensors")
    assert model.config.vocab_size == len(corpus.vocabulary)
    assert {"text.json", "image_tokenizer.safetensors", "vocabulary.json"} <= {p.name for p in tmp_path.iterdir()}


def test_pretraining_with_a_memory_bank_draws_retrieval_augmented_sequences(corpus, tmp_path):
    pytest.importorskip("cm3leon.data.packing")
    from cm3leon.data import ShapesCaptions
    from cm3leon.retrieval import (
        DualEncoderConfig,
        MemoryBank,
        RetrievalAugmentedSource,
        caption_image_documents,
        embed_documents,
        train_dual_encoder,
    )
    from cm3leon.training.datasets import build_data

    pairs = ShapesCaptions(ShapesWorld(image_size=16, seed=0), 12)
    # a few contrastive steps spread the embeddings (an untrained encoder maps everything to near-duplicates,
    # which the retriever's 0.9 rule skips)
    small = DualEncoderConfig(image_size=16, patch_size=8, image_width=32, image_layers=1, text_width=32,
                              text_layers=1, embed_dim=16)
    encoder = train_dual_encoder(small, pairs, corpus.text_tokenizer, 10, batch_size=12, lr=3e-3,
                                 progress=False).encoder.eval()
    docs = caption_image_documents(pairs, corpus.codec, corpus.image_tokenizer)
    bank = MemoryBank(encoder.embed_dim)
    bank.add(docs, embed_documents(docs, encoder, corpus.text_tokenizer))
    bank.save(tmp_path / "bank.safetensors")
    encoder.save(tmp_path / "encoder.safetensors")
    config = load_config("tiny-pretrain", ["data.corpus_dir='" + str(corpus.root) + "'", "logging.progress=false",
                                           f"data.memory_bank='{tmp_path / 'bank.safetensors'}'",
                                           f"data.retrieval_encoder='{tmp_path / 'encoder.safetensors'}'",
                                           "data.retrieved=2", "data.max_seq_len=256",
                                           "data.tokens_per_batch=512"])
    data = build_data(config, ONE)
    assert isinstance(data.train, RetrievalAugmentedSource) and len(data.train) == 12
    eos = corpus.vocabulary.eos_id
    # <eos> T(r1) <eos> T(r2) <eos> T(query) <eos>: four <eos> when both retrieved documents fit
    assert max(int((data.train[i].tokens == eos).sum()) for i in range(len(data.train))) == 4
    with pytest.raises(ValueError, match="retrieval_encoder"):
        load_config("tiny-pretrain", [f"data.memory_bank='{tmp_path / 'bank.safetensors'}'"])


def test_exact_resume_with_the_real_loader_and_cm3_sequences(corpus, tmp_path):
    """The same bit-exactness as the loop tests, through CM3Source + the packed loader (one kernel thread:
    the attention backward's dQ is not bit-reproducible across threads)."""
    pytest.importorskip("cm3leon.data.packing")
    from cm3leon.training import Trainer
    from cm3leon.training.observe import read_metrics

    import os
    import signal

    def run(out, resume=False, stop_after=None):
        config = load_config("tiny-pretrain", ["data.corpus_dir='" + str(corpus.root) + "'", f"out_dir='{out}'",
                                               "schedule.steps=4", "schedule.warmup=1", "threads=1",
                                               "checkpoint.every=0", "logging.val_every=0",
                                               "checkpoint.export=false", "logging.plot=false"])
        trainer = Trainer(config)
        if stop_after is not None:
            step = trainer.train_step

            def step_then_sigterm(batches):
                result = step(batches)
                if trainer.step == stop_after - 1:
                    os.kill(os.getpid(), signal.SIGTERM)
                return result

            trainer.train_step = step_then_sigterm
        summary = trainer.fit(resume=resume)
        return trainer, summary

    threads = torch.get_num_threads()
    try:
        full, _ = run(tmp_path / "full")
        assert run(tmp_path / "cut", stop_after=2)[1]["step"] == 2
        resumed, _ = run(tmp_path / "cut", resume=True)
    finally:
        torch.set_num_threads(threads)
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    assert [r["loss"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")] == \
        [r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl")]
