"""``fdcache train``: feature distillation of a timm student on cached (or online) targets.

FD's recipe (see the feature-distillation reference): AdamW (0.9, 0.999), lr 3e-4 per 512
images of total batch, warmup from 5e-7 then cosine to 5e-6 (both scaled alike), weight
decay 0.05 with timm's no-decay groups, gradient-norm clip 3.0, loss
``smooth_l1(proj(student(x)), layer_norm(target), beta=2)``. A step is one optimizer update
over ``accum_steps`` micro-batches of ``batch_size`` per rank. Offline epoch ``e`` replays the
store's seed ``e mod S``; ``--online`` runs the teacher on the same pixels instead.

Several teachers (``--cache A --cache B``, or ``--online --teacher T1 --teacher T2``): the
stores must hold one view set (same manifest, same recorded views, same seed count), so one
batch of pixels has every teacher's targets; the student gets one FD head per teacher and
the loss is ``sum_k w_k * FD_k`` (``--teacher-weight``, default 1), each term logged.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .. import distributed
from ..config import TrainConfig
from ..engine import RUN_FILES, Engine, FitResult, resume_checkpoint
from ..errors import ConfigError, FdcacheError, StoreError, StoreMismatchError, TrainError
from ..kernels import fd_loss
from ..store.manifest import index, require_unchanged
from ..store.store import Store
from ..store.subset import ROWS, kept_rows
from .loader import Batch, batches, resolve_workers
from .pixels import dali_device
from .sources import TrainSource
from .students import build_student, export_state_dict
from .teachers import load_teacher
from .tokens import check_token_layout, resize_token_grid

__all__ = ["Target", "DistillTask", "offline_targets", "heads_state", "require_one_view_set", "train"]

_log = logging.getLogger(__name__)
_log.setLevel(logging.WARNING)  # loading open_clip raises the root logger's level to ERROR


TrainResult = FitResult


@dataclass
class Target:
    """One teacher of the run: its name as given (``--cache``/``--teacher``), loss weight and
    spec; offline its store and codec, online the teacher module and the pixel re-normalisation."""

    name: str
    weight: float
    tspec: object
    store: Store | None = None
    codec: object = None
    teacher: object = None
    renorm: tuple | None = None


class DistillTask:
    """The distillation task: data (store or teacher in the loop), the student, the FD loss
    and the export; :attr:`engine` holds the optimizer state and runs :meth:`fit`."""

    name = "train"
    error = TrainError
    nonfinite_hint = "Lower the lr, check the store (fdcache verify), or resume from checkpoints/last.pt"
    outputs = ("model.safetensors", "model_ema.safetensors", "heads.safetensors")

    def __init__(self, cfg: TrainConfig, teacher=None):
        self.cfg = cfg
        self._given_teacher = teacher
        self.dist = d = distributed.init()
        self.device = distributed.device_for(d, cfg.device)
        # Drop path draws from the global generator: seed it so runs (and resumes) repeat.
        torch.manual_seed(cfg.seed * 1000 + d.rank)
        self.out = Path(cfg.out)
        if cfg.resume:  # checked before anything is built
            resume_checkpoint(self.out, RUN_FILES + self.outputs)
        if cfg.online == bool(cfg.caches):
            raise FdcacheError("give exactly one of --cache STORE (offline) or --online --teacher T")
        self.targets: list[Target] = []
        if cfg.online:
            self._setup_online()
        else:
            self._setup_offline()
        self._setup_student()
        first = self.micro_batches(0)
        if first == 0:
            raise FdcacheError(f"{len(self.eligible[self.source.seed_of(0) if self.store else 0])} samples "
                               f"cannot fill one batch of {cfg.batch_size} x {self.dist.world} rank(s)")
        total = self.total_micro(cfg.epochs) if cfg.epochs and not cfg.steps else None
        self.engine = Engine(self, self.model, cfg, d, self.device, micro_per_epoch=first, total_micro=total)

    # -- data ----------------------------------------------------------------------
    def _setup_offline(self):
        cfg = self.cfg
        stores = [Store.open(c) for c in cfg.caches]
        self.store = store = stores[0]
        self.targets = [Target(name, cfg.weight(name), st.info.teacher, store=st, codec=st.info.codec)
                        for name, st in zip(cfg.caches, stores)]
        self.codec = store.info.codec
        self.teacher = None
        self.tspec = store.info.teacher
        seeds = store.num_seeds
        if cfg.seeds_used is not None:
            for st in stores:
                if cfg.seeds_used > st.num_seeds:
                    raise StoreError(f"--seeds-used {cfg.seeds_used}: store {st.url} holds {st.num_seeds} seed(s); "
                                     f"grow it (re-run fdcache extract with --seeds {cfg.seeds_used}) or use fewer")
            seeds = cfg.seeds_used
        require_one_view_set(stores, seeds if cfg.seeds_used is not None else None)
        self.manifest = store.manifest(root=cfg.data)
        error = None
        if self.dist.is_main:
            try:
                for st in stores:
                    st.require_done_data()  # a deleted shard file is an error, never zeros
                warning = require_unchanged(self.manifest, str(cfg.caches[0])) if cfg.check_data else None
                if warning:
                    _log.warning("%s", warning)
            except FdcacheError as e:
                error = e
        error = self.dist.broadcast(error)
        if error is not None:
            raise error
        epochs_needed = cfg.epochs
        needed = list(range(min(epochs_needed, seeds))) if epochs_needed else list(range(seeds))
        self.eligible = {s: _common([st.eligible(s) for st in stores]) for s in range(seeds)}
        for name, st in zip(cfg.caches, stores):
            done = st.done()
            missing = [f"seed {s}: {int(done[s].sum())}/{done.shape[1]} shards" for s in needed if not done[s].all()]
            if missing and not cfg.allow_partial:
                raise StoreError(f"store {name} is incomplete for the seeds this run needs ("
                                 + "; ".join(missing) + "). Finish extraction (re-run fdcache extract) "
                                 "or pass --allow-partial to train on completed shards only.")
        self.source = TrainSource(
            files=[self.manifest.abspath(i) for i in range(len(self.manifest))],
            eligible=self.eligible, batch_size=cfg.batch_size, rank=self.dist.rank, world=self.dist.world,
            run_seed=cfg.seed, readers=[st.reader() for st in stores], seeds=seeds)

    def _setup_online(self):
        cfg = self.cfg
        if not cfg.teachers or not cfg.data:
            raise FdcacheError("--online needs --teacher and --data")
        self.store = self.codec = None
        if len(cfg.teachers) > 1 and cfg.pretrained:
            raise FdcacheError("--pretrained with several --online --teacher: one tag for all is ambiguous. "
                               "Extract each teacher (the second with --views-from the first) and train "
                               "with --cache A --cache B")
        given = self._given_teacher
        if given is not None and not isinstance(given, (list, tuple)):
            given = [given]
        if given is not None and len(given) != len(cfg.teachers):
            raise FdcacheError(f"{len(given)} teacher module(s) given for {len(cfg.teachers)} --teacher(s)")
        modules = given or [load_teacher(name, cfg.pretrained, random_init=cfg.random_init, init_seed=cfg.init_seed,
                                         resolution=cfg.resolution, model_args=cfg.teacher_args, device=self.device)
                   for name in cfg.teachers]
        self.targets = [Target(name, cfg.weight(name), m.spec, teacher=m) for name, m in zip(cfg.teachers, modules)]
        self.teacher = modules[0]
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
        dims = [x.tspec.dim for x in self.targets]
        self.model, self.sspec = build_student(cfg.student, dims[0] if len(dims) == 1 else dims, resolution=res,
                                               drop_path=cfg.drop_path, layer_scale=cfg.layer_scale,
                                               overrides=cfg.student_overrides, seed=cfg.seed)
        s_mean = torch.tensor(self.sspec.mean, device=self.device).view(1, 3, 1, 1)
        s_std = torch.tensor(self.sspec.std, device=self.device).view(1, 3, 1, 1)
        for x in self.targets:
            tt = x.tspec
            subset = x.store.info.token_subset if x.store is not None else None
            try:
                check_token_layout(self.sspec, tt, cfg.resize_targets,
                                   None if subset is None or subset.whole else subset.fraction)
            except ConfigError as e:
                raise ConfigError(f"store {x.name}: {e}" if len(self.targets) > 1 else str(e)) from None
            if cfg.online and res != tt.resolution:
                raise FdcacheError(f"--online needs the student's resolution ({res}) to equal the teacher's "
                                   f"({x.name}: {tt.resolution}): both read the same pixels")
            # Teacher and student each normalize with their own mean/std; pixels are shared.
            t_mean = torch.tensor(tt.mean, device=self.device).view(1, 3, 1, 1)
            t_std = torch.tensor(tt.std, device=self.device).view(1, 3, 1, 1)
            x.renorm = (s_std / t_std, (s_mean - t_mean) / t_std)
        self._renorm = self.targets[0].renorm

    def replay(self) -> str:
        """How often each stored view is seen: ``epochs / S`` (the replay factor), or fresh
        views every epoch online. Said when a run starts (docs/benchmarks.md "Views budget")."""
        cfg = self.cfg
        if self.store is None:
            return "online: a fresh view of every image each epoch (replay factor 1)"
        s = self.source.num_seeds
        epochs = cfg.epochs
        if epochs is None:  # --steps: the epochs those steps make
            per_epoch = max(1, self.micro_batches(0) // cfg.accum_steps)
            epochs = cfg.steps / per_epoch
        return (f"offline: {s} stored view(s) per image, epoch e replays seed e mod {s}; "
                f"{epochs:g} epoch(s) = each stored view seen {epochs / s:.3g} time(s) (replay factor)")

    def micro_batches(self, epoch: int) -> int:
        """Micro-batches per rank in ``epoch`` (epochs differ only with --allow-partial)."""
        return self.source.samples_per_epoch(epoch) // self.cfg.batch_size

    def total_micro(self, epochs: int) -> int:
        """Micro-batches per rank in ``epochs`` epochs: epoch ``e`` replays seed ``e mod S``, so
        one cycle of the seeds is counted and repeated (any number of epochs, no loop over them)."""
        cycle = [self.micro_batches(e) for e in range(min(epochs, self.source.num_seeds))]
        full, rest = divmod(epochs, len(cycle))
        return full * sum(cycle) + sum(cycle[:rest])

    def position(self, micro_done: int) -> tuple[int, int]:
        """(epoch, samples to skip in it) after ``micro_done`` micro-batches."""
        e = 0
        while True:
            n = self.micro_batches(e)
            if micro_done < n:
                return e, micro_done * self.cfg.batch_size
            micro_done -= n
            e += 1

    # -- what the engine asks of the task ----------------------------------------
    @property
    def term_names(self) -> list[str]:
        """The loss terms logged beside the total (one per teacher when there are several)."""
        return [x.name for x in self.targets] if len(self.targets) > 1 else []

    def identity(self) -> dict:
        teachers = [x.tspec.to_dict() for x in self.targets]
        return {"teacher": teachers[0] if len(teachers) == 1 else teachers, "student": asdict(self.sspec)}

    def check_resume(self, ck: dict, path: Path) -> None:
        if ck["teacher"] != self.identity()["teacher"]:
            raise StoreMismatchError(f"checkpoint {path} was trained against other teachers/stores")

    def started(self, fresh: bool) -> None: ...
    def after_update(self) -> None: ...
    def after_step(self, last: bool) -> None: ...

    def images_in(self, batch: Batch) -> int:
        return batch.images.shape[0]

    def where(self, batch: Batch) -> dict:
        return {"epoch": batch.epoch}

    def finish(self, checkpoint: Path) -> str | None:
        # Gathered on every rank first: under --shard-model that is a collective.
        state = None if self.engine.ema is not None else self.engine.full_state_dict()
        return str(self.export(state)) if self.dist.is_main else None

    # -- the step ------------------------------------------------------------------
    def targets_of(self, batch: Batch, images: torch.Tensor, k: int = 0):
        """(targets, qparams) of teacher ``k`` for the loss: the teacher on the same pixels
        (online), or its store's arrays as the codec gives them to the loss (the fused kernel
        reads int8 as stored), decoded and resampled when the student's token grid differs."""
        x = self.targets[k]
        if x.teacher is not None:
            scale, shift = x.renorm
            targets = x.teacher(images * scale + shift)
            return resize_token_grid(targets, x.tspec.prefix_tokens, x.tspec.grid, self.sspec.grid), None
        stored = {n: v.to(self.device, non_blocking=True) for n, v in batch.stored[k].items()}
        return offline_targets(x.codec, stored, x.tspec, self.sspec)

    def loss(self, batch: Batch, forward):
        """FD's loss of one micro-batch; ``forward`` is the engine's student call (DDP,
        compiled), run inside the engine's autocast. Several teachers: ``(sum_k w_k * FD_k,
        [FD_k])``, one student forward for all heads. From a token-subset store, head ``k``'s
        loss is on its predictions at the rows *its* store kept (:func:`~fdcache.store.subset.kept_rows`;
        stores of one view set may keep different rows, or all of them)."""
        images = batch.images.to(self.device, non_blocking=True)
        out = forward(images)
        preds = [out] if len(self.targets) == 1 else list(out)
        terms = []
        for k, pred in enumerate(preds):
            targets, qparams = self.targets_of(batch, images, k)
            if batch.stored is not None:
                pred = kept_rows(pred, batch.stored[k])
            terms.append(fd_loss(pred, targets, qparams=qparams, impl=self.cfg.loss_impl))
        if len(terms) == 1:
            return terms[0]
        total = sum(x.weight * t for x, t in zip(self.targets, terms))
        return total, torch.stack([t.detach().float() for t in terms])

    # -- the loop ------------------------------------------------------------------
    def stream(self, micro_done: int = 0):
        """Micro-batches from ``micro_done`` on (a resumed run picks up mid-epoch)."""
        epoch, skip = self.position(micro_done)
        self.source.start_epoch, self.source.skip_samples = epoch, skip
        self.source.batch_size = self.cfg.batch_size
        workers = resolve_workers(self.cfg.loader_workers, self.device)
        return batches(self.source, resolution=self.sspec.resolution, mean=self.sspec.mean,
                       std=self.sspec.std, num_threads=self.cfg.num_threads, parallel=workers > 0,
                       py_workers=max(1, workers), **dali_device(self.device))

    def fit(self) -> FitResult:
        return self.engine.fit()

    def export(self, state: dict | None = None) -> Path:
        """The backbone without the FD head (EMA weights if kept) in timm's own layout:
        ``model.safetensors`` + ``config.json`` (architecture, the arguments that rebuild it,
        ``num_classes=0``, the student's own mean/std), so that
        ``timm.create_model("local-dir:OUT", pretrained=True)`` loads it without fdcache.
        ``state``: the whole student's state dict (:meth:`Engine.full_state_dict`, gathered
        from the ranks' shards under --shard-model). Beside it ``heads.safetensors``: the FD head of each teacher
        (:func:`heads_state`)."""
        from ..exports import save_weights, update_fdcache_block, write_timm_config
        from .students import PRESETS, fd_options

        ema = self.engine.ema
        model = ema.module if ema is not None else self.model
        name, kw = PRESETS.get(self.cfg.student, (self.cfg.student, {}))
        kwargs = (dict(kw) | fd_options(name, self.cfg.drop_path, self.cfg.layer_scale) | self.cfg.student_overrides
                  | {"img_size": self.sspec.resolution, "num_classes": 0})
        path = self.out / "model.safetensors"
        if state is not None and ema is None:  # the whole student (gathered from its shards)
            backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
            save_weights({k: v.detach().cpu().contiguous() for k, v in backbone.items()}, path)
        else:
            save_weights(export_state_dict(model), path)
        whole = state if state is not None and ema is None else model.state_dict()
        heads, teachers = heads_state(whole, self.targets, self.sspec)
        save_weights(heads, self.out / "heads.safetensors", metadata={"teachers": json.dumps(teachers)})
        write_timm_config(self.out, model.backbone, kwargs, mean=self.sspec.mean, std=self.sspec.std)
        update_fdcache_block(self.out, export={"kind": "student", "student": self.cfg.student,
                                               "teacher": self.tspec.to_dict(), "steps": self.engine.step,
                                               "ema": ema is not None, "heads": teachers})
        return path


