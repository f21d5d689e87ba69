"""Several teachers on one set of recorded views: ``extract --views-from``, ``train --cache A
--cache B``, and the export with one head per teacher."""

import json
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
from fdcache.distill.train import DistillTask, TrainConfig, train
from fdcache.errors import ConfigError, FdcacheError, StoreDataError, StoreMismatchError
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


# -- train --cache A --cache B -------------------------------------------------------------
def tcfg(out, **kw) -> TrainConfig:
    base = dict(student="fd-tiny", steps=4, batch_size=4, warmup_steps=1, base_lr=0.5, loss_impl="torch",
                progress=False, num_threads=2, save_every=1000, resolution=64)
    return TrainConfig(out=str(out), **(base | kw))


@pytest.fixture(scope="module")
def b64(two_stores, image_root, tmp_path_factory):
    """T2 at the student's 64 px on A's views (fp16): the online teacher's twin."""
    a, _ = two_stores
    return extract_t2(image_root, tmp_path_factory.mktemp("mt64") / "b64.zarr", a, "--resolution", "64",
                      "--codec", "fp16")


def _step0(task):
    torch.manual_seed(task.cfg.seed * 1000)  # drop path's generator as each run starts it
    batch = next(task.stream())
    with torch.no_grad():
        return batch, task.engine.loss(batch)


def test_each_teachers_term_equals_its_single_teacher_run_and_weights_are_exact(two_stores, tmp_path):
    a, b = (str(p) for p in two_stores)
    common = dict(seed=3, resize_targets=True)  # B's 3x3 grid is resampled to the student's 4x4
    one_a = DistillTask(tcfg(tmp_path / "a", cache=a, **common))
    one_b = DistillTask(tcfg(tmp_path / "b", cache=b, **common))
    both = DistillTask(tcfg(tmp_path / "ab", cache=[a, b], teacher_weights={b: 0.5}, **common))
    assert [type(h).__name__ for h in both.model.projections] == ["Linear", "Linear"]
    assert [h.out_features for h in both.model.projections] == [64, 192]
    (ba, la), (bb, lb), (bab, (total, terms)) = _step0(one_a), _step0(one_b), _step0(both)
    assert torch.equal(bab.index, ba.index) and torch.equal(bab.images, bb.images)  # one batch, one view set
    assert torch.equal(terms[0], la) and torch.equal(terms[1], lb)  # each term is its single-teacher loss
    torch.testing.assert_close(total, la + 0.5 * lb, rtol=1e-6, atol=0)
    for h, single in zip(both.model.projections, (one_a.model.head, one_b.model.head)):
        assert torch.equal(h.weight, single.weight)  # each head starts as in its single-teacher run


def test_offline_two_stores_equal_online_two_teachers_at_step0(two_stores, b64, image_root, tmp_path):
    a, b = str(two_stores[0]), str(b64)
    off = DistillTask(tcfg(tmp_path / "off", cache=[a, b], seed=3))
    on = DistillTask(tcfg(tmp_path / "on", online=True, teacher=[TINY_TEACHER, T2], random_init=True,
                          data=str(image_root), seed=3))
    (b_off, (l_off, t_off)), (b_on, (l_on, t_on)) = _step0(off), _step0(on)
    assert torch.equal(b_off.index, b_on.index) and torch.equal(b_off.images, b_on.images)
    # fp16 storage of each teacher's map is the only difference
    torch.testing.assert_close(t_off, t_on, rtol=2e-3, atol=0)
    torch.testing.assert_close(l_off, l_on, rtol=2e-3, atol=0)


