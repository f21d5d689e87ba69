import pytest
import torch

from fdcache.distill.teachers import load_teacher
from fdcache.errors import TeacherError
from fdcache.models import TINY_TEACHER, parse_teacher_name


def test_teacher_tokens_are_post_norm_incl_cls_and_project_to_open_clips_embedding():
    import open_clip

    t = load_teacher(TINY_TEACHER, random_init=True, init_seed=3)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = open_clip.create_model(TINY_TEACHER)  # same seed, same weights
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    tokens = t(x)
    assert tokens.shape == (2, t.spec.tokens, t.spec.dim) == (2, 17, 64)
    # CLIP's image embedding is ln_post(tokens)[:, 0] @ proj: our CLS token must give it.
    with torch.no_grad():
        torch.testing.assert_close(tokens[:, 0] @ model.visual.proj, model.encode_image(x))


def test_spec_records_shapes_normalization_and_a_weights_hash():
    a = load_teacher(TINY_TEACHER, random_init=True, init_seed=0).spec
    b = load_teacher(TINY_TEACHER, random_init=True, init_seed=1).spec
    assert (a.resolution, a.patch, a.tokens, a.prefix_tokens, a.dim) == (64, 16, 17, 1, 64)
    assert a.weights_sha256 != b.weights_sha256 and a.init_seed == 0 and a.pretrained is None


def test_resolution_override_changes_the_token_grid():
    t = load_teacher(TINY_TEACHER, random_init=True, resolution=96)
    assert t.spec.tokens == (96 // 16) ** 2 + 1 and t(torch.zeros(1, 3, 96, 96)).shape[1] == t.spec.tokens


def test_local_checkpoint_loads_the_same_weights(tmp_path, tiny_teacher):
    import open_clip

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = open_clip.create_model(TINY_TEACHER)
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    t = load_teacher(TINY_TEACHER, str(path))
    assert t.spec.pretrained == "tiny.pt" and t.spec.init_seed is None
    assert t.spec.weights_sha256 == tiny_teacher.spec.weights_sha256


def test_timm_teacher_uses_forward_features():
    import timm

    t = load_teacher("timm:vit_tiny_patch16_224", random_init=True, resolution=32)
    assert t.spec.source == "timm" and t.spec.tokens == 5 and t.spec.dim == 192
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(t(x), m.forward_features(x))


def test_weights_must_be_chosen_explicitly():
    with pytest.raises(TeacherError, match="--random-init"):
        load_teacher(TINY_TEACHER)


@pytest.mark.parametrize("name", ["ViT-Nope-99", "timm:no_such_model", "hf:whatever"])
def test_unknown_teachers_are_clear_errors(name):
    with pytest.raises(TeacherError):
        load_teacher(name, random_init=True)


def test_teacher_name_parsing():
    assert parse_teacher_name("ViT-B-16") == ("openclip", "ViT-B-16")
    assert parse_teacher_name("open_clip:ViT-L-14") == ("openclip", "ViT-L-14")
    assert parse_teacher_name("timm:vit_base_patch16_clip_224") == ("timm", "vit_base_patch16_clip_224")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_teacher_runs_in_inference_mode_and_its_output_serves_as_a_loss_target(tiny_teacher, impl):
    from fdcache.kernels import fd_loss

    x = torch.randn(2, 3, tiny_teacher.spec.resolution, tiny_teacher.spec.resolution)
    target = tiny_teacher(x)
    assert target.is_inference()  # no autograd bookkeeping in the teacher
    pred = torch.randn(target.shape, requires_grad=True)
    fd_loss(pred, target, impl=impl).backward()
    assert torch.isfinite(pred.grad).all()
