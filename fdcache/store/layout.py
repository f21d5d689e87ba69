"""The store's format, written down once: the binding record, the arrays, the chunk keys and
the shard arithmetic. Writer (:mod:`.store`), reader (:mod:`.reader`), audit (:mod:`.audit`)
and the tests all take them from here; nothing else spells a chunk key.

Layout (``S`` seeds, ``N`` samples, ``L`` tokens, ``D`` dims, ``K`` = samples per shard)::

    <codec arrays> [S, N, *shape]  as the codec declares them (fp16: ``targets [S, N, L, D]``;
                   int8: ``targets`` int8 + ``qparams [S, N, L, 2]`` float32), inner chunk =
                   one sample-view, shard = K samples
    token_rows [S, N, K]   int16, a token subset only (``extract --token-fraction``): the rows
                   of the teacher's map the codec arrays hold (K of L; :mod:`.subset`)
    views    [S, N, 5]     int32 (y, x, h, w, flip) in EXIF-oriented source pixels
    skipped  [S, N]        uint8, 1 = unreadable image, its target is zeros (chunk = shard)
    done     [S, N/K]      uint8, 1 = shard complete; one chunk per marker, written last
    manifest/{paths_utf8, path_offsets, labels, widths, heights, sizes, mtimes, crc32c}
             attrs: classes, root (paths as UTF-8 bytes + offsets: every Zarr v3 reader,
             tensorstore included, reads them)

Group attribute ``fdcache``: the binding (:class:`StoreInfo`), written last; while a store is
being created the group carries ``fdcache_creating`` instead. This module imports numpy
only (DALI's spawned source workers load the reader, and with it this module, without torch).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import __version__
from ..codecs.spec import ArraySpec, CodecSpec
from .subset import TokenSubset
from .views import ViewPolicy

__all__ = ["FORMAT_VERSION", "OLD_FORMATS", "BINDING", "CREATING", "REPLACING", "MANIFEST_FIELDS", "FIXED_ENTRIES",
           "ArrayDecl", "Shards", "StoreInfo", "TeacherSpec", "chunk_key", "parse_chunk_key", "shard_key", "sample_arrays",
           "store_arrays",
           "manifest_chunk", "encode_paths", "decode_paths", "views_sha256", "view_set_sha256", "CRC_BYTES",
           "INDEX_ENTRY_BYTES", "METADATA_BYTES", "view_bytes", "projected_files", "on_disk"]

FORMAT_VERSION = 2
# Why each older format is refused (an upgrade in place would rewrite data fdcache must not guess).
OLD_FORMATS = {1: "format 1 keeps manifest paths as a variable-length string array that "
                  "tensorstore and other Zarr v3 readers cannot read"}
BINDING = "fdcache"  # group attribute: the binding, written last
CREATING = "fdcache_creating"  # group attribute while a store is being created
REPLACING = "fdcache_replacing"  # beside it: the entries of the store being replaced (fdcache's)
MANIFEST_FIELDS = ("labels", "widths", "heights", "sizes", "mtimes", "crc32c")
# Top-level entries of every store; the codec's arrays are named by the binding.
FIXED_ENTRIES = ("zarr.json", "views", "skipped", "done", "manifest")


@dataclass(frozen=True)
class TeacherSpec:
    """The teacher a store was made with; stored in the binding, so a store can only be read
    against the teacher that wrote it.

    Its map is ``prefix_tokens`` (CLS, registers) followed by a ``rows x cols`` token grid in
    row-major order: ``tokens = prefix_tokens + rows * cols``. A ViT's grid is
    ``resolution // patch`` square; a hierarchical model's (Swin: ``[B, H, W, C]``, no prefix)
    is its last stage's. Stores written before grids were recorded lack ``rows``/``cols``: the
    square ViT grid is derived, and ``to_dict`` leaves the grid out whenever it is that one,
    so those bindings stay byte-identical and compare equal to a request for the same teacher.
    ``model_args``: timm options the teacher was built with (``--teacher-arg``), left out when
    there are none."""

    source: str  # "openclip" | "timm"
    name: str
    pretrained: str | None  # tag, local checkpoint file name, or None (random init)
    init_seed: int | None
    resolution: int
    patch: int
    tokens: int  # incl. prefix tokens (CLS)
    prefix_tokens: int
    dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_sha256: str
    layer: str = "final"
    post_norm: bool = True
    rows: int | None = None  # token grid; None: the square ViT grid resolution // patch
    cols: int | None = None
    model_args: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.rows is None or self.cols is None:
            side = self.resolution // self.patch
            object.__setattr__(self, "rows", side)
            object.__setattr__(self, "cols", side)
        # As JSON keeps them (tuples become lists), so a request equals the store it wrote.
        object.__setattr__(self, "model_args", json.loads(json.dumps(self.model_args)))
        if self.rows * self.cols + self.prefix_tokens != self.tokens:
            raise ValueError(f"teacher {self.name}: {self.tokens} tokens is not {self.prefix_tokens} prefix + "
                             f"a {self.rows}x{self.cols} grid")

    @property
    def grid(self) -> tuple[int, int]:
        return self.rows, self.cols

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if self.rows == self.cols == self.resolution // self.patch:
            del d["rows"], d["cols"]
        if not self.model_args:
            del d["model_args"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TeacherSpec":
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)

    @property
    def label(self) -> str:
        weights = self.pretrained or f"random-init(seed={self.init_seed})"
        return f"{self.source}:{self.name}/{weights}@{self.resolution}"


@dataclass(frozen=True)
class Shards:
    """``samples`` samples cut into shards of ``size``: the unit of writing, resuming and
    marking done (the last shard may be short)."""

    size: int
    samples: int

    @property
    def count(self) -> int:
        return math.ceil(self.samples / self.size) if self.size > 0 else 0

    def range(self, k: int) -> tuple[int, int]:
        """Samples ``[a, b)`` of shard ``k``."""
        a = k * self.size
        return a, min(a + self.size, self.samples)

    def describe(self, k: int) -> str:
        a, b = self.range(k)
        return f"shard {k} (samples {a}..{b - 1})"


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
    # The recorded views, per seed: sha256 of ``views[s]`` (:func:`views_sha256`). A record,
    # not a rule: it may lag the seeds (a store older than the field, a growth cut before its
    # last write), and the missing ones are computed from the array (``Store.views_hashes``).
    views_sha256: tuple[str, ...] = ()
    views_from: str | None = None  # provenance: the store whose views were copied (--views-from)
    # Binding field ``token_subset``, written only for a subset: absent = every token, so
    # stores made before it (and stores of fraction 1) keep their binding byte for byte.
    token_subset: TokenSubset = TokenSubset()

    @property
    def shards(self) -> Shards:
        return Shards(self.shard_size, self.num_samples)

    def to_dict(self) -> dict:
        d = {"format_version": self.format_version, "fdcache_version": self.fdcache_version,
             "teacher": self.teacher.to_dict(), "view_policy": self.policy.to_dict(),
             "codec": self.codec.to_dict(), "global_seed": self.global_seed,
             "shard_size": self.shard_size, "num_samples": self.num_samples,
             "manifest_sha256": self.manifest_sha256, "views_sha256": list(self.views_sha256),
             "views_from": self.views_from}
        if not self.token_subset.whole:
            d["token_subset"] = self.token_subset.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StoreInfo":
        return cls(teacher=TeacherSpec.from_dict(d["teacher"]),
                   policy=ViewPolicy.from_dict(d["view_policy"]),
                   codec=CodecSpec.from_dict(d["codec"]), global_seed=d["global_seed"],
                   shard_size=d["shard_size"], num_samples=d["num_samples"],
                   manifest_sha256=d["manifest_sha256"], format_version=d["format_version"],
                   fdcache_version=d.get("fdcache_version", "?"),
                   views_sha256=tuple(d.get("views_sha256", ())), views_from=d.get("views_from"),
                   token_subset=TokenSubset.from_dict(d.get("token_subset")))

    def differences(self, other: "StoreInfo") -> list[str]:
        """What differs between two bindings, named field by field. The views record and its
        provenance are not a request: they are checked against the views themselves."""
        out = []
        a, b = asdict(self.teacher), asdict(other.teacher)  # every field, grids derived where unrecorded
        for k in a:
            if a[k] != b[k]:
                out.append(f"teacher.{k}: store has {a[k]!r}, requested {b[k]!r}")
        for name in ("policy", "codec"):
            x, y = getattr(self, name).to_dict(), getattr(other, name).to_dict()
            if x != y:
                out.append(f"{name}: store has {x}, requested {y}")
        if self.token_subset != other.token_subset:
            f, g = self.token_subset.fraction, other.token_subset.fraction
            out.append(f"token fraction: store keeps {f:g} of each view's patch tokens, requested {g:g} "
                       f"(--token-fraction {f:g} adds to it)")
        for name in ("global_seed", "shard_size", "num_samples", "manifest_sha256"):
            if getattr(self, name) != getattr(other, name):
                what = "dataset (manifest fingerprint)" if name == "manifest_sha256" else name
                out.append(f"{what}: store has {getattr(self, name)!r}, requested {getattr(other, name)!r}")
        return out


@dataclass(frozen=True)
class ArrayDecl:
    """One per-seed array of the store: ``[S, N, *shape]`` (``done``: ``[S, shards]``).

    ``chunk``: ``"sample"`` (inner chunk = one sample-view, shard file = one store shard;
    the codec's arrays), ``"shard"`` (one chunk per store shard: skip flags), ``"marker"``
    (one chunk per done marker) or ``"block"`` (``block`` samples per chunk: views).
    ``data``: written with a shard, so a done shard must have its chunk."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    dims: tuple[str, ...]
    chunk: str
    fill: int = 0
    codec: bool = False  # the codec's compressor applies (else checksums only)
    data: bool = False
    block: int = 0

    def chunking(self, shards: Shards) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        """Zarr ``(chunks, shards)`` of the array, after the seed axis included."""
        k = shards.size
        if self.chunk == "sample":
            return (1, 1, *self.shape), (1, k, *self.shape)
        if self.chunk == "shard":
            return (1, k, *self.shape), None
        if self.chunk == "marker":
            return (1, 1), None
        return (1, self.block, *self.shape), None

    def full_shape(self, seeds: int, shards: Shards) -> tuple[int, ...]:
        return (seeds, shards.count) if self.chunk == "marker" else (seeds, shards.samples, *self.shape)


def sample_arrays(info: StoreInfo) -> tuple[ArraySpec, ...]:
    """The arrays a store holds per sample-view: the codec's, for the rows the store keeps
    (every token, or a :class:`~.subset.TokenSubset`'s), then the kept rows of a subset."""
    t, subset = info.teacher, info.token_subset
    return (info.codec.arrays(subset.kept(t.tokens, t.prefix_tokens), t.dim)
            + subset.arrays(t.tokens, t.prefix_tokens))


def store_arrays(info: StoreInfo) -> list[ArrayDecl]:
    """Every per-seed array of a store bound to ``info``, the per-sample ones first
    (:func:`sample_arrays`), ``done`` last (the order seed growth resizes them in)."""
    codec = [ArrayDecl(a.name, np.dtype(a.dtype).str, tuple(a.shape), ("seed", "sample", *a.dims), "sample",
                       codec=True, data=True) for a in sample_arrays(info)]
    return codec + [
        ArrayDecl("skipped", "|u1", (), ("seed", "sample"), "shard", data=True),
        ArrayDecl("views", "<i4", (5,), ("seed", "sample", "yxhwf"), "block", fill=-1,
                  block=max(1, min(info.num_samples, 1 << 16))),
        ArrayDecl("done", "|u1", (), ("seed", "shard"), "marker"),
    ]


def manifest_chunk(name: str, n: int) -> int:
    """Elements per chunk of manifest column ``name`` of ``n`` elements (the path bytes and
    offsets in chunks of 4 Mi elements, the per-image fields in chunks of 64 Ki)."""
    return max(1, min(n, 1 << 22) if name in ("paths_utf8", "path_offsets") else min(n, 1 << 16))


# -- what a store costs on disk: a hand count of the Zarr v3 format as fdcache writes it ---------
CRC_BYTES = 4  # every chunk ends in its crc32c; a shard file's index has one too
INDEX_ENTRY_BYTES = 16  # a shard file's index: (offset, nbytes) uint64 per inner chunk slot
# A bound on one zarr.json (fdcache's measure 180 to 1,300 bytes; the root's grows with the binding).
METADATA_BYTES = 4096


def view_bytes(info: StoreInfo) -> int:
    """Bytes one sample-view adds to the store's shard files, uncompressed: each per-sample
    array's data, its crc32c and its index entry (``zstd`` only makes it smaller on feature
    maps; docs/benchmarks.md)."""
    return sum(a.nbytes + CRC_BYTES + INDEX_ENTRY_BYTES for a in sample_arrays(info))


def projected_files(info: StoreInfo, shards, new_seeds: int = 0, manifest_columns: dict | None = None,
                    directories: bool = False) -> dict:
    """``{file size: count}`` of the files extraction writes: every store shard in ``shards``
    (``(seed, k)`` pairs; each per-sample array's shard file, its skip flags and its done
    marker), the views of ``new_seeds`` seeds, and at creation (``manifest_columns``: name ->
    numpy array, as :meth:`~.store.Store.create` writes them) the manifest and every
    ``zarr.json``. Sizes are uncompressed: an upper bound under ``zstd``. ``directories``: the
    folders a local store makes for them too (:func:`_folder`), which a small store feels."""
    files: dict[int, int] = {}

    def add(size: int, count: int = 1) -> None:
        if count:
            files[size] = files.get(size, 0) + count

    sh, decls = info.shards, store_arrays(info)
    for _, k in shards:
        a, b = sh.range(k)
        n = b - a
        for d in decls:
            item = int(np.prod(d.shape, dtype=np.int64)) * np.dtype(d.dtype).itemsize
            if d.chunk == "sample":  # n inner chunks with crc32c, an index of sh.size slots
                add(n * (item + CRC_BYTES) + sh.size * INDEX_ENTRY_BYTES + CRC_BYTES)
                if directories:  # <name>/c/<seed>/<k>/0...: one single-entry folder per axis
                    add(_folder([1]), len(d.shape))
            elif d.chunk == "shard":  # one chunk of the whole shard (edge chunks are stored whole)
                add(sh.size * item + CRC_BYTES)
            elif d.chunk == "marker":
                add(item + CRC_BYTES)
    seeds = len({s for s, _ in shards})
    for d in decls:
        if d.chunk == "block":
            item = int(np.prod(d.shape, dtype=np.int64)) * np.dtype(d.dtype).itemsize
            blocks = math.ceil(info.num_samples / d.block)
            add(d.block * item + CRC_BYTES, new_seeds * blocks)
            if directories:  # <name>/c/<seed>/ of its blocks, <name>/c/<seed>/<b>/ of one chunk
                add(_folder(_names(blocks)), new_seeds)
                add(_folder([1]), new_seeds * blocks)
        elif directories:  # <name>/c/<seed>/ of its shards
            add(_folder(_names(sh.count)), seeds)
    if manifest_columns is not None:
        for name, col in manifest_columns.items():
            c = manifest_chunk(name, len(col))
            add(c * col.dtype.itemsize + CRC_BYTES, math.ceil(len(col) / c))
            if directories:  # manifest/<name>/ and its c/
                add(_folder([9, 1]))
                add(_folder(_names(math.ceil(len(col) / c))))
        add(METADATA_BYTES, 1 + len(decls) + 1 + len(manifest_columns))  # root, arrays, manifest
        if directories:  # the root, each array's folder and its c/ (one entry per seed), manifest/
            add(_folder([9] + [len(d.name) for d in decls] + [8]))
            for d in decls:
                add(_folder([9, 1]))
                add(_folder(_names(max(new_seeds, 1))))
            add(_folder([9] + [len(n) for n in manifest_columns]))
    return files


def _names(n: int) -> list[int]:
    """Lengths of the names ``0`` .. ``n-1``."""
    return [len(str(i)) for i in range(n)]


def _folder(names: list[int]) -> int:
    """Bytes a folder of entries with these name lengths takes, as ext4 lays one out (``.`` and
    ``..`` 12 bytes each; an entry 8 bytes + its name padded to 4): at least one block once
    :func:`on_disk` rounds it up. Filesystems differ; this is the usual one."""
    return 24 + sum(8 + -(-n // 4) * 4 for n in names)


def on_disk(files: dict, block: int = 1) -> int:
    """Bytes ``files`` (:func:`projected_files`) take on a filesystem of ``block``-byte
    allocation units (each file rounded up; 1 = the bytes themselves, as object stores bill)."""
    return sum(count * -(-size // block) * block for size, count in files.items())


def chunk_key(path: str, coords) -> str:
    """The key of chunk (or shard file) ``coords`` of the array at ``path``: Zarr v3's
    default encoding with the ``/`` separator, the only one fdcache writes."""
    return f"{path}/c/" + "/".join(str(int(c)) for c in coords)


def parse_chunk_key(key: str) -> tuple[str, tuple[int, ...]] | None:
    """The inverse of :func:`chunk_key`: ``(array path, coords)``, or None for a key that
    is not a chunk (metadata, temporary files)."""
    path, sep, coords = key.rpartition("/c/")
    parts = coords.split("/")
    if not sep or not all(p.isdigit() for p in parts):
        return None
    return path, tuple(int(p) for p in parts)


def shard_key(name: str, seed: int, k: int, sample_ndim: int) -> str:
    """The file holding shard ``k`` of ``seed`` of a per-sample array with ``sample_ndim``
    axes per sample (``targets/c/0/3/0/0`` for a ``[L, D]`` map)."""
    return chunk_key(name, (seed, k) + (0,) * sample_ndim)


def encode_paths(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 bytes of all paths back to back, and ``offsets [N+1]`` (path i = bytes[o[i]:o[i+1]])."""
    encoded = [p.encode() for p in paths]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), np.uint8).copy(), offsets


def views_sha256(views: np.ndarray) -> str:
    """The identity of one seed's recorded views ``[N, 5]``: sha256 of their int32
    little-endian bytes, as the ``views`` array stores them."""
    return hashlib.sha256(np.ascontiguousarray(views, dtype="<i4").tobytes()).hexdigest()


def view_set_sha256(manifest_sha256: str, per_seed) -> str:
    """The view set of a store's first ``len(per_seed)`` seeds: sha256 over the manifest's
    fingerprint and each seed's :func:`views_sha256`. Two stores with one view set hold
    maps of the same pixels, whatever their teachers (``extract --views-from``)."""
    h = hashlib.sha256(manifest_sha256.encode())
    for x in per_seed:
        h.update(bytes.fromhex(x))
    return h.hexdigest()


def decode_paths(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
    data = blob.tobytes()
    return [data[a:b].decode() for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
