"""Resuming the packed loader at another world size: no example repeated, none skipped."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("cm3leon.data.packing")
from training_fakes import Example  # noqa: E402

from cm3leon.training.resharding import ReshardableLoader  # noqa: E402


class IndexSource:
    """Example ``i`` holds ``i`` (as its first token) and has 3-9 tokens."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Example:
        length = 3 + (i * 7) % 7
        return Example(torch.full((length,), i, dtype=torch.int64), torch.ones(length))


def _loader(source, rank, world):
    return ReshardableLoader(source, tokens_per_batch=24, max_seq_len=12, seed=3, rank=rank, world_size=world)


def _take(loader, batches):
    """Example indices of the next ``batches`` batches, in order."""
    out, it = [], iter(loader)
    for _ in range(batches):
        b = next(it)
        out.extend(int(b.tokens[s]) for s in b.cu_seqlens[:-1].tolist())
    return out


def _take_examples(loader, n):
    """The next ``n`` example indices (whole batches are drawn; the surplus is returned separately)."""
    out, it = [], iter(loader)
    while len(out) < n:
        b = next(it)
        out.extend(int(b.tokens[s]) for s in b.cu_seqlens[:-1].tolist())
    return out[:n], out[n:]


@pytest.mark.parametrize("old_world,new_world,steps",
                         [(2, 1, [3, 5]), (1, 2, [4]), (2, 3, [2, 6]), (3, 2, [1, 4, 2])])
def test_reshard_finishes_the_epoch_without_repeats_or_gaps(old_world, new_world, steps):
    source = IndexSource(101)
    old = [_loader(source, r, old_world) for r in range(old_world)]
    seen = [i for loader, k in zip(old, steps) for i in _take(loader, k)]
    # Packing can spill into the next epoch on a rank: only epoch-0 examples count here.
    states = [loader.state_dict() for loader in old]
    assert all(s["epoch"] == 0 for s in states)
    new = [_loader(source, r, new_world) for r in range(new_world)]
    for loader in new:
        loader.reshard_from(states)
    for loader in new:
        remaining = len(loader.epoch_indices(0))
        mine, _ = _take_examples(loader, remaining)
        seen.extend(mine)
    assert sorted(seen) == list(range(101))


def test_reshard_state_survives_a_same_size_save_and_load():
    source = IndexSource(101)
    old = [_loader(source, r, 2) for r in range(2)]
    for loader, k in zip(old, (2, 4)):
        _take(loader, k)
    new = _loader(source, 0, 1)
    new.reshard_from([loader.state_dict() for loader in old])
    first = _take(new, 2)
    again = _loader(source, 0, 1)
    again.load_state_dict(new.state_dict())
    twin = _loader(source, 0, 1)
    twin.reshard_from([loader.state_dict() for loader in old])
    assert _take(twin, 2) == first
    assert _take(again, 3) == _take(twin, 3)


def test_reshard_rejects_states_of_another_run():
    source = IndexSource(101)
    states = [_loader(source, r, 2).state_dict() for r in range(2)]
    with pytest.raises(ValueError, match="states\\[1\\]"):
        _loader(source, 0, 1).reshard_from([states[0], states[0]])
    other = ReshardableLoader(IndexSource(100), tokens_per_batch=24, max_seq_len=12, seed=3)
    with pytest.raises(ValueError, match="states\\[0\\]"):
        other.reshard_from(states)
