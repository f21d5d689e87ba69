"""One decoder contract (fdcache.images): DALI (extract, train) and PIL (fine-tuning, eval,
FLYP, diagnose, the reference pixels) give the same pixels for every file fdcache takes, and
a file they would disagree on, or that DALI cannot decode, is refused by name, with its reason,
in a way --skip-bad can skip."""

import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fdcache.cli.app import app
from fdcache.distill.pixels import PixelStream, ViewBatches, reference_pixels
from fdcache.distill.teachers import TINY_TEACHER
from fdcache.errors import BadImageError, DataError
from fdcache.samples import make_image_folder
from fdcache.store.manifest import index
from fdcache.tune.imagefolder import LabeledImages

RNG = np.random.default_rng(0)
BASE = RNG.integers(0, 256, (24, 32, 3)).astype(np.uint8)


def _png16(path: Path, a: np.ndarray, colour_type: int) -> None:
    """A 16-bit PNG written byte by byte (PIL cannot write 16-bit colour)."""
    h, w = a.shape[:2]
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def accepted_images(root: Path) -> list[Path]:
    """One file per mode both decoders take; 16-bit gray is the one PIL used to clip."""
    d = root / "class_a"
    d.mkdir(parents=True)
    img = Image.fromarray(BASE)
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {"gray16.png": lambda p: Image.fromarray(RNG.integers(0, 65536, (24, 32)).astype(np.uint16)).save(p),
             "palette.png": lambda p: img.quantize(16).save(p),
             "palette_alpha.png": lambda p: img.quantize(16).save(p, transparency=0),
             "gray_alpha.png": lambda p: img.convert("LA").save(p),
             "bilevel.png": lambda p: img.convert("1").save(p),
             "cmyk.jpg": lambda p: img.convert("CMYK").save(p, quality=95),
             "rotated.jpg": lambda p: img.save(p, quality=95, exif=exif),
             "rotated.png": lambda p: img.save(p, exif=exif),
             "rgba.webp": lambda p: img.convert("RGBA").save(p, lossless=True)}
    for name, write in files.items():
        write(d / name)
    shutil.copytree(d, root / "class_b")
    return sorted(d.iterdir())


def dali_decode(path: Path) -> np.ndarray:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, exec_dynamic=True)
    def pipe():
        enc = fn.external_source(source=lambda: [np.fromfile(path, np.uint8)], batch=True)
        return fn.decoders.image(enc, output_type=types.RGB, device="cpu")

    p = pipe()
    p.build()
    (out,) = p.run()
    return np.asarray(out.as_tensor())[0]


def test_fine_tuning_reads_the_pixels_dali_decodes_for_every_accepted_mode(tmp_path):
    files = accepted_images(tmp_path / "data")
    ds = LabeledImages(tmp_path / "data", transform=np.asarray)
    by_name = {Path(p).name: i for i, (p, _) in enumerate(ds.samples) if "class_a" in p}
    for f in files:
        pil, _, _ = ds[by_name[f.name]]
        assert np.array_equal(pil, dali_decode(f)), f.name


def test_reference_pixels_follow_the_contract_for_16_bit_gray(tmp_path):
    f = tmp_path / "g.png"
    Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(f)  # 40000/257 = 155.6: not white
    px = reference_pixels(str(f), (0, 0, 20, 20, 0), 8, (0.0,) * 3, (1.0 / 255,) * 3)
    assert np.allclose(px, 156)


def refused_images(d: Path) -> dict[str, str]:
    """file name -> a word of the reason it is refused."""
    d.mkdir(parents=True, exist_ok=True)
    frames = [Image.fromarray(BASE), Image.fromarray(255 - BASE)]
    frames[0].save(d / "animated.jpg", format="GIF", save_all=True, append_images=frames[1:])
    _png16(d / "colour16.png", RNG.integers(0, 65536, (24, 32, 3)).astype(np.uint16), 2)
    Image.fromarray(RNG.random((24, 32)).astype(np.float32)).save(d / "float.tif")
    return {"animated.jpg": "GIF", "colour16.png": "16 bits", "float.tif": "mode F"}


