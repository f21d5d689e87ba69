"""Index an image folder: relative paths, labels, EXIF-oriented sizes and content checksums.

A store is bound to the manifest's fingerprint (paths, labels, byte sizes, image sizes,
crc32c of every file's bytes), so a store opened against another dataset is refused with
the first difference named. Later checks are cheap first: a missing file or a changed
size refuses; a changed mtime only warns, because a copy (``cp -r``) changes every mtime
and keeps every byte; ``fdcache verify --data DIR --content`` compares the checksums.

What the index does not take is reported, never silently dropped (:attr:`Manifest.ignored`):
files without an image extension, and hidden entries (names starting with ``.``, files and
folders alike, as ``ls`` hides them). An empty class folder is an error (it would be a class
no sample has; torchvision's ImageFolder refuses it too).
"""

from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import google_crc32c
import numpy as np
from PIL import Image

from ..errors import BadImageError, DataError, ImageRefusedError, StoreMismatchError
from ..images import IMAGE_EXTENSIONS, read_size, require_image_folder
from ..userfiles import read_text

__all__ = ["PIXELS_ENV", "Manifest", "file_crc32c", "index", "FileChanges", "compare_files", "require_unchanged"]
PIXELS_ENV = "FDCACHE_MAX_IMAGE_PIXELS"  # raises PIL's decompression-bomb limit (0: none)


@dataclass
class Manifest:
    root: Path
    paths: list[str]  # relative, POSIX separators
    labels: np.ndarray  # int32 [N], -1 when unlabeled
    widths: np.ndarray  # int32 [N], after EXIF orientation; 0 for unreadable files
    heights: np.ndarray  # int32 [N]
    sizes: np.ndarray  # int64 [N] bytes
    mtimes: np.ndarray  # int64 [N] ns
    classes: list[str] = field(default_factory=list)
    crc32c: np.ndarray | None = None  # uint32 [N] of each file's bytes (None: not computed)
    ignored: list[str] = field(default_factory=list)  # "path: why", files the index did not take

    def __post_init__(self):
        if self.crc32c is None:
            self.crc32c = np.zeros(len(self.paths), np.uint32)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def bad(self) -> np.ndarray:
        """Files whose header could not be read (kept only with ``skip_bad``)."""
        return self.widths == 0

    def fingerprint(self) -> str:
        """sha256 of what binds a store: paths, labels, byte and pixel sizes and content
        checksums (not mtimes, so a byte-identical copy of the dataset still matches)."""
        h = hashlib.sha256()
        h.update("\n".join(self.paths).encode())
        for a in (self.labels, self.sizes, self.widths, self.heights, self.crc32c):
            h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
        h.update("\n".join(self.classes).encode())
        return h.hexdigest()

    def abspath(self, i: int) -> str:
        return str(self.root / self.paths[i])

    def first_difference(self, other: "Manifest") -> str | None:
        """A readable description of the first way ``other`` differs, or None."""
        if len(self) != len(other):
            return f"{len(self)} files in the store's manifest, {len(other)} in {other.root}"
        if self.classes != other.classes:
            return f"class names differ: {self.classes[:5]}... vs {other.classes[:5]}..."
        for name in ("paths", "labels", "sizes", "widths", "heights", "crc32c"):
            a, b = np.asarray(getattr(self, name)), np.asarray(getattr(other, name))
            diff = np.flatnonzero(a != b)
            if diff.size:
                i = int(diff[0])
                what = "content checksum" if name == "crc32c" else name[:-1]
                return (f"{what} of {self.paths[i]!r} differs ({a[i]} vs {b[i]}); "
                        f"{diff.size} file(s) differ in {name}")
        return None


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _scan_image_folder(root: Path) -> tuple[list[str], list[int], list[str], list[str]]:
    """ImageFolder scan: (paths, labels, classes, ignored). Hidden entries (``.name``) and
    files without an image extension are listed in ``ignored``, not indexed."""
    classes, ignored = [], []
    for d in sorted(root.iterdir()):
        if d.is_dir() and _visible(d.name):
            classes.append(d.name)
        elif not _visible(d.name):
            ignored.append(f"{d.name}: hidden")
    if not classes:
        raise DataError(f"{root} has no class sub-folders: expected an ImageFolder layout "
                        "root/<class>/<image>, or pass --file-list.")
    paths, labels, empty = [], [], []
    for label, cls in enumerate(classes):
        before = len(paths)
        for dirpath, dirnames, filenames in os.walk(root / cls):
            rel_dir = Path(dirpath).relative_to(root)
            ignored += [f"{(rel_dir / d).as_posix()}/: hidden" for d in dirnames if not _visible(d)]
            dirnames[:] = sorted(d for d in dirnames if _visible(d))
            for f in sorted(filenames):
                rel = (rel_dir / f).as_posix()
                if not _visible(f):
                    ignored.append(f"{rel}: hidden")
                elif f.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(rel)
                    labels.append(label)
                else:
                    ignored.append(f"{rel}: not an image extension")
        if len(paths) == before:
            empty.append(cls)
    if empty:
        raise DataError(f"{len(empty)} class folder(s) hold no images: {', '.join(empty[:5])}. Each would be "
                        "a class no sample has (ImageFolder refuses it too); remove the folder or add images.")
    return paths, labels, classes, ignored


