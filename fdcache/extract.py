"""``fdcache extract``: image folder + teacher -> verified, resumable Zarr store of targets.

Work is split into shards (``shard_size`` samples of one seed), the store's write unit.
Each rank takes a contiguous range of the shards not yet marked done, streams their
recorded views through the pixel pipeline and the teacher, and hands finished shards to
writer threads (device-to-host copy, compression, checksums, writes) so that they overlap
the next batches' decode and forward. A shard's ``done`` marker is written after its data;
re-running the same command recomputes only unmarked shards, byte-identically.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .codecs import CodecSpec
from .errors import BadImageError, FdcacheError, StoreError
from .manifest import Manifest, index
from .pixels import PixelStream, ViewBatches, dali_device
from .store import Store, StoreInfo, exists, remove_interrupted_writes
from .teachers import Teacher, load_teacher
from .views import ViewPolicy


@dataclass
class ExtractConfig:
    data: str
    out: str
    teacher: str
    pretrained: str | None = None
    random_init: bool = False
    init_seed: int = 0
    resolution: int | None = None
    seeds: int = 1
    codec: CodecSpec = field(default_factory=CodecSpec)
    policy: ViewPolicy = field(default_factory=ViewPolicy)
    batch_size: int = 64
    shard_size: int = 128
    global_seed: int = 0
    file_list: str | None = None
    skip_bad: bool = False
    overwrite: bool = False
    num_threads: int = 4
    writers: int = 2
    device: str = "auto"
    progress: bool = True


@dataclass
class ExtractResult:
    store: str
    samples: int  # sample-views computed by this call (this rank)
    shards: int
    seconds: float
    skipped: list[str]
    already_done: int  # shards found complete before this call

    @property
    def images_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def shard_batches(a: int, b: int, batch_size: int) -> list[tuple[int, int]]:
    """Batches never cross a shard, so a resumed shard sees the same batches as before."""
    return [(i, min(i + batch_size, b)) for i in range(a, b, batch_size)]


def open_or_create(cfg: ExtractConfig, teacher: Teacher, manifest: Manifest) -> Store:
    info = StoreInfo(teacher=teacher.spec, policy=cfg.policy, codec=cfg.codec,
                     global_seed=cfg.global_seed, shard_size=cfg.shard_size,
                     num_samples=len(manifest), manifest_sha256=manifest.fingerprint())
    if exists(cfg.out) and not cfg.overwrite:
        try:
            store = Store.open(cfg.out, mode="r+")
        except StoreError as e:
            raise StoreError(f"{e} (pass --overwrite to replace what is at {cfg.out})") from e
        store.check_binding(info)
        remove_interrupted_writes(cfg.out)  # only rank 0 runs this, before any rank writes
        if cfg.seeds > store.num_seeds:
            store.grow_seeds(manifest, cfg.seeds)
        return store
    return Store.create(cfg.out, info, manifest, cfg.seeds, overwrite=cfg.overwrite)


def _split(items: list, rank: int, world: int) -> list:
    n = len(items)
    return items[rank * n // world:(rank + 1) * n // world]


def extract(cfg: ExtractConfig, teacher: Teacher | None = None) -> ExtractResult:
    d = distributed.init()
    device = distributed.device_for(d, cfg.device)
    if teacher is None:
        teacher = load_teacher(cfg.teacher, cfg.pretrained, random_init=cfg.random_init,
                               resolution=cfg.resolution, init_seed=cfg.init_seed, device=device)
    else:
        teacher = teacher.to(device)

    # Rank 0 indexes the folder and creates (or checks) the store; the others wait, then
    # read the manifest from the store, so a thousand ranks do not stat ImageNet each.
    error = None
    if d.is_main:
        try:
            manifest = index(cfg.data, file_list=cfg.file_list, skip_bad=cfg.skip_bad)
            store = open_or_create(cfg, teacher, manifest)
        except FdcacheError as e:
            error = e
    error = d.broadcast(error)
    if error is not None:
        raise error
    if not d.is_main:
        store = Store.open(cfg.out, mode="r+")
        manifest = store.manifest(root=cfg.data)
    d.barrier()

    done = store.done()[: cfg.seeds]
    todo = [(s, k) for s in range(cfg.seeds) for k in range(store.num_shards) if not done[s, k]]
    mine = _split(todo, d.rank, d.world)
    result = _run(cfg, store, manifest, teacher, mine, d)
    result.already_done = int(done.sum())
    d.barrier()
    return result


def _run(cfg: ExtractConfig, store: Store, manifest: Manifest, teacher: Teacher,
         shards: list[tuple[int, int]], d) -> ExtractResult:
    files = [manifest.abspath(i) for i in range(len(manifest))]
    skip = set(np.flatnonzero(manifest.bad).tolist())
    spec = teacher.spec
    views_by_seed = {s: store.views(s) for s in sorted({s for s, _ in shards})}
    root_len = len(str(manifest.root).rstrip("/")) + 1
    t0 = time.perf_counter()
    samples = 0
    pending: list[Future] = []
    pool = ThreadPoolExecutor(max_workers=max(1, cfg.writers), thread_name_prefix="fdcache-writer")
    bar = _progress(sum(store.shard_range(k)[1] - store.shard_range(k)[0] for _, k in shards),
                    enabled=cfg.progress and d.is_main)
    try:
        pos = 0
        while pos < len(shards):
            work_shards = shards[pos:]
            batches, views, owners = [], [], []
            for j, (s, k) in enumerate(work_shards):
                a, b = store.shard_range(k)
                for lo, hi in shard_batches(a, b, cfg.batch_size):
                    batches.append(np.arange(lo, hi))
                    views.append(views_by_seed[s][lo:hi])
                    owners.append(j)
            work = ViewBatches(files, batches, views, frozenset(skip))
            stream = PixelStream(work, root_len=root_len, resolution=spec.resolution,
                                 mean=spec.mean, std=spec.std, device=dali_device(),
                                 num_threads=cfg.num_threads)
            parts: list[dict[str, torch.Tensor]] = []
            current, partial = 0, 0
            try:
                for bi, images in stream:
                    out = teacher(images.to(teacher_device(teacher), non_blocking=True))
                    parts.append(cfg.codec.encode(out, seed=work_shards[owners[bi]][0],
                                                  samples=torch.from_numpy(batches[bi]).to(out.device)))
                    samples += len(images)
                    partial += len(images)
                    bar.advance(len(images))
                    last_of_shard = bi + 1 == len(batches) or owners[bi + 1] != owners[bi]
                    if last_of_shard:
                        s, k = work_shards[owners[bi]]
                        a, b = store.shard_range(k)
                        arrays = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
                        skipped = np.array([i in skip for i in range(a, b)], dtype=bool)
                        pending.append(pool.submit(_write, store, s, k, arrays, skipped))
                        parts, current, partial = [], owners[bi] + 1, 0
                        _drain(pending, limit=cfg.writers + 1)
                pos += len(work_shards)
            except BadImageError as e:
                if not cfg.skip_bad:
                    raise
                # Record the culprits as skipped and restart from the shard that failed.
                by_name = {p: i for i, p in enumerate(manifest.paths)}
                skip.update(by_name[p] for p in e.paths)
                pos += current
                samples -= partial
                bar.advance(-partial)
            finally:
                del stream
        _drain(pending, limit=0)
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)
        bar.stop()
    skipped_names = sorted(manifest.paths[i] for i in skip)
    return ExtractResult(store=str(cfg.out), samples=samples, shards=len(shards),
                         seconds=time.perf_counter() - t0, skipped=skipped_names, already_done=0)


def teacher_device(teacher: Teacher) -> torch.device:
    return next(teacher.parameters()).device


def _write(store: Store, seed: int, k: int, arrays: dict[str, torch.Tensor], skipped: np.ndarray) -> None:
    host = {}
    for name, t in arrays.items():
        t = t.cpu()
        if skipped.any():
            t[torch.from_numpy(skipped)] = 0
        host[name] = t.numpy()
    try:
        store.write_shard(seed, k, host, skipped)
    except OSError as e:
        raise StoreError(
            f"writing shard {k} of seed {seed} to {store.url} failed: {e}. Completed shards are "
            "kept and marked done; fix the cause (e.g. free disk space) and re-run the same "
            "command to resume.") from e


def _drain(pending: list[Future], limit: int) -> None:
    """Wait until at most ``limit`` writes are in flight; re-raise a writer's error."""
    while len(pending) > limit or (pending and pending[0].done()):
        pending.pop(0).result()


class _NullBar:
    def advance(self, n): ...
    def stop(self): ...


def _progress(total: int, enabled: bool):
    if not enabled or total == 0:
        return _NullBar()
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    class _Bar:
        def __init__(self):
            self.p = Progress(TextColumn("extract"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("{task.fields[rate]} img/s"), TimeElapsedColumn(),
                              TextColumn("eta"), TimeRemainingColumn(), transient=False)
            self.task = self.p.add_task("extract", total=total, rate="-")
            self.t0 = time.perf_counter()
            self.n = 0
            self.p.start()

        def advance(self, n):
            self.n += n
            rate = self.n / max(time.perf_counter() - self.t0, 1e-9)
            self.p.update(self.task, advance=n, rate=f"{rate:,.1f}")

        def stop(self):
            self.p.stop()

    return _Bar()
