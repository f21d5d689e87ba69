"""The store: one Zarr v3 group per (teacher, dataset, view policy, codec).

Files show the format: :mod:`.layout` (the binding, the arrays, chunk keys, shard
arithmetic), :mod:`.location` (where a store lives, resolved once; what is there; the
overwrite rule), :mod:`.store` (create, grow seeds, write shards, done markers),
:mod:`.audit` (verify and repair), :mod:`.reader` (batch reads: the only read path),
:mod:`.manifest`, :mod:`.views`, :mod:`.dataset` (a torch ``Dataset``) and :mod:`.inspect`.
Names below load on first use, so DALI's source workers import the reader without torch.
"""

import importlib

_LAZY = {"Store": "store", "StoreInfo": "layout", "TeacherSpec": "layout", "Location": "location",
         "TargetReader": "reader", "StoreDataset": "dataset"}
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
