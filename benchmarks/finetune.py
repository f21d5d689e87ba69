"""Fine-tuning throughput: the image loader (PIL + timm/open_clip transforms), the model step on
in-memory tensors (the ceiling), and both together, as in ``fdcache finetune`` / ``flyp``.

    python benchmarks/finetune.py                                  # CPU: fdcache-small-vit @ 64 px
    python benchmarks/finetune.py --mode flyp
    python benchmarks/finetune.py --model ViT-B-16 --resolution 224 --batch-size 256 --workers 16   # GPU

Random-init weights; synthetic JPEGs of 256-500 px. Median of --repeats, interleaved.
"""

import argparse
import json
import statistics
import tempfile
import time

import torch

from fdcache.samples import make_image_folder
from fdcache.tune.finetune import FinetuneTask, make_config
from fdcache.tune.imagefolder import train_loader


def timed(fn, n: int) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="finetune", choices=["finetune", "flyp"])
    ap.add_argument("--model", default="fdcache-small-vit")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="fdcache-bench-ft-")
    data = make_image_folder(f"{root}/images", classes=8, per_class=args.images // 8, min_size=256, max_size=500)
    preset = "ft-clip-vit-b16" if args.mode == "finetune" else "flyp-imagenet"
    ft = FinetuneTask(make_config(preset, mode=args.mode, out=f"{root}/run", data=str(data), model=args.model,
                               random_init=True, resolution=args.resolution, batch_size=args.batch_size,
                               classnames="folder", steps=10**6, workers=args.workers, progress=False))
    stream = iter(train_loader(ft.dataset, ft.sampler, args.workers, ft.device.type == "cuda"))
    fixed = next(stream)
    ft.model.train()

    def step(batch):
        images, labels, index = batch
        ft.engine.scheduler.step_update(ft.engine.step)
        ft.engine.forward_backward((images, labels, index, 0))
        ft.engine.optimizer_step()

    # Workers keep prefetch_factor (2) batches each ready while the other modes run: take
    # those untimed first, so the loader figure is its production rate, not a queue pop.
    prefetched = 2 * args.workers
    modes = {"loader": lambda: next(stream), "step": lambda: step(fixed), "full": lambda: step(next(stream))}
    rates = {m: [] for m in modes}
    for _ in range(args.repeats):
        for m, fn in modes.items():
            for _ in range(prefetched if m != "step" else 0):
                next(stream)
            rates[m].append(args.steps * args.batch_size / timed(fn, args.steps))
    med = {m: statistics.median(v) for m, v in rates.items()}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x {torch.get_num_threads()} threads"
    print(json.dumps({"rates": rates, "median": med, "device": device, "args": vars(args)}, indent=2))
    print(f"\n| device | mode | model @ px | batch | workers | loader img/s | step img/s | full img/s | "
          f"full/step | loader/step |\n|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {device} | {args.mode} | {args.model} @ {args.resolution} | {args.batch_size} | {args.workers} | "
          f"{med['loader']:.1f} | {med['step']:.1f} | {med['full']:.1f} | {med['full'] / med['step']:.2f} | "
          f"{med['loader'] / med['step']:.2f} |")


if __name__ == "__main__":
    main()
