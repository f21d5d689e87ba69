"""Store integrity (issue 10): nothing lost, nothing silent, crash-safe at every step."""

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import zarr
from conftest import tree_bytes
from PIL import Image
from typer.testing import CliRunner

from fdcache.distill.extract import ExtractConfig, extract, open_or_create, views_source
from fdcache.distill.teachers import load_teacher
from fdcache.distill.train import DistillTask, TrainConfig
from fdcache.errors import (
    BadImageError,
    ConfigError,
    DataError,
    StoreDataError,
    StoreError,
    StoreLockedError,
    TeacherError,
    VerifyError,
)
from fdcache.models import TINY_TEACHER
from fdcache.samples import make_image_folder
from fdcache.store import Store
from fdcache.store.inspect import verify_store
from fdcache.store.location import Location
from fdcache.store.manifest import index


def cfg(data, out, **kw) -> ExtractConfig:
    base = dict(teacher=TINY_TEACHER, random_init=True, seeds=1, batch_size=4, shard_size=4,
                progress=False, num_threads=1, writers=1)
    base.update(kw)
    return ExtractConfig(data=str(data), out=str(out), **base)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    """6 images in 2 classes: 2 shards of 4 per seed."""
    return make_image_folder(tmp_path_factory.mktemp("small") / "images", classes=2, per_class=3)


@pytest.fixture
def small(small_root, tmp_path) -> Path:
    return Path(shutil.copytree(small_root, tmp_path / "images"))


