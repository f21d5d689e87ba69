import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import extract_tiny, interrupt_at, one_and_two_processes
from PIL import Image, ImageOps
from safetensors.torch import load_file

from fdcache.distill.train import TrainConfig, train
from fdcache.errors import DataError, FdcacheError
from fdcache.models import TINY_TEACHER, create_openclip
from fdcache.samples import make_image_folder
from fdcache.tune.classifiers import init_model, load_export, templates_of, zeroshot_weights
from fdcache.tune.evaluate import evaluate
from fdcache.tune.finetune import FinetuneTask, finetune, load_preset, make_config, preset_names
from fdcache.tune.imagefolder import LabeledImages, eval_transform, train_loader
from fdcache.tune.wise import wise


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """16 images in 4 classes."""
    return make_image_folder(tmp_path_factory.mktemp("ft") / "images", classes=4, per_class=4, seed=1)


@pytest.fixture(scope="module")
def student(folder, tmp_path_factory) -> Path:
    """An fdcache train export (fd-tiny BEiT distilled for 2 steps from the tiny teacher)."""
    root = tmp_path_factory.mktemp("student")
    store = str(root / "s.zarr")
    extract_tiny(folder, store, batch_size=8, shard_size=8)
    train(TrainConfig(out=str(root / "run"), cache=store, student="fd-tiny", steps=2, batch_size=4,
                      warmup_steps=1, loss_impl="torch", progress=False, num_threads=2))
    return root / "run"


def fcfg(out, data, **kw):
    base = dict(mode="finetune", model=TINY_TEACHER, random_init=True, steps=4, batch_size=4, lr_batch=4,
                base_lr=1e-3, warmup_steps=1, log_every=1, workers=0, progress=False, ema_decay=0,
                auto_augment="none", re_prob=0.0, label_smoothing=0.0, layer_decay=1.0, crop_pct=1.0)
    return make_config(None, out=str(out), data=str(data), **(base | kw))


def _batch(ft):
    return next(iter(train_loader(ft.dataset, ft.sampler, 0, False)))


# -- recipe ingredients ------------------------------------------------------------------
def test_layer_decay_gives_each_block_its_lr_and_no_decay_to_norms_and_embeddings(folder, tmp_path):
    ft = FinetuneTask(fcfg(tmp_path, folder, layer_decay=0.5, warmup_steps=0, steps=10, weight_decay=0.05,
                        freeze_patch_embed=True))
    ft.engine.scheduler.step_update(0)
    peak = ft.cfg.base_lr  # total batch 4 == lr_batch
    names = {id(p): n for n, p in ft.model.named_parameters()}
    depth = 2  # the tiny CLIP tower's blocks; stem = layer 0, block i = i + 1, head = depth + 1

    def scale(name):
        if name.startswith(("visual.class_embedding", "visual.positional_embedding", "visual.conv1", "visual.ln_pre")):
            return 0.5 ** (depth + 1)
        if name.startswith("visual.transformer.resblocks."):
            return 0.5 ** (depth - int(name.split(".")[3]))
        assert name.startswith(("fc_norm", "head")), name
        return 1.0

    seen = []
    for g in ft.engine.optimizer.param_groups:
        for p in g["params"]:
            name = names[id(p)]
            seen.append(name)
            assert g["lr"] == pytest.approx(peak * scale(name), rel=1e-9), name
            no_decay = p.ndim <= 1 or name in ("visual.class_embedding", "visual.positional_embedding")
            assert g["weight_decay"] == (0.0 if no_decay else 0.05), name
    trainable = [n for n, p in ft.model.named_parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable) and "visual.conv1.weight" not in seen  # frozen (FT-CLIP at 224)
    assert {scale(n) for n in seen} == {0.125, 0.25, 0.5, 1.0}


def test_ema_update_follows_the_formula(folder, tmp_path):
    ft = FinetuneTask(fcfg(tmp_path, folder, ema_decay=0.9, steps=6, base_lr=1e-2))
    it = iter(train_loader(ft.dataset, ft.sampler, 0, False))
    for step in range(4):
        images, labels, index = next(it)
        ft.engine.scheduler.step_update(ft.engine.step)
        before = {k: v.clone() for k, v in ft.engine.ema.module.state_dict().items()}
        ft.engine.forward_backward((images, labels, index, 0))
        ft.engine.optimizer_step()
        d = 0.0 if step < 2 else 0.9  # timm's ModelEmaV3 copies the model on its first updates
        model, ema = ft.model.state_dict(), ft.engine.ema.module.state_dict()
        for k, v in ema.items():
            if v.is_floating_point():
                torch.testing.assert_close(v, d * before[k] + (1 - d) * model[k], rtol=1e-5, atol=1e-7)
    assert not torch.equal(ema["head.weight"], model["head.weight"])


