"""What every ``fdcache`` command shares: the consoles, the error-to-exit-code wrapper, the
choices listed for ``--help`` (no torch import), the one ``--json FILE`` convention."""

from __future__ import annotations

import functools
import json
import sys
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console

from fdcache.codecs.spec import BUILTIN
from fdcache.errors import FdcacheError, Interrupted

__all__ = ["Codec", "Amp", "Device", "LossImpl", "value_of", "out", "err", "JSON_HELP", "write_json",
           "handles_errors", "is_main"]

# Target codecs, from the codec name registry (imports no torch, so --help stays fast).
Codec = Enum("Codec", {name.replace("-", "_"): name for name in BUILTIN}, type=str)


class Amp(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    none = "none"


class Device(str, Enum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


class LossImpl(str, Enum):
    auto = "auto"
    triton = "triton"
    torch = "torch"


def value_of(choice):
    return choice.value if isinstance(choice, Enum) else choice


if hasattr(typer.core.TyperOption, "display_type_rich"):  # typer >= 0.20 prints <bool> after every flag
    _display_type = typer.core.TyperOption.display_type_rich
    typer.core.TyperOption.display_type_rich = lambda self, ctx: None if self.is_flag else _display_type(self, ctx)

# Not a terminal (a log, a pipe): long lines stay whole, so printed commands copy as they are.
out = Console(soft_wrap=not sys.stdout.isatty())
err = Console(stderr=True)


def _fail(e: FdcacheError) -> None:
    label = "[bold yellow]stopped:[/]" if isinstance(e, Interrupted) else "[bold red]error:[/]"
    err.print(f"{label} {e}", highlight=False, soft_wrap=True)
    for p in getattr(e, "problems", []):
        err.print(f"  - {p}", highlight=False, soft_wrap=True)
    raise typer.Exit(e.exit_code)


JSON_HELP = "Also write the results as JSON to FILE (- for stdout): {command, fdcache_version, ...}."


def write_json(dest: str, command: str, payload: dict) -> None:
    """Every --json: a FILE (or - for stdout) holding one object that names its command and
    version, then the command's fields."""
    from fdcache import __version__

    text = json.dumps({"command": command, "fdcache_version": __version__, **payload}, indent=2)
    if dest == "-":
        print(text)
    else:
        Path(dest).write_text(text + "\n")


def handles_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FdcacheError as e:
            _fail(e)
    return wrapper


def is_main() -> bool:
    """Rank 0 prints (the process group is already joined by the command's library call)."""
    from fdcache import distributed

    return distributed.init().is_main
