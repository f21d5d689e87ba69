"""fdcache plot and the bench figure: what they read, and that they draw a PNG."""

import json

import pytest
from fdcache.cli.app import app
from typer.testing import CliRunner

from fdcache.errors import FdcacheError
from fdcache.tools.plots import bench_figure, plot_path, read_log

pytest.importorskip("matplotlib")
PNG = b"\x89PNG\r\n\x1a\n"


def _run_dir(tmp_path, lines):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run


def test_a_run_log_splits_into_steps_and_evaluations_and_draws(tmp_path):
    steps = [{"step": i, "epoch": 0, "loss": 1 / i, "lr": 1e-3 * i, "images_per_s": 10.0} for i in range(1, 41)]
    ev = {"step": 40, "epoch": 0, "eval": {"model": {"val": {"top1": 0.5, "top5": 1.0, "n": 4}}}}
    run = _run_dir(tmp_path, steps + [ev])
    got_steps, got_evals = read_log(run)
    assert got_steps == steps and got_evals == [ev]
    r = CliRunner().invoke(app, ["plot", str(run)])
    assert r.exit_code == 0, r.output
    assert (run / "curves.png").read_bytes()[:8] == PNG


def test_a_torn_log_line_is_named(tmp_path):
    run = _run_dir(tmp_path, [{"step": 1, "loss": 1.0, "lr": 0.1}])
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 2, "lo')
    with pytest.raises(FdcacheError, match="line 2"):
        read_log(run)


def test_a_wise_sweep_draws_id_against_ood(tmp_path):
    sweep = {"command": "wise", "results": {
        f"alpha={a:.2f}": {"val": {"top1": 0.5 + a / 4}, "v2": {"top1": 0.4}, "sketch": {"top1": 0.3 - a / 10}}
        for a in (0, 0.5, 1)}}
    (tmp_path / "wise.json").write_text(json.dumps(sweep))
    assert plot_path(tmp_path).read_bytes()[:8] == PNG
    assert (tmp_path / "wise.png").is_file()


def test_a_wise_directory_without_evaluations_is_refused(tmp_path):
    (tmp_path / "alpha-0.50").mkdir()
    r = CliRunner().invoke(app, ["plot", str(tmp_path)])
    assert r.exit_code == 2 and "wise.json" in r.output


def test_the_bench_figure_draws_from_the_json_fields(tmp_path):
    modes = {m: {"images_per_s": v, "min": v * 0.9, "max": v * 1.1, "data_wait_fraction": w}
             for m, v, w in (("ceiling", 100.0, None), ("offline", 90.0, 0.05), ("online", 40.0, 0.01),
                             ("teacher", 300.0, None), ("extract", 250.0, None))}
    result = {**modes, "ratios": {"flop_ratio_limit": 3.0},
              "environment": {"student": "s", "teacher": "t", "batch_size": 8, "device": "cpu"}}
    assert bench_figure(result, tmp_path / "b.png").read_bytes()[:8] == PNG
