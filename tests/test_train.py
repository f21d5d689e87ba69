import json
import os

import numpy as np
import pytest
import torch
from conftest import interrupt_at, one_and_two_processes
from fdcache.kernels import fd_loss_reference
from safetensors.torch import load_file

from fdcache.codecs import CodecSpec
from fdcache.distill.extract import ExtractConfig, extract
from fdcache.distill.students import build_student
from fdcache.distill.tokens import resize_token_grid
from fdcache.distill.train import DistillTask, TrainConfig, TrainError, train
from fdcache.errors import FdcacheError, StoreError, StoreMismatchError
from fdcache.models import TINY_TEACHER
from fdcache.store import Store


def _extract(data, out, **kw):
    base = dict(teacher=TINY_TEACHER, random_init=True, seeds=2, batch_size=6, shard_size=6,
                progress=False, num_threads=2)
    extract(ExtractConfig(data=str(data), out=str(out), **(base | kw)))
    return out


@pytest.fixture(scope="module")
def store(image_root, tmp_path_factory):
    return _extract(image_root, tmp_path_factory.mktemp("t") / "fp16.zarr")


def tcfg(out, **kw) -> TrainConfig:
    # base_lr is per 512 images: 0.5 at batch 4 is an effective 3.9e-3.
    base = dict(student="fd-tiny", steps=6, batch_size=4, warmup_steps=1, base_lr=0.5,
                loss_impl="torch", progress=False, num_threads=2, save_every=1000)
    return TrainConfig(out=str(out), **(base | kw))


def _log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def test_offline_and_online_give_the_same_step0_loss_and_gradients(image_root, store, tmp_path):
    common = dict(drop_path=0.0, seed=3)
    off = DistillTask(tcfg(tmp_path / "off", cache=str(store), **common))
    on = DistillTask(tcfg(tmp_path / "on", online=True, teacher=TINY_TEACHER, random_init=True,
                      data=str(image_root), **common))
    b_off, b_on = next(off.stream()), next(on.stream())
    assert torch.equal(b_off.index, b_on.index)  # same order
    assert torch.equal(b_off.images, b_on.images)  # same recorded views, same pixels
    l_off, l_on = off.engine.forward_backward(b_off), on.engine.forward_backward(b_on)
    # The store holds the teacher's output in fp16: that rounding is the only difference.
    torch.testing.assert_close(l_off, l_on, rtol=2e-3, atol=0)
    for (name, p), q in zip(off.model.named_parameters(), on.model.parameters()):
        assert p.grad is not None and q.grad is not None, name  # DDP needs every parameter used
        err = (p.grad - q.grad).norm() / q.grad.norm().clamp_min(1e-12)
        assert err < 5e-3, (name, err.item())


def test_resume_reproduces_the_uninterrupted_loss_sequence_bit_exactly(store, tmp_path):
    full = train(tcfg(tmp_path / "a", cache=str(store), steps=8, save_every=3, drop_path=0.2, ema_decay=0.9))
    part = train(tcfg(tmp_path / "b", cache=str(store), steps=8, save_every=3, drop_path=0.2, ema_decay=0.9,
                      run_steps=5))
    assert part.steps == 5 and part.export is None
    rest = train(tcfg(tmp_path / "b", cache=str(store), steps=8, save_every=3, drop_path=0.2, ema_decay=0.9,
                      resume=True))
    assert part.losses + rest.losses == full.losses
    assert [r["loss"] for r in _log(tmp_path / "b")] == [r["loss"] for r in _log(tmp_path / "a")]
    a = torch.load(tmp_path / "a/checkpoints/last.pt", weights_only=False)
    b = torch.load(tmp_path / "b/checkpoints/last.pt", weights_only=False)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k



def test_a_sharded_run_resumes_its_random_state_bit_exactly(store, tmp_path):
    """--shard-model (FSDP2, one process): stopped after step 3 and resumed, drop path draws what
    the uninterrupted run drew, so the losses are the same numbers."""
    kw = dict(cache=str(store), steps=5, save_every=3, drop_path=0.2, shard_model=True)
    full = train(tcfg(tmp_path / "a", **kw))
    part = train(tcfg(tmp_path / "b", run_steps=3, **kw))
    assert (tmp_path / "b" / "checkpoints" / "last" / "run.pt").is_file()
    rest = train(tcfg(tmp_path / "b", resume=True, **kw))
    assert part.losses + rest.losses == full.losses and len(full.losses) == 5

