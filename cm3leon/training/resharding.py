"""Resuming packed loaders at another world size."""
from __future__ import annotations

import numpy as np

from cm3leon.data.packing import PackedLoader

__all__ = ["ReshardableLoader"]


class ReshardableLoader(PackedLoader):
    """A :class:`PackedLoader` that can also resume from the states of a run with another number of ranks.

    :meth:`reshard_from` takes every old rank's ``state_dict()``, works out which examples of the
    unfinished epochs were consumed by any rank, and gives this rank an equal share of the rest (in the
    epoch's order); later epochs are split the usual way. Nothing is repeated or skipped; the batches
    differ from an uninterrupted run (other packing and order), so the loss curve is not bit-identical.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._pending: dict[int, np.ndarray] = {}  # epoch -> this rank's remaining source indices
        self._done: dict[int, list[int]] = {}  # epoch -> indices consumed before the last reshard

    def epoch_indices(self, epoch: int) -> np.ndarray:
        if epoch in self._pending:
            return self._pending[epoch]
        return super().epoch_indices(epoch)

    def _order(self, epoch: int, rank: int, world_size: int) -> np.ndarray:
        return PackedLoader(self.source, tokens_per_batch=self.tokens_per_batch, max_seq_len=self.max_seq_len,
                            seed=self.seed, rank=rank, world_size=world_size).epoch_indices(epoch)

    def state_dict(self) -> dict:
        live = {e: p for e, p in self._pending.items() if e >= self._epoch}
        return {**super().state_dict(), "pending": {e: p.tolist() for e, p in live.items()},
                "done": {e: d for e, d in self._done.items() if e in live}}

    def load_state_dict(self, state_dict: dict) -> None:
        pending = state_dict.get("pending", {})
        self._pending = {int(e): np.asarray(p, dtype=np.int64) for e, p in pending.items()}
        self._done = {int(e): list(d) for e, d in state_dict.get("done", {}).items()}
        if self._pending.get(state_dict.get("epoch"), [None]).__len__() == 0:
            self._epoch, self._index = state_dict["epoch"], 0  # an empty share: starts on the next epoch
            return
        super().load_state_dict({"pending": {}, "done": {}, **state_dict})

    def reshard_from(self, states: list[dict]) -> None:
        """Continues a run whose ``len(states)`` ranks saved ``states`` (rank order)."""
        old_world = len(states)
        for r, s in enumerate(states):
            if s["rank"] != r or s["world_size"] != old_world or s["seed"] != self.seed or \
                    s["source_len"] != len(self.source):
                raise ValueError(f"states[{r}] does not come from rank {r} of a {old_world}-rank run with "
                                 f"this seed and source")
        lo, hi = min(s["epoch"] for s in states), max(s["epoch"] for s in states)
        pending: dict[int, np.ndarray] = {}
        done: dict[int, list[int]] = {}
        for epoch in range(lo, hi + 1):
            consumed: set[int] = set()
            for r, s in enumerate(states):
                consumed.update(s.get("done", {}).get(epoch, ()))
                share = s.get("pending", {}).get(epoch)
                share = self._order(epoch, r, old_world) if share is None else share
                if epoch < s["epoch"]:
                    consumed.update(int(i) for i in share)
                elif epoch == s["epoch"]:
                    consumed.update(int(i) for i in share[: s["index"]])
            rest = [int(i) for i in self._order(epoch, 0, 1) if int(i) not in consumed]
            pending[epoch] = np.asarray(rest[self.rank::self.world_size], dtype=np.int64)
            done[epoch] = sorted(consumed)
        self._pending, self._done = pending, done
        self._shard_cache = None
        self._epoch, self._index = lo, 0
