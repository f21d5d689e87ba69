"""Exports load with timm's and open_clip's own calls, in a process that never imports fdcache,
and compute what fdcache's own loader computes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import extract_tiny
from safetensors.torch import load_file

from fdcache.distill.students import build_student
from fdcache.distill.train import TrainConfig, train
from fdcache.models import TINY_TEACHER
from fdcache.samples import make_image_folder
from fdcache.tune.classifiers import load_export
from fdcache.tune.finetune import finetune, make_config


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("ex") / "images", classes=3, per_class=3, seed=2)


@pytest.fixture(scope="module")
def student_run(folder, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("student")
    extract_tiny(folder, root / "s.zarr", batch_size=9, shard_size=9)
    train(TrainConfig(out=str(root / "run"), cache=str(root / "s.zarr"), student="fd-tiny", steps=2,
                      batch_size=3, warmup_steps=1, base_lr=0.5, loss_impl="torch", progress=False,
                      num_threads=2, ema_decay=0.5))
    return root / "run"


def _finetune(out, folder, **kw):
    base = dict(mode="finetune", model=TINY_TEACHER, random_init=True, steps=2, batch_size=3, lr_batch=3,
                base_lr=1e-2, warmup_steps=0, workers=0, progress=False, ema_decay=0.5, auto_augment="none",
                re_prob=0.0, label_smoothing=0.0, layer_decay=1.0, crop_pct=1.0)
    finetune(make_config(None, out=str(out), data=str(folder), **(base | kw)))
    return Path(out)


@pytest.fixture(scope="module")
def runs(student_run, folder, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("runs")
    flyp = _finetune(root / "flyp", folder, mode="flyp", ema_decay=0)
    zs = _finetune(root / "ft-zs", folder, head="zeroshot", templates="simple")
    from fdcache.tune.wise import wise

    return {"student": student_run, "zs": zs, "zs-wise": wise(zs / "init", zs, [0.5], root / "zs-wise")[0],
            "timm": _finetune(root / "ft-student", folder, student_run=str(student_run), model=None, random_init=None),
            "ftclip": _finetune(root / "ft-clip", folder, head="fresh"),
            "flyp": flyp, "wise": wise(flyp / "init", flyp, [0.5], root / "wise")[0]}


LOADER = """
import sys, torch, timm, open_clip
import torch.nn.functional as F
from safetensors.torch import load_file
runs = dict(arg.split("=", 1) for arg in sys.argv[3:])
x = torch.load(sys.argv[1])
out = {}
with torch.no_grad():
    m = timm.create_model("local-dir:" + runs["student"], pretrained=True).eval()
    cfg = timm.data.resolve_data_config(model=m)
    out["student"] = dict(tokens=m.forward_features(x), mean=cfg["mean"], std=cfg["std"], num_classes=m.num_classes)
    for name, folder in (("timm", runs["timm"]), ("ftclip", runs["ftclip"] + "/timm")):
        m = timm.create_model("local-dir:" + folder, pretrained=True).eval()
        r = dict(logits=m(x), labels=m.pretrained_cfg["label_names"])
        m.load_state_dict(load_file(folder + "/model_ema.safetensors"))
        out[name] = r | dict(ema=m(x))
    for name in ("flyp", "wise"):
        m, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + runs[name])
        tok = open_clip.get_tokenizer("local-dir:" + runs[name])
        m.eval()
        norm = [t for t in preprocess.transforms if type(t).__name__ == "Normalize"][0]
        out[name] = dict(image=m.encode_image(x), text=m.encode_text(tok(["a photo of a cat."])), mean=list(norm.mean))
    for name in ("zs", "zs-wise"):
        folder = runs[name] + "/open_clip"
        m, _, _ = open_clip.create_model_and_transforms("local-dir:" + folder)
        head = load_file(folder + "/head.safetensors")
        out[name] = dict(logits=F.normalize(m.eval().encode_image(x), dim=-1) @ head["weight"].T + head["bias"])