def test_flyp_loss_is_clip_loss_on_prompt_captions(folder, tmp_path):
    ft = FinetuneTask(fcfg(tmp_path, folder, mode="flyp", templates="simple"))
    images, labels, index = _batch(ft)
    loss = ft.engine.loss((images, labels, index, 0))
    tids = ft.template_ids(0, index)
    templates = templates_of("simple")
    captions = [templates[int(t)](ft.classnames[int(y)]) for y, t in zip(labels, tids)]
    tok = open_clip.get_tokenizer(TINY_TEACHER)
    with torch.no_grad():
        img = ft.model.encode_image(images, normalize=True)
        txt = ft.model.encode_text(tok(captions), normalize=True)
        scale = ft.model.logit_scale.exp()
    logits = scale * img @ txt.T
    target = torch.arange(len(labels))
    by_hand = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    torch.testing.assert_close(loss.detach(), by_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.detach(), open_clip.ClipLoss()(img, txt, scale), rtol=1e-5, atol=1e-6)
    every = torch.arange(len(ft.dataset))
    assert torch.equal(ft.template_ids(1, every), ft.template_ids(1, every))
    assert not torch.equal(ft.template_ids(0, every), ft.template_ids(1, every))  # a new draw per epoch


@pytest.mark.parametrize("start, clamped", [(np.log(150.0), np.log(100.0)), (-0.5, 0.0)])
def test_flyp_clamps_the_logit_scale_to_0_ln100_after_each_step(folder, tmp_path, start, clamped):
    """open_clip's trainer: ``logit_scale.clamp_(0, ln 100)`` after every update, so the
    temperature never passes 100 (the scale is stored as its log)."""
    ft = FinetuneTask(fcfg(tmp_path, folder, mode="flyp", templates="simple"))
    with torch.no_grad():
        ft.model.logit_scale.fill_(start)
    ft.engine.forward_backward(next(ft.stream()))
    ft.engine.optimizer_step()
    assert ft.model.logit_scale.item() == pytest.approx(clamped, abs=1e-6)


def test_zero_shot_head_is_the_normalised_mean_of_template_embeddings():
    names = ["cat", "dog", "red car"]
    templates = templates_of("simple")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # init_model's init_seed
        clip = create_openclip(TINY_TEACHER, None)
    tok = open_clip.get_tokenizer(TINY_TEACHER)
    w = zeroshot_weights(clip, tok, names, templates)
    with torch.no_grad():
        for c, name in enumerate(names):
            mean = F.normalize(clip.encode_text(tok([t(name) for t in templates])), dim=-1).mean(0)
            torch.testing.assert_close(w[:, c], mean / mean.norm(), rtol=1e-5, atol=1e-6)
    model, spec = init_model(model=TINY_TEACHER, pretrained=None, random_init=True, student=None,
                             kind="classifier", classnames=names, head="zeroshot", templates="simple",
                             resolution=None, drop_path=0.0)
    torch.testing.assert_close(model.head.weight.detach(), clip.logit_scale.exp().detach() * w.T)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        cos = F.normalize(clip.encode_image(x), dim=-1) @ w
        torch.testing.assert_close(model.eval()(x), clip.logit_scale.exp() * cos, rtol=1e-4, atol=1e-5)


