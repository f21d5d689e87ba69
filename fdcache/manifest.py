"""Index an image folder: relative paths, labels and EXIF-oriented sizes, read from headers.

A store is bound to the manifest's fingerprint (paths, labels, byte sizes, image sizes),
so a store opened against another dataset is refused with the first difference named.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import BadImageError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".jp2")
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that transpose the image


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

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def bad(self) -> np.ndarray:
        """Files whose header could not be read (kept only with ``skip_bad``)."""
        return self.widths == 0

    def fingerprint(self) -> str:
        """sha256 of what binds a store: paths, labels, byte and pixel sizes (not mtimes,
        so a copied dataset still matches; ``verify`` reports changed mtimes)."""
        h = hashlib.sha256()
        h.update("\n".join(self.paths).encode())
        for a in (self.labels, self.sizes, self.widths, self.heights):
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
        for name in ("paths", "labels", "sizes", "widths", "heights"):
            a, b = np.asarray(getattr(self, name)), np.asarray(getattr(other, name))
            diff = np.flatnonzero(a != b)
            if diff.size:
                i = int(diff[0])
                return (f"{name[:-1]} of {self.paths[i]!r} differs ({a[i]} vs {b[i]}); "
                        f"{diff.size} file(s) differ in {name}")
        return None


def read_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header only."""
    with Image.open(path) as im:
        w, h = im.size
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception:  # malformed EXIF: DALI then ignores it too
            orientation = 1
    return (h, w) if orientation in _SWAPS_AXES else (w, h)


def _scan_image_folder(root: Path) -> tuple[list[str], list[int], list[str]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class sub-folders: expected an ImageFolder layout "
                        "root/<class>/<image>, or pass --file-list.")
    paths, labels = [], []
    for label, cls in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / cls):
            dirnames.sort()
            for f in sorted(filenames):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(Path(dirpath, f).relative_to(root).as_posix())
                    labels.append(label)
    return paths, labels, classes


def _read_file_list(list_file: Path, root: Path) -> tuple[list[str], list[int], list[str]]:
    paths, labels = [], []
    for n, line in enumerate(list_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            paths.append(parts[0]); labels.append(int(parts[1]))
        else:
            paths.append(line); labels.append(-1)
    for p in paths:
        if Path(p).is_absolute() or ".." in Path(p).parts:
            raise DataError(f"{list_file}: entry {p!r} must be relative to {root} and stay inside it")
    return paths, labels, []


def index(root: str | os.PathLike, *, file_list: str | os.PathLike | None = None,
          skip_bad: bool = False, workers: int = 8,
          progress: Callable[[int], None] | None = None) -> Manifest:
    """Index ``root`` (ImageFolder layout) or the entries of ``file_list`` under ``root``.

    Reads headers only. A file whose header cannot be read raises :class:`BadImageError`
    naming it, unless ``skip_bad`` (then it stays in the manifest with size 0x0 and the
    store records it as skipped).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory")
    if file_list is not None:
        paths, labels, classes = _read_file_list(Path(file_list), root)
    else:
        paths, labels, classes = _scan_image_folder(root)
    if not paths:
        raise DataError(f"no images found under {root} (extensions: {', '.join(IMAGE_EXTENSIONS)})")

    def probe(rel: str):
        full = root / rel
        try:
            st = full.stat()
        except OSError as e:
            return None, f"{rel}: {e.strerror or e}"
        try:
            w, h = read_size(full)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            return (st.st_size, st.st_mtime_ns, 0, 0), f"{rel}: not a readable image ({e})"
        return (st.st_size, st.st_mtime_ns, w, h), None

    rows, bad = [], []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for k, (row, err) in enumerate(pool.map(probe, paths, chunksize=64)):
            if row is None:
                raise DataError(f"cannot stat {err}")
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
    arr = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
    return Manifest(root=root, paths=paths, labels=np.asarray(labels, np.int32),
                    sizes=arr[:, 0].copy(), mtimes=arr[:, 1].copy(),
                    widths=arr[:, 2].astype(np.int32), heights=arr[:, 3].astype(np.int32),
                    classes=classes)


def stat_changes(manifest: Manifest, paths: Iterable[int] | None = None) -> list[str]:
    """Files that are missing or whose size/mtime changed since the manifest was taken."""
    out = []
    idx = range(len(manifest)) if paths is None else paths
    for i in idx:
        full = manifest.root / manifest.paths[i]
        try:
            st = full.stat()
        except OSError:
            out.append(f"{manifest.paths[i]}: missing")
            continue
        if st.st_size != manifest.sizes[i]:
            out.append(f"{manifest.paths[i]}: size {st.st_size} != {manifest.sizes[i]} recorded")
        elif st.st_mtime_ns != manifest.mtimes[i]:
            out.append(f"{manifest.paths[i]}: modified since indexing (mtime changed)")
    return out
