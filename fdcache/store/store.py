"""The cache: one Zarr v3 group per (teacher, dataset, view policy, codec).

Layout (``S`` seeds, ``N`` samples, ``L`` tokens, ``D`` dims, ``K`` = samples per shard)::

    <codec arrays> [S, N, *shape]  as the codec declares them (fp16: ``targets [S, N, L, D]``;
                   int8: ``targets`` int8 + ``qparams [S, N, L, 2]`` float32), inner chunk =
                   one sample-view, shard = K samples
    views    [S, N, 5]     int32 (y, x, h, w, flip) in EXIF-oriented source pixels
    skipped  [S, N]        uint8, 1 = unreadable image, its target is zeros (chunk = shard)
    done     [S, N/K]      uint8, 1 = shard complete; one chunk per marker, written last
    manifest/{paths_utf8, path_offsets, labels, widths, heights, sizes, mtimes, crc32c}, attrs: classes, root
      (paths as UTF-8 bytes + offsets: every Zarr v3 reader, tensorstore included, reads them)

Every chunk carries a crc32c checksum (and each shard index its own), so a flipped byte
fails on read. Reading goes through :meth:`Store.reader` (``reader.TargetReader``). A shard is
the unit of writing: one writer per shard, its ``done`` marker after its data, so a crash
leaves at worst unmarked shards that a resume recomputes. Shard data is written with empty
chunks kept, so every done shard has its files and a missing file is damage, never "all zeros".

Creation and seed growth are crash-safe too (docs/design.md, "Crash safety"): the group's
``zarr.json`` first carries a creation marker, replaced by the ``fdcache`` binding only when
everything else is written; ``done`` is resized last when seeds grow. Only this module (with
``reader`` and the codecs) knows array names and chunk keys; ``verify`` calls
:meth:`Store.audit` and :meth:`Store.repair`.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from .. import __version__
from ..codecs import CodecSpec
from ..errors import StoreDataError, StoreError, StoreLockedError, StoreMismatchError
from .manifest import Manifest
from ..distill.teachers import TeacherSpec
from .views import ViewPolicy, sample_views

FORMAT_VERSION = 2
# Why each older format is refused (an upgrade in place would rewrite data fdcache must not guess).
_OLD_FORMATS = {1: "format 1 keeps manifest paths as a variable-length string array that "
                   "tensorstore and other Zarr v3 readers cannot read"}
_GroupNotFound = getattr(zarr.errors, "GroupNotFoundError", FileNotFoundError)
_MANIFEST_FIELDS = ("labels", "widths", "heights", "sizes", "mtimes", "crc32c")
_CREATING = "fdcache_creating"  # group attribute while a store is being created
_OWN = ("zarr.json", "targets", "qparams", "views", "skipped", "done", "manifest")
_KEEP_EMPTY = {"write_empty_chunks": True}
LOCK_SUFFIX = ".fdcache-lock"


def _compressors(codec: CodecSpec):
    zstd = [ZstdCodec(level=codec.level)] if codec.compressor == "zstd" else []
    return zstd + [Crc32cCodec()]


@dataclass
class StoreInfo:
    """The store's binding, kept in the group attribute ``fdcache``."""

    teacher: TeacherSpec
    policy: ViewPolicy
    codec: CodecSpec
    global_seed: int
    shard_size: int
    num_samples: int
    manifest_sha256: str
    format_version: int = FORMAT_VERSION
    fdcache_version: str = __version__

    def to_dict(self) -> dict:
        return {"format_version": self.format_version, "fdcache_version": self.fdcache_version,
                "teacher": self.teacher.to_dict(), "view_policy": self.policy.to_dict(),
                "codec": self.codec.to_dict(), "global_seed": self.global_seed,
                "shard_size": self.shard_size, "num_samples": self.num_samples,
                "manifest_sha256": self.manifest_sha256}

    @classmethod
    def from_dict(cls, d: dict) -> "StoreInfo":
        return cls(teacher=TeacherSpec.from_dict(d["teacher"]),
                   policy=ViewPolicy.from_dict(d["view_policy"]),
                   codec=CodecSpec.from_dict(d["codec"]), global_seed=d["global_seed"],
                   shard_size=d["shard_size"], num_samples=d["num_samples"],
                   manifest_sha256=d["manifest_sha256"], format_version=d["format_version"],
                   fdcache_version=d.get("fdcache_version", "?"))

    def differences(self, other: "StoreInfo") -> list[str]:
        """What differs between two bindings, named field by field."""
        out = []
        a, b = self.teacher.to_dict(), other.teacher.to_dict()
        for k in a:
            if a[k] != b.get(k):
                out.append(f"teacher.{k}: store has {a[k]!r}, requested {b.get(k)!r}")
        for name in ("policy", "codec"):
            x, y = getattr(self, name).to_dict(), getattr(other, name).to_dict()
            if x != y:
                out.append(f"{name}: store has {x}, requested {y}")
        for name in ("global_seed", "shard_size", "num_samples", "manifest_sha256"):
            if getattr(self, name) != getattr(other, name):
                what = "dataset (manifest fingerprint)" if name == "manifest_sha256" else name
                out.append(f"{what}: store has {getattr(self, name)!r}, requested {getattr(other, name)!r}")
        return out