def _coloured_classes(root: Path, per_class: int = 4) -> Path:
    """4 classes told apart by colour (red, green, blue, grey), with per-image noise."""
    rng = np.random.default_rng(0)
    for c, rgb in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200), (128, 128, 128)]):
        (root / f"class_{c:03d}").mkdir(parents=True)
        for i in range(per_class):
            img = np.clip(np.array(rgb) + rng.normal(0, 25, (72, 80, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"class_{c:03d}" / f"{i}.png")
    return root


def test_a_few_finetuning_steps_reduce_the_loss(tmp_path):
    data = _coloured_classes(tmp_path / "images")
    r = finetune(fcfg(tmp_path / "run", data, steps=30, base_lr=3e-3, warmup_steps=2))
    first, last = np.mean(r.losses[:3]), np.mean(r.losses[-5:])
    assert last < 0.8 * first, r.losses
    assert r.losses[0] == pytest.approx(np.log(4), abs=0.02)  # FT-CLIP's near-zero head: uniform at start
    spec = json.loads((tmp_path / "run" / "model.json").read_text())["spec"]
    assert spec["classnames"] == ["class 000", "class 001", "class 002", "class 003"]


def test_a_distilled_student_starts_finetuning_from_its_weights(student, folder, tmp_path):
    ft = FinetuneTask(fcfg(tmp_path, folder, student_run=str(student), model=None, random_init=None, drop_path=0.1))
    state = load_file(str(student / "model.safetensors"))
    m = ft.model
    assert torch.equal(m.patch_embed.proj.weight, state["patch_embed.proj.weight"])
    assert torch.equal(m.blocks[1].mlp.fc2.weight, state["blocks.1.mlp.fc2.weight"])
    for blk in m.blocks:  # FD fine-tuning: the shared relative position bias, copied into each block
        assert torch.equal(blk.attn.relative_position_bias_table, state["rel_pos_bias.relative_position_bias_table"])
    assert m.head.out_features == 4 and m.global_pool == "avg" and isinstance(m.fc_norm, torch.nn.LayerNorm)
    assert m.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    spec = ft.spec  # what model.json records: a classifier with a fresh head, its size from the built model
    assert (spec.kind, spec.source, spec.head, spec.pretrained) == ("classifier", "student", "fresh", student.name)
    assert spec.resolution == m.patch_embed.img_size[0]


def test_resume_is_exact_with_mixup_drop_path_randaugment_and_ema(student, folder, tmp_path):
    kw = dict(student_run=str(student), model=None, random_init=None, steps=6, mixup=0.8, cutmix=1.0, drop_path=0.1,
              ema_decay=0.9, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, label_smoothing=0.1,
              layer_decay=0.75, clip_grad=5.0)
    a = finetune(fcfg(tmp_path / "a", folder, **kw))
    b1 = finetune(fcfg(tmp_path / "b", folder, run_steps=4, **kw))  # stops inside epoch 2 (4 steps/epoch)
    assert b1.export is None
    b2 = finetune(fcfg(tmp_path / "b", folder, resume=True, workers=2, **kw))  # worker processes too
    assert a.losses == b1.losses + b2.losses
    for f in ("model.safetensors", "model_ema.safetensors"):
        wa, wb = load_file(str(tmp_path / "a" / f)), load_file(str(tmp_path / "b" / f))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f


# -- evaluation and WiSE-FT ------------------------------------------------------------
def _hand_count(model, spec, root: Path, columns=None):
    tf = eval_transform(spec.resolution, spec.mean, spec.std, spec.crop_pct)
    classes = sorted(p.name for p in root.iterdir())
    c1 = c5 = n = 0
    for label, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            with Image.open(f) as im:
                x = tf(ImageOps.exif_transpose(im).convert("RGB"))
            with torch.no_grad():
                logits = model(x[None])[0]
            if columns is not None:
                logits = logits[columns]
            order = logits.argsort(descending=True).tolist()
            c1 += order[0] == label
            c5 += label in order[:5]
            n += 1
    return c1, c5, n


def test_eval_equals_a_hand_count_and_scores_class_subsets(tmp_path):
    root = make_image_folder(tmp_path / "val", classes=8, per_class=2, seed=5)
    names = [f"class {i:03d}" for i in range(8)]
    model, spec = init_model(model=TINY_TEACHER, pretrained=None, random_init=True, student=None,
                             kind="classifier", classnames=names, head="fresh", templates="simple",
                             resolution=None, drop_path=0.0)
    torch.nn.init.normal_(model.head.weight, std=1.0)  # spread the logits
    spec = replace(spec, crop_pct=0.875)
    model.eval()
    r = evaluate(model, spec, [str(root)], batch_size=5, workers=0)["val"]
    c1, c5, n = _hand_count(model, spec, root)
    assert (r["correct1"], r["correct5"], r["n"]) == (c1, c5, n) == (c1, c5, 16)
    assert r["top1"] == c1 / 16
    sub = tmp_path / "shift"  # a shifted set with 3 of the 8 classes (as ImageNet-R/-A hold a subset)
    for i in (1, 4, 6):
        shutil.copytree(root / f"class_{i:03d}", sub / f"class_{i:03d}")
    r = evaluate(model, spec, [str(sub)], batch_size=4, workers=0)["shift"]
    c1, _, n = _hand_count(model, spec, sub, columns=[1, 4, 6])
    assert (r["correct1"], r["n"], r["correct5"]) == (c1, n, n)


def test_eval_of_a_class_the_model_never_saw_is_refused(folder, tmp_path):
    model, spec = init_model(model=TINY_TEACHER, pretrained=None, random_init=True, student=None,
                             kind="classifier", classnames=["a", "b"], head="fresh", templates="simple",
                             resolution=None, drop_path=0.0)
    with pytest.raises(FdcacheError, match="does not know"):
        evaluate(model, spec, [str(folder)], workers=0)


@pytest.fixture(scope="module")
def zs_run(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("zs") / "run"
    finetune(fcfg(out, folder, head="zeroshot", templates="simple", steps=3, base_lr=1e-2, ema_decay=0.5))
    return out


def test_wise_endpoints_are_the_models_and_the_middle_their_mean(zs_run, tmp_path):
    paths = wise(zs_run / "init", zs_run, [0.0, 0.5, 1.0], tmp_path / "w", ema=False)
    zs, ft = (load_file(str(p / "model.safetensors")) for p in (zs_run / "init", zs_run))
    w0, wh, w1 = (load_file(str(p / "model.safetensors")) for p in paths)
    assert any(not torch.equal(zs[k], ft[k]) for k in zs)  # the run moved the weights
    for k in zs:
        assert torch.equal(w0[k], zs[k]) and torch.equal(w1[k], ft[k]), k
        torch.testing.assert_close(wh[k], (zs[k] + ft[k]) / 2)
    model, spec, _ = load_export(paths[1])  # loadable, and the default takes the EMA end when kept
    assert spec.head == "zeroshot"
    for alpha, p in zip([0.0, 0.5, 1.0], paths):  # each export says what it mixes
        assert json.loads((p / "model.json").read_text())["wise"] == {
            "alpha": alpha, "zeroshot": str(zs_run / "init"), "finetuned": str(zs_run),
            "finetuned_weights": "model.safetensors"}
    ema = load_file(str(zs_run / "model_ema.safetensors"))
    (mid,) = wise(zs_run / "init", zs_run, [0.5], tmp_path / "w_ema")
    torch.testing.assert_close(load_file(str(mid / "model.safetensors"))["head.weight"],
                               (zs["head.weight"] + ema["head.weight"]) / 2)


def test_the_wise_command_mixes_the_ema_weights_unless_told_not_to(zs_run, tmp_path):
    """``fdcache wise`` (sweep): by default the fine-tuned end is the run's EMA weights, with
    --no-ema its raw weights; the alpha 0.5 export is the mean of the ends, by hand."""
    from fdcache.tune.wise import sweep

    zs, ft, ema = (load_file(str(p)) for p in (zs_run / "init" / "model.safetensors",
                                                zs_run / "model.safetensors", zs_run / "model_ema.safetensors"))
    assert not torch.equal(ft["head.weight"], ema["head.weight"])
    for kw, end in (({}, ema), ({"ema": False}, ft)):
        ((alpha, path, results),) = sweep(zs_run / "init", zs_run, [0.5], tmp_path / f"w{len(kw)}", **kw)
        assert alpha == 0.5 and results is None
        torch.testing.assert_close(load_file(str(path / "model.safetensors"))["head.weight"],
                                   (zs["head.weight"] + end["head.weight"]) / 2)


def test_wise_refuses_models_that_differ(zs_run, folder, tmp_path):
    other = tmp_path / "fresh"
    finetune(fcfg(other, folder, steps=1))
    with pytest.raises(FdcacheError, match="differ"):
        wise(zs_run / "init", other, [0.5], tmp_path / "w")
    with pytest.raises(FdcacheError, match=r"no zero-shot end to interpolate with. WiSE-FT needs a run started with "
                       r"--head zeroshot, or an fdcache flyp run \(both write OUT/init\)$"):  # a fresh head: no init/
        wise(other / "init", other, [0.5], tmp_path / "w")
    with pytest.raises(FdcacheError, match=r"\[0, 1\]"):
        wise(zs_run / "init", zs_run, [1.5], tmp_path / "w")


# -- bad input --------------------------------------------------------------------------
def test_a_corrupt_image_stops_finetuning_naming_it(folder, tmp_path):
    data = Path(shutil.copytree(folder, tmp_path / "images"))
    bad = sorted((data / "class_002").glob("*.jpg"))[0]
    bad.write_bytes(bad.read_bytes()[:200])
    for workers in (0, 2):
        with pytest.raises(DataError, match=bad.name) as e:
            finetune(fcfg(tmp_path / f"run{workers}", data, steps=8, workers=workers))
        assert str(e.value).startswith("cannot read image") and "Traceback" not in str(e.value)


def test_resume_with_other_classes_is_refused(folder, tmp_path):
    finetune(fcfg(tmp_path / "run", folder, steps=4, run_steps=1))
    other = make_image_folder(tmp_path / "other", classes=3, per_class=4)
    with pytest.raises(FdcacheError, match="another model"):
        finetune(fcfg(tmp_path / "run", other, steps=4, resume=True))


@pytest.mark.parametrize("kw,message", [
    (dict(head="zeroshot", student_run="S", model=None, random_init=None), "no text tower"),
    (dict(mode="flyp", model="timm:vit_tiny_patch16_224"), "no text tower"),
    (dict(model=TINY_TEACHER, random_init=None), "--random-init"),
    (dict(drop_path=0.1), "no drop path"),
    (dict(epochs=None, steps=None), "--epochs"),
])
def test_impossible_settings_are_refused_clearly(folder, student, tmp_path, kw, message):
    if kw.get("student_run") == "S":
        kw = kw | {"student_run": str(student)}
    cfg = fcfg(tmp_path, folder, **kw)
    if "steps" in kw:
        cfg.steps = cfg.epochs = None
    with pytest.raises(FdcacheError, match=message):
        FinetuneTask(cfg)


def test_presets_cite_their_sources_and_name_only_known_settings():
    assert {"ft-clip-vit-b16", "ft-clip-vit-l14", "fd-finetune-vit-b16", "flyp-imagenet"} <= set(preset_names())
    for name in preset_names():
        p = load_preset(name)
        assert p["source"] and p["mode"] in ("finetune", "flyp")
        make_config(name, out="o", data="d", mode=p["mode"])  # raises on an unknown key
    b16 = make_config("ft-clip-vit-b16", out="o", data="d", mode="finetune", random_init=True, model="ViT-B-16")
    assert (b16.base_lr, b16.lr_batch, b16.layer_decay, b16.ema_decay, b16.epochs, b16.pretrained) == \
        (6e-4, 2048, 0.6, 0.9998, 50, None)
    with pytest.raises(FdcacheError, match="flyp preset"):
        make_config("flyp-imagenet", out="o", data="d", mode="finetune")


def test_labeled_images_repeat_their_augmentation_per_epoch_and_index(folder):
    from fdcache.tune.imagefolder import train_transform

    tf = train_transform("timm", 64, (0.5,) * 3, (0.5,) * 3, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5)
    import random

    ds = LabeledImages(folder, tf, seed=3)
    torch.manual_seed(123)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    a = ds[(1, 5)][0]
    after = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1])
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and np.array_equal(before[2], after[2])
    torch.manual_seed(7)  # another caller state: the sample's pixels do not depend on it
    assert torch.equal(a, ds[(1, 5)][0])
    assert not torch.equal(a, ds[(2, 5)][0])  # a new draw per epoch


def test_randaugment_posterize_at_full_magnitude_gives_black_not_an_error():
    from fdcache.tune.imagefolder import train_transform

    tf = train_transform("timm", 32, (0.5,) * 3, (0.5,) * 3, auto_augment="rand-m10-n1-inc1")
    ops = [op for t in tf.transforms for op in getattr(t, "ops", []) if op.name == "PosterizeIncreasing"]
    assert ops, "timm's increasing-posterize op is in the policy"
    op = ops[0]
    op.prob, op.magnitude_std = 1.0, 0.0
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    assert np.asarray(op(img)).max() == 0  # 0 bits kept: black, as with the Pillow of the recipes


def test_two_process_flyp_matches_one_process_on_the_same_global_batch(image_root, tmp_path):
    """DDP + ClipLoss gathering features across ranks == one process with the whole batch."""
    args = ["flyp", "--model", TINY_TEACHER, "--random-init", "--classnames", "folder", "--templates", "simple",
            "--data", str(image_root), "--steps", "3", "--warmup-steps", "1", "--lr", "1e-3", "--lr-batch", "8",
            "--workers", "0", "--log-every", "1"]
    one_and_two_processes(args, 4, tmp_path)
    a, b = ([json.loads(x)["loss"] for x in open(tmp_path / d / "log.jsonl")] for d in ("one", "two"))
    assert len(a) == len(b) == 3
    np.testing.assert_allclose(a, b, rtol=1e-4)
    wa, wb = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    for k in wa:
        x, y = wa[k], wb[k]
        if k.endswith("in_proj_bias"):
            # The key bias has a zero gradient in exact arithmetic (softmax ignores a shift);
            # Adam turns its rounding noise into steps of up to lr, different per layout.
            d = x.shape[0] // 3
            assert (x[d:2 * d] - y[d:2 * d]).abs().max() <= 3 * 1e-3 * 1.01
            x, y = torch.cat([x[:d], x[2 * d:]]), torch.cat([y[:d], y[2 * d:]])
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=k)


