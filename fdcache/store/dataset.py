"""A ``torch.utils.data.Dataset`` over a store, for users with their own training loop.

Item ``j`` is the ``j``-th sample of ``seed`` that has a target (done shard, readable image):
``{"index", "label", "view" (y, x, h, w, flip) int32, "target"}``, the target decoded to
float32 ``[L, D]`` (or, with ``decode=False``, the codec's stored arrays as they are, for a
loss that reads them directly). A ``DataLoader`` with ``batch_size`` fetches each batch with
one reader call (``__getitems__``), not one read per sample; workers each reopen the store.
"""

from __future__ import annotations

import numpy as np
import torch

from .store import Store

__all__ = ["StoreDataset"]


class StoreDataset(torch.utils.data.Dataset):
    def __init__(self, url: str, seed: int = 0, decode: bool = True, threads: int | None = None):
        store = Store.open(url)
        if not 0 <= seed < store.num_seeds:
            from ..errors import StoreError
            raise StoreError(f"seed {seed} is not in {url} (it has {store.num_seeds} seeds)")
        self.seed, self.decode = seed, decode
        self.codec = store.info.codec
        self.reader = store.reader(threads=threads)
        self.indices = store.eligible(seed)
        self.labels = store.manifest().labels
        self.views = self.reader.views(seed)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict:
        return self.__getitems__([j])[0]

    def __getitems__(self, js: list[int]) -> list[dict]:
        idx = self.indices[np.asarray(js, dtype=np.int64)]
        stored = {k: torch.from_numpy(v) for k, v in self.reader.read(self.seed, idx).items()}
        targets = self.codec.decode(stored) if self.decode else None
        out = []
        for r, i in enumerate(idx.tolist()):
            item = {"index": i, "label": int(self.labels[i]), "view": torch.from_numpy(self.views[i].copy())}
            item["target"] = targets[r] if self.decode else {k: v[r] for k, v in stored.items()}
            out.append(item)
        return out