def test_an_existing_run_is_not_overwritten_without_resume(store, tmp_path):
    train(tcfg(tmp_path / "r", cache=str(store), steps=2))
    with pytest.raises(FdcacheError, match="--resume"):
        train(tcfg(tmp_path / "r", cache=str(store), steps=2))


def test_export_loads_into_timm_without_the_fd_head(store, tmp_path):
    import timm
    from safetensors.torch import load_file

    r = train(tcfg(tmp_path / "r", cache=str(store), steps=2))
    meta = json.loads((tmp_path / "r" / "config.json").read_text())
    model = timm.create_model(meta["architecture"], pretrained=False, **meta["model_args"])
    state = load_file(r.export)
    assert "head.weight" not in state  # the FD projection is not part of the export
    model.load_state_dict(state, strict=True)
    trained = DistillTask(tcfg(tmp_path / "r2", cache=str(store))).model.backbone
    trained.load_state_dict(state)
    model.eval(), trained.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), trained.forward_features(x))


def test_a_student_at_another_resolution_exports_its_own_img_size_and_loads_in_timm(store, tmp_path):
    """Teacher at 64 px, student at 96 (--resize-targets): the export is the student's, so
    timm's local-dir loader rebuilds it at 96 with every weight (the relative position
    tables are sized by the 96 px grid) and gives the trained backbone's features."""
    import timm

    r = train(tcfg(tmp_path / "r", cache=str(store), steps=1, resolution=96, resize_targets=True))
    meta = json.loads((tmp_path / "r" / "config.json").read_text())
    assert meta["model_args"]["img_size"] in (96, [96, 96]) and meta["pretrained_cfg"]["input_size"] == [3, 96, 96]
    model = timm.create_model(f"local-dir:{tmp_path / 'r'}", pretrained=True).eval()
    assert model.patch_embed.img_size == (96, 96)
    trained = DistillTask(tcfg(tmp_path / "r2", cache=str(store), resolution=96, resize_targets=True)).model.backbone
    trained.load_state_dict(load_file(r.export))
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), trained.eval().forward_features(x))


def test_int8_store_trains_through_the_fused_kernel(image_root, tmp_path):
    s = _extract(image_root, tmp_path / "int8.zarr", seeds=1, codec=CodecSpec("int8"))
    t = DistillTask(tcfg(tmp_path / "r", cache=str(s), loss_impl="triton"))
    b = next(t.stream())
    targets, qparams = t.targets_of(b, b.images)  # what the loss reads: int8 as stored
    assert targets.dtype == torch.int8 and qparams.shape == (4, 17, 2)
    loss = t.engine.forward_backward(b)
    ref = DistillTask(tcfg(tmp_path / "r2", cache=str(s), loss_impl="torch"))
    torch.testing.assert_close(loss, ref.engine.forward_backward(next(ref.stream())), rtol=1e-5, atol=1e-6)


def test_incomplete_store_is_refused_naming_the_seed_unless_allow_partial(image_root, tmp_path):
    s = _extract(image_root, tmp_path / "p.zarr")
    Store.open(str(s), mode="r+").group["done"][1, 2] = 0
    with pytest.raises(StoreError, match="seed 1: 2/3 shards"):
        DistillTask(tcfg(tmp_path / "r", cache=str(s)))
    t = DistillTask(tcfg(tmp_path / "r", cache=str(s), allow_partial=True))
    assert len(t.eligible[1]) == 12 and len(t.eligible[0]) == 18


def test_changed_data_folder_is_refused_naming_the_file(images, tmp_path):
    s = _extract(images, tmp_path / "s.zarr", seeds=1)
    victim = sorted((images / "class_002").iterdir())[0]
    victim.write_bytes(victim.read_bytes() + b"x")
    with pytest.raises(StoreMismatchError, match=victim.name):
        DistillTask(tcfg(tmp_path / "r", cache=str(s)))


