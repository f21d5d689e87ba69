"""The store's reader: exact against zarr-python, lost data an error, any Zarr v3 client reads
every array, a plain DataLoader over the store."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import synthetic_store

from fdcache.codecs import CodecSpec
from fdcache.errors import StoreDataError, StoreError
from fdcache.store import Store

CODECS = [CodecSpec(name, comp) for name in ("fp16", "int8") for comp in ("zstd", "none")] + [CodecSpec("int4-dither")]


@pytest.fixture(scope="module", params=CODECS, ids=lambda c: f"{c.name}+{c.compressor}")
def made(request, tmp_path_factory):
    """10 samples in shards of 4 (the last one short), 2 seeds, sample 5 of each seed skipped."""
    return synthetic_store(tmp_path_factory.mktemp("r") / "s.zarr", request.param, skipped=(5,))


def _zarr_rows(store: Store, seed: int, idx) -> dict[str, np.ndarray]:
    g = zarr.open_group(store.url, mode="r")
    return {a.name: np.stack([g[a.name][seed, int(i)] for i in idx]) for a in store.array_specs()}


@pytest.mark.parametrize("threads", [1, 3])
def test_batch_reads_equal_zarr_python_in_any_order_with_repeats(made, threads):
    store, _ = made
    idx = [9, 0, 3, 3, 8, 1, 4, 7, 6, 2, 9]  # every shard, the short last one, a repeat
    got = store.reader(threads=threads).read(1, idx)
    want = _zarr_rows(store, 1, idx)
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name]), name


def test_decoded_reads_match_what_went_in_within_the_codecs_bound(made):
    store, truth = made
    got = store.read(0, 0, 10)
    keep = np.ones(10, bool)
    keep[5] = False
    from fdcache.codecs import whitened_error
    assert whitened_error(truth[0][keep], got[keep])["rel_l2"] <= store.info.codec.codec.error_bound
    assert not got[5].any()  # a skipped sample reads as the zeros extract recorded


def test_a_skipped_sample_reads_as_zeros_into_a_reused_buffer(made):
    """DALI hands the reader the same buffers batch after batch: a skipped sample must be
    written as zeros, not left holding the previous batch's bytes (the buffer is filled
    with a sentinel first, so nothing depends on what fresh memory happens to hold)."""
    store, _ = made
    reader = store.reader()
    out = reader.empty(4)
    for a in out.values():
        a.view(np.uint8).fill(0x7F)
    got = reader.read(0, [4, 5, 6, 7], out=out)
    want = _zarr_rows(store, 0, [4, 5, 6, 7])
    for name in want:
        assert got[name] is out[name] and not got[name][1].any(), name
        assert np.array_equal(got[name], want[name]), name


def _shard_file(store: Store, name: str, seed: int, k: int) -> Path:
    return Path(store.url, name, "c", str(seed), str(k), "0", "0")


@pytest.fixture
def fp16_copy(tmp_path):
    return synthetic_store(tmp_path / "s.zarr", CodecSpec("fp16", "none"))[0]


def test_a_missing_shard_of_a_done_shard_is_an_error_naming_seed_shard_samples_and_fix(fp16_copy):
    _shard_file(fp16_copy, "targets", 1, 2).unlink()
    reader = fp16_copy.reader()
    assert reader.read(1, [0, 7])["targets"].shape == (2, 5, 32)  # other shards still read
    with pytest.raises(StoreDataError, match=r"seed 1, shard 2 \(samples 8\.\.9\).*missing.*"
                                             r"fdcache verify .* --repair.*fdcache extract") as e:
        reader.read(1, [0, 9])
    assert (e.value.seed, e.value.shard, e.value.samples) == (1, 2, (8, 10))


def test_a_flipped_byte_in_a_sample_fails_its_checksum(fp16_copy):
    f = _shard_file(fp16_copy, "targets", 0, 1)
    data = bytearray(f.read_bytes())
    data[3 * (5 * 32 * 2 + 4) + 10] ^= 0x40  # inside sample 7 (4th chunk of shard 1)
    f.write_bytes(bytes(data))
    reader = fp16_copy.reader()
    reader.read(0, [4, 5, 6])
    with pytest.raises(StoreDataError, match=r"sample 7 fails its crc32c checksum.*--repair"):
        reader.read(0, [7])


def _chunk_span(shard: Path, shard_size: int, j: int) -> tuple[int, int]:
    """(offset, nbytes) of inner chunk ``j`` from the shard's index (Zarr v3 sharding: the
    file ends with ``(offset, nbytes)`` uint64 pairs per chunk and their crc32c)."""
    raw = shard.read_bytes()
    index = np.frombuffer(raw[-(shard_size * 16 + 4):-4], "<u8").reshape(shard_size, 2)
    return int(index[j, 0]), int(index[j, 1])


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_a_flipped_byte_anywhere_in_a_zstd_chunk_fails_its_checksum(tmp_path, codec):
    """Every stored byte of a compressed sample (zstd frame and crc32c) is covered by the
    checksum: a flip is a StoreDataError naming the sample, whether or not zstd would still
    decode the damaged frame."""
    store, _ = synthetic_store(tmp_path / "s.zarr", CodecSpec(codec, "zstd"))
    f = _shard_file(store, "targets", 0, 1)
    clean = f.read_bytes()
    off, n = _chunk_span(f, 4, 3)  # sample 7
    for pos in range(off, off + n):
        data = bytearray(clean)
        data[pos] ^= 0x10
        f.write_bytes(bytes(data))
        reader = store.reader()
        reader.read(0, [4, 5, 6])  # its neighbours still read
        with pytest.raises(StoreDataError, match=r"sample 7 fails its crc32c checksum.*--repair"):
            reader.read(0, [7])
        reader.close()


def test_a_damaged_shard_index_is_an_error(fp16_copy):
    f = _shard_file(fp16_copy, "targets", 0, 0)
    data = bytearray(f.read_bytes())
    data[-10] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(StoreDataError, match="shard index fails its crc32c"):
        fp16_copy.reader().read(0, [1])


def test_a_sample_without_data_in_a_done_shard_is_an_error_not_a_fill_value(fp16_copy):
    # zarr drops an all-fill-value chunk from its shard: the index then marks it absent.
    zarr.open_group(fp16_copy.url, mode="r+")["targets"][0, 6] = 0
    with pytest.raises(StoreDataError, match="sample 6 has no data") as e:
        fp16_copy.reader().read(0, [6])
    size, n = fp16_copy.info.shard_size, fp16_copy.info.num_samples  # the shard holding sample 6, by hand
    k, a = 6 // size, 6 // size * size
    assert (e.value.shard, e.value.samples) == (k, (a, min(a + size, n))) and size < 6 < n
    assert f"targets of seed 0, shard {k} (samples {a}..{min(a + size, n) - 1})" in str(e.value)


def test_reading_a_shard_not_yet_extracted_says_so(tmp_path):
    store, _ = synthetic_store(tmp_path / "s.zarr", done=False)
    with pytest.raises(StoreError, match="seed 0 shard 0 .*not extracted yet"):
        store.reader().read(0, [1])


def test_a_store_of_the_old_format_is_refused_with_the_reason(fp16_copy):
    g = zarr.open_group(fp16_copy.url, mode="r+")
    g.attrs["fdcache"] = g.attrs["fdcache"] | {"format_version": 1}
    with pytest.raises(StoreError, match="format 1.*variable-length string.*tensorstore.*Re-extract"):
        Store.open(fp16_copy.url)


def test_plain_zarr_and_tensorstore_read_every_array_identically(made):
    """Any Zarr v3 client reads the store without fdcache: the README's snippets, run."""
    ts = pytest.importorskip("tensorstore")
    store, _ = made
    root = Path(store.url)
    arrays = sorted(p.parent.relative_to(root).as_posix() for p in root.rglob("zarr.json")
                    if json.loads(p.read_text())["node_type"] == "array")
    assert "manifest/paths_utf8" in arrays and "targets" in arrays
    g = zarr.open_group(str(root), mode="r")
    for name in arrays:
        t = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(root / name)}}).result()
        assert np.array_equal(t.read().result(), g[name][...]), name
    # README: paths from the portable manifest, with either library.
    blob, off = g["manifest/paths_utf8"][:].tobytes(), g["manifest/path_offsets"][:]
    assert [blob[a:b].decode() for a, b in zip(off[:-1], off[1:])] == store.manifest().paths


