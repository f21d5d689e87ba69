"""Bytes before they are written: sizes as people write them (``--budget 1.5TB``) and the
free-space check every ``fdcache extract`` makes before it writes anything.

Why check first: a store of ImageNet at 8 seeds is hundreds of gigabytes, and a disk that
fills at 90% leaves a resumable but useless half-store and hours of teacher time behind.
The projection is the format's hand count (:func:`.layout.projected_files`: each array's
bytes, crc32c checksums, shard indexes, the manifest, every ``zarr.json``), rounded up file by
file to the filesystem's allocation unit, so it is what ``du`` will report, not a guess.
Remote stores (``s3://``...) are not checked: an object store reports no free space.
"""

from __future__ import annotations

import re

from ..errors import ConfigError, DiskSpaceError
from .layout import on_disk
from .location import Location

__all__ = ["parse_size", "format_size", "check_free_space"]

_DECIMAL = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15}
_BINARY = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int, option: str = "--budget") -> int:
    """Bytes of ``text``: a number with an optional unit, decimal (``B``, ``kB``, ``MB``,
    ``GB``, ``TB``, ``PB``: powers of 1000) or binary (``KiB``, ``MiB``, ``GiB``, ``TiB``,
    ``PiB``: powers of 1024), case-insensitive; ``1.5TB`` = 1.5e12 bytes. A bare ``G`` or
    ``T`` is refused: tools disagree on whether it means 10^9 or 2^30."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = text, ""
    else:
        m = _SIZE.match(str(text))
        if m is None:
            raise ConfigError(f"{option} {text!r} is not a size: write a number and a unit, e.g. 1.5TB, 800MB, 512GiB")
        value, unit = float(m.group(1)), m.group(2).lower()
    scale = _DECIMAL.get(unit, _BINARY.get(unit))
    if scale is None:
        raise ConfigError(f"{option} {text!r}: unknown unit {unit!r}; use B, kB, MB, GB, TB, PB (powers of 1000) "
                          "or KiB, MiB, GiB, TiB, PiB (powers of 1024)")
    size = int(value * scale)
    if size < 1:
        raise ConfigError(f"{text!r} is not a positive size ({option}): give at least one byte, e.g. 800MB or 1.5TB")
    return size


def format_size(n: int) -> str:
    """``n`` bytes in decimal units, three significant digits (``1.23 GB``)."""
    for unit, scale in (("PB", 10**15), ("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def check_free_space(location: Location, files: dict, views: int, view_bytes: int, *, reclaim: int = 0) -> str:
    """Refuse (:class:`DiskSpaceError`) when ``files`` (:func:`.layout.projected_files`, what
    extraction is about to write: ``views`` sample-views of ``view_bytes`` each, plus the
    format's overhead) do not fit the free space of ``location``'s filesystem, ``reclaim``
    bytes (fdcache's own files that creation removes first) counted as free. Returns the
    line that says what was checked (or that a remote store is not)."""
    space = location.free_space()
    if space is None:
        return (f"free space not checked: {location.url} is remote (an object store reports none); "
                f"this extraction writes {format_size(on_disk(files))}")
    free, block = space
    need = on_disk(files, block)
    if need > free + reclaim:
        freed = f" (after removing {format_size(reclaim)} of fdcache's own files there)" if reclaim else ""
        raise DiskSpaceError(
            f"not enough free disk space for the store (--out {location.url}): this extraction writes "
            f"{format_size(need)} ({need:,} bytes: {views:,} sample-view(s) of {view_bytes:,} bytes, plus "
            f"checksums, shard indexes, views and manifest), and its filesystem has {format_size(free + reclaim)} "
            f"({free + reclaim:,} bytes) free{freed}. Nothing was written. Free space or choose another --out, "
            "or store fewer bytes: --codec int8 or int4, fewer --seeds, or --budget SIZE.")
    return (f"free space: this extraction writes {format_size(need)}; {format_size(free + reclaim)} free "
            f"at {location.url}")
