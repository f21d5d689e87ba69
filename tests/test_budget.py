"""``fdcache extract --budget SIZE`` (issue 21): sizes as written, the codec and seeds chosen from
the format's hand count, and a store that fits the budget as measured on disk."""

from pathlib import Path

import pytest
from conftest import extract_tiny
from fdcache.cli.app import app
from typer.testing import CliRunner

from fdcache.distill import budget as budget_mod
from fdcache.distill.extract import ExtractConfig, extract
from fdcache.errors import ConfigError, StoreMismatchError
from fdcache.models import TINY_TEACHER
from fdcache.store import Store
from fdcache.store.layout import on_disk, projected_files
from fdcache.store.space import format_size, parse_size
from fdcache.store.store import manifest_columns


@pytest.mark.parametrize("text, size", [("1.5TB", 1_500_000_000_000), ("800MB", 800_000_000), ("800 mb", 800_000_000),
                                        ("512GiB", 512 * 2**30), ("2.5kib", 2560), ("4096", 4096), ("10B", 10),
                                        (".5GB", 500_000_000), (123, 123)])
def test_sizes_in_decimal_and_binary_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "1.5T", "2G", "1e9", "-3GB", "0", "3 GBs", "1.2.3MB"])
def test_a_size_that_is_not_one_is_a_named_error(text):
    with pytest.raises(ConfigError, match="--budget"):
        parse_size(text)


def test_sizes_print_in_decimal_units():
    assert [format_size(n) for n in (999, 1000, 1_234_567, 1.5e12)] == ["999 B", "1 kB", "1.23 MB", "1.5 TB"]


def _store_bytes_on_disk(root: Path) -> tuple[int, int]:
    """``du --apparent-size -b`` and ``du -B1`` of the store: files and folders."""
    entries = [Path(root), *Path(root).rglob("*")]
    return sum(p.stat().st_size for p in entries), sum(p.stat().st_blocks * 512 for p in entries)


# One shard of 18 per seed: tiny maps (17 x 64) are overhead-heavy (a folder or a small file is a
# 4 KiB block), so the codecs' seed counts differ by one or two; the hand count below pins them.
KW = dict(teacher=TINY_TEACHER, random_init=True, batch_size=6, shard_size=18, progress=False, num_threads=2)


@pytest.fixture(scope="module")
def ref(image_root, tmp_path_factory):
    """(info_of(spec), manifest columns) of the 18 images in shards of 18."""
    from dataclasses import replace

    out = extract_tiny(image_root, tmp_path_factory.mktemp("ref") / "ref.zarr", shard_size=18)
    store = Store.open(str(out))
    return (lambda spec: replace(store.info, codec=spec)), manifest_columns(store.manifest())


def test_the_chosen_store_fits_the_budget_measured_on_disk(image_root, tmp_path):
    budget = 800_000
    lines = []
    r = extract(ExtractConfig(data=str(image_root), out=str(tmp_path / "s.zarr"), budget="800kB", **KW),
                announce=lines.append)
    store = Store.open(str(tmp_path / "s.zarr"))
    choice = r.budget
    assert (store.info.codec.name, store.num_seeds) == (choice.codec, choice.seeds) and store.done().all()
    apparent, allocated = _store_bytes_on_disk(tmp_path / "s.zarr")
    assert apparent <= allocated == choice.store_bytes <= budget  # du's bytes: files and folders
    # the most views that fit: one more seed of any codec would not
    for f in choice.fits:
        assert f.store_bytes() <= budget < f.store_bytes(f.seeds + 1)
    # int4 buys a seed more than fp16 and int8 here: more views beat more bits
    assert {f.codec: f.seeds for f in choice.fits} == {"fp16": 7, "int8": 7, "int4": 8}
    assert (choice.codec, choice.seeds) == ("int4", 8)
    text = lines[0]
    assert "not in a table that carries over" in text and "more views beat more bits" in text
    assert "int4 buys 8 seeds where fp16 buys 7" in text
    for f in choice.fits:
        assert f"{f.codec:5s} {f.view_bytes:,} bytes per view -> {f.seeds} view(s) per image" in text
    assert lines[1].startswith("free space:")


def test_the_choice_is_the_format_hand_count_per_codec(ref):
    # an independent count: each codec's whole store projected at S and S + 1 seeds
    info_of, cols = ref
    from fdcache.codecs import CodecSpec

    budget = 600_000
    choice = budget_mod.choose(budget, info_of, cols, 4096)
    for f in choice.fits:
        info = info_of(CodecSpec(f.codec))

        def whole(s):
            return on_disk(projected_files(info, [(x, 0) for x in range(s)], s, cols, directories=True), 4096)
        assert whole(f.seeds) == f.store_bytes() <= budget < whole(f.seeds + 1)
    # int8 and int4 fit 5 seeds, fp16 4: as many views, more bits
    assert (choice.codec, choice.seeds) == ("int8", 5) and "as many views, more bits" in choice.reason


def test_seeds_is_the_floor_and_an_explicit_codec_is_kept(ref):
    info_of, cols = ref
    from fdcache.codecs import CodecSpec

    free = budget_mod.choose(800_000, info_of, cols, 4096)
    kept = budget_mod.choose(800_000, info_of, cols, 4096, codec=CodecSpec("fp16"))
    assert free.codec == "int4" and (kept.codec, kept.seeds) == ("fp16", 7) and "--codec fp16 given" in kept.reason
    capped = budget_mod.choose(10**9, info_of, cols, 4096, max_seeds=5)  # all fit 5: more bits win
    assert (capped.codec, capped.seeds) == ("fp16", 5)
    with pytest.raises(ConfigError, match=r"--budget .* holds no store of 18 images at --seeds 40"):
        budget_mod.choose(800_000, info_of, cols, 4096, min_seeds=40)
    with pytest.raises(ConfigError, match="--max-seeds 3 is below --seeds 4"):
        budget_mod.choose(800_000, info_of, cols, 4096, min_seeds=4, max_seeds=3)


