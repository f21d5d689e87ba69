"""Per-sample callbacks for DALI's ``external_source`` in training (numpy + zarr only, so
DALI's spawned workers import them without torch).

Epoch ``e`` of an offline run replays seed ``e mod S`` of the store; an online run draws
seed ``e`` (fresh views every epoch, as online FD). Sample order is a permutation keyed by
``(run_seed, epoch)``; rank ``r`` of ``W`` takes every ``W``-th sample, cut to whole batches so
all ranks run the same number of steps and the union of the ranks' ``k``-th batches is the
``k``-th global batch of a 1-process run with ``W`` times the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .views import ViewPolicy, sample_view


def epoch_order(run_seed: int, epoch: int, eligible: np.ndarray) -> np.ndarray:
    key = np.random.SeedSequence([int(run_seed), int(epoch), 0x5EED]).generate_state(2, np.uint64)
    return eligible[np.random.Generator(np.random.Philox(key=key)).permutation(len(eligible))]


def rank_slice(order: np.ndarray, rank: int, world: int, batch_size: int) -> np.ndarray:
    per_rank = len(order) // world // batch_size * batch_size
    return order[rank::world][:per_rank]


@dataclass
class TrainSource:
    """``__call__(sample_info)`` -> (encoded, window, flip, [target, [qparams]], index)."""

    files: list[str]
    eligible: dict[int, np.ndarray]  # seed -> sample indices usable for that seed
    batch_size: int
    rank: int = 0
    world: int = 1
    run_seed: int = 0
    start_epoch: int = 0
    skip_samples: int = 0  # resume inside start_epoch
    store_url: str | None = None  # offline: views and targets from the store
    num_seeds: int = 1
    with_qparams: bool = False
    # online: views drawn here
    widths: np.ndarray | None = None
    heights: np.ndarray | None = None
    policy: ViewPolicy | None = None
    global_seed: int = 0
    _cache: dict = field(default_factory=dict, repr=False)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    def seed_of(self, epoch: int) -> int:
        return epoch % self.num_seeds if self.store_url else epoch

    def samples_per_epoch(self, epoch: int) -> int:
        n = len(self.eligible[self.seed_of(epoch) if self.store_url else 0])
        return n // self.world // self.batch_size * self.batch_size

    def order(self, epoch: int) -> np.ndarray:
        """This rank's sample indices in ``epoch``, in order."""
        return self._epoch(epoch)["order"]

    def _epoch(self, epoch: int):
        c = self._cache
        if c.get("epoch") != epoch:
            seed = self.seed_of(epoch)
            eligible = self.eligible[seed if self.store_url else 0]
            c["epoch"], c["seed"] = epoch, seed
            c["order"] = rank_slice(epoch_order(self.run_seed, epoch, eligible), self.rank, self.world,
                                    self.batch_size)
            if self.store_url:
                import zarr
                g = c.get("group") or zarr.open_group(self.store_url, mode="r")
                c["group"] = g
                c["views"] = g["views"][seed]
        return c

    def __call__(self, info):
        epoch = self.start_epoch + info.epoch_idx
        c = self._epoch(epoch)
        j = info.idx_in_epoch + (self.skip_samples if info.epoch_idx == 0 else 0)
        if j >= len(c["order"]):
            raise StopIteration
        i = int(c["order"][j])
        if self.store_url:
            view = c["views"][i]
        else:
            view = sample_view(self.global_seed, c["seed"], i, int(self.widths[i]), int(self.heights[i]),
                               self.policy)
        y, x, h, w, flip = (int(v) for v in view)
        out = [np.fromfile(self.files[i], dtype=np.uint8), np.array([x, y, w, h], np.int32),
               np.array(flip, np.int32)]
        if self.store_url:
            g, s = c["group"], c["seed"]
            out.append(g["targets"][s, i])
            if self.with_qparams:
                out.append(g["qparams"][s, i])
        out.append(np.array(i, np.int64))
        return tuple(out)
