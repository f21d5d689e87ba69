"""Token-subset stores (``extract --token-fraction``): a recorded, keyed subset of each view's
tokens, CLS always kept; the loss on those rows only (issue 21, candidate (a))."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import extract_tiny, tree_bytes

from fdcache.distill.score import load_trained_student, store_loss
from fdcache.distill.train import DistillTask, TrainConfig, train
from fdcache.errors import ConfigError, StoreError, StoreMismatchError
from fdcache.store import Store
from fdcache.store.layout import StoreInfo, view_bytes
from fdcache.store.subset import ROWS, TokenSubset, bad_rows, kept_rows


@pytest.fixture(scope="module")
def whole(image_root, tmp_path_factory):
    return extract_tiny(image_root, tmp_path_factory.mktemp("w") / "whole.zarr", seeds=2)


@pytest.fixture(scope="module")
def half(image_root, tmp_path_factory):
    return extract_tiny(image_root, tmp_path_factory.mktemp("h") / "half.zarr", seeds=2, token_fraction=0.5)


def tcfg(out, **kw) -> TrainConfig:
    base = dict(student="fd-tiny", steps=6, batch_size=4, warmup_steps=1, base_lr=0.5, drop_path=0.0,
                loss_impl="torch", progress=False, num_threads=2, save_every=1000)
    return TrainConfig(out=str(out), **(base | kw))


def test_rows_keep_every_prefix_token_and_a_sorted_keyed_draw_of_the_patches():
    sub = TokenSubset(0.5)
    rows = sub.rows(0, 1, np.arange(20), tokens=197, prefix=1)
    assert rows.shape == (20, 1 + 98) and rows.dtype == np.int16
    assert (rows[:, 0] == 0).all()  # CLS, every view
    assert all(len(set(r)) == len(r) and (np.diff(r) > 0).all() and r[-1] < 197 for r in rows.tolist())
    # keyed by (global seed, seed, sample): any sample alone, in any order, gets the same rows
    assert np.array_equal(sub.rows(0, 1, [7, 3], 197, 1), rows[[7, 3]])
    assert not np.array_equal(sub.rows(0, 2, [7], 197, 1), rows[[7]])  # another seed, another draw
    assert not np.array_equal(sub.rows(1, 1, [7], 197, 1), rows[[7]])  # another global seed
    assert TokenSubset(0.25).kept(261, 5) == 5 + 64 and TokenSubset(1.0).kept(197, 1) == 197


def test_the_kept_rows_hold_the_full_maps_rows_byte_for_byte(whole, half):
    full, sub = Store.open(str(whole)).reader(), Store.open(str(half)).reader()
    for seed in (0, 1):
        a, b = full.read(seed, np.arange(18)), sub.read(seed, np.arange(18))
        rows = b[ROWS].astype(np.int64)
        assert np.array_equal(np.take_along_axis(a["targets"], rows[..., None], axis=1), b["targets"])
        assert np.array_equal(rows, TokenSubset(0.5).rows(0, seed, np.arange(18), 17, 1))


def test_half_the_tokens_take_half_the_bytes_per_view_and_the_rows_little(whole, half):
    a, b = Store.open(str(whole)), Store.open(str(half))
    assert [x.name for x in b.array_specs()] == ["targets", ROWS]
    assert b.array_specs()[0].shape == (9, 64)  # CLS + 8 of the tiny teacher's 16 patches
    # by hand: data, a crc32c and a 16-byte index entry per chunk (tiny maps: the overhead shows)
    assert view_bytes(b.info) == (9 * 64 * 2 + 20) + (9 * 2 + 20) and view_bytes(a.info) == 17 * 64 * 2 + 20
    for store in (a, b):
        files = sum(p.stat().st_size for x in store.array_specs() for p in (Path(store.url) / x.name / "c").rglob("*")
                    if p.is_file())
        assert files == 2 * 18 * view_bytes(store.info) + 2 * 3 * 4 * len(store.array_specs())


def test_the_same_command_makes_a_byte_identical_subset_store(image_root, half, tmp_path):
    again = extract_tiny(image_root, tmp_path / "again.zarr", seeds=2, token_fraction=0.5)
    assert tree_bytes(again) == tree_bytes(half)


def test_a_subset_extract_cut_by_a_write_error_resumes_to_the_uninterrupted_store(image_root, half, tmp_path,
                                                                                   monkeypatch):
    out, real, calls = tmp_path / "cut.zarr", Store.write_shard, []

    def failing(self, *a, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise OSError(28, "No space left on device")
        return real(self, *a, **kw)

    monkeypatch.setattr(Store, "write_shard", failing)
    with pytest.raises(StoreError, match="re-run the same command"):
        extract_tiny(image_root, out, seeds=2, token_fraction=0.5, writers=1)
    monkeypatch.setattr(Store, "write_shard", real)
    assert 0 < Store.open(str(out)).done().sum() < 6
    extract_tiny(image_root, out, seeds=2, token_fraction=0.5)
    assert tree_bytes(out) == tree_bytes(half)


def test_growing_a_subset_store_equals_extracting_its_seeds_at_once(image_root, half, tmp_path):
    out = extract_tiny(image_root, tmp_path / "grow.zarr", seeds=1, token_fraction=0.5)
    extract_tiny(image_root, out, seeds=2, token_fraction=0.5)
    assert tree_bytes(out) == tree_bytes(half)


def test_fraction_one_is_todays_store(image_root, whole, tmp_path):
    one = extract_tiny(image_root, tmp_path / "one.zarr", seeds=2, token_fraction=1.0)
    binding = json.loads((one / "zarr.json").read_text())["attributes"]["fdcache"]
    assert "token_subset" not in binding and not (one / ROWS).exists()
    assert tree_bytes(one) == tree_bytes(whole)


def test_a_binding_without_the_field_reads_as_every_token(whole):
    d = Store.open(str(whole)).info.to_dict()
    assert "token_subset" not in d
    info = StoreInfo.from_dict(d)
    assert info.token_subset.whole and info.to_dict() == d


def test_a_store_of_another_fraction_is_refused_naming_it(image_root, whole, tmp_path):
    with pytest.raises(StoreMismatchError, match=r"store keeps 1 of each view's patch tokens, requested 0\.5 "
                                                 r"\(--token-fraction 1 adds to it\)"):
        extract_tiny(image_root, whole, seeds=2, token_fraction=0.5)


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5])
def test_a_fraction_outside_zero_to_one_is_a_named_error(image_root, tmp_path, fraction):
    with pytest.raises(ConfigError, match="token-fraction"):
        extract_tiny(image_root, tmp_path / "x.zarr", token_fraction=fraction)


def _reference_loss(whole, half):
    """Plain PyTorch: the full teacher map (the whole store), gathered at the rows the subset
    store recorded, whitened per token, smooth-L1 (beta 2) against the same rows of the prediction."""
    full, sub = Store.open(str(whole)).reader(), Store.open(str(half)).reader()

    def loss(self, batch, forward):
        seed, idx = batch.epoch % 2, batch.index.numpy()
        pred = forward(batch.images)
        target = torch.from_numpy(full.read(seed, idx)["targets"]).float()
        rows = torch.from_numpy(sub.read(seed, idx)[ROWS].astype(np.int64))
        p = torch.stack([pred[b, rows[b]] for b in range(len(idx))])
        t = torch.stack([target[b, rows[b]] for b in range(len(idx))])
        return F.smooth_l1_loss(p, F.layer_norm(t, t.shape[-1:], eps=1e-5), beta=2.0)
    return loss


def test_step_losses_equal_a_plain_pytorch_reference_on_the_full_maps(whole, half, tmp_path, monkeypatch):
    ours = train(tcfg(tmp_path / "ours", cache=str(half)))  # 18 images / 4: 4 steps an epoch, both seeds
    with monkeypatch.context() as m:
        m.setattr(DistillTask, "loss", _reference_loss(whole, half))
        ref = train(tcfg(tmp_path / "ref", cache=str(half)))
    assert len(ours.losses) == 6 and ours.losses == ref.losses


def test_training_from_a_subset_store_resumes_bit_exactly(half, tmp_path):
    full = train(tcfg(tmp_path / "a", cache=str(half), steps=7, save_every=2, drop_path=0.2))
    train(tcfg(tmp_path / "b", cache=str(half), steps=7, save_every=2, drop_path=0.2, run_steps=3))
    rest = train(tcfg(tmp_path / "b", cache=str(half), steps=7, save_every=2, drop_path=0.2, resume=True))
    assert full.losses[3:] == rest.losses


def test_kept_rows_gathers_each_samples_rows_and_leaves_a_whole_map_alone():
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    rows = torch.tensor([[0, 2, 4], [0, 1, 3]], dtype=torch.int16)
    assert torch.equal(kept_rows(x, {ROWS: rows}), torch.stack([x[0, [0, 2, 4]], x[1, [0, 1, 3]]]))
    assert kept_rows(x, {"targets": x}) is x


@pytest.mark.parametrize("resize", [True, False])
def test_a_student_of_another_token_grid_is_refused_on_a_subset_store(half, tmp_path, resize):
    """With or without --resize-targets: the message names the resolution that fits and never
    offers --resize-targets (it cannot resample a subset)."""
    with pytest.raises(ConfigError) as e:
        DistillTask(tcfg(tmp_path / "r", cache=str(half), resolution=96, resize_targets=resize))
    msg = str(e.value)
    assert "keeps 0.5 of each view's patch tokens" in msg and "--resolution 64 gives the student a 4x4 grid" in msg
    assert "or pass --resize-targets" not in msg


def test_held_out_loss_on_a_subset_store_is_the_mean_over_its_kept_rows(whole, half, tmp_path):
    train(tcfg(tmp_path / "run", cache=str(whole), steps=2))
    student = load_trained_student(tmp_path / "run")
    on_half = store_loss(student, str(half), seeds=[1])
    # by hand: the whole store's per-token losses, averaged over each sample's kept rows
    st, sub = Store.open(str(whole)), Store.open(str(half)).reader()
    from fdcache.distill.pixels import reference_pixels
    from fdcache.kernels import fd_loss_reference

    m = st.manifest()
    views, targets = st.views(1), st.reader().read(1, np.arange(18))["targets"]
    rows = sub.read(1, np.arange(18))[ROWS].astype(np.int64)
    per_sample = []
    with torch.no_grad():
        for i in range(18):
            img = torch.from_numpy(reference_pixels(m.abspath(i), views[i], student.spec.resolution, student.spec.mean,
                                                     student.spec.std))
            per_token = fd_loss_reference(student.model(img[None]), torch.from_numpy(targets[i:i + 1]), reduction="none")
            per_sample.append(per_token[0, rows[i]].double().mean().item())
    assert on_half.loss == pytest.approx(np.mean(per_sample), rel=2e-3)  # DALI vs reference pixels


def test_the_free_space_projection_counts_the_subset_store_as_it_lies_on_disk(half):
    from fdcache.store.layout import on_disk, projected_files
    from fdcache.store.store import manifest_columns

    store = Store.open(str(half))
    todo = [(s, k) for s in range(2) for k in range(store.num_shards)]
    files = projected_files(store.info, todo, 2, manifest_columns(store.manifest()), directories=True)
    assert on_disk(files, 4096) == sum(p.stat().st_blocks * 512 for p in [half, *Path(half).rglob("*")])


def test_the_teacher_check_compares_a_subset_stores_kept_rows(half):
    from fdcache.distill.teacher_check import teacher_check

    views = teacher_check(str(half), 36)
    assert len(views) == 36 and all(v.ok for v in views)


def test_the_cli_takes_the_fraction_and_refuses_one_out_of_range(image_root, tmp_path):
    from fdcache.cli.app import app
    from typer.testing import CliRunner

    from fdcache.models import TINY_TEACHER

    base = ["extract", str(image_root), "--teacher", TINY_TEACHER, "--random-init", "--batch-size", "6",
            "--shard-size", "6"]
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "a.zarr"), "--token-fraction", "1.5"])
    assert r.exit_code == 2 and "--token-fraction" in r.output
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "b.zarr"), "--token-fraction", "0.25"])
    assert r.exit_code == 0, r.output
    assert Store.open(str(tmp_path / "b.zarr")).array_specs()[0].shape == (1 + 4, 64)


def _rows_rewritten(half, tmp_path, seed, sample, rows):
    """Another client writes ``rows`` into one sample's token_rows through zarr (valid checksums)."""
    import shutil

    import zarr

    bad = tmp_path / "rows.zarr"
    shutil.copytree(half, bad)
    zarr.open_group(str(bad), mode="r+")[ROWS][seed, sample] = np.asarray(rows, np.int16)
    return bad


