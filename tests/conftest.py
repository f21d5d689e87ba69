import os

# Must be set before any @triton.jit runs (kernel modules are imported lazily by tests).
os.environ.setdefault("TRITON_INTERPRET", "1")

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fdcache.samples import make_image_folder
from fdcache.teachers import TINY_TEACHER, load_teacher


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def image_root(tmp_path_factory) -> Path:
    """18 images in 3 classes, every format variant (JPEG kinds, gray, CMYK, RGBA PNG, EXIF)."""
    return make_image_folder(tmp_path_factory.mktemp("data") / "images", classes=3, per_class=6)


@pytest.fixture
def images(image_root, tmp_path) -> Path:
    """A private copy that a test may damage."""
    return Path(shutil.copytree(image_root, tmp_path / "images"))


@pytest.fixture(scope="session")
def tiny_teacher():
    return load_teacher(TINY_TEACHER, random_init=True)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path: for byte-identity checks of stores."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_and_two_processes(args: list[str], batch: int, out: Path) -> tuple[Path, Path]:
    """Run ``python -m fdcache ARGS`` in one process with ``--batch-size 2*batch`` and under
    torchrun with 2 gloo ranks x ``batch``: the same global batch. Returns the two --out dirs."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = {"one": [sys.executable, "-m", "fdcache", *args, "--batch-size", str(2 * batch)],
            "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    "-m", "fdcache", *args, "--batch-size", str(batch)]}
    for name, cmd in runs.items():
        r = subprocess.run([*cmd, "--out", str(out / name)], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    return out / "one", out / "two"


def interrupt_at(monkeypatch, step: int, signum=None, children: bool = False):
    """Deliver SIGINT (or ``signum``) to this process right after optimizer step ``step``: an
    injected Ctrl-C at a known step, not a lucky timing. ``children``: to its worker
    processes too, as a terminal's Ctrl-C reaches the whole process group."""
    import multiprocessing
    import signal

    from fdcache.engine import Engine

    real = Engine.optimizer_step

    def step_then_signal(self):
        real(self)
        if self.step == step:
            for p in multiprocessing.active_children() if children else []:
                os.kill(p.pid, signum or signal.SIGINT)
            os.kill(os.getpid(), signum or signal.SIGINT)
    monkeypatch.setattr(Engine, "optimizer_step", step_then_signal)


def extract_tiny(data, out, **kw) -> Path:
    """A store of the tiny random-init teacher (one seed, shards of 6): the fixture of the
    recipe and write-protocol tests."""
    from fdcache.extract import ExtractConfig, extract

    base = dict(teacher=TINY_TEACHER, random_init=True, seeds=1, batch_size=6, shard_size=6,
                progress=False, num_threads=2)
    extract(ExtractConfig(data=str(data), out=str(out), **(base | kw)))
    return Path(out)


@pytest.fixture(scope="session")
def tiny_store(image_root, tmp_path_factory) -> Path:
    """A finished one-seed store of ``image_root`` (read-only: copy it to damage it)."""
    return extract_tiny(image_root, tmp_path_factory.mktemp("tiny") / "s.zarr")
