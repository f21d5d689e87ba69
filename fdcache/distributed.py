"""torch.distributed under torchrun (rank/world from the environment, nothing home-made), the
device each rank uses, and the autocast dtype a device gets."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import FdcacheError

__all__ = ["Dist", "TIMEOUT", "init", "device_for", "ddp", "transformer_blocks", "shard", "amp_dtype"]


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (e.g. an error message to raise everywhere)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


# Collectives wait this long. Rank 0 prepares alone while the others wait in a collective
# (extract: indexing the folder and creating the store, 1.28M header reads for ImageNet;
# train: re-statting the manifest), far beyond NCCL's default 10 minutes
# (torch.distributed.init_process_group's docs), after which its watchdog kills the job.
TIMEOUT = timedelta(hours=3)


def init(timeout: timedelta = TIMEOUT) -> Dist:
    """Join the torchrun process group when ``WORLD_SIZE > 1`` (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend, timeout=timeout)
    return Dist(rank=rank, world=world, local_rank=local)


def device_for(d: Dist, want: str = "auto") -> torch.device:
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        return torch.device("cuda", d.local_rank)
    return torch.device(want)


def ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``DistributedDataParallel`` that re-broadcasts buffers each forward only when some
    module updates them (BatchNorm's running stats). Other buffers are constant, and DDP's
    construction already syncs them from rank 0 (its ``init_sync``)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    sync = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    # torch 2.13 renamed broadcast_buffers to forward_sync_buffers (the old name warns).
    name = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
        else "broadcast_buffers"
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **{name: sync})


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a timm backbone: the members of every ``ModuleList`` named
    ``blocks`` (ViT/BEiT ``blocks.i``, Swin ``layers.j.blocks.i``). Each becomes one FSDP
    unit: its parameters are gathered for its forward/backward only, then freed."""
    found = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] == "blocks":
            found += list(m)
    return found


def shard(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) per transformer block, then the root
    (patch embedding, norms, head): each rank keeps 1/world of every parameter, gradient and
    AdamW moment. ``dtype`` (the run's autocast, bf16/fp16) is the policy's compute dtype for
    the gathered parameters; gradients are reduced in fp32. Sharded in place (parameters
    become DTensors): build the optimizer after this."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = transformer_blocks(model)
    if not blocks:
        raise FdcacheError(f"--shard-model: {type(model).__name__} has no transformer blocks (a ModuleList "
                           "named 'blocks') to shard: train it without --shard-model (DDP)")
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """``auto`` = bf16 on CUDA, full precision on CPU; ``bf16`` | ``fp16`` | ``none``."""
    amp = amp if amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    try:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]
    except KeyError:
        raise FdcacheError(f"amp must be auto, bf16, fp16 or none, not {amp!r}") from None
