"""``fdcache inspect`` and ``fdcache verify``: what a store holds, and whether it is whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from zarr.core.sync import sync

from .errors import VerifyError
from .manifest import stat_changes
from .store import Store


def inspect_store(url: str) -> dict:
    """Everything ``fdcache inspect`` prints, as a JSON-ready dict."""
    store = Store.open(url)
    info = store.info
    t = info.teacher
    done = store.done()
    shard_sizes = np.array([b - a for a, b in (store.shard_range(k) for k in range(store.num_shards))])
    complete_views = int((done * shard_sizes[None, :]).sum())
    stored = store.stored_bytes()
    raw_fp16 = t.tokens * t.dim * 2
    per_view = stored / complete_views if complete_views else 0.0
    skipped = store.skipped()
    return {
        "store": str(url),
        "format_version": info.format_version,
        "fdcache_version": info.fdcache_version,
        "teacher": t.to_dict() | {"label": t.label},
        "view_policy": info.policy.to_dict(),
        "codec": info.codec.to_dict(),
        "arrays": {a.name: {"dtype": str(a.dtype), "per_sample_shape": list(a.shape)} for a in store.array_specs()},
        "global_seed": info.global_seed,
        "shape": {"seeds": store.num_seeds, "samples": info.num_samples, "tokens": t.tokens, "dim": t.dim},
        "shard_size": info.shard_size,
        "classes": len(store.classes()),
        "manifest_sha256": info.manifest_sha256,
        "bytes_stored": stored,
        "bytes_per_sample_view": per_view,
        "raw_fp16_bytes_per_sample_view": raw_fp16,
        "compression_ratio": raw_fp16 / per_view if per_view else None,
        "completeness": [
            {"seed": s, "shards_done": int(done[s].sum()), "shards": store.num_shards,
             "samples_done": int((done[s] * shard_sizes).sum()), "skipped": int(skipped[s].sum())}
            for s in range(store.num_seeds)],
        "complete": bool(done.all()),
    }


def verify_store(url: str, data: str | Path | None = None, check_files: bool = True,
                 progress=None) -> dict:
    """Read every chunk (crc32c-checked), check every shard is marked done and present,
    and that the image folder still matches the manifest. Raises :class:`VerifyError`
    listing every problem; returns a summary when all is well."""
    store = Store.open(url)
    problems: list[str] = []
    done = store.done()
    for s, k in zip(*np.nonzero(~done)):
        a, b = store.shard_range(int(k))
        problems.append(f"seed {s} shard {k} (samples {a}..{b - 1}) is not complete: resume extraction")
    names = [n for n in ("targets", "qparams") if n in store.group]
    checked = 0
    for s in range(store.num_seeds):
        for k in range(store.num_shards):
            a, b = store.shard_range(k)
            for name in names:
                arr = store.group[name]
                key = f"{arr.path}/c/{s}/{k}/0/0"
                if done[s, k] and not sync(store.group.store.exists(key)):
                    problems.append(f"{name} seed {s} shard {k}: marked done but its data is missing")
                    continue
                try:
                    arr[s, a:b]
                except Exception as e:  # checksum mismatch, truncated shard, bad codec bytes
                    problems.append(f"{name} seed {s} shard {k} (samples {a}..{b - 1}): unreadable "
                                    f"({type(e).__name__}: {e}); delete that shard file and resume")
            checked += 1
            if progress is not None:
                progress(1)
    for name in ("views", "skipped", "done"):
        try:
            store.group[name][:]
        except Exception as e:
            problems.append(f"{name}: unreadable ({type(e).__name__}: {e})")
    manifest = store.manifest(root=data)
    if check_files:
        if not manifest.root.is_dir():
            problems.append(f"image folder {manifest.root} not found (pass --data to point at it)")
        else:
            changes = stat_changes(manifest)
            problems += [f"dataset: {c}" for c in changes[:20]]
            if len(changes) > 20:
                problems.append(f"dataset: ... and {len(changes) - 20} more changed files")
    if problems:
        raise VerifyError(f"{url}: {len(problems)} problem(s)", problems)
    return {"store": str(url), "shards_checked": checked, "samples": store.info.num_samples,
            "seeds": store.num_seeds, "files_checked": len(manifest) if check_files else 0}
