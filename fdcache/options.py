"""Every numeric option's range, declared once (:data:`RANGES`) and checked where the options
are taken: in the config classes (``TrainConfig``, ``FinetuneConfig``, ``ExtractConfig``,
``BenchConfig``) and at the top of the library calls that have none (``evaluate_run``,
``wise``, ``diagnose.run``, ``quickstart``). So the CLI and the Python API refuse the same
values with the same named :class:`ConfigError`, before any work starts.

Upper bounds sit where memory or time explodes, not where taste ends: ``resolution`` 2048
(a ViT-L/14 at 2048 px has 21,904 tokens; one attention map of one layer is then 31 GB per
image in fp32), ``batch_size`` 65536, ``shard_size`` 65536 (each shard file ends with 16
bytes of index per sample: 1 MiB there), ``seeds`` 10000 (every seed's views are written
when the store is made: ImageNet's 1.28M x 20 bytes per seed), thread and worker counts
1024 (each is a thread or a process), seeds of random generators 2**32 - 1 (numpy's legacy
seed is 32-bit).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

from .errors import ConfigError

__all__ = ["CLI_NAMES", "RANGES", "Range", "check", "flag_of", "parse_overrides", "require"]


@dataclass(frozen=True)
class Range:
    """``kind`` int or float; ``low``/``high`` bounds (``*_open``: excluded); ``words``:
    strings taken as they are (``auto``); ``note``: what a special value means."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    words: tuple[str, ...] = ()
    note: str = ""

    def holds(self, value) -> bool:
        if isinstance(value, str) and value in self.words:
            return True
        if isinstance(value, str) and self.words:  # a count given as text ("4" for --loader-workers)
            try:
                value = int(value)
            except ValueError:
                return False
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if self.kind is int and not isinstance(value, numbers.Integral):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def __str__(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            if self.kind is int:
                span = f"from {self.low} to {self.high}"
            else:
                span = f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        elif self.low is not None:
            span = f"{'>' if self.low_open else '>='} {self.low}"
        elif self.high is not None:
            span = f"{'<' if self.high_open else '<='} {self.high}"
        else:
            span = "(finite)"
        text = f"{what} {span}"
        if self.words:
            text = " or ".join(self.words) + f" or {text}"
        return text + (f" ({self.note})" if self.note else "")


_COUNT = 1 << 16
_PROCS = 1024
_SEED = Range(int, 0, 2**32 - 1)

# Field name -> range. Field names are the config classes' (``base_lr``); the option a user
# types is :func:`flag_of` (``--lr``). The README's "Option ranges" table is this table.
RANGES: dict[str, Range] = {
    # sizes and counts
    "batch_size": Range(int, 1, _COUNT),
    "eval_batch_size": Range(int, 1, _COUNT),
    "accum_steps": Range(int, 1, _COUNT),
    "lr_batch": Range(int, 1),
    "resolution": Range(int, 16, 2048, note="must also be a multiple of the model's patch size"),
    "seeds": Range(int, 1, 10000),
    "seeds_used": Range(int, 1, 10000),
    "max_seeds": Range(int, 1, 10000),
    "token_fraction": Range(float, 0, 1, low_open=True, note="1: every token"),
    "shard_size": Range(int, 1, _COUNT),
    "epochs": Range(int, 1),
    "steps": Range(int, 1),
    "run_steps": Range(int, 1),
    "save_every": Range(int, 1),
    "log_every": Range(int, 1),
    "warmup_steps": Range(int, 0),
    "warmup": Range(int, 0),
    "repeats": Range(int, 1, 1000),
    "images": Range(int, 0, 10**7, note="diagnose: 0 means all"),
    "num_threads": Range(int, 1, _PROCS),
    "threads": Range(int, 1, _PROCS),
    "writers": Range(int, 1, _PROCS),
    "workers": Range(int, 0, _PROCS),
    "loader_workers": Range(int, 0, _PROCS, words=("auto",)),
    # random generators
    "seed": _SEED,
    "init_seed": _SEED,
    "global_seed": _SEED,
    "train_seed": _SEED,
    # optimizer and schedule
    "base_lr": Range(float, 0, low_open=True),
    "warmup_lr": Range(float, 0),
    "min_lr": Range(float, 0),
    "warmup_epochs": Range(float, 0),
    "weight_decay": Range(float, 0),
    "clip_grad": Range(float, 0, note="0 turns it off"),
    "ema_decay": Range(float, 0, 1, high_open=True, note="0 turns it off"),
    "layer_decay": Range(float, 0, 1, low_open=True, note="1 turns it off"),
    # model and regularization
    "drop_path": Range(float, 0, 1, high_open=True),
    "layer_scale": Range(float, 0, note="0: no layer scale"),
    "label_smoothing": Range(float, 0, 1, high_open=True),
    "mixup": Range(float, 0, note="0 turns it off"),
    "cutmix": Range(float, 0, note="0 turns it off"),
    "re_prob": Range(float, 0, 1),
    "color_jitter": Range(float, 0),
    "crop_pct": Range(float, 0, 1, low_open=True),
    "alpha": Range(float, 0, 1),
    # scoring
    "limit": Range(int, 1),
    "teacher_check": Range(int, 0, note="views to recompute; 0 turns it off; more than the store holds: all"),
    "probe_l2": Range(float, 0),
}

# Fields whose option has another name than the field.
_FLAGS = {"num_threads": "threads", "base_lr": "lr", "re_prob": "reprob", "student_overrides": "student-arg",
          "policy": "views"}
# The CLI's names as Python keywords -> config fields (the API takes either).
CLI_NAMES = {flag.replace("-", "_"): name for name, flag in _FLAGS.items()}


def flag_of(name: str) -> str:
    """The command-line option of config field ``name`` (``base_lr`` -> ``--lr``)."""
    return "--" + _FLAGS.get(name, name).replace("_", "-")


def parse_overrides(items, option: str = "--student-arg") -> dict:
    """``key=value`` items of ``option`` (``--student-arg``, ``--teacher-arg``; a JSON value,
    else the text) as a dict; a dict is taken as it is."""
    import json

    if isinstance(items, dict):
        return dict(items)
    out = {}
    for item in [items] if isinstance(items, str) else items:
        key, sep, value = str(item).partition("=")
        if not sep or not key:
            raise ConfigError(f"{item!r} is not key=value ({option}): write a timm option as key=value, "
                              f"e.g. {option} depth=6")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def check(**values) -> None:
    """Raise :class:`ConfigError` for the first value out of its range in :data:`RANGES`
    (``None``: left out, always allowed here). For library calls without a config class."""
    for name, value in values.items():
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if v is not None and not RANGES[name].holds(v):
                _refuse(name, v)


def require(cfg) -> None:
    """Check every field of the dataclass ``cfg`` that has a range in :data:`RANGES`. A
    field may be None only when its annotation allows it (``int | None``: left out)."""
    for f in fields(cfg):
        rng = RANGES.get(f.name)
        if rng is None:
            continue
        value = getattr(cfg, f.name)
        if value is None and "None" in str(f.type):
            continue
        if not rng.holds(value):
            _refuse(f.name, value)


def _refuse(name: str, value) -> None:
    raise ConfigError(f"{value!r} is out of range ({flag_of(name)}): give {RANGES[name]}")
