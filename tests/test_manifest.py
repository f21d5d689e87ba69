import os
import shutil

import google_crc32c
import numpy as np
import pytest
from PIL import Image

from fdcache.errors import BadImageError, DataError
from fdcache.images import read_size
from fdcache.store.manifest import compare_files, file_crc32c, index


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


def test_file_list_labels_are_the_last_field_when_it_is_an_integer(images, tmp_path):
    """``relative/path [label]``: any label >= 0 (not only 0..K-1), an explicit -1 for
    unlabeled, and paths that hold spaces, with or without a label after them."""
    m = index(images)
    spaced = "class_001/my photo 2.jpg"
    shutil.copy(images / m.paths[7], images / spaced)
    lst = tmp_path / "list.txt"
    lst.write_text(f"{m.paths[0]} 1000\n{m.paths[1]} -1\n{spaced} 3\n{spaced}\n"
                   f"  {m.paths[2]}\t0  \n{m.paths[3]} 42\n")
    ml = index(images, file_list=lst)
    assert ml.paths == [m.paths[0], m.paths[1], spaced, spaced, m.paths[2], m.paths[3]]
    assert ml.labels.tolist() == [1000, -1, 3, -1, 0, 42]


@pytest.mark.parametrize("label", ["-2", "-17"])
def test_a_file_list_label_below_minus_one_is_refused_naming_the_line(images, tmp_path, label):
    m = index(images)
    lst = tmp_path / "list.txt"
    lst.write_text(f"{m.paths[0]} 1\n{m.paths[1]} {label}\n")
    with pytest.raises(DataError, match=rf"list.txt, line 2: label {label}.*-1 for unlabeled"):
        index(images, file_list=lst)


def test_file_crc32c_is_the_crc32c_of_every_byte_of_the_file(tmp_path):
    check = tmp_path / "check.bin"
    check.write_bytes(b"123456789")
    assert file_crc32c(check) == 0xE3069283  # CRC-32C's catalogued check value (RFC 3720)
    # Longer than the 4 MiB read unit: the bytes after the first read count too.
    data = np.random.default_rng(0).integers(0, 256, (4 << 20) + 1000, dtype=np.uint8).tobytes()
    big = tmp_path / "big.bin"
    big.write_bytes(data)
    assert file_crc32c(big) == google_crc32c.value(data)
    edited = bytearray(data)
    edited[-1] ^= 1
    big.write_bytes(bytes(edited))
    assert file_crc32c(big) == google_crc32c.value(bytes(edited)) != google_crc32c.value(data)


def test_fingerprint_binds_content_and_first_difference_names_the_file(images):
    a = index(images)
    victim = images / a.paths[4]
    victim.write_bytes(victim.read_bytes() + b"\0")
    b = index(images)
    assert a.fingerprint() != b.fingerprint()
    assert a.paths[4] in a.first_difference(b)
    assert compare_files(a).refusals == [f"{a.paths[4]}: size {victim.stat().st_size} != {a.sizes[4]} recorded"]


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such image folder"):
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


def test_first_difference_names_the_first_field_that_differs_by_its_singular(tmp_path):
    """One field changed at a time, the others equal: the message names that field ("content
    checksum" for crc32c), the first file where it differs, both values, and how many differ."""
    from fdcache.store.manifest import Manifest

    def m(**change):
        base = dict(root=tmp_path, paths=["a/x.jpg", "a/y.jpg", "b/z.jpg"], labels=np.array([0, 0, 1], np.int32),
                    widths=np.array([64, 64, 32], np.int32), heights=np.array([48, 48, 40], np.int32),
                    sizes=np.array([10, 11, 12], np.int64), mtimes=np.ones(3, np.int64), classes=["a", "b"],
                    crc32c=np.array([7, 8, 9], np.uint32))
        return Manifest(**(base | change))

    assert m().first_difference(m()) is None
    assert m().first_difference(m(heights=np.array([48, 50, 41], np.int32))) == \
        "height of 'a/y.jpg' differs (48 vs 50); 2 file(s) differ in heights"
    assert m().first_difference(m(widths=np.array([64, 64, 33], np.int32))) == \
        "width of 'b/z.jpg' differs (32 vs 33); 1 file(s) differ in widths"
    assert m().first_difference(m(crc32c=np.array([7, 8, 10], np.uint32))) == \
        "content checksum of 'b/z.jpg' differs (9 vs 10); 1 file(s) differ in crc32c"
    assert m().first_difference(m(labels=np.array([0, 1, 1], np.int32))) == \
        "label of 'a/y.jpg' differs (0 vs 1); 1 file(s) differ in labels"
    seven = [f"c{i}" for i in range(7)]
    assert m(classes=seven).first_difference(m(classes=["x", *seven[1:]])) == \
        "class names differ: ['c0', 'c1', 'c2', 'c3', 'c4']... vs ['x', 'c1', 'c2', 'c3', 'c4']..."  # five of each


def test_a_file_list_that_is_not_text_is_named_with_its_byte_and_the_fix(images, tmp_path):
    bad = tmp_path / "list.txt"
    bad.write_bytes(b"class_000/a.jpg 0\n\xff\xfe\n")
    with pytest.raises(DataError) as e:
        index(images, file_list=str(bad))
    assert str(e.value) == (f"{bad} is not a file list: byte 18 is not UTF-8 text (--file-list): give a text file "
                            "of 'relative/path [label]' lines")
