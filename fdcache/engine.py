"""The one training loop (distillation, fine-tuning, FLYP) and the setup they share.

open_clip's ``train_one_epoch(..., loss)`` is the pattern: a job supplies a *task* (its
batches, its loss, its export); :class:`Engine` owns everything else so it behaves the
same in all of them: DDP wrapping (or FSDP2 sharding, ``--shard-model``), compile, AMP and the grad scaler, the AdamW groups
(timm, with layer-wise decay), lr scaling, warmup + cosine, accumulation, clipping, EMA,
logging (``log.jsonl``, progress, TensorBoard), checkpoint/resume, interruption, and
non-finite / out-of-memory stops.

The loss is read back to the host only every ``log_every`` steps (summed on the device in
between), so on CUDA the loop never waits for the GPU queue to drain except when it logs.
"""

from __future__ import annotations

import json
import math
import os
import random
import shlex
import shutil
import signal
import sys
import threading
import time
import zipfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch

from . import distributed
from .errors import FdcacheError, Interrupted, cause_of
from .lock import AdvisoryLock
from .progress import Progress

__all__ = ["cosine_schedule", "rng_state", "set_rng_state", "atomic_save", "RUN_FILES", "run_files",
           "clear_run", "run_lock", "resume_checkpoint", "CHECKPOINT_KEYS", "load_checkpoint", "truncate_log", "resume_command",
           "stop_on_signals", "Task", "FitResult", "Engine"]


# -- small shared pieces --------------------------------------------------------------
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
    """``torch.save`` to a temporary name, then rename: a crash leaves the old file whole. A
    failed write (a full disk, a quota) removes the temporary file and is a named error; the
    previous checkpoint stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:  # a Python file: a failed write keeps its OSError (ENOSPC, EDQUOT, EFBIG)
            torch.save(obj, f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports a failed write as RuntimeError, the OSError inside
        tmp.unlink(missing_ok=True)
        os_error = next((x for x in (e, e.__context__, e.__cause__) if isinstance(x, OSError)), None)
        why = os_error.strerror or str(os_error) if os_error is not None else cause_of(e)
        raise FdcacheError(f"writing the checkpoint failed: {why} ({path}): free disk space (or raise the quota), "
                           "then resume; the previous checkpoint, if any, is unchanged") from e
    return path


# -- the run directory ------------------------------------------------------------------
# A sharded run's checkpoint is a folder (torch.distributed.checkpoint's files + run.pt).
RUN_FILES = ("log.jsonl", "checkpoints/last.pt", "checkpoints/nonfinite-step*.pt", "checkpoints/*.tmp",
             "checkpoints/last/*", "checkpoints/nonfinite-step*/*", "checkpoints/*.tmp/*", "checkpoints/*.old/*",
             "tb/events.out.tfevents.*")


def run_files(out: Path, patterns) -> list[Path]:
    """The files matching ``patterns`` (fdcache's own names) that exist under ``out``."""
    found = []
    for pat in patterns:
        found += sorted(p for p in out.glob(pat) if p.is_file())
    return found


def clear_run(out: Path, patterns) -> list[Path]:
    """Remove fdcache's files of a previous run (nothing else), then the folders they
    leave empty. Returns what was removed."""
    gone = run_files(out, patterns)
    for p in gone:
        p.unlink()
    for d in sorted({p.parent for p in gone}, key=lambda p: len(p.parts), reverse=True):
        if d != out and d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    return gone


def run_lock(out: str | Path) -> AdvisoryLock:
    """One writer per run directory: ``OUT.fdcache-lock`` beside it (:mod:`fdcache.lock`, as
    stores have), so a second run into the same ``--out`` is refused naming the first, even
    with ``--overwrite``; the file goes when its holder ends, a killed holder's lock with it."""
    return AdvisoryLock.beside(out, f"the run directory {out}")


def resume_checkpoint(out: Path, patterns) -> Path:
    """``OUT/checkpoints/last.pt`` (or a sharded run's ``last/`` folder, its ``run.pt`` checked)
    of the run ``--resume`` continues, checked cheaply before
    any model is built: it exists, and its archive index reads (torch checkpoints are zip
    archives; an empty, cut-short or foreign file has no index). ``patterns``: the run's files."""
    out = Path(out)
    sharded = out / "checkpoints" / "last"  # --shard-model: a torch.distributed.checkpoint folder
    last = sharded / "run.pt" if (sharded / "run.pt").exists() else out / "checkpoints" / "last.pt"
    if not last.exists():
        with run_lock(out):  # a run still writing OUT has not stopped: name its holder instead
            pass
        if not run_files(out, patterns):
            raise FdcacheError(f"there is no run to resume in {out} (--resume): start it without --resume "
                               "(or give the --out of the run to continue)")
        raise FdcacheError(f"the run in {out} stopped before its first checkpoint ({last} is missing) (--resume): "
                           "start it again without --resume, adding --overwrite to replace what it left")
    try:
        with zipfile.ZipFile(last) as z:
            z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise FdcacheError(f"the checkpoint is unreadable: {cause_of(e)} ({last}): restore it from a copy, or start "
                           "the run again without --resume (--overwrite replaces what the old run left)") from None
    return sharded if last.parent == sharded else last


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "ema", "step", "rng", "world", "config")


