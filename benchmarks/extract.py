"""Extraction throughput vs the teacher's forward alone, and each codec's bytes and write rate.

    python benchmarks/extract.py --teacher ViT-B-16 --resolution 224 --images 64 --batch-size 16

Runs on CPU or GPU (the figures say which). ``teacher`` = forward over the same batches of
already-decoded pixels; ``extract`` = the full ``fdcache extract`` path (decode, forward,
copy, codec, compression, checksums, writes) into a fresh store. Median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fdcache.codecs import CodecSpec
from fdcache.distill.extract import ExtractConfig, extract, shard_batches
from fdcache.distill.pixels import PixelStream, ViewBatches, dali_device
from fdcache.distill.teachers import load_teacher
from fdcache.samples import make_image_folder
from fdcache.store import Store
from fdcache.store.manifest import index
from fdcache.store.views import sample_views


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="ViT-B-16")
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fdcache-bench-"))
    try:
        data = make_image_folder(work / "images", classes=4, per_class=args.images // 4, min_size=256,
                                 max_size=500, variety=False)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        teacher = load_teacher(args.teacher, random_init=True, resolution=args.resolution, device=device)
        spec = teacher.spec
        m = index(data)
        n = len(m)
        views = sample_views(0, 0, m.widths, m.heights)
        batches = [np.arange(a, b) for a, b in shard_batches(0, n, args.batch_size)]
        stream = PixelStream(ViewBatches([m.abspath(i) for i in range(n)], batches, [views[b] for b in batches]),
                             resolution=spec.resolution, mean=spec.mean, std=spec.std,
                             num_threads=args.threads, **dali_device(device))
        pixels = [x.to(device) for _, x in stream]
        del stream
        teacher(pixels[0])  # warm-up

        def teacher_only():
            _sync(); t0 = time.perf_counter()
            for x in pixels:
                teacher(x)
            _sync()
            return n / (time.perf_counter() - t0)

        def full(codec):
            out = work / f"store-{codec.name}.zarr"
            shutil.rmtree(out, ignore_errors=True)
            _sync(); t0 = time.perf_counter()
            extract(ExtractConfig(data=str(data), out=str(out), teacher=args.teacher, random_init=True,
                                  resolution=args.resolution, codec=codec, batch_size=args.batch_size,
                                  shard_size=max(args.batch_size, 64), progress=False,
                                  num_threads=args.threads), teacher=teacher)
            _sync()
            return n / (time.perf_counter() - t0), out

        rows = {"teacher_images_per_s": statistics.median(teacher_only() for _ in range(args.repeats))}
        codecs = {}
        for name in ("fp16", "int8"):
            rates = [full(CodecSpec(name)) for _ in range(args.repeats)]
            rate, out = statistics.median(r for r, _ in rates), rates[-1][1]
            store = Store.open(str(out), mode="r+")
            stored = store.stored_bytes()
            # Codec + compression + checksum + write rate alone, on the targets just made.
            targets = torch.randn(n, spec.tokens, spec.dim) * 2
            enc = {k: v.numpy() for k, v in CodecSpec(name).encode(targets).items()}
            t0 = time.perf_counter()
            for k in range(store.num_shards):
                a, b = store.shard_range(k)
                store.write_shard(0, k, {name: v[a:b] for name, v in enc.items()}, np.zeros(b - a, bool))
            write_s = time.perf_counter() - t0
            codecs[name] = {"extract_images_per_s": rate,
                            "ratio_vs_teacher": rate / rows["teacher_images_per_s"],
                            "bytes_per_sample_view": stored / n,
                            "raw_fp16_bytes_per_sample_view": spec.tokens * spec.dim * 2,
                            "write_MB_per_s_raw_fp16": n * spec.tokens * spec.dim * 2 / write_s / 1e6}
        result = {"device": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
                  "teacher": spec.label, "tokens": spec.tokens, "dim": spec.dim, "images": n,
                  "batch_size": args.batch_size, **rows, "codecs": codecs}
        print(json.dumps(result, indent=2))
        print(f"\n| codec | extract img/s | teacher-only img/s | ratio | bytes/sample-view | write MB/s |\n|---|---|---|---|---|---|")
        for name, c in codecs.items():
            print(f"| {name} | {c['extract_images_per_s']:.1f} | {rows['teacher_images_per_s']:.1f} | "
                  f"{c['ratio_vs_teacher']:.2f} | {c['bytes_per_sample_view']:,.0f} | {c['write_MB_per_s_raw_fp16']:.0f} |")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