assert not any(m == "fdcache" or m.startswith("fdcache.") for m in sys.modules), "fdcache was imported"
torch.save(out, sys.argv[2])
"""


@pytest.fixture(scope="module")
def loaded(runs, tmp_path_factory) -> dict:
    """What a fresh interpreter that never imports fdcache computes from each export, with
    the libraries' plain calls (one process for all, to keep the test fast)."""
    tmp = tmp_path_factory.mktemp("plain")
    torch.save(_x(), tmp / "x.pt")
    r = subprocess.run([sys.executable, "-c", LOADER, str(tmp / "x.pt"), str(tmp / "out.pt"),
                        *(f"{k}={v}" for k, v in runs.items())],
                       capture_output=True, text=True, cwd=tmp, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(tmp / "out.pt")


def _x():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_a_student_loads_with_timm_local_dir_and_its_own_mean_std(runs, loaded):
    got, run = loaded["student"], runs["student"]
    ref, spec = build_student("fd-tiny", 64, resolution=64)  # fdcache's own builder, independent of config.json
    ref.backbone.load_state_dict(load_file(str(run / "model.safetensors")))
    with torch.no_grad():
        torch.testing.assert_close(got["tokens"], ref.backbone.eval().forward_features(_x()))
    assert got["num_classes"] == 0
    assert list(got["mean"]) == pytest.approx(spec.mean) and list(got["std"]) == pytest.approx(spec.std)
    cfg = json.loads((run / "config.json").read_text())
    exp = cfg["fdcache"]["export"]  # what the run was: its student, its steps (2), EMA weights
    assert (exp["kind"], exp["student"], exp["steps"], exp["ema"]) == ("student", "fd-tiny", 2, True)
    assert "tag" not in cfg["pretrained_cfg"]  # not beit_base's in22k weights


@pytest.mark.parametrize("name", ["timm", "ftclip"])
def test_a_timm_form_finetune_and_an_ftclip_fresh_head_load_with_timm_local_dir(runs, loaded, name):
    """A fine-tuned student (timm's own model) and FT-CLIP's fresh head on an open_clip tower
    (converted to timm's CLIP ViT in RUN/timm): final and EMA weights, and the class names."""
    got, run = loaded[name], runs[name]
    for ema, key in ((False, "logits"), (True, "ema")):
        ref, spec, _ = load_export(run, ema=ema)
        with torch.no_grad():
            torch.testing.assert_close(got[key], ref.eval()(_x()), rtol=1e-4, atol=1e-5)
    assert got["labels"] == list(spec.classnames)
    folder = run / "timm" if name == "ftclip" else run
    assert json.loads((run / "model.json").read_text())["loads_with"] == [
        f"timm.create_model('local-dir:{folder}', pretrained=True)"]


@pytest.mark.parametrize("name", ["flyp", "wise"])
def test_a_flyp_run_and_its_wise_mix_load_with_open_clip_local_dir(runs, loaded, name):
    import open_clip

    got = loaded[name]
    ref, spec, _ = load_export(runs[name])
    tok = open_clip.get_tokenizer(spec.name)
    with torch.no_grad():
        torch.testing.assert_close(got["image"], ref.eval().encode_image(_x()))
        torch.testing.assert_close(got["text"], ref.encode_text(tok(["a photo of a cat."])))
    assert got["mean"] == pytest.approx(spec.mean)


@pytest.mark.parametrize("name", ["zs", "zs-wise"])
def test_a_zero_shot_head_and_its_wise_mix_load_with_open_clip_and_their_head_file(runs, loaded, name):
    ref, _, _ = load_export(runs[name], ema=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded[name]["logits"], ref.eval()(_x()), rtol=1e-4, atol=1e-5)
    # the call model.json tells a user names the folder the loader above read (a sampled mutmut survivor)
    folder = Path(runs[name]) / "open_clip"
    assert folder.is_dir() and json.loads((Path(runs[name]) / "model.json").read_text())["loads_with"] == [
        f"open_clip.create_model_and_transforms('local-dir:{folder}') + head.safetensors"]


def test_a_timm_form_that_computes_something_else_is_not_written(monkeypatch, tmp_path):
    """An FT-CLIP export's timm form is run against the model on a probe image before it is
    written: a conversion that loses a weight (here the head's sign, injected) is refused,
    recorded in model.json, and no timm/ weights are left for timm to load."""
    from fdcache import exports
    from fdcache.tune.classifiers import init_model, save_export

    real = exports.openclip_to_timm_state

    def wrong_head(state, model):
        out = dict(real(state, model))
        out["head.weight"] = -out["head.weight"]
        return out

    monkeypatch.setattr(exports, "openclip_to_timm_state", wrong_head)
    model, spec = init_model(model=TINY_TEACHER, pretrained=None, random_init=True, student=None, kind="classifier",
                             classnames=["a", "b"], head="fresh", templates="openai", resolution=None, drop_path=0.0)
    with torch.no_grad():
        model.head.weight.normal_()  # FT-CLIP's fresh head starts near zero: make it matter
    with pytest.warns(UserWarning, match="not its timm/open_clip form"):
        save_export(tmp_path, spec, model)
    meta = json.loads((tmp_path / "model.json").read_text())
    assert "the timm form of this model computes something else than the model" in meta["library_form_error"]
    assert not (tmp_path / "timm" / "model.safetensors").exists()

def test_a_library_form_that_fails_leaves_fdcaches_export_whole(monkeypatch, tmp_path):
    from fdcache import exports
    from fdcache.errors import FdcacheError
    from fdcache.tune.classifiers import init_model, save_export

    def broken(*a, **k):
        raise FdcacheError("the timm form computes something else")

    monkeypatch.setattr(exports, "write_timm_from_openclip", broken)
    model, spec = init_model(model=TINY_TEACHER, pretrained=None, random_init=True, student=None, kind="classifier",
                             classnames=["a", "b"], head="fresh", templates="openai", resolution=None, drop_path=0.0)
    with pytest.warns(UserWarning, match="not its timm/open_clip form") as warned:
        save_export(tmp_path, spec, model)
    assert warned[0].filename == __file__  # the warning points at the caller of save_export
    meta = json.loads((tmp_path / "model.json").read_text())
    assert "computes something else" in meta["library_form_error"]
    ref, _, _ = load_export(tmp_path)  # fdcache's own export still loads
    assert torch.equal(ref.head.weight, model.head.weight)