def test_files_the_decoders_disagree_on_are_refused_by_name_on_every_path(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=2, per_class=2)
    refused = refused_images(root / "class_000")
    with pytest.raises(BadImageError) as e:
        index(root)
    assert len(e.value.paths) == 3
    m = index(root, skip_bad=True)
    assert sorted(Path(m.paths[i]).name for i in np.flatnonzero(m.bad)) == sorted(refused)
    ds = LabeledImages(root, transform=np.asarray)
    for i, (path, _) in enumerate(ds.samples):
        name = Path(path).name
        if name in refused:
            with pytest.raises(DataError, match=refused[name]) as e:
                ds[i]
            assert name in str(e.value)
            with pytest.raises(DataError, match=name):
                reference_pixels(path, (0, 0, 8, 8, 0), 8, (0.5,) * 3, (0.5,) * 3)


def extract_cli(data: Path, out: Path, *extra):
    return CliRunner().invoke(app, ["extract", str(data), "--out", str(out), "--teacher", TINY_TEACHER,
                                    "--random-init", "--batch-size", "4", "--shard-size", "4", "--threads", "1",
                                    *extra])


def test_extract_names_a_gif_called_jpg_and_skip_bad_skips_it(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=2, per_class=2)
    frames = [Image.fromarray(BASE), Image.fromarray(255 - BASE)]
    frames[0].save(root / "class_001" / "zz.jpg", format="GIF", save_all=True, append_images=frames[1:])
    r = extract_cli(root, tmp_path / "s.zarr")
    assert r.exit_code == 2 and "class_001/zz.jpg" in r.output and "GIF" in r.output, r.output
    r = extract_cli(root, tmp_path / "s.zarr", "--skip-bad")
    assert r.exit_code == 0 and "skipped 1 unreadable image(s)" in r.output and "zz.jpg" in r.output, r.output


def test_a_file_only_dali_refuses_is_named_with_dalis_reason_and_skip_bad_skips_it(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=2, per_class=2)
    exif = Image.Exif()
    exif[0x0112] = 3
    Image.fromarray(BASE).save(root / "class_000" / "zz.webp", lossless=True, exif=exif)  # DALI 2.4 fails on it
    r = extract_cli(root, tmp_path / "s.zarr")
    assert r.exit_code == 2 and "class_000/zz.webp: nvImageCodec failure" in r.output, r.output
    assert "Critical error in pipeline" not in r.output
    r = extract_cli(root, tmp_path / "s.zarr", "--skip-bad")
    assert r.exit_code == 0 and "class_000/zz.webp" in r.output, r.output


def test_a_window_outside_a_replaced_image_keeps_dalis_reason_and_names_the_file(tmp_path):
    small = tmp_path / "small.jpg"
    Image.fromarray(BASE[:16, :20]).save(small)  # replaced by a smaller picture after extraction
    work = ViewBatches([str(small)], [np.array([0])], [np.array([[0, 0, 24, 32, 0]], np.int32)])
    stream = PixelStream(work, resolution=16, mean=(0.5,) * 3, std=(0.5,) * 3, num_threads=1)
    with pytest.raises(BadImageError, match=r"small.jpg: The cropping window .* not valid for image dimensions"):
        list(stream)


@pytest.mark.parametrize("name", ["colour16.png", "float.tif"])
def test_a_file_refused_in_a_loader_worker_is_the_same_named_error_as_without_workers(tmp_path, name):
    """torch re-raises a worker's exception with its traceback as the message (or as a
    RuntimeError when the type takes other arguments): eval and finetune with loader workers
    must still end in fdcache's one-line error naming the file, exit 2."""
    root = make_image_folder(tmp_path / "data", classes=2, per_class=2)
    refused_images(tmp_path / "bad")
    shutil.copy(tmp_path / "bad" / name, root / "class_001" / name)
    runs = {}
    for workers in ("0", "2"):
        runs[workers] = CliRunner().invoke(app, ["eval", "--model", TINY_TEACHER, "--random-init", "--data", str(root),
                                                 "--resolution", "32", "--batch-size", "2", "--workers", workers,
                                                 "--device", "cpu"])
    for r in runs.values():
        assert r.exit_code == 2, r.output
        assert name in r.output and "Traceback" not in r.output and "Caught" not in r.output, r.output
    assert runs["0"].output == runs["2"].output  # the same message, workers or not
