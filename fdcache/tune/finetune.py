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
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import distributed
from ..config import FinetuneConfig
from ..engine import RUN_FILES, Engine, FitResult, resume_checkpoint
from ..errors import DataError, FdcacheError, FinetuneError
from .classifiers import ModelSpec, init_model, save_export, templates_of, tokenizer_of
from .evaluate import eval_sets
from .imagefolder import EpochSampler, LabeledImages, classnames_for, find_classes, train_loader, train_transform

__all__ = ["PRESET_DIR", "preset_names", "load_preset", "make_config", "FinetuneTask", "finetune"]

PRESET_DIR = Path(__file__).parents[1] / "presets"


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
    if given.get("student_run"):
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


FinetuneResult = FitResult


class FinetuneTask:
    """The fine-tuning / FLYP task: model, data, loss, evaluation and export;
    :attr:`engine` holds the optimizer state and runs :meth:`fit`."""

    error = FinetuneError
    nonfinite_hint = "Lower the lr or resume from checkpoints/last.pt"
    outputs = ("model.json", "model.safetensors", "model_ema.safetensors", "open_clip_config.json",
               "timm/*", "open_clip/*", "init/*", "init/*/*")

    def __init__(self, cfg: FinetuneConfig):
        if cfg.mode not in ("finetune", "flyp"):
            raise FdcacheError(f"mode {cfg.mode!r}: finetune or flyp")
        self.cfg = cfg
        self.name = cfg.mode
        self.dist = d = distributed.init()
        self.device = distributed.device_for(d, cfg.device)
        self.out = Path(cfg.out)
        if cfg.resume:  # checked before anything is built
            resume_checkpoint(self.out, RUN_FILES + self.outputs)
        classes = find_classes(cfg.data)
        self.classnames = classnames_for(classes, cfg.classnames)
        if len(self.classnames) < 2:
            raise FdcacheError(f"{cfg.data} has {len(self.classnames)} class folder(s); fine-tuning needs two or more")
        templates_of(cfg.templates)  # fail early on a bad name
        if cfg.mode == "finetune" and cfg.auto_augment:
            try:  # timm parses the policy when it builds the transform: build a small one now
                train_transform("timm", 32, (0.5,) * 3, (0.5,) * 3, auto_augment=cfg.auto_augment)
            except Exception as e:
                raise FdcacheError(f"{cfg.auto_augment!r} is not a timm augmentation policy (--auto-augment): "
                                   f"give one such as rand-m9-mstd0.5-inc1, or none ({e})") from None
        # The eval sets are checked now, not after training (classes matched by name; a CLIP knows any).
        eval_sets(cfg.val, cfg.classnames, None if cfg.mode == "flyp" else self.classnames, option="--val")
        kind = "clip" if cfg.mode == "flyp" else "classifier"
        self.model, self.spec = init_model(
            model=cfg.model, pretrained=cfg.pretrained, random_init=cfg.random_init, student=cfg.student_run,
            kind=kind, classnames=self.classnames, head=cfg.head, templates=cfg.templates,
            resolution=cfg.resolution, drop_path=cfg.drop_path, init_seed=cfg.init_seed)
        self.spec = replace(self.spec, crop_pct=cfg.crop_pct)
        if cfg.freeze_patch_embed:
            self._patch_embed().requires_grad_(False)
        # Drop path and mixup draw from the global generators: seed them so runs (and resumes) repeat.
        torch.manual_seed(cfg.seed * 1000 + d.rank)
        np.random.seed((cfg.seed * 1000 + d.rank) % 2**32)  # numpy's legacy seed is 32-bit
        self._setup_data(classes)
        self._setup_loss()
        per_epoch = self.sampler.per_epoch // cfg.batch_size  # micro-batches per rank
        self.micro_per_epoch = per_epoch
        self.engine = Engine(self, self.model, cfg, d, self.device, micro_per_epoch=per_epoch)
        self._evaluated = 0

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

    # -- what the engine asks of the task ----------------------------------------
    def identity(self) -> dict:
        return {"spec": self.spec.to_dict()}

    def check_resume(self, ck: dict, path: Path) -> None:
        if ModelSpec.from_dict(ck["spec"]) != self.spec:
            raise FdcacheError(f"checkpoint {path} holds another model (or classes): resume with the "
                               "same --model/--student-run, --data and --head")

    def started(self, fresh: bool) -> None:
        if fresh and self.dist.is_main and (self.spec.kind == "clip" or self.spec.head == "zeroshot"):
            # The zero-shot starting point, for WiSE-FT (fdcache wise --zeroshot OUT/init).
            save_export(self.out / "init", self.spec, self.model, info={"steps": 0})

    def images_in(self, batch) -> int:
        return batch[0].shape[0]

    def where(self, batch) -> dict:
        return {"epoch": batch[3]}

    def after_step(self, last: bool) -> None:
        """With --val: score the sets when an epoch has ended inside this step."""
        done = self.engine.step * self.cfg.accum_steps // self.micro_per_epoch
        if self.cfg.val and done > self._evaluated and not last:
            self._evaluated = done
            self._eval_record(done - 1)

    def finish(self, checkpoint: Path) -> str | None:
        e = self.engine
        if self.cfg.val:
            self._eval_record((e.step * self.cfg.accum_steps - 1) // self.micro_per_epoch)
        if not self.dist.is_main:
            return None
        return str(save_export(self.out, self.spec, self.model, e.ema.module if e.ema is not None else None,
                               info={"steps": e.step, "eval": e.evals[-1] if e.evals else None,
                                     "checkpoint": checkpoint.name}))

    # -- the step ------------------------------------------------------------------
    def template_ids(self, epoch: int, index: torch.Tensor) -> torch.Tensor:
        """FLYP: the template of each sample this epoch (a fixed draw per (seed, epoch))."""
        if epoch not in self._template_ids:
            rng = np.random.default_rng([self.cfg.seed, epoch, 0xF1E7])
            self._template_ids = {epoch: torch.from_numpy(
                rng.integers(0, len(self.templates), size=len(self.dataset)))}
        return self._template_ids[epoch][index]

    def loss(self, batch, forward) -> torch.Tensor:
        """Cross-entropy (mixup/cutmix: soft targets) or FLYP's CLIP loss of one micro-batch;
        ``forward`` is the engine's model call, run inside the engine's autocast."""
        images, labels, index, epoch = batch
        images = images.to(self.device, non_blocking=True)
        if self.cfg.mode == "flyp":
            texts = self.prompts[labels, self.template_ids(epoch, index)].to(self.device, non_blocking=True)
            image_f, text_f, scale = forward(images, texts)[:3]
            return self.clip_loss(image_f.float(), text_f.float(), scale.float())
        labels = labels.to(self.device, non_blocking=True)
        if self.mixup is not None:
            images, soft = self.mixup(images, labels)
            return self.soft_loss(forward(images).float(), soft)
        logits = forward(images).float()
        return F.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)

    def after_update(self) -> None:
        if self.cfg.mode == "flyp":
            with torch.no_grad():
                self.model.logit_scale.clamp_(0, math.log(100))

    # -- evaluation ----------------------------------------------------------------
    def evaluate(self) -> dict:
        from .evaluate import evaluate

        results = {}
        ema = self.engine.ema
        models = {"model": self.model} | ({"ema": ema.module} if ema is not None else {})
        for which, model in models.items():
            was = model.training
            model.eval()
            results[which] = evaluate(model, self.spec, self.cfg.val, classnames=self.cfg.classnames,
                                      batch_size=self.cfg.eval_batch_size,
                                      workers=self.cfg.workers, device=self.device, amp=self.cfg.amp,
                                      dist=self.dist)
            model.train(was)
        return results

    # -- the data stream -----------------------------------------------------------
    def stream(self, micro_done: int = 0):
        """(images, labels, index, epoch) micro-batches from ``micro_done`` on."""
        cfg = self.cfg
        epoch, in_epoch = divmod(micro_done, self.micro_per_epoch)
        self._evaluated = epoch  # epochs finished (and evaluated, with --val) before this invocation
        self.sampler.start_epoch, self.sampler.skip = epoch, in_epoch * cfg.batch_size
        loader = iter(train_loader(self.dataset, self.sampler, cfg.workers, self.device.type == "cuda"))
        micro = micro_done
        while True:
            try:
                images, labels, index = next(loader)
            except DataError as e:  # from a worker: keep the message, drop its traceback text
                raise DataError(str(e).strip().rsplit("DataError: ", 1)[-1]) from None
            yield images, labels, index, micro // self.micro_per_epoch
            micro += 1

    def fit(self) -> FitResult:
        return self.engine.fit()

    def _eval_record(self, epoch: int) -> dict:
        return self.engine.record({"step": self.engine.step, "epoch": epoch, "eval": self.evaluate()})


def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    return FinetuneTask(cfg).fit()