def load_checkpoint(path: Path, fix: str) -> dict:
    """A checkpoint :class:`Engine` wrote, as a dict. An empty, cut-short or foreign file is a
    named error saying ``fix``."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # EOFError (empty), RuntimeError (cut-short zip), UnpicklingError (not one)
        raise FdcacheError(f"the checkpoint is unreadable: {cause_of(e)} ({path}): {fix}") from None
    if not isinstance(ck, dict) or any(k not in ck for k in CHECKPOINT_KEYS):
        raise FdcacheError(f"the file is not an fdcache checkpoint (no {', '.join(CHECKPOINT_KEYS)}) ({path}): {fix}")
    return ck


def truncate_log(path: Path, step: int) -> None:
    """Keep the records of steps up to ``step`` (the checkpoint's): a resumed run logs each
    step once. A record without a step is kept; a line cut short by a crash is dropped.
    Rewritten atomically."""
    if not path.exists():
        return

    def step_of(line: str) -> float:
        try:
            return json.loads(line).get("step", 0)
        except json.JSONDecodeError:
            return math.inf

    keep = [line for line in path.read_text().splitlines() if line.strip() and step_of(line) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def resume_command() -> str:
    """The command line that continues this run."""
    argv = sys.argv[1:]
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)  # python -m fdcache / torchrun -m
    if Path(sys.argv[0]).name != "fdcache" and not (spec and spec.name.split(".")[0] == "fdcache"):
        return "the same call with resume=True"
    extra = [] if "--resume" in argv else ["--resume"]
    line = shlex.join(["fdcache", *[a for a in argv if a != "--overwrite"], *extra])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        line += " (under torchrun, with the same torchrun options)"
    return line


@contextmanager
def stop_on_signals():
    """While training: the first SIGINT/SIGTERM asks the loop to stop after its step (the
    returned list receives the signal number); a second one aborts at once."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if got:
            signal.signal(signum, old[signum])
            raise KeyboardInterrupt
        got.append(signum)
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              "(send it again to abort without one)", file=sys.stderr, flush=True)

    for s in old:
        signal.signal(s, handler)
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# -- what a job supplies ----------------------------------------------------------------
class Task(Protocol):
    """A training job as the loop sees it (see :class:`fdcache.distill.train.DistillTask`,
    :class:`fdcache.tune.finetune.FinetuneTask`)."""

    name: str  # progress label: train | finetune | flyp
    error: type[FdcacheError]  # its error type (non-finite loss, out of memory)
    nonfinite_hint: str
    outputs: tuple[str, ...]  # its files in OUT (glob patterns), besides RUN_FILES

    def stream(self, micro_done: int = 0) -> Iterator: ...  # micro-batches from that position on
    def loss(self, batch, forward) -> torch.Tensor: ...  # ``forward(x)``: the engine's model call, in its autocast;
    # or ``(loss, terms [T])`` when the task names ``term_names`` (each term logged beside the loss)
    def images_in(self, batch) -> int: ...  # images in one micro-batch on this rank
    def where(self, batch) -> dict: ...  # fields for the log record ({"epoch": e})
    def after_update(self) -> None: ...  # constrain parameters after each update
    def identity(self) -> dict: ...  # what a checkpoint must match to resume (saved with it)
    def check_resume(self, ck: dict, path: Path) -> None: ...
    def started(self, fresh: bool) -> None: ...  # after the checkpoint is loaded (or not)
    def after_step(self, last: bool) -> None: ...  # e.g. evaluation at an epoch's end
    def finish(self, checkpoint: Path) -> str | None: ...  # after the last step: export (rank 0)


