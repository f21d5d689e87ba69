"""Several teachers on one set of recorded views: ``extract --views-from``, ``train --cache A
--cache B``, and the export with one head per teacher."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import extract_tiny, tree_bytes
from typer.testing import CliRunner

from fdcache.cli.app import app
from fdcache.codecs import whitened_error
from fdcache.distill.pixels import reference_pixels
from fdcache.distill.teachers import load_teacher
from fdcache.models import TINY_TEACHER
from fdcache.store import Store
from fdcache.store.inspect import inspect_store

runner = CliRunner()
T2 = "timm:vit_tiny_patch16_224"  # random init at 48 px: 3x3 patches + CLS, 192 wide
T2_RES = 48


def extract_t2(data, out, views_from, *more) -> Path:
    r = runner.invoke(app, ["extract", str(data), "--out", str(out), "--teacher", T2, "--random-init",
                            "--resolution", str(T2_RES), "--views-from", str(views_from), "--codec", "int8",
                            "--shard-size", "4", "--batch-size", "4", "--threads", "2", *more])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def two_stores(image_root, tmp_path_factory):
    """A: the tiny CLIP at 64 px, 2 seeds, fp16, shards of 6. B: a random-init timm ViT at
    48 px on A's views, int8, shards of 4."""
    d = tmp_path_factory.mktemp("mt")
    a = extract_tiny(image_root, d / "a.zarr", seeds=2)
    return a, extract_t2(image_root, d / "b.zarr", a)


def test_views_from_copies_manifest_and_views_byte_for_byte(two_stores, image_root):
    a, b = two_stores
    ta, tb = tree_bytes(a), tree_bytes(b)
    shared = [k for k in ta if k.startswith(("views/", "manifest/"))]
    assert len(shared) >= 8 and all(ta[k] == tb[k] for k in shared)
    assert {k for k in tb if k.startswith(("views/", "manifest/"))} == set(shared)
    sa, sb = Store.open(str(a)), Store.open(str(b))
    assert sb.num_seeds == sa.num_seeds == 2
    # the view set: per-seed hashes recorded in both bindings, the identity computed from them
    assert sb.info.views_sha256 == sa.info.views_sha256 and len(sa.info.views_sha256) == 2
    assert sb.view_set() == sa.view_set() and sb.info.views_from == sa.url
    assert inspect_store(str(b))["view_set"] == inspect_store(str(a))["view_set"]
    assert sb.info.teacher.tokens == 10 and sb.info.teacher.dim == 192 and sb.info.codec.name == "int8"
    # B's targets are T2 on A's recorded views (recomputed from the file)
    t2 = load_teacher(T2, random_init=True, resolution=T2_RES)
    m = sb.manifest()
    for s in range(2):
        idx = [0, 7, 17]
        px = np.stack([reference_pixels(m.abspath(i), sa.views(s)[i], T2_RES, t2.spec.mean, t2.spec.std)
                       for i in idx])
        with torch.no_grad():
            ref = t2(torch.from_numpy(px))
        got = torch.stack([sb.read(s, i, i + 1)[0] for i in idx])
        assert whitened_error(ref, got)["rel_l2"] < 0.01


def test_views_from_refuses_more_seeds_another_folder_and_other_views(two_stores, image_root, tmp_path):
    a, _ = two_stores
    r = runner.invoke(app, ["extract", str(image_root), "--out", str(tmp_path / "c.zarr"), "--teacher", T2,
                            "--random-init", "--resolution", "48", "--views-from", str(a), "--seeds", "3"])
    assert r.exit_code == 2 and "holds 2 seed(s)" in r.output and "grow it first" in r.output
    assert not (tmp_path / "c.zarr").exists()
    other = tmp_path / "other"
    shutil.copytree(image_root, other)
    next(p for p in sorted(other.rglob("*")) if p.is_file()).unlink()
    r = runner.invoke(app, ["extract", str(other), "--out", str(tmp_path / "d.zarr"), "--teacher", T2,
                            "--random-init", "--resolution", "48", "--views-from", str(a)])
    assert r.exit_code == 2 and "is not the image set" in r.output
    r = runner.invoke(app, ["extract", str(image_root), "--out", str(tmp_path / "e.zarr"), "--teacher", T2,
                            "--random-init", "--resolution", "48", "--views-from", str(a), "--views", "full"])
    assert r.exit_code == 2 and "--views" in r.output and "drop --views" in r.output


def test_seeds_grow_through_the_source_store(image_root, tmp_path):
    a = extract_tiny(image_root, tmp_path / "a.zarr", seeds=1)
    b = extract_t2(image_root, tmp_path / "b.zarr", a)
    r = runner.invoke(app, ["extract", str(image_root), "--out", str(b), "--teacher", T2, "--random-init",
                            "--resolution", "48", "--codec", "int8", "--shard-size", "4", "--seeds", "2"])
    assert r.exit_code == 2 and "add seeds through it" in r.output
    extract_tiny(image_root, a, seeds=2)  # grow A, then B follows with the same command
    extract_t2(image_root, b, a)
    sa, sb = Store.open(str(a)), Store.open(str(b))
    assert sb.num_seeds == 2 and sb.done().all()
    assert np.array_equal(sa.views(1), sb.views(1)) and sa.view_set() == sb.view_set()
