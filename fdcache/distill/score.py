"""``fdcache score``: how well a ``train`` run's student learned, measured on data it never saw.

Three numbers, each from the student *as trained* (backbone and FD head, read from the
run's ``checkpoints/last.pt``; the EMA weights when the run kept them, as its export):

* **held-out FD loss**: FD's loss (``fdcache.kernels.fd_loss``, the one training takes) of
  the student on the recorded views of a store extracted from images the run never trained
  on. Pixels come through :func:`pixels.pixel_pipeline` (the pipeline extraction and
  training use), targets through :func:`train.offline_targets` (the codec's loss inputs,
  as training reads them; a token-subset store's kept rows as training gathers them): no
  second pixel path, no second loss.
* **train-store loss** on the run's own store (by default its seed 0, which every run of any
  replay factor has trained on): ``held-out - train`` is the memorisation gap.
* **linear probe top-1**: frozen student features (the backbone's patch tokens after its
  final norm, mean-pooled, as FD fine-tunes) of the whole image (``full`` view, no flip)
  from a labelled train folder, a multinomial logistic regression fitted on them (full-batch
  L-BFGS in float64 on standardized features, fixed L2 ``probe_l2``, no tuning on the val
  set), top-1 on a labelled val folder.

Every loss is a mean over samples of the per-sample mean over tokens and channels (equal to
``fd_loss``'s ``mean`` over a batch, since every sample has the same token count).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..engine import load_checkpoint
from ..errors import ConfigError, DataError, FdcacheError, StoreMismatchError, cause_of
from ..options import check
from ..kernels import fd_loss
from ..store.manifest import index
from ..store.store import Store
from ..store.subset import kept_rows
from .pixels import PixelStream, ViewBatches, dali_device
from .students import FDStudent, StudentSpec, build_student
from .tokens import flat_tokens
from .train import offline_targets

__all__ = ["TrainedStudent", "LossScore", "ProbeScore", "ScoreResult", "load_trained_student", "store_loss",
           "probe_features", "fit_linear_probe", "linear_probe", "score"]


@dataclass
class TrainedStudent:
    """A ``train`` run's student with its FD head, in eval mode, and what it was trained against."""

    run: str
    model: FDStudent
    spec: StudentSpec
    teacher: dict  # the teacher spec of the run's store (TeacherSpec.to_dict())
    config: dict  # the run's TrainConfig as recorded in its checkpoint
    steps: int
    ema: bool


@dataclass
class LossScore:
    store: str
    seeds: list[int]
    samples: int  # sample-views scored
    loss: float  # mean FD loss per sample-view
    per_seed: list[float]


@dataclass
class ProbeScore:
    train_images: int
    val_images: int
    classes: int
    top1: float  # on the val folder
    train_top1: float
    l2: float
    feature: str = "mean of patch tokens after the backbone's final norm (full view)"


@dataclass
class ScoreResult:
    run: str
    steps: int
    heldout: LossScore
    train: LossScore | None = None
    gap: float | None = None  # heldout.loss - train.loss
    probe: ProbeScore | None = None
    config: dict = field(default_factory=dict)  # the run's recorded options (student, seeds_used, ...)

    def to_dict(self) -> dict:
        return asdict(self)


