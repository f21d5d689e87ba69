"""The Python API and the packaging around it, as a user meets them."""

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_import_fdcache_is_light_and_names_the_api():
    code = ("import sys, fdcache; heavy = [m for m in ('torch', 'zarr', 'timm', 'open_clip') if m in sys.modules];"
            "assert not heavy, heavy;"
            "from fdcache import extract, train, finetune, flyp, evaluate, wise, open_store, TrainConfig;"
            "import fdcache.distill.train;"  # the submodule of the same name does not hide the function
            "assert callable(fdcache.train) and fdcache.train is train and TrainConfig.__name__ == 'TrainConfig'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_version_has_one_source():
    from fdcache.cli.app import app
    from typer.testing import CliRunner

    from fdcache import __version__

    assert importlib.metadata.version("fdcache") == __version__
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"fdcache {__version__}"


def test_keyword_options_are_checked_against_the_config():
    import fdcache
    from fdcache.errors import FdcacheError

    with pytest.raises(FdcacheError, match="unknown TrainConfig option"):
        fdcache.train(out="x", cache="y", studnet="fd-tiny")


def test_the_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    text = README.read_text()
    block = re.search(r"## Python API.*?```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    # every run records what it was asked, in the same config.json timm reads
    run = json.loads((tmp_path / "demo" / "student-ft" / "config.json").read_text())["fdcache"]["run"]
    assert run["command"] == "finetune" and run["preset"] == "fd-finetune-vit-b16"
    assert run["options"]["steps"] == 4 and run["options"]["layer_decay"] == 0.6  # given, and the preset's
    assert run["versions"]["torch"] == importlib.metadata.version("torch")
    run = json.loads((tmp_path / "demo" / "student" / "config.json").read_text())["fdcache"]["run"]
    assert run["command"] == "train" and run["options"]["student"] == "fd-tiny"


def test_print_config_shows_the_preset_with_the_flags_given():
    from fdcache.cli.app import app
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, ["finetune", "--preset", "fd-finetune-vit-b16", "--lr", "1e-3", "--print-config"])
    assert r.exit_code == 0, r.output
    cfg = json.loads(r.output)
    assert cfg["preset"] == "fd-finetune-vit-b16" and cfg["base_lr"] == 1e-3 and cfg["mixup"] == 0.8
    r = CliRunner().invoke(app, ["flyp", "--print-config"])
    assert json.loads(r.output)["weight_decay"] == 0.1 and json.loads(r.output)["mode"] == "flyp"


def test_help_shows_the_default_presets_values():
    from fdcache.cli.app import app
    from typer.testing import CliRunner

    r = CliRunner(env={"COLUMNS": "250"}).invoke(app, ["finetune", "--help"])
    assert "ft-clip-vit-b16: 0.0006" in r.output and "ft-clip-vit-b16: 0.9998" in r.output