@pytest.fixture(scope="module")
def small_store(small_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("st") / "s.zarr"
    extract(cfg(small_root, out))
    return out


class Faults:
    """Make the ``at``-th write or delete through zarr's LocalStore raise OSError, as a kill
    or a full disk would stop the process there; ``at=None`` only counts them."""

    def __init__(self, monkeypatch, at=None):
        self.n, self.at = 0, at
        store = zarr.storage.LocalStore
        for name in ("_set", "delete", "delete_dir"):
            monkeypatch.setattr(store, name, self._wrap(getattr(store, name)))

    def _wrap(self, real):
        async def op(store, key, *a, **kw):
            self.n += 1
            if self.at is not None and self.n - 1 == self.at:
                raise OSError(28, f"injected fault at write {self.at} ({key})")
            return await real(store, key, *a, **kw)
        return op


def _settle() -> None:
    """Let the writes zarr still has in flight finish: a failed write fails its ``gather`` at
    once while its siblings run on in zarr's event loop, and the "same command again" must
    start after them, as a new process would (else it races a write of the failed run)."""
    from zarr.core.sync import sync

    async def rest():
        me = asyncio.current_task()
        await asyncio.gather(*(t for t in asyncio.all_tasks() if t is not me), return_exceptions=True)

    sync(rest())


def _run_store_step(c, teacher, manifest, monkeypatch, at):
    """The store part of an extract command with the ``at``-th write failing; True if it failed."""
    with monkeypatch.context() as m:
        Faults(m, at)
        try:
            open_or_create(c, teacher, manifest)
        except (StoreError, OSError):
            return True
        finally:
            _settle()
    return False


def _count(c, teacher, manifest, monkeypatch) -> int:
    with monkeypatch.context() as m:
        f = Faults(m)
        open_or_create(c, teacher, manifest)
    return f.n


@pytest.mark.parametrize("replacing", [False, True])
def test_creation_cut_at_every_write_is_finished_by_the_same_command(small_root, tmp_path, tiny_teacher,
                                                                      monkeypatch, replacing):
    manifest = index(small_root, checksums=True)
    ref = tmp_path / "ref.zarr"
    n = _count(cfg(small_root, ref, seeds=2, overwrite=replacing), tiny_teacher, manifest, monkeypatch)
    assert n > 10
    for k in range(n):
        out = tmp_path / f"cut{k}.zarr"
        if replacing:  # an existing store made differently, being replaced with --overwrite
            open_or_create(cfg(small_root, out, global_seed=5), tiny_teacher, manifest)
        c = cfg(small_root, out, seeds=2, overwrite=replacing)
        assert _run_store_step(c, tiny_teacher, manifest, monkeypatch, k), k
        open_or_create(c, tiny_teacher, manifest)  # the same command again
        assert tree_bytes(out) == tree_bytes(ref), f"cut at write {k}"
        shutil.rmtree(out)


def test_seed_growth_cut_at_every_write_is_finished_by_the_same_command(small_root, tmp_path, tiny_teacher,
                                                                         monkeypatch):
    manifest = index(small_root, checksums=True)
    ref = tmp_path / "ref.zarr"
    open_or_create(cfg(small_root, ref), tiny_teacher, manifest)
    n = _count(cfg(small_root, ref, seeds=3), tiny_teacher, manifest, monkeypatch)
    assert n >= 5
    for k in range(n):
        out = tmp_path / f"cut{k}.zarr"
        open_or_create(cfg(small_root, out), tiny_teacher, manifest)
        assert _run_store_step(cfg(small_root, out, seeds=3), tiny_teacher, manifest, monkeypatch, k), k
        assert Store.open(str(out)).num_seeds in (1, 3)  # readers never see half-grown seeds
        open_or_create(cfg(small_root, out, seeds=3), tiny_teacher, manifest)
        assert tree_bytes(out) == tree_bytes(ref), f"cut at write {k}"
        shutil.rmtree(out)


def test_extract_cut_during_creation_and_growth_resumes_to_the_uninterrupted_store(small_root, tmp_path,
                                                                                    monkeypatch):
    ref = tmp_path / "ref.zarr"
    extract(cfg(small_root, ref, seeds=2))
    out = tmp_path / "cut.zarr"
    with monkeypatch.context() as m:
        Faults(m, at=6)  # inside creation: arrays exist, the binding does not
        with pytest.raises(StoreError, match="re-run the same command"):
            extract(cfg(small_root, out))
    with pytest.raises(StoreError, match="creation was interrupted"):
        Store.open(str(out))
    extract(cfg(small_root, out))
    with monkeypatch.context() as m:
        Faults(m, at=2)  # inside seed growth
        with pytest.raises(StoreError, match="seed growth is redone"):
            extract(cfg(small_root, out, seeds=2))
    extract(cfg(small_root, out, seeds=2))
    assert tree_bytes(out) == tree_bytes(ref)


def test_extract_cut_at_every_shard_write_resumes_to_the_uninterrupted_store(small_root, small_store, tmp_path,
                                                                              monkeypatch, tiny_teacher):
    manifest = index(small_root, checksums=True)
    creation = _count(cfg(small_root, tmp_path / "count.zarr"), tiny_teacher, manifest, monkeypatch)
    with monkeypatch.context() as m:
        f = Faults(m)
        extract(cfg(small_root, tmp_path / "count2.zarr"))
    assert f.n - creation == 6  # 2 shards x (targets, skip flags, done marker)
    for k in range(creation, f.n):
        out = tmp_path / f"cut{k}.zarr"
        with monkeypatch.context() as m:
            Faults(m, at=k)
            with pytest.raises(StoreError, match="re-run the same command"):
                extract(cfg(small_root, out))
        extract(cfg(small_root, out))
        assert tree_bytes(out) == tree_bytes(small_store), f"cut at write {k}"


def test_overwrite_never_deletes_a_users_files(small_root, tmp_path):
    user = tmp_path / "results"
    (user / "sub").mkdir(parents=True)
    (user / "thesis.tex").write_text("years of work")
    (user / "sub" / "data.csv").write_text("1,2")
    before = tree_bytes(user)
    for overwrite in (False, True):
        with pytest.raises(StoreError) as e:
            extract(cfg(small_root, user, overwrite=overwrite))
        assert str(e.value) == (f"--out {user} is not empty and is not an fdcache store (it holds sub, thesis.tex). "
                                "fdcache never deletes what it did not write, with or without --overwrite: "
                                "choose another --out, or move those files away yourself.")
        assert tree_bytes(user) == before
    # A store that also holds a user's file is not replaced either.
    store = tmp_path / "s.zarr"
    extract(cfg(small_root, store))
    (store / "notes.txt").write_text("mine")
    with pytest.raises(StoreError) as e:
        extract(cfg(small_root, store, overwrite=True, global_seed=3))
    assert str(e.value) == (f"the fdcache store at {store} also holds entries fdcache did not write (notes.txt); "
                            "it will not replace the store and delete them. Move them away first.")
    assert (store / "notes.txt").read_text() == "mine" and Store.open(str(store)).info.global_seed == 0
    # --out naming a regular file is a named error, and the file is kept.
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        extract(cfg(small_root, f, overwrite=True))
    assert f.read_text() == "x"


def test_overwrite_replaces_an_fdcache_store_and_an_empty_folder(small_root, tmp_path, small_store):
    empty = tmp_path / "empty"
    empty.mkdir()
    extract(cfg(small_root, empty))
    assert tree_bytes(empty) == tree_bytes(small_store)
    extract(cfg(small_root, empty, overwrite=True, global_seed=7))
    assert Store.open(str(empty)).info.global_seed == 7


def test_a_second_writer_is_refused_naming_the_holder(small_root, tmp_path):
    out = tmp_path / "s.zarr"
    holder = subprocess.Popen(  # another process holding the store, as a running extract does
        [sys.executable, "-c", "import sys; from fdcache.store.location import Location; "
         "Location.resolve(sys.argv[1]).writer_lock().__enter__(); print('held', flush=True); sys.stdin.read()", str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # holds it until killed
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreLockedError, match=rf"{socket.gethostname()}.*{holder.pid}"):
            extract(cfg(small_root, out))
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    extract(cfg(small_root, out))  # the kernel dropped the dead holder's lock: the same command runs
    with Location.resolve(str(out)).writer_lock():  # and released its own
        pass


def test_train_refuses_a_deleted_shard_file_instead_of_training_on_zeros(small_store, tmp_path):
    store = tmp_path / "s.zarr"
    shutil.copytree(small_store, store)
    (store / "targets" / "c" / "0" / "1" / "0" / "0").unlink()
    with pytest.raises(StoreDataError, match=r"seed 0 shard 1 \(samples 4\.\.5\).*--repair") as e:
        DistillTask(TrainConfig(out=str(tmp_path / "run"), cache=str(store), student="fd-tiny", steps=1,
                            batch_size=2, progress=False, device="cpu"))
    assert (e.value.seed, e.value.shard, e.value.samples) == (0, 1, (4, 6))


def test_the_same_extract_recomputes_a_deleted_shard_file_without_verify(small_root, small_store, tmp_path):
    store = tmp_path / "s.zarr"
    shutil.copytree(small_store, store)
    (store / "skipped" / "c" / "0" / "1").unlink()
    assert extract(cfg(small_root, store)).shards == 1
    assert tree_bytes(store) == tree_bytes(small_store)


def test_a_copied_data_folder_trains_with_a_warning(small_store, small_root, tmp_path, caplog):
    copy = tmp_path / "copy"
    shutil.copytree(small_root, copy, copy_function=shutil.copyfile)  # new mtimes, same bytes
    DistillTask(TrainConfig(out=str(tmp_path / "run"), cache=str(small_store), data=str(copy), student="fd-tiny",
                        steps=1, batch_size=2, progress=False, device="cpu"))
    n = sum(1 for p in small_root.rglob("*") if p.is_file())
    assert f"{n} file(s) have a new mtime but their recorded size" in caplog.text
    assert f"To check their bytes run: fdcache verify {small_store} --data {copy} --content" in caplog.text
    assert verify_store(str(small_store), data=copy, content=True)["warnings"] == []


def _damage(path: Path, how: str) -> None:
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # one byte flipped (0xFF: also breaks the UTF-8 of a zarr.json)
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["delete", "truncate", "flip"])
def test_verify_reports_any_single_damaged_file_and_never_crashes(small_store, tmp_path, how):
    files = sorted(p.relative_to(small_store) for p in small_store.rglob("*") if p.is_file())
    assert len(files) > 25
    for rel in files:
        if how == "truncate" and (small_store / rel).stat().st_size < 2:
            continue
        store = tmp_path / f"{how}.zarr"
        shutil.copytree(small_store, store)
        _damage(store / rel, how)
        with pytest.raises(VerifyError) as e:
            verify_store(str(store), check_files=False)
        assert e.value.problems, rel
        shutil.rmtree(store)



def test_verify_names_a_damaged_shards_sample_range_and_a_missing_manifest_chunk(small_store, tmp_path):
    """A flipped byte in seed 0's shard 1 of targets: one problem naming the shard's samples
    a..b-1 (a hand count from the shard size); a deleted manifest chunk: its array and chunk."""
    from fdcache.store.audit import _REMAKE

    store = tmp_path / "s.zarr"
    shutil.copytree(small_store, store)
    size, n = Store.open(str(store)).info.shard_size, Store.open(str(store)).info.num_samples
    a, b = size, min(2 * size, n)
    shard = store / "targets" / "c" / "0" / "1" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0x01
    shard.write_bytes(bytes(raw))
    with pytest.raises(VerifyError) as e:
        verify_store(str(store), check_files=False)
    assert len(e.value.problems) == 1
    assert e.value.problems[0].startswith(f"seed 0 shard 1 (samples {a}..{b - 1}): targets of seed 0, shard 1 "
                                          f"(samples {a}..{b - 1}) in "), e.value.problems
    shutil.rmtree(store)
    shutil.copytree(small_store, store)
    (store / "manifest" / "labels" / "c" / "0").unlink()
    with pytest.raises(VerifyError) as e:
        verify_store(str(store), check_files=False)
    assert f"manifest/labels: chunk(s) [0] missing. {_REMAKE}" in e.value.problems

def test_verify_names_a_missing_views_chunk_and_edited_attributes(small_store, tmp_path):
    store = tmp_path / "s.zarr"
    shutil.copytree(small_store, store)
    (store / "views" / "c" / "0" / "0" / "0").unlink()
    with pytest.raises(VerifyError) as e:
        verify_store(str(store), check_files=False)
    assert e.value.problems == ["views of seed 0 (chunk 0): missing"]
    for field, value in (("shard_size", 3), ("num_samples", 5)):
        shutil.rmtree(store)
        shutil.copytree(small_store, store)
        g = zarr.open_group(str(store), mode="r+")
        info = g.attrs["fdcache"]
        g.attrs["fdcache"] = info | {field: value}
        with pytest.raises(VerifyError) as e:
            verify_store(str(store), check_files=False)
        assert any(field in p for p in e.value.problems), e.value.problems


@pytest.mark.parametrize("damage", ["flip targets", "delete skipped", "flip done", "delete views"])
def test_repair_then_the_same_extract_restores_the_store_byte_for_byte(small_root, small_store, tmp_path, damage):
    store = tmp_path / "s.zarr"
    shutil.copytree(small_store, store)
    how, name = damage.split()
    path = {"targets": "targets/c/0/1/0/0", "skipped": "skipped/c/0/0", "done": "done/c/0/1",
            "views": "views/c/0/0/0"}[name]
    _damage(store / path, how)
    with pytest.raises(VerifyError, match="--repair"):
        verify_store(str(store), check_files=False)
    with pytest.raises(VerifyError, match="repair: "):
        verify_store(str(store), check_files=False, repair=True)
    extract(cfg(small_root, store))
    assert tree_bytes(store) == tree_bytes(small_store)
    verify_store(str(store))


def test_skip_bad_records_empty_and_text_files_named_jpg(small, tmp_path):
    (small / "class_000" / "zz_empty.jpg").write_bytes(b"")
    (small / "class_001" / "zz_text.jpg").write_text("not an image")
    out = tmp_path / "s.zarr"
    with pytest.raises(BadImageError, match="zz_empty.jpg"):
        extract(cfg(small, out))
    assert not out.exists()
    lock = tmp_path / "s.zarr.fdcache-lock"
    assert not lock.exists()  # issue 22, item 18: a failed extract leaves no lock file beside the store
    r = extract(cfg(small, out, skip_bad=True))
    assert not lock.exists()  # nor does a finished one
    assert r.skipped == ["class_000/zz_empty.jpg", "class_001/zz_text.jpg"]
    store = Store.open(str(out))
    assert store.skipped(0).sum() == 2 and store.done().all()
    assert extract(cfg(small, out, skip_bad=True)).shards == 0  # the same command: nothing to redo


def test_index_reports_what_it_did_not_take_and_refuses_empty_classes(small):
    for name in ("anim.gif", "photo.heic", "README", ".hidden.jpg"):
        (small / "class_000" / name).write_bytes(b"x")
    (small / "class_001" / ".thumbs").mkdir()
    m = index(small)
    assert len(m) == 6
    assert sorted(m.ignored) == ["class_000/.hidden.jpg: hidden", "class_000/README: not an image extension",
                                 "class_000/anim.gif: not an image extension",
                                 "class_000/photo.heic: not an image extension", "class_001/.thumbs/: hidden"]
    (small / "class_002").mkdir()
    with pytest.raises(DataError, match="class_002"):
        index(small)


def test_bad_input_is_a_named_error_or_a_reported_skip(small, tmp_path):
    bomb = small / "class_000" / "zz_bomb.png"
    Image.new("L", (1, 1)).save(bomb)
    raw = bytearray(bomb.read_bytes())
    raw[16:24] = (30000).to_bytes(4, "big") * 2  # IHDR width and height, then the chunk's CRC
    raw[29:33] = zlib.crc32(bytes(raw[12:29])).to_bytes(4, "big")
    bomb.write_bytes(bytes(raw))
    with pytest.raises(BadImageError, match="FDCACHE_MAX_IMAGE_PIXELS"):
        index(small)
    assert index(small, skip_bad=True).bad.sum() == 1
    bomb.unlink()
    odd = os.fsencode(small / "class_001") + b"/caf\xe9.jpg"  # Latin-1, not UTF-8
    shutil.copyfile(next((small / "class_001").iterdir()), odd)
    with pytest.raises(BadImageError, match="UTF-8"):
        index(small)
    m = index(small, skip_bad=True)
    assert len(m) == 6 and any("UTF-8" in x for x in m.ignored)
    os.unlink(odd)
    (small / "class_001" / "zz_loop.jpg").symlink_to("zz_loop.jpg")
    with pytest.raises(BadImageError, match="zz_loop.jpg"):
        index(small)
    assert index(small, skip_bad=True).bad.sum() == 1


@pytest.mark.parametrize("field,value", [("batch_size", 0), ("shard_size", 0), ("seeds", 0), ("resolution", 0)])
def test_extract_options_out_of_range_are_named(tmp_path, field, value):
    with pytest.raises(ConfigError, match=f"--{field.replace('_', '-')}"):
        cfg(tmp_path, tmp_path / "o", **{field: value})


@pytest.mark.parametrize("field", ["batch_size", "accum_steps", "save_every"])
def test_train_and_finetune_options_out_of_range_are_named(tmp_path, field):
    from fdcache.tune.finetune import make_config

    with pytest.raises(ConfigError, match=f"--{field.replace('_', '-')}"):
        TrainConfig(out=str(tmp_path), online=True, **{field: 0})
    with pytest.raises(ConfigError, match=f"--{field.replace('_', '-')}"):
        make_config(None, out=str(tmp_path), data=str(tmp_path), **{field: 0})


def test_teacher_and_student_resolution_and_pretrained_file_are_named_errors(tmp_path):
    from fdcache.distill.students import build_student

    with pytest.raises(TeacherError, match="--resolution 7"):
        load_teacher(TINY_TEACHER, random_init=True, resolution=7)
    with pytest.raises(ConfigError, match="--resolution 7"):
        build_student("fd-tiny", 64, resolution=7)
    bad = tmp_path / "weights.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(TeacherError, match="not a checkpoint"):
        load_teacher(TINY_TEACHER, str(bad))


def test_cli_exits_2_with_a_message_not_a_traceback(small_root, tmp_path):
    from fdcache.cli.app import app

    runner = CliRunner()
    r = runner.invoke(app, ["extract", str(small_root), "--out", str(tmp_path / "o"), "--teacher", TINY_TEACHER,
                            "--random-init", "--batch-size", "0"])
    assert r.exit_code == 2 and "out of range (--batch-size)" in r.output and "Traceback" not in r.output
    bad = tmp_path / "broken.zarr"
    bad.mkdir()
    (bad / "zarr.json").write_text('{"zarr_format": 3, "node_ty')
    r = runner.invoke(app, ["verify", str(bad)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    r = runner.invoke(app, ["extract", str(small_root), "--out", str(bad), "--teacher", TINY_TEACHER,
                            "--random-init", "--overwrite"])
    assert r.exit_code == 2 and "cannot prove" in r.output and (bad / "zarr.json").exists()


@pytest.mark.parametrize("keep_empty", [False, True], ids=["chunk dropped", "zeros written"])
def test_a_sample_zeroed_by_another_zarr_client_is_found_repaired_and_recomputed(small_root, small_store, tmp_path,
                                                                                  keep_empty):
    """Issue 22, item 2: ``group["targets"][0, 5] = 0`` through zarr's own API. With zarr's
    defaults the sample's chunk is dropped from its shard (the shard file, index and checksums
    stay valid); with ``write_empty_chunks=True`` a zero target is stored. Either way verify
    names the sample, --repair un-marks its shard, and the same extract restores the store."""
    store = tmp_path / "s.zarr"
    shutil.copytree(small_store, store)
    targets = zarr.open_group(str(store), mode="r+")["targets"]
    (targets.with_config({"write_empty_chunks": True}) if keep_empty else targets)[0, 5] = 0
    assert tree_bytes(store) != tree_bytes(small_store)
    with pytest.raises(VerifyError) as e:
        verify_store(str(store), check_files=False)
    assert len(e.value.problems) == 1 and "sample 5" in e.value.problems[0], e.value.problems
    assert ("everywhere" in e.value.problems[0]) == keep_empty  # a zero target, or no chunk at all
    with pytest.raises(VerifyError, match="un-marked 1 shard"):
        verify_store(str(store), check_files=False, repair=True)
    extract(cfg(small_root, store))
    assert tree_bytes(store) == tree_bytes(small_store)
    verify_store(str(store))


def test_a_skipped_sample_of_zeros_is_not_a_finding(small, tmp_path):
    """The constant-target check spares samples marked skipped (their zeros are the record)."""
    (small / "class_000" / "zz_empty.jpg").write_bytes(b"")
    out = tmp_path / "s.zarr"
    extract(cfg(small, out, skip_bad=True))
    assert Store.open(str(out)).skipped(0).sum() == 1
    verify_store(str(out), check_files=False)


def test_views_from_creation_and_growth_cut_at_every_write_are_finished_by_the_same_command(
        small_root, tmp_path, tiny_teacher, monkeypatch):
    """`extract DATA --out B --views-from A` (another codec and shard size, A's views copied):
    cut at every write of B's creation, then of its growth from 1 to 2 seeds, the same command
    finishes B as an uninterrupted run does, byte for byte."""
    a = tmp_path / "a.zarr"
    open_or_create(cfg(small_root, a, seeds=2, global_seed=4), tiny_teacher, index(small_root, checksums=True))

    def command(out, seeds, at=None):
        c = cfg(small_root, out, seeds=seeds, codec="int8", shard_size=3, views_from=str(a))
        source, manifest = views_source(c)
        with monkeypatch.context() as m:
            f = Faults(m, at)
            try:
                open_or_create(c, tiny_teacher, manifest, views_from=source)
            except (StoreError, OSError):
                return None
        return f.n

    refs = {}
    for seeds in (1, 2):
        n = command(tmp_path / "ref.zarr", seeds)
        refs[seeds] = (n, tree_bytes(tmp_path / "ref.zarr"))
    assert Store.open(str(tmp_path / "ref.zarr")).view_set() == Store.open(str(a)).view_set()
    for seeds, (n, ref) in refs.items():
        for k in range(n):
            out = tmp_path / f"cut{seeds}-{k}.zarr"
            if seeds == 2:
                command(out, 1)
            assert command(out, seeds, at=k) is None, k
            if seeds == 2:
                assert Store.open(str(out)).num_seeds in (1, 2)  # never half-grown
            command(out, seeds)  # the same command again
            assert tree_bytes(out) == ref, f"{seeds} seed(s), cut at write {k}"
            shutil.rmtree(out)


def test_views_audit_checks_every_block_of_every_seed(tmp_path):
    """A store past 65,536 images has several views blocks per seed (too big to build here):
    _audit_views on a views array of 3 blocks of 4 samples, 2 seeds, names exactly the blocks
    whose chunk is missing or unreadable, by seed and block."""
    import os

    from fdcache.store.audit import Problem, _audit_views
    from fdcache.store.layout import chunk_key

    arr = zarr.create_array(str(tmp_path / "s.zarr"), name="views", shape=(2, 10, 5), chunks=(1, 4, 5),
                            dtype="<i4", fill_value=-1)
    arr[:] = 1
    root = tmp_path / "s.zarr"
    have = {str(p.relative_to(root)).replace(os.sep, "/") for p in root.rglob("*") if p.is_file()}
    assert {chunk_key("views", (s, j, 0)) for s in range(2) for j in range(3)} <= have
    (root / "views" / "c" / "1" / "2" / "0").write_bytes(b"not a chunk")
    problems: list[Problem] = []
    _audit_views(arr, 2, have - {chunk_key("views", (0, 1, 0))}, problems)
    assert [p.text.split(" (", 2)[:2] for p in problems] == [["views of seed 0", "chunk 1): missing"],
                                                            ["views of seed 1", "chunk 2): unreadable"]]
    assert [p.repair for p in problems] == [("views", 0), ("views", 1)]


def test_a_corrupt_skip_flags_chunk_is_named_by_seed_shard_and_samples_and_repaired(small_root, small_store, tmp_path):
    """A byte flipped in seed 0's skip flags of shard 1 (zarr checks their crc32c): verify names
    that array, seed, shard and its samples by hand count, offers to un-mark it, and the same
    extract then recomputes the shard to the store it was."""
    store = tmp_path / "s.zarr"
    shutil.copytree(small_store, store)
    info = Store.open(str(store)).info
    size, end = info.shard_size, min(2 * info.shard_size, info.num_samples)  # the last shard may be short
    _damage(store / "skipped" / "c" / "0" / "1", "flip")
    with pytest.raises(VerifyError) as e:
        verify_store(str(store), check_files=False)
    (problem,) = e.value.problems
    assert problem.startswith(f"skipped seed 0 shard 1 (samples {size}..{end - 1}): unreadable ("), problem
    with pytest.raises(VerifyError, match="repair: "):
        verify_store(str(store), check_files=False, repair=True)
    assert not Store.open(str(store)).done()[0, 1]
    extract(cfg(small_root, store))
    assert tree_bytes(store) == tree_bytes(small_store)
