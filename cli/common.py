"""What every ``fdcache`` command shares: the consoles, the one error style, the command group
that applies it to typer's own usage errors, the path arguments (checked while parsing, so a
wrong path stops the command before any work), the choices listed for ``--help`` (no torch
import), and the one ``--json FILE`` convention.

Every error, fdcache's and typer's alike, is one line ``error: <what> (<option or file>):
<what to do>`` on stderr and exit status 2 (``verify``: 1 when it finds problems)."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from enum import Enum
from pathlib import Path

import typer
import typer.core
from rich.console import Console
from rich.markup import escape

from fdcache.codecs.spec import BUILTIN
from fdcache.errors import FdcacheError, Interrupted

__all__ = ["Amp", "Codec", "Compressor", "Device", "FdcacheGroup", "Head", "JSON_HELP", "LossImpl", "PATH_PARSERS", "PathError",
           "Templates", "Views", "classnames_arg", "err", "existing_dir", "existing_file", "existing_path",
           "handles_errors", "is_main", "json_output", "out", "output_dir", "output_file", "path_argument", "path_option",
           "store_input", "store_output", "tag_or_file", "usage_error_line", "value_of", "write_json"]


def _choices(name: str, *values: str):
    """A typer choice list: ``--help`` shows it, typer checks it (no torch import needed)."""
    return Enum(name, {v.replace("-", "_"): v for v in values}, type=str)


Codec = _choices("Codec", *BUILTIN)  # the codec name registry (no torch import)
Compressor = _choices("Compressor", "none", "zstd")
Views = _choices("Views", "rrc", "full")
Templates = _choices("Templates", "openai", "simple")
Head = _choices("Head", "fresh", "zeroshot")
Amp = _choices("Amp", "auto", "bf16", "fp16", "none")
Device = _choices("Device", "auto", "cuda", "cpu")
LossImpl = _choices("LossImpl", "auto", "triton", "torch")


def value_of(choice):
    return choice.value if isinstance(choice, Enum) else choice


if hasattr(typer.core.TyperOption, "display_type_rich"):  # typer >= 0.20 prints <bool> after every flag
    _display_type = typer.core.TyperOption.display_type_rich
    typer.core.TyperOption.display_type_rich = lambda self, ctx: None if self.is_flag else _display_type(self, ctx)

# Not a terminal (a log, a pipe): long lines stay whole, so printed commands copy as they are.
out = Console(soft_wrap=not sys.stdout.isatty())
err = Console(stderr=True)


# -- the one error style -------------------------------------------------------------------
def _fail(e: FdcacheError) -> None:
    label = "[bold yellow]stopped:[/]" if isinstance(e, Interrupted) else "[bold red]error:[/]"
    err.print(f"{label} {escape(str(e))}", highlight=False, soft_wrap=True)
    for p in getattr(e, "problems", []):
        err.print(f"  - {escape(str(p))}", highlight=False, soft_wrap=True)
    raise typer.Exit(e.exit_code)


def handles_errors(fn):
    """A command's library errors become one ``error:`` line and their exit code."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FdcacheError as e:
            _fail(e)
    return wrapper


# typer's usage errors, found from its public BadParameter (typer >= 0.22 carries its own click).
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
_CHOICE = re.compile(r"(?:Value error, )?(?P<value>.+?) is not one of (?P<choices>.+?)\.?$")


class PathError(typer.BadParameter):
    """A path argument that cannot be what its option takes (raised while parsing)."""

    def __init__(self, what: str, fix: str):
        super().__init__(f"{what}: {fix}")
        self.what, self.fix = what, fix


def _option_name(param) -> str | None:
    if param is None:
        return None
    opts = [o for o in getattr(param, "opts", []) if o.startswith("--")]
    if opts:
        return opts[0]
    return param.metavar or (param.name or "").upper() or None


def usage_error_line(e) -> str:
    """typer's usage error ``e`` as ``<what> (<option>): <what to do>``."""
    names, ctx = [], getattr(e, "ctx", None)
    while ctx is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    command = " ".join(["fdcache", *reversed(names[:-1])])  # the root is fdcache however it was started
    see = f"see `{command} --help`"
    param = getattr(e, "param", None)
    where = _option_name(param) or getattr(e, "option_name", None) or command
    name = type(e).__name__
    message = e.format_message() if name in ("NoSuchOption",) else str(getattr(e, "message", e))
    if isinstance(e, PathError):
        return f"{e.what} ({where}): {e.fix}"
    if name == "MissingParameter":
        return f"a required {'argument' if getattr(param, 'param_type_name', '') == 'argument' else 'option'} " \
               f"is missing ({where}): {see}"
    if name == "NoSuchOption":
        maybe = getattr(e, "possibilities", None)
        return f"no such option ({e.option_name}): " + (f"did you mean {', '.join(sorted(maybe))}? " if maybe else "") + see
    m = _CHOICE.match(message)
    if m:
        return f"{m['value']} is not one of its choices ({where}): choose from {m['choices'].replace(chr(39), '')}"
    if "valid integer" in message:
        return f"not an integer ({where}): give a whole number"
    if "valid number" in message or "finite number" in message:
        return f"not a number ({where}): give a number such as 0.5 or 3e-4"
    what = message.removeprefix("Value error, ").rstrip(".") or "invalid usage"
    return f"{what[0].lower() + what[1:]} ({where}): {see}"


