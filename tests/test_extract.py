import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import tree_bytes

from fdcache.codecs import CodecSpec, whitened_error
from fdcache.distill.extract import ExtractConfig, extract
from fdcache.distill.pixels import reference_pixels
from fdcache.distill.teachers import load_teacher
from fdcache.errors import BadImageError, StoreError, StoreLockedError, StoreMismatchError, VerifyError
from fdcache.models import TINY_TEACHER
from fdcache.store import Store
from fdcache.store.inspect import inspect_store, verify_store


def cfg(data, out, **kw) -> ExtractConfig:
    base = dict(teacher=TINY_TEACHER, random_init=True, seeds=2, batch_size=4, shard_size=4,
                progress=False, num_threads=2)
    base.update(kw)
    return ExtractConfig(data=str(data), out=str(out), **base)


@pytest.fixture(scope="module")
def fp16_store(image_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("s") / "fp16.zarr"
    extract(cfg(image_root, out))
    return out


def _recompute(store: Store, teacher, seed: int, i: int) -> torch.Tensor:
    m = store.manifest()
    px = reference_pixels(m.abspath(i), store.views(seed)[i], teacher.spec.resolution,
                          teacher.spec.mean, teacher.spec.std)
    return teacher(torch.from_numpy(px)[None])[0]


def test_stored_fp16_targets_equal_the_teacher_recomputed_from_the_file(fp16_store, tiny_teacher):
    store = Store.open(str(fp16_store))
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(8):
        s, i = int(rng.integers(2)), int(rng.integers(18))
        ref, got = _recompute(store, tiny_teacher, s, i), store.read(s, i, i + 1)[0]
        # fp16 rounding: half an ulp is 2**-11 of the value; pixels agree to ~1e-5.
        rel = ((got - ref).abs() / ref.abs().clamp_min(1e-2)).max().item()
        worst = max(worst, rel)
        torch.testing.assert_close(got, ref.half().float(), rtol=2e-3, atol=2e-3)
    print(f"max relative error vs recomputed teacher (fp16): {worst:.2e}")


def test_int8_store_error_after_whitening_is_under_one_percent(image_root, tmp_path, tiny_teacher):
    out = tmp_path / "int8.zarr"
    extract(cfg(image_root, out, seeds=1, codec=CodecSpec("int8")))
    store = Store.open(str(out))
    assert store.group["targets"].dtype == np.int8
    refs = torch.stack([_recompute(store, tiny_teacher, 0, i) for i in range(18)])
    err = whitened_error(refs, store.read(0, 0, 18))
    print(f"int8 error after whitening-LN: rel L2 {err['rel_l2']:.4f}, cosine {err['cosine']:.6f}")
    assert err["rel_l2"] < 0.01


def test_store_layout_views_and_attributes(fp16_store, tiny_teacher):
    store = Store.open(str(fp16_store))
    g = store.group
    assert g["targets"].shape == (2, 18, 17, 64) and g["targets"].dtype == np.float16
    assert g["views"].shape == (2, 18, 5) and g["done"][:].all()
    info = g.attrs["fdcache"]
    assert info["teacher"]["weights_sha256"] == tiny_teacher.spec.weights_sha256
    assert info["codec"]["name"] == "fp16" and info["view_policy"]["kind"] == "rrc"
    from fdcache.store.views import sample_view
    m = store.manifest()
    assert tuple(store.views(1)[5]) == sample_view(0, 1, 5, int(m.widths[5]), int(m.heights[5]))


def test_inspect_reports_bytes_ratio_and_completeness(fp16_store):
    r = inspect_store(str(fp16_store))
    assert r["shape"] == {"seeds": 2, "samples": 18, "tokens": 17, "dim": 64}
    assert r["raw_fp16_bytes_per_sample_view"] == 17 * 64 * 2
    assert r["bytes_per_sample_view"] == pytest.approx(r["bytes_stored"] / 36)
    assert r["completeness"][1] == {"seed": 1, "shards_done": 5, "shards": 5, "samples_done": 18, "skipped": 0}
    json.dumps(r)


def test_write_error_mid_run_keeps_the_store_resumable_and_resume_is_byte_identical(
        image_root, tmp_path, fp16_store, monkeypatch):
    out = tmp_path / "crash.zarr"
    real, calls = Store.write_shard, []

    def failing(self, seed, k, arrays, skipped):
        calls.append((seed, k))
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, seed, k, arrays, skipped)

    monkeypatch.setattr(Store, "write_shard", failing)
    with pytest.raises(StoreError, match="No space left.*re-run the same command"):
        extract(cfg(image_root, out, writers=1))
    monkeypatch.setattr(Store, "write_shard", real)
    assert 0 < Store.open(str(out)).done().sum() < 10
    with pytest.raises(VerifyError, match="problem"):
        verify_store(str(out))
    r = extract(cfg(image_root, out))
    assert r.already_done >= 3 and r.shards <= 7
    assert tree_bytes(out) == tree_bytes(fp16_store)


