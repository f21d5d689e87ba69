"""``verify``'s engine: check everything a store claims against what is there, and repair
what can be repaired in place. Never raises for damage: every finding is a :class:`Problem`.

What is checked: every array's metadata against the binding (shape and chunking from
:func:`.layout.store_arrays`), every chunk of every array (data and skip flags of done
shards, done markers, views, manifest; each read checks its crc32c), and the manifest's
fingerprint. ``repair`` un-marks damaged shards (the same extract then recomputes them) and
redraws damaged views (they are a pure function of the manifest).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .layout import MANIFEST_FIELDS, chunk_key, shard_key
from .store import Store

__all__ = ["Problem", "audit", "repair"]

_REMAKE = "Re-extract into a new --out (or --overwrite this one)."


@dataclass
class Problem:
    """One finding of :func:`audit`. ``repair`` is what :func:`repair` does about it:
    ``("unmark", seed, shard)`` (the same extract then recomputes the shard), ``("views",
    seed)`` (views are redrawn from the manifest), or None (not repairable in place)."""

    text: str
    repair: tuple | None = None

    def __str__(self) -> str:
        return self.text


def audit(store: Store, progress=None) -> list[Problem]:
    """Every problem of ``store``, from one listing of its keys and one read of each chunk.
    ``progress(n)`` is called once per shard checked."""
    info, shards = store.info, store.shards
    decls = {a.name: a for a in store.arrays()}
    problems, arrays = [], {}
    for name, decl in decls.items():
        try:
            arr = store.group[name]
        except Exception as e:  # noqa: BLE001 -- any failure is the finding
            problems.append(Problem(f"{name}: array metadata missing or unreadable ({type(e).__name__}: {e})"))
            continue
        want = decl.full_shape(arr.shape[0], shards)
        chunks, shard_files = decl.chunking(shards)
        want_chunks = shard_files or (chunks if decl.chunk != "block" else None)
        if tuple(arr.shape[1:]) != want[1:]:
            problems.append(Problem(f"{name}: shape {arr.shape} does not fit the store's attributes "
                                    f"(num_samples {info.num_samples}, shard_size {info.shard_size}: "
                                    f"expected [S, {', '.join(map(str, want[1:]))}])"))
        elif want_chunks is not None and tuple(arr.shards or arr.chunks) != want_chunks:
            problems.append(Problem(f"{name}: chunking {arr.shards or arr.chunks} does not fit "
                                    f"shard_size {info.shard_size} (expected {want_chunks})"))
        else:
            arrays[name] = arr
    if problems:
        return problems + [Problem("the store's metadata is inconsistent: nothing is trusted. " + _REMAKE)]
    seeds = arrays["done"].shape[0]
    for name, arr in arrays.items():
        if arr.shape[0] < seeds:
            problems.append(Problem(f"{name}: {arr.shape[0]} seed(s), done has {seeds}"))
    if problems:
        return problems
    have = set(store.location.keys())
    done = _audit_done(arrays["done"], seeds, problems)
    data = [d for d in decls.values() if d.data]
    reader = store.reader(done=done, skipped=_lenient_skipped(arrays["skipped"])) if done.any() else None
    for s in range(seeds):
        for k in range(shards.count):
            a, b = shards.range(k)
            where = f"seed {s} {shards.describe(k)}"
            if not done[s, k]:
                problems.append(Problem(f"{where} is not complete: re-run the same fdcache extract command"))
            else:
                gone = [d.name for d in data if shard_key(d.name, s, k, len(d.shape)) not in have]
                for name in gone:
                    problems.append(Problem(f"{name} seed {s} shard {k}: marked done but its data is "
                                            f"missing (samples {a}..{b - 1})", ("unmark", s, k)))
                for d in data:
                    if d.name not in gone and not d.codec:  # skip flags: zarr checks their crc32c
                        try:
                            arrays[d.name][s, a:b]
                        except Exception as e:  # noqa: BLE001
                            problems.append(Problem(f"{d.name} seed {s} shard {k} (samples {a}..{b - 1}): "
                                                    f"unreadable ({type(e).__name__}: {e})", ("unmark", s, k)))
                if not gone:
                    _audit_samples(store, reader, s, k, problems)
            if progress is not None:
                progress(1)
    _audit_views(arrays["views"], seeds, have, problems)
    _audit_manifest(store, have, problems)
    return problems


def repair(store: Store, problems: list[Problem]) -> list[str]:
    """Apply the repairs of ``problems``: un-mark damaged shards, redraw damaged views.
    Returns what was done; the same extract command then recomputes the shards."""
    done_msgs = []
    unmark = sorted({p.repair[1:] for p in problems if p.repair and p.repair[0] == "unmark"})
    for s, k in unmark:
        store.unmark(s, k)
    if unmark:
        done_msgs.append(f"un-marked {len(unmark)} shard(s): " +
                         ", ".join(f"seed {s} shard {k}" for s, k in unmark[:10]))
    seeds = sorted({p.repair[1] for p in problems if p.repair and p.repair[0] == "views"})
    if seeds:
        store.write_views(store.manifest(), seeds)
        done_msgs.append(f"redrew the views of seed(s) {seeds}")
    return done_msgs


def _audit_samples(store: Store, reader, s: int, k: int, problems: list[Problem]) -> None:
    """Shard ``k`` of seed ``s`` read as training reads it (the reader: every sample's chunk
    present in its shard index and its crc32c right, whoever wrote the file), then each sample
    decoded: a target that is one value throughout in a sample not marked skipped is never a
    teacher's output. Another Zarr client writing zeros (or any fill value) makes exactly that,
    or, with zarr's default ``write_empty_chunks=False``, drops the sample's chunk: both are
    found here and repaired the same way (un-mark; the extract recomputes the shard)."""
    a, b = store.shards.range(k)
    try:
        stored = reader.read_range(s, a, b)
    except Exception as e:  # noqa: BLE001 -- StoreDataError names the sample; anything else is damage too
        problems.append(Problem(f"seed {s} shard {k} (samples {a}..{b - 1}): {e}", ("unmark", s, k)))
        return
    flat = store.info.codec.decode(stored).flatten(1)
    constant = (flat.amax(dim=1) == flat.amin(dim=1)).numpy() & ~reader.skipped[s, a:b]
    for j in constant.nonzero()[0].tolist():
        problems.append(Problem(
            f"seed {s} sample {a + j} (shard {k}): its target is {float(flat[j, 0]):g} everywhere but the sample "
            "is not marked skipped: no teacher outputs that (written by another client?). --repair un-marks the "
            "shard; the same fdcache extract then recomputes it", ("unmark", s, k)))


def _lenient_skipped(arr) -> np.ndarray:
    """The skip flags, or none set where a chunk is unreadable (that damage is reported per
    shard; its samples are then read and checked as any other)."""
    try:
        return arr[:].astype(bool)
    except Exception:  # noqa: BLE001
        return np.zeros(arr.shape, bool)


def _audit_done(arr, seeds: int, problems: list[Problem]) -> np.ndarray:
    try:
        values = arr[:]
    except Exception:  # noqa: BLE001 -- find the damaged markers one by one
        values = np.zeros(arr.shape, np.uint8)
        for s in range(seeds):
            for k in range(arr.shape[1]):
                try:
                    values[s, k] = arr[s, k]
                except Exception as e:  # noqa: BLE001
                    problems.append(Problem(f"done marker of seed {s} shard {k}: unreadable "
                                            f"({type(e).__name__})", ("unmark", s, k)))
    for s, k in zip(*np.nonzero(values > 1)):
        problems.append(Problem(f"done marker of seed {s} shard {k}: value {values[s, k]}", ("unmark", int(s), int(k))))
    return values == 1


def _audit_views(arr, seeds: int, have: set[str], problems: list[Problem]) -> None:
    c = arr.chunks[1]
    for s in range(seeds):
        for j in range(arr.cdata_shape[1]):
            why = None
            if chunk_key("views", (s, j, 0)) not in have:
                why = "missing"
            else:
                try:
                    arr[s, j * c:(j + 1) * c]
                except Exception as e:  # noqa: BLE001
                    why = f"unreadable ({type(e).__name__})"
            if why:
                problems.append(Problem(f"views of seed {s} (chunk {j}): {why}", ("views", s)))


def _audit_manifest(store: Store, have: set[str], problems: list[Problem]) -> None:
    try:
        for name in ("paths_utf8", "path_offsets") + MANIFEST_FIELDS:
            arr = store.group["manifest"][name]
            gone = [j for j in range(arr.cdata_shape[0]) if chunk_key(f"manifest/{name}", (j,)) not in have]
            if gone:
                problems.append(Problem(f"manifest/{name}: chunk(s) {gone[:5]} missing. " + _REMAKE))
        if store.manifest().fingerprint() != store.info.manifest_sha256:
            problems.append(Problem("manifest: its fingerprint differs from the one the store was bound to "
                                    "(edited?). Re-extract into a new --out."))
    except Exception as e:  # noqa: BLE001
        problems.append(Problem(f"manifest: unreadable ({type(e).__name__}: {e}). " + _REMAKE))