def load_trained_student(run: str | Path, device: str | torch.device = "cpu") -> TrainedStudent:
    """The student of ``fdcache train --out RUN`` as its last checkpoint holds it (the FD head
    included, which the timm export leaves out). EMA weights replace the raw ones when kept."""
    path = Path(run) / "checkpoints" / "last.pt"
    sharded = Path(run) / "checkpoints" / "last"  # train --shard-model: a torch.distributed.checkpoint folder
    if (sharded / "run.pt").is_file():
        path = sharded / "run.pt"
    if not path.is_file():
        raise FdcacheError(f"{run}: no checkpoint at {path}; score needs a finished (or checkpointed) "
                           "fdcache train run directory")
    ck = load_checkpoint(path, "score needs the --out folder of an fdcache train run with an intact checkpoint")
    try:
        cfg, teacher, student = ck["config"], ck["teacher"], ck["student"]
    except KeyError:
        raise FdcacheError(f"{path} is not an fdcache train checkpoint (no teacher/student record); "
                           "score reads train runs, not fine-tuning runs") from None
    if isinstance(teacher, list):
        raise FdcacheError(f"{run} was trained against {len(teacher)} teachers (train --cache A --cache B); "
                           "score reads single-teacher runs only so far: probe its exported backbone "
                           "(timm local-dir) or score a single-teacher run")
    try:
        model, spec = build_student(cfg["student"], teacher["dim"], resolution=student["resolution"],
                                    drop_path=cfg["drop_path"], layer_scale=cfg["layer_scale"],
                                    overrides=cfg.get("student_overrides") or {}, seed=cfg["seed"])
        if path.name == "run.pt":  # the model's tensors, read from the shards into the built student
            import torch.distributed.checkpoint as dcp

            ck["model"] = model.state_dict()
            dcp.load({"model": ck["model"]}, checkpoint_id=str(path.parent), no_dist=True)
        state, ema = ck["model"], ck.get("ema") is not None
        if ema:  # timm ModelEmaV3 keeps the averaged model under "module."
            state = {k.removeprefix("module."): v for k, v in ck["ema"].items()}
        model.load_state_dict(state)
    except (KeyError, RuntimeError) as e:
        raise FdcacheError(f"the checkpoint does not rebuild its student ({cause_of(e)}) ({path}): score needs "
                           "the --out folder of an intact fdcache train run") from None
    return TrainedStudent(str(run), model.to(device).eval(), spec, teacher, cfg, int(ck["step"]), ema)


