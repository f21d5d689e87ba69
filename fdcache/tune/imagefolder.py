"""Labeled image folders (``root/<class>/<image>``) for fine-tuning and evaluation.

Fine-tuning reads images with PIL through timm's transforms (FT-CLIP, FD fine-tuning) or
open_clip's train preprocess (FLYP), not through the DALI pixel path: those recipes are
defined by timm's RandAugment, random erasing and mixup/cutmix and by CLIP's own
preprocess, and matching them matters more here than decode speed; FD's recorded views
play no part after distillation.

Every sample's augmentation draws from generators keyed by (run seed, epoch, index), so a
resumed run, any worker count and any rank layout see the same pixels for the same sample.
"""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import DataError, FdcacheError
from ..images import IMAGE_EXTENSIONS, open_rgb, require_image_folder
from ..sampling import epoch_order, rank_slice
from ..userfiles import read_text

__all__ = ["find_classes", "classnames_for", "LabeledImages", "EpochSampler", "NamedErrorsLoader", "worker_error", "train_loader",
           "ignore_interrupts", "eval_loader", "train_transform", "eval_transform"]


def find_classes(root: str | Path) -> list[str]:
    root = require_image_folder(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class folders: expected root/<class>/<image> (ImageFolder layout)")
    return classes


def classnames_for(classes: list[str], how: str = "folder") -> list[str]:
    """Human-readable names for the class folders, in folder order (prompts need them).

    ``folder``: the folder names, ``_`` as spaces; ``imagenet``: open_clip's ImageNet-1k
    names, for the 1000 sorted WordNet-id folders, or for folders named by class index
    (``0`` .. ``999``, as ImageNet-V2 ships; a subset is fine); otherwise a file: a JSON
    object ``{folder: name}``, a JSON list, or one name per line, in sorted folder order."""
    if how == "folder":
        return [c.replace("_", " ") for c in classes]
    if how == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        if all(c.isdigit() for c in classes):
            bad = [c for c in classes if int(c) >= len(IMAGENET_CLASSNAMES)]
            if bad:
                raise DataError(f"--classnames imagenet: class index folder(s) {bad[:5]} are not below 1000")
            return [IMAGENET_CLASSNAMES[int(c)] for c in classes]
        if len(classes) != len(IMAGENET_CLASSNAMES):
            raise DataError(f"--classnames imagenet needs the 1000 ImageNet class folders, found {len(classes)}; "
                            "for a subset (ImageNet-R/-A) pass a JSON file {folder: name}")
        return list(IMAGENET_CLASSNAMES)
    path = Path(how)
    if not path.is_file():
        raise DataError(f"no such class-names file {how!r} (--classnames): give folder, imagenet, or a JSON/text file")
    text = read_text(path, "a class-names file", "--classnames", "give a JSON object {folder: name}, a JSON list, "
                     "or one name per line")
    try:
        names = json.loads(text)
    except json.JSONDecodeError:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(names, dict):
        missing = [c for c in classes if c not in names]
        if missing:
            raise DataError(f"{path} has no name for class folder(s) {missing[:5]}")
        return [str(names[c]) for c in classes]
    if len(names) != len(classes):
        raise DataError(f"{path} lists {len(names)} names for {len(classes)} class folders")
    return [str(n) for n in names]


@contextlib.contextmanager
def _seeded(*key: int):
    """Seed python, numpy and torch (CPU) from ``key``; restore the caller's streams after."""
    a, b = np.random.SeedSequence([int(k) for k in key]).generate_state(2)
    py, npst = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(int(a))
        np.random.seed(int(b))
        torch.manual_seed(int(a))
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npst)