# Runs `fdcache extract` and sends itself SIGNAL right after the AT-th call of PATCH
# (`module:Class.method`) returns: a signal at a known point, not a timing.
_SIGNALLED_EXTRACT = """
import importlib, os, signal, sys
from fdcache.cli.app import main
# Python turns SIGINT into KeyboardInterrupt only when it starts with SIGINT at its default; a
# test run started in the background (nohup, `cmd &` in a script) passes SIGINT on ignored, and
# then the run rightly ignores it, as a background job ignores the terminal's Ctrl-C. A run
# from a terminal has the default: so does this one.
signal.signal(signal.SIGINT, signal.default_int_handler)
mod, _, attr = os.environ["PATCH"].partition(":")
cls_name, meth = attr.split(".")
cls = getattr(importlib.import_module(mod), cls_name)
real, calls = getattr(cls, meth), []
def patched(self, *args, **kw):
    out = real(self, *args, **kw)
    calls.append(1)
    if len(calls) == int(os.environ["AT"]):
        os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL"]))
    return out
setattr(cls, meth, patched)
sys.argv = ["fdcache", *sys.argv[1:]]
main()
"""
# SIGKILL after the 5th shard write returns (the other writer thread may be mid-write).
_KILL = dict(PATCH="fdcache.store:Store.write_shard", AT="5", SIGNAL="SIGKILL")


def test_sigkill_mid_run_then_resume_is_byte_identical(image_root, tmp_path):
    args = ["extract", str(image_root), "--teacher", TINY_TEACHER, "--random-init", "--seeds", "3",
            "--batch-size", "2", "--shard-size", "2", "--threads", "1"]
    ref, out = tmp_path / "ref.zarr", tmp_path / "killed.zarr"
    subprocess.run([sys.executable, "-m", "fdcache", *args, "--out", str(ref)], check=True, capture_output=True)
    killed = subprocess.run([sys.executable, "-c", _SIGNALLED_EXTRACT, *args, "--out", str(out)],
                            capture_output=True, env=dict(os.environ, **_KILL))
    assert killed.returncode == -signal.SIGKILL
    done = Store.open(str(out)).done()
    assert 5 <= done.sum() < done.size  # 3 seeds x 9 shards
    subprocess.run([sys.executable, "-m", "fdcache", *args, "--out", str(out)], check=True, capture_output=True)
    assert tree_bytes(out) == tree_bytes(ref)


# Ctrl-C as the terminal sends it: SIGINT, handled by Python in the main thread. Sent from the
# main thread's own encode of the 7th batch, so it arrives there mid-run every time (sent from a
# writer thread it reaches the main thread wherever that happens to be).
_CTRL_C = dict(PATCH="fdcache.codecs.spec:CodecSpec.encode", AT="7", SIGNAL="SIGINT")


def test_ctrl_c_mid_run_says_what_is_kept_and_the_same_command_resumes(image_root, tmp_path):
    args = ["extract", str(image_root), "--teacher", TINY_TEACHER, "--random-init", "--seeds", "2",
            "--batch-size", "2", "--shard-size", "2", "--threads", "1"]
    ref, out = tmp_path / "ref.zarr", tmp_path / "int.zarr"
    subprocess.run([sys.executable, "-m", "fdcache", *args, "--out", str(ref)], check=True, capture_output=True)
    stopped = subprocess.run([sys.executable, "-c", _SIGNALLED_EXTRACT, *args, "--out", str(out)],
                             capture_output=True, text=True, env=dict(os.environ, **_CTRL_C))
    assert stopped.returncode == 130, stopped.stderr
    assert "interrupted: the shards marked done" in stopped.stderr and "Traceback" not in stopped.stderr
    assert Store.open(str(out)).done().sum() < 18
    subprocess.run([sys.executable, "-m", "fdcache", *args, "--out", str(out)], check=True, capture_output=True)
    assert tree_bytes(out) == tree_bytes(ref)


