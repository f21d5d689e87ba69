"""``fdcache verify STORE --teacher-check N``: the stored targets against the teacher, recomputed.

Checksums prove the bytes are the ones written, not that they are the teacher's answer for
that view: another client writing through zarr with the same codec (a bug, a wrong index)
leaves valid checksums behind. This check reloads the teacher from the store's recorded
spec (its weights' sha256 must match the recorded one, or nothing is compared), draws ``N``
recorded views by a seeded choice (reproducible: the same ``--check-seed`` checks the same
views), recomputes each through the reference pixel path (:func:`.pixels.reference_pixels`,
the float64 decode-crop-resize the tests and benchmarks hold DALI to) and compares it with the
stored target, decoded, after FD's whitening (:func:`fdcache.codecs.whitened_error`) against
the codec's documented bound (``Codec.error_bound``: fp16 0.005, int8 0.01, int4 0.10-0.15).

The bound is the codec's rounding. On CUDA the teacher runs under bf16 autocast, as extraction
does, so check a GPU-extracted store on a GPU (``--device cuda``): a CPU recompute in fp32
adds bf16's own rounding to the difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..codecs import whitened_error
from ..errors import ConfigError, TeacherError, VerifyError
from ..store.store import Store
from ..store.subset import kept_rows
from .pixels import reference_pixels
from .teachers import Teacher, load_teacher

__all__ = ["ViewCheck", "load_store_teacher", "choose_views", "teacher_check"]


@dataclass
class ViewCheck:
    seed: int
    sample: int
    path: str
    rel_l2: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.rel_l2 <= self.bound

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "ABOVE the bound"
        return (f"seed {self.seed} sample {self.sample} ({self.path}): whitened rel L2 {self.rel_l2:.3g} "
                f"{'<=' if self.ok else '>'} {self.bound:g} {verdict}")


def load_store_teacher(store: Store, pretrained: str | None = None, device: str = "cpu") -> Teacher:
    """The teacher the store records, rebuilt: its name, weights (``pretrained``: where a
    local checkpoint is now, when the store recorded one), seed and resolution. Its weights'
    sha256 must equal the recorded one (:class:`TeacherError` otherwise)."""
    spec = store.info.teacher
    hub = spec.name.startswith("hf-hub:")
    name = spec.name if hub else f"{spec.source}:{spec.name}"
    weights = pretrained or (None if hub else spec.pretrained)
    try:
        teacher = load_teacher(name, weights, random_init=spec.pretrained is None and not hub,
                               resolution=spec.resolution, init_seed=spec.init_seed or 0, device=device)
    except TeacherError:
        raise
    except Exception as e:  # a missing local checkpoint, no network: say which weights
        raise TeacherError(
            f"the store's teacher {spec.label} cannot be rebuilt ({type(e).__name__}: {e}) (--teacher-check): "
            "give --pretrained PATH where its checkpoint is now") from None
    got = teacher.spec.weights_sha256
    if got != spec.weights_sha256:
        raise TeacherError(
            f"the teacher rebuilt from the store's spec ({spec.label}, weights {weights or 'random-init'}) has "
            f"weights sha256 {got[:16]}..., the store records {spec.weights_sha256[:16]}... (--teacher-check): "
            "these are not the weights that made the store; give --pretrained PATH of the checkpoint it was "
            "extracted with")
    return teacher


def choose_views(store: Store, n: int, seed: int = 0) -> list[tuple[int, int]]:
    """``n`` of the store's recorded views with a target (done, not skipped), drawn without
    replacement by ``numpy.random.default_rng(seed)``, in (seed, sample) order; every view
    when ``n`` is at least their number."""
    views = [(s, int(i)) for s in range(store.num_seeds) for i in store.eligible(s)]
    if n >= len(views):
        return views
    picked = np.random.default_rng(seed).choice(len(views), size=n, replace=False)
    return [views[j] for j in sorted(picked.tolist())]


def teacher_check(url: str, n: int, *, seed: int = 0, data: str | Path | None = None,
                  pretrained: str | None = None, device: str = "cpu", progress=None) -> list[ViewCheck]:
    """Recompute ``n`` recorded views of the store at ``url`` and compare them with the
    stored targets. Raises :class:`VerifyError` (exit 1) naming seed and sample of every
    view above the codec's bound; returns every view's result otherwise."""
    if n < 1:
        raise ConfigError(f"{n!r} is out of range (--teacher-check): give the number of views to recompute, "
                          "at least 1")
    store = Store.open(url)
    teacher = load_store_teacher(store, pretrained, device)
    spec, codec = store.info.teacher, store.info.codec
    manifest = store.manifest(root=data)
    bound = codec.codec.error_bound
    reader = store.reader(threads=1)
    results = []
    for s, i in choose_views(store, n, seed):
        px = reference_pixels(manifest.abspath(i), store.views(s)[i], spec.resolution, spec.mean, spec.std)
        ref = teacher(torch.from_numpy(px)[None].to(device)).float().cpu()
        arrays = reader.read(s, np.array([i]))
        ref = kept_rows(ref, {k: torch.from_numpy(v) for k, v in arrays.items()})  # a token subset's rows
        err = whitened_error(ref, codec.decode(arrays))["rel_l2"]
        results.append(ViewCheck(s, i, manifest.paths[i], err, bound))
        if progress is not None:
            progress(results[-1])
    bad = [r for r in results if not r.ok]
    if bad:
        raise VerifyError(
            f"{url}: {len(bad)} of {len(results)} recomputed view(s) differ from the teacher by more than the "
            f"{codec.name} codec's bound {bound:g} (whitened relative L2). Their targets are not this teacher's "
            "answer for their recorded view, though their checksums hold (another writer?): re-extract into a new "
            "--out", [str(r) for r in bad])
    return results
