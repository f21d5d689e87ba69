"""``fdcache extract --budget SIZE``: the codec and seed count whose store fits SIZE bytes.

A store's bytes are ``fixed + S x per_seed`` exactly (:func:`~fdcache.store.layout.projected_files`:
each seed adds the same files; the manifest and metadata are paid once), so for each codec the
most seeds that fit is one division, from the teacher's token map (tokens x dim), the image
count and the codec's bytes per view. Which codec then:

* **Measured** (:data:`MEASURED` holds, per codec, the held-out FD loss against online FD at
  each measured seed count; docs/benchmarks.md, "Views budget"): the candidate with the lowest
  expected cost, reading each at the largest measured seed count it reaches.
* **Otherwise** (today: :data:`MEASURED` is empty): the rule *more views beat more bits*, the
  codec that fits the most seeds; among codecs that fit as many, the one with more bits. int4
  is chosen when it buys more seeds than int8, int8 when it buys more than fp16. Why: the
  views-budget measurement (docs/benchmarks.md) saw replay first as a memorisation gap that
  grows with every halving of the seeds, while int4 cost 0.02% of held-out loss per view; its
  one small setting (every stored arm within 0.4% of online's held-out loss) gives no cost per
  (codec, seeds) that carries over to another dataset, student and schedule, so it does not
  fill :data:`MEASURED`.

``--seeds N`` is the floor (no choice below N seeds is taken), ``--max-seeds`` the ceiling (a
run of E epochs replays seed ``e mod S``, so it never reads more than E seeds; the default,
300, is FD's schedule). An explicit ``--codec`` is kept and only the seed count is chosen. The
choice depends on the budget, the teacher, the images and the filesystem's block only, so the
same command chooses the same store when it is re-run to resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..codecs import CodecSpec
from ..errors import ConfigError
from ..store.layout import StoreInfo, on_disk, projected_files, view_bytes
from ..store.space import format_size

__all__ = ["CANDIDATES", "MAX_SEEDS", "MEASURED", "CodecFit", "BudgetChoice", "choose"]

CANDIDATES = ("fp16", "int8", "int4")  # most bits first: the tie-break
MAX_SEEDS = 300
# codec -> {seeds: held-out FD loss minus online FD's}, from docs/benchmarks.md "Views budget"
# once measured (issue 21's measurement fills it); empty: the rule decides.
MEASURED: dict[str, dict[int, float]] = {}


@dataclass
class CodecFit:
    """What ``budget`` buys in one codec."""

    codec: str
    view_bytes: int  # one sample-view in the shard files (data, crc32c, index entry)
    fixed: int  # bytes paid once: manifest, metadata
    per_seed: int  # bytes each seed adds, on disk
    seeds: int  # the most that fit (0: not even one), at most the ceiling
    cost: float | None = None  # expected held-out loss against online, when measured

    def store_bytes(self, seeds: int | None = None) -> int:
        return self.fixed + (self.seeds if seeds is None else seeds) * self.per_seed


@dataclass
class BudgetChoice:
    budget: int
    spec: CodecSpec
    seeds: int
    fits: list[CodecFit]
    reason: str
    images: int = 0
    map_shape: tuple[int, int] = (0, 0)
    measured: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def codec(self) -> str:
        return self.spec.name

    @property
    def store_bytes(self) -> int:
        return next(f for f in self.fits if f.codec == self.codec).store_bytes(self.seeds)

    def text(self) -> str:
        """What was chosen and why, as extract prints it."""
        tokens, dim = self.map_shape
        lines = [f"--budget {format_size(self.budget)} ({self.budget:,} bytes) for {self.images:,} images of a "
                 f"{tokens}x{dim} token map:"]
        for f in self.fits:
            cost = "" if f.cost is None else f", expected cost against online {f.cost:+.4g}"
            lines.append(f"  {f.codec:5s} {f.view_bytes:,} bytes per view -> {f.seeds} view(s) per image "
                         f"({format_size(f.store_bytes())}){cost}")
        if not self.measured:
            lines.append('  expected cost against online: not in a table that carries over (docs/benchmarks.md, "Views '
                         'budget", measured one small setting: replay shows as memorisation, int4 costs 0.02% per view)')
        lines.append(f"choice: --codec {self.codec} --seeds {self.seeds} ({format_size(self.store_bytes)}): "
                     f"{self.reason}")
        return "\n".join(lines + self.notes)


def _measured_cost(codec: str, seeds: int) -> float | None:
    table = MEASURED.get(codec, {})
    reached = [s for s in table if s <= seeds]
    return table[max(reached)] if reached else None


def choose(budget: int, info_of: Callable[[CodecSpec], StoreInfo], columns: dict, block: int, *,
           min_seeds: int = 1, max_seeds: int = MAX_SEEDS, codec: CodecSpec | None = None,
           compressor: str = "none") -> BudgetChoice:
    """The codec and seeds whose whole store fits ``budget`` bytes on a filesystem of
    ``block``-byte allocation units. ``info_of(spec)``: the store's binding in a codec;
    ``columns``: its manifest columns; ``codec``: fixed by the user (else one of
    :data:`CANDIDATES`, under ``compressor``). Raises :class:`ConfigError` naming ``--budget``
    when no choice of at least ``min_seeds`` fits."""
    if max_seeds < min_seeds:
        raise ConfigError(f"--max-seeds {max_seeds} is below --seeds {min_seeds}: with --budget, --seeds is the "
                          "fewest seeds to store and --max-seeds the most")
    specs = [codec] if codec is not None else [CodecSpec(name, compressor) for name in CANDIDATES]
    fits = []
    for spec in specs:
        info = info_of(spec)
        dirs = block > 1  # a local store: its folders take blocks too
        fixed = on_disk(projected_files(info, [], 0, columns, directories=dirs), block)
        per_seed = on_disk(projected_files(info, [(0, k) for k in range(info.shards.count)], 1, directories=dirs), block)
        seeds = max(0, min(max_seeds, (budget - fixed) // per_seed))
        fits.append(CodecFit(spec.name, view_bytes(info), fixed, per_seed, seeds, _measured_cost(spec.name, seeds)))
    ok = [f for f in fits if f.seeds >= min_seeds]
    images = info.num_samples
    shape = (info.teacher.tokens, info.teacher.dim)
    if not ok:
        small = min(fits, key=lambda f: f.store_bytes(min_seeds))
        raise ConfigError(
            f"--budget {format_size(budget)} ({budget:,} bytes) holds no store of {images:,} images at --seeds "
            f"{min_seeds}: the smallest, {small.codec} at {min_seeds} seed(s), takes "
            f"{format_size(small.store_bytes(min_seeds))} ({small.store_bytes(min_seeds):,} bytes). Raise --budget, "
            + ("lower --seeds, or choose another --codec." if codec is not None else "or lower --seeds."))
    measured = all(f.cost is not None for f in ok)
    spec_of = {s.name: s for s in specs}
    if codec is not None:
        best, reason = ok[0], f"--codec {codec.name} given; the most seeds that fit"
    elif measured:
        best = min(ok, key=lambda f: f.cost)  # min keeps the first (most bits) among equals
        reason = "the lowest expected cost against online in the measured table"
    else:
        best = max(ok, key=lambda f: f.seeds)  # max keeps the first (most bits) among equals
        more_bits = [f.codec for f in ok if f.seeds == best.seeds and f is not best]
        reason = ('"more views beat more bits" (no measured cost per codec and seeds): the most views per image'
                  + (f"; {best.codec} over {', '.join(more_bits)}: as many views, more bits" if more_bits else "")
                  + "".join(f"; {best.codec} buys {best.seeds} seeds where {f.codec} buys {f.seeds}"
                            for f in ok if f.seeds < best.seeds))
    return BudgetChoice(budget, spec_of[best.codec], best.seeds, fits, reason, images, shape, measured)
