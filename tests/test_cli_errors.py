"""One error style, typer's own validation included: ``error: <what> (<option or file>): <what
to do>`` on one line, exit 2. And help that reads well at any width: metavars that say what
an option takes, no typer-isms, every option explained, paragraphs not broken mid-sentence."""

import re

import pytest
import typer
from typer.testing import CliRunner

from fdcache.cli.app import app
from fdcache.distill.teachers import TINY_TEACHER

STYLE = re.compile(r"^error: \S.* \((--[\w-]+|[A-Z]+|[^()]*/[^()]*)\): \S.*$")


def one_line(r) -> str:
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    return lines[0]


@pytest.mark.parametrize("args,option", [
    (["--views", "foo"], "--views"),  # was a rich box naming no option
    (["--compressor", "lz4"], "--compressor"),  # was a rich box naming no option
    (["--codec", "int3"], "--codec"),  # was pydantic's "Value error, ..."
    (["--batch-size", "abc"], "--batch-size"),  # typer's type check
    (["--batch-size", "0"], "--batch-size"),  # fdcache's range check
    (["--seeds", "-1"], "--seeds"),
])
def test_every_error_has_one_style_naming_the_option(image_root, tmp_path, args, option):
    r = CliRunner().invoke(app, ["extract", str(image_root), "--out", str(tmp_path / "s.zarr"), "--teacher",
                                 TINY_TEACHER, "--random-init", *args])
    line = one_line(r)
    assert STYLE.match(line) and f"({option})" in line, line


def test_usage_errors_say_what_to_do():
    r = CliRunner().invoke(app, ["train", "--out", "x", "--stpes", "3"])
    assert re.search(r"no such option \(--stpes\): did you mean .*--steps.*\? see `fdcache train --help`", one_line(r))
    r = CliRunner().invoke(app, ["train"])
    assert one_line(r) == "error: a required option is missing (--out): see `fdcache train --help`"


def _help(*cmd, width=200) -> str:
    r = CliRunner(env={"COLUMNS": str(width)}).invoke(app, [*cmd, "--help"])
    assert r.exit_code == 0, r.output
    return r.output


COMMANDS = list(typer.main.get_command(app).commands)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_names_what_each_option_takes_without_typer_placeholders(cmd):
    text = _help(cmd)
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert "{" not in usage, usage  # typer's {data}: DATA, as click and every man page write it
    for bad in ("<list[", "<Path>", "<path>", "Required."):
        assert bad not in text, (cmd, bad)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_option_has_help(cmd):
    command = typer.main.get_command(app).commands[cmd]
    bare = [p.name for p in command.params if not p.hidden and not (getattr(p, "help", None) or "").strip()]
    assert not bare, (cmd, bare)


def test_bench_takes_loader_workers_as_train_does():
    for cmd in ("train", "bench"):
        row = next(line for line in _help(cmd).splitlines() if "--loader-workers" in line)
        assert "auto|N" in row and "<str>" not in row and "[default: auto]" in row, row


@pytest.mark.parametrize("width", [80, 100])
@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_paragraphs_wrap_at_the_terminal_not_where_the_source_broke_them(cmd, width):
    text = _help(cmd, width=width)
    head = text[:text.index("╭")] if "╭" in text else text  # the command's description, above the panels
    paragraphs = [[line.strip() for line in p.splitlines() if line.strip()] for p in re.split(r"\n\s*\n", head)]
    for lines in paragraphs[1:]:  # after the usage line
        assert all(len(line) <= width for line in lines)
        assert all(len(line) > width - 30 for line in lines[:-1]), lines  # only a paragraph's last line is short
