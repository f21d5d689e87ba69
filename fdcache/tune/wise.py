"""``fdcache wise``: WiSE-FT, the weight-space ensemble of a zero-shot and a fine-tuned model,
``theta = (1 - alpha) * theta_zeroshot + alpha * theta_finetuned``, for one alpha or a sweep.

Both endpoints must be the same architecture with the same classes: the ``init/`` export a
zero-shot-headed ``fdcache finetune`` or an ``fdcache flyp`` run writes, and that run's final
export. alpha 0 and 1 return the endpoints themselves.
"""

from __future__ import annotations

from pathlib import Path

from ..engine import run_lock
from ..errors import FdcacheError
from ..options import check
from .classifiers import read_clip_rest, read_export, save_export

__all__ = ["interpolate", "wise", "sweep"]


def interpolate(zeroshot: dict, finetuned: dict, alpha: float) -> dict:
    if set(zeroshot) != set(finetuned):
        diff = sorted(set(zeroshot) ^ set(finetuned))
        raise FdcacheError(f"the two models hold different tensors (e.g. {diff[:3]}): WiSE-FT needs one architecture")
    out = {}
    for k, a in zeroshot.items():
        b = finetuned[k]
        if a.shape != b.shape:
            raise FdcacheError(f"{k}: shape {tuple(a.shape)} vs {tuple(b.shape)}: not the same architecture/classes")
        if alpha == 0:
            out[k] = a.clone()
        elif alpha == 1 or not a.is_floating_point():
            out[k] = b.clone()
        else:
            out[k] = (a.float() * (1 - alpha) + b.float() * alpha).to(a.dtype)
    return out


def wise(zeroshot: str | Path, finetuned: str | Path, alphas: list[float], out: str | Path,
         ema: bool = True, overwrite: bool = False) -> list[Path]:
    """Write ``out/alpha-<a>/`` (a loadable export) per alpha; returns their paths. An
    ``alpha-<a>`` folder that already exists is refused unless ``overwrite`` (which replaces
    only the export's own files there)."""
    check(alpha=list(alphas))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FdcacheError(f"--out {out} is a file, not a directory: choose another --out")
    with run_lock(out):  # one writer per --out, as for a training run
        taken = [out / f"alpha-{a:.2f}" for a in alphas if (out / f"alpha-{a:.2f}").exists()]
        if taken and not overwrite:
            raise FdcacheError(f"{', '.join(map(str, taken[:3]))} already exist(s): pass --overwrite to replace "
                               "those exports (only their files), or choose another --out")
        run = Path(zeroshot).parent
        if not Path(zeroshot).exists() and (run / "model.json").is_file():
            raise FdcacheError(f"{zeroshot} does not exist: the run in {run} started from a fresh head, so it has "
                               "no zero-shot end to interpolate with. WiSE-FT needs a run started with "
                               "--head zeroshot, or an fdcache flyp run (both write OUT/init)")
        zs_spec, _, zs_state, _ = read_export(zeroshot, ema=False)
        ft_spec, _, ft_state, ft_file = read_export(finetuned, ema=ema)
        same = ("kind", "source", "name", "resolution", "classnames", "head", "timm_kwargs")
        diff = [f for f in same if getattr(zs_spec, f) != getattr(ft_spec, f)]
        if diff:
            raise FdcacheError(f"{zeroshot} and {finetuned} differ in {diff}: interpolate a run with its own "
                               "init/ export (a zero-shot head or FLYP run writes OUT/init)")
        paths = []
        rest = read_clip_rest(finetuned)  # a zero-shot head's text tower, for the open_clip form
        for alpha in alphas:
            state = interpolate(zs_state, ft_state, alpha)
            paths.append(save_export(Path(out) / f"alpha-{alpha:.2f}", ft_spec, state, clip_rest=rest,
                                     info={"wise": {"alpha": alpha, "zeroshot": str(zeroshot),
                                                    "finetuned": str(finetuned), "finetuned_weights": ft_file}}))
        return paths



def sweep(zeroshot: str | Path, finetuned: str | Path, alphas: list[float], out: str | Path, *,
          overwrite: bool = False,
          ema: bool = True, data: list[str] = (), classnames: str = "folder", batch_size: int = 128,
          workers: int = 4, device: str = "auto", progress: bool = False) -> list[tuple[float, Path, dict | None]]:
    """``fdcache wise``: write each alpha's export and, with ``data``, evaluate it there.
    Returns (alpha, export, results or None) per alpha."""
    from ..distributed import Dist, device_for
    from .classifiers import export_spec, load_export
    from .evaluate import eval_sets, evaluate

    check(alpha=list(alphas), batch_size=batch_size, workers=workers)
    if data:  # the eval sets are checked before any export is written
        spec, _ = export_spec(finetuned)
        eval_sets([str(x) for x in data], classnames, None if spec.kind == "clip" else spec.classnames)
    dev = device_for(Dist(), device)
    rows = []
    for a, p in zip(alphas, wise(zeroshot, finetuned, alphas, out, ema=ema, overwrite=overwrite)):
        results = None
        if data:
            m, spec, _ = load_export(p)
            results = evaluate(m.to(dev), spec, [str(x) for x in data], classnames=classnames,
                               batch_size=batch_size, workers=workers, device=dev, progress=progress)
        rows.append((a, p, results))
    return rows
