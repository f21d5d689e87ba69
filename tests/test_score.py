"""fdcache score: held-out FD loss, train-store gap, linear probe; train --seeds-used."""

import json

import numpy as np
import pytest
import torch

from fdcache.distill.pixels import reference_pixels
from fdcache.distill.score import fit_linear_probe, linear_probe, load_trained_student, score, store_loss
from fdcache.distill.teachers import TINY_TEACHER
from fdcache.distill.train import TrainConfig, DistillTask, train
from fdcache.errors import ConfigError, StoreError, StoreMismatchError
from fdcache.kernels import fd_loss_reference
from fdcache.store import Store

from conftest import extract_tiny, tree_bytes


def tcfg(out, **kw) -> TrainConfig:
    base = dict(student="fd-tiny", steps=3, batch_size=4, warmup_steps=1, base_lr=0.5, loss_impl="torch",
                progress=False, num_threads=2, save_every=1000)
    return TrainConfig(out=str(out), **(base | kw))


@pytest.fixture(scope="module")
def two_seeds(image_root, tmp_path_factory):
    return extract_tiny(image_root, tmp_path_factory.mktemp("two") / "s.zarr", seeds=2)


@pytest.fixture(scope="module")
def run(tiny_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    train(tcfg(out, cache=str(tiny_store)))
    return out


def test_held_out_loss_equals_the_loss_recomputed_by_hand(run, two_seeds):
    """Two samples of seed 1: reference pixels (PIL + NumPy), the checkpoint's student with its
    head, the store's decoded targets, the plain-PyTorch loss."""
    got = store_loss(load_trained_student(run), str(two_seeds), seeds=[1], limit=2)
    student = load_trained_student(run)
    st = Store.open(str(two_seeds))
    m, views = st.manifest(), st.views(1)
    pixels = torch.stack([torch.from_numpy(reference_pixels(m.abspath(i), views[i], student.spec.resolution,
                                                            student.spec.mean, student.spec.std)) for i in (0, 1)])
    with torch.no_grad():
        pred = student.model(pixels)
    by_hand = fd_loss_reference(pred, st.read(1, 0, 2)).item()
    assert got.samples == 2 and got.seeds == [1]
    assert got.loss == pytest.approx(by_hand, rel=2e-3)  # DALI vs the reference resize: < 1e-3 per pixel
    assert got.loss > 0


def test_the_loss_is_the_mean_over_seeds_and_samples(run, two_seeds):
    student = load_trained_student(run)
    both = store_loss(student, str(two_seeds))
    one = [store_loss(student, str(two_seeds), seeds=[s]).loss for s in (0, 1)]
    assert both.samples == 36 and both.per_seed == pytest.approx(one, rel=1e-12)
    assert both.loss == pytest.approx(sum(one) / 2, rel=1e-12)


def test_score_reports_the_train_store_gap(run, tiny_store, two_seeds):
    r = score(str(run), str(two_seeds), seeds=[1], train_cache=str(tiny_store))
    assert r.train.seeds == [0] and r.heldout.seeds == [1]
    assert r.gap == pytest.approx(r.heldout.loss - r.train.loss)
    assert r.steps == 3 and r.config["student"] == "fd-tiny"


def test_a_store_of_another_teacher_is_refused(run, image_root, tmp_path):
    other = extract_tiny(image_root, tmp_path / "other.zarr", init_seed=5)
    with pytest.raises(StoreMismatchError, match="weights_sha256"):
        store_loss(load_trained_student(run), str(other))


def test_seeds_outside_the_store_and_a_half_probe_are_refused(run, tiny_store):
    with pytest.raises(ConfigError, match=r"\[3\]"):
        store_loss(load_trained_student(run), str(tiny_store), seeds=[3])
    with pytest.raises(ConfigError, match="--probe-val"):
        score(str(run), str(tiny_store), probe_train="x")


def test_ema_weights_are_scored_when_the_run_kept_them(tiny_store, tmp_path):
    out = tmp_path / "ema"
    t = DistillTask(tcfg(out, cache=str(tiny_store), ema_decay=0.5))
    t.fit()
    s = load_trained_student(out)
    assert s.ema
    for name, p in s.model.state_dict().items():
        assert torch.equal(p, t.engine.ema.module.state_dict()[name]), name


def test_probe_separates_a_linearly_separable_toy():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g, dtype=torch.float64) * 6
    y = torch.arange(200) % 4
    x = centres[y] + torch.randn(200, 16, generator=g, dtype=torch.float64)
    w, b = fit_linear_probe(x[:120], y[:120], 4)
    assert ((x[120:] @ w + b).argmax(1) == y[120:]).all()


