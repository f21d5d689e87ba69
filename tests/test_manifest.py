import os

import numpy as np
import pytest
from PIL import Image

from fdcache.errors import BadImageError, DataError
from fdcache.store.manifest import compare_files, index, read_size


def test_indexes_an_image_folder_with_labels_and_oriented_sizes(image_root):
    m = index(image_root)
    assert len(m) == 18 and m.classes == ["class_000", "class_001", "class_002"]
    assert m.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    for i in range(len(m)):
        with Image.open(m.abspath(i)) as im:
            from PIL import ImageOps
            assert (m.widths[i], m.heights[i]) == ImageOps.exif_transpose(im).size
        assert m.sizes[i] == os.path.getsize(m.abspath(i))


def test_exif_rotation_swaps_width_and_height(tmp_path):
    exif = Image.Exif(); exif[0x0112] = 6
    Image.new("RGB", (40, 20)).save(tmp_path / "r.jpg", exif=exif)
    assert read_size(tmp_path / "r.jpg") == (20, 40)


def test_file_list_with_and_without_labels(image_root, tmp_path):
    m = index(image_root)
    lst = tmp_path / "list.txt"
    lst.write_text(f"# comment\n{m.paths[3]} 7\n{m.paths[0]}\n")
    ml = index(image_root, file_list=lst)
    assert ml.paths == [m.paths[3], m.paths[0]] and ml.labels.tolist() == [7, -1]


def test_fingerprint_binds_content_and_first_difference_names_the_file(images):
    a = index(images)
    victim = images / a.paths[4]
    victim.write_bytes(victim.read_bytes() + b"\0")
    b = index(images)
    assert a.fingerprint() != b.fingerprint()
    assert a.paths[4] in a.first_difference(b)
    assert compare_files(a).refusals == [f"{a.paths[4]}: size {victim.stat().st_size} != {a.sizes[4]} recorded"]


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        index(tmp_path / "nope")
    with pytest.raises(DataError, match="no class sub-folders"):
        index(tmp_path)
    (tmp_path / "cls").mkdir()
    with pytest.raises(DataError, match="hold no images: cls"):
        index(tmp_path)


def test_a_non_image_file_stops_indexing_naming_it_unless_skip_bad(images):
    (images / "class_001" / "zz_notes.jpg").write_text("not an image")
    with pytest.raises(BadImageError, match="zz_notes.jpg") as e:
        index(images)
    assert e.value.paths == ["class_001/zz_notes.jpg"]
    m = index(images, skip_bad=True)
    i = m.paths.index("class_001/zz_notes.jpg")
    assert m.bad[i] and m.bad.sum() == 1
