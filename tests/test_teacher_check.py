"""``fdcache verify --teacher-check N`` (issue 21): stored targets against the teacher recomputed
from the store's own spec, through the reference pixel path, within the codec's bound."""

import shutil

import numpy as np
import pytest
import zarr
from conftest import extract_tiny
from fdcache.cli.app import app
from typer.testing import CliRunner

from fdcache.distill.teacher_check import choose_views, teacher_check
from fdcache.errors import TeacherError, VerifyError
from fdcache.store import Store
from fdcache.store.inspect import verify_store


@pytest.fixture(scope="module", params=["fp16", "int8"])
def made(request, image_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("tc") / f"{request.param}.zarr"
    return extract_tiny(image_root, out, seeds=2, codec=request.param)


def test_a_fresh_store_is_within_its_codecs_bound_view_by_view(made):
    views = teacher_check(str(made), 36)  # every view of 2 seeds x 18 images
    assert [(v.seed, v.sample) for v in views] == [(s, i) for s in range(2) for i in range(18)]
    bound = Store.open(str(made)).info.codec.codec.error_bound
    assert all(v.ok and v.bound == bound and 0 < v.rel_l2 <= bound for v in views)


def test_the_views_checked_are_a_seeded_reproducible_choice(made):
    store = Store.open(str(made))
    a, b, c = choose_views(store, 5, seed=0), choose_views(store, 5, seed=0), choose_views(store, 5, seed=1)
    assert a == b and a != c and len(a) == len(set(a)) == 5
    assert choose_views(store, 100) == [(s, i) for s in range(2) for i in range(18)]
    assert [(v.seed, v.sample) for v in teacher_check(str(made), 5, seed=1)] == c


def _rewrite(store_path, tmp_path, seed: int, sample: int, source: int):
    """Another client writes sample ``source``'s stored arrays over ``sample``'s, through zarr and
    the same codec: the chunks' checksums are valid."""
    bad = tmp_path / "rewritten.zarr"
    shutil.copytree(store_path, bad)
    g = zarr.open_group(str(bad), mode="r+")
    for a in Store.open(str(bad)).array_specs():
        g[a.name][seed, sample] = g[a.name][seed, source]
    return bad


def test_a_sample_rewritten_with_valid_checksums_is_named(made, tmp_path):
    bad = _rewrite(made, tmp_path, seed=1, sample=3, source=7)
    verify_store(str(bad))  # every checksum holds: the audit cannot see it
    with pytest.raises(VerifyError) as e:
        teacher_check(str(bad), 36)
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith("seed 1 sample 3 (")
    assert "ABOVE the bound" in e.value.problems[0] and "1 of 36 recomputed view(s)" in str(e.value)


def test_another_teachers_weights_are_refused_before_anything_is_compared(made, tmp_path):
    other = tmp_path / "other.zarr"
    shutil.copytree(made, other)
    g = zarr.open_group(str(other), mode="r+")
    binding = g.attrs["fdcache"]
    binding["teacher"]["init_seed"] = 1  # the spec now rebuilds other random weights
    g.attrs["fdcache"] = binding
    with pytest.raises(TeacherError, match=r"weights sha256 .* the store records .*--teacher-check"):
        teacher_check(str(other), 3)


def test_the_cli_reports_each_view_and_exits_1_naming_the_rewritten_one(made, tmp_path):
    r = CliRunner().invoke(app, ["verify", str(made), "--teacher-check", "4", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert r.output.count("whitened rel L2") == 4 and "4 recomputed view(s) within the codec's bound" in r.output
    bad = _rewrite(made, tmp_path, seed=0, sample=5, source=6)
    r = CliRunner().invoke(app, ["verify", str(bad), "--teacher-check", "36", "--device", "cpu"])
    assert r.exit_code == 1 and "seed 0 sample 5 (" in r.output
    assert np.sum(["ABOVE the bound" in line for line in r.output.splitlines()]) == 2  # the list + the line


def test_a_negative_count_is_refused_before_the_checksum_pass_and_more_than_the_store_is_said(made):
    r = CliRunner().invoke(app, ["verify", str(made), "--teacher-check", "-1", "--device", "cpu"])
    assert r.exit_code == 2 and "(--teacher-check)" in r.output and "ok:" not in r.output
    views = sum(len(Store.open(str(made)).eligible(s)) for s in range(Store.open(str(made)).num_seeds))
    r = CliRunner().invoke(app, ["verify", str(made), "--teacher-check", str(views + 5), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert f"ok: {views} recomputed view(s)" in r.output and f"--teacher-check {views + 5} asked for more" in r.output
