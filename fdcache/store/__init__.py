"""The store: one Zarr v3 group per (teacher, dataset, view policy, codec)."""

from .store import Store, StoreInfo

__all__ = ["Store", "StoreInfo"]
