"""Small synthetic image folders (quickstart, tests, benchmarks): no download needed.

Smooth random colour fields with a few shapes, in varied sizes and formats (baseline and
progressive JPEG, grayscale, CMYK, PNG with alpha, an EXIF-rotated JPEG), so the pixel
path meets the cases real datasets hold.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["make_image_folder"]


def _image(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        x1, y1 = x0 + int(rng.integers(8, max(9, w // 2))), y0 + int(rng.integers(8, max(9, h // 2)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.uniform() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    return img


def make_image_folder(root: str | Path, *, classes: int = 2, per_class: int = 8, seed: int = 0,
                      min_size: int = 48, max_size: int = 160, variety: bool = True) -> Path:
    """Write ``classes * per_class`` images under ``root/<class>/``; returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    n = 0
    for c in range(classes):
        d = root / f"class_{c:03d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
            img = _image(rng, w, h)
            kind = n % 6 if variety else 0
            if kind == 0:
                img.save(d / f"{i:05d}.jpg", quality=90)
            elif kind == 1:
                img.save(d / f"{i:05d}.jpg", quality=85, progressive=True)
            elif kind == 2:
                img.convert("L").save(d / f"{i:05d}.jpg", quality=90)
            elif kind == 3:
                img.convert("CMYK").save(d / f"{i:05d}.jpg", quality=90)
            elif kind == 4:
                rgba = img.convert("RGBA")
                rgba.putalpha(128)
                rgba.save(d / f"{i:05d}.png")
            else:
                exif = Image.Exif()
                exif[0x0112] = 6  # rotate 90 degrees clockwise on display
                img.save(d / f"{i:05d}.jpg", quality=90, exif=exif)
            n += 1
    return root
