"""What a store claims is checked against what is there, whoever changed it: pictures replaced
in the image folder, chunks rewritten by another Zarr client, the lock file beside the store."""

import io
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import extract_tiny
from fdcache.distill.train import TrainConfig, DistillTask
from fdcache.errors import StoreMismatchError, VerifyError
from fdcache.store.inspect import verify_store


@pytest.fixture
def images_and_store(image_root, tmp_path):
    images = shutil.copytree(image_root, tmp_path / "images")
    return images, extract_tiny(images, tmp_path / "s.zarr")


def same_bytes_other_pixels(path) -> None:
    """Replace the picture at ``path`` by another of a different pixel size and the same byte size."""
    size = path.stat().st_size
    with Image.open(path) as im:
        w, h = im.size
    for quality in range(90, 5, -5):
        buf = io.BytesIO()
        Image.fromarray(np.full((h + 8, w + 8, 3), 90, np.uint8)).save(buf, format="JPEG", quality=quality)
        if buf.tell() <= size:
            break
    data = buf.getvalue()
    path.write_bytes(data + b"\0" * (size - len(data)))  # bytes after the end marker: decoders ignore them


def test_a_picture_replaced_by_one_of_another_pixel_size_is_found_from_its_header(images_and_store, tmp_path):
    images, store = images_and_store
    victim = sorted(images.rglob("*.jpg"))[0]
    before = victim.stat().st_size
    same_bytes_other_pixels(victim)
    assert victim.stat().st_size == before
    with pytest.raises(StoreMismatchError, match=f"{victim.name}: .* pixels, .* recorded"):
        DistillTask(TrainConfig(out=str(tmp_path / "run"), cache=str(store), student="fd-tiny", steps=1, batch_size=4,
                            num_threads=1, progress=False))
    with pytest.raises(VerifyError) as e:
        verify_store(str(store))
    assert any(victim.name in p and "pixels" in p for p in e.value.problems), e.value.problems
