"""The store's write protocol and binding, pinned: what a shard write does in which order,
what a failed write leaves, how ranks split the shards, what binds a store to its dataset.
Writes are observed (and failed) at zarr's LocalStore, below every fdcache module."""

import errno
import shutil

import numpy as np
import pytest
from conftest import extract_tiny, tree_bytes
from zarr.storage import LocalStore

from fdcache.distill.extract import ExtractConfig, extract, split_shards
from fdcache.errors import FdcacheError, StoreError, StoreMismatchError
from fdcache.models import TINY_TEACHER
from fdcache.store import Store
from fdcache.store.layout import parse_chunk_key
from fdcache.store.manifest import index

_PER_SHARD = ("targets", "qparams", "skipped", "done")


@pytest.fixture
def store_writes(monkeypatch):
    """Every chunk write (``set``) or removal (``delete``: zarr's way to write an all-fill chunk)
    as ``(array, seed, shard)`` in call order; ``fail[prefix]`` makes the first write of a key
    starting with ``prefix`` raise ENOSPC."""
    log, fail = [], {}
    real_set, real_delete = LocalStore.set, LocalStore.delete

    def record(key):
        for prefix in list(fail):
            if key.startswith(prefix):
                del fail[prefix]
                raise OSError(errno.ENOSPC, f"No space left on device (injected at {key})")
        chunk = parse_chunk_key(key)
        if chunk and chunk[0] in _PER_SHARD:
            log.append((chunk[0], *chunk[1][:2]))

    async def set_(self, key, value, *a, **kw):
        record(key)
        return await real_set(self, key, value, *a, **kw)

    async def delete(self, key):
        record(key)
        return await real_delete(self, key)

    monkeypatch.setattr(LocalStore, "set", set_)
    monkeypatch.setattr(LocalStore, "delete", delete)
    return log, fail


def test_a_shard_is_written_data_then_skip_flags_then_its_done_marker(image_root, tmp_path, store_writes):
    log, _ = store_writes
    extract_tiny(image_root, tmp_path / "s.zarr")
    shards = sorted({(s, k) for _, s, k in log})
    assert shards == [(0, k) for k in range(3)]  # 18 images in shards of 6
    for sk in shards:
        order = [name for name, *key in log if tuple(key) == sk]
        assert order == ["targets", "skipped", "done"], (sk, order)


@pytest.mark.parametrize("array", ["targets", "skipped", "done"])
def test_a_failed_write_leaves_its_shard_unmarked_and_the_same_command_completes_it(
        array, image_root, tmp_path, tiny_store, store_writes):
    _, fail = store_writes
    out = tmp_path / "s.zarr"
    fail[f"{array}/c/0/1"] = True  # seed 0, shard 1
    with pytest.raises(StoreError, match="shard 1 of seed 0.*No space left.*re-run the same command"):
        extract_tiny(image_root, out, writers=1)
    done = Store.open(str(out)).done()
    assert done[0, 0] and not done[0, 1]
    extract_tiny(image_root, out)
    assert tree_bytes(out) == tree_bytes(tiny_store)


def test_extraction_ranks_take_disjoint_contiguous_runs_of_the_shards():
    shards = [(s, k) for s in range(2) for k in range(4)]  # 8 (seed, shard) pairs
    assert [split_shards(shards, r, 3) for r in range(3)] == [shards[0:2], shards[2:5], shards[5:8]]
    for n in range(13):
        items = list(range(n))
        for world in range(1, 6):
            parts = [split_shards(items, r, world) for r in range(world)]
            assert sum(parts, []) == items, (n, world)  # every shard once, in order
            assert max(map(len, parts)) - min(map(len, parts)) <= 1, (n, world)


def test_a_relabelled_dataset_has_another_fingerprint_and_its_store_is_refused(image_root, tmp_path):
    paths = index(image_root).paths[:6]
    lists = {}
    for name, labels in (("a", [0, 0, 1, 1, 2, 2]), ("b", [0, 0, 1, 2, 2, 2])):
        lists[name] = tmp_path / f"{name}.txt"
        lists[name].write_text("".join(f"{p} {y}\n" for p, y in zip(paths, labels)))
    a, b = (index(image_root, file_list=lists[n]) for n in "ab")
    assert a.fingerprint() != b.fingerprint()
    assert "label" in a.first_difference(b) and paths[3] in a.first_difference(b)
    out = extract_tiny(image_root, tmp_path / "s.zarr", file_list=str(lists["a"]))
    with pytest.raises(StoreMismatchError, match="dataset"):
        extract_tiny(image_root, out, file_list=str(lists["b"]))


def test_batches_stop_at_shard_ends_so_a_resumed_shard_is_computed_as_before(image_root, tmp_path, store_writes):
    _, fail = store_writes
    ref = tmp_path / "ref.zarr"
    r = extract(ExtractConfig(data=str(image_root), out=str(ref), teacher=TINY_TEACHER, random_init=True,
                              batch_size=4, shard_size=6, progress=False, num_threads=2))
    assert (r.shards, r.samples) == (3, 18)  # shards of 6 in batches of 4 and 2: each image computed once
    out = tmp_path / "s.zarr"
    fail["targets/c/0/1"] = True
    with pytest.raises(StoreError):
        extract_tiny(image_root, out, batch_size=4, writers=1)
    extract_tiny(image_root, out, batch_size=4)
    assert tree_bytes(out) == tree_bytes(ref)


def test_skip_bad_records_a_file_whose_header_cannot_be_read(images, tmp_path):
    (images / "class_001" / "zz_notes.jpg").write_text("not an image")
    out = extract_tiny(images, tmp_path / "s.zarr", skip_bad=True)
    store = Store.open(str(out))
    i = store.manifest().paths.index("class_001/zz_notes.jpg")
    assert store.skipped(0)[i] and store.skipped(0).sum() == 1


def test_a_shard_write_with_the_wrong_number_of_rows_is_refused(tiny_store, tmp_path):
    out = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, out)
    store = Store.open(str(out), mode="r+")
    rows = store.group["targets"][0, 0:8]  # 8 rows for a shard of 6
    before = tree_bytes(out)
    with pytest.raises(FdcacheError, match="8"):
        store.write_shard(0, 0, {"targets": rows}, np.zeros(6, bool))
    assert tree_bytes(out) == before


def test_growing_to_the_seeds_a_store_has_or_fewer_writes_nothing(tmp_path, monkeypatch):
    """grow_seeds(S) with S at or below the store's seeds is no write at all (a re-run of the
    same command on a finished store, or on a read-only copy); S + 1 writes the new seed's
    views and every array's metadata. Observed at zarr's LocalStore."""
    from conftest import synthetic_store

    store, _ = synthetic_store(tmp_path / "s.zarr", seeds=2)
    store = Store.open(store.url, mode="r+")
    keys = []
    real_set, real_delete = LocalStore.set, LocalStore.delete

    async def set_(self, key, value, *a, **kw):
        keys.append(key)
        return await real_set(self, key, value, *a, **kw)

    async def delete(self, key):
        keys.append(key)
        return await real_delete(self, key)

    monkeypatch.setattr(LocalStore, "set", set_)
    monkeypatch.setattr(LocalStore, "delete", delete)
    manifest = store.manifest()
    for seeds in (2, 1, 0):
        store.grow_seeds(manifest, seeds)
    assert keys == [] and store.num_seeds == 2
    store.grow_seeds(manifest, 3)
    assert "views/c/2/0/0" in keys and "done/zarr.json" in keys and Store.open(store.url).num_seeds == 3