def offline_targets(codec, stored: dict, tspec, sspec):
    """(targets, qparams) for ``fd_loss`` from a batch's stored arrays: the codec's loss
    inputs, or, when the student's grid (``sspec``) differs from the teacher's (``tspec``,
    as recorded in the store), the decoded map with its grid resampled to the student's
    (prefix tokens kept). Training and ``fdcache score`` both use it."""
    if tspec.grid == sspec.grid:
        return codec.loss_inputs(stored)
    if ROWS in stored:
        raise FdcacheError(f"the store keeps a subset of the teacher's {tspec.rows}x{tspec.cols} grid; a student "
                           f"of a {sspec.rows}x{sspec.cols} grid cannot be scored or trained on it (no resampling "
                           "of a subset)")
    return resize_token_grid(codec.decode(stored), tspec.prefix_tokens, tspec.grid, sspec.grid), None


def heads_state(state: dict, targets: list[Target], sspec) -> tuple[dict, list[dict]]:
    """``heads.safetensors``' tensors and its ``teachers`` metadata, from the whole student's
    ``state`` (its ``head.*`` or ``heads.k.*``): head ``k`` (``heads.k.weight [D_k,
    D_student]``, ``heads.k.bias [D_k]``) maps the student's ``forward_features`` tokens
    ``[B, L, D_student]`` to teacher ``k``'s width, as in training (a teacher whose token grid
    differed was resampled to the student's ``L`` tokens). The metadata lists per head its
    name (``--cache``/``--teacher`` as given), loss weight and teacher spec (the store
    binding's), so the file is read without fdcache."""
    out, teachers = {}, []
    for k, x in enumerate(targets):
        src = "head" if len(targets) == 1 else f"heads.{k}"
        for part in ("weight", "bias"):
            out[f"heads.{k}.{part}"] = state[f"{src}.{part}"].detach().cpu().contiguous()
        teachers.append({"key": f"heads.{k}", "name": x.name, "weight": x.weight, "dim": x.tspec.dim,
                         "student_tokens": sspec.tokens, "teacher": x.tspec.to_dict()})
    return out, teachers


