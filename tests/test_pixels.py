import numpy as np
import pytest
import torch

from fdcache.distill.pixels import PixelStream, ViewBatches, reference_pixels
from fdcache.errors import BadImageError
from fdcache.store.manifest import index
from fdcache.store.views import View, sample_views

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _stream(files, views, batch, res=48):
    batches = [np.arange(i, min(i + batch, len(files))) for i in range(0, len(files), batch)]
    work = ViewBatches(files, batches, [views[b] for b in batches])
    return PixelStream(work, resolution=res, mean=MEAN, std=STD, device="cpu", num_threads=2)


def test_dali_cpu_path_matches_the_pil_numpy_reference_on_every_format(image_root):
    m = index(image_root)  # baseline/progressive/gray/CMYK JPEG, RGBA PNG, EXIF-rotated JPEG
    files = [m.abspath(i) for i in range(len(m))]
    views = sample_views(0, 0, m.widths, m.heights)
    out = torch.cat([x for _, x in _stream(files, views, batch=5)])
    assert out.shape == (len(m), 3, 48, 48) and out.dtype == torch.float32
    for i in range(len(m)):
        ref = reference_pixels(files[i], views[i], 48, MEAN, STD)
        # 1e-3 in normalized units is ~0.07 of a pixel level.
        assert np.abs(out[i].numpy() - ref).max() < 1e-3, m.paths[i]


def test_flip_mirrors_the_crop(image_root):
    m = index(image_root)
    f = [m.abspath(0)] * 2
    v = np.array([View(3, 5, 30, 40, 0), View(3, 5, 30, 40, 1)], dtype=np.int32)
    (_, out), = list(_stream(f, v, batch=2))
    assert torch.equal(out[1], out[0].flip(-1))


def test_upscaling_small_crops_matches_the_reference(image_root):
    m = index(image_root)
    v = np.array([View(0, 0, 7, 11, 0)], dtype=np.int32)
    (_, out), = list(_stream([m.abspath(1)], v, batch=1, res=64))
    assert np.abs(out[0].numpy() - reference_pixels(m.abspath(1), v[0], 64, MEAN, STD)).max() < 1e-3


def test_a_truncated_jpeg_fails_naming_the_file(images):
    m = index(images)
    victim = m.abspath(6)
    data = open(victim, "rb").read()
    open(victim, "wb").write(data[: len(data) // 3])  # header intact: indexing cannot see it
    views = sample_views(0, 0, m.widths, m.heights)
    with pytest.raises(BadImageError) as e:
        list(_stream([m.abspath(i) for i in range(len(m))], views, batch=4))
    assert e.value.paths == [victim]


def test_dali_alone_refuses_only_a_damaged_file_with_or_without_a_view(images):
    """dali_refusal(f, view): None for a whole file, given its whole-image view or no view
    (the whole image then); DALI's reason for a file cut short."""
    from fdcache.distill.pixels import dali_refusal

    m = index(images)
    good, victim = m.abspath(2), m.abspath(6)
    assert dali_refusal(good) is None
    assert dali_refusal(good, (0, 0, int(m.heights[2]), int(m.widths[2]), 0)) is None
    data = open(victim, "rb").read()
    open(victim, "wb").write(data[: len(data) // 3])
    for view in (None, (0, 0, int(m.heights[6]), int(m.widths[6]), 0)):
        why = dali_refusal(victim, view)
        assert isinstance(why, str) and why, view


def test_a_dali_failure_no_single_file_explains_passes_dalis_own_reason_on(images):
    """explain_decode_failure: each file of the batch decodes alone, so the error is DALI's
    own cause (after its 'encountered:'), the batch and how many files were in flight."""
    from fdcache.distill.pixels import explain_decode_failure
    from fdcache.errors import DataError

    m = index(images)
    err = RuntimeError("Critical error in pipeline:\nError in thread 0: [/opt/dali/decoder.cc:12] "
                       "encountered:\nout of host memory while decoding")
    e = explain_decode_failure([(m.abspath(0), None), (m.abspath(1), None)], err, "batch 3")
    assert isinstance(e, DataError) and not isinstance(e, BadImageError)
    assert str(e) == ("DALI failed on batch 3, and each of its files decodes alone: out of host memory while "
                      "decoding (2 file(s) in flight): please report this with DALI's message")


@pytest.mark.parametrize("count", [5, 7])
def test_a_decode_failure_names_the_first_five_files_and_marks_more(tmp_path, count):
    """explain_decode_failure with ``count`` damaged files: the message counts them all, shows the
    first five with their reasons and ends the list with ' ...' only when there are more; the
    error carries every name (relative to the root)."""
    from fdcache.distill.pixels import explain_decode_failure, undecodable

    files = []
    for i in range(count):
        f = tmp_path / f"{i}.jpg"
        f.write_bytes(b"not an image %d" % i)
        files.append(str(f))
    why = undecodable([(f, None) for f in files])
    assert list(why) == files
    e = explain_decode_failure([(f, None) for f in files], RuntimeError("DALI"), "batch 0",
                               root_len=len(str(tmp_path)) + 1)
    shown = "; ".join(f"{i}.jpg: {why[files[i]]}" for i in range(5))
    more = " ..." if count > 5 else ""
    assert isinstance(e, BadImageError)
    assert str(e) == f"cannot decode {count} image(s) ({shown}{more}): remove or fix them"
    assert e.paths == [f"{i}.jpg" for i in range(count)]
