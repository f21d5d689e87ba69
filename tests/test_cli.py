import json

import pytest
from typer.testing import CliRunner

from fdcache.cli.app import app
from fdcache.teachers import TINY_TEACHER

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_quickstart_runs_the_whole_tour(tmp_path):
    r = run("quickstart", "--workdir", tmp_path, "--images", 9)
    assert r.exit_code == 0, r.output
    assert "verify: ok" in r.output and (tmp_path / "teacher.zarr" / "zarr.json").exists()


def test_extract_inspect_verify_round_trip(image_root, tmp_path):
    out = tmp_path / "s.zarr"
    r = run("extract", image_root, "--out", out, "--teacher", TINY_TEACHER, "--random-init",
            "--batch-size", 8, "--shard-size", 8, "--codec", "int8")
    assert r.exit_code == 0, r.output
    assert "extracted 18 sample-views in 3 shard(s)" in r.output
    info = json.loads(run("inspect", out, "--json").output)
    assert info["codec"]["name"] == "int8" and info["complete"]
    # int8 + fp32 (scale, offset) per token: 1088 + 136 bytes vs 2176 raw fp16 at L=17, D=64.
    assert info["bytes_per_sample_view"] < info["raw_fp16_bytes_per_sample_view"] * 0.7
    assert run("verify", out).exit_code == 0


@pytest.mark.parametrize("args,message", [
    (["--teacher", TINY_TEACHER], "--random-init"),
    (["--teacher", "ViT-Nope", "--random-init"], "unknown open_clip model"),
    (["--teacher", TINY_TEACHER, "--random-init", "--codec", "fp8"], "unknown codec"),
])
def test_extract_bad_options_exit_non_zero_with_a_message(image_root, tmp_path, args, message):
    r = run("extract", image_root, "--out", tmp_path / "s.zarr", *args)
    assert r.exit_code == 2 and message in r.output
    assert not (tmp_path / "s.zarr").exists()


def test_extract_of_a_missing_folder_exits_2(tmp_path):
    r = run("extract", tmp_path / "none", "--out", tmp_path / "s.zarr", "--teacher", TINY_TEACHER, "--random-init")
    assert r.exit_code == 2 and "does not exist" in r.output


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
