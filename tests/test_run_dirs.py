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


def test_a_resumed_runs_log_keeps_the_records_up_to_the_checkpoint_and_those_without_a_step(tmp_path):
    """truncate_log(log, 2): steps 1 and 2 stay, 3 and 4 go (the resumed run logs them again),
    a record without a step (a note another tool added) stays, a line cut short by a crash
    goes; by hand."""
    from fdcache.engine import truncate_log

    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 0.5}\n{"note": "by hand"}\n{"step": 2, "loss": 0.4}\n'
                   '{"step": 3, "loss": 0.3}\n\n{"step": 4, "loss": 0.2}\n{"step": 5, "lo')
    truncate_log(log, 2)
    assert log.read_text() == '{"step": 1, "loss": 0.5}\n{"note": "by hand"}\n{"step": 2, "loss": 0.4}\n'
    assert not (tmp_path / "log.jsonl.tmp").exists()
    truncate_log(log, 0)  # a checkpoint before the first step: only the record without a step stays
    assert log.read_text() == '{"note": "by hand"}\n'
    truncate_log(tmp_path / "none.jsonl", 2)  # a run that logged nothing yet
    assert not (tmp_path / "none.jsonl").exists()


def test_a_timm_folder_not_written_by_fdcache_train_is_not_taken_as_a_student(tmp_path):
    """read_student takes only an fdcache train export: timm's own layout (config.json +
    model.safetensors) without fdcache's section, or of another kind, is a named error."""
    import json

    import torch
    from safetensors.torch import save_file

    from fdcache.tune.classifiers import read_student

    msg = (r"expected the --out directory of a finished fdcache train run \(config.json \+ "
           r"model.safetensors\)$")
    for cfg in ({"architecture": "vit_small_patch16_224", "num_classes": 0},
                {"architecture": "vit_small_patch16_224", "fdcache": {"export": {"kind": "classifier"}}},
                ["not", "a", "dict"]):
        run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        run.mkdir()
        (run / "config.json").write_text(json.dumps(cfg))
        save_file({"w": torch.zeros(1)}, str(run / "model.safetensors"))
        for given in (run, run / "model.safetensors"):
            with pytest.raises(FdcacheError, match=msg):
                read_student(given)


def test_the_resume_command_is_the_command_line_with_resume_and_says_torchrun_only_under_it(monkeypatch):
    import sys
    from types import SimpleNamespace

    from fdcache.engine import resume_command

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(sys, "argv", ["/venv/bin/fdcache", "train", "--cache", "a b.zarr", "--overwrite"])
    assert resume_command() == "fdcache train --cache 'a b.zarr' --resume"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert resume_command() == "fdcache train --cache 'a b.zarr' --resume"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(sys, "argv", ["fdcache", "train", "--resume"])
    assert resume_command() == "fdcache train --resume (under torchrun, with the same torchrun options)"
    # python -m fdcache (torchrun -m fdcache): argv[0] is the package's __main__.py, the module spec names it
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(sys, "argv", ["/venv/lib/fdcache/__main__.py", "train", "--out", "r"])
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", SimpleNamespace(name="fdcache.__main__"), raising=False)
    assert resume_command() == "fdcache train --out r --resume"
    monkeypatch.setattr(sys, "argv", ["my_script.py"])  # the Python API: no command line to give
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", None, raising=False)
    assert resume_command() == "the same call with resume=True"


def test_overwrite_removes_the_old_runs_files_on_the_main_rank_only(tmp_path):
    """Under torchrun every rank runs Engine.begin; the old run's files are removed once, by
    rank 0, after the barrier (another rank removing them too would race it). Engine.begin
    called on stand-ins for a rank-1 and a rank-0 engine."""
    from types import SimpleNamespace

    from fdcache.engine import RUN_FILES, Engine, run_files

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    old = [out / "log.jsonl", out / "checkpoints" / "last.pt"]
    for p in old:
        p.write_text("old")
    mine = out / "notes.txt"
    mine.write_text("mine")
    cfg = SimpleNamespace(resume=False, overwrite=True, to_dict=lambda: {}, preset=None)
    barriers = []

    def engine(is_main):
        dist = SimpleNamespace(is_main=is_main, barrier=lambda: barriers.append(is_main))
        return SimpleNamespace(out=out, cfg=cfg, dist=dist, task=SimpleNamespace(outputs=(), name="train"))

    assert sorted(run_files(out, RUN_FILES)) == sorted(old)  # fdcache's names, not notes.txt
    assert Engine.begin(engine(False)) is True
    assert all(p.read_text() == "old" for p in old) and barriers == [False, False]
    Engine.begin(engine(True))
    assert not any(p.exists() for p in old) and mine.read_text() == "mine"


def test_every_rank_makes_the_out_folder_with_its_parents(tmp_path):
    """Each rank makes ``OUT`` (and folders above it) itself: on another node's own disk rank 0's
    lock file has made nothing, and a sharded checkpoint writes every rank's shards there.
    Engine.begin called on a stand-in for a rank-1 engine."""
    from types import SimpleNamespace

    from fdcache.engine import Engine

    out = tmp_path / "node1" / "runs" / "r"
    cfg = SimpleNamespace(resume=False, overwrite=False, to_dict=lambda: {}, preset=None)
    rank1 = SimpleNamespace(out=out, cfg=cfg, dist=SimpleNamespace(is_main=False, barrier=lambda: None),
                            task=SimpleNamespace(outputs=(), name="train"))
    assert Engine.begin(rank1) is True
    assert out.is_dir() and list(out.iterdir()) == []  # rank 1 writes no run record


def test_a_student_export_without_model_args_builds_with_none(tmp_path):
    """timm writes model_args into config.json only when the model was made with some: a student
    export without them reads as no keyword arguments, not as a damaged export."""
    import json

    import torch
    from safetensors.torch import save_file

    from fdcache.tune.classifiers import read_student

    cfg = {"architecture": "vit_small_patch16_224", "fdcache": {"export": {"kind": "student"}}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    meta, state = read_student(tmp_path)
    assert meta == {"timm_name": "vit_small_patch16_224", "kwargs": {}} and torch.equal(state["w"], torch.ones(2))
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"model_args": {"depth": 4}}))
    assert read_student(tmp_path / "model.safetensors")[0]["kwargs"] == {"depth": 4}
