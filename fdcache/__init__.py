"""fdcache: extract a CLIP teacher's feature maps once, train many FD students fast.

The API (each imported on first use, so ``import fdcache`` stays light)::

    from fdcache import extract, train, finetune, flyp, evaluate, wise, open_store
    from fdcache import ExtractConfig, TrainConfig, FinetuneConfig

Several of these names are also submodules (``fdcache.train``, ...). ``fdcache.<name>``
always means the function; the modules stay importable (``from fdcache.train import Trainer``).
"""

import importlib
import sys
import types

__version__ = "0.1.0"

_API = {
    "extract": ("fdcache.api", "extract"),
    "train": ("fdcache.api", "train"),
    "finetune": ("fdcache.api", "finetune"),
    "flyp": ("fdcache.api", "flyp"),
    "evaluate": ("fdcache.api", "evaluate"),
    "wise": ("fdcache.api", "wise"),
    "open_store": ("fdcache.api", "open_store"),
    "ExtractConfig": ("fdcache.extract", "ExtractConfig"),
    "TrainConfig": ("fdcache.train", "TrainConfig"),
    "FinetuneConfig": ("fdcache.finetune", "FinetuneConfig"),
    "make_finetune_config": ("fdcache.finetune", "make_config"),
    "FdcacheError": ("fdcache.errors", "FdcacheError"),
}
__all__ = ["__version__", *_API]


class _Package(types.ModuleType):
    """Importing a submodule sets it as an attribute of the package; for the API names this
    would hide the function behind the module of the same name, so those names resolve here."""

    def __getattribute__(self, name):
        api = types.ModuleType.__getattribute__(self, "__dict__").get("_API", {})
        if name in api:
            module, attr = api[name]
            return getattr(importlib.import_module(module), attr)
        return types.ModuleType.__getattribute__(self, name)

    def __dir__(self):
        return sorted(set(types.ModuleType.__dir__(self)) | set(_API))


sys.modules[__name__].__class__ = _Package