def test_resume_removes_the_temporary_file_a_killed_zarr_write_leaves(image_root, tmp_path, fp16_store):
    """zarr's LocalStore writes <key>.<uuid>.partial, then renames it: a kill in between leaves it."""
    out = tmp_path / "s.zarr"
    shutil.copytree(fp16_store, out)
    done = Store.open(str(out), mode="r+").group["done"]
    done[1, 2] = 0  # that shard was being written when the process died
    stray = out / "targets" / "c" / "1" / "2" / "0" / f"0.{'ab' * 16}.partial"
    stray.write_bytes(b"half a shard")
    keep = out / "notes.partial"  # not zarr's pattern: not ours to delete
    keep.write_bytes(b"x")
    r = extract(cfg(image_root, out))
    assert r.shards == 1 and not stray.exists() and keep.exists()
    keep.unlink()
    assert tree_bytes(out) == tree_bytes(fp16_store)


def test_raising_seeds_appends_and_equals_a_fresh_run(image_root, tmp_path, fp16_store):
    out = tmp_path / "grow.zarr"
    extract(cfg(image_root, out, seeds=1))
    r = extract(cfg(image_root, out, seeds=2))
    assert r.already_done == 5 and r.shards == 5
    assert tree_bytes(out) == tree_bytes(fp16_store)


def test_two_process_torchrun_equals_one_process(image_root, tmp_path, fp16_store):
    out = tmp_path / "ddp.zarr"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "fdcache", "extract", str(image_root), "--out", str(out), "--teacher", TINY_TEACHER,
           "--random-init", "--seeds", "2", "--batch-size", "4", "--shard-size", "4", "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert tree_bytes(out) == tree_bytes(fp16_store)


@pytest.mark.parametrize("change,field", [
    (dict(init_seed=1), "teacher.weights_sha256"),
    (dict(codec=CodecSpec("int8")), "codec"),
    (dict(global_seed=5), "global_seed"),
])
def test_existing_store_from_another_teacher_or_policy_is_refused(image_root, tmp_path, change, field):
    out = tmp_path / "s.zarr"
    extract(cfg(image_root, out, seeds=1))
    before = tree_bytes(out)
    with pytest.raises(StoreMismatchError, match=field.replace(".", r"\.")):
        extract(cfg(image_root, out, seeds=1, **change))
    assert tree_bytes(out) == before  # nothing lost
    extract(cfg(image_root, out, seeds=1, overwrite=True, **change))
    assert Store.open(str(out)).info.global_seed == change.get("global_seed", 0)


def test_store_from_another_dataset_is_refused(images, tmp_path):
    out = tmp_path / "s.zarr"
    extract(cfg(images, out, seeds=1))
    victim = next((images / "class_002").iterdir())
    victim.unlink()
    with pytest.raises(StoreMismatchError, match="dataset"):
        extract(cfg(images, out, seeds=1))


def test_undecodable_image_stops_naming_it_and_skip_bad_records_it(images, tmp_path, tiny_teacher):
    victim = sorted((images / "class_001").glob("*.jpg"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])
    rel = victim.relative_to(images).as_posix()
    out = tmp_path / "bad.zarr"
    with pytest.raises(BadImageError, match=rel):
        extract(cfg(images, out, seeds=1))
    r = extract(cfg(images, out, seeds=1, skip_bad=True))
    assert r.skipped == [rel]
    store = Store.open(str(out))
    i = store.manifest().paths.index(rel)
    assert store.skipped(0)[i] and store.skipped(0).sum() == 1
    assert not store.read(0, i, i + 1).any()
    # Neighbours in the same shard were still computed correctly.
    j = i + 1 if i % 4 != 3 else i - 1
    torch.testing.assert_close(store.read(0, j, j + 1)[0], _recompute(store, tiny_teacher, 0, j).half().float(),
                               rtol=2e-3, atol=2e-3)


def test_verify_passes_on_a_whole_store_and_fails_on_a_corrupt_chunk(image_root, tmp_path):
    out = tmp_path / "v.zarr"
    extract(cfg(image_root, out, seeds=1))
    assert verify_store(str(out))["shards_checked"] == 5
    shard = out / "targets" / "c" / "0" / "2" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(VerifyError) as e:
        verify_store(str(out))
    assert any("shard 2" in p for p in e.value.problems)


