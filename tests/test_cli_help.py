"""The CLI as read from --help and piped into a log: grouped options, choices, flags without
type placeholders, per-command flags, and one --json convention."""

import json
import subprocess
import sys

import pytest
from fdcache.cli.app import app
from typer.testing import CliRunner

from fdcache.models import TINY_TEACHER

COMMANDS = ("extract", "train", "score", "bench", "inspect", "verify", "finetune", "flyp", "eval", "wise", "quickstart")


def _help(*cmd) -> str:
    r = CliRunner(env={"COLUMNS": "200"}).invoke(app, [*cmd, "--help"])
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_has_no_type_placeholder_on_flags(cmd):
    assert "<bool>" not in _help(cmd)


def test_train_options_come_in_named_panels():
    text = _help("train")
    for panel in ("Data", "Online teacher (--online)", "Student", "Schedule and optimizer", "Run", "Performance"):
        assert f"─ {panel} ─" in text, panel


def test_choices_are_listed_and_checked():
    assert "<fp16|int8|int4|int4-dither>" in _help("extract") and "<auto|bf16|fp16|none>" in _help("train")
    r = CliRunner().invoke(app, ["extract", "x", "--out", "y", "--teacher", "t", "--codec", "fp8"])
    assert r.exit_code == 2 and "fp8" in r.output


def test_flyp_lists_only_its_own_flags_and_refuses_finetunes():
    flyp, finetune = _help("flyp"), _help("finetune")
    for flag in ("--head", "--mixup", "--layer-decay", "--student "):
        assert flag in finetune and flag not in flyp, flag
    r = CliRunner().invoke(app, ["flyp", "--mixup", "0.8", "--print-config"])
    assert r.exit_code == 2 and "--mixup" in r.output


def test_help_texts_keep_their_brackets_and_flags_their_names():
    assert "'relative/path [label]'" in _help("extract")
    verify = _help("verify")
    assert "--no-files" in verify and "--no-no-files" not in verify


def test_every_json_is_a_file_or_stdout_in_one_shape(image_root, tmp_path):
    store = tmp_path / "s.zarr"
    r = CliRunner().invoke(app, ["extract", str(image_root), "--out", str(store), "--teacher", TINY_TEACHER,
                                 "--random-init", "--batch-size", "9", "--shard-size", "9"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["inspect", str(store), "--json", str(tmp_path / "i.json")])
    assert r.exit_code == 0 and "fdcache store" in r.output  # the table too
    to_file = json.loads((tmp_path / "i.json").read_text())
    to_stdout = json.loads(CliRunner().invoke(app, ["inspect", str(store), "--json", "-"]).output)
    assert to_file == to_stdout and to_file["command"] == "inspect" and "fdcache_version" in to_file


def test_output_to_a_pipe_does_not_wrap_long_lines():
    line = "fdcache finetune " + " ".join(f"--option-{i} /some/long/path/{i}" for i in range(12))
    code = f"from fdcache.cli.app import out; out.print({line!r}, highlight=False)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == line
