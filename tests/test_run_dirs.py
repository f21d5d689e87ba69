"""Run directories as a new user meets them: a file where a folder belongs, an earlier export
in the way, contradictory lengths. Each is a named error, and nothing of the user's changes."""

import pytest
from fdcache.cli.app import app
from typer.testing import CliRunner

from fdcache.config import TrainConfig
from fdcache.errors import ConfigError, FdcacheError
from fdcache.tune.wise import wise


def test_train_into_a_regular_file_is_a_named_error_and_leaves_it(tiny_store, tmp_path):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    r = CliRunner().invoke(app, ["train", "--cache", str(tiny_store), "--student", "fd-tiny", "--steps", "1",
                                 "--batch-size", "4", "--threads", "1", "--out", str(mine)])
    assert r.exit_code == 2, r.output
    assert mine.read_text() == "mine"


def test_epochs_and_steps_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        TrainConfig(out=str(tmp_path), cache="s.zarr", epochs=1, steps=2)


def test_a_range_error_names_the_option_as_typed(tmp_path):
    with pytest.raises(ConfigError, match="--threads"):
        TrainConfig(out=str(tmp_path), cache="s.zarr", steps=1, num_threads=0)


def test_wise_refuses_an_alpha_folder_already_there(tmp_path):
    taken = tmp_path / "w" / "alpha-0.50"
    taken.mkdir(parents=True)
    (taken / "model.safetensors").write_text("mine")
    with pytest.raises(FdcacheError, match="--overwrite"):
        wise(tmp_path / "zs", tmp_path / "ft", [0.5], tmp_path / "w")
    assert (taken / "model.safetensors").read_text() == "mine"
