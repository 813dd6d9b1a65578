"""PackedLoader and CM3Source: batch layout, greedy whole-sequence packing, determinism, exact resume (also
across epochs and with worker processes), rank shards, per-epoch masking, bad input."""
from itertools import islice

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cm3leon import CM3Leon, preset
from cm3leon.data import CM3Source, PackedBatch, PackedLoader, derive_seed
from cm3leon.objective import CM3Example, cm3_restore
from cm3leon.tokenizer import Vocabulary

VOCAB = Vocabulary(text_size=50, image_codes=64)


class FakeSource:
    """Example i of epoch e: ``[i, e, i, e, ...]`` shifted into the id range, with a length fixed per i and
    random weights: its tokens identify (index, epoch), so the tests can tell what was packed."""

    def __init__(self, lengths: list[int]) -> None:
        self.lengths, self.epoch = lengths, 0

    def __len__(self) -> int:
        return len(self.lengths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> CM3Example:
        n = self.lengths[index]
        tokens = torch.tensor([1000 + index, 2000 + self.epoch] * n)[:n].long()
        weights = torch.rand(n, generator=torch.Generator().manual_seed(index))
        return CM3Example(tokens, weights, 0)


def identify(batch: PackedBatch) -> list[tuple[int, int]]:
    """(index, epoch) of each packed sequence (a length-1 sequence's epoch reads as -1)."""
    starts = batch.cu_seqlens[:-1].long()
    epochs = [int(batch.tokens[s + 1]) - 2000 if n > 1 else -1
              for s, n in zip(starts.tolist(), batch.cu_seqlens.diff().tolist())]
    return [(int(batch.tokens[s]) - 1000, e) for s, e in zip(starts.tolist(), epochs)]


def take(loader: PackedLoader, n: int) -> list[PackedBatch]:
    return list(islice(loader, n))


def same(a: list[PackedBatch], b: list[PackedBatch]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.tokens, y.tokens) and torch.equal(x.targets, y.targets)
        and torch.equal(x.loss_weights, y.loss_weights) and torch.equal(x.cu_seqlens, y.cu_seqlens)
        and (x.max_seqlen, x.n_sequences, x.padding) == (y.max_seqlen, y.n_sequences, y.padding)
        for x, y in zip(a, b))


