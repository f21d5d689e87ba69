"""The training recipes, pinned: each test compares what the loops do with a value computed
independently, by hand or by the plain library call (timm's scheduler formula, torch's
AdamW update and ``clip_grad_norm_``, ``F.cross_entropy(label_smoothing=)``, the WiSE-FT
formula). The loops are observed from outside, through torch's global optimizer hooks and
what a run writes, so the tests hold however the loops are organised."""

import json
import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fdcache.cli.app import app
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torchvision.transforms import RandomResizedCrop
from typer.testing import CliRunner

from fdcache.distill.train import DistillTask, TrainConfig, train
from fdcache.models import TINY_TEACHER
from fdcache.store.views import ViewPolicy, sample_view
from fdcache.tune.finetune import FinetuneTask, finetune, make_config
from fdcache.tune.imagefolder import train_loader
from fdcache.tune.wise import interpolate, wise


@contextmanager
def optimizer_steps():
    """Record every optimizer step any loop takes: per group its lr and weight decay, the
    parameters and gradients before the step and the parameters after it."""
    steps = []

    def pre(opt, args, kwargs):
        groups = opt.param_groups
        steps.append({"lr": [g["lr"] for g in groups], "wd": [g["weight_decay"] for g in groups],
                      "before": [[p.detach().clone() for p in g["params"]] for g in groups],
                      "grads": [[None if p.grad is None else p.grad.detach().clone() for p in g["params"]]
                                for g in groups]})

    def post(opt, args, kwargs):
        steps[-1]["after"] = [[p.detach().clone() for p in g["params"]] for g in opt.param_groups]

    hooks = (register_optimizer_step_pre_hook(pre),
             register_optimizer_step_post_hook(post))
    try:
        yield steps
    finally:
        for h in hooks:
            h.remove()


def _grads(step) -> list[torch.Tensor]:
    return [g for group in step["grads"] for g in group if g is not None]


def tcfg(out, store, **kw) -> TrainConfig:
    base = dict(cache=str(store), student="fd-tiny", steps=2, batch_size=4, lr_batch=4, base_lr=4e-3,
                warmup_steps=1, drop_path=0.0, loss_impl="torch", progress=False, num_threads=2)
    return TrainConfig(out=str(out), **(base | kw))


def ftcfg(out, data, **kw):
    base = dict(mode="finetune", model=TINY_TEACHER, random_init=True, steps=1, batch_size=4, lr_batch=4,
                base_lr=1e-3, warmup_steps=0, log_every=1, workers=0, progress=False, ema_decay=0,
                auto_augment="none", re_prob=0.0, label_smoothing=0.0, layer_decay=1.0, crop_pct=1.0)
    return make_config(None, out=str(out), data=str(data), **(base | kw))


def _run_loop(kind, out, image_root, store, **kw):
    """One short run of the distillation or the fine-tuning loop."""
    if kind == "distill":
        return train(tcfg(out, store, **({"steps": 1} | kw)))
    return finetune(ftcfg(out, image_root, **kw))


# -- views ---------------------------------------------------------------------------
def test_crops_stay_within_the_policys_scale_range_as_torchvisions_do():
    W, H, n = 500, 375, 3000
    policy = ViewPolicy(scale=(0.08, 0.5), ratio=(3 / 4, 4 / 3))
    ours = np.array([sample_view(0, 0, i, W, H, policy)[:4] for i in range(n)], dtype=float)
    area = ours[:, 2] * ours[:, 3]
    slack = 0.5 * (W + H) + 1  # w and h are each rounded to the pixel
    assert area.max() <= 0.5 * W * H + slack and area.min() >= 0.08 * W * H - slack
    torch.manual_seed(0)
    theirs = np.array([RandomResizedCrop.get_params(torch.empty(3, H, W), [0.08, 0.5], [3 / 4, 4 / 3])
                       for _ in range(n)], dtype=float)
    qs = np.linspace(0.05, 0.95, 19)
    a, b = area / (W * H), theirs[:, 2] * theirs[:, 3] / (W * H)
    assert np.abs(np.quantile(a, qs) - np.quantile(b, qs)).max() < 0.02  # the whole range is used alike


# -- data order ----------------------------------------------------------------------
def test_each_epoch_visits_whole_batches_of_distinct_samples_in_its_own_order(tiny_store, tmp_path):
    stream = DistillTask(tcfg(tmp_path / "run", tiny_store)).stream()
    epochs = {}
    for _ in range(8):  # 18 samples in batches of 4: 4 batches an epoch
        b = next(stream)
        epochs.setdefault(b.epoch, []).extend(b.index.tolist())
    assert sorted(epochs) == [0, 1]
    for order in epochs.values():
        assert len(order) == 16 and len(set(order)) == 16
    assert epochs[0] != epochs[1]