class FdcacheGroup(typer.core.TyperGroup):
    """The app's command group: typer's own usage errors (a bad choice, a wrong type, a
    missing option) in fdcache's error style with exit 2, and help paragraphs reflowed so
    they wrap at the terminal's width instead of where the source broke its lines."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.help = _reflow(self.help)
        for cmd in self.commands.values():
            cmd.help = _reflow(cmd.help)

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except _UsageError as e:
            _usage_failure(e)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _UsageError as e:
            _usage_failure(e)


def _usage_failure(e) -> None:
    if type(e).__name__ == "NoArgsIsHelpError":  # typer has printed the help
        raise e
    err.print(f"[bold red]error:[/] {escape(usage_error_line(e))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _reflow(text: str | None) -> str | None:
    """Join the lines of each paragraph (paragraphs: separated by blank lines)."""
    if not text:
        return text
    paragraphs = re.split(r"\n\s*\n", text.strip())
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


# -- path arguments ---------------------------------------------------------------------------
def _kind(metavar: str):
    def mark(fn):
        fn.metavar = metavar
        return fn
    return mark


def _require(value: str, folder: bool, missing: str, wrong: str, fix: str) -> Path:
    """``value`` as a Path when it exists and is a folder (``folder``) or a file (not)."""
    p = Path(value)
    if not p.exists():
        raise PathError(missing, "check the path")
    if p.is_dir() != folder:
        raise PathError(wrong, fix)
    return p


@_kind("DIR")
def existing_dir(value: str) -> Path:
    """An existing folder to read (an image folder, a run directory)."""
    return _require(value, True, f"no such folder {value}", f"{value} is a file, not a folder",
                    "give the folder that holds it")


@_kind("FILE")
def existing_file(value: str) -> Path:
    """An existing regular file to read."""
    return _require(value, False, f"no such file {value}", f"{value} is a folder, not a file", "give a file")


@_kind("PATH")
def existing_path(value: str) -> Path:
    """An existing file or folder to read."""
    if not Path(value).exists():
        raise PathError(f"no such file or folder {value}", "check the path")
    return Path(value)


def _remote(value: str) -> bool:
    return "://" in value and not value.startswith("file://")


@_kind("STORE")
def store_input(value: str) -> str:
    """An existing store: a local folder, or a URL (``s3://...``, checked when opened)."""
    if not _remote(value):
        _require(value.removeprefix("file://"), True, f"no store at {value}", f"{value} is a file, not a store",
                 "a store is the folder fdcache extract wrote")
    return value


@_kind("STORE")
def store_output(value: str) -> str:
    """Where a store goes: a local path that is not a file, or a URL."""
    p = Path(value.removeprefix("file://"))
    if not _remote(value) and p.exists() and not p.is_dir():
        raise PathError(f"{value} is a file, not a store folder", "choose another --out")
    return value


@_kind("DIR")
def output_dir(value: str) -> Path:
    """A folder to write into (created with its parents when missing)."""
    p = Path(value)
    if p.exists() and not p.is_dir():
        raise PathError(f"{value} is a file, not a folder", "choose another path")
    return p


@_kind("FILE")
def output_file(value: str) -> Path:
    """A file to write: its folder must exist and be writable, and it must not be a folder
    (checked before any work, so no result is lost at the end)."""
    p = Path(value)
    if p.is_dir():
        raise PathError(f"{value} is a folder", "give a file name inside it")
    folder = p.parent
    if not folder.is_dir():
        raise PathError(f"folder {folder} does not exist", "create it first, or choose another path")
    if not os.access(folder, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise PathError(f"{value} cannot be written (permissions)", "choose another path")
    return p


@_kind("FILE")
def json_output(value: str) -> str:
    """``--json``: a file to write (see :func:`output_file`) or ``-`` for stdout."""
    return value if value == "-" else str(output_file(value))


_WEIGHTS = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz")


@_kind("TAG|FILE")
def tag_or_file(value: str) -> str:
    """A weights tag (``openai``) or a local checkpoint file: a value that names a path
    (it exists, holds a separator, or ends like a checkpoint) must be a file."""
    p = Path(value)
    if p.exists() or os.sep in value or value.endswith(_WEIGHTS):
        existing_file(value)
    return value


@_kind("folder|imagenet|FILE")
def classnames_arg(value: str) -> str:
    """``folder``, ``imagenet`` or a JSON/text file of names."""
    if value not in ("folder", "imagenet"):
        existing_file(value)
    return value


PATH_PARSERS = (existing_dir, existing_file, existing_path, store_input, store_output, output_dir, output_file, json_output,
                tag_or_file, classnames_arg)


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


def is_main() -> bool:
    """Rank 0 prints (the process group is already joined by the command's library call)."""
    from fdcache import distributed

    return distributed.init().is_main


def path_option(parser, default=None, *decls: str, **kw):
    """A ``typer.Option`` taking a path, checked by ``parser`` (one of :data:`PATH_PARSERS`)
    while the command line is parsed; its metavar says what it takes."""
    return typer.Option(default, *decls, parser=parser, metavar=parser.metavar, **kw)


def path_argument(parser, metavar: str, default=..., **kw):
    return typer.Argument(default, parser=parser, metavar=metavar, **kw)


# Usage lines name required arguments as click does (DATA), not typer's {data}; an argument's
# metavar already says what it takes, so its row carries no <Path> type after it.
if hasattr(typer.core.TyperArgument, "_usage_display_name"):
    typer.core.TyperArgument._usage_display_name = lambda self: (
        (self.metavar or self.name.upper()) + ("..." if self.nargs != 1 else ""))
if hasattr(typer.core.TyperArgument, "display_type_rich"):
    _argument_type = typer.core.TyperArgument.display_type_rich
    typer.core.TyperArgument.display_type_rich = lambda self, ctx: (
        None if self.metavar is not None else _argument_type(self, ctx))
