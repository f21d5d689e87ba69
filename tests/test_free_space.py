"""The free-space check before ``fdcache extract`` writes (issue 21): the projection is the
format's hand count, checked against real stores file by file; a disk too small refuses
before a byte is written, naming both numbers."""

import shutil
from collections import Counter
from pathlib import Path

import pytest
from conftest import extract_tiny, tree_bytes
from fdcache.cli.app import app
from typer.testing import CliRunner

from fdcache.errors import DiskSpaceError
from fdcache.models import TINY_TEACHER
from fdcache.store import Store
from fdcache.store.layout import METADATA_BYTES, on_disk, projected_files, view_bytes
from fdcache.store.location import Location
from fdcache.store.space import check_free_space
from fdcache.store.store import manifest_columns


def _sizes(root: Path) -> tuple[Counter, int]:
    """{size: count} of the store's data files, and how many zarr.json it has."""
    files = [p for p in Path(root).rglob("*") if p.is_file()]
    return Counter(p.stat().st_size for p in files if p.name != "zarr.json"), sum(p.name == "zarr.json" for p in files)


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_the_projection_is_every_file_the_store_holds_byte_for_byte(image_root, tmp_path, codec):
    # shards of 8 over 18 images: the last shard is short (its index keeps all 8 slots)
    out = extract_tiny(image_root, tmp_path / "s.zarr", seeds=2, shard_size=8, codec=codec)
    store = Store.open(str(out))
    todo = [(s, k) for s in range(2) for k in range(store.num_shards)]
    files = projected_files(store.info, todo, 2, manifest_columns(store.manifest()))
    data, metadata = _sizes(out)
    assert files.pop(METADATA_BYTES) == metadata  # a bound per zarr.json, one per node
    assert max(p.stat().st_size for p in out.rglob("zarr.json")) <= METADATA_BYTES
    assert Counter(files) == data
    # and on disk, as du counts it (its folders too): every file and folder one or more 4 KiB blocks
    allocated = sum(p.stat().st_blocks * 512 for p in [out, *out.rglob("*")])
    assert on_disk(projected_files(store.info, todo, 2, manifest_columns(store.manifest()), directories=True),
                   4096) == allocated
    # a view: the data, its crc32c and its index entry, per array (int8: targets + qparams)
    per_view = {"fp16": 17 * 64 * 2 + 20, "int8": (17 * 64 + 20) + (17 * 2 * 4 + 20)}[codec]
    assert view_bytes(store.info) == per_view


def _fake_disk(monkeypatch, free: int):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=free))


def test_a_disk_too_small_refuses_before_anything_is_written(image_root, tmp_path, monkeypatch):
    _fake_disk(monkeypatch, 50_000)
    out = tmp_path / "s.zarr"
    with pytest.raises(DiskSpaceError) as e:
        extract_tiny(image_root, out, seeds=2)
    assert list(tmp_path.iterdir()) == []  # no store, no lock file left behind
    # both numbers, by hand: 6 shard files of 6 views x (2176 + 20) + 4, rounded to 4 KiB blocks,
    # every small file (flags, markers, views, manifest columns, 14 zarr.json) one block each, and
    # 48 folders of a block each (targets 2 per shard + 2 seeds + 2, skipped and done 4 each,
    # views 6, manifest 1 + 2 per column, the root)
    block = Location.resolve(out).free_space()[1]
    assert block == 4096  # the hand count below assumes the usual ext4/xfs block
    need = 6 * 16384 + (6 + 6 + 2 + 8 + 14) * 4096 + 48 * 4096
    msg = str(e.value)
    assert f"{need:,} bytes" in msg and "50,000 bytes" in msg and "36 sample-view(s) of 2,196 bytes" in msg
    assert "--out" in msg and "Nothing was written" in msg and "--codec int8 or int4" in msg


def test_growing_a_store_checks_only_the_seeds_still_to_write(image_root, tmp_path, monkeypatch):
    out = extract_tiny(image_root, tmp_path / "s.zarr", seeds=1)
    before = tree_bytes(out)
    # seed 1: 3 shard files, 3 flags, 3 markers, its views; 11 folders (targets 2 per shard and its
    # seed's, the seed's of skipped and done, views 2)
    need = 3 * 16384 + (3 + 3 + 1) * 4096 + 11 * 4096
    _fake_disk(monkeypatch, need - 1)
    with pytest.raises(DiskSpaceError, match=f"{need:,} bytes"):
        extract_tiny(image_root, out, seeds=2)
    assert tree_bytes(out) == before  # not grown, nothing un-marked
    _fake_disk(monkeypatch, need)
    extract_tiny(image_root, out, seeds=2)
    assert Store.open(str(out)).done().all()


def test_the_cli_exits_2_naming_both_numbers(image_root, tmp_path, monkeypatch):
    _fake_disk(monkeypatch, 1000)
    r = CliRunner().invoke(app, ["extract", str(image_root), "--out", str(tmp_path / "s.zarr"), "--teacher",
                                 TINY_TEACHER, "--random-init", "--batch-size", "6", "--shard-size", "6"])
    assert r.exit_code == 2, r.output
    assert "not enough free disk space" in r.output and "1,000 bytes" in r.output
    assert not (tmp_path / "s.zarr").exists()


def test_a_fresh_extract_says_what_it_checked(image_root, tmp_path):
    lines = []
    from fdcache.distill.extract import ExtractConfig, extract

    extract(ExtractConfig(data=str(image_root), out=str(tmp_path / "s.zarr"), teacher=TINY_TEACHER,
                          random_init=True, batch_size=6, shard_size=6, progress=False, num_threads=2),
            announce=lines.append)
    assert len(lines) == 1 and lines[0].startswith("free space: this extraction writes")


def test_a_remote_store_is_not_checked_and_says_so():
    loc = Location.resolve("s3://bucket/x.zarr")
    assert loc.free_space() is None
    line = check_free_space(loc, {1000: 3}, 3, 1000)
    assert "not checked" in line and "s3://bucket/x.zarr is remote" in line and "3 kB" in line


def test_used_bytes_is_the_blocks_of_a_local_stores_files_and_zero_where_none_are_counted(tmp_path):
    """Location.used_bytes: the allocated blocks (st_blocks x 512) of every file under a local
    store, a hand count; 0 for a folder that does not exist and for a remote store."""
    import os

    from fdcache.store.location import Location

    root = tmp_path / "s.zarr"
    (root / "a" / "b").mkdir(parents=True)
    (root / "zarr.json").write_text("{}")
    (root / "a" / "b" / "0").write_bytes(os.urandom(10_000))
    (root / "a" / "empty").write_bytes(b"")
    by_hand = sum(os.lstat(p).st_blocks * 512 for p in (root / "zarr.json", root / "a" / "b" / "0"))
    assert Location.resolve(str(root)).used_bytes() == by_hand >= 10_000
    assert Location.resolve(str(tmp_path / "absent.zarr")).used_bytes() == 0
    assert Location.resolve("s3://bucket/absent.zarr").used_bytes() == 0
