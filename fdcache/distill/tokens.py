"""Token maps of any layout: prefix tokens (CLS, registers), then a ``rows x cols`` grid in
row-major order.

A ViT's ``forward_features`` gives ``[B, prefix + rows * cols, D]`` already. A hierarchical
timm model (Swin, SwinV2: ``output_fmt == "NHWC"``) gives its last stage as ``[B, H, W, C]``
with no prefix; it is flattened to ``[B, H * W, C]``. Teachers (what a store holds) and
students (what the FD head regresses) go through the same two functions, so their maps are
comparable token by token, and ``--resize-targets`` resamples one recorded grid to the other
(the rows and columns may differ), never guessing a grid from a token count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, FdcacheError

__all__ = ["flat_tokens", "token_layout", "check_token_layout", "resize_token_grid"]


def flat_tokens(features: torch.Tensor) -> torch.Tensor:
    """``[B, L, D]`` of a ``forward_features`` output whose layout :func:`token_layout` accepted."""
    return features.flatten(1, 2) if features.ndim == 4 else features


def token_layout(model: nn.Module, features: torch.Tensor, resolution: int, patch: int, what: str,
                 error: type[FdcacheError] = FdcacheError) -> tuple[int, int, int]:
    """``(rows, cols, prefix tokens)`` of ``model``'s map ``features`` (one probe image at
    ``resolution``). A ``[B, L, D]`` map is a square ``resolution // patch`` grid after its
    prefix tokens; a ``[B, H, W, C]`` map (timm ``output_fmt`` NHWC) is an ``H x W`` grid."""
    shape = tuple(features.shape)
    if features.ndim == 4 and getattr(model, "output_fmt", None) == "NHWC":
        return shape[1], shape[2], 0
    if features.ndim == 3:
        side = resolution // patch
        if shape[1] >= side * side:
            return side, side, shape[1] - side * side
        raise error(f"{what} makes {shape[1]} tokens at {resolution} px, fewer than its {side}x{side} grid of "
                    f"{patch} px patches: its map is not prefix tokens + a patch grid")
    raise error(f"{what}: forward_features gives {shape}; fdcache takes token maps [B, L, D] (ViT-style) and "
                "[B, H, W, C] grids (timm models with output_fmt NHWC: Swin, SwinV2), not [B, C, H, W] maps")


def check_token_layout(student, teacher, resize: bool, subset: float | None = None) -> None:
    """Refuse, before any step, a student whose map cannot be matched to the teacher's:
    other prefix tokens, or another grid without ``resize``. ``student``/``teacher``: specs
    with ``rows``, ``cols``, ``prefix_tokens`` and ``resolution`` (and ``name`` / ``label``).
    ``subset``: the fraction a token-subset store keeps (below 1): its rows index the teacher's
    grid, so only a student of that grid can be matched, ``resize`` or not."""
    if student.prefix_tokens != teacher.prefix_tokens:
        hint = " (a Swin / SwinV2 student for a Swin teacher)" if teacher.prefix_tokens == 0 else ""
        raise ConfigError(f"student {student.name} has {student.prefix_tokens} prefix token(s) (CLS, registers), "
                          f"the teacher's map ({teacher.label}) has {teacher.prefix_tokens} (--student): pick a "
                          f"student with {teacher.prefix_tokens} prefix token(s){hint}")
    if (student.rows, student.cols) == (teacher.rows, teacher.cols) or (resize and subset is None):
        return
    rows, cols = teacher.rows, teacher.cols
    stride = student.resolution // student.rows if student.resolution % student.rows == 0 else None
    if stride and rows == cols and student.rows == student.cols:
        match = f"--resolution {rows * stride} gives the student a {rows}x{cols} grid ({stride} px per token)"
    else:
        match = "no square student resolution matches it"
    head = (f"student {student.name} at {student.resolution} px ends in a {student.rows}x{student.cols} token grid, "
            f"the teacher's map ({teacher.label}) is a {rows}x{cols} grid")
    if subset is not None:
        raise ConfigError(f"{head}, and the store keeps {subset:g} of each view's patch tokens as rows of that grid, "
                          f"which --resize-targets cannot resample (--resolution): {match}, or extract a store of "
                          "every token")
    raise ConfigError(f"{head}: {match}; or pass --resize-targets to resample the teacher's grid to the student's "
                      "(bilinear)")


def resize_token_grid(targets: torch.Tensor, prefix: int, grid_in: tuple[int, int],
                      grid_out: tuple[int, int]) -> torch.Tensor:
    """Resample the ``grid_in`` tokens of ``[B, prefix + rows * cols, D]`` to ``grid_out``
    (bilinear, half-pixel centres, antialiased along an axis that shrinks), keeping the
    prefix tokens as they are. Done on the raw map, before the loss whitens each token."""
    if tuple(grid_in) == tuple(grid_out):
        return targets
    (r_in, c_in), (r_out, c_out) = grid_in, grid_out
    B, L, D = targets.shape
    if L != prefix + r_in * c_in:
        raise ValueError(f"{L} tokens is not {prefix} prefix + a {r_in}x{c_in} grid")
    grid = targets[:, prefix:].float().transpose(1, 2).reshape(B, D, r_in, c_in)
    grid = F.interpolate(grid, size=(r_out, c_out), mode="bilinear", align_corners=False,
                         antialias=r_out < r_in or c_out < c_in)
    patches = grid.reshape(B, D, r_out * c_out).transpose(1, 2).to(targets.dtype)
    return torch.cat([targets[:, :prefix], patches], dim=1)
