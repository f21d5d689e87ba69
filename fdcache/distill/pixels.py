"""The one pixel path: encoded file + recorded view -> normalized CHW float tensor.

Extraction and training both call :func:`pixel_pipeline`; the teacher and the student see
the same pixels. DALI decodes only the recorded window (``fn.decoders.image_slice``,
EXIF-oriented coordinates), resizes it to the model resolution with an antialiased
triangle filter, flips and normalizes. ``device="gpu"`` decodes with ``mixed`` (nvJPEG)
and runs the rest on the GPU; ``device="cpu"`` uses CPU operators and needs no GPU.

:func:`reference_pixels` is an independent PIL + NumPy implementation of the same maths
(decoding by :func:`fdcache.images.open_rgb`, the decoder contract), used by the tests to
check the pixel path and the store without DALI.

DALI's decode errors name no file and bury their reason under the pipeline's traceback: a
failed batch is explained by :func:`explain_decode_failure`, which names each culprit with
its reason (the decoder contract's, PIL's, or DALI's own line, found by decoding the files
of the batch one at a time).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import BadImageError, DataError, ImageRefusedError, cause_of
from ..images import open_rgb, read_size

__all__ = ["PLACEHOLDER", "PLACEHOLDER_WINDOW", "ViewBatches", "dali_device", "pixel_pipeline",
           "pixel_graph", "undecodable", "dali_refusal", "PixelStream", "explain_decode_failure",
           "reference_pixels"]


def _placeholder_png() -> np.ndarray:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buf, format="PNG")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8).copy()


PLACEHOLDER = _placeholder_png()
PLACEHOLDER_WINDOW = np.array([0, 0, 8, 8], dtype=np.int32)  # x, y, w, h


@dataclass
class ViewBatches:
    """The work list of a pipeline: batches of (file, view) pairs, read in order.

    ``batches[k]`` holds indices into ``files`` and ``views[k]`` their views, int32
    ``[b, 5]`` (y, x, h, w, flip). Files listed in ``skip`` are fed a placeholder image
    (their outputs are recorded as skipped, never used). Picklable, so it can run in
    DALI's parallel (spawned) workers.
    """

    files: Sequence[str]
    batches: list[np.ndarray]
    views: list[np.ndarray]
    skip: frozenset[int] = frozenset()

    def __call__(self, iteration: int):
        if iteration >= len(self.batches):
            raise StopIteration
        encoded, windows, flips = [], [], []
        for r, view in zip(self.batches[iteration], self.views[iteration]):
            r = int(r)
            y, x, h, w, flip = (int(v) for v in view)
            if r in self.skip:
                encoded.append(PLACEHOLDER); windows.append(PLACEHOLDER_WINDOW)
                flips.append(np.array(0, np.int32))
                continue
            try:
                encoded.append(np.fromfile(self.files[r], dtype=np.uint8))
            except OSError as e:
                raise DataError(f"cannot read {self.files[r]}: {e.strerror or e}") from e
            windows.append(np.array([x, y, w, h], dtype=np.int32))
            flips.append(np.array(flip, dtype=np.int32))
        return encoded, windows, flips


def dali_device(device: torch.device | str) -> dict:
    """DALI's ``device`` and ``device_id`` for the torch device the models run on (what
    ``--device`` resolved to), not for whatever GPU the host has: with ``--device cpu`` on
    a GPU host DALI stays on the CPU, with ``cuda:1`` it decodes on GPU 1."""
    device = torch.device(device)
    if device.type != "cuda":
        return {"device": "cpu", "device_id": None}
    return {"device": "gpu", "device_id": device.index if device.index is not None else torch.cuda.current_device()}


def pixel_pipeline(source: Callable, *, batch_size: int, resolution: int,
                   mean: Sequence[float], std: Sequence[float], device: str = "cpu",
                   num_threads: int = 4, device_id: int | None = None, prefetch: int = 2,
                   parallel: bool = False, py_workers: int = 2, batch_info: bool = False, extra=()):
    """The one DALI pipeline builder (extraction and training). ``source(iteration)`` yields a
    batch (encoded, windows, flips, *extra) (see :class:`ViewBatches`); with ``batch_info`` it
    is called with DALI's ``BatchInfo`` (epoch and iteration), as training's source needs.
    ``extra`` lists (DALI dtype, ndim) of outputs passed through beside the images (to the GPU
    on "gpu"). mean/std are in [0, 1] units."""
    from nvidia.dali import fn, pipeline_def, types

    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    if device == "gpu" and device_id is None:
        device_id = torch.cuda.current_device()

    @pipeline_def(batch_size=batch_size, num_threads=num_threads,
                  device_id=device_id if device == "gpu" else None,
                  prefetch_queue_depth=prefetch, exec_dynamic=True,
                  py_num_workers=py_workers, py_start_method="spawn")
    def pipe():
        outs = fn.external_source(
            source=source, num_outputs=3 + len(extra), batch=True, parallel=parallel,
            **({"batch_info": True} if batch_info else {}),
            dtype=[types.UINT8, types.INT32, types.INT32, *(d for d, _ in extra)],
            ndim=[1, 1, 0, *(n for _, n in extra)])
        images = pixel_graph(outs[0], outs[1], outs[2], resolution=resolution, mean=mean, std=std,
                             device=device)
        if not extra:
            return images
        return (images, *(o.gpu() if device == "gpu" else o for o in outs[3:]))

    p = pipe()
    p.build()
    return p


def pixel_graph(encoded, window, flip, *, resolution: int, mean: Sequence[float],
                std: Sequence[float], device: str):
    """The DALI operators of the pixel path, for use inside any ``@pipeline_def``:
    encoded bytes + window (x, y, w, h) + flip -> float CHW, normalized."""
    from nvidia.dali import fn, types

    decoder_kw = {"hw_decoder_load": 0.65, "jpeg_fancy_upsampling": True} if device == "gpu" else {}
    img = fn.decoders.image_slice(
        encoded, window[0:2], window[2:4], normalized_anchor=False, normalized_shape=False,
        output_type=types.RGB, device="mixed" if device == "gpu" else "cpu", **decoder_kw)
    img = fn.resize(img, size=[resolution, resolution], interp_type=types.INTERP_LINEAR,
                    antialias=True, subpixel_scale=False, dtype=types.FLOAT)
    return fn.crop_mirror_normalize(
        img, mirror=flip, mean=[255.0 * m for m in mean], std=[255.0 * s for s in std],
        output_layout="CHW", dtype=types.FLOAT)


def undecodable(items: Sequence[tuple[str, Sequence[int] | None]]) -> dict[str, str]:
    """``{file: reason}`` for the (file, view) pairs among ``items`` that cannot be decoded:
    first by the decoder contract and PIL (:func:`fdcache.images.open_rgb`), then, when
    those find none, by DALI itself, one file at a time (about 45 ms each on CPU), with the
    recorded window (``view`` = y, x, h, w, flip; None: the whole image)."""
    bad: dict[str, str] = {}
    for f, _ in items:
        if f in bad:
            continue
        try:
            open_rgb(f)
        except ImageRefusedError as e:
            bad[f] = e.reason
        except Exception as e:  # PIL raises many types for damaged files
            bad[f] = cause_of(e)
    if bad:
        return bad
    for f, view in items:
        if f not in bad:
            why = dali_refusal(f, view)
            if why:
                bad[f] = why
    return bad


def dali_refusal(path: str, view: Sequence[int] | None = None) -> str | None:
    """DALI's reason for not decoding ``view`` of ``path`` alone (CPU operators), or None."""
    try:
        if view is None:
            w, h = read_size(path)
            view = (0, 0, h, w, 0)
        work = ViewBatches([path], [np.array([0])], [np.asarray([view], np.int32)])
        pipe = pixel_pipeline(work, batch_size=1, resolution=8, mean=(0.0,) * 3, std=(1.0,) * 3,
                              num_threads=1, prefetch=1)
        pipe.run()
    except Exception as e:
        return cause_of(e)
    return None