def test_readme_snippets_run(made):
    """The 'Reading a store' snippets in the README, executed against a store."""
    pytest.importorskip("tensorstore")
    store, _ = made
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Reading a store", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]
    assert len(blocks) >= 3
    for code in blocks:
        ns = {"STORE": store.url}
        exec(compile(code.replace('"teacher.zarr"', "STORE"), "README.md", "exec"), ns)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_plain_dataloader_over_the_store_gives_each_samples_target(made, workers):
    from fdcache.store.dataset import StoreDataset

    store, _ = made
    ds = StoreDataset(store.url, seed=1)
    assert len(ds) == 9 and 5 not in ds.indices.tolist()  # the skipped sample is left out
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0))
    seen = []
    for b in loader:
        want = store.info.codec.decode(_zarr_rows(store, 1, b["index"]))
        assert torch.equal(b["target"], want)
        assert torch.equal(b["label"], torch.as_tensor(store.manifest().labels[b["index"].numpy()]).long())
        assert torch.equal(b["view"], torch.from_numpy(store.views(1)[b["index"].numpy()]))
        seen += b["index"].tolist()
    assert sorted(seen) == ds.indices.tolist()


def test_a_dithered_int4_store_is_reproducible_and_trains(image_root, tmp_path):
    """The dither is keyed by (seed, sample, token): two extractions give the same bytes."""
    from conftest import tree_bytes

    from fdcache.distill.extract import ExtractConfig, extract
    from fdcache.distill.train import DistillTask, TrainConfig
    from fdcache.models import TINY_TEACHER

    def run(out, batch):
        extract(ExtractConfig(data=str(image_root), out=str(out), teacher=TINY_TEACHER, random_init=True, seeds=1,
                              batch_size=batch, shard_size=4, progress=False, num_threads=1,
                              codec=CodecSpec("int4-dither")))

    run(tmp_path / "a.zarr", 4)
    run(tmp_path / "b.zarr", 2)  # other batches: each row's dither must not depend on them
    a, b = tree_bytes(tmp_path / "a.zarr"), tree_bytes(tmp_path / "b.zarr")
    assert {k: v for k, v in a.items() if "/c/" in k} == {k: v for k, v in b.items() if "/c/" in k}
    t = DistillTask(TrainConfig(out=str(tmp_path / "run"), cache=str(tmp_path / "a.zarr"), student="fd-tiny", steps=1,
                            batch_size=4, warmup_steps=0, progress=False, num_threads=1, loss_impl="torch"))
    batch = next(t.stream())
    targets, qparams = t.targets_of(batch, batch.images)
    assert targets.dtype == torch.float32 and qparams is None  # decoded for the loss
    assert torch.isfinite(t.engine.forward_backward(batch))


