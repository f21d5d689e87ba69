"""Training batches: recorded views through the shared pixel path, with their targets.

One DALI pipeline per run: ``fn.external_source`` (batch callback :class:`TrainSource`,
optionally in parallel worker processes with prefetch) yields encoded bytes, the recorded
windows, the flips and the codec's stored arrays (one batch read from the store's reader);
images go through :func:`pixels.pixel_graph` (``mixed`` decode on GPU), targets ride along (copied to the GPU by DALI). Batches come
out as torch tensors on the device, images and targets in matching order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .codecs import CodecSpec
from .pixels import pixel_graph
from .sources import TrainSource


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, R, R] float32, student-normalized
    targets: torch.Tensor | None  # offline: the codec's loss input (fp16 map, or int8 q)
    qparams: torch.Tensor | None  # its per-token (scale, offset) when the codec has them
    index: torch.Tensor  # [B] sample indices
    epoch: int
    step_in_epoch: int
    wait_s: float  # time spent waiting for this batch
    stored: dict[str, torch.Tensor] | None = None  # offline: the codec's stored arrays (for decode)


def build_pipeline(source: TrainSource, *, resolution: int, mean, std, device: str = "cpu",
                   num_threads: int = 4, parallel: bool = False, py_workers: int = 2, prefetch: int = 2,
                   device_id: int | None = None):
    from nvidia.dali import fn, pipeline_def, types

    dtypes = [types.UINT8, types.INT32, types.INT32]
    ndims = [1, 1, 0]
    for lay in source.reader.layouts if source.offline else ():
        dtypes.append(types.to_dali_type(np.dtype(lay.dtype).name)); ndims.append(len(lay.shape))
    dtypes.append(types.INT64); ndims.append(0)
    if device == "gpu" and device_id is None:
        device_id = torch.cuda.current_device()

    @pipeline_def(batch_size=source.batch_size, num_threads=num_threads,
                  device_id=device_id if device == "gpu" else None, prefetch_queue_depth=prefetch,
                  exec_dynamic=True, py_num_workers=py_workers, py_start_method="spawn")
    def pipe():
        outs = fn.external_source(source=source, num_outputs=len(dtypes), batch=True, batch_info=True,
                                  parallel=parallel, dtype=dtypes, ndim=ndims)
        images = pixel_graph(outs[0], outs[1], outs[2], resolution=resolution, mean=mean, std=std,
                             device=device)
        extras = [o.gpu() if device == "gpu" else o for o in outs[3:]]
        return (images, *extras)

    p = pipe()
    p.build()
    return p


def batches(source: TrainSource, codec: CodecSpec | None = None, **pipeline_kw) -> Iterator[Batch]:
    """Endless stream of batches from ``source.start_epoch`` (skipping
    ``source.skip_samples``), epoch after epoch. Offline sources need the store's ``codec``."""
    pipe = build_pipeline(source, **pipeline_kw)
    offline = source.offline
    names = source.reader.names if offline else []
    epoch, step = source.start_epoch, source.skip_samples // source.batch_size
    while True:
        t0 = time.perf_counter()
        try:
            outs = pipe.run()
        except StopIteration:
            pipe.reset()
            epoch, step = epoch + 1, 0
            continue
        tensors = [torch.from_dlpack(o.as_tensor()).clone() for o in outs]
        wait = time.perf_counter() - t0
        stored = dict(zip(names, tensors[1:-1])) if offline else None
        targets, qparams = codec.loss_inputs(stored) if offline else (None, None)
        yield Batch(images=tensors[0], targets=targets, qparams=qparams, index=tensors[-1],
                    epoch=epoch, step_in_epoch=step, wait_s=wait, stored=stored)
        step += 1