def _views_stream(files, rows: np.ndarray, views: np.ndarray, spec: StudentSpec, batch_size: int,
                  device: torch.device, threads: int) -> PixelStream:
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    view_batches = [views[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    return PixelStream(ViewBatches(files, batches, view_batches), resolution=spec.resolution, mean=spec.mean,
                       std=spec.std, num_threads=threads, **dali_device(device))


@torch.no_grad()
def store_loss(student: TrainedStudent, store: str, *, seeds: list[int] | None = None, limit: int | None = None,
               data: str | None = None, batch_size: int = 64, threads: int = 2, loss_impl: str = "auto",
               device: str | torch.device = "cpu") -> LossScore:
    """Mean FD loss of ``student`` on the recorded views of ``store`` (``seeds``: which, default
    all; ``limit``: the first N usable samples of each, default all). The store must hold the
    teacher the run was trained against."""
    device = torch.device(device)
    st = Store.open(store)
    t = st.info.teacher
    if t.to_dict() != student.teacher:
        diff = [k for k in student.teacher if student.teacher[k] != t.to_dict().get(k)]
        raise StoreMismatchError(f"store {store} holds another teacher than run {student.run} was trained "
                                 f"against (differs in: {', '.join(diff)}); score against a store of the same teacher")
    seeds = list(range(st.num_seeds)) if seeds is None else [int(s) for s in seeds]
    bad = [s for s in seeds if not 0 <= s < st.num_seeds]
    if bad or not seeds:
        raise ConfigError(f"seeds {bad or seeds} not in store {store} (it has {st.num_seeds})")
    manifest = st.manifest(root=data)
    files = [manifest.abspath(i) for i in range(len(manifest))]
    reader, codec = st.reader(), st.info.codec
    total, count, per_seed = 0.0, 0, []
    for s in seeds:
        rows = st.eligible(s)[:limit]
        if len(rows) == 0:
            raise DataError(f"seed {s} of {store} has no extracted samples: finish the extract first")
        stream = _views_stream(files, rows, reader.views(s)[rows], student.spec, batch_size, device, threads)
        seed_sum = 0.0
        for k, images in stream:
            idx = rows[k * batch_size:(k + 1) * batch_size]
            stored = {n: torch.from_numpy(v).to(device) for n, v in reader.read(s, idx).items()}
            targets, qparams = offline_targets(codec, stored, t, student.spec)
            pred = kept_rows(student.model(images.to(device)), stored)
            per_token = fd_loss(pred, targets, qparams=qparams, reduction="none", impl=loss_impl)
            seed_sum += float(per_token.double().mean(dim=-1).sum())
        per_seed.append(seed_sum / len(rows))
        total, count = total + seed_sum, count + len(rows)
    return LossScore(store=str(store), seeds=seeds, samples=count, loss=total / count, per_seed=per_seed)


@torch.no_grad()
def probe_features(student: TrainedStudent, folder: str, *, batch_size: int = 64, threads: int = 2,
                   device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(features [N, C] float64, labels [N], class names) of every image of an ImageFolder,
    whole-image views through the pixel pipeline, frozen backbone."""
    device = torch.device(device)
    m = index(folder)
    rows = np.flatnonzero(~m.bad).astype(np.int64)
    if len(rows) != len(m):
        raise DataError(f"{folder}: {len(m) - len(rows)} image(s) cannot be read; fix or remove them first")
    views = np.stack([np.zeros(len(m)), np.zeros(len(m)), m.heights, m.widths, np.zeros(len(m))], 1).astype(np.int32)
    files = [m.abspath(i) for i in range(len(m))]
    backbone, prefix = student.model.backbone, student.spec.prefix_tokens
    feats = []
    for _, images in _views_stream(files, rows, views, student.spec, batch_size, device, threads):
        feats.append(flat_tokens(backbone.forward_features(images.to(device)))[:, prefix:].mean(dim=1).double().cpu())
    return torch.cat(feats), torch.from_numpy(m.labels.astype(np.int64)), list(m.classes)


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, classes: int, *, l2: float = 1e-4,
                     max_iter: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression ``softmax(x @ W + b)`` by full-batch L-BFGS (float64,
    strong-Wolfe line search), loss = mean cross-entropy + ``l2 * |W|^2``. Deterministic.
    Returns (W [C_in, classes], b [classes]); standardize ``x`` first."""
    x = x.double()
    w = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def linear_probe(student: TrainedStudent, train_dir: str, val_dir: str, *, l2: float = 1e-4, batch_size: int = 64,
                 threads: int = 2, device: str | torch.device = "cpu") -> ProbeScore:
    """Top-1 of a linear classifier on frozen features: fitted on ``train_dir``, read on ``val_dir``."""
    xt, yt, classes = probe_features(student, train_dir, batch_size=batch_size, threads=threads, device=device)
    xv, yv, val_classes = probe_features(student, val_dir, batch_size=batch_size, threads=threads, device=device)
    if classes != val_classes:
        raise DataError(f"{train_dir} and {val_dir} name different classes ({classes[:5]}... vs "
                        f"{val_classes[:5]}...): the probe needs the same class folders")
    mean, std = xt.mean(0), xt.std(0).clamp_min(1e-8)
    w, b = fit_linear_probe((xt - mean) / std, yt, len(classes), l2=l2)

    def top1(x, y):
        return float((((x - mean) / std @ w + b).argmax(1) == y).double().mean())

    return ProbeScore(train_images=len(yt), val_images=len(yv), classes=len(classes), top1=top1(xv, yv),
                      train_top1=top1(xt, yt), l2=l2)


def score(run: str, cache: str, *, train_cache: str | None = None, train_seeds: list[int] | None = (0,),
          seeds: list[int] | None = None, limit: int | None = None, probe_train: str | None = None,
          probe_val: str | None = None, probe_l2: float = 1e-4, batch_size: int = 64, threads: int = 2,
          loss_impl: str = "auto", device: str | torch.device = "cpu") -> ScoreResult:
    """Held-out loss on ``cache`` (its ``seeds``, default all), train-store loss on ``train_cache``
    (``train_seeds``, default seed 0; None: all) and the gap, and the linear probe when both
    probe folders are given. ``limit``: at most N samples per seed of each store."""
    check(seed=seeds, train_seed=train_seeds, limit=limit, probe_l2=probe_l2, batch_size=batch_size, threads=threads)
    if (probe_train is None) != (probe_val is None):
        raise ConfigError("give both --probe-train and --probe-val, or neither")
    student = load_trained_student(run, device)
    for store in (cache, train_cache):  # every input opened before the work
        if store is not None:
            Store.open(store)
    for folder in (probe_train, probe_val):
        if folder is not None:
            index(folder)
    kw = dict(limit=limit, batch_size=batch_size, threads=threads, loss_impl=loss_impl, device=device)
    held = store_loss(student, cache, seeds=seeds, **kw)
    result = ScoreResult(run=str(run), steps=student.steps, heldout=held, config=student.config)
    if train_cache is not None:
        result.train = store_loss(student, train_cache, seeds=None if train_seeds is None else list(train_seeds), **kw)
        result.gap = held.loss - result.train.loss
    if probe_train is not None:
        result.probe = linear_probe(student, probe_train, probe_val, l2=probe_l2, batch_size=batch_size,
                                    threads=threads, device=device)
    if not math.isfinite(held.loss):
        raise FdcacheError(f"held-out loss of {run} is {held.loss}: the checkpoint holds non-finite weights")
    return result
