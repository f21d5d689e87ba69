"""FD's attention diagnostics: how far each head looks, and how alike a layer's heads are.

The FD papers explain why distillation helps by two measurements on the attention maps:

* **average attention distance** per layer and head: for each patch query, the
  attention-weighted mean distance (in input pixels) between its patch centre and the key
  patch centres, averaged over queries and images. Prefix tokens (CLS, registers) have no
  position, so they are left out as queries and as keys; the attention over the patch keys is
  renormalized to sum to one. ``prefix_attention`` records the mass that was left out.
* **head diversity**: per layer, the mean pairwise cosine distance between the heads'
  attention maps (each head's rows for the patch queries, flattened), per image, averaged.
  ``head_diversity`` gives each head's mean distance to the layer's other heads.

Attention maps come from hooks on the model itself (no copy): timm's attention modules
(ViT, BEiT, DINOv2, open_clip's timm trunks) are switched off their fused kernel for the
run and their ``attn_drop`` output (the softmax probabilities; identity in eval) is read,
as timm's ``AttentionExtract`` does; open_clip's ``nn.MultiheadAttention`` is asked for
per-head weights (``need_weights=True, average_attn_weights=False``) through a pre-hook.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import DataError, FdcacheError, TeacherError
from ..options import check
from ..images import IMAGE_EXTENSIONS, open_rgb

__all__ = ["RANDOM", "Subject", "Diagnosis", "load_subject", "load_run", "attention_maps", "patch_distances",
           "split_prefix", "layer_stats", "list_images", "diagnose", "pair_weights", "run", "plot"]

RANDOM = "random-init"  # a --pretrained value: seeded random weights for that model


@dataclass
class Subject:
    """A model under diagnosis: ``forward(images)`` runs the image tower whose attention the
    hooks on ``module`` read; pixels are prepared with ``resolution``, ``mean``, ``std``."""

    label: str
    module: nn.Module
    forward: Callable[[torch.Tensor], object]
    resolution: int
    mean: tuple
    std: tuple


@dataclass
class Diagnosis:
    model: str
    resolution: int
    grid: int
    patch_px: float
    prefix_tokens: int
    images: int
    distance_px: list = field(default_factory=list)  # [layer][head]
    head_diversity: list = field(default_factory=list)  # [layer][head]
    diversity: list = field(default_factory=list)  # [layer]
    prefix_attention: list = field(default_factory=list)  # [layer][head]

    def to_dict(self) -> dict:
        return asdict(self)


# -- loading models ------------------------------------------------------------------------
def load_subject(name: str, pretrained: str | None = None, *, resolution: int | None = None,
                 init_seed: int = 0, label: str | None = None) -> Subject:
    """An ``extract --teacher`` name with weights (``pretrained`` = tag, path, or
    ``random-init``), or an fdcache run directory (``name`` is a directory)."""
    if Path(name).is_dir():
        return load_run(Path(name), label)
    from ..distill.teachers import load_teacher

    random_init = pretrained == RANDOM
    teacher = load_teacher(name, None if random_init else pretrained, random_init=random_init,
                           resolution=resolution, init_seed=init_seed)
    s = teacher.spec
    return Subject(label or s.label, teacher.model, teacher, s.resolution, s.mean, s.std)


def load_run(path: Path, label: str | None = None) -> Subject:
    """An ``fdcache train`` student export or a ``finetune``/``flyp``/``wise`` export.
    The one place that knows the run-directory formats."""
    from ..exports import CONFIG, read_json
    from ..tune.classifiers import load_export

    label = label or path.name
    if read_json(path / CONFIG).get("fdcache", {}).get("export", {}).get("kind") == "student":
        import timm

        try:  # the export is timm's own layout: timm loads it without fdcache's help
            model = timm.create_model(f"local-dir:{path}", pretrained=True)
        except (RuntimeError, TypeError, ValueError) as e:
            raise TeacherError(f"{path}: timm cannot load this student export: {e}") from None
        res = int(model.patch_embed.img_size[0])
        cfg = model.pretrained_cfg  # the student normalizes with its own mean/std (students.py)
        mean, std = cfg.get("mean", (0.5,) * 3), cfg.get("std", (0.5,) * 3)
        return Subject(label, model.eval(), model.forward_features, res, tuple(mean), tuple(std))
    if (path / "model.json").is_file():
        model, spec, _ = load_export(path)
        tower = model.visual if spec.kind == "clip" else model
        return Subject(label, tower.eval(), tower, spec.resolution, spec.mean, spec.std)
    raise TeacherError(f"{path} is neither an fdcache train run (config.json + model.safetensors) nor a fine-tuned "
                       "export (model.json); pass a model name such as timm:<name> instead")


# -- attention capture --------------------------------------------------------------------
@contextlib.contextmanager
def attention_maps(module: nn.Module):
    """Yield a list that each forward of ``module`` fills with one ``[B, H, N, N]`` attention
    map per layer, in execution order. Hooks and fused-attention flags are restored after."""
    maps: list[torch.Tensor] = []
    handles, fused = [], []

    def keep(_m, _args, output):
        maps.append(output.detach().float())

    def ask_weights(_m, args, kwargs):
        return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

    def keep_weights(_m, _args, _kwargs, output):
        maps.append(output[1].detach().float())

    for m in module.modules():
        if hasattr(m, "fused_attn") and isinstance(getattr(m, "attn_drop", None), nn.Module):
            fused.append((m, m.fused_attn))
            m.fused_attn = False
            handles.append(m.attn_drop.register_forward_hook(keep))
        elif isinstance(m, nn.MultiheadAttention):
            handles.append(m.register_forward_pre_hook(ask_weights, with_kwargs=True))
            handles.append(m.register_forward_hook(keep_weights, with_kwargs=True))
    if not handles:
        raise TeacherError(f"{type(module).__name__}: no attention module found (timm Attention with "
                           "attn_drop, or nn.MultiheadAttention); diagnose needs a ViT")
    try:
        yield maps
    finally:
        for h in handles:
            h.remove()
        for m, flag in fused:
            m.fused_attn = flag


# -- the measurements ---------------------------------------------------------------------
def patch_distances(grid: int, patch_px: float) -> torch.Tensor:
    """``[g*g, g*g]`` Euclidean distances between patch centres, in pixels (row-major grid)."""
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    centres = torch.stack([ys.flatten(), xs.flatten()], dim=1).double() * patch_px
    return torch.cdist(centres, centres)


def split_prefix(tokens: int) -> tuple[int, int]:
    """(prefix tokens, grid side) of ``tokens = prefix + g*g`` (square grid, prefix < 2g+1)."""
    grid = math.isqrt(tokens)
    return tokens - grid * grid, grid


def layer_stats(attn: torch.Tensor, prefix: int, distances: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image, per-head sums for one layer's ``attn [B, H, N, N]``: ``distance`` (pixels),
    ``head_diversity`` (mean cosine distance to the other heads), ``prefix_attention``."""
    attn = attn.double()
    B, H = attn.shape[:2]
    patch_rows = attn[:, :, prefix:, :]  # patch queries, all keys
    to_patches = patch_rows[..., prefix:]
    mass = to_patches.sum(-1, keepdim=True)
    weights = to_patches / mass.clamp_min(1e-12)
    distance = (weights * distances.to(attn)).sum(-1).mean(-1)  # [B, H]
    flat = torch.nn.functional.normalize(patch_rows.reshape(B, H, -1), dim=-1)
    cos = flat @ flat.transpose(1, 2)  # [B, H, H]
    if H > 1:
        off = (1 - cos).sum(-1) / (H - 1)  # diagonal is 1 - 1 = 0
    else:
        off = torch.zeros(B, H, dtype=attn.dtype)
    prefix_mass = patch_rows[..., :prefix].sum(-1).mean(-1)
    return {"distance": distance, "head_diversity": off, "prefix_attention": prefix_mass}