def test_verify_warns_on_new_mtimes_and_content_check_names_a_same_size_edit(images, tmp_path):
    out = tmp_path / "v.zarr"
    extract(cfg(images, out, seeds=1))
    victim = sorted((images / "class_000").iterdir())[1]
    rel = victim.relative_to(images).as_posix()
    os.utime(victim, ns=(0, 0))  # what a copy does to every file: a warning, not a problem
    r = verify_store(str(out))
    assert len(r["warnings"]) == 1 and rel in r["warnings"][0] and "--content" in r["warnings"][0]
    edited = sorted((images / "class_001").iterdir())[0]
    st = edited.stat()
    raw = bytearray(edited.read_bytes())
    raw[-3] ^= 0x01  # same size, mtime restored: only the content check can see it
    edited.write_bytes(bytes(raw))
    os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert verify_store(str(out))["warnings"] == r["warnings"]
    with pytest.raises(VerifyError) as e:
        verify_store(str(out), content=True)
    assert e.value.problems == [f"dataset: {edited.relative_to(images).as_posix()}: content changed (crc32c differs)"]


def test_verify_content_finds_an_edit_past_the_first_4_mib_of_a_file(images, tmp_path):
    from PIL import Image

    big = images / "class_000" / "big.bmp"  # 1200x1200 RGB: 4.3 MB, past one 4 MiB read
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > (4 << 20) + 1000
    out = tmp_path / "v.zarr"
    extract(cfg(images, out, seeds=1))
    st = big.stat()
    raw = bytearray(big.read_bytes())
    raw[(4 << 20) + 500] ^= 0x01  # one pixel's byte, same size, mtime restored
    big.write_bytes(bytes(raw))
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert verify_store(str(out))["warnings"] == []
    with pytest.raises(VerifyError) as e:
        verify_store(str(out), content=True)
    assert e.value.problems == ["dataset: class_000/big.bmp: content changed (crc32c differs)"]


def test_a_second_writer_is_refused_while_the_first_computes_its_shards(image_root, tmp_path, monkeypatch):
    """The writer lock is held for the whole extract, not only while the store is created:
    a second extract started at each shard write (an injected hook, not a timing) is refused."""
    out = tmp_path / "s.zarr"
    refusals = []
    real = Store.write_shard

    def write_then_try_a_second_writer(self, seed, k, *args, **kw):
        try:
            extract(cfg(image_root, out))
        except StoreLockedError as e:
            refusals.append(str(e))
        return real(self, seed, k, *args, **kw)

    monkeypatch.setattr(Store, "write_shard", write_then_try_a_second_writer)
    extract(cfg(image_root, out, writers=1))
    assert len(refusals) == 10  # 2 seeds x 5 shards: refused at every one
    assert all("being written by another fdcache process" in r and f"pid {os.getpid()}" in r
               for r in refusals)
    monkeypatch.undo()
    assert verify_store(str(out))["shards_checked"] == 10
    assert extract(cfg(image_root, out)).shards == 0  # released at the end: the next run gets it


def test_int4_dither_of_each_row_is_keyed_by_its_seed_and_sample(image_root, tmp_path):
    """Stored int4-dither bytes are ``quantize_int4(x, u=dither(seed, sample))`` of the
    teacher's map, for every seed: the key's definition, not a second run of the same code."""
    from fdcache.codecs.int4 import dither, quantize_int4

    teacher = load_teacher(TINY_TEACHER, random_init=True)
    teacher.register_forward_hook(lambda m, i, out: out.half().float())  # fp16-exact maps
    extract(cfg(image_root, tmp_path / "fp16.zarr", shard_size=6, batch_size=6), teacher=teacher)
    extract(cfg(image_root, tmp_path / "int4.zarr", shard_size=6, batch_size=6,
                codec=CodecSpec("int4-dither")), teacher=teacher)
    exact, int4 = Store.open(str(tmp_path / "fp16.zarr")), Store.open(str(tmp_path / "int4.zarr"))
    samples = torch.arange(18)
    for seed in range(2):
        x = exact.read(seed, 0, 18)  # the teacher's map, exactly (fp16 in, fp16 stored)
        packed, qp = quantize_int4(x, u=dither(seed, samples, x.shape[1], x.shape[2]))
        stored = int4.reader().read(seed, samples.numpy())
        assert np.array_equal(stored["targets"], packed.numpy()), seed
        assert np.array_equal(stored["qparams"], qp.numpy()), seed


def test_fsspec_urls_work_as_store_locations(image_root, tmp_path):
    url = f"file://{tmp_path / 'url.zarr'}"
    extract(cfg(image_root, url, seeds=1))
    assert inspect_store(url)["complete"]
    assert verify_store(url)["shards_checked"] == 5
    mem = "memory://fdcache-test.zarr"
    extract(cfg(image_root, mem, seeds=1))
    torch.testing.assert_close(Store.open(mem).read(0, 0, 18), Store.open(url).read(0, 0, 18))