def test_a_clip_checkpoint_loads_into_the_timm_form_and_pools_as_ft_clip(tmp_path):
    """--model timm:<clip vit> --pretrained FILE: an open_clip checkpoint loads (strictly) and the
    pooled feature is FT-CLIP's: the final norm on each patch token, then their mean."""
    from fdcache.tune.classifiers import ModelSpec, build

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip = create_openclip(TINY_TEACHER, None).eval()
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    arch = dict(depth=2, embed_dim=64, num_heads=2, img_size=64)  # the tiny CLIP's tower in timm's terms
    spec = ModelSpec(kind="classifier", source="timm", name="vit_base_patch16_clip_224", resolution=64,
                     mean=(0.5,) * 3, std=(0.5,) * 3, classnames=("a", "b", "c"),
                     timm_kwargs={"global_pool": "avg", "fc_norm": False, "drop_path_rate": 0.0} | arch)
    model = build(spec, pretrained=str(tmp_path / "clip.pt")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        v = clip.visual
        want = v.ln_post(v.transformer(v._embeds(x))[:, 1:]).mean(1)
        got = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert model.head.out_features == 3


def test_val_sets_are_scored_after_each_epoch_and_at_the_end(folder, tmp_path):
    # 4 micro-batches per epoch, 3 per step: epoch 0 ends inside step 2, the run after step 3.
    r = finetune(fcfg(tmp_path / "run", folder, steps=3, accum_steps=3, val=[str(folder)], ema_decay=0.5))
    assert [e["epoch"] for e in r.evals] == [0, 2] and [e["step"] for e in r.evals] == [2, 3]
    logged = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl") if '"eval"' in line]
    assert logged == r.evals
    last = logged[-1]["eval"]
    assert set(last) == {"model", "ema"} and last["model"]["images"]["n"] == 16
    assert json.loads((tmp_path / "run" / "model.json").read_text())["eval"] == logged[-1]


def test_flyp_resume_is_exact(folder, tmp_path):
    kw = dict(mode="flyp", templates="simple", steps=5, base_lr=1e-3)
    a = finetune(fcfg(tmp_path / "a", folder, **kw))
    b1 = finetune(fcfg(tmp_path / "b", folder, run_steps=2, **kw))
    b2 = finetune(fcfg(tmp_path / "b", folder, resume=True, **kw))
    assert a.losses == b1.losses + b2.losses
    wa, wb = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bf16_autocast_runs_the_model_in_bf16_and_tracks_fp32(folder, tmp_path):
    """The GPU default (bf16 autocast), run through the same code on CPU."""
    f32 = FinetuneTask(fcfg(tmp_path / "a", folder, amp="none"))
    bf16 = FinetuneTask(fcfg(tmp_path / "b", folder, amp="bf16"))
    dtypes = []
    bf16.model.head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    images, labels, index = _batch(f32)
    want = f32.engine.loss((images, labels, index, 0))
    got = bf16.engine.loss((images, labels, index, 0))
    assert dtypes == [torch.bfloat16] and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=0)


