"""Every training job's options, declared once: grouped dataclasses (run, schedule,
optimizer) that each job's config inherits, with the job's own fields and defaults. The CLI
takes its defaults from here (:func:`option_default`). Light on purpose: no torch import,
so ``fdcache --help`` stays fast."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .errors import ConfigError
from .options import require
from .store.views import ViewPolicy

__all__ = ["DEFAULT_STUDENT", "RunOptions", "ScheduleOptions", "OptimOptions", "option_default",
           "TrainConfig", "FinetuneConfig"]

DEFAULT_STUDENT = "beit_base_patch16_224"  # FD's ViT-B/16 (shared relative position bias)


@dataclass(kw_only=True)
class RunOptions:
    """Where the run lives and how it is driven, logged and checkpointed."""

    out: str
    resume: bool = False  # continue OUT from checkpoints/last.pt
    overwrite: bool = False  # replace the run in OUT (only the files fdcache wrote there)
    save_every: int = 1000  # checkpoint every N steps (and at the end or on SIGINT/SIGTERM)
    run_steps: int | None = None  # stop this invocation after N steps (job time limits)
    log_every: int | None = None  # None: 1 on CPU, 10 on CUDA (each log reads the loss back)
    tensorboard: bool = False  # also write scalars to OUT/tb
    amp: str = "auto"  # auto (bf16 on CUDA, none on CPU) | bf16 | fp16 | none
    compile: bool = False  # torch.compile the model
    seed: int = 0  # run seed: sample order, augmentation, drop path
    device: str = "auto"
    progress: bool = True


@dataclass(kw_only=True)
class ScheduleOptions:
    """How long, in what batches, and how the lr warms up (per optimizer step)."""

    epochs: int | None = None
    steps: int | None = None  # optimizer steps (instead of epochs)
    batch_size: int = 128  # images per rank per micro-batch
    accum_steps: int = 1  # micro-batches per optimizer step
    warmup_epochs: float = 10.0
    warmup_steps: int | None = None  # overrides warmup_epochs


@dataclass(kw_only=True)
class OptimOptions:
    """AdamW (0.9, 0.999) with timm's no-decay groups. lrs are given per ``lr_batch`` images
    of total batch and scaled linearly; warmup from ``warmup_lr``, cosine to ``min_lr``."""

    base_lr: float = 3e-4
    lr_batch: int = 512
    warmup_lr: float = 5e-7
    min_lr: float = 5e-6
    weight_decay: float = 0.05
    layer_decay: float | None = None  # layer-wise lr decay (timm's groups)
    clip_grad: float | None = None  # gradient-norm clip
    ema_decay: float | None = None  # EMA of the weights (timm ModelEmaV3)


def option_default(cls, name: str):
    """A config field's default, for the CLI's options (declared once, in the dataclass)."""
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if callable(f.default_factory) else f.default


@dataclass(kw_only=True)
class TrainConfig(RunOptions, ScheduleOptions, OptimOptions):
    """``fdcache train``: the shared run/schedule/optimizer groups (FD's values as their
    defaults, gradient clip 3.0) and what distillation adds."""

    clip_grad: float | None = 3.0
    data: str | None = None  # image folder (default for cache: the one recorded in the store)
    cache: str | list[str] | None = None  # store(s) made by fdcache extract (offline); several: one view set
    online: bool = False  # run the teacher in the loop instead of reading a store
    teacher: str | list[str] | None = None  # online: teacher name(s), as for extract
    teacher_weights: dict = field(default_factory=dict)  # --cache/--teacher as given -> loss weight (default 1)
    pretrained: str | None = None  # online: teacher weights tag or path
    random_init: bool = False  # online: seeded random teacher
    init_seed: int = 0  # online: seed of the random teacher's weights
    teacher_args: dict = field(default_factory=dict)  # online: timm options of the teacher
    student: str = DEFAULT_STUDENT  # timm ViT name, or fd-tiny / fd-small
    student_overrides: dict = field(default_factory=dict)  # timm options for the student
    resolution: int | None = None  # student input size (default: the teacher's)
    drop_path: float = 0.2
    layer_scale: float | None = 0.1
    loss_impl: str = "auto"  # auto (Triton on CUDA) | triton | torch
    global_seed: int = 0  # online views
    policy: ViewPolicy = field(default_factory=ViewPolicy)
    resize_targets: bool = False  # resample the teacher's token grid to the student's
    allow_partial: bool = False  # train on the completed shards of an unfinished store
    seeds_used: int | None = None  # offline: replay only the store's first N seeds (None: all)
    num_threads: int = 4  # DALI threads
    loader_workers: int | str = "auto"  # >0: DALI parallel external source; auto: on with CUDA
    shard_model: bool = False  # FSDP2 (fully_shard per block) instead of DDP: 1/world of the state per rank
    check_data: bool = True  # check the image folder still matches the store's manifest

    def __post_init__(self):
        require(self)
        # 0 turns these off, from the CLI and the API alike.
        self.layer_scale = self.layer_scale or None
        self.clip_grad = self.clip_grad or None
        given = [flag for flag, v in (("--teacher", self.teacher), ("--pretrained", self.pretrained),
                                      ("--random-init", self.random_init)) if v]
        if given and not self.online:
            raise ConfigError(f"options of the online teacher without --online ({', '.join(given)}): a store's "
                              "teacher is the one it was extracted with; drop them, or add --online")
        if self.epochs is not None and self.steps is not None:
            raise ConfigError(f"--epochs {self.epochs} and --steps {self.steps} both given (--epochs, --steps): "
                              "give one, not both")
        if self.epochs is None and self.steps is None:
            raise ConfigError("no run length (--epochs, --steps): give --epochs N or --steps N")
        names = self.caches if self.cache else self.teachers
        if len(set(names)) != len(names):
            raise ConfigError(f"--cache/--teacher: each teacher once, got {names}")
        unknown = sorted(set(self.teacher_weights) - set(names))
        if unknown:
            raise ConfigError(f"--teacher-weight {unknown[0]}: not one of the run's teachers {names}; "
                              "name a --cache (or --online --teacher) exactly as given")
        bad = {k: w for k, w in self.teacher_weights.items() if not (w >= 0 and math.isfinite(w))}
        if bad:
            raise ConfigError(f"--teacher-weight: weights must be finite and >= 0, got {bad}")

    @property
    def caches(self) -> list[str]:
        """The stores, in the order given (one teacher each)."""
        return _listed(self.cache)

    @property
    def teachers(self) -> list[str]:
        """The online teachers, in the order given."""
        return _listed(self.teacher)

    def weight(self, name: str) -> float:
        return float(self.teacher_weights.get(name, 1.0))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["policy"] = self.policy.to_dict()
        return d


def _listed(value) -> list[str]:
    if value is None:
        return []
    return [str(value)] if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") else [str(v) for v in value]


@dataclass(kw_only=True)
class FinetuneConfig(RunOptions, ScheduleOptions, OptimOptions):
    """``fdcache finetune`` / ``flyp``: the shared run/schedule/optimizer groups (FT-CLIP's
    values as defaults; presets fill the rest) and what fine-tuning adds."""

    data: str  # training image folder (root/<class>/<image>)
    val: list = field(default_factory=list)  # eval sets: after each epoch and at the end
    mode: str = "finetune"  # finetune | flyp
    preset: str | None = None  # the recipe the values started from (recorded, not read)
    model: str | None = None  # open_clip name or timm:<name>
    pretrained: str | None = None
    random_init: bool = False
    init_seed: int = 0
    student_run: str | None = None  # start from an fdcache train --out directory (its student)
    resolution: int | None = None
    classnames: str = "folder"
    templates: str = "openai"
    head: str = "fresh"  # finetune: fresh (FT-CLIP) | zeroshot (text-tower init)
    batch_size: int = 64
    base_lr: float = 6e-4
    lr_batch: int = 2048
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6
    layer_decay: float | None = 0.6
    ema_decay: float | None = 0.9998
    drop_path: float = 0.0
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.25
    color_jitter: float = 0.4
    crop_pct: float = 0.875  # evaluation crop
    freeze_patch_embed: bool = False
    eval_batch_size: int = 128
    workers: int = 4

    def __post_init__(self):
        require(self)

    def to_dict(self) -> dict:
        return asdict(self)