lengths_st = st.lists(st.integers(1, 24), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(lengths_st, st.integers(24, 64), st.integers(0, 2**40), st.integers(1, 3), st.data())
def test_batches_pack_whole_sequences_in_shard_order(lengths, tokens_per_batch, seed, world_size, data):
    world_size = min(world_size, len(lengths))
    rank = data.draw(st.integers(0, world_size - 1))
    source = FakeSource(lengths)
    loader = PackedLoader(source, tokens_per_batch=tokens_per_batch, max_seq_len=24, seed=seed, rank=rank,
                          world_size=world_size)
    batches = take(loader, 12)
    packed = [key for b in batches for key in identify(b)]
    expected = []
    while len(expected) < len(packed):
        e = len(expected) and expected[-1][1] + 1
        expected += [(int(i), e) for i in loader.epoch_indices(e)]
    expected = expected[: len(packed)]
    assert [i for i, _ in packed] == [i for i, _ in expected]                   # shard order, whole sequences
    assert all(e in (-1, want) for (_, e), (_, want) in zip(packed, expected))  # set_epoch was called
    keys = iter(expected)
    for b, nxt in zip(batches, batches[1:]):
        total = len(b.tokens)
        assert b.tokens.dtype == b.targets.dtype == torch.int64 and b.cu_seqlens.dtype == torch.int32
        assert b.loss_weights.dtype == torch.float32 and len(b.targets) == len(b.loss_weights) == total
        assert b.padding == tokens_per_batch - total >= 0
        assert b.padding < int(nxt.cu_seqlens[1])          # greedy: the next sequence did not fit
        lens = b.cu_seqlens.diff()
        assert b.cu_seqlens[0] == 0 and b.cu_seqlens[-1] == total and b.n_sequences == len(lens)
        assert b.max_seqlen == int(lens.max())
        for n, s, (index, epoch) in zip(lens.tolist(), b.cu_seqlens.tolist(), keys):  # keys: drawn last
            source.set_epoch(epoch)
            ex = source[index]
            assert torch.equal(b.tokens[s:s + n], ex.tokens)
            assert torch.equal(b.targets[s:s + n - 1], ex.tokens[1:])
            assert torch.equal(b.loss_weights[s:s + n - 1], ex.loss_weights[1:])
            assert b.loss_weights[s + n - 1] == 0 and b.targets[s + n - 1] == 0


@settings(max_examples=40, deadline=None)
@given(lengths_st, st.integers(24, 48), st.integers(0, 2**40), st.integers(0, 10), st.integers(1, 2),
       st.data())
def test_resume_after_k_batches_equals_uninterrupted_stream(lengths, tokens_per_batch, seed, k, world_size,
                                                            data):
    world_size = min(world_size, len(lengths))
    rank = data.draw(st.integers(0, world_size - 1))
    args = dict(tokens_per_batch=tokens_per_batch, max_seq_len=24, seed=seed, rank=rank,
                world_size=world_size)
    stream = take(PackedLoader(FakeSource(lengths), **args), k + 6)
    first = PackedLoader(FakeSource(lengths), **args)
    assert same(take(first, k), stream[:k])
    state = first.state_dict()
    assert same(take(first, 6), stream[k:])                 # iterating again continues as well
    resumed = PackedLoader(FakeSource(lengths), **args)
    resumed.load_state_dict(state)
    assert same(take(resumed, 6), stream[k:])


def test_resume_with_workers_across_an_epoch_boundary():
    lengths = [5, 9, 3, 12, 7, 4, 8, 6, 10, 2, 11]           # 77 tokens per epoch, 4-5 batches
    args = dict(tokens_per_batch=20, max_seq_len=12, seed=3)
    stream = take(PackedLoader(FakeSource(lengths), **args), 14)
    first = PackedLoader(FakeSource(lengths), num_workers=2, **args)
    head = take(first, 5)
    state = first.state_dict()
    resumed = PackedLoader(FakeSource(lengths), num_workers=2, **args)
    resumed.load_state_dict(state)
    tail = take(resumed, 9)
    assert same(head + tail, stream)
    epochs = {e for b in stream for _, e in identify(b)}
    assert {0, 1, 2} <= epochs                  # crossed epochs; workers saw set_epoch ...
    assert resumed.source.epoch == 0             # ... in their own copies: the examples came from the workers


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 6), st.integers(0, 2**40), st.integers(0, 50))
def test_rank_shards_are_disjoint_and_cover_each_epoch(n, world_size, seed, epoch):
    world_size = min(world_size, n)
    shards = [PackedLoader(FakeSource([3] * n), tokens_per_batch=8, max_seq_len=8, seed=seed, rank=r,
                           world_size=world_size).epoch_indices(epoch).tolist() for r in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == list(range(n))     # disjoint and covering
    sizes = [len(shard) for shard in shards]                 # the remainder: one more for the first ranks
    assert sizes == [n // world_size + (r < n % world_size) for r in range(world_size)]


def test_order_changes_with_epoch_and_seed():
    loader = PackedLoader(FakeSource([3] * 50), tokens_per_batch=8, max_seq_len=8, seed=9)
    assert loader.epoch_indices(0).tolist() != loader.epoch_indices(1).tolist()
    other = PackedLoader(FakeSource([3] * 50), tokens_per_batch=8, max_seq_len=8, seed=10)
    assert loader.epoch_indices(0).tolist() != other.epoch_indices(0).tolist()


def test_cm3_source_masks_per_epoch_and_feeds_the_model():
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(*VOCAB.text_range, (6,), generator=g).tolist() + [VOCAB.break_id]
            + torch.randint(*VOCAB.image_range, (16,), generator=g).tolist() for _ in range(8)]
    source = CM3Source(docs, VOCAB, seed=1, max_seq_len=64)
    assert len(source) == 8
    epoch0 = [source[i].tokens for i in range(8)]
    assert all(torch.equal(source[i].tokens, epoch0[i]) for i in range(8))   # deterministic
    for i in range(8):
        assert cm3_restore(epoch0[i][1:-1], VOCAB) == docs[i]
    source.set_epoch(1)
    assert any(not torch.equal(source[i].tokens, epoch0[i]) for i in range(8))
    loader = PackedLoader(source, tokens_per_batch=128, max_seq_len=64, seed=0)
    batch = next(iter(loader))
    model = CM3Leon(preset("tiny"))
    logits = model(batch.tokens, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
    assert logits.shape == (len(batch.tokens), preset("tiny").vocab_size)


def test_derive_seed():
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3)
    seeds = {derive_seed(s, e, i) for s in range(3) for e in range(3) for i in range(20)}
    assert len(seeds) == 180 and all(0 <= s < 2**63 for s in seeds)


def test_bad_input_names_the_argument():
    src = FakeSource([4, 4, 4])
    ok = dict(tokens_per_batch=16, max_seq_len=8, seed=0)
    cases = [
        (TypeError, "seed", dict(ok, seed=1.0)),
        (TypeError, "seed", dict(ok, seed="0")),
        (ValueError, "seed", dict(ok, seed=-1)),
        (ValueError, "max_seq_len", dict(ok, max_seq_len=1)),
        (TypeError, "max_seq_len", dict(ok, max_seq_len=8.0)),
        (ValueError, "tokens_per_batch", dict(ok, tokens_per_batch=7)),
        (ValueError, "world_size", dict(ok, world_size=0)),
        (ValueError, "world_size", dict(ok, world_size=4)),
        (ValueError, "rank", dict(ok, rank=1)),
        (ValueError, "rank", dict(ok, world_size=2, rank=-1)),
        (ValueError, "num_workers", dict(ok, num_workers=-1)),
    ]
    for error, name, kwargs in cases:
        with pytest.raises(error, match=name):
            PackedLoader(src, **kwargs)
    with pytest.raises(TypeError, match="source"):
        PackedLoader(5, **ok)
    with pytest.raises(ValueError, match="source"):
        PackedLoader(FakeSource([]), **ok)
    with pytest.raises(ValueError, match=r"source\[1\]"):      # an example longer than max_seq_len
        next(iter(PackedLoader(FakeSource([4, 9]), tokens_per_batch=64, max_seq_len=8, seed=0)))
    loader = PackedLoader(src, **ok)
    state = loader.state_dict()
    for key, value in (("seed", 1), ("world_size", 2), ("source_len", 4)):
        with pytest.raises(ValueError, match="state_dict"):
            loader.load_state_dict(dict(state, **{key: value}))
    with pytest.raises(ValueError, match="state_dict"):
        loader.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="state_dict"):
        loader.load_state_dict(dict(state, index=3))
    docs = [[30, 31]]
    with pytest.raises(TypeError, match="seed"):
        CM3Source(docs, VOCAB, seed=0.5, max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        CM3Source(docs, VOCAB, seed=0, max_seq_len=2)
    with pytest.raises(ValueError, match="poisson_rate"):
        CM3Source(docs, VOCAB, seed=0, max_seq_len=8, poisson_rate=-1.0)
    with pytest.raises(ValueError, match="documents"):
        CM3Source([], VOCAB, seed=0, max_seq_len=8)
    bad = CM3Source([[30], [], [len(VOCAB)]], VOCAB, seed=0, max_seq_len=8)
    with pytest.raises(ValueError, match=r"documents\[1\].*empty"):
        bad[1]
    with pytest.raises(ValueError, match=r"documents\[2\].*outside the vocabulary"):
        bad[2]
    with pytest.raises(IndexError):
        bad[3]
