"""What a run reads and writes besides the store: checkpoints (damaged, or cut short by a full
disk), eval sets, outputs and their folders, file modes. Each problem is a named error with
exit 2 before the work it would spoil, and nothing is left half-written."""

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import stat

import pytest
from typer.testing import CliRunner

from fdcache.cli.app import app
from fdcache.distill.teachers import TINY_TEACHER
from fdcache.errors import DataError, FdcacheError
from fdcache.samples import make_image_folder
from fdcache.store.manifest import index


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def train_args(store, out, *extra):
    return ["train", "--cache", store, "--student", "fd-tiny", "--steps", 2, "--batch-size", 4, "--threads", 1,
            "--loss-impl", "torch", "--warmup-steps", 1, "--out", out, *extra]


def one_error_line(r) -> str:
    """The output holds one ``error:`` line (no traceback, no box); it is returned."""
    lines = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in r.output and "╭" not in r.output, r.output
    return lines[0]


@pytest.mark.parametrize("damage", ["empty", "truncated", "random"])
def test_a_damaged_checkpoint_on_resume_is_a_named_error(tiny_run, tiny_store, tmp_path, damage):
    out = shutil.copytree(tiny_run, tmp_path / "run")
    ck = out / "checkpoints" / "last.pt"
    good = ck.read_bytes()
    ck.write_bytes({"empty": b"", "truncated": good[: len(good) // 2], "random": os.urandom(4096)}[damage])
    r = run(*train_args(tiny_store, out, "--resume"))
    assert r.exit_code == 2
    line = one_error_line(r)
    assert "checkpoint is unreadable" in line and str(ck) in line and "--overwrite" in line



def test_a_readable_checkpoint_that_is_not_fdcaches_is_named_with_the_fix_on_resume(tiny_run, tiny_store, tmp_path):
    """A torch archive that reads (so the cheap index check passes) but lacks fdcache's keys:
    refused when loaded, naming the file, the keys it needs and the fix."""
    import torch

    from fdcache.engine import CHECKPOINT_KEYS

    out = shutil.copytree(tiny_run, tmp_path / "run")
    ck = out / "checkpoints" / "last.pt"
    torch.save({"step": 2, "model": {}}, ck)
    r = run(*train_args(tiny_store, out, "--resume"))
    assert r.exit_code == 2
    assert one_error_line(r) == (f"error: the file is not an fdcache checkpoint (no {', '.join(CHECKPOINT_KEYS)}) "
                                 f"({ck}): restore it from a copy, or start the run again without --resume "
                                 "(--overwrite replaces what the old run left)")


def test_a_checkpoint_of_another_model_is_named_with_the_fix_on_resume(tiny_run, tiny_store, tmp_path):
    """last.pt with fdcache's keys but a model state this run's student cannot load (a weight
    removed, injected): refused naming torch's reason, the file and the fix."""
    import torch

    out = shutil.copytree(tiny_run, tmp_path / "run")
    ck = out / "checkpoints" / "last.pt"
    state = torch.load(ck, weights_only=False)
    gone = sorted(state["model"])[0]
    del state["model"][gone]
    torch.save(state, ck)
    r = run(*train_args(tiny_store, out, "--resume"))
    assert r.exit_code == 2
    line = one_error_line(r)
    assert line.startswith("error: the checkpoint does not fit this run (") and gone in line
    assert line.endswith(f" ({ck}): resume with the options it was started with (OUT/config.json lists them)")

@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Writes past ``nbytes`` fail with EFBIG in this process, as on a full disk (a quota)."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)


def test_a_full_disk_while_saving_a_checkpoint_is_named_and_leaves_the_last_one_whole(tiny_store, tmp_path):
    out = tmp_path / "run"
    args = train_args(tiny_store, out, "--save-every", 1)
    assert run(*args, "--run-steps", 1).exit_code == 0
    ck = out / "checkpoints" / "last.pt"
    before = ck.read_bytes()
    with file_size_limit(len(before) // 2):
        r = run(*args, "--resume")
    assert r.exit_code == 2
    line = one_error_line(r)
    assert "writing the checkpoint failed: File too large" in line and "free disk space" in line and str(ck) in line
    assert not list(out.rglob("*.tmp")) and ck.read_bytes() == before


def test_resume_without_a_run_says_there_is_none(tiny_store, tmp_path):
    (tmp_path / "empty").mkdir()
    r = run(*train_args(tiny_store, tmp_path / "empty", "--resume"))
    assert r.exit_code == 2
    assert one_error_line(r) == (f"error: there is no run to resume in {tmp_path / 'empty'} (--resume): start it "
                                 "without --resume (or give the --out of the run to continue)")


def test_a_file_given_as_an_image_folder_is_called_a_file(image_root, tmp_path):
    a_file = next(image_root.rglob("*.jpg"))
    r = run("finetune", "--model", TINY_TEACHER, "--random-init", "--data", a_file, "--out", tmp_path / "ft")
    assert r.exit_code == 2 and "is a file, not a folder (--data)" in one_error_line(r)
    with pytest.raises(DataError, match="is a file, not an image folder"):
        index(a_file)


@pytest.mark.parametrize("case", ["other classes", "no images"])
def test_finetune_checks_its_val_sets_before_training(image_root, tmp_path, case):
    val = tmp_path / "val"
    if case == "other classes":
        make_image_folder(val, classes=2, per_class=2)
        for d in val.iterdir():
            d.rename(val / f"other_{d.name}")
    else:
        (val / "class_000").mkdir(parents=True)
    out = tmp_path / "ft"
    r = run("finetune", "--model", TINY_TEACHER, "--random-init", "--templates", "simple", "--data", image_root,
            "--val", val, "--steps", 2, "--batch-size", 4, "--workers", 0, "--out", out)
    assert r.exit_code == 2 and str(val) in r.output, r.output
    assert "(--val)" in one_error_line(r)  # the option named, in the one error style
    assert not (out / "log.jsonl").exists() and not (out / "checkpoints").exists()  # nothing trained


@pytest.mark.parametrize("command", ["inspect", "eval", "bench"])
@pytest.mark.parametrize("where", ["missing folder", "a folder"])
def test_json_output_is_checked_before_the_work(tiny_store, image_root, tmp_path, command, where):
    dest = tmp_path / "nowhere" / "r.json" if where == "missing folder" else tmp_path
    args = {"inspect": ["inspect", tiny_store],
            "eval": ["eval", "--model", TINY_TEACHER, "--random-init", "--data", image_root, "--workers", 0],
            "bench": ["bench", "--student", "fd-tiny", "--teacher", TINY_TEACHER, "--random-init", "--steps", 1]}
    r = run(*args[command], "--json", dest)
    assert r.exit_code == 2
    assert "(--json)" in one_error_line(r)  # and nothing else: no table, no "building a store"


def test_exports_follow_the_umask_like_every_other_file(tiny_store, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        assert run(*train_args(tiny_store, out)).exit_code == 0
    finally:
        os.umask(old)
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


# A train that pauses once it holds its run directory, until a line arrives on stdin.
PAUSED_TRAIN = """
import sys
from fdcache.engine import Engine
real = Engine._loop
def held(self, stop):
    print("holding", flush=True)
    sys.stdin.readline()
    return real(self, stop)
Engine._loop = held
from fdcache.cli.app import main
sys.argv = ["fdcache", *sys.argv[1:]]
main()
"""


def test_a_run_directory_has_one_writer_and_a_second_run_is_refused_naming_it(tiny_store, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-c", PAUSED_TRAIN, *map(str, train_args(tiny_store, out))],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "holding"
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        r = run(*train_args(tiny_store, out, "--overwrite", "--seed", 5))  # even --overwrite waits its turn
        line = one_error_line(r)
        assert "being written by another fdcache process" in line and f"pid {first.pid}" in line, line
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    finally:
        _, err = first.communicate(input="\n", timeout=600)
    assert first.returncode == 0, err
    assert (out / "model.safetensors").exists() and not (tmp_path / "run.fdcache-lock").exists()


def test_a_killed_writer_leaves_no_lock_behind(tiny_store, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from fdcache.engine import run_lock; "
                               "run_lock(sys.argv[1]).__enter__(); print('held', flush=True); sys.stdin.read()",
                               str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()  # SIGKILL: no clean-up ran
    holder.wait()
    assert run(*train_args(tiny_store, out)).exit_code == 0  # the kernel dropped its lock
    assert not (tmp_path / "run.fdcache-lock").exists()  # and this run removed the file when it ended


def test_resume_into_a_run_still_being_written_names_its_writer(tiny_store, tmp_path):
    """--resume while the first run holds OUT (before its first checkpoint): the run has not
    stopped, so the error names the writer, not "stopped before its first checkpoint"."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text("")  # what a run writes before its first checkpoint
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from fdcache.engine import run_lock; "
                               "run_lock(sys.argv[1]).__enter__(); print('held', flush=True); sys.stdin.read()",
                               str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = one_error_line(run(*train_args(tiny_store, out, "--resume")))
        assert "being written by another fdcache process" in line and f"pid {holder.pid}" in line, line
    finally:
        holder.communicate(input="", timeout=60)
    line = one_error_line(run(*train_args(tiny_store, out, "--resume")))  # once it has gone: the usual advice
    assert "stopped before its first checkpoint" in line, line



def test_a_checkpoint_write_failing_without_an_os_error_names_torchs_reason(tmp_path, monkeypatch):
    """torch's zip writer failing with its own RuntimeError (no OSError inside, injected): the
    named error carries torch's reason, the temporary file is gone, the last checkpoint whole."""
    import fdcache.engine as engine_mod
    from fdcache.engine import atomic_save

    ck = tmp_path / "checkpoints" / "last.pt"
    atomic_save({"step": 1}, ck)
    before = ck.read_bytes()

    def failing_save(obj, f):
        f.write(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")

    monkeypatch.setattr(engine_mod.torch, "save", failing_save)
    with pytest.raises(FdcacheError) as e:
        atomic_save({"step": 2}, ck)
    assert str(e.value) == ("writing the checkpoint failed: [enforce fail at inline_container.cc:603] . unexpected "
                            f"pos 64 vs 0 ({ck}): free disk space (or raise the quota), then resume; the previous "
                            "checkpoint, if any, is unchanged")
    assert ck.read_bytes() == before and not (tmp_path / "checkpoints" / "last.pt.tmp").exists()

def test_a_checkpoint_file_that_cannot_be_created_is_named_and_leaves_the_last_one_whole(tmp_path, monkeypatch):
    """No inode left (ENOSPC when the temporary file is created, injected): atomic_save raises
    the named error; there is no temporary file to remove and the last checkpoint is unchanged."""
    import builtins
    import errno

    from fdcache.engine import atomic_save

    ck = tmp_path / "checkpoints" / "last.pt"
    atomic_save({"step": 1}, ck)
    before = ck.read_bytes()
    real_open = builtins.open

    def no_inode(file, *a, **kw):
        if str(file).endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", no_inode)
    with pytest.raises(FdcacheError, match=r"^writing the checkpoint failed: No space left on device \(.*last\.pt\): "
                                           r"free disk space"):
        atomic_save({"step": 2}, ck)
    monkeypatch.undo()
    assert ck.read_bytes() == before and not list(ck.parent.glob("*.tmp"))