def test_a_run_resumed_mid_epoch_repeats_the_uninterrupted_losses_across_epoch_ends(tiny_store, tmp_path):
    full = train(tcfg(tmp_path / "a", tiny_store, steps=10))
    part = train(tcfg(tmp_path / "b", tiny_store, steps=10, run_steps=3))  # stops inside epoch 0
    rest = train(tcfg(tmp_path / "b", tiny_store, steps=10, resume=True))  # runs through epochs 1 and 2
    assert part.losses + rest.losses == full.losses


# -- the training loops ----------------------------------------------------------------
def _timm_cosine(t, total, warmup, peak, warmup_lr, min_lr):
    """timm's CosineLRScheduler (t_in_epochs=False, no warmup prefix), by hand."""
    if t < warmup:
        return warmup_lr + t * (peak - warmup_lr) / warmup
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * t / total))


@pytest.mark.parametrize("kind", ["distill", "finetune"])
def test_lr_is_base_lr_times_total_batch_over_lr_batch_on_timms_cosine(kind, image_root, tiny_store, tmp_path):
    kw = dict(steps=5, batch_size=2, accum_steps=3, lr_batch=8, base_lr=4e-3, warmup_lr=4e-4, min_lr=4e-5,
              warmup_steps=2)
    with optimizer_steps() as steps:
        _run_loop(kind, tmp_path / "run", image_root, tiny_store, **kw)
    scale = 2 * 1 * 3 / 8  # batch x world x accum / lr_batch
    want = [_timm_cosine(t, 5, 2, 4e-3 * scale, 4e-4 * scale, 4e-5 * scale) for t in range(5)]
    assert len(steps) == 5
    for t, s in enumerate(steps):
        assert s["lr"] == pytest.approx([want[t]] * len(s["lr"]), rel=1e-9), t


def test_accumulated_micro_batches_give_the_gradient_of_one_big_batch(tiny_store, tmp_path):
    with optimizer_steps() as accumulated:
        a = train(tcfg(tmp_path / "a", tiny_store, steps=1, batch_size=4, accum_steps=2, lr_batch=8, clip_grad=None))
    with optimizer_steps() as big:
        b = train(tcfg(tmp_path / "b", tiny_store, steps=1, batch_size=8, accum_steps=1, lr_batch=8, clip_grad=None))
    assert accumulated[0]["lr"] == big[0]["lr"]
    assert a.losses == pytest.approx(b.losses, rel=1e-5)  # the logged loss is the step's mean
    for a, b in zip(_grads(accumulated[0]), _grads(big[0]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_each_distillation_step_is_adamw_with_fds_hyperparameters(tiny_store, tmp_path):
    """FD's optimizer: AdamW, betas (0.9, 0.999), eps 1e-8, weight decay 0.05 except timm's
    no-decay group; the update written out as torch documents it."""
    with optimizer_steps() as steps:
        train(tcfg(tmp_path / "run", tiny_store, steps=3, clip_grad=None))
    assert len(steps) == 3
    b1, b2, eps = 0.9, 0.999, 1e-8
    assert sorted(set(steps[0]["wd"])) == [0.0, 0.05]
    for gi, ps in enumerate(steps[0]["before"]):  # 1-d parameters (norms, biases) are not decayed
        assert all(p.ndim >= 2 for p in ps) or steps[0]["wd"][gi] == 0.0
    m, v = {}, {}
    for t, s in enumerate(steps, 1):
        for gi, (lr, wd) in enumerate(zip(s["lr"], s["wd"])):
            for pi, (p0, g, p1) in enumerate(zip(s["before"][gi], s["grads"][gi], s["after"][gi])):
                key = (gi, pi)
                m[key] = b1 * m.get(key, 0) + (1 - b1) * g
                v[key] = b2 * v.get(key, 0) + (1 - b2) * g * g
                denom = (v[key] / (1 - b2 ** t)).sqrt() + eps
                want = p0 * (1 - lr * wd) - lr * (m[key] / (1 - b1 ** t)) / denom
                torch.testing.assert_close(p1, want, rtol=1e-5, atol=1e-8, msg=f"step {t} group {gi} param {pi}")
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert {"step", "loss", "lr", "images_per_s", "data_wait"} <= set(log[0])


def _clipped(grads: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    return [p.grad for p in params]


@pytest.mark.parametrize("kind", ["distill", "finetune"])
def test_gradient_clipping_is_torchs_clip_grad_norm(kind, image_root, tiny_store, tmp_path):
    with optimizer_steps() as free:
        _run_loop(kind, tmp_path / "free", image_root, tiny_store, clip_grad=0)
    raw = _grads(free[0])
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in raw])).item()
    with optimizer_steps() as clipped:
        _run_loop(kind, tmp_path / "clipped", image_root, tiny_store, clip_grad=norm / 4)
    got = _grads(clipped[0])
    for a, b in zip(got, _clipped(raw, norm / 4), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    assert torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in got])).item() == \
        pytest.approx(norm / 4, rel=1e-4)