def test_two_store_run_logs_each_term_and_resumes_bit_exactly(two_stores, tmp_path):
    a, b = (str(p) for p in two_stores)
    kw = dict(cache=[a, b], teacher_weights={a: 1.0, b: 0.25}, resize_targets=True, steps=6, save_every=2,
              ema_decay=0.9)
    full = train(tcfg(tmp_path / "full", **kw))
    part = train(tcfg(tmp_path / "part", run_steps=3, **kw))
    rest = train(tcfg(tmp_path / "part", resume=True, **kw))
    assert part.losses + rest.losses == full.losses and part.terms + rest.terms == full.terms
    log = [json.loads(line) for line in open(tmp_path / "full" / "log.jsonl")]
    assert [r["loss_terms"] for r in log] == full.terms and len(log) == 6
    for r in log:
        t = r["loss_terms"]
        assert set(t) == {a, b}
        assert r["loss"] == pytest.approx(t[a] + 0.25 * t[b], rel=1e-6)
    x = torch.load(tmp_path / "full/checkpoints/last.pt", weights_only=False)
    y = torch.load(tmp_path / "part/checkpoints/last.pt", weights_only=False)
    assert all(torch.equal(x["model"][k], y["model"][k]) for k in x["model"])


def test_stores_on_other_view_sets_are_refused_naming_the_difference(two_stores, image_root, tmp_path):
    a, b = (str(p) for p in two_stores)
    other_views = extract_tiny(image_root, tmp_path / "g.zarr", seeds=2, global_seed=7)
    with pytest.raises(StoreMismatchError, match="other views.*seed 0 differs.*--views-from"):
        DistillTask(tcfg(tmp_path / "r1", cache=[a, str(other_views)]))
    fewer = extract_tiny(image_root, tmp_path / "one.zarr", seeds=1, views_from=a)
    with pytest.raises(StoreMismatchError, match="1 seed.*2.*another seed count"):
        DistillTask(tcfg(tmp_path / "r2", cache=[a, str(fewer)]))
    DistillTask(tcfg(tmp_path / "r3", cache=[a, str(fewer)], seeds_used=1))  # the common seed
    folder = tmp_path / "fewer_images"
    shutil.copytree(image_root, folder)
    sorted(folder.rglob("*.png"))[0].unlink()
    elsewhere = extract_tiny(folder, tmp_path / "f.zarr", seeds=2)
    with pytest.raises(StoreMismatchError, match="another data folder"):
        DistillTask(tcfg(tmp_path / "r4", cache=[a, str(elsewhere)]))
    with pytest.raises(ConfigError, match="--teacher-weight nope"):
        tcfg(tmp_path / "r5", cache=[a, b], teacher_weights={"nope": 1.0})


def test_a_damaged_shard_in_either_store_stops_training_naming_that_store(two_stores, tmp_path):
    a, b = two_stores
    for victim in (a, b):
        copies = {s: tmp_path / f"{victim.name}-{s.name}" for s in (a, b)}
        for s, c in copies.items():
            if not c.exists():
                shutil.copytree(s, c)
        bad = copies[victim]
        shard = sorted(p for p in (bad / "targets" / "c").rglob("*") if p.is_file())[1]
        raw = bytearray(shard.read_bytes())
        raw[40] ^= 0xFF  # a flipped byte: found when the batch is read
        shard.write_bytes(bytes(raw))
        with pytest.raises(StoreDataError, match=f"in {bad}.*fails its crc32c") as e:
            train(tcfg(tmp_path / f"run-{victim.name}", cache=[str(copies[a]), str(copies[b])],
                       resize_targets=True, steps=8, check_data=False))
        other = copies[b if victim == a else a]
        assert str(other) not in str(e.value)
        shard.unlink()  # a deleted file: refused before training starts
        with pytest.raises(StoreDataError, match=f"store {bad}: 1 shard file.*missing"):
            DistillTask(tcfg(tmp_path / f"run2-{victim.name}", cache=[str(copies[a]), str(copies[b])],
                             resize_targets=True))


