"""``fdcache eval``: top-1 / top-5 of a classifier or a CLIP model (zero-shot) on image folders.

An eval set's classes are matched to the model's by name (``--classnames``), so a set may
hold a subset of the model's classes (ImageNet-R / -A hold 200 of the 1000): the logits are
restricted to the set's classes, as those benchmarks are scored. A CLIP model (a FLYP
export, or ``--model NAME --pretrained TAG``) gets a zero-shot head built from the set's
class names by its own text tower.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..distributed import Dist, amp_dtype
from ..errors import DataError, FdcacheError
from ..options import check
from ..progress import Progress
from .classifiers import ModelSpec, ZeroShotClassifier, templates_of, tokenizer_of, zeroshot_weights
from .imagefolder import LabeledImages, classnames_for, eval_loader, eval_transform, find_classes

__all__ = ["TOPK", "eval_sets", "head_for", "evaluate_set", "set_names", "evaluate", "evaluate_run"]

TOPK = (1, 5)


class _Columns(nn.Module):
    def __init__(self, model: nn.Module, columns: list[int]):
        super().__init__()
        self.model = model
        self.register_buffer("columns", torch.tensor(columns, dtype=torch.long))

    def forward(self, x):
        return self.model(x)[:, self.columns]


def eval_sets(sets: list[str], classnames: str = "folder", model_classes=None,
              option: str = "--data") -> list[tuple[str, list[str], list[str]]]:
    """Check every eval folder before any work: class folders holding images, named as the
    model's classes (``model_classes``; None: a CLIP model, any names). Returns (path,
    class folders, class names) per set."""
    out = []
    for path in sets:
        try:
            classes = find_classes(path)
            LabeledImages(path, None, classes=classes)  # no images: a named error now, not after training
        except DataError as e:
            raise DataError(f"the eval set cannot be read: {e} ({option}): give a folder of class folders "
                            "holding images (root/<class>/<image>)") from None
        names = classnames_for(classes, classnames)
        if model_classes is not None:
            missing = [n for n in names if n not in set(model_classes)]
            if missing:
                raise FdcacheError(f"the eval set {path} holds classes the model does not know, e.g. {missing[:3]} "
                                   f"({option}): give a set whose classes are among the training set's (matched "
                                   "by name; see --classnames)")
        out.append((str(path), classes, names))
    return out


def head_for(model: nn.Module, spec: ModelSpec, classnames: list[str]) -> nn.Module:
    """A module mapping images to logits over ``classnames`` (in that order)."""
    if spec.kind == "clip":
        device = next(model.parameters()).device
        w = zeroshot_weights(model, tokenizer_of(spec), classnames, templates_of(spec.templates))
        return ZeroShotClassifier(model, w).to(device)
    index = {c: i for i, c in enumerate(spec.classnames)}
    missing = [c for c in classnames if c not in index]
    if missing:
        raise FdcacheError(f"the model was fine-tuned on {len(index)} classes; the eval set's "
                           f"{missing[:5]} are not among them (check --classnames)")
    return _Columns(model, [index[c] for c in classnames]).to(next(model.parameters()).device)


@torch.no_grad()
def evaluate_set(classify: nn.Module, loader, device: torch.device, dtype: torch.dtype | None,
                 num_classes: int, dist: Dist | None = None, bar=None) -> dict:
    """Correct counts at each k over the loader (summed over ranks)."""
    correct = torch.zeros(len(TOPK), dtype=torch.long, device=device)
    seen = torch.zeros((), dtype=torch.long, device=device)
    for images, labels, _ in loader:
        if bar is not None:
            bar.update(advance=1)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = classify(images).float()
        top = logits.topk(min(max(TOPK), num_classes), dim=1).indices
        hit = top == labels[:, None]
        for j, k in enumerate(TOPK):
            correct[j] += hit[:, :k].any(dim=1).sum()
        seen += labels.numel()
    if dist is not None and dist.world > 1:
        torch.distributed.all_reduce(correct)
        torch.distributed.all_reduce(seen)
    n = int(seen)
    out = {"n": n}
    for j, k in enumerate(TOPK):
        out[f"top{k}"] = int(correct[j]) / max(n, 1)
        out[f"correct{k}"] = int(correct[j])
    return out


def set_names(paths: list[str]) -> list[str]:
    """Short, distinct names for eval sets (folder name; parent/name where those clash)."""
    names = [Path(p).name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{Path(p).parent.name}/{Path(p).name}" for p in paths]
    if len(set(names)) < len(names):
        names = [f"{i}:{p}" for i, p in enumerate(paths)]
    return names


def evaluate(model: nn.Module, spec: ModelSpec, sets: list[str], *, classnames: str = "folder",
             crop_pct: float | None = None, batch_size: int = 128, workers: int = 4,
             device: torch.device | None = None, amp: str = "auto", dist: Dist | None = None,
             progress: bool = False) -> dict:
    """``{set name: {"top1", "top5", "n", ...}}`` for each image folder in ``sets``; ``progress``
    shows a bar per set (rank 0)."""
    check(batch_size=batch_size, workers=workers, crop_pct=crop_pct)
    device = device or next(model.parameters()).device
    dtype = amp_dtype(amp, device)
    tf = eval_transform(spec.resolution, spec.mean, spec.std, crop_pct=crop_pct or spec.crop_pct)
    was = model.training
    model.eval()
    results = {}
    checked = eval_sets(sets, classnames, None if spec.kind == "clip" else spec.classnames)
    try:
        for name, (path, classes, names) in zip(set_names(sets), checked):
            classify = head_for(model, spec, names)
            ds = LabeledImages(path, tf, classes=classes)
            loader = eval_loader(ds, batch_size, workers, dist.rank if dist else 0, dist.world if dist else 1)
            with Progress(f"eval {name}", len(loader), unit="batch",
                          enabled=progress and (dist is None or dist.is_main)) as bar:
                results[name] = evaluate_set(classify, loader, device, dtype, len(names), dist, bar)
    finally:
        model.train(was)
    return results


def evaluate_run(data: list[str], *, run: str | None = None, model: str | None = None,
                 pretrained: str | None = None, random_init: bool = False, resolution: int | None = None,
                 templates: str = "openai", classnames: str = "folder", ema: bool = True,
                 crop_pct: float | None = None, batch_size: int = 128, workers: int = 4, amp: str = "auto",
                 device: str = "auto", progress: bool = False) -> dict | None:
    """``fdcache eval``: a fine-tuned export (``run``) or a zero-shot open_clip ``model`` on
    each folder in ``data``. Returns the report on rank 0 (None elsewhere): results per
    set and, with several sets, ``shift_mean`` (FLYP's "avg OOD": the mean over the sets
    after the first)."""
    from .. import distributed
    from .classifiers import init_model, load_export

    check(batch_size=batch_size, workers=workers, crop_pct=crop_pct, resolution=resolution)
    if (run is None) == (model is None):
        raise FdcacheError("give --run DIR (a fine-tuned export) or --model NAME (zero-shot)")
    d = distributed.init()
    dev = distributed.device_for(d, device)
    if run is not None:
        m, spec, weights = load_export(run, ema=ema)
    else:
        m, spec = init_model(model=model, pretrained=pretrained, random_init=random_init, student=None, kind="clip",
                             classnames=classnames_for(find_classes(data[0]), classnames), head="zeroshot",
                             templates=templates, resolution=resolution, drop_path=0.0)
        weights = pretrained or "random-init"
    r = evaluate(m.to(dev), spec, [str(p) for p in data], classnames=classnames, crop_pct=crop_pct,
                 batch_size=batch_size, workers=workers, device=dev, amp=amp, dist=d, progress=progress)
    if not d.is_main:
        return None
    report = {"model": str(run or model), "weights": weights, "results": r}
    if len(r) > 1:
        shifts = list(r.values())[1:]
        report["shift_mean"] = {k: sum(x[k] for x in shifts) / len(shifts) for k in ("top1", "top5")}
    return report