def _undecodable_names(paths: list[str]) -> list[int]:
    """Indices of paths that are not valid UTF-8 (os gives them as surrogate escapes): the
    store records names as UTF-8 text, so such a file cannot be named in a manifest."""
    bad = []
    for i, p in enumerate(paths):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            bad.append(i)
    return bad


_LABEL = re.compile(r"-?[0-9]+")


def _read_file_list(list_file: Path, root: Path) -> tuple[list[str], list[int], list[str], list[str]]:
    """``relative/path [label]`` per line (``#`` comments, blank lines skipped). The last
    whitespace-separated field is the label when it is an integer (any ``>= 0``, or ``-1``:
    unlabeled, as a line without one); everything before it is the path, spaces included."""
    paths, labels = [], []
    text = read_text(list_file, "a file list", "--file-list", "give a text file of 'relative/path [label]' lines")
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) == 2 and _LABEL.fullmatch(parts[1]):
            label = int(parts[1])
            if label < -1:
                raise DataError(f"{list_file}, line {n}: label {label} is not a class index (labels are "
                                "integers >= 0, or -1 for unlabeled)")
            paths.append(parts[0]); labels.append(label)
        else:
            paths.append(line); labels.append(-1)
    for p in paths:
        if Path(p).is_absolute() or ".." in Path(p).parts:
            raise DataError(f"{list_file}: entry {p!r} must be relative to {root} and stay inside it")
    return paths, labels, [], []


def _max_pixels() -> None:
    """PIL refuses images over ``MAX_IMAGE_PIXELS`` x 2 (a decompression-bomb guard); a
    dataset of genuine giant images raises the limit with FDCACHE_MAX_IMAGE_PIXELS."""
    value = os.environ.get(PIXELS_ENV)
    if value is not None:
        try:
            n = int(value)
        except ValueError:
            raise DataError(f"{PIXELS_ENV}={value!r} is not an integer (0 turns the limit off)") from None
        Image.MAX_IMAGE_PIXELS = n or None


def file_crc32c(path: str | os.PathLike) -> int:
    """crc32c of a file's bytes (google-crc32c, hardware-accelerated)."""
    c = google_crc32c.Checksum()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            c.update(chunk)
    return int.from_bytes(c.digest(), "big")


def _probe(root: Path, rel: str, checksums: bool):
    """(size, mtime, width, height, crc32c) of one file and an error (None when readable)."""
    full = root / rel
    try:
        st = full.stat()
    except OSError as e:  # missing, permission, symlink loop (ELOOP)
        return (0, 0, 0, 0, 0), f"{rel}: cannot stat ({e.strerror or e})"
    try:
        crc = file_crc32c(full) if checksums else 0
        w, h = read_size(full)
    except ImageRefusedError as e:  # fdcache's decoders would not agree on its pixels
        return (st.st_size, st.st_mtime_ns, 0, 0, 0), f"{rel}: {e.reason}"
    except Image.DecompressionBombError as e:
        return (st.st_size, st.st_mtime_ns, 0, 0, 0), (
            f"{rel}: refused by PIL's decompression-bomb guard ({e}); if the image is genuine, "
            f"raise the limit with {PIXELS_ENV}=<pixels> (0: no limit)")
    except Exception as e:  # PIL raises many types for damaged headers
        return (st.st_size, st.st_mtime_ns, 0, 0, 0), f"{rel}: not a readable image ({e})"
    return (st.st_size, st.st_mtime_ns, w, h, crc), None