def test_token_grid_mismatch_is_refused_or_resampled(store, tmp_path):
    with pytest.raises(FdcacheError, match="--resize-targets"):
        DistillTask(tcfg(tmp_path / "r", cache=str(store), resolution=96))
    t = DistillTask(tcfg(tmp_path / "r", cache=str(store), resolution=96, resize_targets=True, drop_path=0.0))
    b = next(t.stream())
    assert b.images.shape[-1] == 96 and b.stored[0]["targets"].shape[1] == 17
    # The teacher's 4x4 patch grid resampled to the student's 6x6 by hand: bilinear with
    # half-pixel centres (align_corners=False), the CLS token kept as it is.
    w = np.zeros((6, 4))
    for o in range(6):
        src = max((o + 0.5) * 4 / 6 - 0.5, 0.0)
        i0 = int(src)
        w[o, i0] += 1 - (src - i0)
        w[o, min(i0 + 1, 3)] += src - i0
    stored = b.stored[0]["targets"]
    grid = stored[:, 1:].double().numpy().reshape(-1, 4, 4, stored.shape[-1])
    patches = np.einsum("yi,bijd,xj->byxd", w, grid, w).reshape(grid.shape[0], 36, -1)
    want = torch.cat([stored[:, :1].double(), torch.from_numpy(patches)], dim=1)
    loss = t.engine.forward_backward(b)
    with torch.no_grad():
        pred = t.model(b.images)
    torch.testing.assert_close(loss, fd_loss_reference(pred, want.float()), rtol=2e-5, atol=0)


def test_resize_token_grid_keeps_cls_and_interpolates_patches():
    x = torch.arange(2 * 17 * 3, dtype=torch.float32).reshape(2, 17, 3)
    y = resize_token_grid(x, 1, (4, 4), (6, 6))
    assert y.shape == (2, 37, 3) and torch.equal(y[:, 0], x[:, 0])
    same = resize_token_grid(x, 1, (4, 4), (4, 4))
    assert same is x
    const = torch.ones(1, 1 + 16, 4) * 5
    assert torch.allclose(resize_token_grid(const, 1, (4, 4), (6, 6)), torch.full((1, 37, 4), 5.0))


def test_non_finite_loss_stops_with_the_step_and_a_checkpoint(image_root, tmp_path):
    s = _extract(image_root, tmp_path / "nan.zarr", seeds=1)
    t = Store.open(str(s), mode="r+").group["targets"]
    t[0] = np.full(t.shape[1:], np.nan, dtype=np.float16)
    with pytest.raises(TrainError, match="^loss is nan at step 1; state saved to "):
        train(tcfg(tmp_path / "r", cache=str(s)))
    assert (tmp_path / "r" / "checkpoints" / "nonfinite-step1.pt").exists()
    # logging every 3 steps, the loss is read back at step 3: the window is named
    with pytest.raises(TrainError, match="^loss is nan in steps 1..3; state saved to .*nonfinite-step3.pt"):
        train(tcfg(tmp_path / "r3", cache=str(s), log_every=3))


def test_student_layout_follows_fd():
    model, spec = build_student("fd-tiny", teacher_dim=96, resolution=64)
    bb = model.backbone
    assert isinstance(bb.norm, torch.nn.LayerNorm)  # final norm on every token, as FD
    assert bb.pos_embed is None and bb.rel_pos_bias is not None  # shared relative position bias
    assert all(blk.attn.relative_position_bias_table is None for blk in bb.blocks)
    torch.testing.assert_close(bb.blocks[0].gamma_1, torch.full_like(bb.blocks[0].gamma_1, 0.1))
    assert spec.tokens == 17 and spec.prefix_tokens == 1
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 17, 96)


