import json
import shutil

import pytest
from fdcache.cli.app import app
from typer.testing import CliRunner

from fdcache.models import TINY_TEACHER

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_quickstart_runs_the_whole_tour(tmp_path):
    r = run("quickstart", "--workdir", tmp_path, "--images", 9)
    assert r.exit_code == 0, r.output
    assert "verify: ok" in r.output and (tmp_path / "teacher.zarr" / "zarr.json").exists()
    for step in ("5. train", "6. finetune", "7. eval", "8. flyp", "9. wise"):
        assert step in r.output, r.output
    for export in ("student/model.safetensors", "finetune/model.json", "flyp/init/model.json",
                   "wise/alpha-0.50/model.safetensors"):
        assert (tmp_path / export).exists(), export


def test_finetune_eval_and_wise_commands(image_root, tmp_path):
    run_dir = tmp_path / "ft"
    r = run("finetune", "--model", TINY_TEACHER, "--random-init", "--head", "zeroshot", "--templates", "simple",
            "--data", image_root, "--val", image_root, "--steps", 2, "--batch-size", 4, "--lr-batch", 4,
            "--warmup-steps", 1, "--workers", 0, "--out", run_dir)
    assert r.exit_code == 0, r.output
    assert "finetune: 2 step(s)" in r.output and "top-1" in r.output
    cfg = json.loads((run_dir / "model.json").read_text())
    assert cfg["ema"] and cfg["spec"]["head"] == "zeroshot" and cfg["spec"]["crop_pct"] == 0.875  # the preset's
    shift = tmp_path / "shift"  # a "distribution shift" set: two of the three classes
    for c in ("class_000", "class_002"):
        shutil.copytree(image_root / c, shift / c)
    r = run("eval", "--run", run_dir, "--data", image_root, "--data", shift, "--workers", 0,
            "--json", tmp_path / "e.json")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["weights"] == "model_ema.safetensors"
    assert res["results"]["images"]["n"] == 18 and res["results"]["shift"]["n"] == 12
    assert res["shift_mean"]["top1"] == res["results"]["shift"]["top1"]
    r = run("wise", "--zeroshot", run_dir / "init", "--finetuned", run_dir, "--alpha", 0, "--alpha", 1,
            "--out", tmp_path / "w", "--data", image_root, "--workers", 0)
    assert r.exit_code == 0 and "alpha=1.00" in r.output, r.output


def test_finetune_without_a_weights_choice_exits_2(image_root, tmp_path):
    r = run("finetune", "--model", TINY_TEACHER, "--pretrained", "nope-tag", "--data", image_root,
            "--out", tmp_path / "ft", "--steps", 1)
    assert r.exit_code == 2 and "nope-tag" in r.output


def test_extract_inspect_verify_round_trip(image_root, tmp_path):
    out = tmp_path / "s.zarr"
    r = run("extract", image_root, "--out", out, "--teacher", TINY_TEACHER, "--random-init",
            "--batch-size", 8, "--shard-size", 8, "--codec", "int8")
    assert r.exit_code == 0, r.output
    assert "extracted 18 sample-views in 3 shard(s)" in r.output
    info = json.loads(run("inspect", out, "--json", "-").output)
    assert info["codec"]["name"] == "int8" and info["complete"]
    # int8 + fp32 (scale, offset) per token: 1088 + 136 bytes vs 2176 raw fp16 at L=17, D=64.
    assert info["bytes_per_sample_view"] < info["raw_fp16_bytes_per_sample_view"] * 0.7
    assert run("verify", out).exit_code == 0


@pytest.mark.parametrize("args,message", [
    (["--teacher", TINY_TEACHER], "--random-init"),
    (["--teacher", "ViT-Nope", "--random-init"], "unknown open_clip model"),
    (["--teacher", TINY_TEACHER, "--random-init", "--codec", "fp8"], "fp8"),  # not one of fp16, int8
])
def test_extract_bad_options_exit_non_zero_with_a_message(image_root, tmp_path, args, message):
    r = run("extract", image_root, "--out", tmp_path / "s.zarr", *args)
    assert r.exit_code == 2 and message in r.output
    assert not (tmp_path / "s.zarr").exists()


def test_extract_of_a_missing_folder_exits_2(tmp_path):
    r = run("extract", tmp_path / "none", "--out", tmp_path / "s.zarr", "--teacher", TINY_TEACHER, "--random-init")
    assert r.exit_code == 2 and "no such folder" in r.output


def test_verify_exits_1_naming_the_problem(image_root, tmp_path):
    out = tmp_path / "s.zarr"
    assert run("extract", image_root, "--out", out, "--teacher", TINY_TEACHER, "--random-init",
               "--shard-size", 8).exit_code == 0
    (out / "targets" / "c" / "0" / "1" / "0" / "0").unlink()
    r = run("verify", out)
    assert r.exit_code == 1 and "shard 1: marked done but its data is missing" in r.output


def test_inspect_of_a_non_store_is_a_clear_error(tmp_path):
    r = run("inspect", tmp_path / "nothing.zarr")
    assert r.exit_code == 2 and "error" in r.output


def test_ctrl_c_stops_with_a_checkpoint_and_the_resume_command_then_resume_finishes(image_root, tmp_path,
                                                                                   monkeypatch):
    import sys

    from conftest import interrupt_at

    args = ["finetune", "--model", TINY_TEACHER, "--random-init", "--templates", "simple", "--data", image_root,
            "--steps", 4, "--batch-size", 4, "--lr-batch", 4, "--warmup-steps", 1, "--workers", 0,
            "--out", tmp_path / "ft"]
    monkeypatch.setattr(sys, "argv", ["fdcache", *map(str, args)])  # as the shell started it
    interrupt_at(monkeypatch, 2)
    r = run(*args)
    assert r.exit_code == 130, r.output
    assert "stopped:" in r.output and "SIGINT at step 2/4" in r.output
    assert f"fdcache finetune --model {TINY_TEACHER}" in r.output and "--resume" in r.output
    monkeypatch.undo()
    r = run(*args)  # a fresh run into the same --out is refused, naming what is there
    assert r.exit_code == 2 and "already holds a run" in r.output and "--overwrite" in r.output
    r = run(*args, "--resume")
    assert r.exit_code == 0 and "finetune: 4 step(s)" in r.output, r.output
    steps = [json.loads(line)["step"] for line in open(tmp_path / "ft" / "log.jsonl")]
    assert steps == [1, 2, 3, 4]
