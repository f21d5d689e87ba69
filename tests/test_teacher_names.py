"""Model names as users type them: typos get suggestions, open_clip's hf-hub: form works, and
missing weights on a machine without network fail at once with what to do."""

import huggingface_hub.constants as hub
import pytest

from fdcache import models
from fdcache.distill.students import build_student
from fdcache.distill.teachers import load_teacher
from fdcache.errors import FdcacheError, TeacherError
from fdcache.models import openclip_name, parse_teacher_name


@pytest.mark.parametrize("name, pretrained, hint", [
    ("ViT-B-61", "openai", "did you mean ViT-B-16"),
    ("ViT-B-16", "opneai", "did you mean openai?"),
    ("timm:vit_base_patch16_clip_224x", "openai", "did you mean vit_base_patch16_clip_224"),
])
def test_a_mistyped_teacher_or_tag_gets_the_close_names(name, pretrained, hint):
    with pytest.raises(TeacherError, match=hint):
        load_teacher(name, pretrained)


def test_a_mistyped_student_gets_the_close_names():
    with pytest.raises(FdcacheError, match="did you mean fd-tiny"):
        build_student("fd-tiyn", 64)


def test_openai_weights_select_open_clips_quickgelu_config(tmp_path):
    assert openclip_name("ViT-B-16", "openai") == "ViT-B-16-quickgelu"  # trained with QuickGELU
    assert openclip_name("ViT-B-16", "laion2b_s34b_b88k") == "ViT-B-16"
    ckpt = tmp_path / "ViT-B-16.pt"
    ckpt.write_bytes(b"")
    assert openclip_name("ViT-B-16", str(ckpt)) == "ViT-B-16"  # a local file: the name as given


def test_hf_hub_names_are_open_clip_names_that_bring_their_weights():
    assert parse_teacher_name("hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K") == (
        "openclip", "hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K")
    with pytest.raises(TeacherError, match="brings its own weights"):
        load_teacher("hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K", "openai")


@pytest.mark.parametrize("name, pretrained", [("ViT-B-16", "openai"), ("hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K", None),
                                              ("timm:vit_tiny_patch16_224", "augreg_in21k")])
def test_uncached_weights_without_network_fail_at_once_with_the_offline_hint(name, pretrained, monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    with pytest.raises(TeacherError) as e:
        load_teacher(name, pretrained)
    assert "HF_HUB_OFFLINE=1" in str(e.value) and "not in the local Hugging Face cache" in str(e.value)
    assert len(str(e.value)) < 400
    assert hub.HF_HUB_OFFLINE is False  # offline only for that call
