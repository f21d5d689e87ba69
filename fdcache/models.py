"""Building open_clip and timm models by name, shared by teachers (distillation) and
classifiers (fine-tuning): name parsing, the bundled configs, weights by tag or local path,
the Hub or its cache, errors that suggest close names."""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import socket
import warnings
from pathlib import Path

from .errors import TeacherError, cause_of

__all__ = ["CONFIG_DIR", "TINY_TEACHER", "create_openclip", "create_timm", "openclip_name", "parse_teacher_name",
           "register_configs", "suggest"]

CONFIG_DIR = Path(__file__).parent / "model_configs"
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
                               f"load ({type(e).__name__}: {cause_of(e)})") from e
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
                               f"({type(e).__name__}: {cause_of(e)})") from e
        if not isinstance(e, (RuntimeError, AssertionError, TypeError)):
            raise
        raise TeacherError(f"cannot create timm model {full!r}{' with ' + str(kw) if kw else ''}: {str(e)[:300]}") from e