def test_bad_rows_are_the_rows_the_draw_cannot_write():
    good = TokenSubset(0.5).rows(0, 1, range(12), 17, 1)
    assert not bad_rows(good, 17, 1).any()
    bad = good.copy()
    bad[2, 3] = 17  # past the map
    bad[4] = np.concatenate([bad[4, :1], bad[4, 1:][::-1]])  # not ascending
    bad[6, 0] = 1  # the CLS row replaced
    bad[8, 2] = bad[8, 1]  # a row twice
    assert np.flatnonzero(bad_rows(bad, 17, 1)).tolist() == [2, 4, 6, 8]


@pytest.mark.parametrize("what", ["past the map", "reversed"])
def test_damaged_rows_with_valid_checksums_are_named_by_verify_and_refused_by_train(half, tmp_path, what):
    from fdcache.errors import StoreDataError, VerifyError
    from fdcache.store.inspect import verify_store

    rows = Store.open(str(half)).reader().read(1, [4])[ROWS][0]
    rows = np.concatenate([rows[:1], [99], rows[2:]]) if what == "past the map" else np.concatenate(
        [rows[:1], rows[1:][::-1]])
    bad = _rows_rewritten(half, tmp_path, 1, 4, rows)
    with pytest.raises(VerifyError) as e:
        verify_store(str(bad))
    assert any("seed 1, sample 4 (shard" in p and "verify" in p for p in e.value.problems)
    with pytest.raises(StoreDataError, match=r"token_rows of seed 1, sample 4 \(shard 0\)"):
        train(tcfg(tmp_path / "run", cache=str(bad), steps=8))