@dataclass
class Problem:
    """One finding of :meth:`Store.audit`. ``repair`` is what :meth:`Store.repair` does about
    it: ``("unmark", seed, shard)`` (the same extract then recomputes the shard),
    ``("views", seed)`` (views are redrawn from the manifest), or None (not repairable in place)."""

    text: str
    repair: tuple | None = None

    def __str__(self) -> str:
        return self.text


class Store:
    """An open fdcache store. Create with :meth:`create`, open with :meth:`open`."""

    def __init__(self, group: zarr.Group, info: StoreInfo, url: str):
        self.group = group
        self.info = info
        self.url = url

    # -- shapes --------------------------------------------------------------------
    @property
    def num_seeds(self) -> int:
        """Seeds a reader may use: ``done`` is resized last when seeds grow, after the new
        seeds' views exist, so a growth cut short is invisible here."""
        return self.group["done"].shape[0]

    def array_specs(self):
        """The codec's stored arrays (name, dtype, per-sample shape) for this store."""
        return self.info.codec.arrays(self.info.teacher.tokens, self.info.teacher.dim)

    @property
    def num_shards(self) -> int:
        return math.ceil(self.info.num_samples / self.info.shard_size)

    def shard_range(self, k: int) -> tuple[int, int]:
        a = k * self.info.shard_size
        return a, min(a + self.info.shard_size, self.info.num_samples)

    def _data_arrays(self) -> list[str]:
        return [a.name for a in self.array_specs()]

    # -- create / open -------------------------------------------------------------
    @staticmethod
    def target_state(url: str) -> tuple[str, list[str]]:
        """What is at ``url``: ``absent``, ``empty``, ``file`` (a regular file), ``store``
        (a finished fdcache store), ``creating`` (an fdcache store whose creation was cut
        short), ``unreadable`` (a ``zarr.json`` that cannot be parsed) or ``foreign``
        (anything else). Also the entries that are not fdcache's."""
        root = _store_arg(url)
        if "://" not in root:
            p = Path(root)
            if p.exists() and not p.is_dir():
                return "file", [p.name]
            if not p.exists():
                return "absent", []
        zs = _zarr_store(url, read_only=True)
        try:
            entries = sorted(sync(_collect(zs.list_dir(""))))
        except (FileNotFoundError, NotADirectoryError):
            return "absent", []
        meta = _group_attrs(zs)
        ours = [e for e in entries if _PARTIAL.search(e) or e in _OWN or
                (meta is not None and sync(zs.exists(f"{e}/zarr.json")))]
        foreign = [e for e in entries if e not in ours]
        if all(_PARTIAL.search(e) for e in entries):
            return "empty", []  # nothing, or only temporary files of an interrupted first write
        if meta is None:
            return ("unreadable" if "zarr.json" in entries else "foreign"), foreign or entries
        if "fdcache" in meta:
            return "store", foreign
        if _CREATING in meta:
            return "creating", foreign
        return "foreign", foreign or entries

    @classmethod
    def create(cls, url: str, info: StoreInfo, manifest: Manifest, seeds: int,
               overwrite: bool = False) -> "Store":
        """Create the store at ``url``: an absent or empty location, fdcache's own unfinished
        creation, or (with ``overwrite``) a finished fdcache store. Anything else is refused
        naming what is there; nothing fdcache did not write is ever deleted."""
        state, foreign = cls.target_state(url)
        refuse_unless_ours(url, state, foreign, overwrite)
        zs = _zarr_store(url, read_only=False)
        try:
            # 1. The creation marker, in one atomic write of the group's zarr.json: from here
            #    on the location is provably fdcache's, so a re-run may redo it.
            if state in ("absent", "empty"):
                group = zarr.create_group(zs, attributes={_CREATING: info.to_dict()})
            else:
                group = zarr.open_group(zs, mode="r+")
                group.attrs.put({_CREATING: info.to_dict()})
            # 2. Remove what a replaced store or an interrupted creation left (fdcache's only).
            for name in sorted(sync(_collect(zs.list_dir("")))):
                if name != "zarr.json":
                    _remove(zs, name)
            # 3. Arrays, manifest and views; 4. the binding replaces the marker, last.
            store = cls(group, info, url)
            store._create_arrays(manifest, seeds)
            store._write_views(manifest, range(seeds))
            group.attrs.put({"fdcache": info.to_dict()})
        except OSError as e:
            raise StoreError(f"creating the store at {url} failed: {e}. Fix the cause and re-run the "
                             "same command: it recognises its unfinished store and redoes it.") from e
        return store

    def _create_arrays(self, manifest: Manifest, seeds: int) -> None:
        group, info = self.group, self.info
        t, n, k = info.teacher, info.num_samples, info.shard_size
        comp = _compressors(info.codec)
        for a in info.codec.arrays(t.tokens, t.dim):
            group.create_array(a.name, shape=(seeds, n, *a.shape), dtype=a.dtype, chunks=(1, 1, *a.shape),
                               shards=(1, k, *a.shape), compressors=comp, fill_value=0,
                               dimension_names=["seed", "sample", *a.dims])
        group.create_array("views", shape=(seeds, n, 5), dtype="int32", chunks=(1, min(n, 1 << 16), 5),
                           compressors=_compressors(CodecSpec()), fill_value=-1,
                           dimension_names=["seed", "sample", "yxhwf"])
        group.create_array("skipped", shape=(seeds, n), dtype="uint8", chunks=(1, k),
                           compressors=[Crc32cCodec()], fill_value=0, dimension_names=["seed", "sample"])
        group.create_array("done", shape=(seeds, math.ceil(n / k)), dtype="uint8", chunks=(1, 1),
                           compressors=[Crc32cCodec()], fill_value=0, dimension_names=["seed", "shard"])
        m = group.create_group("manifest")
        blob, offsets = _encode_paths(manifest.paths)
        for name, a in (("paths_utf8", blob), ("path_offsets", offsets)):
            m.create_array(name, shape=a.shape, dtype=a.dtype, chunks=(max(1, min(len(a), 1 << 22)),),
                           compressors=_compressors(CodecSpec())).with_config(_KEEP_EMPTY)[:] = a
        for name in _MANIFEST_FIELDS:  # every chunk written, so a missing one is damage
            a = np.asarray(getattr(manifest, name))
            arr = m.create_array(name, shape=(n,), dtype=a.dtype, chunks=(min(n, 1 << 16),),
                                 compressors=_compressors(CodecSpec()))
            arr.with_config(_KEEP_EMPTY)[:] = a
        m.attrs.put({"classes": list(manifest.classes), "root": str(Path(manifest.root).resolve())})

    @classmethod
    def open(cls, url: str, mode: str = "r") -> "Store":
        try:
            group = zarr.open_group(_store_arg(url), mode=mode)
            attrs = group.attrs.asdict()
        except (FileNotFoundError, NotADirectoryError, _GroupNotFound) as e:
            raise StoreError(f"no fdcache store at {url}: {e}") from e
        except Exception as e:  # truncated or edited zarr.json
            raise StoreError(f"{url}: the store's metadata (zarr.json) is unreadable ({type(e).__name__}: "
                             f"{e}). Run fdcache verify {url} for the whole list.") from e
        if _CREATING in attrs and "fdcache" not in attrs:
            raise StoreError(f"{url} is an fdcache store whose creation was interrupted: re-run the "
                             "same fdcache extract command to finish it.")
        if "fdcache" not in attrs:
            raise StoreError(f"{url} is a Zarr group but not an fdcache store (no 'fdcache' attribute).")
        d = attrs["fdcache"]
        if not isinstance(d, dict) or d.get("format_version") != FORMAT_VERSION:
            version = d.get("format_version") if isinstance(d, dict) else None
            why = _OLD_FORMATS.get(version, "it was written by a newer fdcache" if isinstance(version, int)
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
        return cls(group, info, url)

    def check_binding(self, requested: StoreInfo) -> None:
        diffs = self.info.differences(requested)
        if diffs:
            raise StoreMismatchError(
                f"store {self.url} was made differently:\n  " + "\n  ".join(diffs) +
                "\nUse another --out, or --overwrite to replace it.")

    def grow_seeds(self, manifest: Manifest, seeds: int) -> None:
        """Append seeds ``[S, seeds)``: every array but ``done`` is resized and the new views
        are written before ``done`` grows, so until then readers (and a re-run) see ``S``
        seeds, and a re-run repeats these idempotent steps."""
        old = self.num_seeds
        if seeds <= old:
            return
        try:
            for name in self._data_arrays() + ["skipped", "views"]:
                a = self.group[name]
                a.resize((seeds,) + a.shape[1:])
            self._write_views(manifest, range(old, seeds))
            done = self.group["done"]
            done.resize((seeds,) + done.shape[1:])
        except OSError as e:
            raise StoreError(f"adding seeds to {self.url} failed: {e}. Fix the cause and re-run the same "
                             "command: seed growth is redone from the start.") from e

    def _write_views(self, manifest: Manifest, seeds) -> None:
        views = self.group["views"]
        bad = manifest.bad
        # Unreadable files have no size; draw nothing for them (a view is keyed by its
        # index alone, so the others' views do not depend on which files are bad).
        widths, heights = np.where(bad, 1, manifest.widths), np.where(bad, 1, manifest.heights)
        for s in seeds:
            v = sample_views(self.info.global_seed, s, widths, heights, self.info.policy)
            v[bad] = 0
            views[s] = v

    # -- manifest ------------------------------------------------------------------
    def manifest(self, root: str | Path | None = None) -> Manifest:
        try:
            m = self.group["manifest"]
            arrays = {name: m[name][:] for name in _MANIFEST_FIELDS}
            paths = _decode_paths(m["paths_utf8"][:], m["path_offsets"][:])
            classes, stored_root = list(m.attrs.get("classes", [])), m.attrs["root"]
        except Exception as e:
            raise StoreError(f"store {self.url}: its manifest is unreadable ({type(e).__name__}: {e}). It "
                             "cannot be repaired in place: re-extract into a new --out.") from e
        return Manifest(root=Path(root or stored_root), paths=paths, classes=classes, **arrays)

    def classes(self) -> list[str]:
        return list(self.group["manifest"].attrs.get("classes", []))

    # -- data ----------------------------------------------------------------------
    def done(self) -> np.ndarray:
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

    def reader(self, threads: int | None = None):
        """The one reader of stored arrays (see :class:`fdcache.store.reader.TargetReader`): batch reads
        of ``(seed, indices)``, checksums checked, lost data an error. ``threads``: read and
        decode threads per batch (default: up to 4)."""
        from .reader import Layout, TargetReader

        arrays = [self.group[a.name] for a in self.array_specs()]
        layouts = [Layout.from_metadata(a.basename, a.metadata.to_dict(), a.dtype) for a in arrays]
        return TargetReader(self.url, _store_arg(self.url), layouts, self.info.shard_size,
                            self.info.num_samples, self.done(), self.skipped(), threads=threads)

    def read(self, seed: int, start: int, stop: int):
        """Decoded float32 targets ``[n, L, D]`` of samples ``start:stop`` of ``seed``."""
        return self.info.codec.decode(self.reader().read_range(seed, start, stop))

    def eligible(self, seed: int) -> np.ndarray:
        """Samples of ``seed`` that have a target: in a done shard and not skipped."""
        mask = np.repeat(self.done()[seed], self.info.shard_size)[: self.info.num_samples]
        return np.flatnonzero(mask & ~self.skipped(seed)).astype(np.int64)

    def stored_bytes(self) -> int:
        """Bytes the codec's arrays take in the store (compressed, with checksums and indexes)."""
        return sum(int(self.group[a.name].nbytes_stored()) for a in self.array_specs())

    def skipped(self, seed: int | None = None) -> np.ndarray:
        a = self.group["skipped"]
        return (a[:] if seed is None else a[seed]).astype(bool)

    # -- integrity -----------------------------------------------------------------
    def _chunk_keys(self, name: str) -> set[str]:
        arr = self.group[name]
        return set(sync(_collect(self.group.store.list_prefix(f"{arr.path}/c"))))

    @staticmethod
    def _key(arr, coords: tuple[int, ...]) -> str:
        return f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}"

    def missing_data(self) -> list[tuple[int, int, str]]:
        """(seed, shard, array) of every done shard whose file is missing: one listing per
        array, no data read (a cheap check before training; checksums are checked on read)."""
        done = self.done()
        out = []
        for name in self._data_arrays() + ["skipped"]:
            arr, have = self.group[name], self._chunk_keys(name)
            tail = (0,) * (arr.ndim - 2)
            for s, k in zip(*np.nonzero(done)):
                if self._key(arr, (int(s), int(k)) + tail) not in have:
                    out.append((int(s), int(k), name))
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

    def audit(self, progress=None) -> list[Problem]:
        """Check everything: every array's metadata against the binding, every chunk of every
        array (data and skip flags of done shards, done markers, views, manifest), and the
        manifest's fingerprint. Never raises for damage: each finding is a :class:`Problem`."""
        info, n, k_size = self.info, self.info.num_samples, self.info.shard_size
        shards = self.num_shards_safe()
        expect = {a.name: ((n, *a.shape), (1, k_size, *a.shape)) for a in self.array_specs()}
        expect |= {"skipped": ((n,), (1, k_size)), "views": ((n, 5), None), "done": ((shards,), (1, 1))}
        names = self._data_arrays() + ["skipped", "views", "done"]
        problems, arrays = [], {}
        for name in names:
            try:
                arr = self.group[name]
            except Exception as e:
                problems.append(Problem(f"{name}: array metadata missing or unreadable ({type(e).__name__}: {e})"))
                continue
            shape, chunk = expect[name]
            if tuple(arr.shape[1:]) != shape:
                problems.append(Problem(f"{name}: shape {arr.shape} does not fit the store's attributes "
                                        f"(num_samples {n}, shard_size {k_size}: expected [S, {', '.join(map(str, shape))}])"))
            elif chunk is not None and tuple(arr.shards or arr.chunks) != chunk:
                problems.append(Problem(f"{name}: chunking {arr.shards or arr.chunks} does not fit "
                                        f"shard_size {k_size} (expected {chunk})"))
            else:
                arrays[name] = arr
        if problems:
            return problems + [Problem("the store's metadata is inconsistent: nothing is trusted. Re-extract "
                                       "into a new --out (or --overwrite this one).")]
        seeds = arrays["done"].shape[0]
        for name in names[:-1]:
            if arrays[name].shape[0] < seeds:
                problems.append(Problem(f"{name}: {arrays[name].shape[0]} seed(s), done has {seeds}"))
        if problems:
            return problems
        done = self._audit_done(arrays["done"], seeds, problems)
        have = {name: self._chunk_keys(name) for name in names[:-2]}
        for s in range(seeds):
            for k in range(shards):
                a, b = self.shard_range(k)
                where = f"seed {s} shard {k} (samples {a}..{b - 1})"
                if not done[s, k]:
                    problems.append(Problem(f"{where} is not complete: re-run the same fdcache extract command"))
                else:
                    for name in names[:-2]:
                        arr = arrays[name]
                        if self._key(arr, (s, k) + (0,) * (arr.ndim - 2)) not in have[name]:
                            problems.append(Problem(f"{name} seed {s} shard {k}: marked done but its data is "
                                                    f"missing (samples {a}..{b - 1})", ("unmark", s, k)))
                            continue
                        try:
                            arr[s, a:b]
                        except Exception as e:  # checksum mismatch, truncated shard, bad codec bytes
                            problems.append(Problem(f"{name} seed {s} shard {k} (samples {a}..{b - 1}): unreadable "
                                                    f"({type(e).__name__}: {e})", ("unmark", s, k)))
                if progress is not None:
                    progress(1)
        self._audit_views(arrays["views"], seeds, problems)
        try:
            for name in ("paths_utf8", "path_offsets") + _MANIFEST_FIELDS:
                arr = self.group["manifest"][name]
                have = set(sync(_collect(self.group.store.list_prefix(f"{arr.path}/c"))))
                gone = [j for j in range(arr.cdata_shape[0])
                        if f"{arr.path}/{arr.metadata.encode_chunk_key((j,))}" not in have]
                if gone:
                    problems.append(Problem(f"manifest/{name}: chunk(s) {gone[:5]} missing. Re-extract into a "
                                            "new --out (or --overwrite this one)."))
            m = self.manifest()
            if m.fingerprint() != info.manifest_sha256:
                problems.append(Problem("manifest: its fingerprint differs from the one the store was bound to "
                                        "(edited?). Re-extract into a new --out."))
        except Exception as e:
            problems.append(Problem(f"manifest: unreadable ({type(e).__name__}: {e}). Re-extract into a new "
                                    "--out (or --overwrite this one)."))
        return problems

    def num_shards_safe(self) -> int:
        return self.num_shards if self.info.shard_size > 0 else 0

    def _audit_done(self, arr, seeds: int, problems: list[Problem]) -> np.ndarray:
        try:
            values = arr[:]
        except Exception:  # find the damaged markers one by one
            values = np.zeros(arr.shape, np.uint8)
            for s in range(seeds):
                for k in range(arr.shape[1]):
                    try:
                        values[s, k] = arr[s, k]
                    except Exception as e:
                        problems.append(Problem(f"done marker of seed {s} shard {k}: unreadable "
                                                f"({type(e).__name__})", ("unmark", s, k)))
        for s, k in zip(*np.nonzero(values > 1)):
            problems.append(Problem(f"done marker of seed {s} shard {k}: value {values[s, k]}", ("unmark", int(s), int(k))))
        return values == 1

    def _audit_views(self, arr, seeds: int, problems: list[Problem]) -> None:
        have = self._chunk_keys("views")
        for s in range(seeds):
            for j in range(arr.cdata_shape[1]):
                why = None
                if self._key(arr, (s, j, 0)) not in have:
                    why = "missing"
                else:
                    c = arr.chunks[1]
                    try:
                        arr[s, j * c:(j + 1) * c]
                    except Exception as e:
                        why = f"unreadable ({type(e).__name__})"
                if why:
                    problems.append(Problem(f"views of seed {s} (chunk {j}): {why}", ("views", s)))

    def repair(self, problems: list[Problem]) -> list[str]:
        """Apply the repairs of ``problems``: un-mark damaged shards, redraw damaged views.
        Returns what was done; the same extract command then recomputes the shards."""
        done_msgs = []
        unmark = sorted({p.repair[1:] for p in problems if p.repair and p.repair[0] == "unmark"})
        for s, k in unmark:
            self.unmark(s, k)
        if unmark:
            done_msgs.append(f"un-marked {len(unmark)} shard(s): " +
                             ", ".join(f"seed {s} shard {k}" for s, k in unmark[:10]))
        seeds = sorted({p.repair[1] for p in problems if p.repair and p.repair[0] == "views"})
        if seeds:
            self._write_views(self.manifest(), seeds)
            done_msgs.append(f"redrew the views of seed(s) {seeds}")
        return done_msgs