def list_images(root: str | Path, limit: int | None) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--data {root}: not a directory of images")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise DataError(f"no images under {root} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    if limit and limit < len(paths):  # evenly spread over the folder (every class of an ImageFolder)
        paths = [paths[i * len(paths) // limit] for i in range(limit)]
    return paths


def _batches(paths: list[Path], subject: Subject, batch_size: int):
    from PIL import Image

    from ..tune.imagefolder import eval_transform

    tf = eval_transform(subject.resolution, subject.mean, subject.std, crop_pct=1.0)
    for i in range(0, len(paths), batch_size):
        out = []
        for p in paths[i:i + batch_size]:
            try:
                img = Image.fromarray(open_rgb(p))  # the pixels DALI decodes (fdcache.images)
            except DataError:
                raise
            except Exception as e:  # PIL raises many types for damaged files
                raise DataError(f"cannot decode {p}: {e}; remove or replace the file") from None
            out.append(tf(img))
        yield torch.stack(out)


@torch.no_grad()
def diagnose(subject: Subject, paths: list[Path], *, batch_size: int = 16,
             device: str | torch.device = "cpu", progress: bool = False) -> Diagnosis:
    """Attention distance and head diversity of ``subject`` over the images ``paths``."""
    from tqdm import tqdm

    module = subject.module.to(device).eval()
    sums: dict[str, list[torch.Tensor]] = {}
    geometry = None
    bar = tqdm(total=len(paths), desc=subject.label, unit="img", disable=not progress, dynamic_ncols=True)
    with attention_maps(module) as maps:
        for images in _batches(paths, subject, batch_size):
            maps.clear()
            subject.forward(images.to(device))
            if geometry is None:
                prefix, grid = split_prefix(maps[0].shape[-1])
                patch_px = subject.resolution / grid
                geometry = (prefix, grid, patch_px, patch_distances(grid, patch_px))
            for layer, attn in enumerate(maps):
                for k, v in layer_stats(attn.cpu(), geometry[0], geometry[3]).items():
                    acc = sums.setdefault(k, [])
                    if layer == len(acc):
                        acc.append(torch.zeros(v.shape[1], dtype=torch.float64))
                    acc[layer] += v.sum(0)
            bar.update(len(images))
    bar.close()
    n = len(paths)
    per_head = {k: [[round(float(x) / n, 6) for x in layer] for layer in v] for k, v in sums.items()}
    return Diagnosis(model=subject.label, resolution=subject.resolution, grid=geometry[1],
                     patch_px=geometry[2], prefix_tokens=geometry[0], images=n,
                     distance_px=per_head["distance"], head_diversity=per_head["head_diversity"],
                     diversity=[round(sum(h) / len(h), 6) for h in per_head["head_diversity"]],
                     prefix_attention=per_head["prefix_attention"])


# -- several models, outputs ----------------------------------------------------------------
def pair_weights(models: list[str], pretrained: list[str], random_init: bool) -> list[str | None]:
    """The weights of each model: run directories need none; named models take one
    ``--pretrained`` each in order, or one for all (``random-init`` = seeded random)."""
    named = [m for m in models if not Path(m).is_dir()]
    if not named and (pretrained or random_init):
        raise FdcacheError("every model is a run directory, which carries its own weights: "
                           "drop --pretrained / --random-init")
    if random_init:
        if pretrained:
            raise FdcacheError("--random-init and --pretrained exclude each other (use --pretrained "
                               f"{RANDOM} for one model among several)")
        pretrained = [RANDOM]
    if named and not pretrained:
        raise TeacherError(f"{named[0]}: give --pretrained TAG|PATH (or {RANDOM}) or --random-init")
    if len(pretrained) not in (1, len(named)) and named:
        raise FdcacheError(f"{len(named)} named model(s) but {len(pretrained)} --pretrained value(s): "
                           "give one for all, or one per named model in order")
    it = iter(pretrained * len(named) if len(pretrained) == 1 else pretrained)
    return [None if Path(m).is_dir() else next(it) for m in models]


def run(models: list[str], data: str | Path, *, pretrained: list[str] = (), random_init: bool = False,
        resolution: int | None = None, init_seed: int = 0, labels: list[str] = (), images: int | None = 32,
        batch_size: int = 16, device: str = "cpu", progress: bool = False,
        json_out: str | Path | None = None, plot_out: str | Path | None = None) -> list[Diagnosis]:
    """Diagnose each model on the same images; write the JSON and the plot when asked."""
    check(resolution=resolution, init_seed=init_seed, images=images, batch_size=batch_size)
    if labels and len(labels) != len(models):
        raise FdcacheError(f"{len(labels)} --label value(s) for {len(models)} model(s)")
    paths = list_images(data, images)
    weights = pair_weights(list(models), list(pretrained), random_init)
    results = []
    for i, (name, w) in enumerate(zip(models, weights)):
        subject = load_subject(name, w, resolution=resolution, init_seed=init_seed,
                               label=labels[i] if labels else None)
        results.append(diagnose(subject, paths, batch_size=batch_size, device=device, progress=progress))
        del subject
    if json_out:
        Path(json_out).write_text(json.dumps({"data": str(data), "models": [r.to_dict() for r in results]}, indent=1))
    if plot_out:
        plot(results, plot_out)
    return results


def plot(results: list[Diagnosis], out: str | Path) -> Path:
    """The paper's view: per layer, one dot per head (attention distance), one colour per
    model, the layer mean as a line; beside it, head diversity per layer."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as e:
        raise FdcacheError("--plot needs matplotlib: pip install 'fdcache[plot]'") from e
    fig, (ax_d, ax_v) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    n = len(results)
    for k, r in enumerate(results):
        colour = f"C{k}"
        offset = (k - (n - 1) / 2) * 0.6 / max(n, 1)
        for layer, heads in enumerate(r.distance_px):
            ax_d.scatter([layer + 1 + offset] * len(heads), heads, s=16, color=colour, alpha=0.75,
                         label=r.model if layer == 0 else None)
        means = [sum(h) / len(h) for h in r.distance_px]
        ax_d.plot([i + 1 for i in range(len(means))], means, color=colour, lw=1, alpha=0.6)
        ax_v.plot([i + 1 for i in range(len(r.diversity))], r.diversity, "o-", color=colour, ms=4, label=r.model)
    for grid, patch_px in sorted({(r.grid, r.patch_px) for r in results}):
        uniform = float(patch_distances(grid, patch_px).mean())
        ax_d.axhline(uniform, color="grey", ls="--", lw=0.8,
                     label=f"uniform attention ({grid}x{grid} grid, {patch_px:g} px patches)")
    depth = max(len(r.distance_px) for r in results)
    ax_d.set(xlabel="layer", ylabel="mean attention distance (input pixels)",
             title="attention distance: one dot per head")
    ax_v.set(xlabel="layer", ylabel="mean pairwise cosine distance of heads", title="head diversity", ylim=(0, None))
    for ax in (ax_d, ax_v):
        ax.grid(alpha=0.3)
        ax.set_xticks(range(1, depth + 1))
    ax_d.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