class LabeledImages(Dataset):
    """``ds[(epoch, i)] -> (image tensor, label, i)``; ``ds[i]`` means epoch 0."""

    def __init__(self, root: str | Path, transform, *, seed: int = 0, classes: list[str] | None = None):
        from torchvision.datasets.folder import make_dataset

        self.root = Path(root)
        self.classes = classes or find_classes(self.root)
        try:
            self.samples = make_dataset(str(self.root), {c: i for i, c in enumerate(self.classes)},
                                        extensions=IMAGE_EXTENSIONS, allow_empty=False)
        except FileNotFoundError as e:
            raise DataError(f"{self.root}: {e}") from None
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        path, label = self.samples[i]
        try:
            from PIL import Image

            img = Image.fromarray(open_rgb(path))  # the pixels DALI decodes (fdcache.images)
        except DataError:
            raise
        except Exception as e:  # PIL raises many types for damaged files
            raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}. Replace or remove the "
                            "file and restart (with --resume if a run was going)") from None
        with _seeded(self.seed, epoch, i, 0xDA7A):
            return self.transform(img), label, i


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` without end, from ``start_epoch`` after ``skip`` samples.

    Order per epoch is the Philox permutation of (seed, epoch) used by distillation; rank
    ``r`` of ``W`` takes every ``W``-th sample, cut to whole batches, so all ranks step alike."""

    def __init__(self, n: int, batch_size: int, *, rank: int = 0, world: int = 1, seed: int = 0,
                 start_epoch: int = 0, skip: int = 0):
        self.n, self.batch_size, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.start_epoch, self.skip = start_epoch, skip

    @property
    def per_epoch(self) -> int:
        return self.n // self.world // self.batch_size * self.batch_size

    def __iter__(self):
        epoch, skip = self.start_epoch, self.skip
        every = np.arange(self.n, dtype=np.int64)
        while True:
            order = rank_slice(epoch_order(self.seed, epoch, every), self.rank, self.world, self.batch_size)
            for i in order[skip:]:
                yield epoch, int(i)
            epoch, skip = epoch + 1, 0


def train_loader(ds: LabeledImages, sampler: EpochSampler, workers: int, pin: bool) -> DataLoader:
    # Its own generator: a loader draws its workers' base seed when iterated, and drawing it
    # from the global stream would shift drop path and mixup after a resume.
    return NamedErrorsLoader(ds, batch_size=sampler.batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin, persistent_workers=workers > 0, drop_last=True,
                      generator=torch.Generator().manual_seed(sampler.seed), worker_init_fn=ignore_interrupts)


def ignore_interrupts(worker_id: int = 0) -> None:
    """In a loader worker: a terminal's Ctrl-C reaches the workers too, and torch's workers
    exit on it, failing the batch in flight. The main process decides: it finishes the step,
    checkpoints, and shuts its workers down. (SIGTERM keeps its default: the loader
    terminates its workers with it.)"""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def eval_loader(ds: LabeledImages, batch_size: int, workers: int, rank: int = 0, world: int = 1) -> DataLoader:
    """Rank ``r`` reads samples ``r, r+W, ...``: disjoint, together exactly the set."""
    return NamedErrorsLoader(ds, batch_size=batch_size, sampler=list(range(rank, len(ds), world)),
                             num_workers=workers, pin_memory=torch.cuda.is_available())


class NamedErrorsLoader(DataLoader):
    """A DataLoader whose workers' fdcache errors come back as what they are. torch re-raises
    a worker's exception as ``type(msg)`` with its whole traceback as the message, or as a
    RuntimeError when the type takes other arguments (:class:`ImageRefusedError` does): a
    refused or unreadable image would end the run in a traceback, where ``--workers 0`` names
    the file. Here the worker's own last line (``fdcache.errors.X: <message>``) becomes a
    :class:`DataError` with that message, chained to torch's for the traceback."""

    def __iter__(self):
        return _Unwrapped(super().__iter__())


class _Unwrapped:
    def __init__(self, it):
        self.it = it

    def __iter__(self):
        return self

    def __len__(self):
        return len(self.it)

    def __getattr__(self, name):  # the loader iterator's own state (workers, shutdown) stays reachable
        if name == "it":
            raise AttributeError(name)
        return getattr(self.it, name)

    def __next__(self):
        try:
            return next(self.it)
        except (FdcacheError, RuntimeError) as e:
            inner = worker_error(str(e))
            if inner is None:
                raise
            raise DataError(inner) from e


def worker_error(text: str) -> str | None:
    """The message of an fdcache error raised in a DataLoader worker, from torch's wrapped
    text (``Caught X in DataLoader worker process N. Original Traceback ...``); None for any
    other text."""
    if not text.startswith("Caught ") or "in DataLoader worker" not in text.split("\n", 1)[0]:
        return None
    for line in reversed(text.strip().splitlines()):
        name, sep, message = line.partition(": ")
        if sep and name.startswith("fdcache.errors."):
            return message
    return None


def train_transform(kind: str, resolution: int, mean, std, *, auto_augment: str | None = None,
                    re_prob: float = 0.0, color_jitter: float = 0.4, interpolation: str = "bicubic"):
    """``timm``: timm's training transform (RandomResizedCrop, flip, RandAugment, random
    erasing); ``clip``: open_clip's train preprocess (FLYP trains with CLIP's own)."""
    if kind == "clip":
        import open_clip

        return open_clip.image_transform(resolution, is_train=True, mean=tuple(mean), std=tuple(std))
    from timm.data import create_transform

    tf = create_transform(resolution, is_training=True, auto_augment=auto_augment or None,
                          color_jitter=color_jitter, re_prob=re_prob, re_mode="pixel",
                          interpolation=interpolation, mean=tuple(mean), std=tuple(std))
    for t in getattr(tf, "transforms", []):
        for op in getattr(t, "ops", []):
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
    return tf


def _posterize(img, bits_to_keep, **_):
    """timm's RandAugment asks for 0 bits at magnitude 10 (reached under ``mstd`` noise);
    Pillow >= 10 refuses 0, older Pillow (the recipes' era) returned black. Keep that."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def eval_transform(resolution: int, mean, std, crop_pct: float = 1.0, interpolation: str = "bicubic"):
    """Resize the short side to ``resolution / crop_pct``, centre-crop ``resolution``
    (``crop_pct`` 1.0 is CLIP's preprocess; 0.875 is the BEiT/FT-CLIP evaluation)."""
    from timm.data import create_transform

    return create_transform(resolution, is_training=False, crop_pct=crop_pct, interpolation=interpolation,
                            mean=tuple(mean), std=tuple(std))