def refuse_unless_ours(url: str, state: str, foreign: list[str], overwrite: bool) -> None:
    """The overwrite rule: fdcache replaces only what is provably its own (a store, or its
    own interrupted creation) or an empty location, and never when the store directory
    also holds files fdcache did not write."""
    shown = ", ".join(foreign[:5]) + (f" ... ({len(foreign)} entries)" if len(foreign) > 5 else "")
    if state == "file":
        raise StoreError(f"--out {url} is a file, not a store directory: choose another --out.")
    if state == "foreign":
        raise StoreError(f"--out {url} is not empty and is not an fdcache store (it holds {shown}). "
                         "fdcache never deletes what it did not write, with or without --overwrite: "
                         "choose another --out, or move those files away yourself.")
    if state == "unreadable":
        raise StoreError(f"--out {url} holds a zarr.json that cannot be read, so fdcache cannot prove it wrote "
                         f"what is there and will not delete it. `fdcache verify {url}` says more; to start "
                         "over, move it away yourself or choose another --out.")
    if state == "store" and not overwrite:
        raise StoreError(f"{url} is already an fdcache store; pass --overwrite to replace it.")
    if foreign:
        raise StoreError(f"the fdcache store at {url} also holds entries fdcache did not write ({shown}); "
                         "it will not replace the store and delete them. Move them away first.")


