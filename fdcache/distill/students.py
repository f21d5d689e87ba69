"""Students: a timm ViT plus FD's per-token linear projection to the teacher's width.

FD's student is ViT-B/16 with a CLS token, no absolute position embedding, one relative
position bias shared by all blocks, layer scale 0.1 and drop path 0.2. In timm that is the
BEiT architecture (``beit_*``: ``use_shared_rel_pos_bias``, ``init_values``), so the default
student is ``beit_base_patch16_224`` with those options. Any other timm ViT name works too
(``vit_*`` gets layer scale and drop path; it keeps its absolute position embedding, as timm's
ViT has no shared relative bias).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, FdcacheError

__all__ = ["PRESETS", "fd_options", "StudentSpec", "FDStudent", "build_student", "check_token_layout",
           "resize_token_grid", "export_state_dict"]

# Small configs for tests, quickstart and CPU benchmarks (random init; same code path).
PRESETS = {
    "fd-tiny": ("beit_base_patch16_224", dict(embed_dim=64, depth=2, num_heads=2)),
    "fd-small": ("beit_base_patch16_224", dict(embed_dim=192, depth=4, num_heads=3)),
}


def fd_options(name: str, drop_path: float, layer_scale: float | None) -> dict:
    if name.startswith("beit"):
        # use_fc_norm=False: the final norm acts on every token (FD regresses all tokens),
        # not only on the pooled vector; it also leaves no unused parameter for DDP.
        return dict(use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                    init_values=layer_scale, drop_path_rate=drop_path, use_fc_norm=False)
    return dict(init_values=layer_scale, drop_path_rate=drop_path)


@dataclass(frozen=True)
class StudentSpec:
    name: str
    resolution: int
    tokens: int
    prefix_tokens: int
    dim: int
    mean: tuple
    std: tuple


class FDStudent(nn.Module):
    """``forward(images) -> [B, L_student, D_teacher]``: backbone tokens after its final
    norm, projected per token (FD's 1x1 Conv1d == a Linear on the token dim)."""

    def __init__(self, backbone: nn.Module, teacher_dim: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embed_dim, teacher_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_features(x))

    def no_weight_decay(self):
        return {f"backbone.{n}" for n in getattr(self.backbone, "no_weight_decay", lambda: set())()}


def build_student(name: str, teacher_dim: int, *, resolution: int | None = None, drop_path: float = 0.2,
                  layer_scale: float | None = 0.1, overrides: dict | None = None,
                  seed: int = 0) -> tuple[FDStudent, StudentSpec]:
    import timm

    model_name, kw = PRESETS.get(name, (name, {}))
    if not timm.is_model(model_name):
        from ..models import suggest

        raise FdcacheError(f"unknown student {name!r}{suggest(name, [*PRESETS, *timm.list_models()])}: "
                           "give fd-tiny, fd-small or a timm model name (timm.list_models())")
    kw = dict(kw) | fd_options(model_name, drop_path, layer_scale) | dict(overrides or {})
    if resolution:
        kw["img_size"] = resolution
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            backbone = timm.create_model(model_name, pretrained=False, num_classes=0, **kw)
        except (RuntimeError, TypeError) as e:
            raise FdcacheError(f"cannot build student {name!r} ({model_name} with {kw}): {e}") from e
        student = FDStudent(backbone, teacher_dim)
    patch = backbone.patch_embed.patch_size[0]
    if resolution and (resolution < patch or resolution % patch):
        raise ConfigError(f"--resolution {resolution}: student {name!r} needs a multiple of its patch size {patch}")
    res = resolution or backbone.patch_embed.img_size[0]
    with torch.no_grad():
        tokens = backbone.forward_features(torch.zeros(1, 3, res, res)).shape[1]
    grid = backbone.patch_embed.grid_size[0] * backbone.patch_embed.grid_size[1]
    cfg = backbone.pretrained_cfg
    spec = StudentSpec(name=name, resolution=res, tokens=tokens, prefix_tokens=tokens - grid,
                       dim=backbone.embed_dim, mean=tuple(cfg.get("mean", (0.5,) * 3)),
                       std=tuple(cfg.get("std", (0.5,) * 3)))
    return student, spec


def check_token_layout(student: StudentSpec, teacher_tokens: int, teacher_prefix: int,
                       resize: bool) -> None:
    """Refuse (clearly) what cannot be matched; otherwise say nothing."""
    if student.tokens == teacher_tokens and student.prefix_tokens == teacher_prefix:
        return
    if student.prefix_tokens != teacher_prefix:
        raise FdcacheError(f"student {student.name} has {student.prefix_tokens} prefix token(s), the "
                           f"teacher {teacher_prefix}: pick a student with the same CLS/register tokens")
    if not resize:
        raise FdcacheError(
            f"student {student.name} at {student.resolution}px makes {student.tokens} tokens, the "
            f"teacher's map has {teacher_tokens}; pass --resize-targets to resample the teacher's "
            "patch grid to the student's (bilinear), or pick a student resolution that matches")
    if not _is_square(teacher_tokens - teacher_prefix) or not _is_square(student.tokens - student.prefix_tokens):
        raise FdcacheError("--resize-targets needs square patch grids")


def _is_square(n: int) -> bool:
    return math.isqrt(n) ** 2 == n


def resize_token_grid(targets: torch.Tensor, prefix: int, tokens_out: int) -> torch.Tensor:
    """Resample the patch tokens of ``[B, prefix + g*g, D]`` to ``tokens_out`` total tokens
    (bilinear, antialiased when shrinking), keeping the prefix (CLS) tokens as they are.
    Done on the raw map, before the loss whitens each token."""
    if targets.shape[1] == tokens_out:
        return targets
    B, L, D = targets.shape
    g_in, g_out = math.isqrt(L - prefix), math.isqrt(tokens_out - prefix)
    grid = targets[:, prefix:].float().transpose(1, 2).reshape(B, D, g_in, g_in)
    grid = F.interpolate(grid, size=(g_out, g_out), mode="bilinear", align_corners=False,
                         antialias=g_out < g_in)
    patches = grid.reshape(B, D, g_out * g_out).transpose(1, 2).to(targets.dtype)
    return torch.cat([targets[:, :prefix], patches], dim=1)


def export_state_dict(student: FDStudent) -> dict[str, torch.Tensor]:
    """The backbone alone, as ``timm.create_model(name, **same_options)`` loads it."""
    return {k: v.detach().cpu().contiguous() for k, v in student.backbone.state_dict().items()}