def test_two_process_ddp_matches_one_process_on_the_same_global_batch(store, tmp_path):
    args = ["train", "--cache", str(store), "--student", "fd-tiny", "--steps", "3", "--warmup-steps", "1",
            "--lr", "0.01", "--drop-path", "0", "--loss-impl", "torch", "--threads", "1"]
    one_and_two_processes(args, 4, tmp_path)
    a = [r["loss"] for r in _log(tmp_path / "one")]
    b = [r["loss"] for r in _log(tmp_path / "two")]
    assert len(a) == len(b) == 3
    np.testing.assert_allclose(a, b, rtol=1e-4)


def test_parallel_loader_workers_yield_the_same_batches(store, tmp_path):
    a = DistillTask(tcfg(tmp_path / "a", cache=str(store)))
    b = DistillTask(tcfg(tmp_path / "b", cache=str(store), loader_workers=1))
    sa, sb = a.stream(), b.stream()
    for _ in range(5):  # crosses the epoch boundary (4 batches per epoch)
        x, y = next(sa), next(sb)
        assert (x.epoch, x.step_in_epoch) == (y.epoch, y.step_in_epoch)
        assert torch.equal(x.index, y.index) and torch.equal(x.images, y.images)
        assert torch.equal(x.stored[0]["targets"], y.stored[0]["targets"])
        # Images and targets belong together: the target is the store's (seed, index) row.
        want = Store.open(str(store)).group["targets"].get_orthogonal_selection((x.epoch % 2, x.index.numpy()))
        assert torch.equal(x.stored[0]["targets"], torch.from_numpy(want))


def count_read_backs(monkeypatch) -> list[str]:
    """Tensor-to-host reads (``item``, ``tolist``, ``float()``, ``bool()``) made by fdcache's
    code (its package and kernels): each is a device sync on CUDA. torch's AdamW also calls
    ``item()``, on its step counters, which it keeps on the host (no sync)."""
    import sys

    import fdcache.kernels

    import fdcache
    # fdcache's own folders (the package and its kernels), never a prefix of them: a
    # virtual environment inside the checkout (.venv) or beside it (repo-venv) is not ours.
    ours = tuple(os.path.dirname(m.__file__) + os.sep for m in (fdcache, fdcache.kernels))
    calls = []
    for name in ("item", "tolist", "__float__", "__bool__"):
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, _name=name, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(ours):
                calls.append(_name)
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, spy)
    return calls


def test_the_loss_is_read_back_only_every_log_every_steps(store, tmp_path, monkeypatch):
    t = DistillTask(tcfg(tmp_path / "r", cache=str(store), steps=6, log_every=3, ema_decay=0.9))
    calls = count_read_backs(monkeypatch)
    r = t.fit()
    monkeypatch.undo()
    assert calls == ["tolist", "tolist"], calls  # steps 3 and 6: one read-back each, none per step
    assert [rec["step"] for rec in _log(tmp_path / "r")] == [3, 6] and len(r.losses) == 2


def test_log_every_defaults_to_a_window_on_cuda_and_every_step_on_cpu(store, tmp_path, monkeypatch):
    from fdcache.engine import Engine

    t = DistillTask(tcfg(tmp_path / "r", cache=str(store)))
    assert t.cfg.log_every is None and t.engine.log_every == 1
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self)  # no CUDA here: keep tensors put
    e = Engine(t, t.model, t.cfg, t.dist, torch.device("cuda", 0), micro_per_epoch=4)
    assert e.log_every == 10


def test_sigint_at_a_random_step_checkpoints_and_resume_is_bit_identical(store, tmp_path, monkeypatch):
    from fdcache.engine import Interrupted

    kw = dict(cache=str(store), steps=8, save_every=1000, drop_path=0.2, ema_decay=0.9, log_every=2)
    full = train(tcfg(tmp_path / "a", **kw))
    k = int(np.random.default_rng(12).integers(1, 8))  # a fixed draw: the test is repeatable
    interrupt_at(monkeypatch, k)
    with pytest.raises(Interrupted, match=f"SIGINT at step {k}/8") as e:
        train(tcfg(tmp_path / "b", **kw))
    assert e.value.exit_code == 130 and "resume=True" in str(e.value)  # (the CLI prints its command line)
    monkeypatch.undo()
    assert torch.load(tmp_path / "b/checkpoints/last.pt", weights_only=False)["step"] == k
    rest = train(tcfg(tmp_path / "b", resume=True, **kw))
    assert full.steps == rest.steps == 8
    x = torch.load(tmp_path / "a/checkpoints/last.pt", weights_only=False)
    y = torch.load(tmp_path / "b/checkpoints/last.pt", weights_only=False)
    for part in ("model", "ema"):  # the uninterrupted run's weights and EMA, bit for bit
        assert x[part].keys() == y[part].keys() and all(torch.equal(x[part][n], y[part][n]) for n in x[part])
    a, b = (torch.load(tmp_path / d / "checkpoints/last.pt", weights_only=False) for d in ("a", "b"))
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][n], b[part][n]) for n in a[part]), part
    steps = [r["step"] for r in _log(tmp_path / "b")]
    assert steps == sorted(set(steps)) and steps[-1] == 8  # each logged step once
    assert k in steps  # the interrupted step was logged before the checkpoint