def test_imagenet_class_names_follow_wnid_order_or_numeric_index_folders(tmp_path):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    from fdcache.tune.imagefolder import classnames_for

    wnids = [f"n{i:08d}" for i in range(1000)]  # sorted WordNet ids: names in open_clip's order
    assert classnames_for(wnids, "imagenet") == list(IMAGENET_CLASSNAMES)
    # ImageNet-V2 style folders "0".."999" sort as text ("0", "1", "10", "100", ...): names by index
    numeric = sorted(str(i) for i in range(1000))
    names = classnames_for(numeric, "imagenet")
    assert names[:3] == [IMAGENET_CLASSNAMES[0], IMAGENET_CLASSNAMES[1], IMAGENET_CLASSNAMES[10]]
    assert classnames_for(["7", "3"], "imagenet") == [IMAGENET_CLASSNAMES[7], IMAGENET_CLASSNAMES[3]]
    with pytest.raises(DataError, match="1000"):
        classnames_for(wnids[:10], "imagenet")
    mapping = tmp_path / "names.json"
    mapping.write_text(json.dumps({"n1": "goldfish", "n2": "shark"}))
    assert classnames_for(["n1", "n2"], str(mapping)) == ["goldfish", "shark"]
    with pytest.raises(DataError, match="n3"):
        classnames_for(["n1", "n3"], str(mapping))


