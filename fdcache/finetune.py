"""``fdcache finetune`` (supervised, the FT-CLIP recipe) and ``fdcache flyp`` (contrastive
fine-tuning with class-name prompts): one loop, two losses.

finetune: cross-entropy (label smoothing, or soft targets under timm's mixup/cutmix) on a
linear head; AdamW with timm's layer-wise lr decay groups, warmup + cosine per step, EMA
of the weights (timm ``ModelEmaV3``), optional gradient clipping and drop path.

flyp: each image's caption is a prompt template filled with its class name, a template
drawn per (seed, epoch, image); open_clip's ``ClipLoss`` with the model's learned logit
scale (clamped to ln 100 after each step, as open_clip's trainer does); both towers
update; evaluation through a zero-shot head rebuilt from the fine-tuned text tower.

Learning rates are given per ``lr_batch`` images of total batch and scaled linearly.
Presets (``fdcache/presets/*.json``) hold each paper's values and say where they come from.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed
from .classifiers import ModelSpec, init_model, save_export, templates_of, tokenizer_of
from .engine import Loop, amp_dtype, cosine_schedule, progress_bar
from .errors import DataError, FdcacheError
from .imagefolder import (EpochSampler, LabeledImages, classnames_for, find_classes, train_loader,
                          train_transform)

PRESET_DIR = Path(__file__).parent / "presets"


class FinetuneError(FdcacheError):
    """Fine-tuning cannot go on (non-finite loss, out of memory): says where and what to do."""


@dataclass
class FinetuneConfig:
    out: str
    data: str
    val: list = field(default_factory=list)  # eval sets: after each epoch and at the end
    mode: str = "finetune"  # finetune | flyp
    preset: str | None = None  # the recipe the values started from (recorded, not read)
    model: str | None = None
    pretrained: str | None = None
    random_init: bool = False
    init_seed: int = 0
    student: str | None = None
    resolution: int | None = None
    classnames: str = "folder"
    templates: str = "openai"
    head: str = "fresh"  # finetune: fresh (FT-CLIP) | zeroshot (text-tower init)
    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 64  # per rank, per micro-batch
    accum_steps: int = 1
    base_lr: float = 6e-4  # per lr_batch images of total batch
    lr_batch: int = 2048
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    warmup_steps: int | None = None
    weight_decay: float = 0.05
    layer_decay: float | None = 0.6
    drop_path: float = 0.0
    clip_grad: float | None = None
    ema_decay: float | None = 0.9998
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.25
    color_jitter: float = 0.4
    crop_pct: float = 0.875  # evaluation crop
    freeze_patch_embed: bool = False
    amp: str = "auto"
    compile: bool = False
    seed: int = 0
    resume: bool = False
    save_every: int = 1000
    run_steps: int | None = None
    log_every: int = 10
    eval_batch_size: int = 128
    workers: int = 4
    device: str = "auto"
    progress: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> dict:
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise FdcacheError(f"unknown preset {name!r}; choose from {preset_names()}")
    return json.loads(path.read_text())


def make_config(preset: str | None, **given) -> FinetuneConfig:
    """Dataclass defaults, then the preset's values, then what the caller gave (not None).

    Choosing a starting point explicitly (``random_init``, ``student``, ``model``) clears the
    preset's other starting-point fields, so ``--preset ft-clip-vit-b16 --random-init`` means
    random weights, not random and OpenAI weights at once."""
    values = {}
    if preset:
        p = load_preset(preset)
        if "mode" in given and p["mode"] != given["mode"]:
            raise FdcacheError(f"preset {preset} is a {p['mode']} preset, not {given['mode']}")
        values.update(p["values"])
    given = {k: v for k, v in given.items() if v is not None}
    if given.get("student"):
        values.pop("model", None)
        values.pop("pretrained", None)
    if given.get("random_init"):
        values.pop("pretrained", None)
    if given.get("pretrained") or given.get("model"):
        values.pop("random_init", None)
    if given.get("steps"):
        values.pop("epochs", None)
    if given.get("epochs"):
        values.pop("steps", None)
    values.update(given)
    values["preset"] = preset or None
    known = {f.name for f in fields(FinetuneConfig)}
    unknown = set(values) - known
    if unknown:
        raise FdcacheError(f"unknown setting(s) {sorted(unknown)}")
    cfg = FinetuneConfig(**values)
    # None means "not given" above, so the optional ingredients are turned off by value:
    # --ema-decay 0, --clip-grad 0, --layer-decay 1, --auto-augment none.
    cfg.ema_decay = cfg.ema_decay or None
    cfg.clip_grad = cfg.clip_grad or None
    cfg.layer_decay = None if cfg.layer_decay in (None, 1.0) else cfg.layer_decay
    cfg.auto_augment = None if (cfg.auto_augment or "none").lower() == "none" else cfg.auto_augment
    return cfg


@dataclass
class FinetuneResult:
    out: str
    steps: int
    losses: list
    images_per_s: float
    evals: list
    export: str | None


class Finetuner(Loop):
    """Sets up model, data, loss, optimizer and schedule; :meth:`fit` runs the loop."""

    error = FinetuneError
    def __init__(self, cfg: FinetuneConfig):
        if cfg.mode not in ("finetune", "flyp"):
            raise FdcacheError(f"mode {cfg.mode!r}: finetune or flyp")
        self.cfg = cfg
        self.dist = d = distributed.init()
        self.device = distributed.device_for(d, cfg.device)
        self.out = Path(cfg.out)
        classes = find_classes(cfg.data)
        self.classnames = classnames_for(classes, cfg.classnames)
        if len(self.classnames) < 2:
            raise FdcacheError(f"{cfg.data} has {len(self.classnames)} class folder(s); fine-tuning needs two or more")
        templates_of(cfg.templates)  # fail early on a bad name
        kind = "clip" if cfg.mode == "flyp" else "classifier"
        self.model, self.spec = init_model(
            model=cfg.model, pretrained=cfg.pretrained, random_init=cfg.random_init, student=cfg.student,
            kind=kind, classnames=self.classnames, head=cfg.head, templates=cfg.templates,
            resolution=cfg.resolution, drop_path=cfg.drop_path, init_seed=cfg.init_seed)
        self.spec = replace(self.spec, crop_pct=cfg.crop_pct)
        if cfg.freeze_patch_embed:
            self._patch_embed().requires_grad_(False)
        # Drop path and mixup draw from the global generators: seed them so runs (and resumes) repeat.
        torch.manual_seed(cfg.seed * 1000 + d.rank)
        np.random.seed(cfg.seed * 1000 + d.rank)
        self.model.to(self.device)
        self.ddp = self.model
        if d.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.ddp = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.forward = torch.compile(self.ddp) if cfg.compile else self.ddp
        self.amp_dtype = amp_dtype(cfg.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self._setup_data(classes)
        self._setup_loss()
        self._setup_schedule()
        self.ema = None
        if cfg.ema_decay:
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay)

    def _patch_embed(self):
        m = self.model
        if hasattr(m, "visual"):
            return m.visual.conv1
        if hasattr(m, "patch_embed"):
            return m.patch_embed
        raise FdcacheError("--freeze-patch-embed: this model has no patch embedding to freeze")

    def _setup_data(self, classes):
        cfg, s = self.cfg, self.spec
        tf = train_transform("clip" if cfg.mode == "flyp" else "timm", s.resolution, s.mean, s.std,
                             auto_augment=cfg.auto_augment, re_prob=cfg.re_prob, color_jitter=cfg.color_jitter)
        self.dataset = LabeledImages(cfg.data, tf, seed=cfg.seed, classes=classes)
        self.sampler = EpochSampler(len(self.dataset), cfg.batch_size, rank=self.dist.rank,
                                    world=self.dist.world, seed=cfg.seed)
        if self.sampler.per_epoch == 0:
            raise FdcacheError(f"{len(self.dataset)} images cannot fill one batch of {cfg.batch_size} x "
                               f"{self.dist.world} rank(s): lower --batch-size")

    def _setup_loss(self):
        cfg = self.cfg
        self.mixup = None
        if cfg.mode == "flyp":
            from open_clip import ClipLoss

            self.clip_loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=self.dist.rank,
                                      world_size=self.dist.world)
            tokenizer = tokenizer_of(self.spec)
            self.templates = templates_of(cfg.templates)
            texts = [t(c) for c in self.classnames for t in self.templates]
            self.prompts = tokenizer(texts).view(len(self.classnames), len(self.templates), -1)
            self._template_ids = {}
        elif cfg.mixup > 0 or cfg.cutmix > 0:
            from timm.data import Mixup

            if cfg.batch_size % 2:
                raise FdcacheError("mixup/cutmix need an even --batch-size")
            from timm.loss import SoftTargetCrossEntropy

            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                               num_classes=len(self.classnames))
            self.soft_loss = SoftTargetCrossEntropy()

    def _setup_schedule(self):
        from timm.optim import create_optimizer_v2

        cfg = self.cfg
        per_epoch = self.sampler.per_epoch // cfg.batch_size  # micro-batches per rank
        self.micro_per_epoch = per_epoch
        steps_per_epoch = max(1, per_epoch // cfg.accum_steps)
        if cfg.steps is not None:
            self.total_steps = cfg.steps
        elif cfg.epochs:
            self.total_steps = cfg.epochs * per_epoch // cfg.accum_steps
        else:
            raise FdcacheError("give --epochs N or --steps N")
        scale = cfg.batch_size * self.dist.world * cfg.accum_steps / cfg.lr_batch
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_epochs * steps_per_epoch)
        kw = {}
        if cfg.layer_decay is not None:
            if not hasattr(self.model, "group_matcher"):
                raise FdcacheError(f"{self.spec.name} has no layer grouping for --layer-decay; pass --layer-decay 1")
            kw["layer_decay"] = cfg.layer_decay
        self.optimizer = create_optimizer_v2(self.model, opt="adamw", lr=cfg.base_lr * scale,
                                             weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8, **kw)
        self.scheduler = cosine_schedule(self.optimizer, self.total_steps, warmup,
                                         warmup_lr=cfg.warmup_lr * scale, min_lr=cfg.min_lr * scale)
        self.step = 0

    # -- checkpoints ---------------------------------------------------------------
    def state_dict(self) -> dict:
        return super().state_dict() | {"config": self.cfg.to_dict(), "spec": self.spec.to_dict()}

    def check_checkpoint(self, ck: dict, path: Path) -> None:
        if ModelSpec.from_dict(ck["spec"]) != self.spec:
            raise FdcacheError(f"checkpoint {path} holds another model (or classes): resume with the "
                               "same --model/--student, --data and --head")
        super().check_checkpoint(ck, path)

    # -- the step ------------------------------------------------------------------
    def template_ids(self, epoch: int, index: torch.Tensor) -> torch.Tensor:
        """FLYP: the template of each sample this epoch (a fixed draw per (seed, epoch))."""
        if epoch not in self._template_ids:
            rng = np.random.default_rng([self.cfg.seed, epoch, 0xF1E7])
            self._template_ids = {epoch: torch.from_numpy(
                rng.integers(0, len(self.templates), size=len(self.dataset)))}
        return self._template_ids[epoch][index]

    def loss_of(self, images, labels, index, epoch) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            if self.cfg.mode == "flyp":
                texts = self.prompts[labels, self.template_ids(epoch, index)].to(self.device, non_blocking=True)
                image_f, text_f, scale = self.forward(images, texts)[:3]
                return self.clip_loss(image_f.float(), text_f.float(), scale.float())
            labels = labels.to(self.device, non_blocking=True)
            if self.mixup is not None:
                images, soft = self.mixup(images, labels)
                return self.soft_loss(self.forward(images).float(), soft)
            logits = self.forward(images).float()
            return F.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)

    def forward_backward(self, images, labels, index, epoch, sync: bool = True) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        ctx = nullcontext() if sync or self.dist.world == 1 else self.ddp.no_sync()
        with ctx:
            loss = self.loss_of(images, labels, index, epoch)
            self.scaler.scale(loss / self.cfg.accum_steps).backward()
        return loss.detach()

    def after_update(self) -> None:
        if self.cfg.mode == "flyp":
            with torch.no_grad():
                self.model.logit_scale.clamp_(0, math.log(100))

    # -- evaluation ----------------------------------------------------------------
    def evaluate(self) -> dict:
        from .evaluate import evaluate

        results = {}
        models = {"model": self.model} | ({"ema": self.ema.module} if self.ema is not None else {})
        for which, model in models.items():
            was = model.training
            model.eval()
            results[which] = evaluate(model, self.spec, self.cfg.val, classnames=self.cfg.classnames,
                                      batch_size=self.cfg.eval_batch_size,
                                      workers=self.cfg.workers, device=self.device, amp=self.cfg.amp,
                                      dist=self.dist)
            model.train(was)
        return results

    # -- the loop ------------------------------------------------------------------
    def fit(self) -> FinetuneResult:
        cfg, d = self.cfg, self.dist
        if self.begin() and d.is_main and (self.spec.kind == "clip" or self.spec.head == "zeroshot"):
            # The zero-shot starting point, for WiSE-FT (fdcache wise --zeroshot OUT/init).
            save_export(self.out / "init", self.spec, self.model, info={"steps": 0})
        log = open(self.out / "log.jsonl", "a") if d.is_main else None
        stop = self.total_steps if cfg.run_steps is None else min(self.total_steps, self.step + cfg.run_steps)
        micro = self.step * cfg.accum_steps
        epoch, in_epoch = divmod(micro, self.micro_per_epoch)
        self.sampler.start_epoch, self.sampler.skip = epoch, in_epoch * cfg.batch_size
        stream = iter(train_loader(self.dataset, self.sampler, cfg.workers, self.device.type == "cuda"))
        bar = progress_bar(stop - self.step, enabled=cfg.progress and d.is_main, desc=cfg.mode)
        losses, evals, seen = [], [], 0
        evaluated = epoch  # epochs finished (and evaluated, with --val) before this invocation
        t0 = window_t = time.perf_counter()
        window_images = 0
        self.model.train()
        try:
            while self.step < stop:
                self.scheduler.step_update(self.step)
                loss_sum = torch.zeros((), device=self.device)
                for m in range(cfg.accum_steps):
                    epoch = micro // self.micro_per_epoch
                    try:
                        images, labels, index = next(stream)
                    except DataError as e:  # from a worker: keep the message, drop its traceback text
                        raise DataError(str(e).strip().rsplit("DataError: ", 1)[-1]) from None
                    loss_sum += self.forward_backward(images, labels, index, epoch, sync=m == cfg.accum_steps - 1)
                    window_images += images.shape[0] * d.world
                    micro += 1
                self.optimizer_step()
                if self.step % cfg.log_every == 0 or self.step == stop:
                    value = self.logged_loss(loss_sum, cfg.accum_steps)
                    now = time.perf_counter()
                    rate = window_images / max(now - window_t, 1e-9)
                    rec = {"step": self.step, "epoch": epoch, "loss": value,
                           "lr": max(g["lr"] for g in self.optimizer.param_groups), "images_per_s": rate}
                    losses.append(value)
                    seen += window_images
                    window_t, window_images = now, 0
                    if log:
                        log.write(json.dumps(rec) + "\n"); log.flush()
                    bar.update(cfg.log_every, loss=value, rate=rate)
                if cfg.val and micro // self.micro_per_epoch > evaluated and self.step < stop:
                    evaluated = micro // self.micro_per_epoch
                    evals.append(self._eval_record(evaluated - 1, log))
                if self.step % cfg.save_every == 0 and self.step < stop:
                    self.save()
        except torch.OutOfMemoryError as e:
            raise self.out_of_memory() from e
        finally:
            bar.close()
        elapsed = time.perf_counter() - t0
        ckpt = self.save()
        export = None
        if self.step >= self.total_steps:
            if cfg.val:
                evals.append(self._eval_record((micro - 1) // self.micro_per_epoch, log))
            if d.is_main:
                export = str(save_export(self.out, self.spec, self.model,
                                         self.ema.module if self.ema is not None else None,
                                         info={"steps": self.step, "eval": evals[-1] if evals else None,
                                               "checkpoint": ckpt.name}))
        if log:
            log.close()
        d.barrier()
        return FinetuneResult(out=str(self.out), steps=self.step, losses=losses,
                              images_per_s=seen / max(elapsed, 1e-9), evals=evals, export=export)

    def _eval_record(self, epoch: int, log) -> dict:
        rec = {"step": self.step, "epoch": epoch, "eval": self.evaluate()}
        if log:
            log.write(json.dumps(rec) + "\n"); log.flush()
        return rec


def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    from .runinfo import record_run

    tuner = Finetuner(cfg)
    record_run(cfg.out, cfg.mode, cfg.to_dict(), preset=cfg.preset, resume=cfg.resume)
    return tuner.fit()