def test_inspect_states_the_token_fraction_and_the_rows_kept(half, whole):
    from fdcache.store.inspect import inspect_store
    from fdcache.tables import store_table
    from rich.console import Console

    def shown(store):
        c = Console(record=True, width=200)
        c.print(store_table(inspect_store(str(store))))
        return c.export_text()

    assert inspect_store(str(half))["token_fraction"] == 0.5 and inspect_store(str(whole))["token_fraction"] == 1.0
    assert "0.5 of each view's patch tokens: 9 of the 17 rows per view stored" in shown(half)
    assert "token subset" not in shown(whole)


def test_bad_rows_is_its_definition_with_and_without_prefix_tokens():
    """Prefix rows 0..P-1 in order, then patch rows strictly ascending in P..L-1; by hand for
    P = 1 (a CLS token) and P = 0 (a map without prefix tokens: the first pair counts too)."""
    from fdcache.store.subset import bad_rows

    one = np.array([[0, 1, 3, 4], [0, 3, 1, 4], [1, 0, 3, 4], [0, 1, 1, 4], [0, 1, 3, 5], [0, 0, 3, 4]])
    assert bad_rows(one, tokens=5, prefix=1).tolist() == [False, True, True, True, True, True]
    none = np.array([[0, 1, 2], [1, 0, 2], [0, 2, 1], [2, 3, 4], [1, 1, 2], [0, 2, 5]])
    assert bad_rows(none, tokens=5, prefix=0).tolist() == [False, True, True, False, True, True]