def test_non_finite_loss_stops_with_the_step_and_a_checkpoint(folder, tmp_path):
    from fdcache.tune.finetune import FinetuneError

    ft = FinetuneTask(fcfg(tmp_path / "r", folder, steps=3))
    with torch.no_grad():
        ft.model.head.bias[0] = float("nan")
    with pytest.raises(FinetuneError, match="at step 1"):
        ft.fit()
    assert (tmp_path / "r" / "checkpoints" / "nonfinite-step1.pt").exists()


@pytest.mark.parametrize("mode", ["finetune", "flyp"])
def test_sigint_at_a_random_step_then_resume_gives_bit_identical_weights(folder, tmp_path, monkeypatch, mode):
    from fdcache.engine import Interrupted

    kw = dict(mode=mode, templates="simple", steps=6, base_lr=1e-3, ema_decay=0.9, drop_path=0.0)
    a = finetune(fcfg(tmp_path / "a", folder, **kw))
    k = int(np.random.default_rng(7 if mode == "flyp" else 3).integers(1, 6))  # a fixed draw
    interrupt_at(monkeypatch, k)
    with pytest.raises(Interrupted, match=f"at step {k}/6") as e:
        finetune(fcfg(tmp_path / "b", folder, **kw))
    assert e.value.exit_code == 130
    monkeypatch.undo()
    b = finetune(fcfg(tmp_path / "b", folder, resume=True, **kw))
    assert b.steps == 6 and a.losses[k:] == b.losses
    for f in ("model.safetensors", "model_ema.safetensors"):
        wa, wb = load_file(str(tmp_path / "a" / f)), load_file(str(tmp_path / "b" / f))
        assert all(torch.equal(wa[n], wb[n]) for n in wa), f
    steps = [json.loads(x)["step"] for x in open(tmp_path / "b" / "log.jsonl")]
    assert steps == list(range(1, 7))


def test_loader_workers_outlive_a_ctrl_c_so_the_step_in_flight_can_finish(folder):
    """A terminal's Ctrl-C reaches the workers too; the main process decides when to stop."""
    import os
    import signal

    from fdcache.tune.imagefolder import EpochSampler

    ds = LabeledImages(folder, eval_transform(32, (0.5,) * 3, (0.5,) * 3, 1.0))
    it = iter(train_loader(ds, EpochSampler(len(ds), 4, seed=0), 1, False))
    next(it)
    for w in it._workers:
        os.kill(w.pid, signal.SIGINT)
    assert len([next(it) for _ in range(3)]) == 3  # the rest of the epoch still arrives


def test_ctrl_c_reaching_the_loader_workers_too_still_stops_cleanly_and_resumes_exactly(folder, tmp_path,
                                                                                       monkeypatch):
    from fdcache.engine import Interrupted

    kw = dict(steps=6, workers=2, base_lr=1e-3)
    a = finetune(fcfg(tmp_path / "a", folder, **kw))
    interrupt_at(monkeypatch, 3, children=True)
    with pytest.raises(Interrupted, match="at step 3/6"):
        finetune(fcfg(tmp_path / "b", folder, **kw))
    monkeypatch.undo()
    b = finetune(fcfg(tmp_path / "b", folder, resume=True, **kw))
    assert a.losses[3:] == b.losses
    wa, wb = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_length_given_replaces_the_presets_length(tmp_path, monkeypatch):
    """A preset that fixes steps, run with --epochs, trains for those epochs (and the other way
    round): the caller's length replaces the preset's instead of meeting it as 'not both'."""
    import fdcache.tune.finetune as ftmod
    from fdcache.config import FinetuneConfig

    (tmp_path / "by-steps.json").write_text(json.dumps({"mode": "finetune", "values": {"steps": 100}}))
    (tmp_path / "by-epochs.json").write_text(json.dumps({"mode": "finetune", "values": {"epochs": 7}}))
    monkeypatch.setattr(ftmod, "PRESET_DIR", tmp_path)
    cfg = make_config("by-steps", out="o", data="d", epochs=2)
    assert (cfg.epochs, cfg.steps) == (2, FinetuneConfig.steps)
    cfg = make_config("by-epochs", out="o", data="d", steps=5)
    assert (cfg.epochs, cfg.steps) == (FinetuneConfig.epochs, 5)
    cfg = make_config("by-steps", out="o", data="d")
    assert cfg.steps == 100


