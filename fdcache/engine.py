"""Pieces every training loop here shares (distillation, fine-tuning, FLYP): precision,
schedule, random state, atomic checkpoints, the progress bar. Kept small: the loops own
their steps; this owns what must behave the same in all of them."""

from __future__ import annotations

import math
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


class Loop:
    """The mechanics the training loops share. A subclass sets ``cfg`` (``out``, ``resume``,
    ``clip_grad``), ``out``, ``dist``, ``model``, ``optimizer``, ``scheduler``, ``scaler``,
    ``ema`` and ``step``, and adds what identifies its run to :meth:`state_dict` and checks
    it in :meth:`check_checkpoint`."""

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None, "step": self.step,
                "rng": rng_state(), "world": self.dist.world}

    def check_checkpoint(self, ck: dict, path: Path) -> None:
        from .errors import FdcacheError

        if ck["world"] != self.dist.world:
            raise FdcacheError(f"checkpoint {path} ran on {ck['world']} rank(s), now {self.dist.world}: "
                               "resume with the same world size (the data order depends on it)")

    def save(self, name: str = "last.pt") -> Path:
        path = self.out / "checkpoints" / name
        if self.dist.is_main:
            atomic_save(self.state_dict(), path)
        return path

    def load(self, path: Path) -> None:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        self.check_checkpoint(ck, path)
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        if self.ema is not None and ck["ema"] is not None:
            self.ema.load_state_dict(ck["ema"])
        self.step = ck["step"]
        set_rng_state(ck["rng"])

    def begin(self) -> bool:
        """Resume from ``OUT/checkpoints/last.pt`` with ``--resume``; refuse to start over an
        existing run without it. True when this is a fresh start."""
        from .errors import FdcacheError

        last = self.out / "checkpoints" / "last.pt"
        if self.cfg.resume:
            if not last.exists():
                raise FdcacheError(f"--resume: no checkpoint at {last}")
            self.load(last)
        elif last.exists():
            raise FdcacheError(f"{self.out} already holds a run (checkpoints/last.pt): pass --resume to "
                               "continue it, or choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        return not self.cfg.resume

    def optimizer_step(self) -> None:
        """Unscale and clip (when asked), step through the grad scaler, zero the grads,
        :meth:`after_update`, update the EMA, count the step."""
        if self.cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.after_update()
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        self.step += 1

    def after_update(self) -> None:
        """Hook: constrain parameters after each update (before the EMA sees them)."""

    error = None  # the subclass's error type (an FdcacheError)
    nonfinite_hint = "Lower the lr or resume from checkpoints/last.pt"

    def logged_loss(self, loss_sum: torch.Tensor, micro_batches: int) -> float:
        """The step's loss averaged over micro-batches and ranks, read back (one device sync);
        a non-finite value saves the state under its step and stops the run."""
        loss = loss_sum / micro_batches
        if self.dist.world > 1:
            torch.distributed.all_reduce(loss)
            loss /= self.dist.world
        value = loss.item()
        if not math.isfinite(value):
            bad = self.save(f"nonfinite-step{self.step}.pt")
            raise self.error(f"loss is {value} at step {self.step}; state saved to {bad}. {self.nonfinite_hint}")
        return value

    def out_of_memory(self) -> Exception:
        return self.error(f"out of device memory at step {self.step} with --batch-size {self.cfg.batch_size}: "
                          "lower --batch-size and raise --accum-steps to keep the total batch")
