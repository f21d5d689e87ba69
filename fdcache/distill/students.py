"""Students: a timm ViT (or Swin) plus FD's per-token linear projection to the teacher's width.

FD's student is ViT-B/16 with a CLS token, no absolute position embedding, one relative
position bias shared by all blocks, layer scale 0.1 and drop path 0.2. In timm that is the
BEiT architecture (``beit_*``: ``use_shared_rel_pos_bias``, ``init_values``), so the default
student is ``beit_base_patch16_224`` with those options. Any other timm ViT name works too
(``vit_*`` gets layer scale and drop path; it keeps its absolute position embedding, as timm's
ViT has no shared relative bias). Hierarchical students (``swin_*``, ``swinv2_*``: FD's SwinV2
setting) regress their last stage's ``H x W`` grid (:mod:`.tokens`) and take drop path only:
timm's Swin and SwinV2 have no layer scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, FdcacheError
from .tokens import flat_tokens, token_layout

__all__ = ["PRESETS", "NO_LAYER_SCALE", "fd_options", "StudentSpec", "FDStudent", "build_student",
           "export_state_dict"]

# Small configs for tests, quickstart and CPU benchmarks (random init; same code path).
PRESETS = {
    "fd-tiny": ("beit_base_patch16_224", dict(embed_dim=64, depth=2, num_heads=2)),
    "fd-small": ("beit_base_patch16_224", dict(embed_dim=192, depth=4, num_heads=3)),
}


# timm families without a layer-scale option: FD's --layer-scale does not apply to them.
NO_LAYER_SCALE = ("swin",)


def fd_options(name: str, drop_path: float, layer_scale: float | None) -> dict:
    """FD's student options in timm's words, for the family ``name`` belongs to."""
    if name.startswith(NO_LAYER_SCALE):
        return dict(drop_path_rate=drop_path)
    if name.startswith("beit"):
        # use_fc_norm=False: the final norm acts on every token (FD regresses all tokens),
        # not only on the pooled vector; it also leaves no unused parameter for DDP.
        return dict(use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                    init_values=layer_scale, drop_path_rate=drop_path, use_fc_norm=False)
    return dict(init_values=layer_scale, drop_path_rate=drop_path)


@dataclass(frozen=True)
class StudentSpec:
    """The student's map: ``prefix_tokens``, then its last ``rows x cols`` grid (row-major)."""

    name: str
    resolution: int
    tokens: int
    prefix_tokens: int
    dim: int
    mean: tuple
    std: tuple
    rows: int
    cols: int

    @property
    def grid(self) -> tuple[int, int]:
        return self.rows, self.cols


class FDStudent(nn.Module):
    """``forward(images) -> [B, L_student, D_teacher]``: backbone tokens after its final
    norm (a hierarchical backbone's last stage, flattened), projected per token (FD's 1x1
    Conv1d == a Linear on the token dim). With several teachers (``teacher_dim`` a list),
    one projection per teacher in ``heads`` and ``forward`` returns their maps in that
    order; one teacher keeps FD's single ``head`` (its checkpoints and exports are unchanged)."""

    def __init__(self, backbone: nn.Module, teacher_dim: "int | list[int]", *, init_state: torch.Tensor | None = None):
        super().__init__()
        self.backbone = backbone
        dims = [teacher_dim] if isinstance(teacher_dim, int) else list(teacher_dim)
        heads = []
        for d in dims:
            # Each head from the same generator state (the one after the backbone): a
            # teacher's head starts as in that teacher's single-teacher run.
            if init_state is not None:
                torch.set_rng_state(init_state)
            heads.append(nn.Linear(backbone.num_features, d))
        if isinstance(teacher_dim, int):
            self.head = heads[0]
        else:
            self.heads = nn.ModuleList(heads)

    @property
    def projections(self) -> list[nn.Linear]:
        return [self.head] if hasattr(self, "head") else list(self.heads)

    def forward(self, x: torch.Tensor):
        tokens = flat_tokens(self.backbone.forward_features(x))
        if hasattr(self, "head"):
            return self.head(tokens)
        return [h(tokens) for h in self.heads]

    def no_weight_decay(self):
        return {f"backbone.{n}" for n in getattr(self.backbone, "no_weight_decay", lambda: set())()}


def build_student(name: str, teacher_dim: "int | list[int]", *, resolution: int | None = None, drop_path: float = 0.2,
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
        student = FDStudent(backbone, teacher_dim, init_state=torch.get_rng_state())
    patch = backbone.patch_embed.patch_size[0]
    if resolution and (resolution < patch or resolution % patch):
        raise ConfigError(f"--resolution {resolution}: student {name!r} needs a multiple of its patch size {patch}")
    res = resolution or backbone.patch_embed.img_size[0]
    with torch.no_grad():
        probe = backbone.forward_features(torch.zeros(1, 3, res, res))
    rows, cols, prefix = token_layout(backbone, probe, res, patch, f"student {name!r}", ConfigError)
    cfg = backbone.pretrained_cfg
    spec = StudentSpec(name=name, resolution=res, tokens=prefix + rows * cols, prefix_tokens=prefix,
                       dim=backbone.num_features, mean=tuple(cfg.get("mean", (0.5,) * 3)),
                       std=tuple(cfg.get("std", (0.5,) * 3)), rows=rows, cols=cols)
    return student, spec


def export_state_dict(student: FDStudent) -> dict[str, torch.Tensor]:
    """The backbone alone, as ``timm.create_model(name, **same_options)`` loads it."""
    return {k: v.detach().cpu().contiguous() for k, v in student.backbone.state_dict().items()}
