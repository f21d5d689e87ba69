"""torch.distributed set-up as a GPU job would see it, with the collectives mocked on CPU."""

import importlib
from datetime import timedelta

import pytest
import torch

from fdcache import distributed
from fdcache.models import TINY_TEACHER


@pytest.fixture
def fake_dist(monkeypatch):
    """Rank 0 of 2 under torchrun; records init_process_group's arguments and each
    collective, in order, with what had happened before it."""
    events = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda **kw: events.append(("init", kw)))

    def broadcast_object_list(box, src=0):
        events.append(("collective", "broadcast"))

    monkeypatch.setattr(distributed.dist, "broadcast_object_list", broadcast_object_list)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: events.append(("collective", "barrier")))
    return events


@pytest.mark.parametrize("cuda", [False, True])
def test_process_group_waits_hours_not_nccls_ten_minutes(fake_dist, monkeypatch, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    d = distributed.init()
    assert (d.rank, d.world) == (0, 2)
    ((what, kw),) = fake_dist
    assert kw["backend"] == ("nccl" if cuda else "gloo")
    assert kw["timeout"] >= timedelta(hours=1)


def test_rank0_indexes_and_creates_the_store_under_the_long_timeout(fake_dist, monkeypatch, image_root, tmp_path):
    """The other ranks wait in a collective while rank 0 prepares: that wait must be
    covered by the timeout given to init_process_group, set before any collective."""
    ex = importlib.import_module("fdcache.distill.extract")  # the module (fdcache.extract is the API function)

    real_index = ex.index
    monkeypatch.setattr(ex, "index", lambda *a, **k: (fake_dist.append(("prepare", "index")), real_index(*a, **k))[1])
    ex.extract(ex.ExtractConfig(data=str(image_root), out=str(tmp_path / "s.zarr"), teacher=TINY_TEACHER,
                                random_init=True, batch_size=4, shard_size=4, progress=False, num_threads=1))
    kinds = [e[0] for e in fake_dist]
    assert kinds[0] == "init" and fake_dist[0][1]["timeout"] >= timedelta(hours=1)
    assert kinds.index("prepare") < kinds.index("collective")


class _FakeDDP(torch.nn.Module):
    def __init__(self, module, **kw):
        super().__init__()
        self.module, self.kw = module, kw


@pytest.mark.parametrize("with_bn", [False, True])
def test_ddp_rebroadcasts_buffers_only_when_a_module_updates_them(monkeypatch, with_bn):
    import torch.nn.parallel

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", _FakeDDP)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), *([torch.nn.BatchNorm1d(4)] if with_bn else []))
    model.register_buffer("constant", torch.ones(3))
    wrapped = distributed.ddp(model, torch.device("cpu"))
    sync = wrapped.kw.get("forward_sync_buffers", wrapped.kw.get("broadcast_buffers"))
    assert sync is with_bn
    assert wrapped.kw["device_ids"] is None
