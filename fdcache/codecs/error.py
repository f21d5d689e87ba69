"""How far a codec moves a map, measured where the loss sees it: after FD's whitening."""

from __future__ import annotations

import torch

__all__ = ["whitened_error"]


def whitened_error(reference: torch.Tensor, decoded: torch.Tensor, eps: float = 1e-5) -> dict[str, float]:
    """Relative L2, mean cosine and max abs difference after a non-affine LayerNorm per token."""
    a = torch.nn.functional.layer_norm(reference.double(), reference.shape[-1:], eps=eps)
    b = torch.nn.functional.layer_norm(decoded.double(), decoded.shape[-1:], eps=eps)
    rel_l2 = (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(a)).item()
    cos = torch.nn.functional.cosine_similarity(a.flatten(0, -2), b.flatten(0, -2), dim=-1).mean().item()
    return {"rel_l2": rel_l2, "cosine": cos, "max_abs": (a - b).abs().max().item()}
