"""Crop views as data: a pure, counter-based function of (global seed, seed, index, w, h).

Extraction draws every view once with :func:`sample_view` and records it in the store;
training replays the recorded view. Nothing here holds RNG state, so any process can
recompute any view in any order (resume, sharding over ranks, appended seeds).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

__all__ = ["View", "ViewPolicy", "sample_view", "sample_views"]


class View(NamedTuple):
    """A crop window in pixels of the EXIF-oriented source image, and a horizontal flip."""

    y: int
    x: int
    h: int
    w: int
    flip: int

    def as_array(self) -> np.ndarray:
        return np.asarray(self, dtype=np.int32)


@dataclass(frozen=True)
class ViewPolicy:
    """How views are drawn. ``kind="rrc"`` is torchvision RandomResizedCrop (+ flip);
    ``kind="full"`` is the whole image, never flipped (deterministic teachers' maps)."""

    kind: str = "rrc"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    tries: int = 10

    def __post_init__(self):
        if self.kind not in ("rrc", "full"):
            raise ValueError(f"unknown view policy kind {self.kind!r}; use 'rrc' or 'full'")
        object.__setattr__(self, "scale", tuple(float(s) for s in self.scale))
        object.__setattr__(self, "ratio", tuple(float(r) for r in self.ratio))
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {self.ratio}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "ViewPolicy":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _generator(global_seed: int, seed: int, index: int) -> np.random.Generator:
    # Philox is counter-based; the key is a hash of the triple, so draws for different
    # (seed, index) pairs are independent streams and need no shared state.
    key = np.random.SeedSequence([int(global_seed), int(seed), int(index)]).generate_state(2, np.uint64)
    return np.random.Generator(np.random.Philox(key=key))


def sample_view(global_seed: int, seed: int, index: int, width: int, height: int,
                policy: ViewPolicy = ViewPolicy()) -> View:
    """The view of image ``index`` under augmentation ``seed``.

    Same semantics as ``torchvision.transforms.RandomResizedCrop.get_params`` (``tries``
    attempts, then the central crop clamped to the ratio range) followed by a flip with
    probability ``flip_p``. ``width``/``height`` are of the EXIF-oriented image.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image {index} has size {width}x{height}")
    if policy.kind == "full":
        return View(0, 0, int(height), int(width), 0)
    rng = _generator(global_seed, seed, index)
    area = width * height
    log_lo, log_hi = math.log(policy.ratio[0]), math.log(policy.ratio[1])
    for _ in range(policy.tries):
        target_area = area * rng.uniform(policy.scale[0], policy.scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y = int(rng.integers(0, height - h + 1))
            x = int(rng.integers(0, width - w + 1))
            break
    else:
        in_ratio = width / height
        if in_ratio < policy.ratio[0]:
            w, h = width, int(round(width / policy.ratio[0]))
        elif in_ratio > policy.ratio[1]:
            h, w = height, int(round(height * policy.ratio[1]))
        else:
            w, h = width, height
        y, x = (height - h) // 2, (width - w) // 2
    flip = int(rng.uniform() < policy.flip_p)
    return View(y, x, h, w, flip)


def sample_views(global_seed: int, seed: int, widths: np.ndarray, heights: np.ndarray,
                 policy: ViewPolicy = ViewPolicy(), start: int = 0) -> np.ndarray:
    """Views of images ``start .. start+len(widths)-1`` as an int32 ``[n, 5]`` array."""
    out = np.empty((len(widths), 5), dtype=np.int32)
    for k, (w, h) in enumerate(zip(widths, heights)):
        out[k] = sample_view(global_seed, seed, start + k, int(w), int(h), policy)
    return out
