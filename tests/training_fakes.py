"""Small stand-ins for the trainer tests: a deterministic example source and a packed loader that follow the
data contract (``CM3Example`` items, ``PackedBatch`` batches, resumable loader state)."""
from __future__ import annotations

import pytest
import torch

from cm3leon.data import PackedBatch
from cm3leon.objective import CM3Example
from cm3leon.training.data import TrainingData

VOCAB = 64


class PatternSource:
    """Example ``i``: a learnable sequence (a per-example start then +1 steps mod VOCAB), 5-20 tokens."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> CM3Example:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        length = int(torch.randint(5, 21, (1,), generator=g))
        start = int(torch.randint(0, VOCAB, (1,), generator=g))
        tokens = (start + torch.arange(length)) % VOCAB
        weights = torch.ones(length)
        weights[0] = 0.0
        return CM3Example(tokens, weights, 0)


class GreedyLoader:
    """Packs examples in a seeded per-epoch order into batches of at most ``tokens_per_batch`` tokens; rank
    ``r`` of ``w`` takes global batches ``r, r + w, ...``. State: global batches consumed."""

    def __init__(self, source, *, tokens_per_batch, max_seq_len, seed, rank=0, world_size=1, num_workers=0):
        self.source, self.budget, self.seed = source, tokens_per_batch, seed
        self.rank, self.world = rank, world_size
        self.consumed = 0  # global batches before this rank's next one, in units of whole rounds

    def _global_batches(self):
        epoch = 0
        while True:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(len(self.source), generator=generator)
            current = []
            for i in order.tolist():
                ex = self.source[i]
                if current and sum(len(e.tokens) for e in current) + len(ex.tokens) > self.budget:
                    yield current
                    current = []
                current.append(ex)
            if current:
                yield current
            epoch += 1

    def _batch(self, examples) -> PackedBatch:
        # weight of predicting targets[i] = loss_weights[i + 1] of its example; the last position has weight 0
        tokens = torch.cat([e.tokens for e in examples])
        targets = torch.cat([torch.cat([e.tokens[1:], e.tokens[:1]]) for e in examples])
        weights = torch.cat([torch.cat([e.loss_weights[1:], torch.zeros(1)]) for e in examples])
        lengths = torch.tensor([len(e.tokens) for e in examples])
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).int()])
        return PackedBatch(tokens, targets, weights, cu, int(lengths.max()), len(examples),
                     self.budget - len(tokens))

    def __iter__(self):
        batches = self._global_batches()
        for _ in range(self.consumed):
            next(batches)
        while True:
            group = [next(batches) for _ in range(self.world)]
            self.consumed += self.world
            yield self._batch(group[self.rank])

    def state_dict(self):
        return {"consumed": self.consumed}

    def load_state_dict(self, state):
        self.consumed = state["consumed"]

    def reshard_from(self, states):
        """The position is global (batches consumed by all ranks), so a run of any world size continues at the
        same global batch."""
        self.consumed = states[0]["consumed"]


def fake_data(n: int = 64) -> TrainingData:
    return TrainingData(vocab_size=VOCAB, train=PatternSource(n), validation=PatternSource(8, seed=1))


def use_fake_loader(monkeypatch) -> None:
    """Routes the trainer's loader construction to :class:`GreedyLoader`."""
    import cm3leon.training.trainer as trainer_module

    def make(source, config, *, seed, rank, world_size):
        return GreedyLoader(source, tokens_per_batch=config.data.tokens_per_batch,
                            max_seq_len=config.data.max_seq_len, seed=seed, rank=rank, world_size=world_size)

    monkeypatch.setattr(trainer_module, "make_loader", make)


@pytest.fixture
def one_thread_and_fake_loader(monkeypatch):
    """The trainer on the fake loader, kernels on one thread (bit-exact resume needs deterministic sums)."""
    use_fake_loader(monkeypatch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
