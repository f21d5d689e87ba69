import os

# Must be set before any @triton.jit runs (kernel modules are imported lazily by tests).
os.environ.setdefault("TRITON_INTERPRET", "1")

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fdcache.distill.teachers import load_teacher
from fdcache.models import TINY_TEACHER
from fdcache.samples import make_image_folder


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
    from fdcache.distill.extract import ExtractConfig, extract

    base = dict(teacher=TINY_TEACHER, random_init=True, seeds=1, batch_size=6, shard_size=6,
                progress=False, num_threads=2)
    extract(ExtractConfig(data=str(data), out=str(out), **(base | kw)))
    return Path(out)


@pytest.fixture(scope="session")
def tiny_store(image_root, tmp_path_factory) -> Path:
    """A finished one-seed store of ``image_root`` (read-only: copy it to damage it)."""
    return extract_tiny(image_root, tmp_path_factory.mktemp("tiny") / "s.zarr")


def synthetic_store(url, codec=None, *, samples=10, shard_size=4, seeds=2, tokens=5, dim=32, done=True,
                    skipped=()):
    """A store made through the project's API with random feature-like targets and no teacher
    run (fast): returns (Store, {seed: float32 targets [N, L, D] that went in})."""
    import numpy as np

    from fdcache.codecs import CodecSpec
    from fdcache.store import Store, StoreInfo
    from fdcache.store.layout import TeacherSpec
    from fdcache.store.manifest import Manifest
    from fdcache.store.views import ViewPolicy

    codec = codec or CodecSpec()
    n = samples
    t = TeacherSpec("timm", "synthetic", None, 0, 32, 16, tokens, 1, dim, (0.5,) * 3, (0.25,) * 3, "0" * 64)
    m = Manifest(root=Path(str(url)).parent, paths=[f"c{i % 3}/img_{i:04d}.jpg" for i in range(n)],
                 labels=np.arange(n, dtype=np.int32) % 3, widths=np.full(n, 64, np.int32),
                 heights=np.full(n, 48, np.int32), sizes=np.arange(n, dtype=np.int64) + 100,
                 mtimes=np.ones(n, np.int64), classes=["c0", "c1", "c2"])
    info = StoreInfo(t, ViewPolicy(), codec, 0, shard_size, n, m.fingerprint())
    store = Store.create(str(url), info, m, seeds)
    g = torch.Generator().manual_seed(0)
    truth = {}
    for s in range(seeds):
        x = torch.randn(n, tokens, dim, generator=g) * (torch.rand(n, tokens, 1, generator=g) + 0.5) \
            + torch.randn(n, tokens, 1, generator=g)
        skip = np.zeros(n, bool)
        skip[list(skipped)] = True
        x[torch.from_numpy(skip)] = 0
        truth[s] = x
        if done:
            for k in range(store.num_shards):
                a, b = store.shard_range(k)
                enc = {name: v.numpy() for name, v in codec.encode(x[a:b], seed=s, samples=torch.arange(a, b)).items()}
                for v in enc.values():
                    v[skip[a:b]] = 0  # as extract records unreadable images
                store.write_shard(s, k, enc, skip[a:b])
    return Store.open(str(url)), truth


@pytest.fixture(scope="session")
def tiny_run(tiny_store, tmp_path_factory) -> Path:
    """A finished 2-step fd-tiny train run with a checkpoint and its export (read-only: copy
    it to change it)."""
    from fdcache.distill.train import TrainConfig, train

    out = tmp_path_factory.mktemp("run") / "student"
    train(TrainConfig(out=str(out), cache=str(tiny_store), student="fd-tiny", steps=2, batch_size=4,
                      warmup_steps=1, loss_impl="torch", progress=False, num_threads=1))
    return out
