"""Every option of every command, found by introspecting the typer app (not a hand list), fed
its boundary values; and every path a command reads or writes fed a missing path, a folder, an
empty file, random bytes and a valid file cut short. Each is a named error (an ``error:`` line
and exit 2; ``verify``'s "problems found" is exit 1) or a valid value, never a traceback.

The work a command would start is replaced by a stub that raises :class:`Reached`, so the
sweeps take seconds, and a check that came after the work started would not be seen: every
check must come before it."""

import importlib
import inspect
import json
import os
import typing

import pytest
import typer
import typer.testing
from typer.testing import CliRunner

from fdcache.cli.app import app
from fdcache.cli.common import (PATH_PARSERS, classnames_arg, existing_dir, existing_file, existing_path,
                                store_input, tag_or_file)
from fdcache.distill.teachers import TINY_TEACHER

GROUP = typer.main.get_command(app)
INPUTS = (existing_dir, existing_file, existing_path, store_input, tag_or_file, classnames_arg)


class Reached(Exception):
    """The command passed every check and got to its work."""


def _params(cmd):
    """(param, annotation, parser) of each option and argument of ``cmd`` that takes a value."""
    hints = typing.get_type_hints(cmd.callback)
    declared = inspect.signature(cmd.callback).parameters
    for p in cmd.params:
        if getattr(p, "is_flag", False) or p.name not in declared:
            continue
        yield p, hints[p.name], getattr(declared[p.name].default, "parser", None)


def _name(p) -> str:
    return next((o for o in p.opts if o.startswith("--")), p.metavar or p.name)


PARAMS = [(name, p, ann, parser) for name, cmd in GROUP.commands.items() for p, ann, parser in _params(cmd)]


@pytest.fixture(scope="module")
def inputs(image_root, tiny_store, tiny_run, tmp_path_factory):
    """Valid inputs for every command: images, a store, a train run, a fine-tuned export."""
    from fdcache.tune.classifiers import init_model, save_export
    from fdcache.tune.imagefolder import classnames_for, find_classes

    names = classnames_for(find_classes(image_root))
    model, spec = init_model(model=TINY_TEACHER, pretrained=None, random_init=True, student=None, kind="classifier",
                             classnames=names, head="fresh", templates="simple", resolution=None, drop_path=0.0)
    export = save_export(tmp_path_factory.mktemp("export") / "ft", spec, model)
    return {"data": image_root, "store": tiny_store, "run": tiny_run, "export": export}


def base(command: str, f: dict, tmp) -> tuple[list, list]:
    """The smallest valid invocation of each command: (positional arguments, options)."""
    t = ["--teacher", TINY_TEACHER, "--random-init"]
    m = ["--model", TINY_TEACHER, "--random-init"]
    table = {
        "extract": ([f["data"]], ["--out", tmp / "s.zarr", *t, "--threads", 1]),
        "train": ([], ["--cache", f["store"], "--student", "fd-tiny", "--steps", 1, "--batch-size", 4, "--threads", 1,
                       "--out", tmp / "run"]),
        "bench": ([], ["--student", "fd-tiny", *t, "--steps", 1, "--repeats", 1]),
        "inspect": ([f["store"]], []),
        "verify": ([f["store"]], []),
        "diagnose": ([f["run"]], ["--data", f["data"], "--images", 2]),
        "finetune": ([], [*m, "--templates", "simple", "--data", f["data"], "--steps", 1, "--batch-size", 4,
                          "--workers", 0, "--out", tmp / "ft"]),
        "flyp": ([], [*m, "--templates", "simple", "--data", f["data"], "--steps", 1, "--batch-size", 4, "--workers", 0,
                      "--out", tmp / "ft"]),
        "eval": ([], [*m, "--templates", "simple", "--data", f["data"], "--workers", 0]),
        "wise": ([], ["--zeroshot", f["export"], "--finetuned", f["export"], "--out", tmp / "w", "--data", f["data"],
                      "--workers", 0]),
        "plot": ([f["run"]], []),
        "score": ([f["run"]], ["--cache", f["store"], "--threads", 1]),
        "quickstart": ([], ["--workdir", tmp / "q"]),
    }
    assert command in table, f"add the smallest valid invocation of `fdcache {command}` to base()"
    return table[command]


