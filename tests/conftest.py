import os

# Must be set before any @triton.jit runs (kernel modules are imported lazily by tests).
os.environ.setdefault("TRITON_INTERPRET", "1")

import shutil
from pathlib import Path

import pytest
import torch

from fdcache.samples import make_image_folder
from fdcache.teachers import TINY_TEACHER, load_teacher


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def image_root(tmp_path_factory) -> Path:
    """18 images in 3 classes, every format variant (JPEG kinds, gray, CMYK, RGBA PNG, EXIF)."""
    return make_image_folder(tmp_path_factory.mktemp("data") / "images", classes=3, per_class=6)


@pytest.fixture
def images(image_root, tmp_path) -> Path:
    """A private copy that a test may damage."""
    return Path(shutil.copytree(image_root, tmp_path / "images"))


@pytest.fixture(scope="session")
def tiny_teacher():
    return load_teacher(TINY_TEACHER, random_init=True)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path: for byte-identity checks of stores."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
