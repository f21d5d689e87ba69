"""fdcache: extract a CLIP teacher's feature maps once, train many FD students fast.

The API (each imported on first use, so ``import fdcache`` stays light)::

    from fdcache import extract, train, score, finetune, flyp, evaluate, wise, open_store
    from fdcache import ExtractConfig, TrainConfig, FinetuneConfig

The package is grouped by job: ``fdcache.store`` (the format: layout, location, writes,
audit, the reader, manifest, views), ``fdcache.codecs``, ``fdcache.distill`` (teachers,
students, pixels, extract, train), ``fdcache.tune`` (fine-tuning, FLYP, evaluation,
WiSE-FT), ``fdcache.tools`` (bench, diagnose, plots, quickstart), and the pieces they
share at the top (engine, config, errors, distributed, exports, progress, tables).
"""

import importlib

__version__ = "0.1.0"

_API = {
    "extract": ("fdcache.api", "extract"),
    "train": ("fdcache.api", "train"),
    "score": ("fdcache.api", "score"),
    "finetune": ("fdcache.api", "finetune"),
    "flyp": ("fdcache.api", "flyp"),
    "evaluate": ("fdcache.api", "evaluate"),
    "wise": ("fdcache.api", "wise"),
    "open_store": ("fdcache.api", "open_store"),
    "ExtractConfig": ("fdcache.distill.extract", "ExtractConfig"),
    "TrainConfig": ("fdcache.config", "TrainConfig"),
    "FinetuneConfig": ("fdcache.config", "FinetuneConfig"),
    "make_finetune_config": ("fdcache.tune.finetune", "make_config"),
    "FdcacheError": ("fdcache.errors", "FdcacheError"),
}
__all__ = ["__version__", *_API]


def __getattr__(name):
    try:
        module, attr = _API[name]
    except KeyError:
        raise AttributeError(f"module 'fdcache' has no attribute {name!r}") from None
    return getattr(importlib.import_module(module), attr)


def __dir__():
    return sorted(set(globals()) | set(_API))