def test_zstd_compresses_the_codecs_arrays_only(tmp_path):
    """--compressor zstd is the codec's (targets and qparams here); the flags, views and
    manifest columns stay uncompressed under their crc32c."""
    store, _ = synthetic_store(tmp_path / "z.zarr", CodecSpec("int8", "zstd"))
    codec_arrays = {a.name for a in CodecSpec("int8").arrays(5, 32)}
    metas = {p.parent.relative_to(store.url).as_posix(): p.read_text()
             for p in Path(store.url).rglob("zarr.json") if json.loads(p.read_text())["node_type"] == "array"}
    assert codec_arrays < metas.keys() and len(metas) > len(codec_arrays) + 2
    for name, meta in metas.items():
        assert ('"zstd"' in meta) == (name in codec_arrays), name
        assert '"crc32c"' in meta, name


def test_chunk_payloads_are_each_samples_stored_bytes_without_the_checksum(made):
    """What a decoder alone is given (benchmarks): per array, per sample of the shard in order,
    the chunk's bytes; zstd-decompressed, zarr-python's row of that array."""
    from numcodecs import Zstd

    store, _ = made
    reader = store.reader()
    got = reader.chunk_payloads(1, 1)  # samples 4..7
    names = [a.name for a in store.array_specs()]
    assert [lay.name for lay, _ in got] == [n for n in names for _ in range(4)]
    want = _zarr_rows(store, 1, [4, 5, 6, 7])
    for j, (lay, payload) in enumerate(got):
        raw = Zstd().decode(payload) if lay.zstd else payload
        assert raw == want[lay.name][j % 4].tobytes(), (lay.name, j)


def test_a_dataset_without_decoding_never_decodes_on_the_host(made, monkeypatch):
    """decode=False gives the stored arrays as they are, for a loop that decodes on its device:
    the host's decode is not run at all (it is the cost the option exists to avoid)."""
    from fdcache.store.dataset import StoreDataset

    store, _ = made
    ds = StoreDataset(store.url, seed=1, decode=False)
    calls = []
    real = type(ds.codec).decode
    monkeypatch.setattr(type(ds.codec), "decode", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    items = ds.__getitems__([0, 2])
    assert calls == []
    want = _zarr_rows(store, 1, ds.indices[[0, 2]])
    for r, item in enumerate(items):
        assert set(item["target"]) == set(want)
        assert all(np.array_equal(item["target"][k].numpy(), want[k][r]) for k in want)


@pytest.mark.parametrize("codec", [CodecSpec("fp16"), CodecSpec("fp16", "zstd")], ids=["none", "zstd"])
def test_a_shard_file_cut_short_under_an_open_reader_names_the_sample(tmp_path, codec):
    """The reader keeps each shard's index and descriptor open; a file another process cut short
    afterwards makes the next read of a sample past the cut short: a StoreDataError naming the
    array, seed, shard (by hand count) and sample, not a fill value or a bare OSError."""
    import os

    store, _ = synthetic_store(tmp_path / "s.zarr", codec, samples=10, shard_size=4, seeds=1)
    reader = store.reader(threads=1)
    reader.read(0, [4])  # shard 1 (samples 4..7): index and descriptor now cached
    path = tmp_path / "s.zarr" / "targets" / "c" / "0" / "1" / "0" / "0"
    os.truncate(path, path.stat().st_size // 3)
    with pytest.raises(StoreDataError, match=r"^targets of seed 0, shard 1 \(samples 4..7\) in .*: sample 7 is "
                                             r"cut short\. The shard is marked done") as e:
        reader.read(0, [7])
    assert (e.value.seed, e.value.shard, e.value.samples) == (0, 1, (4, 8))