# Loads the export as a user would, without fdcache: timm's local-dir loader for the
# backbone, safetensors for the heads; writes each head's map of one fixed input.
_LOAD_WITHOUT_FDCACHE = """
import json, sys
sys.modules["fdcache"] = None  # importing fdcache would fail here
import timm, torch
from safetensors import safe_open
run, out = sys.argv[1], sys.argv[2]
model = timm.create_model(f"local-dir:{run}", pretrained=True).eval()
x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
maps = {}
with safe_open(f"{run}/heads.safetensors", "pt") as f, torch.no_grad():
    teachers = json.loads(f.metadata()["teachers"])
    tokens = model.forward_features(x)
    for t in teachers:
        w, b = f.get_tensor(t["key"] + ".weight"), f.get_tensor(t["key"] + ".bias")
        maps[t["name"]] = torch.nn.functional.linear(tokens, w, b)
torch.save({"maps": maps, "teachers": teachers}, out)
"""


def test_cli_two_teachers_export_heads_that_load_without_fdcache(two_stores, tmp_path):
    import subprocess
    import sys

    a, b = (str(p) for p in two_stores)
    run = tmp_path / "run"
    args = ["train", "--cache", a, "--cache", b, "--teacher-weight", f"{b}=0.5", "--resize-targets",
            "--student", "fd-tiny", "--steps", "2", "--batch-size", "4", "--warmup-steps", "1",
            "--loss-impl", "torch", "--threads", "2", "--out", str(run)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    assert len(log) == 2 and all(set(rec["loss_terms"]) == {a, b} for rec in log)
    bad = runner.invoke(app, [*args[:5], "--teacher-weight", "half", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "NAME=WEIGHT" in bad.output
    done = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_FDCACHE, str(run), str(tmp_path / "maps.pt")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(tmp_path / "maps.pt", weights_only=False)
    assert [(t["name"], t["weight"], t["dim"], t["teacher"]["name"]) for t in got["teachers"]] == [
        (a, 1.0, 64, TINY_TEACHER), (b, 0.5, 192, "vit_tiny_patch16_224")]
    # the trained student's own heads, from its checkpoint
    task = DistillTask(tcfg(tmp_path / "ref", cache=[a, b], resize_targets=True))
    task.model.load_state_dict(torch.load(run / "checkpoints/last.pt", weights_only=False)["model"])
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = task.model.eval()(x)
    assert [m.shape for m in want] == [(2, 17, 64), (2, 17, 192)]
    for name, w in zip((a, b), want):
        torch.testing.assert_close(got["maps"][name], w)
    from fdcache.distill.score import load_trained_student
    from fdcache.errors import FdcacheError
    with pytest.raises(FdcacheError, match="trained against 2 teachers"):
        load_trained_student(run)  # score: single-teacher runs only, said so


def test_parallel_loader_workers_read_every_store_for_the_same_rows(two_stores, tmp_path):
    a, b = (str(p) for p in two_stores)
    x_task = DistillTask(tcfg(tmp_path / "x", cache=[a, b], resize_targets=True))
    y_task = DistillTask(tcfg(tmp_path / "y", cache=[a, b], resize_targets=True, loader_workers=1))
    sx, sy = x_task.stream(), y_task.stream()
    for _ in range(5):  # crosses the epoch boundary: seed 1
        x, y = next(sx), next(sy)
        assert torch.equal(x.index, y.index) and torch.equal(x.images, y.images)
        for k, store in enumerate((a, b)):
            for name, v in x.stored[k].items():
                assert torch.equal(v, y.stored[k][name])
                want = Store.open(store).group[name].get_orthogonal_selection((x.epoch % 2, x.index.numpy()))
                assert torch.equal(v, torch.from_numpy(want)), (store, name)


# -- a token-subset store among several ------------------------------------------------------
def test_each_head_takes_its_loss_at_its_own_stores_kept_rows(two_stores, image_root, tmp_path):
    """A keeps every token, B (T2 on A's views) half of each view's patches: the two-store
    step's terms are A's single-store loss and B's subset loss (itself pinned to a plain-PyTorch
    reference in test_token_subset), so each head is gathered at its own store's rows."""
    a = str(two_stores[0])
    b = str(extract_t2(image_root, tmp_path / "bhalf.zarr", a, "--resolution", "64", "--codec", "fp16",
                       "--token-fraction", "0.5"))
    assert "token_rows" in Store.open(b).group and "token_rows" not in Store.open(a).group
    one_a, one_b = DistillTask(tcfg(tmp_path / "a", cache=a, seed=3)), DistillTask(tcfg(tmp_path / "b", cache=b, seed=3))
    both = DistillTask(tcfg(tmp_path / "ab", cache=[a, b], seed=3))
    (_, la), (_, lb), (_, (total, terms)) = _step0(one_a), _step0(one_b), _step0(both)
    assert torch.equal(terms[0], la) and torch.equal(terms[1], lb)
    torch.testing.assert_close(total, la + lb, rtol=1e-6, atol=0)
    # and the subset term is not the whole-map term: B's rows were used
    whole_b = str(extract_t2(image_root, tmp_path / "bwhole.zarr", a, "--resolution", "64", "--codec", "fp16"))
    (_, lw) = _step0(DistillTask(tcfg(tmp_path / "w", cache=whole_b, seed=3)))
    assert not torch.equal(lw, lb)


def test_a_subset_store_of_another_grid_among_several_is_refused_naming_it(two_stores, image_root, tmp_path):
    a = str(two_stores[0])
    b = str(extract_t2(image_root, tmp_path / "b48.zarr", a, "--token-fraction", "0.5"))  # T2 at 48 px: 3x3
    with pytest.raises(FdcacheError, match="store .*b48.zarr: student .*4x4.*3x3 grid, and the store keeps 0.5 of each view's patch tokens"):
        DistillTask(tcfg(tmp_path / "r", cache=[a, b], resize_targets=True))


def test_one_pretrained_tag_for_several_online_teachers_is_refused_naming_the_offline_way(image_root, tmp_path):
    with pytest.raises(FdcacheError, match=r"^--pretrained with several --online --teacher: one tag for all is "
                       r"ambiguous. Extract each teacher \(the second with --views-from the first\) and train "
                       r"with --cache A --cache B$"):
        DistillTask(tcfg(tmp_path / "r", online=True, teacher=[TINY_TEACHER, T2], pretrained="openai",
                         data=str(image_root)))
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_an_existing_store_given_views_from_another_view_set_is_refused_naming_the_fix(two_stores, image_root,
                                                                                      tmp_path):
    """B was made from A's views; the same command with --views-from C is refused before any
    work, naming the store, the seed and the two ways out. C: a copy of A as a store older than
    the binding's record of its views' hashes (the hashes then come from the views array), whose
    seed-0 views another zarr client rewrote."""
    import zarr

    a, _ = two_stores
    b = extract_t2(image_root, tmp_path / "b.zarr", a)
    c = tmp_path / "c.zarr"
    shutil.copytree(a, c)
    group = zarr.open_group(str(c), mode="r+")
    group["views"][0, 0] = group["views"][0, 1]
    group.attrs["fdcache"] = {k: v for k, v in group.attrs["fdcache"].items() if k != "views_sha256"}
    before = tree_bytes(b)
    r = runner.invoke(app, ["extract", str(image_root), "--out", str(b), "--teacher", T2, "--random-init",
                            "--resolution", str(T2_RES), "--views-from", str(c), "--codec", "int8",
                            "--shard-size", "4", "--batch-size", "4", "--threads", "2"])
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert (f"holds other views than --views-from store {Store.open(str(c)).url} (seed 0 differs): it was not "
            "made from them. Use another --out, or --overwrite to replace it.") in text, text
    assert tree_bytes(b) == before


def test_views_from_a_store_of_another_policy_and_global_seed_takes_them_without_options(image_root, tmp_path):
    """A source made with --views full and --global-seed 3: --views-from it, given neither
    option, takes both (they are the source's views), and the views are its bytes."""
    src = extract_tiny(image_root, tmp_path / "src.zarr", policy="full", global_seed=3)
    dst = extract_tiny(image_root, tmp_path / "dst.zarr", views_from=str(src))
    a, b = Store.open(str(src)), Store.open(str(dst))
    assert b.info.policy == a.info.policy and b.info.policy.kind == "full" and b.info.global_seed == 3
    assert np.array_equal(a.views(0), b.views(0))