class WriterLock:
    """One writer per store: an advisory ``fcntl.flock`` on ``<store>.fdcache-lock`` next to
    the store, holding the holder's host and pid. Rank 0 of a torchrun job takes it for
    the whole job (its ranks share it); a second job is refused naming the holder. Local
    stores only (object stores have no advisory locks). The kernel drops the lock when its
    process dies, so a killed run leaves no stale lock."""

    def __init__(self, url: str):
        root = _store_arg(url)
        self.url = url
        self.path = None if "://" in root else Path(root.rstrip("/") + LOCK_SUFFIX)
        self.fd = None

    def __enter__(self) -> "WriterLock":
        if self.path is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown holder"
            os.close(fd)
            raise StoreLockedError(f"{self.url} is being written by another fdcache process ({holder}). "
                                   "Wait for it to finish, or stop it; then re-run.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")


def remove_interrupted_writes(url: str) -> list[str]:
    """Delete the temporary ``<key>.<uuid>.partial`` files zarr's LocalStore leaves when its
    writer is killed between writing one and renaming it into place (the data they held is
    rewritten on resume: their shard has no done marker). Local stores only; call while no
    writer runs. Returns the removed keys."""
    root = _store_arg(url)
    if "://" in root:
        return []
    gone = []
    for p in Path(root).rglob("*.partial"):
        if _PARTIAL.search(p.name):
            p.unlink()
            gone.append(p.relative_to(root).as_posix())
    return gone


