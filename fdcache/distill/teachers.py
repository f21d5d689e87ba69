"""Teachers: an open_clip or timm image tower that maps images to its final token map.

Feature map = the last transformer block's tokens after the model's final norm (CLIP
``ln_post``), CLS (and any other prefix tokens) included, before the projection, as in
FD's reference code. A :class:`TeacherSpec` describes it and is stored in the cache, so a
cache can only be read with the teacher that wrote it.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import os
import socket
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import TeacherError
from ..store.layout import TeacherSpec

CONFIG_DIR = Path(__file__).parents[1] / "model_configs"
TINY_TEACHER = "fdcache-tiny-vit"  # random-init test teacher shipped with the package


def parse_teacher_name(name: str) -> tuple[str, str]:
    """``ViT-B-16`` / ``openclip:ViT-B-16`` -> open_clip; ``timm:<name>`` -> timm;
    ``hf-hub:org/repo`` (open_clip's form: config and weights from the Hub) -> open_clip."""
    if name.startswith(("hf-hub:", "local-dir:")):
        return "openclip", name
    if ":" in name:
        source, _, model = name.partition(":")
        source = {"open_clip": "openclip", "oc": "openclip"}.get(source, source)
        if source not in ("openclip", "timm"):
            raise TeacherError(f"unknown teacher source {source!r} in {name!r}; "
                               "use openclip:<name> or timm:<name>")
        return source, model
    return "openclip", name


def register_configs() -> None:
    """Make the bundled configs (the tiny random-init CLIP) known to open_clip."""
    import open_clip
    if TINY_TEACHER not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


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
                return self._fn(self.model, images)
        return self._fn(self.model, images)


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
                 resolution: int | None = None, init_seed: int = 0,
                 device: str | torch.device = "cpu") -> Teacher:
    """Build the teacher. ``pretrained`` is an open_clip tag (``openai``), a timm tag, or a
    local checkpoint path; without it ``random_init=True`` must be said explicitly."""
    hub = name.startswith("hf-hub:")
    if hub and (pretrained is not None or random_init):
        raise TeacherError(f"teacher {name!r} brings its own weights from the Hub: drop --pretrained/--random-init")
    if pretrained is None and not random_init and not hub:
        raise TeacherError(f"teacher {name!r}: give --pretrained TAG|PATH (e.g. openai) or "
                           "--random-init for a seeded random teacher (tests, benchmarks)")
    if pretrained is not None and random_init:
        raise TeacherError("--pretrained and --random-init exclude each other")
    source, model_name = parse_teacher_name(name)
    if source == "openclip":
        model_name = openclip_name(model_name, pretrained)
    local = pretrained is not None and os.path.exists(pretrained)
    with _seeded(init_seed if random_init else None):
        if source == "openclip":
            features, fn, mean, std, patch = _build_openclip(model_name, pretrained, resolution)
        else:
            features, fn, mean, std, patch = _build_timm(model_name, pretrained, local, resolution)
    features.eval().requires_grad_(False)
    if resolution is not None and (resolution < patch or resolution % patch):
        raise TeacherError(f"--resolution {resolution}: {name} needs a multiple of its patch size {patch}")
    res = resolution or _native_resolution(features)
    with torch.no_grad():
        probe = fn(features, torch.zeros(1, 3, res, res))
    if probe.ndim != 3:
        raise TeacherError(f"teacher {name!r} returns features of shape {tuple(probe.shape)}; "
                           "only token maps [B, L, D] (ViT-style) are supported")
    tokens, dim = probe.shape[1], probe.shape[2]
    grid = (res // patch) ** 2
    spec = TeacherSpec(
        source=source, name=model_name,
        pretrained=(Path(pretrained).name if local else "hf-hub" if hub else pretrained),
        init_seed=init_seed if random_init else None, resolution=res, patch=patch,
        tokens=tokens, prefix_tokens=tokens - grid, dim=dim,
        mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
        weights_sha256=weights_sha256(features))
    teacher = Teacher(features, fn, spec)
    return teacher.to(device)


def _native_resolution(features: nn.Module) -> int:
    size = getattr(features, "image_size", None) or getattr(getattr(features, "patch_embed", None), "img_size", None)
    if size is None and hasattr(features, "trunk"):
        size = features.trunk.patch_embed.img_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def suggest(name: str, known: list[str]) -> str:
    """`` (did you mean X, Y?)`` from difflib, or nothing."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def openclip_name(name: str, pretrained: str | None) -> str:
    """The open_clip config that matches the weights: OpenAI's CLIPs were trained with
    QuickGELU, which open_clip's plain ``ViT-B-16`` config lacks (it only warns), so the
    tag ``openai`` selects ``ViT-B-16-quickgelu``, as open_clip's docs advise."""
    import open_clip

    if not pretrained or name.startswith(("hf-hub:", "local-dir:")) or os.path.exists(pretrained):
        return name
    tag = open_clip.get_pretrained_cfg(name, pretrained) or {}
    quick = f"{name}-quickgelu"
    cfg = open_clip.get_model_config(name) or {}
    if tag.get("quick_gelu") and not cfg.get("quick_gelu") and quick in open_clip.list_models():
        return quick
    return name


def _hub_reachable(timeout: float = 3.0) -> bool:
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_or_cache(needs_hub: bool, what: str):
    """Weights from the Hub, or from its local cache without waiting on the network when the
    Hub is unreachable (huggingface_hub would otherwise retry for about a minute); a miss
    is one short error with what to do."""
    import huggingface_hub.constants as hub

    offline = hub.HF_HUB_OFFLINE or (needs_hub and not _hub_reachable())
    forced = offline and not hub.HF_HUB_OFFLINE
    if forced:
        hub.HF_HUB_OFFLINE = True
    try:
        yield
    except Exception as e:  # the libraries raise RuntimeError, OSError, FileNotFoundError, ValueError...
        if not (needs_hub and offline):
            raise
        raise TeacherError(
            f"{what}: the weights are not in the local Hugging Face cache ({hub.HF_HUB_CACHE}) and "
            f"{'HF_HUB_OFFLINE=1 is set' if not forced else 'the Hub is unreachable'}. Run the same command "
            "once where there is network (or copy that cache here), then set HF_HUB_OFFLINE=1 so nothing "
            "waits on the network; or pass --pretrained /path/to/checkpoint") from e
    finally:
        if forced:
            hub.HF_HUB_OFFLINE = False


@contextlib.contextmanager
def _quiet_logs():
    """open_clip logs a failed download as an ERROR before raising; the raised error says it."""
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(previous)


def create_openclip(model_name: str, pretrained: str | None, resolution: int | None = None):
    """open_clip's CLIP model (both towers): weights by tag or local path, or random (None);
    ``hf-hub:org/repo`` names bring their own weights (``pretrained`` unused)."""
    import open_clip

    register_configs()
    hub_name = model_name.startswith(("hf-hub:", "local-dir:"))
    if not hub_name and model_name not in open_clip.list_models():
        raise TeacherError(f"unknown open_clip model {model_name!r}{suggest(model_name, open_clip.list_models())}; "
                           "see open_clip.list_models() (e.g. ViT-B-16, ViT-L-14), or use timm:<name> or hf-hub:org/repo")
    kw = {"force_image_size": resolution} if resolution else {}
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
    local = pretrained is not None and os.path.exists(pretrained)
    needs_hub = model_name.startswith("hf-hub:") or (pretrained is not None and not local)
    label = f"open_clip {model_name!r}" + (f" with pretrained={pretrained!r}" if pretrained else "")
    tags = [] if hub_name else open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained and not local and not hub_name and pretrained not in tags:
        raise TeacherError(f"{label}: no such weights tag{suggest(pretrained, tags)}; known tags: "
                           f"{', '.join(tags) or 'none'}; or pass a local checkpoint path")
    try:
        with _hub_or_cache(needs_hub, label), _quiet_logs(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="QuickGELU mismatch")  # openclip_name() resolves it
            return open_clip.create_model(model_name, pretrained=None if hub_name else pretrained, **kw)
    except Exception as e:  # a local file that is no checkpoint raises pickle/zip/key errors
        if pretrained is not None and os.path.isfile(pretrained):
            raise TeacherError(f"--pretrained {pretrained}: not a checkpoint open_clip {model_name!r} can "
                               f"load ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from e
        if not isinstance(e, RuntimeError):
            raise
        raise TeacherError(f"cannot load {label}: {str(e)[:300]}"
                           + (f". Known tags: {', '.join(tags)}{suggest(str(pretrained), tags)}" if tags else "")
                           + "; or pass a local checkpoint path") from e


def create_timm(model_name: str, pretrained: str | None, **kw):
    """timm model; ``pretrained`` is a timm tag (``openai``) or a local checkpoint path."""
    import timm

    local = pretrained is not None and os.path.exists(pretrained)
    if not timm.is_model(model_name.split(".")[0]):
        raise TeacherError(f"unknown timm model {model_name!r}{suggest(model_name, timm.list_models())}; "
                           "see timm.list_models()")
    full = model_name
    if pretrained and not local:
        full = f"{model_name}.{pretrained}" if "." not in model_name else model_name
    if local:
        kw["pretrained_cfg_overlay"] = {"file": str(pretrained)}
    try:
        with _hub_or_cache(bool(pretrained) and not local, f"timm {full!r}"):
            return timm.create_model(full, pretrained=bool(pretrained), **kw)
    except Exception as e:
        if local:
            raise TeacherError(f"--pretrained {pretrained}: not a checkpoint timm {model_name!r} can load "
                               f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from e
        if not isinstance(e, (RuntimeError, AssertionError)):
            raise
        raise TeacherError(f"cannot create timm model {full!r}: {str(e)[:300]}") from e


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


def _build_timm(model_name, pretrained, local, resolution):
    kw = {"num_classes": 0}
    if resolution:
        kw["img_size"] = resolution
    model = create_timm(model_name, pretrained, **kw)
    cfg = model.pretrained_cfg
    patch = getattr(model.patch_embed, "patch_size", (16,))[0] if hasattr(model, "patch_embed") else 1
    return model, _timm_tokens, cfg.get("mean"), cfg.get("std"), patch