def test_train_cli_ema_decay_is_the_decay_of_the_exported_weights(tiny_store, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--cache", str(tiny_store), "--student", "fd-tiny", "--steps", "3", "--batch-size", "4",
            "--warmup-steps", "1", "--lr", "0.5", "--drop-path", "0", "--ema-decay", "0.25",
            "--loss-impl", "torch", "--threads", "2", "--out", str(out)]
    r = CliRunner().invoke(app, args + ["--run-steps", "2"])
    assert r.exit_code == 0, r.output
    m2 = torch.load(out / "checkpoints" / "last.pt", weights_only=False)["model"]
    r = CliRunner().invoke(app, args + ["--resume"])
    assert r.exit_code == 0, r.output
    m3 = torch.load(out / "checkpoints" / "last.pt", weights_only=False)["model"]
    exported = load_file(str(out / "model.safetensors"))
    assert json.loads((out / "config.json").read_text())["fdcache"]["export"]["ema"] is True
    moved = 0
    for k, e in exported.items():
        if e.is_floating_point():
            a, b = m2[f"backbone.{k}"], m3[f"backbone.{k}"]
            moved += not torch.equal(a, b)
            # timm's ModelEmaV3 copies the weights on its first two updates, then decays.
            torch.testing.assert_close(e, 0.25 * a + 0.75 * b, rtol=1e-5, atol=1e-7, msg=k)
    assert moved > 0


# -- fine-tuning -------------------------------------------------------------------------
def test_finetuning_loss_is_cross_entropy_with_the_configured_label_smoothing(image_root, tmp_path):
    kw = dict(head="zeroshot", templates="simple", label_smoothing=0.3)  # a text-tower head: non-uniform logits
    ft = FinetuneTask(ftcfg(tmp_path / "probe", image_root, **kw))
    images, labels, _ = next(iter(train_loader(ft.dataset, ft.sampler, 0, False)))
    with torch.no_grad():
        logits = ft.model(images).float()
    smoothed = F.cross_entropy(logits, labels, label_smoothing=0.3).item()
    plain = F.cross_entropy(logits, labels).item()
    assert abs(smoothed - plain) > 1e-3  # the test can tell the two apart
    r = finetune(ftcfg(tmp_path / "run", image_root, **kw))
    assert r.losses[0] == pytest.approx(smoothed, rel=1e-5)


def test_mixup_targets_carry_the_configured_label_smoothing(image_root, tmp_path):
    from timm.loss import SoftTargetCrossEntropy

    targets = []

    def spy(module, args):
        if isinstance(module, SoftTargetCrossEntropy):
            targets.append(args[1].detach().clone())

    handle = torch.nn.modules.module.register_module_forward_pre_hook(spy)
    try:
        finetune(ftcfg(tmp_path / "run", image_root, mixup=0.8, label_smoothing=0.3))
    finally:
        handle.remove()
    (soft,) = targets
    # 3 classes: a mix of two smoothed one-hots leaves at least one class at the off value 0.3 / 3.
    torch.testing.assert_close(soft.sum(1), torch.ones(len(soft)))
    torch.testing.assert_close(soft.min(1).values, torch.full((len(soft),), 0.1))


def test_wise_weights_move_from_the_zeroshot_end_towards_the_finetuned_end(image_root, tmp_path):
    zs, ft = {"w": torch.full((3,), 2.0), "n": torch.tensor([1])}, {"w": torch.full((3,), 10.0), "n": torch.tensor([7])}
    for alpha, want in [(0.25, 4.0), (0.75, 8.0)]:
        got = interpolate(zs, ft, alpha)
        assert torch.equal(got["w"], torch.full((3,), want)) and torch.equal(got["n"], ft["n"])
    run = tmp_path / "run"
    finetune(ftcfg(run, image_root, head="zeroshot", templates="simple", steps=2, base_lr=1e-2))
    (path,) = wise(run / "init", run, [0.25], tmp_path / "w", ema=False)
    a, b = load_file(str(run / "init" / "model.safetensors")), load_file(str(run / "model.safetensors"))
    mixed = load_file(str(path / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(mixed[k], 0.75 * a[k] + 0.25 * b[k], msg=k)