async def _collect(aiter) -> list:
    return [x async for x in aiter]


def _zarr_store(url: str, read_only: bool):
    root = _store_arg(url)
    if "://" in root:
        return zarr.storage.FsspecStore.from_url(root, read_only=read_only)
    return zarr.storage.LocalStore(root, read_only=read_only)


def _group_attrs(zs) -> dict | None:
    """The group's attributes, or None when its zarr.json is absent or unreadable."""
    try:
        buf = sync(zs.get("zarr.json", prototype=default_buffer_prototype()))
        meta = json.loads(buf.to_bytes()) if buf is not None else None
    except Exception:
        return None
    if not isinstance(meta, dict) or meta.get("node_type") != "group":
        return None
    attrs = meta.get("attributes", {})
    return attrs if isinstance(attrs, dict) else None


def _remove(zs, name: str) -> None:
    if isinstance(zs, zarr.storage.LocalStore):
        sync(zs.delete(name))  # a file, or a whole directory
    else:
        sync(zs.delete_dir(name))
        sync(zs.delete(name))


def _encode_paths(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 bytes of all paths back to back, and ``offsets [N+1]`` (path i = bytes[o[i]:o[i+1]])."""
    encoded = [p.encode() for p in paths]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), np.uint8).copy(), offsets


def _decode_paths(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
    data = blob.tobytes()
    return [data[a:b].decode() for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def _store_arg(url: str):
    """Local paths (and file:// URLs) go to zarr's LocalStore, other URLs to fsspec."""
    url = str(url)
    if url.startswith("file://"):
        return url[len("file://"):]
    return url if "://" in url else str(Path(url))

