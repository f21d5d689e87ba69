"""``fdcache extract``: image folder + teacher -> verified, resumable Zarr store of targets.

Work is split into shards (``shard_size`` samples of one seed), the store's write unit.
Each rank takes a contiguous range of the shards not yet marked done, streams their
recorded views through the pixel pipeline and the teacher, and hands finished shards to
writer threads (compression, checksums, writes) so that they overlap the next batches'
decode and forward; the device-to-host copy starts first, on a side stream into pinned
memory (:class:`HostCopy`). A shard's ``done`` marker is written after its data;
re-running the same command recomputes only unmarked shards, byte-identically.

``views_from``: a second teacher on an existing store's views. The new store takes that
store's manifest arrays and its recorded views byte for byte (read through its
:class:`Store`, written through the new one: nothing is redrawn), so both hold maps of the
same pixels and share one view set (:meth:`Store.view_set`); training reads them together
(``train --cache A --cache B``). Its seeds are the source's: more are grown there first.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import distributed
from ..codecs import CodecSpec
from ..errors import BadImageError, ConfigError, FdcacheError, StoreError, StoreMismatchError
from ..options import require
from ..store.layout import StoreInfo, projected_files, view_bytes
from ..store.location import Location, Occupancy
from ..store.manifest import Manifest, index
from ..store.space import check_free_space, format_size, parse_size
from ..store.store import Store, manifest_columns
from ..store.subset import TokenSubset
from ..store.views import ViewPolicy
from .budget import MAX_SEEDS, BudgetChoice, choose
from .pixels import PixelStream, ViewBatches, dali_device
from .teachers import Teacher, load_teacher

__all__ = ["ExtractConfig", "ExtractResult", "shard_batches", "views_source", "open_or_create", "store_info",
           "choose_for_budget", "split_shards", "extract", "teacher_device", "HostCopy"]


@dataclass
class ExtractConfig:
    data: str
    out: str
    teacher: str
    pretrained: str | None = None
    random_init: bool = False
    init_seed: int = 0
    resolution: int | None = None
    teacher_args: dict = field(default_factory=dict)  # timm options of the teacher (recorded in the store)
    seeds: int | None = 1  # None: 1, or with views_from every seed the source store has; with a budget: the fewest
    codec: CodecSpec | str | None = None  # a name ("int8") or a spec; None: fp16, or the budget's choice
    policy: ViewPolicy | str = field(default_factory=ViewPolicy)  # "rrc", "full" or a policy
    compressor: str | None = None  # "zstd" | "none": replaces the codec spec's
    budget: str | None = None  # "1.5TB", "800MB" (or a number of bytes): codec and seeds chosen to fit (.budget)
    max_seeds: int = MAX_SEEDS  # with a budget: the most seeds to store
    token_fraction: float = 1.0  # of each view's patch tokens kept (CLS always): fdcache.store.subset
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
    views_from: str | None = None  # a store whose manifest and recorded views to take
    codec_given: bool = field(init=False, default=False)  # codec named by the caller: a budget keeps it

    def __post_init__(self):
        if self.seeds is None and self.views_from is None:
            self.seeds = 1
        require(self)
        if self.budget is not None:
            self.budget = parse_size(self.budget)
        elif self.max_seeds != MAX_SEEDS:
            raise ConfigError(f"--max-seeds {self.max_seeds} without --budget (--max-seeds): it is the most seeds a "
                              "budget may choose; give --budget SIZE, or --seeds N for a number of seeds")
        self.codec_given = self.codec is not None
        try:  # names become specs here, and only here
            self.codec = CodecSpec.of(self.codec if self.codec is not None else "fp16", self.compressor)
        except ValueError as e:
            option = "--compressor" if "compressor" in str(e) else "--codec"
            raise ConfigError(f"{e} ({option}): choose one that --help lists") from None
        try:
            self.policy = ViewPolicy(kind=self.policy) if isinstance(self.policy, str) else self.policy
        except ValueError as e:
            raise ConfigError(f"{e} (--views): choose one that --help lists") from None
        self.compressor = self.codec.compressor
        self.token_fraction = float(self.token_fraction)  # its range: require (fdcache.options.RANGES)

    @property
    def token_subset(self) -> TokenSubset:
        return TokenSubset(self.token_fraction)


@dataclass
class ExtractResult:
    store: str
    samples: int  # sample-views computed by this call (this rank)
    shards: int
    seconds: float
    skipped: list[str]
    already_done: int  # shards found complete before this call
    ignored: list[str] = field(default_factory=list)  # "path: why", files the index did not take
    budget: BudgetChoice | None = None  # what --budget chose, and why (rank 0)

    @property
    def images_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def shard_batches(a: int, b: int, batch_size: int) -> list[tuple[int, int]]:
    """Batches never cross a shard, so a resumed shard sees the same batches as before."""
    return [(i, min(i + batch_size, b)) for i in range(a, b, batch_size)]


def views_source(cfg: ExtractConfig) -> tuple[Store, Manifest]:
    """``cfg.views_from`` opened, and its manifest rooted at ``cfg.data`` once ``cfg.data`` is
    shown to be the same image set (indexed as any extract indexes it; another folder is a
    :class:`StoreMismatchError` naming the first difference). Sets ``cfg.seeds`` (None: every
    seed of the source), ``cfg.policy`` and ``cfg.global_seed`` (the source's: its views are
    copied, not drawn; a different explicit choice is refused)."""
    src = Store.open(cfg.views_from)
    if cfg.seeds is None:  # with a budget, --seeds is the floor: the budget chooses up to the source's seeds
        cfg.seeds = 1 if cfg.budget is not None else src.num_seeds
    if cfg.seeds > src.num_seeds:
        raise ConfigError(f"--seeds {cfg.seeds}: --views-from store {src.url} holds {src.num_seeds} seed(s); "
                          f"grow it first (re-run its fdcache extract with --seeds {cfg.seeds}), then re-run this one")
    for name, mine, theirs in (("--views", cfg.policy, src.info.policy), ("--global-seed", cfg.global_seed,
                                                                         src.info.global_seed)):
        default = ViewPolicy() if name == "--views" else 0
        if mine != default and mine != theirs:
            raise ConfigError(f"{name}: with --views-from the views are {src.url}'s ({theirs}); drop {name}")
    cfg.policy, cfg.global_seed = src.info.policy, src.info.global_seed
    here = index(cfg.data, file_list=cfg.file_list, skip_bad=cfg.skip_bad, checksums=True)
    if here.fingerprint() != src.info.manifest_sha256:
        why = src.manifest().first_difference(here) or "the manifest fingerprints differ"
        raise StoreMismatchError(f"{cfg.data} is not the image set --views-from store {src.url} was extracted "
                                 f"from: {why}. Point DATA at that folder (the same --file-list, if it had one).")
    manifest = src.manifest(root=cfg.data)  # the source's arrays, byte for byte
    manifest.ignored = list(here.ignored)
    return src, manifest


def open_or_create(cfg: ExtractConfig, teacher: Teacher, manifest: Manifest, location: Location | None = None,
                   occupancy: Occupancy | None = None, views_from: Store | None = None, announce=None) -> Store:
    """The store for ``cfg``: created when the location is empty or holds fdcache's own
    unfinished creation (or a store to replace with ``--overwrite``); otherwise opened,
    checked against the request, cleaned of interrupted writes, its done shards with a
    missing file un-marked (from ``occupancy``'s listing: nothing is listed twice), its views
    record completed, and grown to ``cfg.seeds``. Before any of that writes, the bytes still
    to write are checked against the free disk space
    (:func:`~fdcache.store.space.check_free_space`; ``announce(text)`` is told what was
    checked). Call with the writer lock held. ``location``/``occupancy``: ``cfg.out`` resolved
    and looked at, when the caller already did. ``views_from``: the store whose views are
    copied (:func:`views_source`); an existing store must hold the same views for every seed
    it has."""
    location = location or Location.resolve(cfg.out)
    occupancy = occupancy or location.occupancy()
    info = store_info(cfg, teacher, manifest)
    shards = info.shards
    if occupancy.state == "store" and not cfg.overwrite:
        store = Store.open(location, mode="r+")
        store.check_binding(info)
        if views_from is not None:
            _require_same_views(store, views_from)
        elif cfg.seeds > store.num_seeds and store.info.views_from:
            raise ConfigError(f"{store.url} holds the views of {store.info.views_from}: add seeds through it "
                              f"(grow that store, then re-run with --views-from {store.info.views_from})")
        missing = sorted({(s, k) for s, k, _ in store.missing_data(occupancy.keys)})
        done = store.done()
        todo = [(s, k) for s in range(cfg.seeds) for k in range(shards.count)
                if s >= len(done) or not done[s, k] or (s, k) in missing]
        _check_space(location, info, todo, max(0, cfg.seeds - len(done)), None, 0, announce)
        location.remove_interrupted_writes()  # only rank 0 runs this, before any rank writes
        for s, k in missing:
            store.unmark(s, k)  # a deleted shard file: recompute it (flipped bytes: verify --repair)
        try:
            store.record_views()
        except OSError as e:
            raise StoreError(f"recording the views of {store.url} failed: {e}. Fix the cause and re-run the "
                             "same command.") from e
        if cfg.seeds > store.num_seeds:
            store.grow_seeds(manifest, cfg.seeds, views_from=views_from)
        return store
    todo = [(s, k) for s in range(cfg.seeds) for k in range(shards.count)]
    # creation first removes what a replaced store or an interrupted creation left: fdcache's own bytes
    reclaim = location.used_bytes() if occupancy.state in ("store", "creating") else 0
    _check_space(location, info, todo, cfg.seeds, manifest_columns(manifest), reclaim, announce)
    return Store.create(location, info, manifest, cfg.seeds, overwrite=cfg.overwrite, occupancy=occupancy,
                        views_from=views_from)


def _require_same_views(store: Store, source: Store) -> None:
    n = min(store.num_seeds, source.num_seeds)
    mine, theirs = store.views_hashes(n), source.views_hashes(n)
    for s in range(n):
        if mine[s] != theirs[s]:
            raise StoreMismatchError(f"{store.url} holds other views than --views-from store {source.url} "
                                     f"(seed {s} differs): it was not made from them. Use another --out, or "
                                     "--overwrite to replace it.")


def choose_for_budget(cfg: ExtractConfig, teacher: Teacher, manifest: Manifest,
                      location: Location, source: Store | None = None) -> BudgetChoice:
    """The codec and seeds of ``cfg.budget`` (:func:`.budget.choose`): the whole store, on
    the filesystem's blocks (a remote store: its bytes), an explicit ``--codec`` kept,
    ``--seeds`` the floor, ``--max-seeds`` (and a ``--views-from`` store's seeds: the views
    there are) the ceiling."""
    space = location.free_space()
    block = space[1] if space is not None else 1

    def info_of(spec: CodecSpec) -> StoreInfo:
        return store_info(cfg, teacher, manifest, codec=spec)

    most = cfg.max_seeds if source is None else min(cfg.max_seeds, source.num_seeds)
    return choose(cfg.budget, info_of, manifest_columns(manifest), block, min_seeds=cfg.seeds,
                  max_seeds=most, codec=cfg.codec if cfg.codec_given else None,
                  compressor=cfg.codec.compressor)


def store_info(cfg: ExtractConfig, teacher: Teacher, manifest: Manifest,
               codec: CodecSpec | None = None) -> StoreInfo:
    """The binding ``cfg`` asks for (in ``codec``, when given): a new store gets it, an
    existing one must match it."""
    return StoreInfo(teacher=teacher.spec, policy=cfg.policy, codec=codec or cfg.codec,
                     global_seed=cfg.global_seed, shard_size=cfg.shard_size,
                     num_samples=len(manifest), manifest_sha256=manifest.fingerprint(),
                     token_subset=cfg.token_subset)


def _check_space(location: Location, info: StoreInfo, todo: list, new_seeds: int, columns, reclaim: int,
                 announce) -> None:
    files = projected_files(info, todo, new_seeds, columns, directories=not location.remote)
    views = sum(b - a for a, b in (info.shards.range(k) for _, k in todo))
    line = check_free_space(location, files, views, view_bytes(info), reclaim=reclaim)
    if announce is not None:
        announce(line)


def split_shards(items: list, rank: int, world: int) -> list:
    """Rank ``rank`` of ``world``'s contiguous part of ``items`` (sizes differ by at most one)."""
    n = len(items)
    return items[rank * n // world:(rank + 1) * n // world]


def extract(cfg: ExtractConfig, teacher: Teacher | None = None, announce=None) -> ExtractResult:
    """Run ``cfg``. ``announce(text)``: told, before anything is written, what the free-space
    check found (the CLI prints it)."""
    d = distributed.init()
    device = distributed.device_for(d, cfg.device)
    if teacher is None:
        teacher = load_teacher(cfg.teacher, cfg.pretrained, random_init=cfg.random_init,
                               resolution=cfg.resolution, init_seed=cfg.init_seed, model_args=cfg.teacher_args,
                               device=device)
    else:
        teacher = teacher.to(device)

    # Rank 0 takes the writer lock, indexes the folder and creates (or checks) the store;
    # the others wait, then read the manifest from the store, so a thousand ranks do not
    # stat ImageNet each. Rank 0 holds the lock until every rank is done.
    location = Location.resolve(cfg.out)
    error, lock, manifest, choice = None, location.writer_lock(), None, None
    try:
        if d.is_main:
            try:
                lock.__enter__()
                occupancy = location.occupancy()  # the one look at what is there
                if occupancy.state != "store" or cfg.overwrite:
                    occupancy.refuse_unless_ours(location.url, cfg.overwrite)
                source = None
                if cfg.views_from:
                    source, manifest = views_source(cfg)
                else:
                    manifest = index(cfg.data, file_list=cfg.file_list, skip_bad=cfg.skip_bad, checksums=True)
                if cfg.budget is not None:
                    choice = choose_for_budget(cfg, teacher, manifest, location, source)
                    cfg.codec, cfg.seeds = choice.spec, choice.seeds
                    if announce is not None:
                        announce(choice.text())
                store = open_or_create(cfg, teacher, manifest, location, occupancy, views_from=source,
                                       announce=announce)
                if choice is not None and store.num_seeds > choice.seeds and announce is not None:
                    announce(f"note: {store.url} already holds {store.num_seeds} seeds, more than --budget "
                             f"{format_size(cfg.budget)} chooses ({choice.seeds}); nothing is removed (train "
                             f"--seeds-used {choice.seeds} reads the first {choice.seeds}, or --overwrite replaces "
                             "the store)")
            except FdcacheError as e:
                error = e
        error, cfg.codec, cfg.seeds = d.broadcast((error, cfg.codec, cfg.seeds))  # the budget's choice too
        if error is not None:
            raise error
        if not d.is_main:
            store = Store.open(location, mode="r+")
            manifest = store.manifest(root=cfg.data)
        d.barrier()

        done = store.done()[: cfg.seeds]
        todo = [(s, k) for s in range(cfg.seeds) for k in range(store.num_shards) if not done[s, k]]
        mine = split_shards(todo, d.rank, d.world)
        result = _run(cfg, store, manifest, teacher, mine, d)
        result.already_done = int(done.sum())
        result.ignored = list(manifest.ignored)
        result.budget = choice
        d.barrier()
    finally:
        lock.__exit__(None, None, None)
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
    device = teacher_device(teacher)
    copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
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
                                 mean=spec.mean, std=spec.std, num_threads=cfg.num_threads,
                                 **dali_device(teacher_device(teacher)))
            parts: list[dict[str, torch.Tensor]] = []
            current, partial = 0, 0
            try:
                for bi, images in stream:
                    out = teacher(images.to(teacher_device(teacher), non_blocking=True))
                    seed = work_shards[owners[bi]][0]
                    out, rows = cfg.token_subset.keep(out, spec.prefix_tokens, cfg.global_seed, seed, batches[bi])
                    parts.append(cfg.codec.encode(out, seed=seed, samples=torch.from_numpy(batches[bi]).to(out.device))
                                 | rows)
                    samples += len(images)
                    partial += len(images)
                    bar.update(advance=len(images))
                    last_of_shard = bi + 1 == len(batches) or owners[bi + 1] != owners[bi]
                    if last_of_shard:
                        s, k = work_shards[owners[bi]]
                        a, b = store.shard_range(k)
                        arrays = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
                        skipped = np.array([i in skip for i in range(a, b)], dtype=bool)
                        pending.append(pool.submit(_write, store, s, k, HostCopy(arrays, copy_stream), skipped))
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
                bar.update(advance=-partial)
            finally:
                del stream
        _drain(pending, limit=0)
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)
        bar.close()
    skipped_names = sorted(manifest.paths[i] for i in skip)
    return ExtractResult(store=str(cfg.out), samples=samples, shards=len(shards),
                         seconds=time.perf_counter() - t0, skipped=skipped_names, already_done=0)