@dataclass
class FitResult:
    out: str
    steps: int
    losses: list[float]
    images_per_s: float
    data_wait_fraction: float
    checkpoint: str
    export: str | None
    evals: list = field(default_factory=list)
    terms: list[dict] = field(default_factory=list)  # per logged step, when the task has loss terms


class Engine:
    """One run's training state (model, DDP, optimizer, schedule, scaler, EMA, step) and
    :meth:`fit`. Built once by the task from its model and config."""

    def __init__(self, task: Task, model: torch.nn.Module, cfg, dist, device: torch.device, *,
                 micro_per_epoch: int, total_micro: int | None = None):
        """``micro_per_epoch``: micro-batches per rank in the first epoch (for warmup in
        epochs); ``total_micro``: in all of ``cfg.epochs`` when epochs differ."""
        from timm.optim import create_optimizer_v2

        self.task, self.model, self.cfg, self.dist, self.device = task, model, cfg, dist, device
        self.out = Path(cfg.out)
        if cfg.accum_steps < 1 or cfg.batch_size < 1:
            raise FdcacheError("--batch-size and --accum-steps must be at least 1")
        self.log_every = cfg.log_every or (10 if device.type == "cuda" else 1)
        model.to(device)
        self.amp_dtype = distributed.amp_dtype(cfg.amp, device)
        # --shard-model: FSDP2 instead of DDP (a single process has nothing to shard with, but
        # still saves the sharded checkpoint format, so it resumes and is resumed by any world).
        self.sharded = bool(getattr(cfg, "shard_model", False))
        if self.sharded and cfg.ema_decay:
            raise FdcacheError("--shard-model with --ema-decay: the EMA would be a full unsharded copy "
                               "on every rank; drop --ema-decay or --shard-model")
        self.ddp = model
        if dist.world > 1:
            self.ddp = distributed.shard(model, self.amp_dtype) if self.sharded else distributed.ddp(model, device)
        self.forward = torch.compile(self.ddp) if cfg.compile else self.ddp
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        # schedule
        steps_per_epoch = max(1, micro_per_epoch // cfg.accum_steps)
        if cfg.steps:
            self.total_steps = cfg.steps
        elif cfg.epochs:
            self.total_steps = (total_micro if total_micro is not None else cfg.epochs * micro_per_epoch) \
                // cfg.accum_steps
        else:
            raise FdcacheError("give --epochs N or --steps N")
        scale = cfg.batch_size * dist.world * cfg.accum_steps / cfg.lr_batch
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_epochs * steps_per_epoch)
        self.warmup_steps = min(warmup, max(self.total_steps - 1, 0))
        kw = {}
        if cfg.layer_decay is not None:
            if not hasattr(model, "group_matcher"):
                raise FdcacheError(f"this model ({type(model).__name__}) has no layer grouping for "
                                   "--layer-decay; pass --layer-decay 1")
            kw["layer_decay"] = cfg.layer_decay
        self.optimizer = create_optimizer_v2(model, opt="adamw", lr=cfg.base_lr * scale,
                                             weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8, **kw)
        self.scheduler = cosine_schedule(self.optimizer, self.total_steps, self.warmup_steps,
                                         warmup_lr=cfg.warmup_lr * scale, min_lr=cfg.min_lr * scale)
        self.ema = None
        if cfg.ema_decay:
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(model, decay=cfg.ema_decay)
        self.step = 0
        self.log = None
        self.evals: list[dict] = []
        self.term_names: list[str] = list(getattr(task, "term_names", ()))
        self.last_terms: torch.Tensor | None = None  # the last micro-batch's loss terms (detached)
        self.window_terms: dict[str, float] = {}  # the last read-back's mean of each term
        self.term_log: list[dict] = []

    # -- the step ------------------------------------------------------------------
    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def loss(self, batch) -> torch.Tensor:
        """The task's loss of one micro-batch, the model called through the engine (DDP,
        compile) inside the engine's autocast: the loop owns precision, the task the loss."""
        with self.autocast():
            return self.task.loss(batch, self.forward)

    def forward_backward(self, batch, sync: bool = True) -> torch.Tensor:
        """The task's loss on one micro-batch, backward (scaled for AMP and accumulation);
        DDP all-reduces (FSDP reduce-scatters) the gradients only on the last micro-batch (``sync``)."""
        ctx = nullcontext()
        if self.sharded and self.dist.world > 1:
            self.model.set_requires_gradient_sync(sync)
        elif not sync and self.dist.world > 1:
            ctx = self.ddp.no_sync()
        with ctx:
            loss = self.loss(batch)
            if isinstance(loss, tuple):
                loss, self.last_terms = loss
            self.scaler.scale(loss / self.cfg.accum_steps).backward()
        return loss.detach()

    def optimizer_step(self) -> None:
        """Unscale and clip (when asked), step through the grad scaler, zero the grads, the
        task's ``after_update``, the EMA, count the step."""
        if self.cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.task.after_update()
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        self.step += 1

    # -- checkpoints ---------------------------------------------------------------
    def run_state(self) -> dict:
        """Everything but the model and optimizer tensors (small, held whole by rank 0)."""
        return {"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None, "step": self.step,
                "rng": rng_state(), "world": self.dist.world, "config": _plain(self.cfg)} | self.task.identity()

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()} | self.run_state()

    def checkpoint_path(self, name: str = "last.pt") -> Path:
        """``checkpoints/NAME.pt`` (one file, rank 0), or the folder ``checkpoints/NAME`` of a
        sharded run (torch.distributed.checkpoint: each rank writes its own shards)."""
        return self.out / "checkpoints" / (name.removesuffix(".pt") if self.sharded else name)

    def save(self, name: str = "last.pt") -> Path:
        """Called on every rank (a sharded save is a collective)."""
        path = self.checkpoint_path(name)
        if self.sharded:
            return self._save_sharded(path)
        if self.dist.is_main:
            atomic_save(self.state_dict(), path)
        return path

    def _save_sharded(self, path: Path) -> Path:
        """``dcp.save`` of the model and optimizer state (FQN keys, each rank its shards) into
        ``NAME.tmp``, rank 0 adds ``run.pt`` (schedule, scaler, step, every rank's RNG), then
        renames the folder over the old one: a crash leaves the old checkpoint whole."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        d = self.dist
        tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
        if d.is_main:
            for p in (tmp, old):  # fdcache's own leftovers of a save cut short
                if p.is_dir():
                    shutil.rmtree(p)
            tmp.mkdir(parents=True)
        d.barrier()
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp), no_dist=d.world == 1)
        rngs = d.all_gather(rng_state())
        if d.is_main:
            # model/optimizer: in the shards beside it
            atomic_save(self.run_state() | {"model": None, "optimizer": None, "rng": rngs, "format": "dcp"},
                        tmp / "run.pt")
            if path.is_dir():
                os.replace(path, old)
            os.replace(tmp, path)
            if old.is_dir():
                shutil.rmtree(old)
        d.barrier()
        return path

    def _load_sharded(self, path: Path) -> dict:
        """A sharded checkpoint into this run at any world size (DCP reshards on load): model
        and AdamW tensors are the saved values exactly. The step's data position is the same
        only for the same total batch, so that is required; each rank's RNG comes back only at
        the same world size (else the ranks keep their fresh seeds)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        ck = load_checkpoint(path / "run.pt", "restore the folder from a copy, or start the run again without "
                                              "--resume (--overwrite replaces what the old run left)")
        self.task.check_resume(ck, path)
        was, now = ck["config"], self.cfg
        total_was = ck["world"] * was["batch_size"] * was["accum_steps"]
        total_now = self.dist.world * now.batch_size * now.accum_steps
        if total_was != total_now:
            raise FdcacheError(f"checkpoint {path} ran {ck['world']} rank(s) x --batch-size {was['batch_size']} x "
                               f"--accum-steps {was['accum_steps']} = {total_was} images per step, now {total_now}: "
                               "resume with the same total batch (the data position and schedule depend on it)")
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=str(path), no_dist=self.dist.world == 1)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        ck["rng"] = ck["rng"][self.dist.rank] if ck["world"] == self.dist.world else None
        return ck

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict on rank 0 (gathered from the shards of a sharded run;
        a collective then, so every rank calls it; other ranks get ``{}``)."""
        if not (self.sharded and self.dist.world > 1):
            return self.model.state_dict() if self.dist.is_main else {}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load(self, path: Path) -> None:
        """Load a checkpoint of this run (a file, or a sharded run's folder); an empty,
        truncated or foreign file is a named error."""
        fix = ("restore it from a copy, or start the run again without --resume (--overwrite replaces what the "
               "old run left)")
        if path.is_dir():
            try:
                ck = self._load_sharded(path)
            except FdcacheError:
                raise
            except Exception as e:  # another model or optimizer, a damaged shard file
                raise FdcacheError(f"the sharded checkpoint does not fit this run or is damaged ({cause_of(e)}) "
                                   f"({path}): resume with the options it was started with, or {fix}") from None
        else:
            ck = load_checkpoint(path, fix)
            self.task.check_resume(ck, path)
            if ck["world"] != self.dist.world:
                raise FdcacheError(f"checkpoint {path} ran on {ck['world']} rank(s), now {self.dist.world}: "
                                   "resume with the same world size (the data order depends on it)")
        try:
            if not path.is_dir():
                self.model.load_state_dict(ck["model"])
                self.optimizer.load_state_dict(ck["optimizer"])
            self.scheduler.load_state_dict(ck["scheduler"])
            self.scaler.load_state_dict(ck["scaler"])
            if self.ema is not None and ck["ema"] is not None:
                self.ema.load_state_dict(ck["ema"])
            self.step = int(ck["step"])
            if ck["rng"] is not None:
                set_rng_state(ck["rng"])
        except Exception as e:  # another model or optimizer: shapes, keys, groups
            raise FdcacheError(f"the checkpoint does not fit this run ({cause_of(e)}) ({path}): resume with "
                               "the options it was started with (OUT/config.json lists them)") from None

    def begin(self) -> bool:
        """``--resume``: load ``OUT/checkpoints/last.pt`` (or the sharded ``last/``, whichever
        this run has) and drop log records past it. A fresh
        run into an OUT that holds a run is refused unless ``--overwrite`` (which removes only
        fdcache's files of that run). True when this is a fresh start."""
        patterns = RUN_FILES + tuple(self.task.outputs)
        if self.out.exists() and not self.out.is_dir():
            raise FdcacheError(f"{self.out} is a file, not a run directory (--out): choose another --out")
        if self.cfg.resume:
            self.load(resume_checkpoint(self.out, patterns))
            if self.dist.is_main:
                truncate_log(self.out / "log.jsonl", self.step)
        else:
            held = run_files(self.out, patterns)
            if held and not self.cfg.overwrite:
                names = ", ".join(p.relative_to(self.out).as_posix() for p in held[:4])
                raise FdcacheError(f"{self.out} already holds a run ({names}): pass --resume to continue it, "
                                   "--overwrite to replace it (removes only fdcache's files there), "
                                   "or choose another --out")
            self.dist.barrier()
            if held and self.dist.is_main:
                clear_run(self.out, patterns)
        self.dist.barrier()
        self.out.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            from .runinfo import record_run

            record_run(self.out, self.task.name, self.cfg.to_dict(), preset=getattr(self.cfg, "preset", None),
                       resume=self.cfg.resume)
        return not self.cfg.resume

    # -- logging -------------------------------------------------------------------
    def record(self, rec: dict) -> dict:
        """Append ``rec`` to ``log.jsonl`` (rank 0); evaluation records are also kept."""
        if self.log is not None:
            self.log.write(json.dumps(rec) + "\n")
            self.log.flush()
        if "eval" in rec:
            self.evals.append(rec)
        return rec

    def read_back(self, loss_sum: torch.Tensor, micro_batches: int, first_step: int,
                  stop_asked: bool, terms_sum: torch.Tensor | None = None) -> tuple[float, bool]:
        """The window's mean loss over micro-batches and ranks, read to the host (the one
        device sync per log), and whether any rank was asked to stop (packed into the same
        all-reduce, with the loss terms' means, left in :attr:`window_terms`). A non-finite
        loss saves the state under its step and stops the run."""
        parts = [(loss_sum.float() / micro_batches).reshape(1),
                 torch.tensor([float(stop_asked)], device=loss_sum.device)]
        if terms_sum is not None:
            parts.append(terms_sum.float() / micro_batches)
        packed = torch.cat(parts)
        if self.dist.world > 1:
            torch.distributed.all_reduce(packed)
            packed[0] /= self.dist.world
            packed[2:] /= self.dist.world
        value, stop, *terms = packed.tolist()
        self.window_terms = dict(zip(self.term_names, terms))
        if not math.isfinite(value):
            bad = self.save(f"nonfinite-step{self.step}.pt")
            where = f"at step {self.step}" if first_step == self.step else f"in steps {first_step}..{self.step}"
            raise self.task.error(f"loss is {value} {where}; state saved to {bad}. {self.task.nonfinite_hint}")
        return value, stop > 0

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise FdcacheError("--tensorboard needs the tensorboard package: pip install 'fdcache[tensorboard]'") from e
        return SummaryWriter(str(self.out / "tb"))

    # -- the loop ------------------------------------------------------------------
    def fit(self) -> FitResult:
        """Run (or resume) to ``total_steps`` (or ``run_steps`` more), then checkpoint and,
        when done, the task's export. SIGINT/SIGTERM: checkpoint after the step, then
        :class:`Interrupted` naming the resume command. The run directory has one writer:
        rank 0 holds its lock (:func:`run_lock`) from the first look at ``OUT`` to the end."""
        cfg, d, task = self.cfg, self.dist, self.task
        lock = run_lock(self.out)
        error = None
        if d.is_main:
            try:
                lock.__enter__()
            except FdcacheError as e:
                error = e
        error = d.broadcast(error)
        if error is not None:
            raise error
        try:
            task.started(self.begin())
            stop = self.total_steps if cfg.run_steps is None else min(self.total_steps, self.step + cfg.run_steps)
            self.log = open(self.out / "log.jsonl", "a") if d.is_main else None
            losses, seen, wait, signum, elapsed = self._loop(stop)
            ckpt = self.save()
            if signum is not None:
                raise Interrupted(f"{signal.Signals(signum).name} at step {self.step}/{self.total_steps}: "
                                  f"checkpoint saved to {ckpt}. Resume with: {resume_command()}", int(signum))
            export = task.finish(ckpt) if self.step >= self.total_steps else None
        finally:
            if self.log is not None:
                self.log.close()
                self.log = None
            lock.__exit__(None, None, None)
        d.barrier()
        return FitResult(out=str(self.out), steps=self.step, losses=losses,
                         images_per_s=seen / max(elapsed, 1e-9), data_wait_fraction=wait / max(elapsed, 1e-9),
                         checkpoint=str(ckpt), export=export, evals=list(self.evals), terms=list(self.term_log))

    def _window(self, t: float) -> dict:
        """What is summed between two read-backs (the loss stays on the device)."""
        return dict(t=t, images=0, wait=0.0, micro=0, first=self.step + 1, loss=torch.zeros((), device=self.device),
                    terms=torch.zeros(len(self.term_names), device=self.device) if self.term_names else None)

    def _loop(self, stop: int):
        cfg, d, task = self.cfg, self.dist, self.task
        tb = self._tensorboard() if cfg.tensorboard and d.is_main else None
        bar = Progress(task.name, self.total_steps, completed=self.step, enabled=cfg.progress and d.is_main)
        losses, seen, wait_total, signum = [], 0, 0.0, None
        term_log = self.term_log = []
        t_start = time.perf_counter()
        w = self._window(t_start)
        self.model.train()
        try:
            with stop_on_signals() as signals:
                stream = task.stream(self.step * cfg.accum_steps)
                while self.step < stop:
                    self.scheduler.step_update(self.step)
                    for m in range(cfg.accum_steps):
                        t0 = time.perf_counter()
                        batch = next(stream)
                        waited = time.perf_counter() - t0
                        w["wait"] += waited
                        wait_total += waited
                        w["loss"] += self.forward_backward(batch, sync=m == cfg.accum_steps - 1)
                        if w["terms"] is not None:
                            w["terms"] += self.last_terms
                        w["images"] += task.images_in(batch) * d.world
                        w["micro"] += 1
                    self.optimizer_step()
                    # One process stops on its own signal after this step; ranks agree at read-backs.
                    asked = bool(signals) and d.world == 1
                    if self.step % self.log_every == 0 or self.step == stop or asked:
                        value, stop_all = self.read_back(w["loss"], w["micro"], w["first"], bool(signals),
                                                         w["terms"])
                        now = time.perf_counter()
                        span = max(now - w["t"], 1e-9)
                        terms = {"loss_terms": self.window_terms} if self.term_names else {}
                        rec = self.record({"step": self.step, **task.where(batch), "loss": value, **terms,
                                           "lr": max(g["lr"] for g in self.optimizer.param_groups),
                                           "images_per_s": w["images"] / span, "data_wait": w["wait"] / span})
                        losses.append(value)
                        if terms:
                            term_log.append(self.window_terms)
                        seen += w["images"]
                        if tb:
                            for k in ("loss", "lr", "images_per_s", "data_wait"):
                                tb.add_scalar(f"{task.name}/{k}", rec[k], self.step)
                            for k, v in self.window_terms.items():
                                tb.add_scalar(f"{task.name}/loss_term/{k}", v, self.step)
                        bar.update(self.step, loss=value, img_s=rec["images_per_s"])
                        w = self._window(now)
                        if stop_all:
                            signum = signals[0] if signals else signal.SIGTERM
                            break
                    else:
                        bar.update(self.step)
                    task.after_step(self.step == stop)
                    if self.step % cfg.save_every == 0 and self.step < stop:
                        self.save()
        except torch.OutOfMemoryError as e:
            raise task.error(f"out of device memory at step {self.step} with --batch-size {cfg.batch_size}: "
                             "lower --batch-size and raise --accum-steps to keep the total batch") from e
        finally:
            bar.close()
            if tb:
                tb.close()
        return losses, seen, wait_total, signum, time.perf_counter() - t_start


def _plain(cfg) -> dict:
    to_dict = getattr(cfg, "to_dict", None)
    if to_dict is not None:
        return to_dict()
    from dataclasses import asdict
    return asdict(cfg)
