"""The cache: one Zarr v3 group per (teacher, dataset, view policy, codec).

Layout (``S`` seeds, ``N`` samples, ``L`` tokens, ``D`` dims, ``K`` = samples per shard)::

    targets  [S, N, L, D]  fp16|int8, inner chunk (1, 1, L, D), shard (1, K, L, D)
    qparams  [S, N, L, 2]  float32 (int8 codec only): per-token (scale, offset)
    views    [S, N, 5]     int32 (y, x, h, w, flip) in EXIF-oriented source pixels
    skipped  [S, N]        uint8, 1 = unreadable image, its target is zeros (chunk = shard)
    done     [S, N/K]      uint8, 1 = shard complete; one chunk per marker, written last
    manifest/{paths, labels, widths, heights, sizes, mtimes}, attrs: classes, root

Every chunk carries a crc32c checksum (and each shard index its own), so a flipped byte
fails on read. A shard is the unit of writing: one writer per shard, its ``done`` marker
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

FORMAT_VERSION = 1
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
        return self.group["targets"].shape[0]

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
        group.create_array("targets", shape=(seeds, n, t.tokens, t.dim), dtype=info.codec.target_dtype,
                           chunks=(1, 1, t.tokens, t.dim), shards=(1, k, t.tokens, t.dim),
                           compressors=comp, fill_value=0, dimension_names=["seed", "sample", "token", "dim"])
        if info.codec.has_qparams:
            group.create_array("qparams", shape=(seeds, n, t.tokens, 2), dtype="float32",
                               chunks=(1, 1, t.tokens, 2), shards=(1, k, t.tokens, 2),
                               compressors=comp, fill_value=0,
                               dimension_names=["seed", "sample", "token", "scale_offset"])
        group.create_array("views", shape=(seeds, n, 5), dtype="int32", chunks=(1, min(n, 1 << 16), 5),
                           compressors=_compressors(CodecSpec()), fill_value=-1,
                           dimension_names=["seed", "sample", "yxhwf"])
        group.create_array("skipped", shape=(seeds, n), dtype="uint8", chunks=(1, k),
                           compressors=[Crc32cCodec()], fill_value=0, dimension_names=["seed", "sample"])
        group.create_array("done", shape=(seeds, math.ceil(n / k)), dtype="uint8", chunks=(1, 1),
                           compressors=[Crc32cCodec()], fill_value=0, dimension_names=["seed", "shard"])
        m = group.create_group("manifest")
        paths = m.create_array("paths", shape=(n,), dtype=str, chunks=(min(n, 1 << 16),))
        paths[:] = np.asarray(manifest.paths, dtype=object).astype(str)
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
        if d.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{url} has store format {d.get('format_version')}, this fdcache "
                             f"reads format {FORMAT_VERSION}")
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
        for name in ("targets", "qparams", "views", "skipped", "done"):
            if name in self.group:
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
        return Manifest(root=Path(root or m.attrs["root"]), paths=[str(p) for p in m["paths"][:]],
                        classes=list(m.attrs.get("classes", [])), **arrays)

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

    def read(self, seed: int, start: int, stop: int):
        """Decoded float32 targets ``[n, L, D]`` of samples ``start:stop`` of ``seed``."""
        t = self.group["targets"][seed, start:stop]
        qp = self.group["qparams"][seed, start:stop] if self.info.codec.has_qparams else None
        return self.info.codec.decode(t, qp)

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
