"""A miniature of FD's claim on Fashion-MNIST, end to end with fdcache's own commands.

    python benchmarks/fd_fashion_mnist.py --work /tmp/fdmini --teacher-ckpt vit_s14_112.pth

Teacher: the trained ViT-S/14 (``benchmarks/convert_real_vit.py --resolution 112``). Three
students of one architecture (``fd-small`` with patch 14, so its token grid is the teacher's),
each fine-tuned with the same recipe and step budget, then evaluated on held-out images:

1. ``cached``: ``fdcache extract`` (once) -> ``fdcache train --cache`` -> ``fdcache finetune``
2. ``online``: ``fdcache train --online`` (teacher in the loop, same steps) -> ``finetune``
3. ``random``: ``fdcache finetune`` from the same student at random init (``train --steps 0``)

Prints and writes ``OUT/result.json``: top-1 of each, and the wall-clock and CPU seconds
(user + system of the command's process) each command took; on a shared machine the CPU
seconds are the steadier measure. Re-running the same command resumes: a step whose output
exists is skipped. Needs
the Debian package ``dataset-fashion-mnist`` (or ``--fmnist DIR`` with the four idx files).
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def read_idx(path: Path, offset: int) -> np.ndarray:
    return np.frombuffer(gzip.open(path).read(), dtype=np.uint8, offset=offset)


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, per_class: int) -> None:
    """ImageFolder of the first ``per_class`` images of each class (28x28 grey -> RGB PNG)."""
    if root.exists():
        return
    counts = dict.fromkeys(range(10), 0)
    for i, (img, y) in enumerate(zip(images, labels)):
        if counts[int(y)] >= per_class:
            continue
        counts[int(y)] += 1
        d = root / CLASSES[int(y)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).convert("RGB").save(d / f"{i:05d}.png")


def run(cmd: list[str], log: Path, times: dict, key: str, done: Path) -> None:
    """Run one fdcache command unless its output ``done`` exists (the script resumes)."""
    if done.exists():
        print(f"  {key}: already done ({done.name})", flush=True)
        return
    print("$", " ".join(cmd), flush=True)
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    times[key] = round(time.perf_counter() - t0, 1)
    times[key + ".cpu"] = round(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, 1)
    (log.parent / "times.json").write_text(json.dumps(times, indent=1))
    print(f"  {key}: {times[key]} s wall, {times[key + '.cpu']} s CPU", flush=True)


def export_random_init(w: Path, args, steps: int) -> None:
    """``fdcache train`` refuses zero steps, so build its DistillTask (same student, same seed)
    and call its export directly: the starting point the distilled students began from."""
    from fdcache.distill.train import DistillTask, TrainConfig

    cfg = TrainConfig(out=str(w / "random"), online=True, teacher="timm:vit_small_patch14_dinov2",
                      pretrained=args.teacher_ckpt, data=str(w / "train"), student=args.student,
                      student_overrides={"patch_size": 14}, resolution=args.resolution, steps=steps,
                      batch_size=args.distill_batch, device="cpu", progress=False)
    (w / "random").mkdir(parents=True, exist_ok=True)
    DistillTask(cfg).export()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--teacher-ckpt", required=True, help="converted ViT-S/14 at --resolution")
    ap.add_argument("--fmnist", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--train-per-class", type=int, default=200)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--resolution", type=int, default=112)
    ap.add_argument("--seeds", type=int, default=4, help="recorded views per image (epoch e replays seed e mod S)")
    ap.add_argument("--distill-epochs", type=int, default=8)
    ap.add_argument("--distill-batch", type=int, default=64)
    ap.add_argument("--distill-lr", type=float, default=1.5e-3, help="per 512 images")
    ap.add_argument("--ft-epochs", type=int, default=10)
    ap.add_argument("--ft-batch", type=int, default=64)
    ap.add_argument("--ft-warmup-steps", type=int, default=4)
    ap.add_argument("--ft-lr", type=float, default=2e-3, help="per 512 images")
    ap.add_argument("--student", default="fd-small")
    ap.add_argument("--arms", default="cached,online,random")
    args = ap.parse_args()

    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    log = w / "commands.log"
    src = args.fmnist
    write_folder(w / "train", read_idx(src / "train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28),
                 read_idx(src / "train-labels-idx1-ubyte.gz", 8), args.train_per_class)
    write_folder(w / "test", read_idx(src / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28),
                 read_idx(src / "t10k-labels-idx1-ubyte.gz", 8), args.test_per_class)
    n_train = 10 * args.train_per_class
    steps = args.distill_epochs * (n_train // args.distill_batch)

    fd = [sys.executable, "-m", "fdcache"]
    teacher = ["--teacher", "timm:vit_small_patch14_dinov2", "--pretrained", args.teacher_ckpt,
               "--resolution", str(args.resolution)]
    student = ["--student", args.student, "--student-arg", "patch_size=14", "--resolution", str(args.resolution),
               "--batch-size", str(args.distill_batch), "--lr", str(args.distill_lr), "--warmup-steps",
               str(max(1, steps // 10)), "--save-every", "100000", "--device", "cpu"]
    finetune = ["--preset", "fd-finetune-vit-b16", "--data", str(w / "train"), "--epochs", str(args.ft_epochs),
                "--batch-size", str(args.ft_batch), "--lr", str(args.ft_lr), "--lr-batch", "512",
                "--warmup-steps", str(args.ft_warmup_steps), "--layer-decay", "0.75", "--drop-path", "0.1", "--mixup", "0",
                "--cutmix", "0", "--auto-augment", "none", "--reprob", "0", "--resolution", str(args.resolution),
                "--workers", "0", "--save-every", "100000", "--device", "cpu"]
    times_file = w / "times.json"  # seconds per command, kept across resumed invocations
    times: dict[str, float] = json.loads(times_file.read_text()) if times_file.exists() else {}
    arms = args.arms.split(",")
    if "cached" in arms:
        run(fd + ["extract", str(w / "train"), "--out", str(w / "teacher.zarr"), *teacher, "--seeds", str(args.seeds),
                  "--batch-size", "64", "--threads", "2", "--device", "cpu"], log, times, "cached.extract", w / "extract.done")
        (w / "extract.done").touch()
        run(fd + ["train", "--cache", str(w / "teacher.zarr"), "--out", str(w / "cached"), *student,
                  "--steps", str(steps)], log, times, "cached.distill", w / "cached" / "model.safetensors")
    if "online" in arms:
        run(fd + ["train", "--online", *teacher, "--data", str(w / "train"), "--out", str(w / "online"), *student,
                  "--steps", str(steps)], log, times, "online.distill", w / "online" / "model.safetensors")
    if "random" in arms and not (w / "random" / "model.safetensors").exists():
        export_random_init(w, args, steps)  # the same student (same seed) before any step
    result = {"train_images": n_train, "test_images": 10 * args.test_per_class, "distill_steps": steps,
              "distill_batch": args.distill_batch, "ft_epochs": args.ft_epochs, "arms": {}}
    for arm in arms:
        run(fd + ["finetune", "--student", str(w / arm), "--out", str(w / f"{arm}-ft"), *finetune],
            log, times, f"{arm}.finetune", w / f"{arm}-ft" / "model.json")
        run(fd + ["eval", "--run", str(w / f"{arm}-ft"), "--data", str(w / "test"), "--no-ema", "--workers", "0",
                  "--device", "cpu", "--json", str(w / f"{arm}-eval.json")], log, times, f"{arm}.eval", w / f"{arm}-eval.json")
        r = json.loads((w / f"{arm}-eval.json").read_text())["results"]
        top1 = next(iter(r.values()))["top1"]
        result["arms"][arm] = {"top1": top1, "seconds": {k.split(".", 1)[1]: v for k, v in times.items()
                                                        if k.startswith(arm + ".")}}
        print(f"{arm}: top-1 {100 * top1:.2f}", flush=True)
    (w / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
