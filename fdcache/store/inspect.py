"""``fdcache inspect`` and ``fdcache verify``: what a store holds, and whether it is whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import StoreError, VerifyError
from .audit import audit
from .audit import repair as apply_repairs
from .manifest import compare_files
from .store import Store

__all__ = ["inspect_store", "verify_store"]


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
        "grid": {"prefix_tokens": t.prefix_tokens, "rows": t.rows, "cols": t.cols,
                 "stride_px": t.resolution / t.rows},
        "shard_size": info.shard_size,
        "classes": len(store.classes()),
        "manifest_sha256": info.manifest_sha256,
        "view_set": store.view_set(),  # equal for stores on one view set (extract --views-from)
        "views_from": info.views_from,
        "token_fraction": info.token_subset.fraction,  # of each view's patch tokens stored (1: every token)
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
                 progress=None, *, content: bool = False, repair: bool = False) -> dict:
    """Check the whole store (:func:`.audit.audit`: every array's metadata, every chunk,
    attributes against shapes, the manifest's fingerprint) and that the image folder still
    matches the manifest (sizes; with ``content`` every file's crc32c). Never crashes on a
    broken store: raises :class:`VerifyError` (exit 1) listing every problem. ``repair``
    un-marks damaged shards (and redraws damaged views) so that re-running the same
    ``fdcache extract`` recomputes them. Returns a summary (with ``warnings``) when all is well."""
    try:
        store = Store.open(url, mode="r+" if repair else "r")
    except StoreError as e:
        raise VerifyError(f"{url}: cannot open the store", [str(e)]) from None
    problems = audit(store, progress=progress)
    warnings: list[str] = []
    files = 0
    if check_files:
        try:
            manifest = store.manifest(root=data)
        except Exception:
            manifest = None  # audit already names the damaged manifest
        if manifest is not None and not manifest.root.is_dir():
            problems.append(f"image folder {manifest.root} not found (pass --data to point at it)")
        elif manifest is not None:
            changes = compare_files(manifest, content=content, headers="all")
            refusals = changes.refusals
            problems += [f"dataset: {c}" for c in refusals[:20]]
            if len(refusals) > 20:
                problems.append(f"dataset: ... and {len(refusals) - 20} more changed files")
            if changes.touched:
                warnings.append(changes.touched_warning(url, manifest.root))
            files = len(manifest)
    if problems:
        message = f"{url}: {len(problems)} problem(s)"
        if repair:
            done = apply_repairs(store, [p for p in problems if not isinstance(p, str)])
            message += ("; repair: " + "; ".join(done) + ". Now re-run the same fdcache extract command "
                        "to recompute them" if done else "; nothing here can be repaired in place")
        elif any(getattr(p, "repair", None) for p in problems):
            message += f"; `fdcache verify {url} --repair` un-marks the damaged shards (redraws damaged views), then re-run the same extract"
        raise VerifyError(message, [str(p) for p in problems])
    return {"store": str(url), "shards_checked": store.num_seeds * store.num_shards,
            "samples": store.info.num_samples, "seeds": store.num_seeds, "files_checked": files,
            "content_checked": bool(content and files), "warnings": warnings}
