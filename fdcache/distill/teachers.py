"""Teachers: an open_clip or timm image tower that maps images to its final token map.

Feature map = the last transformer block's tokens after the model's final norm (CLIP
``ln_post``), CLS (and any other prefix tokens) included, before the projection, as in
FD's reference code. Hierarchical timm models (Swin, SwinV2) give their last stage's
``[B, H, W, C]`` grid after their final norm, flattened row-major to ``[B, H * W, C]``
(:mod:`.tokens`). A :class:`TeacherSpec` describes it, grid included, and is stored in the
cache, so a cache can only be read with the teacher that wrote it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import TeacherError
from ..models import TINY_TEACHER, create_openclip, create_timm, openclip_name, parse_teacher_name
from ..store.layout import TeacherSpec
from .tokens import flat_tokens, token_layout

__all__ = ["TINY_TEACHER", "Teacher", "TeacherSpec", "load_teacher", "weights_sha256"]


def weights_sha256(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes() if v.dtype != torch.bfloat16
                 else v.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()


class Teacher(nn.Module):
    """``forward(images [B,3,R,R]) -> tokens [B, L, D]`` in eval mode, under inference_mode.

    Inference mode (no autograd, no version counters or view tracking) is safe because
    its outputs are only ever targets: stored (extract) or whitened inside the loss
    (train --online), never saved for a backward as they are."""

    def __init__(self, features: nn.Module, fn, spec: TeacherSpec | None = None):
        super().__init__()
        self.model = features
        self._fn = fn
        self.spec = spec

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.is_cuda:
            with torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16):
                return flat_tokens(self._fn(self.model, images))
        return flat_tokens(self._fn(self.model, images))


def _openclip_tokens(visual, x):
    x = visual._embeds(x)
    x = visual.transformer(x)
    return visual.ln_post(x)


def _trunk_tokens(visual, x):
    return visual.trunk.forward_features(x)


def _timm_tokens(model, x):
    return model.forward_features(x)


@contextlib.contextmanager
def _seeded(seed: int | None):
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def load_teacher(name: str, pretrained: str | None = None, *, random_init: bool = False,
                 resolution: int | None = None, init_seed: int = 0, model_args: dict | None = None,
                 device: str | torch.device = "cpu") -> Teacher:
    """Build the teacher. ``pretrained`` is an open_clip tag (``openai``), a timm tag, or a
    local checkpoint path; without it ``random_init=True`` must be said explicitly.
    ``model_args``: timm options (``window_size=14``; small ``depths`` for tests), recorded
    in the spec."""
    hub = name.startswith("hf-hub:")
    if hub and (pretrained is not None or random_init):
        raise TeacherError(f"teacher {name!r} brings its own weights from the Hub: drop --pretrained/--random-init")
    if pretrained is None and not random_init and not hub:
        raise TeacherError(f"teacher {name!r}: give --pretrained TAG|PATH (e.g. openai) or "
                           "--random-init for a seeded random teacher (tests, benchmarks)")
    if pretrained is not None and random_init:
        raise TeacherError("--pretrained and --random-init exclude each other")
    source, model_name = parse_teacher_name(name)
    model_args = dict(model_args or {})
    if model_args and source != "timm":
        raise TeacherError(f"--teacher-arg {', '.join(model_args)}: only timm teachers take model options "
                           f"(open_clip's architectures are named configs); {name!r} is an open_clip model")
    if source == "openclip":
        model_name = openclip_name(model_name, pretrained)
    local = pretrained is not None and os.path.exists(pretrained)
    with _seeded(init_seed if random_init else None):
        if source == "openclip":
            features, fn, mean, std, patch = _build_openclip(model_name, pretrained, resolution)
        else:
            features, fn, mean, std, patch = _build_timm(model_name, pretrained, resolution, model_args)
    features.eval().requires_grad_(False)
    if resolution is not None and (resolution < patch or resolution % patch):
        raise TeacherError(f"--resolution {resolution}: {name} needs a multiple of its patch size {patch}")
    res = resolution or _native_resolution(features)
    trunk = getattr(features, "trunk", features)  # open_clip's timm towers: the timm model
    with torch.no_grad():
        probe = fn(features, torch.zeros(1, 3, res, res))
    rows, cols, prefix = token_layout(trunk, probe, res, patch, f"teacher {name!r}", TeacherError)
    tokens, dim = prefix + rows * cols, probe.shape[-1]
    spec = TeacherSpec(
        source=source, name=model_name,
        pretrained=(Path(pretrained).name if local else "hf-hub" if hub else pretrained),
        init_seed=init_seed if random_init else None, resolution=res, patch=patch,
        tokens=tokens, prefix_tokens=prefix, dim=dim,
        mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
        weights_sha256=weights_sha256(features), rows=rows, cols=cols, model_args=model_args)
    teacher = Teacher(features, fn, spec)
    return teacher.to(device)


def _native_resolution(features: nn.Module) -> int:
    size = getattr(features, "image_size", None) or getattr(getattr(features, "patch_embed", None), "img_size", None)
    if size is None and hasattr(features, "trunk"):
        size = features.trunk.patch_embed.img_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _build_openclip(model_name, pretrained, resolution):
    import open_clip
    from open_clip.transformer import VisionTransformer

    model = create_openclip(model_name, pretrained, resolution)
    visual = model.visual
    mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    if isinstance(visual, VisionTransformer):
        if visual.attn_pool is not None or visual.final_ln_after_pool:
            raise TeacherError(f"{model_name}: attention-pooled / ln-after-pool towers have no "
                               "post-norm token map; pick a plain CLIP ViT")
        patch = visual.patch_size[0]
        return visual, _openclip_tokens, mean, std, patch
    if hasattr(visual, "trunk") and hasattr(visual.trunk, "forward_features"):
        return visual, _trunk_tokens, mean, std, visual.trunk.patch_embed.patch_size[0]
    raise TeacherError(f"{model_name}: image tower {type(visual).__name__} is not a ViT")


def _build_timm(model_name, pretrained, resolution, model_args):
    kw = {"num_classes": 0, **model_args}
    if resolution:
        kw["img_size"] = resolution
    model = create_timm(model_name, pretrained, **kw)
    cfg = model.pretrained_cfg
    patch = getattr(model.patch_embed, "patch_size", (16,))[0] if hasattr(model, "patch_embed") else 1
    return model, _timm_tokens, cfg.get("mean"), cfg.get("std"), patch
