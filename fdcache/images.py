"""What an image file means as pixels: one contract for every decoder in fdcache.

DALI turns files into pixels for extraction and distillation (:mod:`fdcache.distill.pixels`);
PIL does for fine-tuning, evaluation, FLYP, ``diagnose`` and the reference pixels. The two
must agree, or a model is distilled on one picture and fine-tuned on another. Checked file by
file (DALI 2.4 CPU decoders against Pillow 13, ``tests/test_decoding.py``):

* identical: 8-bit RGB, grayscale, gray + alpha, palette (with or without transparency),
  1-bit, RGBA (alpha dropped by both), CMYK JPEG and TIFF, EXIF orientation in JPEG, PNG,
  TIFF and WebP (both apply it), baseline and progressive JPEG, JPEG 2000, BMP;
* 16-bit grayscale: DALI rounds ``v * 255 / 65535``, PIL's ``convert("RGB")`` clips at 255
  (white). :func:`open_rgb` rounds as DALI does, so they agree exactly;
* refused by name, on every path (the index, so ``--skip-bad`` can skip them, and
  :func:`open_rgb`): GIF (DALI decodes none; one named ``.jpg`` is still a GIF), 16-bit colour
  (PIL keeps only the high byte where DALI rounds), 32-bit integer or float images, and modes
  DALI has no conversion for.

DALI alone may still refuse a file PIL reads (a lossless WebP with EXIF fails in DALI 2.4);
the pixel path then names it with DALI's own reason (:func:`fdcache.distill.pixels.explain_decode_failure`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import DataError, ImageRefusedError

__all__ = ["IMAGE_EXTENSIONS", "open_rgb", "read_size", "refusal", "require_image_folder"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".jp2")
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that transpose the image
_GRAY16 = ("I;16", "I;16B", "I;16L", "I;16N")
_AGREED = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", *_GRAY16)


def refusal(im: Image.Image) -> str | None:
    """Why fdcache will not decode the opened image ``im`` (header only), or None."""
    if im.format == "GIF":
        return "a GIF (whatever its name says): DALI decodes no GIF; convert it to PNG or JPEG"
    if im.mode not in _AGREED:
        return (f"pixel mode {im.mode} (32-bit or float samples, or no RGB conversion): DALI and PIL decode it "
                "differently; convert it to 8-bit RGB")
    rawmode = im.tile[0].args if im.tile else None
    rawmode = rawmode[0] if isinstance(rawmode, tuple) and rawmode else rawmode
    if im.mode not in _GRAY16 and isinstance(rawmode, str) and ";16" in rawmode:
        return ("16 bits per colour channel: PIL keeps only the high byte where DALI rounds; convert it to "
                "8 bits per channel")
    return None


def read_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header only; a refused file raises
    :class:`ImageRefusedError` naming it."""
    with Image.open(path) as im:
        why = refusal(im)
        if why:
            raise ImageRefusedError(str(path), why)
        w, h = im.size
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception:  # malformed EXIF: DALI then ignores it too
            orientation = 1
    return (h, w) if orientation in _SWAPS_AXES else (w, h)


def open_rgb(path: str | os.PathLike) -> np.ndarray:
    """``uint8 [H, W, 3]``: the pixels DALI's decoder gives for ``path`` (EXIF-oriented; see
    the module doc). A refused file raises :class:`ImageRefusedError` naming it."""
    with Image.open(path) as im:
        why = refusal(im)
        if why:
            raise ImageRefusedError(str(path), why)
        im = ImageOps.exif_transpose(im)
        if im.mode in _GRAY16:
            gray = ((np.asarray(im).astype(np.uint32) + 128) // 257).astype(np.uint8)
            return np.repeat(gray[:, :, None], 3, axis=2)
        return np.asarray(im.convert("RGB"))


def require_image_folder(root: str | os.PathLike) -> Path:
    """``root`` as a Path when it is a folder; else a :class:`DataError` saying what it is."""
    root = Path(root)
    if root.is_dir():
        return root
    if root.exists():
        raise DataError(f"{root} is a file, not an image folder ({root}): give the folder that holds the class "
                        "folders")
    raise DataError(f"no such image folder ({root}): check the path")
