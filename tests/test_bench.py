import json
import math

from typer.testing import CliRunner

from fdcache.cli.app import app
from fdcache.teachers import TINY_TEACHER

MODES = ("ceiling", "offline", "online", "teacher", "extract")


def test_bench_smoke_json_has_every_figure_and_consistent_ratios(tmp_path):
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(app, ["bench", "--student", "fd-tiny", "--teacher", TINY_TEACHER, "--random-init",
                                 "--batch-size", "4", "--steps", "2", "--warmup", "1", "--repeats", "2",
                                 "--loss-impl", "torch", "--threads", "2", "--json", str(out),
                                 "--plot", str(tmp_path / "bench.png")])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    for mode in MODES:
        v = res[mode]
        assert v["images_per_s"] > 0 and math.isfinite(v["images_per_s"])
        assert v["min"] <= v["images_per_s"] <= v["max"]
    assert 0 <= res["offline"]["data_wait_fraction"] < 1 and 0 <= res["online"]["data_wait_fraction"] < 1
    q = res["ratios"]
    ips = {m: res[m]["images_per_s"] for m in MODES}
    assert math.isclose(q["offline_over_ceiling"], ips["offline"] / ips["ceiling"])
    assert math.isclose(q["offline_over_online"], ips["offline"] / ips["online"])
    assert math.isclose(q["extract_over_teacher"], ips["extract"] / ips["teacher"])
    f = res["flops_per_image"]
    assert math.isclose(q["flop_ratio_limit"], (f["student_fwd_bwd"] + f["teacher_fwd"]) / f["student_fwd_bwd"])
    assert f["teacher_fwd"] > 0 and f["student_fwd_bwd"] > 0
    env = res["environment"]
    assert {"device", "torch", "triton", "dali", "batch_size", "teacher", "student"} <= env.keys()
    assert "CPU figures" in env["device"]
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_unknown_modes():
    r = CliRunner().invoke(app, ["bench", "--student", "fd-tiny", "--teacher", TINY_TEACHER, "--random-init",
                                 "--modes", "ceiling,warp"])
    assert r.exit_code != 0 and "warp" in r.output
