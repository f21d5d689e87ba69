"""``fdcache train``: feature distillation of a timm student on cached (or online) targets.

FD's recipe (see the feature-distillation reference): AdamW (0.9, 0.999), lr 3e-4 per 512
images of total batch, warmup from 5e-7 then cosine to 5e-6 (both scaled alike), weight
decay 0.05 with timm's no-decay groups, gradient-norm clip 3.0, loss
``smooth_l1(proj(student(x)), layer_norm(target), beta=2)``. A step is one optimizer update
over ``accum_steps`` micro-batches of ``batch_size`` per rank. Offline epoch ``e`` replays the
store's seed ``e mod S``; ``--online`` runs the teacher on the same pixels instead.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .engine import Loop, amp_dtype, cosine_schedule, progress_bar
from .errors import FdcacheError, StoreError, StoreMismatchError
from .kernels import fd_loss
from .loader import Batch, batches
from .manifest import index, stat_changes
from .pixels import dali_device
from .sources import TrainSource
from .store import Store
from .students import DEFAULT_STUDENT, build_student, check_token_layout, export_state_dict, resize_token_grid
from .teachers import load_teacher
from .views import ViewPolicy


class TrainError(FdcacheError):
    """Training cannot go on (non-finite loss, out of memory): says where and what to do."""


@dataclass
class TrainConfig:
    out: str
    data: str | None = None
    cache: str | None = None
    online: bool = False
    teacher: str | None = None
    pretrained: str | None = None
    random_init: bool = False
    init_seed: int = 0
    student: str = DEFAULT_STUDENT
    student_overrides: dict = field(default_factory=dict)
    resolution: int | None = None  # student input size (default: the teacher's)
    drop_path: float = 0.2
    layer_scale: float | None = 0.1
    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 128  # per rank, per micro-batch
    accum_steps: int = 1
    base_lr: float = 3e-4  # per lr_batch images of total batch
    warmup_lr: float = 5e-7
    min_lr: float = 5e-6
    lr_batch: int = 512
    warmup_epochs: float = 10.0
    warmup_steps: int | None = None
    weight_decay: float = 0.05
    clip_grad: float | None = 3.0
    ema_decay: float | None = None
    loss_impl: str = "auto"
    amp: str = "auto"  # auto (bf16 on CUDA, none on CPU) | bf16 | fp16 | none
    compile: bool = False
    seed: int = 0
    global_seed: int = 0  # online views
    policy: ViewPolicy = field(default_factory=ViewPolicy)
    resize_targets: bool = False
    allow_partial: bool = False
    resume: bool = False
    save_every: int = 1000
    run_steps: int | None = None  # stop this invocation after this many steps (job limits)
    log_every: int = 1
    tensorboard: bool = False
    num_threads: int = 4
    loader_workers: int = 0  # >0: DALI parallel external source with that many processes
    device: str = "auto"
    progress: bool = True
    check_data: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["policy"] = self.policy.to_dict()
        return d


@dataclass
class TrainResult:
    out: str
    steps: int
    losses: list[float]
    images_per_s: float
    data_wait_fraction: float
    checkpoint: str
    export: str | None


def _lr_scale(cfg: TrainConfig, world: int) -> float:
    return cfg.batch_size * world * cfg.accum_steps / cfg.lr_batch


class Trainer(Loop):
    """Sets up data, models, optimizer and schedule; :meth:`fit` runs the loop."""

    error = TrainError
    nonfinite_hint = "Lower the lr, check the store (fdcache verify), or resume from checkpoints/last.pt"

    def __init__(self, cfg: TrainConfig, teacher=None):
        self.cfg = cfg
        self._given_teacher = teacher
        self.dist = d = distributed.init()
        self.device = distributed.device_for(d, cfg.device)
        # Drop path draws from the global generator: seed it so runs (and resumes) repeat.
        torch.manual_seed(cfg.seed * 1000 + d.rank)
        self.out = Path(cfg.out)
        if cfg.online == bool(cfg.cache):
            raise FdcacheError("give exactly one of --cache STORE (offline) or --online --teacher T")
        if cfg.online:
            self._setup_online()
        else:
            self._setup_offline()
        self._setup_student()
        self._setup_schedule()

    # -- data ----------------------------------------------------------------------
    def _setup_offline(self):
        cfg = self.cfg
        self.store = store = Store.open(cfg.cache)
        info = store.info
        self.teacher = None
        self.tspec = info.teacher
        self.manifest = store.manifest(root=cfg.data)
        if cfg.check_data:
            error = None
            if self.dist.is_main:
                changes = stat_changes(self.manifest)
                if changes:
                    error = StoreMismatchError(
                        f"image folder {self.manifest.root} no longer matches the store's manifest "
                        f"({len(changes)} file(s)): " + "; ".join(changes[:5]) +
                        ". Re-extract, or point --data at the folder the store was made from.")
            error = self.dist.broadcast(error)
            if error is not None:
                raise error
        seeds = store.num_seeds
        epochs_needed = cfg.epochs
        needed = sorted({e % seeds for e in range(epochs_needed)}) if epochs_needed else list(range(seeds))
        done = store.done()
        self.eligible = {s: store.eligible(s) for s in range(seeds)}
        missing = [f"seed {s}: {int(done[s].sum())}/{done.shape[1]} shards" for s in needed if not done[s].all()]
        if missing and not cfg.allow_partial:
            raise StoreError(f"store {cfg.cache} is incomplete for the seeds this run needs ("
                             + "; ".join(missing) + "). Finish extraction (re-run fdcache extract) "
                             "or pass --allow-partial to train on completed shards only.")
        self.source = TrainSource(
            files=[self.manifest.abspath(i) for i in range(len(self.manifest))],
            eligible=self.eligible, batch_size=cfg.batch_size, rank=self.dist.rank, world=self.dist.world,
            run_seed=cfg.seed, reader=store.reader())

    def _setup_online(self):
        cfg = self.cfg
        if not cfg.teacher or not cfg.data:
            raise FdcacheError("--online needs --teacher and --data")
        self.store = None
        self.teacher = self._given_teacher or load_teacher(
            cfg.teacher, cfg.pretrained, random_init=cfg.random_init, init_seed=cfg.init_seed,
            resolution=cfg.resolution, device=self.device)
        self.tspec = self.teacher.spec
        self.manifest = index(cfg.data)
        good = np.flatnonzero(~self.manifest.bad).astype(np.int64)
        self.eligible = {0: good}
        self.source = TrainSource(
            files=[self.manifest.abspath(i) for i in range(len(self.manifest))], eligible=self.eligible,
            batch_size=cfg.batch_size, rank=self.dist.rank, world=self.dist.world, run_seed=cfg.seed,
            widths=self.manifest.widths, heights=self.manifest.heights, policy=cfg.policy,
            global_seed=cfg.global_seed)

    # -- models --------------------------------------------------------------------
    def _setup_student(self):
        cfg, t = self.cfg, self.tspec
        res = cfg.resolution or t.resolution
        self.model, self.sspec = build_student(cfg.student, t.dim, resolution=res, drop_path=cfg.drop_path,
                                               layer_scale=cfg.layer_scale, overrides=cfg.student_overrides,
                                               seed=cfg.seed)
        check_token_layout(self.sspec, t.tokens, t.prefix_tokens, cfg.resize_targets)
        if cfg.online and res != t.resolution:
            raise FdcacheError(f"--online needs the student's resolution ({res}) to equal the teacher's "
                               f"({t.resolution}): both read the same pixels")
        self.model.to(self.device)
        self.ddp = self.model
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.ddp = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.forward = torch.compile(self.ddp) if cfg.compile else self.ddp
        self.amp_dtype = amp_dtype(cfg.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.ema = None
        if cfg.ema_decay:
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay)
        # Teacher and student each normalize with their own mean/std; pixels are shared.
        s_mean = torch.tensor(self.sspec.mean, device=self.device).view(1, 3, 1, 1)
        s_std = torch.tensor(self.sspec.std, device=self.device).view(1, 3, 1, 1)
        t_mean = torch.tensor(t.mean, device=self.device).view(1, 3, 1, 1)
        t_std = torch.tensor(t.std, device=self.device).view(1, 3, 1, 1)
        self._renorm = (s_std / t_std, (s_mean - t_mean) / t_std)

    # -- schedule ------------------------------------------------------------------
    def _setup_schedule(self):
        from timm.optim import create_optimizer_v2

        cfg = self.cfg
        first = self.micro_batches(0)
        if first == 0:
            raise FdcacheError(f"{len(self.eligible[self.source.seed_of(0) if self.store else 0])} samples "
                               f"cannot fill one batch of {cfg.batch_size} x {self.dist.world} rank(s)")
        steps_per_epoch = max(1, first // cfg.accum_steps)
        if cfg.steps:
            self.total_steps = cfg.steps
        elif cfg.epochs:
            self.total_steps = sum(self.micro_batches(e) for e in range(cfg.epochs)) // cfg.accum_steps
        else:
            raise FdcacheError("give --epochs N or --steps N")
        scale = _lr_scale(cfg, self.dist.world)
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_epochs * steps_per_epoch)
        self.warmup_steps = min(warmup, max(self.total_steps - 1, 0))
        self.optimizer = create_optimizer_v2(self.model, opt="adamw", lr=cfg.base_lr * scale,
                                             weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8)
        self.scheduler = cosine_schedule(self.optimizer, self.total_steps, self.warmup_steps,
                                         warmup_lr=cfg.warmup_lr * scale, min_lr=cfg.min_lr * scale)
        self.step = 0

    def micro_batches(self, epoch: int) -> int:
        """Micro-batches per rank in ``epoch`` (epochs differ only with --allow-partial)."""
        return self.source.samples_per_epoch(epoch) // self.cfg.batch_size

    def position(self, micro_done: int) -> tuple[int, int]:
        """(epoch, samples to skip in it) after ``micro_done`` micro-batches."""
        e = 0
        while True:
            n = self.micro_batches(e)
            if micro_done < n:
                return e, micro_done * self.cfg.batch_size
            micro_done -= n
            e += 1

    # -- checkpoints ---------------------------------------------------------------
    def state_dict(self) -> dict:
        return super().state_dict() | {"config": self.cfg.to_dict(), "teacher": self.tspec.to_dict(),
                                       "student": asdict(self.sspec)}

    def check_checkpoint(self, ck: dict, path: Path) -> None:
        if ck["teacher"] != self.tspec.to_dict():
            raise StoreMismatchError(f"checkpoint {path} was trained against another teacher/store")
        super().check_checkpoint(ck, path)

    # -- the step ------------------------------------------------------------------
    def targets_of(self, batch: Batch, images: torch.Tensor):
        """(targets, qparams) for the loss: from the store, or the teacher on the same pixels."""
        if self.teacher is not None:
            scale, shift = self._renorm
            targets, qparams = self.teacher(images * scale + shift), None
        else:
            if self.tspec.tokens != self.sspec.tokens:  # resample the decoded map
                stored = {k: v.to(self.device, non_blocking=True) for k, v in batch.stored.items()}
                targets, qparams = self.store.info.codec.decode(stored), None
            else:  # the codec's loss inputs (the fused kernel reads int8 as stored)
                targets = batch.targets.to(self.device, non_blocking=True)
                qparams = batch.qparams.to(self.device, non_blocking=True) if batch.qparams is not None else None
        if targets.shape[1] != self.sspec.tokens:
            targets = resize_token_grid(targets, self.tspec.prefix_tokens, self.sspec.tokens)
        return targets, qparams

    def forward_backward(self, batch: Batch, sync: bool = True) -> torch.Tensor:
        images = batch.images.to(self.device, non_blocking=True)
        targets, qparams = self.targets_of(batch, images)
        ctx = nullcontext() if sync or self.dist.world == 1 else self.ddp.no_sync()
        with ctx:
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                pred = self.forward(images)
            loss = fd_loss(pred, targets, qparams=qparams, impl=self.cfg.loss_impl)
            self.scaler.scale(loss / self.cfg.accum_steps).backward()
        return loss.detach()

    # -- the loop ------------------------------------------------------------------
    def stream(self):
        epoch, skip = self.position(self.step * self.cfg.accum_steps)
        self.source.start_epoch, self.source.skip_samples = epoch, skip
        self.source.batch_size = self.cfg.batch_size
        codec = self.store.info.codec if self.store else None
        return batches(self.source, codec=codec, resolution=self.sspec.resolution, mean=self.sspec.mean,
                       std=self.sspec.std, device=dali_device(), num_threads=self.cfg.num_threads,
                       parallel=self.cfg.loader_workers > 0, py_workers=max(1, self.cfg.loader_workers))

    def fit(self) -> TrainResult:
        cfg, d = self.cfg, self.dist
        self.begin()
        log = open(self.out / "log.jsonl", "a") if d.is_main else None
        tb = self._tensorboard() if cfg.tensorboard and d.is_main else None
        stop = self.total_steps if cfg.run_steps is None else min(self.total_steps, self.step + cfg.run_steps)
        stream = self.stream()
        bar = progress_bar(stop - self.step, enabled=cfg.progress and d.is_main, desc="train")
        losses, images_seen, wait_total = [], 0, 0.0
        t_start = time.perf_counter()
        window_t, window_images, window_wait = t_start, 0, 0.0
        self.model.train()
        try:
            while self.step < stop:
                self.scheduler.step_update(self.step)
                loss_sum = torch.zeros((), device=self.device)
                for m in range(cfg.accum_steps):
                    t0 = time.perf_counter()
                    batch = next(stream)
                    wait = time.perf_counter() - t0
                    window_wait += wait
                    wait_total += wait
                    loss_sum += self.forward_backward(batch, sync=m == cfg.accum_steps - 1)
                    window_images += batch.images.shape[0] * d.world
                self.optimizer_step()
                if self.step % cfg.log_every == 0 or self.step == stop:
                    value = self.logged_loss(loss_sum, cfg.accum_steps)
                    now = time.perf_counter()
                    rate = window_images / max(now - window_t, 1e-9)
                    rec = {"step": self.step, "epoch": batch.epoch, "loss": value,
                           "lr": self.optimizer.param_groups[0]["lr"], "images_per_s": rate,
                           "data_wait": window_wait / max(now - window_t, 1e-9)}
                    losses.append(value)
                    images_seen += window_images
                    window_t, window_images, window_wait = now, 0, 0.0
                    if log:
                        log.write(json.dumps(rec) + "\n"); log.flush()
                    if tb:
                        for k in ("loss", "lr", "images_per_s", "data_wait"):
                            tb.add_scalar(f"train/{k}", rec[k], self.step)
                    bar.update(cfg.log_every, loss=value, rate=rate)
                if self.step % cfg.save_every == 0 and self.step < stop:
                    self.save()
        except torch.OutOfMemoryError as e:
            raise self.out_of_memory() from e
        finally:
            bar.close()
            if log:
                log.close()
        ckpt = self.save()
        export = None
        if self.step >= self.total_steps and d.is_main:
            export = str(self.export())
        d.barrier()
        elapsed = time.perf_counter() - t_start
        return TrainResult(out=str(self.out), steps=self.step, losses=losses,
                           images_per_s=images_seen / max(elapsed, 1e-9),
                           data_wait_fraction=wait_total / max(elapsed, 1e-9), checkpoint=str(ckpt),
                           export=export)

    def export(self) -> Path:
        """``student.safetensors`` (the backbone, no FD head; EMA weights if kept) and
        ``student.json`` (the timm name and options to build it)."""
        from safetensors.torch import save_file

        from .students import PRESETS, fd_options

        model = self.ema.module if self.ema is not None else self.model
        name, kw = PRESETS.get(self.cfg.student, (self.cfg.student, {}))
        kwargs = dict(kw) | fd_options(name, self.cfg.drop_path, self.cfg.layer_scale) | self.cfg.student_overrides
        kwargs["img_size"] = self.sspec.resolution
        path = self.out / "student.safetensors"
        save_file(export_state_dict(model), str(path))
        (self.out / "student.json").write_text(json.dumps(
            {"timm_name": name, "kwargs": kwargs, "teacher": self.tspec.to_dict(), "steps": self.step,
             "ema": self.ema is not None}, indent=2))
        return path

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise FdcacheError("--tensorboard needs the tensorboard package (pip install tensorboard)") from e
        return SummaryWriter(str(self.out / "tb"))


def train(cfg: TrainConfig) -> TrainResult:
    return Trainer(cfg).fit()