def test_a_starting_point_given_replaces_the_presets(tmp_path, monkeypatch):
    """A preset's random_init gives way to --pretrained or --model; its model and pretrained
    give way to --student-run, and its pretrained to --random-init."""
    import fdcache.tune.finetune as ftmod

    (tmp_path / "rand.json").write_text(json.dumps({"mode": "finetune", "values": {"random_init": True}}))
    (tmp_path / "oa.json").write_text(json.dumps({"mode": "finetune", "values": {"model": "ViT-B-16",
                                                                                  "pretrained": "openai"}}))
    monkeypatch.setattr(ftmod, "PRESET_DIR", tmp_path)
    cfg = make_config("rand", out="o", data="d", pretrained="openai")
    assert (cfg.random_init, cfg.pretrained) == (False, "openai")
    cfg = make_config("rand", out="o", data="d", model="ViT-B-32")
    assert (cfg.random_init, cfg.model) == (False, "ViT-B-32")
    cfg = make_config("oa", out="o", data="d", random_init=True)
    assert (cfg.random_init, cfg.pretrained, cfg.model) == (True, None, "ViT-B-16")
    cfg = make_config("oa", out="o", data="d", student_run="run")
    assert (cfg.student_run, cfg.pretrained, cfg.model) == ("run", None, None)


def test_a_fresh_head_starts_as_ft_clips_truncated_normal_times_1e_3():
    """FT-CLIP's fresh head: weight ~ trunc_normal(std 0.02) scaled by init_scale 1e-3 (std
    2e-5), bias 0, and a LayerNorm (ones, zeros) before it. 64 x 100 weights: the sample std
    of 6,400 normals lies within 5% of 2e-5 at far beyond 3 sigma (its relative sd is 0.9%)."""
    from fdcache.tune.classifiers import CLIPImageClassifier

    torch.manual_seed(0)
    m = CLIPImageClassifier(create_openclip(TINY_TEACHER, None).visual, 100)
    w = m.head.weight.detach()
    assert w.shape == (100, 64)
    assert abs(w.std().item() / 2e-5 - 1) < 0.05 and abs(w.mean().item()) < 2e-6
    assert torch.equal(m.head.bias, torch.zeros(100))
    assert torch.equal(m.fc_norm.weight, torch.ones(64)) and torch.equal(m.fc_norm.bias, torch.zeros(64))


def test_each_logged_step_names_its_epoch(folder, tmp_path):
    """16 images at batch 4: four steps an epoch, so steps 1-4 are epoch 0 and 5-6 epoch 1."""
    finetune(fcfg(tmp_path / "r", folder, steps=6))
    log = [json.loads(line) for line in open(tmp_path / "r" / "log.jsonl")]
    assert [(r["step"], r["epoch"]) for r in log] == [(1, 0), (2, 0), (3, 0), (4, 0), (5, 1), (6, 1)]


@pytest.mark.parametrize("model", [TINY_TEACHER, "timm:vit_tiny_patch16_224"])
def test_freeze_patch_embed_keeps_the_patch_embedding_of_a_clip_or_timm_model(folder, tmp_path, model):
    """--freeze-patch-embed: after two steps the patch embedding (open_clip's conv1, timm's
    patch_embed) is bit-identical to its start, and the blocks moved."""
    ft = FinetuneTask(fcfg(tmp_path / "r", folder, model=model, steps=2, freeze_patch_embed=True))
    prefix = "visual.conv1." if model == TINY_TEACHER else "patch_embed."
    before = {k: v.clone() for k, v in ft.model.state_dict().items()}
    ft.fit()
    after = ft.model.state_dict()
    frozen = [k for k in before if prefix in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if "blocks" in k or "resblocks" in k)


def test_a_timm_models_input_size_mean_and_std_come_from_its_pretrained_config():
    """A timm CLIP tower's spec takes OpenAI CLIP's mean and std from timm's pretrained_cfg
    (not the 0.5 of a config without them), and its resolution from its patch embedding."""
    import timm

    from fdcache.tune.classifiers import ModelSpec, _with_timm_cfg

    net = timm.create_model("vit_base_patch16_clip_224.openai", pretrained=False, img_size=64, depth=1,
                            embed_dim=64, num_heads=2, num_classes=3)
    spec = ModelSpec(kind="classifier", source="timm", name="vit_base_patch16_clip_224", resolution=0, mean=(),
                     std=(), classnames=("a", "b", "c"))
    got = _with_timm_cfg(spec, net)
    assert got.resolution == 64
    assert got.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert got.std == pytest.approx((0.26862954, 0.26130258, 0.27577711))
    net.pretrained_cfg = {}  # a config without them: CLIP-style 0.5
    assert (_with_timm_cfg(spec, net).mean, _with_timm_cfg(spec, net).std) == ((0.5,) * 3, (0.5,) * 3)


def test_a_bad_auto_augment_policy_is_refused_before_the_run_starts(folder, tmp_path):
    out = tmp_path / "r"
    with pytest.raises(FdcacheError, match=r"^'rand-zz9' is not a timm augmentation policy \(--auto-augment\): give "
                                           r"one such as rand-m9-mstd0.5-inc1, or none \("):
        FinetuneTask(fcfg(out, folder, auto_augment="rand-zz9"))
    assert not out.exists() or not any(out.iterdir())


def test_a_finetune_export_records_its_steps_and_checkpoint(folder, tmp_path):
    finetune(fcfg(tmp_path / "r", folder, steps=3))
    meta = json.loads((tmp_path / "r" / "model.json").read_text())
    assert meta["steps"] == 3 and meta["checkpoint"] == "last.pt" and meta["eval"] is None