class PixelStream:
    """Iterate a :class:`ViewBatches` through :func:`pixel_pipeline`, yielding
    ``(batch_index, images)`` with images a float32 ``[b, 3, R, R]`` torch tensor on the
    pipeline's device. A decode failure raises :class:`BadImageError` naming the files."""

    def __init__(self, work: ViewBatches, *, root_len: int = 0, **pipeline_kw):
        self.work = work
        self.root_len = root_len
        max_batch = max((len(b) for b in work.batches), default=1)
        self.pipe = pixel_pipeline(work, batch_size=max_batch, **pipeline_kw)
        self.device = pipeline_kw.get("device", "cpu")

    def __iter__(self):
        for k in range(len(self.work.batches)):
            try:
                (out,) = self.pipe.run()
            except StopIteration:
                return
            except RuntimeError as e:
                raise self._explain(k, e) from e
            yield k, self._to_torch(out)

    def _to_torch(self, out) -> torch.Tensor:
        # No copy: with exec_dynamic DALI allocates each run's outputs anew and keeps them
        # alive while referenced, and ``__dlpack__`` orders its stream before torch's
        # (nvidia.dali.tensors.TensorGPU.__dlpack__ docs).
        return torch.from_dlpack(out.as_tensor())

    def _explain(self, k: int, err: RuntimeError) -> Exception:
        # The failing batch is the one requested or one already prefetched after it.
        items = [(self.work.files[int(r)], v) for b, vs in zip(self.work.batches[k:k + 3], self.work.views[k:k + 3])
                 for r, v in zip(b, vs) if int(r) not in self.work.skip]
        return explain_decode_failure(items, err, f"batch {k}", self.root_len,
                                      "remove or fix them, or pass --skip-bad to record them as skipped")


