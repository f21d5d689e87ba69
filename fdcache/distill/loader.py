"""Training batches: recorded views through the shared pixel path, with their targets.

One DALI pipeline per run: ``fn.external_source`` (batch callback :class:`TrainSource`,
optionally in parallel worker processes with prefetch) yields encoded bytes, the recorded
windows, the flips and the codec's stored arrays (one batch read from the store's reader,
carried as stored: the task decides what the loss reads);
images go through :func:`pixels.pixel_pipeline`, the builder extraction uses (``mixed``
decode on GPU), targets ride along (copied to the GPU by DALI). Batches come out as torch
tensors on the device, images and targets in matching order.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..errors import FdcacheError
from .pixels import explain_decode_failure, pixel_pipeline
from .sources import TrainSource

__all__ = ["Batch", "resolve_workers", "build_pipeline", "batches"]


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, R, R] float32, student-normalized
    stored: list[dict[str, torch.Tensor]] | None  # offline: each store's codec arrays, as stored
    index: torch.Tensor  # [B] sample indices
    epoch: int
    step_in_epoch: int
    wait_s: float  # time spent waiting for this batch


def resolve_workers(workers: int | str, device: torch.device) -> int:
    """``"auto"``: on CUDA, parallel external-source workers (up to 4, sharing the host's
    cores between the ranks of this node) so that reading the next batches overlaps the
    GPU step; with 0 the callbacks run inside ``pipe.run()`` on the training thread. On
    CPU, 0: workers would only take cores from the step."""
    if workers != "auto":
        try:
            n = int(workers)
        except ValueError:
            n = -1
        if n < 0:
            raise FdcacheError(f"--loader-workers must be auto or a number >= 0, got {workers!r}")
        return n
    if torch.device(device).type != "cuda":
        return 0
    per_rank = (os.cpu_count() or 2) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(4, per_rank // 2))


def build_pipeline(source: TrainSource, *, resolution: int, mean, std, device: str = "cpu",
                   num_threads: int = 4, parallel: bool = False, py_workers: int = 2, prefetch: int = 2,
                   device_id: int | None = None):
    """:func:`pixels.pixel_pipeline` fed one batch at a time by ``source``; the codec's stored
    arrays (one reader call per batch) and the sample indices ride beside the images."""
    from nvidia.dali import types

    extra = [(types.to_dali_type(np.dtype(lay.dtype).name), len(lay.shape))
             for r in source.readers for lay in r.layouts]
    extra.append((types.INT64, 0))
    return pixel_pipeline(source, batch_size=source.batch_size, resolution=resolution, mean=mean, std=std,
                          device=device, num_threads=num_threads, device_id=device_id, prefetch=prefetch,
                          parallel=parallel, py_workers=py_workers, batch_info=True, extra=extra)


def batches(source: TrainSource, **pipeline_kw) -> Iterator[Batch]:
    """Endless stream of batches from ``source.start_epoch`` (skipping
    ``source.skip_samples``), epoch after epoch; offline batches carry the store's arrays as
    stored (the task decides what the loss reads: :meth:`CodecSpec.loss_inputs` or a decode)."""
    pipe = build_pipeline(source, **pipeline_kw)
    offline = source.offline
    names = [r.names for r in source.readers]
    epoch, step = source.start_epoch, source.skip_samples // source.batch_size
    while True:
        t0 = time.perf_counter()
        try:
            outs = pipe.run()
        except StopIteration:
            pipe.reset()
            epoch, step = epoch + 1, 0
            continue
        except RuntimeError as e:
            raise _explain(source, epoch, step, e) from e
        # No copy: exec_dynamic allocates each run's outputs anew and keeps them alive while
        # referenced; ``__dlpack__`` makes torch's current stream wait for DALI's
        # (nvidia.dali.tensors.TensorGPU.__dlpack__ docs).
        tensors = [torch.from_dlpack(o.as_tensor()) for o in outs]
        wait = time.perf_counter() - t0
        stored = _per_store(names, tensors[1:-1]) if offline else None
        yield Batch(images=tensors[0], stored=stored, index=tensors[-1], epoch=epoch, step_in_epoch=step,
                    wait_s=wait)
        step += 1


def _per_store(names: list[list[str]], tensors: list) -> list[dict]:
    out, i = [], 0
    for n in names:
        out.append(dict(zip(n, tensors[i:i + len(n)])))
        i += len(n)
    return out


def _explain(source: TrainSource, epoch: int, step: int, err: RuntimeError) -> Exception:
    """Name the image DALI could not decode: it is in this batch or one prefetched after it."""
    rows = source.order(epoch)[step * source.batch_size:(step + 3) * source.batch_size]
    items = [(source.files[int(i)], v) for i, v in zip(rows, source.views_of(epoch, rows))]
    return explain_decode_failure(items, err, f"epoch {epoch} batch {step}",
                                  fix="remove or fix them (fdcache verify checks a store's folder), then resume")
