"""Sample order, shared by distillation and fine-tuning: a permutation per epoch keyed by
``(run_seed, epoch)`` (no RNG state: resume and every rank recompute it), and each rank's
slice of it, cut to whole batches so that all ranks run the same number of steps and the
union of the ranks' ``k``-th batches is the ``k``-th batch of one process with ``W`` times the
batch. numpy only (DALI's spawned source workers import it)."""

from __future__ import annotations

import numpy as np

__all__ = ["epoch_order", "rank_slice"]


def epoch_order(run_seed: int, epoch: int, eligible: np.ndarray) -> np.ndarray:
    key = np.random.SeedSequence([int(run_seed), int(epoch), 0x5EED]).generate_state(2, np.uint64)
    return eligible[np.random.Generator(np.random.Philox(key=key)).permutation(len(eligible))]


def rank_slice(order: np.ndarray, rank: int, world: int, batch_size: int) -> np.ndarray:
    per_rank = len(order) // world // batch_size * batch_size
    return order[rank::world][:per_rank]