def explain_decode_failure(items: Sequence[tuple[str, Sequence[int] | None]], err: Exception, where: str,
                           root_len: int = 0, fix: str = "remove or fix them") -> Exception:
    """DALI's decode errors name no file: find the culprits among ``items`` (the (file, view)
    pairs of the batches that were in flight) and name each with its reason
    (:func:`undecodable`), or pass DALI's own reason on."""
    bad = undecodable(items)
    if not bad:
        return DataError(f"DALI failed on {where}, and each of its files decodes alone: {cause_of(err)} "
                         f"({len(items)} file(s) in flight): please report this with DALI's message")
    names = [f[root_len:] for f in bad]
    shown = "; ".join(f"{f[root_len:]}: {why}" for f, why in list(bad.items())[:5])
    return BadImageError(f"cannot decode {len(bad)} image(s) ({shown}{' ...' if len(bad) > 5 else ''}): {fix}",
                         names)



# ---------------------------------------------------------------------------------------
# Independent reference (PIL + NumPy): the same maths as the pipeline, no DALI.

def _resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """Antialiased triangle filter ``[n_out, n_in]`` with edge clamping (DALI's border
    rule; torchvision instead renormalizes the cut-off weights, which differs at edges)."""
    s = n_in / n_out
    support = max(s, 1.0)
    W = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        c = (i + 0.5) * s
        js = np.arange(int(np.floor(c - support)), int(np.ceil(c + support)) + 1)
        w = np.maximum(0.0, 1.0 - np.abs((js + 0.5 - c) / support))
        w /= w.sum()
        np.add.at(W[i], np.clip(js, 0, n_in - 1), w)
    return W


def reference_pixels(path: str, view: Sequence[int], resolution: int,
                     mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``[3, R, R]`` float32 pixels of ``view`` = (y, x, h, w, flip) of the image at ``path``."""
    y, x, h, w, flip = (int(v) for v in view)
    img = open_rgb(path)[y:y + h, x:x + w].astype(np.float64)
    # optimize: two matrix products instead of one three-way loop (minutes on a 512 px crop)
    out = np.einsum("ih,hwc,jw->cij", _resize_weights(h, resolution), img,
                    _resize_weights(w, resolution), optimize=True)
    if flip:
        out = out[:, :, ::-1]
    m = np.asarray(mean, np.float64)[:, None, None] * 255.0
    s = np.asarray(std, np.float64)[:, None, None] * 255.0
    return ((out - m) / s).astype(np.float32)
