"""Exports in timm's and open_clip's own layouts, so a run loads without fdcache.

Beside fdcache's ``model.json`` (or, for a student, inside ``config.json``) a run directory
holds what the libraries read themselves:

* **timm form** (a distilled student, a fine-tuned timm model or student): ``config.json`` and
  ``model.safetensors`` as timm's ``save_for_hf`` writes them, with the architecture, the
  arguments that rebuild it, and the model's own mean/std/crop::

      timm.create_model("local-dir:RUN", pretrained=True)

* **open_clip form** (FLYP runs and their WiSE-FT mixes): ``open_clip_config.json`` beside
  ``model.safetensors`` (the whole CLIP)::

      open_clip.create_model_and_transforms("local-dir:RUN")

* **FT-CLIP's fresh head on an open_clip tower**: the tower converted to timm's CLIP ViT
  (mean-pooled patch tokens, ``fc_norm``, ``head``: the same function) in ``RUN/timm/``::

      timm.create_model("local-dir:RUN/timm", pretrained=True)

The libraries load ``model.safetensors`` (the final weights); a kept EMA sits beside it as
``model_ema.safetensors`` in the same key layout (``model.load_state_dict(load_file(...))``).
``config.json`` also carries an ``fdcache`` block (the run's resolved options and versions,
see :mod:`fdcache.runinfo`); timm ignores it.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .errors import FdcacheError

__all__ = ["CONFIG", "OPENCLIP_CONFIG", "DROP_ARGS", "save_weights", "read_json", "write_json", "update_fdcache_block",
           "timm_model_args", "write_timm_config", "write_openclip_config", "write_openclip_with_head",
           "TIMM_CLIP_ARCHS", "timm_form_of_openclip", "openclip_to_timm_state", "write_timm_from_openclip"]

CONFIG = "config.json"
OPENCLIP_CONFIG = "open_clip_config.json"
DROP_ARGS = ("drop_rate", "drop_path_rate", "attn_drop_rate", "proj_drop_rate", "pos_drop_rate",
             "patch_drop_rate", "drop_block_rate", "pretrained_cfg_overlay")


def save_weights(state: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` (with ``metadata``, its string header fields), then the
    mode every other file of a run gets (0666 less the umask): safetensors writes its files
    readable by their owner only (0600)."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())
    return path


def _umask() -> int:
    """The process's umask, read without changing it (``os.umask`` can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_json(path: Path, data: dict) -> None:
    """Whole-file replace, so a reader never sees half a config."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def update_fdcache_block(out: str | Path, **parts) -> None:
    """Set ``config.json["fdcache"][k] = v`` for each part, keeping everything else."""
    path = Path(out) / CONFIG
    cfg = read_json(path)
    cfg.setdefault("fdcache", {}).update(parts)
    write_json(path, cfg)


def timm_model_args(kwargs: dict) -> dict:
    """Arguments that rebuild the architecture (drop rates are training-time choices)."""
    return {k: v for k, v in kwargs.items() if k not in DROP_ARGS}


@contextmanager
def _pretrained_cfg(model: nn.Module, **values):
    """The model's pretrained_cfg with our values, while timm writes it. The source tag and
    licence describe weights the export no longer holds, so they go."""
    old = model.pretrained_cfg
    new = {k: v for k, v in old.items() if k not in ("tag", "license")}
    model.pretrained_cfg = new | {k: v for k, v in values.items() if v is not None}
    try:
        yield
    finally:
        model.pretrained_cfg = old


def write_timm_config(out: str | Path, model: nn.Module, model_args: dict, *, mean=None, std=None,
                      crop_pct: float | None = None, label_names=None) -> Path:
    """``out/config.json`` through timm's own writer (``save_config_for_hf``), keeping an
    existing ``fdcache`` block."""
    from timm.models._hub import save_config_for_hf

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG
    keep = read_json(path).get("fdcache")
    size = model.patch_embed.img_size if hasattr(model, "patch_embed") else None
    values = dict(mean=tuple(mean) if mean else None, std=tuple(std) if std else None, crop_pct=crop_pct,
                  input_size=(3, *size) if size else None, num_classes=model.num_classes)
    model_config = {"label_names": list(label_names)} if label_names else {}
    with _pretrained_cfg(model, **values):
        save_config_for_hf(model, path, model_config=model_config, model_args=timm_model_args(model_args))
    if keep is not None:
        update_fdcache_block(out, **keep)
    return path


def write_openclip_config(out: str | Path, name: str, resolution: int, mean, std) -> Path:
    """``out/open_clip_config.json``: the model config (so no registry entry is needed) and the
    preprocessing, as open_clip's hub configs hold them."""
    import open_clip

    from .models import register_configs

    register_configs()
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise FdcacheError(f"open_clip has no config for {name!r}")
    model_cfg["vision_cfg"]["image_size"] = resolution
    cfg = {"model_cfg": model_cfg,
           "preprocess_cfg": {"size": resolution, "mean": list(mean), "std": list(std),
                              "interpolation": "bicubic", "resize_mode": "shortest"},
           "fdcache": {"open_clip_name": name}}
    path = Path(out) / OPENCLIP_CONFIG
    write_json(path, cfg)
    return path


