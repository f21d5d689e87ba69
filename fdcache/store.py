"""The cache: one Zarr v3 group per (teacher, dataset, view policy, codec).

Layout (``S`` seeds, ``N`` samples, ``L`` tokens, ``D`` dims, ``K`` = samples per shard)::

    <codec arrays> [S, N, *shape]  as the codec declares them (fp16: ``targets [S, N, L, D]``;
                   int8: ``targets`` int8 + ``qparams [S, N, L, 2]`` float32), inner chunk =
                   one sample-view, shard = K samples
    views    [S, N, 5]     int32 (y, x, h, w, flip) in EXIF-oriented source pixels
    skipped  [S, N]        uint8, 1 = unreadable image, its target is zeros (chunk = shard)
    done     [S, N/K]      uint8, 1 = shard complete; one chunk per marker, written last
    manifest/{paths_utf8, path_offsets, labels, widths, heights, sizes, mtimes}, attrs: classes, root
      (paths as UTF-8 bytes + offsets: every Zarr v3 reader, tensorstore included, reads them)

Every chunk carries a crc32c checksum (and each shard index its own), so a flipped byte
fails on read. Reading goes through :meth:`Store.reader` (``reader.TargetReader``). A shard is
the unit of writing: one writer per shard, its ``done`` marker
after its data, so a crash leaves at worst unmarked shards that a resume recomputes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from . import __version__
from .codecs import CodecSpec
from .errors import StoreError, StoreMismatchError
from .manifest import Manifest
from .teachers import TeacherSpec
from .views import ViewPolicy, sample_views

FORMAT_VERSION = 2
# Why each older format is refused (an upgrade in place would rewrite data fdcache must not guess).
_OLD_FORMATS = {1: "format 1 keeps manifest paths as a variable-length string array that "
                   "tensorstore and other Zarr v3 readers cannot read"}
_GroupNotFound = getattr(zarr.errors, "GroupNotFoundError", FileNotFoundError)
_MANIFEST_FIELDS = ("labels", "widths", "heights", "sizes", "mtimes")


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


class Store:
    """An open fdcache store. Create with :meth:`create`, open with :meth:`open`."""

    def __init__(self, group: zarr.Group, info: StoreInfo, url: str):
        self.group = group
        self.info = info
        self.url = url

    # -- shapes --------------------------------------------------------------------
    @property
    def num_seeds(self) -> int:
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

    # -- create / open -------------------------------------------------------------
    @classmethod
    def create(cls, url: str, info: StoreInfo, manifest: Manifest, seeds: int,
               overwrite: bool = False) -> "Store":
        group = zarr.open_group(_store_arg(url), mode="w" if overwrite else "w-")
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
                           compressors=_compressors(CodecSpec()))[:] = a
        for name in _MANIFEST_FIELDS:
            a = np.asarray(getattr(manifest, name))
            arr = m.create_array(name, shape=(n,), dtype=a.dtype, chunks=(min(n, 1 << 16),),
                                 compressors=_compressors(CodecSpec()))
            arr[:] = a
        m.attrs["classes"] = list(manifest.classes)
        m.attrs["root"] = str(Path(manifest.root).resolve())
        store = cls(group, info, url)
        store._write_views(manifest, range(seeds))
        group.attrs["fdcache"] = info.to_dict()  # written last: a store without it is unfinished
        return store

    @classmethod
    def open(cls, url: str, mode: str = "r") -> "Store":
        try:
            group = zarr.open_group(_store_arg(url), mode=mode)
        except (FileNotFoundError, _GroupNotFound) as e:
            raise StoreError(f"no fdcache store at {url}: {e}") from e
        attrs = group.attrs.asdict()
        if "fdcache" not in attrs:
            raise StoreError(f"{url} is a Zarr group but not a finished fdcache store (no 'fdcache' "
                             "attribute; creation was interrupted?). Re-run extract with --overwrite.")
        d = attrs["fdcache"]
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            why = _OLD_FORMATS.get(version, "it was written by a newer fdcache" if isinstance(version, int)
                                   and version > FORMAT_VERSION else "the version is unknown")
            raise StoreError(f"{url} has store format {version}, this fdcache reads format {FORMAT_VERSION}: "
                             f"{why}. Re-extract it with this fdcache (same extract command, a new --out), "
                             "or read it with the fdcache version that wrote it "
                             f"({d.get('fdcache_version', '?')}).")
        return cls(group, StoreInfo.from_dict(d), url)

    def check_binding(self, requested: StoreInfo) -> None:
        diffs = self.info.differences(requested)
        if diffs:
            raise StoreMismatchError(
                f"store {self.url} was made differently:\n  " + "\n  ".join(diffs) +
                "\nUse another --out, or --overwrite to replace it.")

    def grow_seeds(self, manifest: Manifest, seeds: int) -> None:
        """Append seeds ``[S, seeds)``: views drawn now, targets marked not done."""
        old = self.num_seeds
        if seeds <= old:
            return
        for name in [a.name for a in self.array_specs()] + ["views", "skipped", "done"]:
            a = self.group[name]
            a.resize((seeds,) + a.shape[1:])
        self._write_views(manifest, range(old, seeds))

    def _write_views(self, manifest: Manifest, seeds) -> None:
        views = self.group["views"]
        for s in seeds:
            v = sample_views(self.info.global_seed, s, manifest.widths, manifest.heights, self.info.policy)
            v[manifest.bad] = 0
            views[s] = v

    # -- manifest ------------------------------------------------------------------
    def manifest(self, root: str | Path | None = None) -> Manifest:
        m = self.group["manifest"]
        arrays = {name: m[name][:] for name in _MANIFEST_FIELDS}
        return Manifest(root=Path(root or m.attrs["root"]), paths=_decode_paths(m["paths_utf8"][:], m["path_offsets"][:]),
                        classes=list(m.attrs.get("classes", [])), **arrays)

    def classes(self) -> list[str]:
        return list(self.group["manifest"].attrs.get("classes", []))

    # -- data ----------------------------------------------------------------------
    def done(self) -> np.ndarray:
        return self.group["done"][:].astype(bool)

    def views(self, seed: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.group["views"][seed, start:stop]

    def write_shard(self, seed: int, k: int, arrays: dict[str, np.ndarray], skipped: np.ndarray) -> None:
        """Write one whole shard's data, then its skip flags, then its done marker."""
        a, b = self.shard_range(k)
        for name, value in arrays.items():
            self.group[name][seed, a:b] = value
        self.group["skipped"][seed, a:b] = skipped.astype(np.uint8)
        self.group["done"][seed, k] = 1

    def reader(self, threads: int | None = None):
        """The one reader of stored arrays (see :class:`fdcache.reader.TargetReader`): batch reads
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


def exists(url: str) -> bool:
    url = _store_arg(url)
    if "://" in str(url):
        try:
            zarr.open_group(url, mode="r")
            return True
        except Exception:
            return False
    p = Path(url)
    if p.is_dir():
        return any(p.iterdir())  # an empty directory is a fine place for a new store
    return p.exists()