def test_a_measured_table_picks_the_lowest_expected_cost(ref, monkeypatch):
    info_of, cols = ref
    # read at the largest measured seed count each reaches (fp16 7 -> 1, int8 7 -> 4, int4 8 -> 1)
    monkeypatch.setattr(budget_mod, "MEASURED", {"fp16": {1: 0.01}, "int8": {1: 0.02, 4: 0.005}, "int4": {1: 0.5}})
    choice = budget_mod.choose(800_000, info_of, cols, 4096)
    assert choice.measured and (choice.codec, choice.seeds) == ("int8", 7) and "measured table" in choice.reason
    assert "not in a table" not in choice.text() and "expected cost against online +0.005" in choice.text()


def test_the_same_command_resumes_the_same_store_and_another_codec_is_refused(image_root, tmp_path):
    out = tmp_path / "s.zarr"
    first = extract(ExtractConfig(data=str(image_root), out=str(out), budget="800kB", **KW))
    again = extract(ExtractConfig(data=str(image_root), out=str(out), budget="800kB", **KW))
    assert again.samples == 0 and (again.budget.codec, again.budget.seeds) == (first.budget.codec, first.budget.seeds)
    lines = []
    less = extract(ExtractConfig(data=str(image_root), out=str(out), budget="500kB", codec=first.budget.codec, **KW),
                   announce=lines.append)
    assert less.samples == 0 and less.budget.seeds < first.budget.seeds == Store.open(str(out)).num_seeds
    assert any(f"already holds {first.budget.seeds} seeds, more than --budget 500 kB chooses ({less.budget.seeds}); "
               "nothing is removed" in line for line in lines)
    with pytest.raises(StoreMismatchError, match="codec"):
        extract(ExtractConfig(data=str(image_root), out=str(out), budget="800kB", codec="fp16", **KW))


def test_the_cli_prints_the_choice_and_refuses_a_bad_budget(image_root, tmp_path):
    base = ["extract", str(image_root), "--teacher", TINY_TEACHER, "--random-init", "--batch-size", "6",
            "--shard-size", "18"]
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "a.zarr"), "--budget", "lots"])
    assert r.exit_code == 2 and "--budget 'lots' is not a size" in r.output
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "b.zarr"), "--budget", "1kB"])
    assert r.exit_code == 2 and "holds no store" in r.output and not (tmp_path / "b.zarr").exists()
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "c.zarr"), "--budget", "400kB", "--codec", "int8"])
    assert r.exit_code == 0, r.output
    assert "choice: --codec int8 --seeds 2" in r.output
    assert Store.open(str(tmp_path / "c.zarr")).info.codec.name == "int8"
    # --seeds is the floor through extract too: 800 kB holds int4 x 8 (the hand count), not 40
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "d.zarr"), "--budget", "800kB", "--seeds", "40"])
    assert r.exit_code == 2 and "holds no store of 18 images at --seeds 40" in r.output, r.output
    assert not (tmp_path / "d.zarr").exists()


def test_with_views_from_the_budget_chooses_at_most_the_source_stores_seeds(image_root, tmp_path):
    """The views are the source's: a budget that would buy 8 seeds of a 3-seed source takes 3
    (nothing fails mid-creation), and --seeds stays the floor."""
    src = extract_tiny(image_root, tmp_path / "src.zarr", seeds=3)
    r = extract(ExtractConfig(data=str(image_root), out=str(tmp_path / "b.zarr"), budget="800kB",
                              views_from=str(src), **(KW | {"seeds": None})))
    store = Store.open(str(tmp_path / "b.zarr"))
    assert r.budget.seeds == store.num_seeds == 3 and store.done().all()
    assert (store.views(2) == Store.open(str(src)).views(2)).all()
    with pytest.raises(ConfigError, match="--seeds 4: --views-from store .* holds 3 seed"):
        extract(ExtractConfig(data=str(image_root), out=str(tmp_path / "c.zarr"), budget="800kB",
                              views_from=str(src), **(KW | {"seeds": 4})))
    assert not (tmp_path / "c.zarr").exists()


def test_max_seeds_without_a_budget_is_refused_and_a_zero_size_says_what_to_give(image_root, tmp_path):
    with pytest.raises(ConfigError, match=r"--max-seeds 5 without --budget \(--max-seeds\)"):
        ExtractConfig(data=str(image_root), out=str(tmp_path / "m.zarr"), max_seeds=5, **KW)
    with pytest.raises(ConfigError, match=r"'0\.5B' is not a positive size \(--budget\): give at least one byte"):
        ExtractConfig(data=str(image_root), out=str(tmp_path / "m.zarr"), budget="0.5B", **KW)
    assert not (tmp_path / "m.zarr").exists()


def test_a_budget_with_a_compressor_chooses_among_that_compressors_codecs(image_root, tmp_path):
    """--budget with --compressor zstd: the candidates are the codecs under zstd, and the store
    written is the chosen codec under zstd (the projection then counts zstd's bound on bytes)."""
    r = extract(ExtractConfig(data=str(image_root), out=str(tmp_path / "s.zarr"), budget="800kB",
                              compressor="zstd", **KW))
    store = Store.open(str(tmp_path / "s.zarr"))
    assert store.info.codec.compressor == "zstd" and store.info.codec.name == r.budget.codec
    assert store.num_seeds == r.budget.seeds