def teacher_device(teacher: Teacher) -> torch.device:
    return next(teacher.parameters()).device


class HostCopy:
    """A finished shard's device-to-host copy, started by the thread that produced it.

    On CUDA the copy goes into pinned buffers on a side stream (after the teacher's stream
    reaches this point), so it overlaps the next batches' forward instead of a pageable,
    synchronous ``.cpu()`` on the teacher's stream; the writer thread waits on its event.
    On CPU the tensors are already on the host: the same calls, nothing to wait for."""

    def __init__(self, arrays: dict[str, torch.Tensor], stream=None):
        self.event = None
        if stream is None:
            self.host = {name: t.cpu() for name, t in arrays.items()}
            return
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        with torch.cuda.stream(stream):
            self.host = {name: _pinned_like(t).copy_(t, non_blocking=True) for name, t in arrays.items()}
        for t in arrays.values():
            t.record_stream(stream)  # the allocator must not reuse it before the copy ends
        self.event = stream.record_event()

    def wait(self) -> dict[str, torch.Tensor]:
        if self.event is not None:
            self.event.synchronize()
        return self.host


def _pinned_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True)


def _write(store: Store, seed: int, k: int, copy: HostCopy, skipped: np.ndarray) -> None:
    host = {}
    for name, t in copy.wait().items():
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


def _progress(total: int, enabled: bool):
    from ..progress import Progress

    return Progress("extract", total, unit="img", enabled=enabled and total > 0)