def require_one_view_set(stores: list[Store], seeds: int | None = None) -> None:
    """Refuse stores that do not share the first's view set, naming the difference: another
    data folder (manifest), another seed count (unless ``seeds``, ``--seeds-used``, cuts
    both), or other recorded views (stores not made with ``extract --views-from``)."""
    first = stores[0]
    for st in stores[1:]:
        fix = (f"Extract it on {first.url}'s views: fdcache extract DATA --out {st.url} --teacher ... "
               f"--views-from {first.url}")
        if st.info.manifest_sha256 != first.info.manifest_sha256:
            why = first.manifest().first_difference(st.manifest()) or "the manifest fingerprints differ"
            raise StoreMismatchError(f"--cache {st.url} was extracted from another data folder than "
                                     f"{first.url} ({why}). {fix}")
        if seeds is None and st.num_seeds != first.num_seeds:
            raise StoreMismatchError(f"--cache {st.url} holds {st.num_seeds} seed(s), {first.url} "
                                     f"{first.num_seeds}: another seed count. Grow the smaller one (re-run its "
                                     "extract with more --seeds) or train on the common ones (--seeds-used N)")
        n = seeds if seeds is not None else first.num_seeds
        theirs, mine = first.views_hashes(n), st.views_hashes(n)
        differ = [s for s in range(n) if theirs[s] != mine[s]]
        if differ:
            raise StoreMismatchError(f"--cache {st.url} holds other views than {first.url} (seed "
                                     f"{differ[0]} differs): the teachers would see other pixels. {fix}")


def _common(parts: list[np.ndarray]) -> np.ndarray:
    """Samples usable in every store (sorted, as each store lists them)."""
    out = parts[0]
    for p in parts[1:]:
        out = np.intersect1d(out, p)
    return out.astype(np.int64, copy=False)


def train(cfg: TrainConfig, announce=None) -> TrainResult:
    """``announce(text)``: told the replay factor before the first step (the CLI prints it)."""
    trainer = DistillTask(cfg)
    if announce is not None and trainer.dist.is_main:
        announce(trainer.replay())
    return trainer.fit()