def test_wise_between_two_timm_runs_writes_a_timm_export_of_the_mean(folder, tmp_path):
    """WiSE-FT's interpolation between two fine-tuned timm models of one architecture (a soup of
    two runs): the alpha 0.5 export is their weights' mean and loads in timm by its folder."""
    import timm

    from fdcache.tune.wise import wise

    a, b = tmp_path / "a", tmp_path / "b"
    finetune(fcfg(a, folder, model="timm:vit_tiny_patch16_224", steps=1))
    finetune(fcfg(b, folder, model="timm:vit_tiny_patch16_224", steps=2))
    (mid,) = wise(a, b, [0.5], tmp_path / "w", ema=False)
    wa, wb, wm = (load_file(str(p / "model.safetensors")) for p in (a, b, mid))
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
    for k in wa:
        torch.testing.assert_close(wm[k], (wa[k] + wb[k]) / 2)
    net = timm.create_model(f"local-dir:{mid}", pretrained=True)
    assert net.num_classes == 4 and torch.equal(net.state_dict()["head.weight"], wm["head.weight"])


def test_a_students_finetuning_form_is_fds_mean_pooling_with_fc_norm():
    """FD fine-tunes a ViT student with mean pooling and fc_norm (not the CLS token), drop path
    as given; BEiT gets per-block relative position bias; Swin keeps its own head's mean pool.
    The export's own num_classes and pretrained_cfg_overlay are dropped."""
    import timm

    from fdcache.tune.classifiers import _student_kwargs

    given = {"depth": 2, "num_classes": 0, "pretrained_cfg_overlay": {"mean": (0.5,) * 3}}
    kw = _student_kwargs(given, "vit_tiny_patch16_224", 0.1)
    assert kw == {"depth": 2, "drop_path_rate": 0.1, "global_pool": "avg", "fc_norm": True}
    net = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3, **kw)
    assert net.global_pool == "avg" and not isinstance(net.fc_norm, torch.nn.Identity)
    assert _student_kwargs({}, "swin_tiny_patch4_window7_224", 0.0) == {"drop_path_rate": 0.0, "global_pool": "avg"}
    assert _student_kwargs({}, "beit_base_patch16_224", 0.2) == {
        "drop_path_rate": 0.2, "use_shared_rel_pos_bias": False, "use_rel_pos_bias": True, "use_fc_norm": True,
        "global_pool": "avg"}


def test_wise_interpolation_keeps_each_tensors_dtype_and_takes_integers_from_the_finetuned_end():
    """(1 - a) * zs + a * ft computed in float32 and returned in the tensor's own dtype (a
    half-precision export stays half); integer buffers (a step count) come from the fine-tuned
    end; the ends are copies. By hand."""
    from fdcache.tune.wise import interpolate

    zs = {"w": torch.tensor([1.0, 2.0], dtype=torch.float16), "b": torch.tensor([0.5], dtype=torch.bfloat16),
          "n": torch.tensor([3])}
    ft = {"w": torch.tensor([3.0, 6.0], dtype=torch.float16), "b": torch.tensor([1.5], dtype=torch.bfloat16),
          "n": torch.tensor([7])}
    mid = interpolate(zs, ft, 0.25)
    assert mid["w"].dtype == torch.float16 and torch.equal(mid["w"], torch.tensor([1.5, 3.0], dtype=torch.float16))
    assert mid["b"].dtype == torch.bfloat16 and torch.equal(mid["b"], torch.tensor([0.75], dtype=torch.bfloat16))
    assert torch.equal(mid["n"], torch.tensor([7]))
    end = interpolate(zs, ft, 0.0)
    assert torch.equal(end["w"], zs["w"]) and end["w"].data_ptr() != zs["w"].data_ptr()


def test_a_run_seed_past_32_bits_of_numpys_legacy_seed_still_starts(folder, tmp_path):
    """numpy's legacy seed is 32-bit: seed * 1000 + rank is taken modulo 2**32, so a large
    --seed starts a run instead of failing in np.random.seed."""
    ft = FinetuneTask(fcfg(tmp_path / "r", folder, seed=5_000_000))
    assert ft.cfg.seed == 5_000_000
    assert np.random.get_state()[1][0] == np.random.RandomState((5_000_000 * 1000) % 2**32).get_state()[1][0]


def test_openais_clip_weights_are_built_with_the_quickgelu_config_they_were_trained_with(monkeypatch):
    """--model ViT-B-16 --pretrained openai: open_clip's ViT-B-16 config lacks QuickGELU, so the
    tower is built as ViT-B-16-quickgelu (open_clip's docs) and the spec records that name. The
    download is replaced by the tiny CLIP (no network in tests); the name asked for is checked."""
    import fdcache.tune.classifiers as classifiers

    asked = []

    def offline(name, pretrained, resolution=None):
        asked.append((name, pretrained))
        return create_openclip(TINY_TEACHER, None, resolution)

    monkeypatch.setattr(classifiers, "create_openclip", offline)
    _, spec = init_model(model="ViT-B-16", pretrained="openai", random_init=False, student=None, kind="classifier",
                         classnames=["a", "b"], head="fresh", templates="openai", resolution=None, drop_path=0.0)
    assert asked == [("ViT-B-16-quickgelu", "openai")] and spec.name == "ViT-B-16-quickgelu"