def write_openclip_with_head(out: str | Path, spec, state: dict, clip_rest: dict) -> Path:
    """A zero-shot-headed classifier as open_clip reads it: the whole CLIP (the fine-tuned
    image tower, the untouched text tower) in ``open_clip_model.safetensors``, and the linear
    head over the normalised image embedding in ``head.safetensors`` (``weight``, ``bias``)::

        logits = F.normalize(model.encode_image(x), dim=-1) @ head["weight"].T + head["bias"]
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clip = {k: v for k, v in state.items() if k.startswith("visual.")} | dict(clip_rest)
    save_weights(clip, out / "open_clip_model.safetensors")
    save_weights({"weight": state["head.weight"], "bias": state["head.bias"]}, out / "head.safetensors")
    write_openclip_config(out, spec.name, spec.resolution, spec.mean, spec.std)
    return out


# -- FT-CLIP fresh head: open_clip tower -> timm CLIP ViT ---------------------------------------
# timm architectures for open_clip's plain ViT towers: (patch, width, layers, quick_gelu) -> name.
# Others get the closest builder with explicit size arguments (recorded in config.json).
TIMM_CLIP_ARCHS = {
    (32, 768, 12, False): "vit_base_patch32_clip_224", (32, 768, 12, True): "vit_base_patch32_clip_quickgelu_224",
    (16, 768, 12, False): "vit_base_patch16_clip_224", (16, 768, 12, True): "vit_base_patch16_clip_quickgelu_224",
    (14, 1024, 24, False): "vit_large_patch14_clip_224", (14, 1024, 24, True): "vit_large_patch14_clip_quickgelu_224",
    (14, 1280, 32, False): "vit_huge_patch14_clip_224", (14, 1280, 32, True): "vit_huge_patch14_clip_quickgelu_224",
}
_UNSUPPORTED = ("timm_model_name", "attentional_pool", "attn_pooler_queries", "no_ln_pre", "final_ln_after_pool",
                "input_patchnorm", "act_kwargs", "norm_kwargs", "pos_embed_type")


def timm_form_of_openclip(name: str, resolution: int, num_classes: int) -> tuple[str, dict] | None:
    """(timm architecture, model args) computing FT-CLIP's fresh-head classifier on open_clip's
    ``name`` tower, or None where timm's ViT cannot express the tower."""
    import open_clip

    from .models import register_configs

    register_configs()
    cfg = open_clip.get_model_config(name)
    vc = (cfg or {}).get("vision_cfg", {})
    if not vc or any(vc.get(k) not in (None, False, "learnable") for k in _UNSUPPORTED):
        return None
    patch, width, layers = int(vc["patch_size"]), int(vc["width"]), int(vc["layers"])
    quick = bool(cfg.get("quick_gelu", False))
    arch = TIMM_CLIP_ARCHS.get((patch, width, layers, quick),
                               "vit_base_patch16_clip_quickgelu_224" if quick else "vit_base_patch16_clip_224")
    args = dict(patch_size=patch, embed_dim=width, depth=layers, num_heads=width // int(vc.get("head_width", 64)),
                mlp_ratio=float(vc.get("mlp_ratio", 4.0)), img_size=resolution, global_pool="avg", fc_norm=True,
                num_classes=num_classes)
    if vc.get("ls_init_value") is not None:
        args["init_values"] = vc["ls_init_value"]
    return arch, args


def openclip_to_timm_state(state: dict, model: nn.Module) -> dict:
    """A fresh-head classifier's ``visual.*`` / ``fc_norm.*`` / ``head.*`` state in timm's
    layout: timm's own OpenAI-CLIP converter for the tower; ``fc_norm`` and ``head`` keep
    their names."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    tower = {k: v for k, v in state.items() if k.startswith("visual.")}
    out = checkpoint_filter_fn(tower, model)
    out.update({k: v for k, v in state.items() if k.startswith(("fc_norm.", "head."))})
    return out


def write_timm_from_openclip(out: str | Path, spec, state: dict, ema_state: dict | None,
                             check: nn.Module | None = None) -> Path | None:
    """``out/`` = the timm form of a fresh-head open_clip classifier (None where timm's ViT
    cannot express the tower). ``check``: the fdcache model holding ``state``; its output on
    a probe image must match the converted model's, or the export is refused."""
    import timm

    form = timm_form_of_openclip(spec.name, spec.resolution, len(spec.classnames))
    if form is None:
        return None
    arch, args = form
    with torch.random.fork_rng(devices=[]):
        model = timm.create_model(arch, pretrained=False, **args)
    model.load_state_dict(openclip_to_timm_state(state, model), strict=True)
    if check is not None:
        _same_outputs(check, model, spec.resolution)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model.state_dict(), out / "model.safetensors")
    if ema_state is not None:
        save_weights(openclip_to_timm_state(ema_state, model), out / "model_ema.safetensors")
    write_timm_config(out, model, args, mean=spec.mean, std=spec.std, crop_pct=spec.crop_pct,
                      label_names=spec.classnames)
    return out


def _same_outputs(a: nn.Module, b: nn.Module, resolution: int) -> None:
    x = torch.randn(2, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    modes = a.training, b.training
    a.eval(), b.eval()
    try:
        with torch.no_grad():
            ya, yb = a(x).float(), b(x).float()
    finally:
        a.train(modes[0]), b.train(modes[1])
    if not torch.allclose(ya, yb, rtol=1e-3, atol=1e-4 * max(1.0, ya.abs().max().item())):
        raise FdcacheError("the timm form of this model computes something else than the model "
                           f"(max difference {(ya - yb).abs().max().item():.3g}); not exported")
