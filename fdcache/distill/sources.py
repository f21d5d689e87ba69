"""Batch callbacks for DALI's ``external_source`` in training (numpy + zarr only, so DALI's
spawned workers import them without torch). Offline targets come from the store's reader,
one batch read per call (many chunk reads in flight), never a zarr call per sample.

Epoch ``e`` of an offline run replays seed ``e mod S`` of the store (``S``: its seeds, or the
first ``seeds`` of them: a store's seeds ``0..S-1`` are exactly the store an extract with
``--seeds S`` makes, so one store serves every smaller S); an online run draws
seed ``e`` (fresh views every epoch, as online FD). Sample order is a permutation keyed by
``(run_seed, epoch)``, each rank takes its slice (:mod:`fdcache.sampling`).

Several stores (one teacher each, one view set: ``train --cache A --cache B``): each call
reads the batch's arrays from every store for the same (seed, indices); the views come
from the first (the stores hold the same ones, checked before training starts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..sampling import epoch_order, rank_slice
from ..store.reader import TargetReader
from ..store.views import ViewPolicy, sample_view

__all__ = ["TrainSource"]


@dataclass
class TrainSource:
    """``__call__(batch_info)`` -> (encoded[B], window [B, 4], flip [B], *stored arrays of
    each store in turn, index [B])."""

    files: list[str]
    eligible: dict[int, np.ndarray]  # seed -> sample indices usable for that seed
    batch_size: int
    rank: int = 0
    world: int = 1
    run_seed: int = 0
    start_epoch: int = 0
    skip_samples: int = 0  # resume inside start_epoch (a whole number of batches)
    readers: list[TargetReader] = field(default_factory=list)  # offline: one per store, views from the first
    seeds: int | None = None  # offline: replay the store's first ``seeds`` seeds only (None: all)
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

    @property
    def offline(self) -> bool:
        return bool(self.readers)

    @property
    def reader(self) -> TargetReader | None:
        """The first store's reader: the views and the seed count."""
        return self.readers[0] if self.readers else None

    @property
    def num_seeds(self) -> int:
        if not self.offline:
            return 1
        return self.reader.num_seeds if self.seeds is None else min(self.seeds, self.reader.num_seeds)

    def seed_of(self, epoch: int) -> int:
        return epoch % self.num_seeds if self.offline else epoch

    def samples_per_epoch(self, epoch: int) -> int:
        n = len(self.eligible[self.seed_of(epoch) if self.offline else 0])
        return n // self.world // self.batch_size * self.batch_size

    def order(self, epoch: int) -> np.ndarray:
        """This rank's sample indices in ``epoch``, in order."""
        return self._epoch(epoch)["order"]

    def _epoch(self, epoch: int):
        c = self._cache
        if c.get("epoch") != epoch:
            seed = self.seed_of(epoch)
            eligible = self.eligible[seed if self.offline else 0]
            c["epoch"], c["seed"] = epoch, seed
            c["order"] = rank_slice(epoch_order(self.run_seed, epoch, eligible), self.rank, self.world,
                                    self.batch_size)
            if self.offline:
                c["views"] = self.reader.views(seed)
        return c

    def views_of(self, epoch: int, idx: np.ndarray) -> np.ndarray:
        """The views ``[len(idx), 5]`` (y, x, h, w, flip) of samples ``idx`` in ``epoch``:
        recorded in the store (offline), or drawn here (online)."""
        c = self._epoch(epoch)
        if self.offline:
            return c["views"][idx]
        return np.array([sample_view(self.global_seed, c["seed"], int(i), int(self.widths[i]),
                                     int(self.heights[i]), self.policy) for i in idx], np.int32).reshape(-1, 5)

    def __call__(self, info):
        epoch = self.start_epoch + info.epoch_idx
        c = self._epoch(epoch)
        j = info.iteration * self.batch_size + (self.skip_samples if info.epoch_idx == 0 else 0)
        if j + self.batch_size > len(c["order"]):
            raise StopIteration
        idx = c["order"][j:j + self.batch_size]
        views = self.views_of(epoch, idx)
        encoded = [np.fromfile(self.files[i], dtype=np.uint8) for i in idx]
        windows = np.ascontiguousarray(views[:, [1, 0, 3, 2]], dtype=np.int32)  # (x, y, w, h)
        flips = np.ascontiguousarray(views[:, 4], dtype=np.int32)
        stored = []
        if self.offline:  # DALI copies each batch out, so one buffer serves every call
            if c.get("out") is None:
                c["out"] = [r.empty(self.batch_size) for r in self.readers]
            for r, out in zip(self.readers, c["out"]):
                stored += list(r.read(c["seed"], idx, out=out).values())
        return (encoded, windows, flips, *stored, np.ascontiguousarray(idx, dtype=np.int64))
