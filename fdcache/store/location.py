"""Where a store lives, decided once: a local directory or an fsspec URL, the zarr store
that reads and writes it, its lock file, and what is there now.

:meth:`Location.resolve` is the one place that classifies a location (timm's
``_resolve_pretrained_source`` is the pattern: where to load from is decided once, then
handed on); :class:`~fdcache.store.store.Store`, the reader, audit and extract take the
:class:`Location` it returns. :meth:`Location.occupancy` looks at what is there with one
read of the group's ``zarr.json`` and one listing (on ``s3://`` that is two requests,
whatever the store holds), and :class:`Occupancy` holds the overwrite rule.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import StoreError, StoreLockedError
from ..lock import LOCK_SUFFIX, AdvisoryLock
from .layout import BINDING, CREATING, FIXED_ENTRIES, REPLACING, StoreInfo, sample_arrays

__all__ = ["LOCK_SUFFIX", "Location", "Occupancy", "is_partial"]

# zarr's LocalStore writes <key>.<uuid hex>.partial, then renames it into place.
_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")


def is_partial(key: str) -> bool:
    """A temporary file of a write that was cut short (LocalStore's ``<key>.<uuid>.partial``)."""
    return bool(_PARTIAL.search(key))


@dataclass(frozen=True)
class Location:
    """``url``: as the user gave it (for messages); ``root``: the local path or the remote URL."""

    url: str
    root: str
    remote: bool

    @classmethod
    def resolve(cls, url: "str | os.PathLike | Location") -> "Location":
        """Local paths and ``file://`` URLs are directories (zarr's LocalStore); any other URL
        goes to fsspec (``s3://``, ``gs://``, ...)."""
        if isinstance(url, Location):
            return url
        url = str(url)
        if url.startswith("file://"):
            return cls(url, url[len("file://"):], False)
        if "://" in url:
            return cls(url, url, True)
        return cls(url, str(Path(url)), False)

    # -- access ----------------------------------------------------------------------
    def zarr_store(self, read_only: bool = True):
        import zarr

        if self.remote:
            return zarr.storage.FsspecStore.from_url(self.root, read_only=read_only)
        return zarr.storage.LocalStore(self.root, read_only=read_only)

    def path_of(self, key: str) -> str:
        """The local file of ``key`` (local stores only)."""
        return os.path.join(self.root, *key.split("/"))

    def writer_lock(self) -> AdvisoryLock:
        """One writer per store: ``STORE.fdcache-lock`` next to the store (none for remote
        stores: object stores have no advisory locks)."""
        if self.remote:
            return AdvisoryLock(None, self.url, error=StoreLockedError)
        return AdvisoryLock.beside(self.root, self.url, error=StoreLockedError)

    def free_space(self) -> tuple[int, int] | None:
        """``(free bytes, allocation block)`` of the filesystem the store is on (or will be:
        from its nearest existing folder), as ``shutil.disk_usage`` and ``statvfs`` report
        them; None for a remote store (an object store reports no free space)."""
        if self.remote:
            return None
        p = Path(self.root).absolute()
        while not p.exists() and p != p.parent:
            p = p.parent
        return shutil.disk_usage(p).free, os.statvfs(p).f_frsize

    def used_bytes(self) -> int:
        """Bytes the files under a local store take on disk now (0 when absent or remote)."""
        if self.remote or not Path(self.root).is_dir():
            return 0
        return sum(p.lstat().st_blocks * 512 for p in Path(self.root).rglob("*") if p.is_file())

    def keys(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` (one recursive listing)."""
        from zarr.core.sync import sync

        return sync(_collect(self.zarr_store().list_prefix(prefix)))

    def group_attrs(self) -> dict | None:
        """The group's attributes, or None when its zarr.json is absent or unreadable."""
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        try:
            buf = sync(self.zarr_store().get("zarr.json", prototype=default_buffer_prototype()))
            meta = json.loads(buf.to_bytes()) if buf is not None else None
        except Exception:  # noqa: BLE001 -- any unreadable zarr.json is "not ours to judge"
            return None
        if not isinstance(meta, dict) or meta.get("node_type") != "group":
            return None
        attrs = meta.get("attributes", {})
        return attrs if isinstance(attrs, dict) else None

    # -- what is there -----------------------------------------------------------------
    def occupancy(self) -> "Occupancy":
        """What is at this location: one read of ``zarr.json``, then one listing (the whole
        store when it carries fdcache's binding or creation marker, so that the caller can
        check its shards without listing again; the top level otherwise)."""
        from zarr.core.sync import sync

        if not self.remote:
            p = Path(self.root)
            if p.exists() and not p.is_dir():
                return Occupancy("file", [p.name], [])
            if not p.exists():
                return Occupancy("absent", [], [])
        attrs = self.group_attrs()
        ours_marked = attrs is not None and (BINDING in attrs or CREATING in attrs)
        zs = self.zarr_store()
        try:
            if ours_marked:
                keys = sync(_collect(zs.list_prefix("")))
                entries = sorted({k.split("/", 1)[0] for k in keys})
            else:
                keys, entries = [], sorted(sync(_collect(zs.list_dir(""))))
        except (FileNotFoundError, NotADirectoryError):
            return Occupancy("absent", [], [])
        nodes = {k.split("/", 1)[0] for k in keys if k.endswith("/zarr.json")}
        named = _named_entries(attrs) if ours_marked else set()
        ours = [e for e in entries if is_partial(e) or e in FIXED_ENTRIES or e in nodes or e in named]
        foreign = [e for e in entries if e not in ours]
        if all(is_partial(e) for e in entries):
            return Occupancy("empty", [], entries, keys)  # nothing, or only temporary files
        if attrs is None:
            return Occupancy("unreadable" if "zarr.json" in entries else "foreign", foreign or entries, entries)
        if BINDING in attrs:
            return Occupancy("store", foreign, entries, keys)
        if CREATING in attrs:
            return Occupancy("creating", foreign, entries, keys)
        return Occupancy("foreign", foreign or entries, entries)

    def remove_interrupted_writes(self) -> list[str]:
        """Delete the temporary ``<key>.<uuid>.partial`` files zarr's LocalStore leaves when
        its writer is killed between writing one and renaming it into place (the data they
        held is rewritten on resume: their shard has no done marker). Local stores only;
        call while holding the writer lock. Returns the removed keys."""
        if self.remote:
            return []
        gone = []
        for p in Path(self.root).rglob("*.partial"):
            if is_partial(p.name):
                p.unlink()
                gone.append(p.relative_to(self.root).as_posix())
        return gone


@dataclass
class Occupancy:
    """What :meth:`Location.occupancy` found. ``state``: ``absent``, ``empty``, ``file`` (a
    regular file), ``store`` (a finished fdcache store), ``creating`` (fdcache's own
    interrupted creation), ``unreadable`` (a ``zarr.json`` that cannot be parsed) or
    ``foreign`` (anything else). ``foreign``: the entries fdcache did not write; ``entries``:
    the top-level entries; ``keys``: every key, when the store is fdcache's (else empty)."""

    state: str
    foreign: list[str]
    entries: list[str]
    keys: list[str] = field(default_factory=list)

    def refuse_unless_ours(self, url: str, overwrite: bool) -> None:
        """The overwrite rule: fdcache replaces only what is provably its own (a store, or its
        own interrupted creation) or an empty location, and never when the store directory
        also holds files fdcache did not write."""
        foreign = self.foreign
        shown = ", ".join(foreign[:5]) + (f" ... ({len(foreign)} entries)" if len(foreign) > 5 else "")
        if self.state == "file":
            raise StoreError(f"--out {url} is a file, not a store directory: choose another --out.")
        if self.state == "foreign":
            raise StoreError(f"--out {url} is not empty and is not an fdcache store (it holds {shown}). "
                             "fdcache never deletes what it did not write, with or without --overwrite: "
                             "choose another --out, or move those files away yourself.")
        if self.state == "unreadable":
            raise StoreError(f"--out {url} holds a zarr.json that cannot be read, so fdcache cannot prove it "
                             f"wrote what is there and will not delete it. `fdcache verify {url}` says more; to "
                             "start over, move it away yourself or choose another --out.")
        if self.state == "store" and not overwrite:
            raise StoreError(f"{url} is already an fdcache store; pass --overwrite to replace it.")
        if foreign:
            raise StoreError(f"the fdcache store at {url} also holds entries fdcache did not write ({shown}); "
                             "it will not replace the store and delete them. Move them away first.")


def _named_entries(attrs: dict) -> set[str]:
    """The entries a binding or creation marker names as fdcache's: its per-sample arrays, and
    (while a store is being replaced) the entries of the store it replaces."""
    names = set(attrs.get(REPLACING, []))
    for key in (BINDING, CREATING):
        try:
            info = StoreInfo.from_dict(attrs[key])
            names |= {a.name for a in sample_arrays(info)}
        except Exception:  # noqa: BLE001 -- absent or damaged: it names nothing
            pass
    return names


async def _collect(aiter) -> list:
    return [x async for x in aiter]
