"""Token maps of any layout: a hierarchical timm teacher (Swin: ``[B, H, W, C]``) is stored as
its row-major grid with the grid recorded; Swin / SwinV2 students regress their last stage's
grid; older bindings (no grid fields) still open as the square ViT grid."""

import json
import math
import subprocess
import sys

import pytest
import torch
from fdcache.cli.app import app
from safetensors.torch import load_file
from typer.testing import CliRunner

from fdcache.distill.pixels import reference_pixels
from fdcache.distill.students import build_student
from fdcache.distill.teachers import load_teacher
from fdcache.distill.tokens import resize_token_grid
from fdcache.distill.train import DistillTask, TrainConfig, train
from fdcache.errors import ConfigError
from fdcache.store import Store
from fdcache.store.layout import TeacherSpec
from fdcache.tune.finetune import FinetuneTask, finetune, make_config

SWIN = "swin_tiny_patch4_window7_224"
# A few-hundred-thousand-parameter Swin: 4 stages of one block, windows of 4 (64 px -> grids
# 16, 8, 4, 2); the last stage's 2x2 grid is the map.
SWIN_ARGS = {"embed_dim": 24, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "window_size": 4}
SWINV2 = "swinv2_tiny_window8_256"


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _student_args(args: dict) -> dict:
    return {"student": SWINV2, "student_overrides": args}


def tcfg(out, **kw) -> TrainConfig:
    base = dict(steps=2, batch_size=4, warmup_steps=1, base_lr=0.5, loss_impl="torch", progress=False,
                num_threads=2, save_every=1000, drop_path=0.0, seed=3) | _student_args(SWIN_ARGS)
    return TrainConfig(out=str(out), **(base | kw))