def test_probe_cannot_fit_labels_it_has_no_signal_for():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (400,), generator=g)
    w, b = fit_linear_probe(x[:200], y[:200], 4)
    assert ((x[200:] @ w + b).argmax(1) == y[200:]).double().mean() < 0.4  # chance is 0.25


def test_probe_on_the_students_features_reads_every_image(run, image_root):
    p = linear_probe(load_trained_student(run), str(image_root), str(image_root))
    assert (p.train_images, p.val_images, p.classes) == (18, 18, 3)
    assert p.top1 == p.train_top1 and 0 <= p.top1 <= 1


def test_the_first_seeds_of_a_store_equal_a_store_of_that_many_seeds(tiny_store, two_seeds):
    one, two = tree_bytes(tiny_store), tree_bytes(two_seeds)
    seed0 = [k for k in one if "/c/0/" in k and k.split("/")[0] in ("targets", "views")]
    assert seed0 and all(one[k] == two[k] for k in seed0)


def test_seeds_used_replays_only_the_first_seeds(tiny_store, two_seeds, tmp_path):
    """--seeds-used 1 on a two-seed store is the one-seed store's run, step for step."""
    kw = dict(steps=None, epochs=3, drop_path=0.0)
    a = train(tcfg(tmp_path / "a", cache=str(tiny_store), **kw))
    b = train(tcfg(tmp_path / "b", cache=str(two_seeds), seeds_used=1, **kw))
    c = train(tcfg(tmp_path / "c", cache=str(two_seeds), **kw))
    assert a.losses == b.losses and a.losses != c.losses


def test_seeds_used_beyond_the_store_is_refused(tiny_store, tmp_path):
    with pytest.raises(StoreError, match="holds 1 seed"):
        DistillTask(tcfg(tmp_path / "r", cache=str(tiny_store), seeds_used=2))


def test_train_states_the_replay_factor(two_seeds, image_root, tmp_path):
    t = DistillTask(tcfg(tmp_path / "r", cache=str(two_seeds), steps=None, epochs=8))
    assert "8 epoch(s) = each stored view seen 4 time(s)" in t.replay()
    t = DistillTask(tcfg(tmp_path / "s", cache=str(two_seeds), steps=None, epochs=8, seeds_used=1))
    assert "seen 8 time(s)" in t.replay()
    t = DistillTask(tcfg(tmp_path / "o", online=True, teacher=TINY_TEACHER, random_init=True, data=str(image_root)))
    assert "fresh view" in t.replay()


def test_score_command_prints_and_writes_json(run, tiny_store, two_seeds, image_root, tmp_path):
    from typer.testing import CliRunner

    from fdcache.cli.app import app

    out = tmp_path / "s.json"
    r = CliRunner().invoke(app, ["score", str(run), "--cache", str(two_seeds), "--seed", "1", "--train-cache",
                                 str(tiny_store), "--probe-train", str(image_root), "--probe-val", str(image_root),
                                 "--json", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "held-out FD loss" in r.output and "gap held-out - train" in r.output and "linear probe" in r.output
    d = json.loads(out.read_text())
    assert d["command"] == "score" and d["heldout"]["seeds"] == [1] and d["probe"]["val_images"] == 18
    assert np.isclose(d["gap"], d["heldout"]["loss"] - d["train"]["loss"])


def test_score_is_one_call_of_the_api(run, two_seeds):
    import fdcache

    r = fdcache.score(run, two_seeds, seeds=[0], limit=4)
    assert r.heldout.samples == 4 and r.train is None and r.probe is None
