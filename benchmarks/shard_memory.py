"""Per-rank training state of a student under DDP vs ``--shard-model`` (FSDP2).

    torchrun --standalone --nproc-per-node 2 benchmarks/shard_memory.py \\
        --student beit_base_patch16_224 --teacher-dim 768

Each rank builds the student, wraps it as ``fdcache train`` does (``fdcache.distributed.ddp``
or ``fdcache.distributed.shard``), takes one AdamW step (timm's optimizer, as the engine) on a
random batch, then counts what it holds: parameters, gradients and optimizer state, as
``numel x element size`` of its *local* tensors (a DTensor's local shard). Counted, not
timed: the numbers do not depend on load. Activations are not counted (they scale with the
batch, not the world). On CPU the ranks use gloo; the counts are the same on GPUs.
"""

import argparse
import json

import torch
import torch.distributed as dist


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def measure(student: str, teacher_dim: int, resolution: int, sharded: bool, d, device) -> dict:
    from timm.optim import create_optimizer_v2

    from fdcache import distributed
    from fdcache.distill.students import build_student

    model, spec = build_student(student, teacher_dim, resolution=resolution, drop_path=0.0, seed=0)
    model.to(device)
    wrapped = distributed.shard(model, None) if sharded else distributed.ddp(model, device)
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-4, weight_decay=0.05)
    x = torch.randn(1, 3, spec.resolution, spec.resolution, device=device)
    wrapped(x).float().pow(2).mean().backward()
    opt.step()
    params = list(model.parameters())
    state = [v for s in opt.state.values() for k, v in s.items() if k != "step"]
    return {"params": local_bytes(params), "grads": local_bytes(p.grad for p in params),
            "adamw": local_bytes(state), "numel": sum(p.numel() for p in params)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="beit_base_patch16_224")
    ap.add_argument("--teacher-dim", type=int, default=768)
    ap.add_argument("--resolution", type=int, default=64, help="Input size (parameters barely depend on it).")
    args = ap.parse_args()
    from fdcache import distributed

    d = distributed.init()
    device = distributed.device_for(d)
    rows = {}
    for name, sharded in (("ddp", False), ("fsdp2", True)):
        mine = measure(args.student, args.teacher_dim, args.resolution, sharded, d, device)
        rows[name] = d.all_gather(mine)
    if d.is_main:
        print(json.dumps({"student": args.student, "world": d.world, "per_rank": rows}, indent=1))
        mib = 2 ** 20
        print(f"\n| student | world | mode | params MiB/rank | grads MiB/rank | AdamW MiB/rank | total / DDP |")
        print("|---|---|---|---|---|---|---|")
        ddp_total = max(r["params"] + r["grads"] + r["adamw"] for r in rows["ddp"])
        for name, per in rows.items():
            top = max(per, key=lambda r: r["params"] + r["grads"] + r["adamw"])  # the fullest rank
            tot = top["params"] + top["grads"] + top["adamw"]
            print(f"| {args.student} | {d.world} | {name} | {top['params'] / mib:.1f} | {top['grads'] / mib:.1f} | "
                  f"{top['adamw'] / mib:.1f} | {tot / ddp_total:.3f} |")
    if d.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
