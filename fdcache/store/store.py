"""An open store: creation, seed growth, shard writes and done markers, in a crash-safe order.

The format itself (arrays, keys, shard arithmetic, the binding) is :mod:`.layout`; where the
store lives is a :class:`~.location.Location`, resolved once by :meth:`Store.open` /
:meth:`Store.create` and handed to the reader (:meth:`Store.reader`) and the audit
(:mod:`.audit`).

A shard is the unit of writing: one writer per shard, its ``done`` marker after its data, so
a crash leaves at worst unmarked shards that a resume recomputes. Shard data is written with
empty chunks kept, so every done shard has its files and a missing file is damage, never
"all zeros". Creation and seed growth are crash-safe too (docs/design.md, "Crash safety"):
the group's ``zarr.json`` first carries a creation marker, replaced by the binding only when
everything else is written; ``done`` is resized last when seeds grow.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from ..codecs.spec import CodecSpec
from ..errors import StoreDataError, StoreError, StoreMismatchError
from .layout import (
    BINDING,
    CREATING,
    FORMAT_VERSION,
    MANIFEST_FIELDS,
    OLD_FORMATS,
    REPLACING,
    ArrayDecl,
    Shards,
    StoreInfo,
    decode_paths,
    encode_paths,
    manifest_chunk,
    sample_arrays,
    shard_key,
    store_arrays,
    view_set_sha256,
    views_sha256,
)
from .location import Location, Occupancy
from .manifest import Manifest
from .views import sample_views

__all__ = ["Store", "manifest_columns"]

_GroupNotFound = getattr(zarr.errors, "GroupNotFoundError", FileNotFoundError)
_KEEP_EMPTY = {"write_empty_chunks": True}


class Store:
    """An open fdcache store. Create with :meth:`create`, open with :meth:`open`."""

    def __init__(self, group: zarr.Group, info: StoreInfo, location: Location):
        self.group = group
        self.info = info
        self.location = location

    @property
    def url(self) -> str:
        """The store as the user named it (path or URL)."""
        return self.location.url

    # -- shapes --------------------------------------------------------------------
    @property
    def num_seeds(self) -> int:
        """Seeds a reader may use: ``done`` is resized last when seeds grow, after the new
        seeds' views exist, so a growth cut short is invisible here."""
        return self.group["done"].shape[0]

    @property
    def shards(self) -> Shards:
        return self.info.shards

    @property
    def num_shards(self) -> int:
        return self.info.shards.count

    def shard_range(self, k: int) -> tuple[int, int]:
        return self.info.shards.range(k)

    def array_specs(self):
        """The per-sample arrays (name, dtype, per-sample shape): the codec's, and a token
        subset's kept rows (:func:`.layout.sample_arrays`)."""
        return sample_arrays(self.info)

    def arrays(self) -> list[ArrayDecl]:
        """Every per-seed array of this store (:func:`.layout.store_arrays`)."""
        return store_arrays(self.info)

    # -- create / open -------------------------------------------------------------
    @classmethod
    def create(cls, location: "str | Location", info: StoreInfo, manifest: Manifest, seeds: int,
               overwrite: bool = False, occupancy: Occupancy | None = None,
               views_from: "Store | None" = None) -> "Store":
        """Create the store at ``location``: an absent or empty location, fdcache's own
        unfinished creation, or (with ``overwrite``) a finished fdcache store. Anything else is
        refused naming what is there; nothing fdcache did not write is ever deleted.
        ``occupancy``: what :meth:`Location.occupancy` found, when the caller already looked.
        ``views_from``: copy that store's recorded views (its first ``seeds``) instead of
        drawing them; the binding records their hashes either way."""
        loc = Location.resolve(location)
        occ = occupancy or loc.occupancy()
        occ.refuse_unless_ours(loc.url, overwrite)
        zs = loc.zarr_store(read_only=False)
        try:
            # 1. The creation marker, in one atomic write of the group's zarr.json: from here
            #    on the location is provably fdcache's, so a re-run may redo it.
            if occ.state in ("absent", "empty"):
                group = zarr.create_group(zs, attributes={CREATING: info.to_dict()})
            else:  # the marker keeps naming what it replaces, so a cut removal is finished too
                group = zarr.open_group(zs, mode="r+")
                replacing = sorted(set(occ.entries) - {"zarr.json"} | set(group.attrs.get(REPLACING, [])))
                group.attrs.put({CREATING: info.to_dict(), REPLACING: replacing})
            # 2. Remove what a replaced store or an interrupted creation left (fdcache's only:
            #    the occupancy check refused any entry it did not write).
            for name in occ.entries:
                if name != "zarr.json":
                    _remove(zs, name)
            # 3. Arrays, manifest and views; 4. the binding replaces the marker, last.
            store = cls(group, info, loc)
            store._create_arrays(manifest, seeds)
            hashes = store.write_views(manifest, range(seeds), source=views_from)
            store.info = info = replace(info, views_sha256=tuple(hashes),
                                        views_from=views_from.url if views_from is not None else info.views_from)
            group.attrs.put({BINDING: info.to_dict()})
        except OSError as e:
            raise StoreError(f"creating the store at {loc.url} failed: {e}. Fix the cause and re-run the "
                             "same command: it recognises its unfinished store and redoes it.") from e
        return store

    def _create_arrays(self, manifest: Manifest, seeds: int) -> None:
        group, info = self.group, self.info
        for a in store_arrays(info):
            chunks, shards = a.chunking(info.shards)
            group.create_array(a.name, shape=a.full_shape(seeds, info.shards), dtype=a.dtype, chunks=chunks,
                               shards=shards, compressors=_compressors(info.codec if a.codec else CodecSpec()),
                               fill_value=a.fill, dimension_names=list(a.dims))
        m = group.create_group("manifest")
        for name, a in manifest_columns(manifest).items():  # every chunk written, so a missing one is damage
            arr = m.create_array(name, shape=a.shape, dtype=a.dtype, chunks=(manifest_chunk(name, len(a)),),
                                 compressors=_compressors(CodecSpec()))
            arr.with_config(_KEEP_EMPTY)[:] = a
        m.attrs.put({"classes": list(manifest.classes), "root": str(Path(manifest.root).resolve())})

    @classmethod
    def open(cls, location: "str | Location", mode: str = "r") -> "Store":
        """Open an existing store.

        ``location``: a path, a ``file://`` or fsspec URL (``s3://bucket/prefix/x.zarr``), or a
        resolved :class:`Location`. ``mode``: ``"r"`` (read) or ``"r+"`` (extract, repair).
        Raises :class:`StoreError` naming what is wrong: nothing there, not an fdcache store, an
        interrupted creation (with the command that finishes it), another format version."""
        loc = Location.resolve(location)
        url = loc.url
        try:
            group = zarr.open_group(loc.zarr_store(read_only=mode == "r"), mode=mode)
            attrs = group.attrs.asdict()
        except (FileNotFoundError, NotADirectoryError, _GroupNotFound) as e:
            raise StoreError(f"no fdcache store at {url}: {e}") from e
        except Exception as e:  # truncated or edited zarr.json
            raise StoreError(f"{url}: the store's metadata (zarr.json) is unreadable ({type(e).__name__}: "
                             f"{e}). Run fdcache verify {url} for the whole list.") from e
        if CREATING in attrs and BINDING not in attrs:
            raise StoreError(f"{url} is an fdcache store whose creation was interrupted: re-run the "
                             "same fdcache extract command to finish it.")
        if BINDING not in attrs:
            raise StoreError(f"{url} is a Zarr group but not an fdcache store (no 'fdcache' attribute).")
        d = attrs[BINDING]
        if not isinstance(d, dict) or d.get("format_version") != FORMAT_VERSION:
            version = d.get("format_version") if isinstance(d, dict) else None
            why = OLD_FORMATS.get(version, "it was written by a newer fdcache" if isinstance(version, int)
                                  and version > FORMAT_VERSION else "the version is unknown")
            written = d.get("fdcache_version", "?") if isinstance(d, dict) else "?"
            raise StoreError(f"{url} has store format {version}, this fdcache reads format {FORMAT_VERSION}: "
                             f"{why}. Re-extract it with this fdcache (same extract command, a new --out), "
                             f"or read it with the fdcache version that wrote it ({written}).")
        try:
            info = StoreInfo.from_dict(d)
        except Exception as e:
            raise StoreError(f"{url}: the store's 'fdcache' attribute is damaged ({type(e).__name__}: {e}); "
                             f"run fdcache verify {url}") from e
        return cls(group, info, loc)

    def check_binding(self, requested: StoreInfo) -> None:
        diffs = self.info.differences(requested)
        if diffs:
            raise StoreMismatchError(
                f"store {self.url} was made differently:\n  " + "\n  ".join(diffs) +
                "\nUse another --out, or --overwrite to replace it.")

    def grow_seeds(self, manifest: Manifest, seeds: int, views_from: "Store | None" = None) -> None:
        """Append seeds ``[S, seeds)``: every array but ``done`` is resized and the new views
        are written (drawn, or copied from ``views_from``) before ``done`` grows, so until
        then readers (and a re-run) see ``S`` seeds, and a re-run repeats these idempotent
        steps. Last, the binding records the new views' hashes (:meth:`record_views`)."""
        old = self.num_seeds
        if seeds <= old:
            return
        try:
            for a in self.arrays():  # ``done`` is last
                if a.name == "done":
                    self.write_views(manifest, range(old, seeds), source=views_from)
                arr = self.group[a.name]
                arr.resize((seeds,) + arr.shape[1:])
            self.record_views()
        except OSError as e:
            raise StoreError(f"adding seeds to {self.url} failed: {e}. Fix the cause and re-run the same "
                             "command: seed growth is redone from the start.") from e

    def write_views(self, manifest: Manifest, seeds, source: "Store | None" = None) -> list[str]:
        """Write the views of ``seeds``: drawn from the manifest (a pure function of global
        seed, seed, index and image size), or copied byte for byte from ``source``'s record.
        Returns each seed's :func:`.layout.views_sha256`."""
        views = self.group["views"]
        bad = manifest.bad
        # Unreadable files have no size; draw nothing for them (a view is keyed by its
        # index alone, so the others' views do not depend on which files are bad).
        widths, heights = np.where(bad, 1, manifest.widths), np.where(bad, 1, manifest.heights)
        hashes = []
        for s in seeds:
            if source is not None:
                v = source.views(s)
            else:
                v = sample_views(self.info.global_seed, s, widths, heights, self.info.policy)
                v[bad] = 0
            views[s] = v
            hashes.append(views_sha256(v))
        return hashes

    # -- the view set ----------------------------------------------------------------
    def views_hashes(self, seeds: int | None = None) -> list[str]:
        """:func:`.layout.views_sha256` of seeds ``0..seeds-1`` (default: all): the binding's
        record, and for seeds it does not cover (a store older than the record, a growth
        cut before its last write) computed from the ``views`` array."""
        n = self.num_seeds if seeds is None else seeds
        known = list(self.info.views_sha256[:n])
        return known + [views_sha256(self.views(s)) for s in range(len(known), n)]

    def view_set(self, seeds: int | None = None) -> str:
        """The identity of the view set of seeds ``0..seeds-1`` (:func:`.layout.view_set_sha256`)."""
        return view_set_sha256(self.info.manifest_sha256, self.views_hashes(seeds))

    def record_views(self) -> None:
        """Record the hashes of the seeds the binding does not cover yet (one rewrite of the
        group's ``zarr.json``; nothing when the record is whole). Writers only, under the
        writer lock: extract calls it whenever it opens a store."""
        if len(self.info.views_sha256) >= self.num_seeds:
            return
        self.info = replace(self.info, views_sha256=tuple(self.views_hashes()))
        attrs = self.group.attrs.asdict()
        attrs[BINDING] = self.info.to_dict()
        self.group.attrs.put(attrs)

    # -- manifest ------------------------------------------------------------------
    def manifest(self, root: str | Path | None = None) -> Manifest:
        """The image list the store is bound to; ``root``: where the images are now (default:
        where they were at extraction)."""
        try:
            m = self.group["manifest"]
            arrays = {name: m[name][:] for name in MANIFEST_FIELDS}
            paths = decode_paths(m["paths_utf8"][:], m["path_offsets"][:])
            classes, stored_root = list(m.attrs.get("classes", [])), m.attrs["root"]
        except Exception as e:
            raise StoreError(f"store {self.url}: its manifest is unreadable ({type(e).__name__}: {e}). It "
                             "cannot be repaired in place: re-extract into a new --out.") from e
        return Manifest(root=Path(root or stored_root), paths=paths, classes=classes, **arrays)

    def classes(self) -> list[str]:
        return list(self.group["manifest"].attrs.get("classes", []))

    # -- data ----------------------------------------------------------------------
    def done(self) -> np.ndarray:
        """``[S, shards]`` bool: which shards are complete."""
        try:
            return self.group["done"][:].astype(bool)
        except Exception as e:  # a damaged marker: name the repair, not zarr's internals
            raise StoreDataError(f"store {self.url}: the done markers are unreadable ({type(e).__name__}: {e}). "
                                 f"Run `fdcache verify {self.url} --repair`, then re-run the same extract.") from e

    def views(self, seed: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.group["views"][seed, start:stop]

    def write_shard(self, seed: int, k: int, arrays: dict[str, np.ndarray], skipped: np.ndarray) -> None:
        """Write one whole shard's data, then its skip flags, then its done marker. Empty
        (all-zero) chunks are written too, so a done shard always has all its files."""
        a, b = self.shard_range(k)
        for name, value in {**arrays, "skipped": skipped}.items():
            if len(value) != b - a:  # zarr would truncate or broadcast without a word
                raise StoreError(f"shard {k} of seed {seed} holds samples {a}..{b - 1} ({b - a} rows); "
                                 f"{name} has {len(value)}: a bug in the caller, nothing was written")
        for name, value in arrays.items():
            self.group[name].with_config(_KEEP_EMPTY)[seed, a:b] = value
        self.group["skipped"].with_config(_KEEP_EMPTY)[seed, a:b] = skipped.astype(np.uint8)
        self.group["done"][seed, k] = 1

    def unmark(self, seed: int, k: int) -> None:
        """Clear shard ``k``'s done marker (a fill-value write: the marker's chunk is removed,
        as before the shard was first written), so the same extract recomputes the shard."""
        self.group["done"][seed, k] = 0

    def reader(self, threads: int | None = None, done: np.ndarray | None = None,
               skipped: np.ndarray | None = None):
        """The one reader of stored arrays (:class:`~fdcache.store.reader.TargetReader`): batch
        reads of ``(seed, indices)``, checksums checked, lost data an error.

        ``threads``: read and decode threads per batch (default: up to 4). ``done``/``skipped``:
        the markers and skip flags as the caller already read them (verify reads them leniently:
        a damaged marker is one of its findings, not a reason to stop)."""
        from .reader import Layout, TargetReader

        arrays = [self.group[a.name] for a in self.array_specs()]
        layouts = [Layout.from_metadata(a.basename, a.metadata.to_dict(), a.dtype) for a in arrays]
        t, subset = self.info.teacher, self.info.token_subset
        return TargetReader(self.location, layouts, self.info.shards, self.done() if done is None else done,
                            self.skipped() if skipped is None else skipped, threads=threads,
                            token_map=None if subset.whole else (t.tokens, t.prefix_tokens))

    def read(self, seed: int, start: int, stop: int):
        """Decoded float32 targets ``[n, L, D]`` of samples ``start:stop`` of ``seed``."""
        return self.info.codec.decode(self.reader().read_range(seed, start, stop))

    def eligible(self, seed: int) -> np.ndarray:
        """Samples of ``seed`` that have a target: in a done shard and not skipped."""
        mask = np.repeat(self.done()[seed], self.info.shard_size)[: self.info.num_samples]
        return np.flatnonzero(mask & ~self.skipped(seed)).astype(np.int64)

    def stored_bytes(self) -> int:
        """Bytes the per-sample arrays take in the store (compressed, with checksums and indexes)."""
        return sum(int(self.group[a.name].nbytes_stored()) for a in self.array_specs())

    def skipped(self, seed: int | None = None) -> np.ndarray:
        a = self.group["skipped"]
        return (a[:] if seed is None else a[seed]).astype(bool)

    # -- what a done shard must have -----------------------------------------------
    def missing_data(self, keys: list[str] | None = None) -> list[tuple[int, int, str]]:
        """(seed, shard, array) of every done shard whose file is missing, from one listing
        of the store (``keys``: a listing the caller already made); no data read (a cheap
        check before training; checksums are checked on read)."""
        have = set(self.location.keys() if keys is None else keys)
        done = self.done()
        out = []
        for a in self.arrays():
            if a.data:
                for s, k in zip(*np.nonzero(done)):
                    if shard_key(a.name, int(s), int(k), len(a.shape)) not in have:
                        out.append((int(s), int(k), a.name))
        return out

    def require_done_data(self) -> None:
        """Raise :class:`StoreDataError` naming the first done shard whose data is missing."""
        missing = self.missing_data()
        if missing:
            s, k, name = missing[0]
            a, b = self.shard_range(k)
            raise StoreDataError(
                f"store {self.url}: {len(missing)} shard file(s) marked done are missing, first: {name} "
                f"of seed {s} shard {k} (samples {a}..{b - 1}). Run `fdcache verify {self.url} --repair`, "
                "then re-run the same fdcache extract command to recompute them.", seed=s, shard=k,
                samples=(a, b))


def manifest_columns(manifest: Manifest) -> dict[str, np.ndarray]:
    """The manifest as the store keeps it: column name -> array (the paths as UTF-8 bytes
    and offsets, then :data:`.layout.MANIFEST_FIELDS`)."""
    blob, offsets = encode_paths(manifest.paths)
    return {"paths_utf8": blob, "path_offsets": offsets} | {
        name: np.asarray(getattr(manifest, name)) for name in MANIFEST_FIELDS}


def _compressors(codec: CodecSpec):
    zstd = [ZstdCodec(level=codec.level)] if codec.compressor == "zstd" else []
    return zstd + [Crc32cCodec()]


def _remove(zs, name: str) -> None:
    from zarr.core.sync import sync

    if isinstance(zs, zarr.storage.LocalStore):
        sync(zs.delete(name))  # a file, or a whole directory
    else:
        sync(zs.delete_dir(name))
        sync(zs.delete(name))
