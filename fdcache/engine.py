"""Pieces every training loop here shares (distillation, fine-tuning, FLYP): precision,
schedule, random state, atomic checkpoints, the progress bar. Kept small: the loops own
their steps; this owns what must behave the same in all of them."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """``auto`` = bf16 on CUDA, full precision on CPU; ``bf16`` | ``fp16`` | ``none``."""
    amp = amp if amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    try:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]
    except KeyError:
        raise ValueError(f"amp must be auto, bf16, fp16 or none, not {amp!r}") from None


def cosine_schedule(optimizer, total_steps: int, warmup_steps: int, warmup_lr: float, min_lr: float):
    """timm's cosine schedule stepped per optimizer step (``step_update(step)``); it honours
    each group's ``lr_scale`` (layer-wise lr decay)."""
    from timm.scheduler import CosineLRScheduler

    return CosineLRScheduler(optimizer, t_initial=max(total_steps, 1), lr_min=min_lr,
                             warmup_t=min(warmup_steps, max(total_steps - 1, 0)),
                             warmup_lr_init=warmup_lr, t_in_epochs=False)


def rng_state() -> dict:
    """Every random stream a step may draw from (drop path, mixup, augmentation in-process)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path: Path) -> Path:
    """``torch.save`` to a temporary name, then rename: a crash leaves the old file whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


class _NoBar:
    def update(self, *a, **k): ...
    def close(self): ...


def progress_bar(total: int, enabled: bool, desc: str):
    """A tqdm bar showing the loss and images/s, or a no-op."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    class Bar:
        def __init__(self):
            self.t = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)

        def update(self, n, loss, rate):
            self.t.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:,.0f}", refresh=False)
            self.t.update(n)

        def close(self):
            self.t.close()

    return Bar()