def index(root: str | os.PathLike, *, file_list: str | os.PathLike | None = None,
          skip_bad: bool = False, workers: int = 8, checksums: bool = False,
          progress: Callable[[int], None] | None = None) -> Manifest:
    """Index ``root`` (ImageFolder layout) or the entries of ``file_list`` under ``root``.

    Reads headers, and with ``checksums`` every file's bytes (crc32c; extraction records
    them so that ``verify --content`` can find same-size edits). A file that cannot be
    stat'ed or read, or whose name is not UTF-8, raises :class:`BadImageError` naming it,
    unless ``skip_bad``: unreadable files stay in the manifest with size 0x0 and the store
    records them as skipped; undecodable names are left out and listed in ``ignored``.
    """
    root = require_image_folder(root)
    _max_pixels()
    if file_list is not None:
        paths, labels, classes, ignored = _read_file_list(Path(file_list), root)
    else:
        paths, labels, classes, ignored = _scan_image_folder(root)
    bad_names = _undecodable_names(paths)
    if bad_names:
        shown = [ascii(paths[i]) for i in bad_names]
        if not skip_bad:
            raise BadImageError(
                f"{len(shown)} file name(s) are not valid UTF-8, first: {shown[0]}. Rename them, or "
                "pass --skip-bad to leave them out (they are reported).", shown)
        drop = set(bad_names)
        ignored += [f"{n}: name is not valid UTF-8" for n in shown]
        paths = [p for i, p in enumerate(paths) if i not in drop]
        labels = [x for i, x in enumerate(labels) if i not in drop]
    if not paths:
        raise DataError(f"no images found under {root} (extensions: {', '.join(IMAGE_EXTENSIONS)})")

    rows, bad = [], []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for k, (row, err) in enumerate(pool.map(lambda r: _probe(root, r, checksums), paths)):
            if err:
                bad.append((paths[k], err))
            rows.append(row)
            if progress is not None:
                progress(1)
    if bad and not skip_bad:
        names = [b[0] for b in bad]
        raise BadImageError(
            f"{len(bad)} unreadable image(s), first: {bad[0][1]}. Remove or fix them, or pass "
            "--skip-bad to record them as skipped in the store.", names)
    arr = np.asarray(rows, dtype=np.int64).reshape(-1, 5)
    return Manifest(root=root, paths=paths, labels=np.asarray(labels, np.int32),
                    sizes=arr[:, 0].copy(), mtimes=arr[:, 1].copy(),
                    widths=arr[:, 2].astype(np.int32), heights=arr[:, 3].astype(np.int32),
                    classes=classes, crc32c=arr[:, 4].astype(np.uint32), ignored=ignored)


@dataclass
class FileChanges:
    """How the image folder differs from the manifest. ``missing``/``resized``/``changed``
    mean the targets no longer describe the pixels; ``touched`` (new mtime, same size, not
    content-checked) is what a copy looks like, so it only warns."""

    missing: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # content checksum differs (content=True)
    touched: list[str] = field(default_factory=list)  # mtime differs, content not checked

    @property
    def refusals(self) -> list[str]:
        return ([f"{p}: missing" for p in self.missing] + self.resized +
                [f"{p}: content changed (crc32c differs)" for p in self.changed])

    def touched_warning(self, store: str = "STORE", data: str | os.PathLike = "DIR") -> str | None:
        if not self.touched:
            return None
        return (f"{len(self.touched)} file(s) have a new mtime but their recorded size (e.g. "
                f"{', '.join(self.touched[:3])}): a copy of the folder looks like this. To check "
                f"their bytes run: fdcache verify {store} --data {data} --content")


def compare_files(manifest: Manifest, *, content: bool = False, headers: str = "touched",
                  workers: int = 8) -> FileChanges:
    """Compare the folder at ``manifest.root`` with the manifest: stat every file; compare the
    pixel size in the header with the recorded one (``headers``: ``"touched"``, only for
    files with a new mtime, about 50 us each; ``"all"``); with ``content`` read every file and
    compare its crc32c. A picture replaced by one of another pixel size but the same byte
    size is caught by its header, and the recorded views would not fit it."""
    out = FileChanges()

    def check(i: int):
        rel = manifest.paths[i]
        full = manifest.root / rel
        try:
            st = full.stat()
        except OSError:
            return "missing", rel
        if st.st_size != manifest.sizes[i]:
            return "resized", f"{rel}: size {st.st_size} != {manifest.sizes[i]} recorded"
        touched = st.st_mtime_ns != manifest.mtimes[i]
        if manifest.widths[i] and (headers == "all" or touched):
            recorded = (int(manifest.widths[i]), int(manifest.heights[i]))
            try:
                now = read_size(full)
            except Exception as e:  # refused, or no longer an image
                return "resized", f"{rel}: no longer a readable image ({e})"
            if now != recorded:
                return "resized", (f"{rel}: {now[0]}x{now[1]} pixels, {recorded[0]}x{recorded[1]} recorded (same "
                                   "byte size: replaced by another picture?)")
        if content:
            try:
                if file_crc32c(full) != int(manifest.crc32c[i]):
                    return "changed", rel
            except OSError:
                return "missing", rel
        elif touched:
            return "touched", rel
        return None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for r in pool.map(check, range(len(manifest))):
            if r is not None:
                getattr(out, r[0]).append(r[1])
    return out


def require_unchanged(manifest: Manifest, store: str = "STORE") -> str | None:
    """Refuse (:class:`StoreMismatchError`) when files are missing or resized since
    extraction; return a warning when only mtimes changed (None when nothing did)."""
    changes = compare_files(manifest)
    if changes.refusals:
        raise StoreMismatchError(
            f"image folder {manifest.root} no longer matches the store's manifest "
            f"({len(changes.refusals)} file(s)): " + "; ".join(changes.refusals[:5]) +
            ". Re-extract, or point --data at the folder the store was made from.")
    return changes.touched_warning(store, manifest.root)