@pytest.fixture(scope="module")
def swin_store(image_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("swin") / "s.zarr"
    args = [a for k, v in SWIN_ARGS.items() for a in ("--teacher-arg", f"{k}={json.dumps(v)}")]
    r = _cli("extract", image_root, "--out", out, "--teacher", f"timm:{SWIN}", "--random-init", "--resolution", 64,
             *args, "--batch-size", 6, "--shard-size", 6)
    assert r.exit_code == 0, r.output
    return out


def test_a_swin_teacher_store_records_its_grid_and_inspect_shows_it(swin_store):
    info = json.loads(_cli("inspect", swin_store, "--json", "-").output)
    assert info["grid"] == {"prefix_tokens": 0, "rows": 2, "cols": 2, "stride_px": 32.0}
    assert info["shape"]["tokens"] == 4 and info["shape"]["dim"] == 192
    assert info["teacher"]["model_args"] == SWIN_ARGS
    assert "0 prefix + 2x2 grid (32 px per token" in _cli("inspect", swin_store).output
    store = Store.open(str(swin_store))
    t = store.info.teacher
    assert (t.rows, t.cols, t.prefix_tokens, t.tokens) == (2, 2, 0, 4)
    # The stored map, reshaped by its recorded grid, is the teacher's [H, W, C] last stage
    # recomputed from the file and the recorded view.
    teacher = load_teacher(f"timm:{SWIN}", random_init=True, resolution=64, model_args=SWIN_ARGS)
    i = 5
    px = reference_pixels(store.manifest().abspath(i), store.views(0)[i], 64, t.mean, t.std)
    with torch.no_grad():
        ref = teacher.model.forward_features(torch.from_numpy(px)[None])[0]
    got = store.read(0, i, i + 1)[0][t.prefix_tokens:].reshape(t.rows, t.cols, t.dim)
    torch.testing.assert_close(got, ref.half().float(), rtol=2e-3, atol=2e-3)


def test_a_swin_teachers_map_is_its_last_stage_flattened_row_major():
    teacher = load_teacher(f"timm:{SWIN}", random_init=True, resolution=64, model_args=SWIN_ARGS)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        nhwc = teacher.model.forward_features(x)  # timm: [B, H, W, C] after the final norm
        got = teacher(x)
    assert nhwc.shape == (2, 2, 2, 192) and got.shape == (2, 4, 192)
    for r in range(2):
        for c in range(2):
            assert torch.equal(got[:, 2 * r + c], nhwc[:, r, c])


def test_a_binding_without_grid_fields_opens_as_the_square_vit_grid(tiny_store):
    store = Store.open(str(tiny_store))
    raw = store.info.teacher.to_dict()
    assert "rows" not in raw and "cols" not in raw and "model_args" not in raw  # ViT bindings unchanged
    t = TeacherSpec.from_dict(raw)
    assert (t.rows, t.cols) == (t.resolution // t.patch,) * 2 and t == store.info.teacher
    swin = TeacherSpec.from_dict(raw | {"name": "hier", "patch": 4, "rows": 2, "cols": 3, "prefix_tokens": 0,
                                        "tokens": 6})
    assert swin.to_dict()["rows"] == 2 and TeacherSpec.from_dict(swin.to_dict()) == swin
    with pytest.raises(ValueError, match="not 1 prefix"):
        TeacherSpec.from_dict(raw | {"tokens": 18})


def test_resize_keeps_rows_and_columns_apart():
    x = torch.randn(2, 1 + 4, 3)  # CLS + a 1x4 grid
    y = resize_token_grid(x, 1, (1, 4), (2, 4))  # rows double, columns stay
    assert torch.equal(y[:, 0], x[:, 0])
    torch.testing.assert_close(y[:, 1:5], x[:, 1:])
    torch.testing.assert_close(y[:, 5:9], x[:, 1:])


def test_swin_student_offline_step0_loss_equals_the_online_run(image_root, swin_store, tmp_path):
    off = DistillTask(tcfg(tmp_path / "off", cache=str(swin_store)))
    on = DistillTask(tcfg(tmp_path / "on", online=True, teacher=f"timm:{SWIN}", random_init=True,
                          teacher_args=SWIN_ARGS, resolution=64, data=str(image_root)))
    assert off.sspec.grid == on.sspec.grid == (2, 2) and off.sspec.prefix_tokens == 0
    b_off, b_on = next(off.stream()), next(on.stream())
    assert torch.equal(b_off.images, b_on.images)
    l_off, l_on = off.engine.forward_backward(b_off), on.engine.forward_backward(b_on)
    torch.testing.assert_close(l_off, l_on, rtol=2e-3, atol=0)  # the store's fp16 rounding only
    for (name, p), q in zip(off.model.named_parameters(), on.model.parameters()):
        assert p.grad is not None and q.grad is not None, name  # DDP needs every parameter used
        err = (p.grad - q.grad).norm() / q.grad.norm().clamp_min(1e-12)
        assert err < 5e-3, (name, err.item())


def test_a_student_grid_that_differs_from_the_teachers_is_named_before_any_step(swin_store, tmp_path):
    with pytest.raises(ConfigError, match=r"3x3 token grid.*2x2 grid: --resolution 64 gives the student a 2x2"):
        DistillTask(tcfg(tmp_path / "r", cache=str(swin_store), resolution=96))
    assert not (tmp_path / "r" / "log.jsonl").exists()
    r = _cli("train", "--cache", swin_store, "--student", SWINV2, "--resolution", 96, "--steps", 1,
             *[a for k, v in SWIN_ARGS.items() for a in ("--student-arg", f"{k}={json.dumps(v)}")],
             "--out", tmp_path / "cli")
    assert r.exit_code == 2 and "--resize-targets" in r.output


def test_prefix_tokens_must_match(swin_store, tmp_path):
    with pytest.raises(ConfigError, match="1 prefix token.*has 0 .*Swin"):
        DistillTask(tcfg(tmp_path / "r", cache=str(swin_store), student="fd-tiny", student_overrides={}))


def test_swin_student_exports_load_in_plain_timm_and_finetune_from_the_run(image_root, swin_store, tmp_path):
    run = tmp_path / "run"
    r = train(tcfg(run, cache=str(swin_store), resolution=96, resize_targets=True, drop_path=0.1))
    assert r.steps == 2
    state = load_file(r.export)
    assert not any(k.startswith("head") for k in state)
    ft = FinetuneTask(make_config("fd-finetune-vit-b16", mode="finetune", out=str(tmp_path / "ft"),
                                  data=str(image_root), student_run=str(run), steps=1, batch_size=4, workers=0,
                                  progress=False))
    assert torch.equal(ft.model.layers[3].blocks[0].attn.qkv.weight, state["layers.3.blocks.0.attn.qkv.weight"])
    assert torch.equal(ft.model.norm.weight, state["norm.weight"])  # Swin keeps its final norm
    finetune(ft.cfg)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    script = (  # a fresh interpreter: timm and torch only
        "import sys, timm, torch\n"
        "x = torch.load(sys.argv[1])\n"
        "out = {}\n"
        "for name in sys.argv[2:]:\n"
        "    m = timm.create_model('local-dir:' + name, pretrained=True).eval()\n"
        "    with torch.no_grad():\n"
        "        out[name] = m.forward_features(x) if name.endswith('run') else m(x)\n"
        "assert not any(k.startswith('fdcache') for k in sys.modules)\n"
        "torch.save(out, sys.argv[1] + '.out')\n")
    p = subprocess.run([sys.executable, "-c", script, str(tmp_path / "x.pt"), str(run), str(tmp_path / "ft")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = torch.load(tmp_path / "x.pt.out")
    backbone, _ = build_student(SWINV2, 192, resolution=96, overrides=SWIN_ARGS, drop_path=0.0)
    backbone = backbone.backbone.eval()
    backbone.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(out[str(run)], backbone.forward_features(x))
    assert out[str(tmp_path / "ft")].shape == (2, 3)


@pytest.mark.parametrize("name, prefix", [("timm:vit_small_patch16_224.dino", 1), ("timm:deit_tiny_patch16_224", 1)])
def test_dino_and_deit_teachers_extract_and_train_end_to_end(image_root, tmp_path, name, prefix):
    """FD's other teachers by their timm names (random init, one block, 32 px: no download)."""
    from fdcache.distill.extract import ExtractConfig, extract

    store = tmp_path / "s.zarr"
    extract(ExtractConfig(data=str(image_root), out=str(store), teacher=name, random_init=True, resolution=32,
                          teacher_args={"depth": 1}, batch_size=6, shard_size=6, progress=False, num_threads=2))
    t = Store.open(str(store)).info.teacher
    assert (t.prefix_tokens, t.rows, t.cols) == (prefix, 2, 2) and t.mean == pytest.approx((0.485, 0.456, 0.406))
    r = train(TrainConfig(out=str(tmp_path / "run"), cache=str(store), student="fd-tiny", steps=2, batch_size=4,
                          warmup_steps=1, loss_impl="torch", progress=False, num_threads=2))
    assert r.steps == 2 and all(math.isfinite(x) for x in r.losses)


def test_a_distilled_deit_has_two_prefix_tokens_and_a_cls_student_is_refused(image_root, tmp_path):
    t = load_teacher("timm:deit_tiny_distilled_patch16_224", random_init=True, resolution=32, model_args={"depth": 1})
    assert (t.spec.prefix_tokens, t.spec.rows, t.spec.tokens) == (2, 2, 6)
    with pytest.raises(ConfigError, match="fd-tiny has 1 prefix token.*has 2"):
        DistillTask(TrainConfig(out=str(tmp_path / "r"), online=True, teacher="timm:deit_tiny_distilled_patch16_224",
                                random_init=True, teacher_args={"depth": 1}, resolution=32, data=str(image_root),
                                student="fd-tiny", steps=1, batch_size=4, progress=False))


def test_swin_students_take_fds_drop_path_and_a_head_from_the_last_stage_width():
    model, spec = build_student(SWINV2, 96, resolution=64, overrides=SWIN_ARGS, drop_path=0.2, layer_scale=0.1)
    last = model.backbone.layers[3].blocks[-1]
    assert last.drop_path1.drop_prob == pytest.approx(0.2)  # timm's linear ramp ends at --drop-path
    assert model.head.in_features == 192 and spec.dim == 192 and spec.grid == (2, 2)
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 4, 96)
