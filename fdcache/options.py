"""Range checks for run configurations, done in the library so every caller (CLI, Python,
presets) gets the same named :class:`ConfigError` instead of a crash deep inside a run."""

from __future__ import annotations

import numbers

from .errors import ConfigError

__all__ = ["require"]


def require(cfg, *, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
            optional_positive: tuple[str, ...] = ()) -> None:
    """Raise :class:`ConfigError` for the first field of ``cfg`` out of its range, named as
    its command-line option."""
    def bad(name: str, want: str):
        value = getattr(cfg, name)
        flag = _FLAGS.get(name, name).replace("_", "-")
        raise ConfigError(f"--{flag} must be {want}, got {value!r}")

    for name in positive:
        if not _int_at_least(getattr(cfg, name), 1):
            bad(name, "an integer of at least 1")
    for name in optional_positive:
        if getattr(cfg, name) is not None and not _int_at_least(getattr(cfg, name), 1):
            bad(name, "an integer of at least 1 (or left out)")
    for name in non_negative:
        if getattr(cfg, name) is not None and not _int_at_least(getattr(cfg, name), 0):
            bad(name, "an integer of at least 0")


_FLAGS = {"num_threads": "threads", "base_lr": "lr"}  # fields whose option has another name


def _int_at_least(value, low: int) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low