def invoke(command, p, value, f, tmp):
    args, opts = base(command, f, tmp)
    if p.param_type_name == "argument":
        args = [value] + args[1:]
    else:
        if _name(p) == "--pretrained":  # a weights file instead of random weights
            opts = [o for o in opts if o != "--random-init"]
        other = {"--epochs": "--steps", "--steps": "--epochs"}.get(_name(p))  # one or the other
        if other in opts:
            i = opts.index(other)
            opts = opts[:i] + opts[i + 2:]
        opts = [*opts, _name(p), value]
    return CliRunner().invoke(app, [command, *map(str, args), *map(str, opts)])


def outcome(command: str, r) -> str:
    """``work`` (got past every check), ``ok``, ``error`` (a named one), or what went wrong."""
    if isinstance(r.exception, Reached):
        return "work"
    lines = [line for line in r.output.splitlines() if line.strip()]
    named = bool(lines) and lines[0].startswith("error: ") and "Traceback" not in r.output
    if r.exit_code == 0 and not r.exception:
        return "ok"
    if named and (r.exit_code == 2 or (command == "verify" and r.exit_code == 1)):
        return "error"
    return f"exit {r.exit_code}, {type(r.exception).__name__}: {r.output[-600:]}"


def stub(monkeypatch, targets):
    """Replace each target by :func:`reached`; CliRunner reuses the one built command group."""
    def reached(*a, **kw):
        raise Reached

    monkeypatch.setattr(typer.testing, "_get_command", lambda _: GROUP)  # building it is 15 ms a call
    for target in targets:
        owner, attr = target.rsplit(".", 1)
        try:
            obj = importlib.import_module(owner)
        except ModuleNotFoundError:  # a class's method: module.Class.method
            module, cls = owner.rsplit(".", 1)
            obj = getattr(importlib.import_module(module), cls)
        monkeypatch.setattr(obj, attr, reached)


# Where each command's work starts, for the option sweep: the library call after its options
# are checked (the config classes, or the check at the top of the call).
OPTION_WORK = ["fdcache.distill.extract.extract", "fdcache.distill.train.train", "fdcache.tools.bench.run_bench",
               "fdcache.store.inspect.inspect_store", "fdcache.store.inspect.verify_store",
               "fdcache.tools.diagnose.load_subject", "fdcache.tune.finetune.finetune",
               "fdcache.tune.classifiers.init_model", "fdcache.tune.classifiers.load_export", "fdcache.tune.wise.wise",
               "fdcache.tools.plots.plot_path", "fdcache.samples.make_image_folder",
               "fdcache.distill.score.load_trained_student"]

INT_VALUES = ["0", "-1", "nan", "inf", str(10**12), "abc"]
FLOAT_VALUES = ["0", "-1", "nan", "inf", "1e308", "abc"]


def _numeric(annotation) -> bool:
    return bool({int, float} & {annotation, *typing.get_args(annotation)})


@pytest.mark.parametrize("command,p,annotation,parser", PARAMS, ids=[f"{c}{_name(p)}" for c, p, _, _ in PARAMS])
def test_every_option_at_its_boundaries_is_valid_or_a_named_error(command, p, annotation, parser, inputs, tmp_path,
                                                                  monkeypatch):
    stub(monkeypatch, OPTION_WORK)
    values = INT_VALUES if int in {annotation, *typing.get_args(annotation)} else FLOAT_VALUES
    for value in values:
        r = invoke(command, p, value, inputs, tmp_path)
        got = outcome(command, r)
        assert got in ("work", "ok", "error"), (command, _name(p), value, got)
        if got == "error" and _numeric(annotation):  # the option is named where the message says where
            assert f"({_name(p)}" in r.output, (command, _name(p), value, r.output)


