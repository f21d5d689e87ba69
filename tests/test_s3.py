"""A store in an S3-compatible bucket (moto's server on 127.0.0.1): extract writes it, the
reader and the trainer read it, with the same URL users give (``s3://bucket/key``)."""

import numpy as np
import pytest
import torch

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from fdcache.codecs import CodecSpec  # noqa: E402
from fdcache.distill.extract import ExtractConfig, extract  # noqa: E402
from fdcache.distill.train import DistillTask, TrainConfig  # noqa: E402
from fdcache.errors import StoreDataError  # noqa: E402
from fdcache.models import TINY_TEACHER  # noqa: E402
from fdcache.store import Store  # noqa: E402


@pytest.fixture(scope="module")
def bucket():
    """A local S3 endpoint; credentials and endpoint by the standard AWS variables.

    fsspec caches filesystem instances by their arguments, and an S3FileSystem reads the
    endpoint when it is made: without clearing the cache, a second setup of this fixture in
    one session (tests run by node id in another order, as mutmut runs them) would reach the
    first, stopped server."""
    from s3fs import S3FileSystem

    S3FileSystem.clear_instance_cache()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    mp = pytest.MonkeyPatch()
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
        mp.setenv(k, v)
    import boto3
    boto3.client("s3").create_bucket(Bucket="fdcache-test")
    yield "s3://fdcache-test"
    mp.undo()
    server.stop()
    S3FileSystem.clear_instance_cache()


def _extract(data, out, **kw):
    base = dict(teacher=TINY_TEACHER, random_init=True, seeds=1, batch_size=4, shard_size=4, progress=False,
                num_threads=1)
    return extract(ExtractConfig(data=str(data), out=str(out), **(base | kw)))


def test_reader_and_trainer_work_on_a_store_in_a_bucket(bucket, image_root, tmp_path):
    url, local = f"{bucket}/int8.zarr", tmp_path / "int8.zarr"
    _extract(image_root, url, codec=CodecSpec("int8"))
    _extract(image_root, local, codec=CodecSpec("int8"))
    idx = [17, 0, 5, 9, 9]
    remote = Store.open(url).reader().read(0, idx)
    want = Store.open(str(local)).reader().read(0, idx)
    for name in want:
        assert np.array_equal(remote[name], want[name]), name
    t = DistillTask(TrainConfig(out=str(tmp_path / "run"), cache=url, student="fd-tiny", steps=1, batch_size=4,
                            warmup_steps=0, progress=False, num_threads=1, loss_impl="torch"))
    assert torch.isfinite(t.engine.forward_backward(next(t.stream())))


def test_a_lost_object_in_a_bucket_is_an_error_naming_the_shard(bucket, image_root):
    import s3fs

    url = f"{bucket}/lost.zarr"
    _extract(image_root, url)
    s3fs.S3FileSystem().rm(f"{url[5:]}/targets/c/0/1/0/0")
    with pytest.raises(StoreDataError, match=r"seed 0, shard 1 \(samples 4\.\.7\).*missing"):
        Store.open(url).reader().read(0, [2, 6])


def test_extract_looks_at_a_bucket_store_with_one_listing(bucket, image_root, monkeypatch):
    """The location is classified once: one listing of the store, on creation and on a re-run
    (which finds its shards from that same listing). s3fs's own per-write checks of single
    keys are not listings of the store."""
    import s3fs

    url = f"{bucket}/once.zarr"
    root = url.split("/", 3)[3]
    listings = []
    real = s3fs.S3FileSystem._call_s3

    async def spy(self, method, *a, **kw):
        prefix = kw.get("Prefix", "")
        if method == "list_objects_v2" and prefix.rstrip("/") == root:
            listings.append(prefix)
        return await real(self, method, *a, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", spy)
    for run in ("create", "resume"):
        listings.clear()
        _extract(image_root, url)
        assert len(listings) == 1, (run, listings)


def test_a_sample_without_data_in_a_bucket_store_is_an_error_naming_seed_shard_and_sample(bucket, image_root):
    """The object-store read path plans its range requests as the local one does: a sample whose
    chunk zarr dropped (all fill value: the shard index marks it absent) is a StoreDataError
    naming seed 1, shard 1 (samples 4..7, by hand count) and the sample, not a fill value."""
    import zarr

    url = f"{bucket}/lost.zarr"
    _extract(image_root, url, seeds=2)
    zarr.open_group(url, mode="r+")["targets"][1, 6] = 0
    with pytest.raises(StoreDataError, match=r"^targets of seed 1, shard 1 \(samples 4\.\.7\) in .*: sample 6 has no "
                                             r"data in its shard") as e:
        Store.open(url).reader().read(1, [0, 6])
    assert (e.value.seed, e.value.shard, e.value.samples) == (1, 1, (4, 8))

def test_a_flipped_byte_in_a_bucket_is_an_error_naming_the_sample(bucket, image_root):
    """The object-store read path checks each sample's crc32c as the local one does: one byte
    flipped inside sample 4's chunk (the first of shard 1, so the file's first bytes) is a
    StoreDataError naming seed, shard (by hand count: 4 // 4 = 1, samples 4..7) and sample."""
    import s3fs

    url = f"{bucket}/flipped.zarr"
    _extract(image_root, url)
    fs, key = s3fs.S3FileSystem(), f"{url[5:]}/targets/c/0/1/0/0"
    raw = bytearray(fs.cat_file(key))
    raw[10] ^= 0x01
    fs.pipe_file(key, bytes(raw))
    with pytest.raises(StoreDataError, match=r"targets of seed 0, shard 1 \(samples 4\.\.7\) in .*: sample 4 fails "
                                             r"its crc32c checksum") as e:
        Store.open(url).reader().read(0, [0, 4])
    assert (e.value.seed, e.value.shard) == (0, 1)