def test_sigterm_exits_143(store, tmp_path, monkeypatch):
    import signal

    from fdcache.engine import Interrupted

    interrupt_at(monkeypatch, 2, signal.SIGTERM)
    with pytest.raises(Interrupted, match="SIGTERM at step 2") as e:
        train(tcfg(tmp_path / "r", cache=str(store), steps=6))
    assert e.value.exit_code == 143


def test_resume_drops_log_records_past_the_checkpoint(store, tmp_path, monkeypatch):
    import shutil

    from fdcache.engine import Engine

    real = Engine.save

    def save_and_keep(self, name="last.pt"):  # keep the step-3 checkpoint aside
        path = real(self, name)
        if self.step == 3:
            shutil.copy(path, tmp_path / "step3.pt")
        return path
    monkeypatch.setattr(Engine, "save", save_and_keep)
    train(tcfg(tmp_path / "r", cache=str(store), steps=6, save_every=3, run_steps=5))
    monkeypatch.undo()
    # A crash after step 5 was logged but before its checkpoint: last.pt is still step 3's.
    shutil.copy(tmp_path / "step3.pt", tmp_path / "r/checkpoints/last.pt")
    assert [r["step"] for r in _log(tmp_path / "r")] == [1, 2, 3, 4, 5]
    with open(tmp_path / "r/log.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # and a line cut short
    r = train(tcfg(tmp_path / "r", cache=str(store), steps=6, save_every=3, resume=True))
    assert r.steps == 6 and [rec["step"] for rec in _log(tmp_path / "r")] == [1, 2, 3, 4, 5, 6]


def test_an_occupied_out_is_refused_naming_it_and_overwrite_replaces_only_fdcache_files(store, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # a run stopped before any checkpoint
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FdcacheError, match=r"already holds a run \(log.jsonl\).*--resume.*--overwrite"):
        train(tcfg(out, cache=str(store), steps=2))
    train(tcfg(out, cache=str(store), steps=2, overwrite=True))
    assert [r["step"] for r in _log(out)] == [1, 2] and (out / "notes.txt").read_text() == "mine"
    (out / "checkpoints" / "mine.pt").write_text("x")
    train(tcfg(out, cache=str(store), steps=3, overwrite=True))
    assert (out / "checkpoints" / "mine.pt").exists() and (out / "notes.txt").exists()


def test_progress_moves_every_step_from_the_resumed_step_and_never_past_the_total(store, tmp_path, monkeypatch):
    import fdcache.engine
    from fdcache.progress import Progress

    seen = []

    class Recording(Progress):
        def update(self, *a, **k):
            super().update(*a, **k)
            seen.append((self.n, self.total))
    monkeypatch.setattr(fdcache.engine, "Progress", Recording)
    train(tcfg(tmp_path / "r", cache=str(store), steps=5, run_steps=2, log_every=2, progress=True))
    assert seen == [(1, 5), (2, 5)]
    seen.clear()
    train(tcfg(tmp_path / "r", cache=str(store), steps=5, resume=True, log_every=2, progress=True))
    assert seen == [(3, 5), (4, 5), (5, 5)]


def test_an_image_that_breaks_during_training_is_named(images, tmp_path):
    from fdcache.errors import BadImageError

    s = _extract(images, tmp_path / "s.zarr", seeds=1)
    bad = sorted((images / "class_001").glob("*.jpg"))[0]
    bad.write_bytes(bad.read_bytes()[:300])  # damaged after extraction
    with pytest.raises(BadImageError, match=bad.name) as e:
        train(tcfg(tmp_path / "r", cache=str(s), check_data=False))
    assert "cannot decode" in str(e.value)


SHARD_ARGS = ["--student", "fd-tiny", "--steps", "4", "--warmup-steps", "1", "--lr", "0.01", "--drop-path", "0",
              "--loss-impl", "torch", "--threads", "1"]


def _fdcache(args, out, nproc=1, batch=8):
    """``python -m fdcache train`` (or under torchrun, ``nproc`` gloo ranks) into ``out``."""
    import subprocess
    import sys

    head = [sys.executable, "-m", "fdcache"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", "fdcache"]
    r = subprocess.run([*head, "train", *args, "--batch-size", str(batch), "--out", str(out)], capture_output=True,
                       text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def one_process_run(store, tmp_path_factory):
    """The reference: one process, plain model, 4 steps of 8 images."""
    return _fdcache(["--cache", str(store), *SHARD_ARGS], tmp_path_factory.mktemp("ref") / "one")


def test_sharded_two_ranks_match_one_process_and_export_the_whole_student(store, one_process_run, tmp_path):
    """FSDP2 over 2 gloo ranks x 4 images: the same losses as one process x 8 (fp32; only the
    summation order differs), and rank 0 exports the whole backbone gathered from the shards."""
    two = _fdcache(["--cache", str(store), *SHARD_ARGS, "--shard-model"], tmp_path / "two", nproc=2, batch=4)
    a = [r["loss"] for r in _log(one_process_run)]
    b = [r["loss"] for r in _log(two)]
    assert len(a) == len(b) == 4
    np.testing.assert_allclose(b, a, rtol=1e-4)
    assert (two / "checkpoints" / "last" / ".metadata").is_file() and (two / "checkpoints" / "last" / "run.pt").is_file()
    assert not (two / "checkpoints" / "last.pt").exists()
    ref, got = load_file(one_process_run / "model.safetensors"), load_file(two / "model.safetensors")
    assert ref.keys() == got.keys()
    for k in ref:
        assert got[k].shape == ref[k].shape, k
        torch.testing.assert_close(got[k], ref[k], rtol=1e-3, atol=1e-5)


def test_sharded_checkpoint_resumes_on_one_process(store, one_process_run, tmp_path):
    """2 sharded ranks stop after step 2; one process (same total batch) resumes the DCP
    checkpoint: model and AdamW tensors come back exactly as saved, and steps 3-4 give the
    uninterrupted run's losses."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / "r"
    _fdcache(["--cache", str(store), *SHARD_ARGS, "--shard-model", "--run-steps", "2"], out, nproc=2, batch=4)
    assert not (out / "model.safetensors").exists()
    dcp_to_torch_save(out / "checkpoints" / "last", tmp_path / "step2.pt")
    saved = torch.load(tmp_path / "step2.pt", weights_only=False)
    assert torch.load(out / "checkpoints" / "last" / "run.pt", weights_only=False)["step"] == 2
    from fdcache.distill.score import load_trained_student

    scored = load_trained_student(out)  # fdcache score reads the checkpoint folder
    assert scored.steps == 2
    for k, v in scored.model.state_dict().items():
        assert torch.equal(v, saved["model"][k]), k

    task = DistillTask(tcfg(out, cache=str(store), steps=4, batch_size=8, warmup_steps=1, base_lr=0.01,
                            drop_path=0.0, shard_model=True, resume=True, num_threads=1))
    task.engine.load(out / "checkpoints" / "last")
    assert task.engine.step == 2
    model_sd = task.model.state_dict()
    assert saved["model"].keys() == model_sd.keys()
    for k, v in saved["model"].items():
        assert torch.equal(model_sd[k], v), k
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    osd = get_optimizer_state_dict(task.model, task.engine.optimizer)
    assert saved["optimizer"]["state"].keys() == osd["state"].keys()
    for k, st in saved["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(osd["state"][k][name], st[name]), (k, name)
    del task

    _fdcache(["--cache", str(store), *SHARD_ARGS, "--shard-model", "--resume"], out, nproc=1, batch=8)
    a = [r["loss"] for r in _log(one_process_run)]
    b = [r["loss"] for r in _log(out)]
    assert [r["step"] for r in _log(out)] == [1, 2, 3, 4]
    np.testing.assert_allclose(b, a, rtol=1e-4)
    assert (out / "model.safetensors").is_file()


def test_resuming_a_sharded_checkpoint_with_another_total_batch_is_refused(store, tmp_path):
    train(tcfg(tmp_path / "r", cache=str(store), steps=2, shard_model=True))
    assert (tmp_path / "r" / "checkpoints" / "last" / "run.pt").is_file()
    with pytest.raises(FdcacheError, match="same total batch"):
        train(tcfg(tmp_path / "r", cache=str(store), steps=4, batch_size=2, shard_model=True, resume=True))
    run_pt = tmp_path / "r" / "checkpoints" / "last" / "run.pt"
    run_pt.write_bytes(run_pt.read_bytes()[:100])  # cut short: the sharded checkpoint's record is unreadable
    with pytest.raises(FdcacheError, match=r"^the checkpoint is unreadable: .*run\.pt\): restore it from a "
                                           r"copy, or start the run again without --resume \(--overwrite replaces "
                                           r"what the old run left\)$"):
        train(tcfg(tmp_path / "r", cache=str(store), steps=4, shard_model=True, resume=True))
    torch.save({"step": 2}, run_pt)  # a readable archive, but not fdcache's record: named when it is loaded
    with pytest.raises(FdcacheError, match=r"^the file is not an fdcache checkpoint \(no model, .*\) \(.*run\.pt\): "
                                           r"restore the folder from a copy, or start the run again without --resume "
                                           r"\(--overwrite replaces what the old run left\)$"):
        train(tcfg(tmp_path / "r", cache=str(store), steps=4, shard_model=True, resume=True))


def test_data_wait_is_the_time_spent_waiting_for_batches_over_the_runs_clock(tiny_store, tmp_path, monkeypatch):
    """A clock that advances 1 s per read (engine.time.perf_counter): each of 3 steps waits 1 s for
    its batch between reads at 1-2, 4-5, 7-8 of a run timed from 0 to 10, so the run waited
    3 / 10 of its time and each log window (3 s) 1 / 3; 12 images in 10 s, 4 in each window."""
    import time as real_time
    from types import SimpleNamespace

    import fdcache.engine as engine_mod

    ticks = iter(range(1000))
    monkeypatch.setattr(engine_mod, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks)),
                                                            time=real_time.time, sleep=real_time.sleep))
    r = DistillTask(tcfg(tmp_path / "r", cache=str(tiny_store), steps=3, log_every=1)).fit()
    assert r.data_wait_fraction == pytest.approx(3 / 10) and r.images_per_s == pytest.approx(12 / 10)
    log = [json.loads(line) for line in open(tmp_path / "r" / "log.jsonl")]
    assert [(x["data_wait"], x["images_per_s"]) for x in log] == [pytest.approx((1 / 3, 4 / 3))] * 3


def test_tensorboard_scalars_are_the_logs_records(tiny_store, tmp_path):
    """``--tensorboard``: each logged step's loss, lr, images/s and data wait, under the task's
    name, hold the values log.jsonl records for that step (float32 in the event file)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "r"
    train(tcfg(out, cache=str(tiny_store), steps=3, log_every=1, tensorboard=True))
    log = _log(out)
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    keys = ("loss", "lr", "images_per_s", "data_wait")
    assert {f"train/{k}" for k in keys} <= set(events.Tags()["scalars"])
    for k in keys:
        got = [(e.step, e.value) for e in events.Scalars(f"train/{k}")]
        assert got == [(r["step"], pytest.approx(r[k], rel=1e-6)) for r in log], k
    assert [r["step"] for r in log] == [1, 2, 3]