# Where the work starts for the path sweep: after every file a command reads has been opened.
PATH_WORK = ["fdcache.distill.extract._run", "fdcache.engine.Engine._loop", "fdcache.tools.bench.make_image_folder",
             "fdcache.tools.bench.extract", "fdcache.tools.bench.DistillTask", "fdcache.tools.diagnose.diagnose",
             "fdcache.tune.evaluate.evaluate_set", "fdcache.tune.wise.save_export", "fdcache.tools.plots.run_curves",
             "fdcache.tools.plots.wise_sweep", "fdcache.samples.make_image_folder", "fdcache.distill.score.store_loss"]
CASES = ("missing", "folder", "empty", "random bytes", "truncated")


@pytest.fixture(scope="module")
def valid_files(inputs, tmp_path_factory):
    """A valid file of each kind, to be cut short."""
    import torch

    from fdcache.distill.teachers import create_openclip

    d = tmp_path_factory.mktemp("valid")
    data = inputs["data"]
    images = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.jpg"))
    (d / "list.txt").write_text("".join(f"{p} {i % 3}\n" for i, p in enumerate(images)))
    (d / "names.json").write_text(json.dumps({c.name: c.name.replace("_", " ") for c in data.iterdir()}))
    (d / "wise.json").write_text(json.dumps({"command": "wise", "results": {"alpha=0.50": {"images": {"top1": 0.5}}}}))
    torch.save(create_openclip(TINY_TEACHER, None, None).state_dict(), d / "weights.pt")
    (d / "image.jpg").write_bytes(next(data.rglob("*.jpg")).read_bytes())
    return {existing_file: d / "list.txt", classnames_arg: d / "names.json", existing_path: d / "wise.json",
            tag_or_file: d / "weights.pt"}, d / "image.jpg"


def make_case(case: str, parser, valid, tmp):
    by_kind, image = valid
    path = tmp / "case" / ("x" + (by_kind.get(parser, image).suffix))
    if case == "missing":
        return tmp / "case" / "missing" / path.name
    path.parent.mkdir(parents=True, exist_ok=True)
    if case == "folder":
        path.mkdir()
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "random bytes":
        path.write_bytes(os.urandom(4096))
    else:
        good = by_kind.get(parser, image).read_bytes()
        path.write_bytes(good[: len(good) // 2])
    return path


PATHS = [(c, p, parser) for c, p, _, parser in PARAMS if parser in PATH_PARSERS]


@pytest.mark.parametrize("command,p,parser", PATHS, ids=[f"{c}{_name(p)}" for c, p, _ in PATHS])
def test_every_path_missing_a_folder_empty_random_or_cut_short_is_a_named_error(command, p, parser, inputs,
                                                                              valid_files, tmp_path, monkeypatch):
    stub(monkeypatch, PATH_WORK)
    for case in CASES:
        r = invoke(command, p, make_case(case, parser, valid_files, tmp_path / case), inputs, tmp_path / case)
        got = outcome(command, r)
        if parser in INPUTS:  # something to read: each of these is wrong
            assert got == "error", (command, _name(p), case, got)
        else:  # an output: refused, or written
            assert got in ("work", "ok", "error"), (command, _name(p), case, got)


RESUMABLE = [name for name, cmd in GROUP.commands.items() if any("--resume" in p.opts for p in cmd.params)]


@pytest.mark.parametrize("command", RESUMABLE)
def test_every_resume_from_a_missing_folder_empty_random_or_cut_short_checkpoint_is_a_named_error(
        command, inputs, tiny_run, tmp_path, monkeypatch):
    stub(monkeypatch, PATH_WORK)
    good = (tiny_run / "checkpoints" / "last.pt").read_bytes()
    for case in CASES:
        args, opts = base(command, inputs, tmp_path / case)
        out = tmp_path / case / "run"
        last = out / "checkpoints" / "last.pt"
        last.parent.mkdir(parents=True)
        if case == "folder":
            last.mkdir()
        elif case != "missing":
            last.write_bytes({"empty": b"", "random bytes": os.urandom(4096), "truncated": good[: len(good) // 2]}[case])
        r = CliRunner().invoke(app, [command, *map(str, args), *map(str, opts), "--out", str(out), "--resume"])
        assert outcome(command, r) == "error", (command, case, outcome(command, r))
