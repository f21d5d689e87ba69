"""The Python API behind ``from fdcache import ...``: one function per command, each taking
its config object or the same options as keywords: the CLI's names with ``_`` (``lr``,
``threads``, ``student_arg=["depth=6"]``) or the config's fields (``base_lr``,
``num_threads``, ``student_overrides={"depth": 6}``), so a notebook and the CLI run the same
library call."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from .errors import FdcacheError
from .options import CLI_NAMES, parse_overrides


def _fields(options: dict) -> dict:
    """Keyword options with the CLI's names (``lr``, ``threads``, ``student_arg``, ``views``)
    as config fields (``base_lr``, ``num_threads``, ``student_overrides``, ``policy``)."""
    out, given = {}, {}
    for key, value in options.items():
        name = CLI_NAMES.get(key, key)
        if name in out:
            raise FdcacheError(f"{given[name]} and {key} are the same option: give one")
        out[name], given[name] = (parse_overrides(value) if name == "student_overrides" else value), key
    return out

__all__ = ["extract", "train", "score", "finetune", "flyp", "evaluate", "wise", "open_store"]


def _config(cls, cfg, options: dict):
    if cfg is not None:
        if options:
            raise FdcacheError(f"give a {cls.__name__} or keyword options, not both")
        return cfg
    options = _fields(options)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise FdcacheError(f"unknown {cls.__name__} option(s) {unknown}; known: {sorted(known)}")
    return cls(**options)


def extract(cfg=None, **options):
    """Extract a teacher's feature maps into a store (:class:`fdcache.distill.extract.ExtractConfig`;
    ``codec`` / ``policy`` may be given by name: ``codec="int8"``, ``policy="full"``)."""
    from .distill.extract import ExtractConfig
    from .distill.extract import extract as run

    return run(_config(ExtractConfig, cfg, options))


def train(cfg=None, **options):
    """Distill a student from a store or online (:class:`fdcache.distill.train.TrainConfig`)."""
    from .distill.train import TrainConfig
    from .distill.train import train as run

    return run(_config(TrainConfig, cfg, options))


def score(run, cache, **options):
    """A train run's student on held-out data (``fdcache score``): held-out FD loss, train-store
    gap, linear probe (:func:`fdcache.distill.score.score`; options as the CLI's)."""
    from .distill.score import score as run_score

    return run_score(str(run), str(cache), **options)


def _finetune(mode: str, cfg, preset: str | None, options: dict):
    from .tune.finetune import finetune as run
    from .tune.finetune import make_config

    if cfg is None:
        cfg = make_config(preset, mode=mode, **_fields(options))
    elif options or preset:
        raise FdcacheError("give a FinetuneConfig or preset/keyword options, not both")
    if cfg.mode != mode:
        raise FdcacheError(f"this FinetuneConfig has mode={cfg.mode!r}; call fdcache.{cfg.mode}")
    return run(cfg)


def finetune(cfg=None, *, preset: str | None = "ft-clip-vit-b16", **options):
    """Supervised fine-tuning: the preset's values, then ``options`` (as ``fdcache finetune``)."""
    return _finetune("finetune", cfg, preset, options)


def flyp(cfg=None, *, preset: str | None = "flyp-imagenet", **options):
    """FLYP contrastive fine-tuning: the preset's values, then ``options`` (as ``fdcache flyp``)."""
    return _finetune("flyp", cfg, preset, options)


def evaluate(run: str | Path, data: str | Path | list, *, ema: bool = True, classnames: str = "folder",
             **options) -> dict:
    """Top-1/top-5 of an export (finetune/flyp/wise ``--out``) on one or more image folders:
    ``{set name: {"top1", "top5", "n", ...}}``."""
    from .tune.classifiers import load_export
    from .tune.evaluate import evaluate as run_eval

    model, spec, _ = load_export(run, ema=ema)
    sets = [str(d) for d in (data if isinstance(data, (list, tuple)) else [data])]
    return run_eval(model, spec, sets, classnames=classnames, **options)


def wise(zeroshot: str | Path, finetuned: str | Path, alphas, out: str | Path, *, ema: bool = True) -> list[Path]:
    """WiSE-FT mixes ``out/alpha-<a>/`` between a run's ``init/`` and the run."""
    from .tune.wise import wise as run

    return run(zeroshot, finetuned, [alphas] if isinstance(alphas, (int, float)) else list(alphas), out, ema=ema)


def open_store(url: str):
    """An existing store (:class:`fdcache.store.store.Store`): ``info``, ``manifest()``, ``reader()``.

    Args:
        url: a path, ``file://`` URL or fsspec URL (``s3://bucket/prefix/teacher.zarr``)."""
    from .store.store import Store

    return Store.open(str(url))
