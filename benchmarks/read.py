"""Read rates of the store's reader against the hardware floor, per codec, in one process.

    python benchmarks/read.py --json read.json
    python benchmarks/read.py --features feats.pt --json read-real.json   # real teacher maps
    python benchmarks/read.py --loader --json loader.json                 # the trainer's DALI CPU loader

Builds, through the project's own API (``Store.create`` + ``write_shard``), a 197x768 store
per codec (fp16 and int8, with and without zstd; feature-like random maps, or the maps in
``--features``, a torch file holding a float tensor ``[n, 197, 768]``, tiled) and a tiny one
(17x64, the default codec; with zstd too, printed only). For each: samples/s of the reader's batch path (random batches
of ``--batch`` from a permutation into one reused buffer, as the trainer's source reads), samples/s of plain
``open().read()`` of the same shard files (the floor), their ratio, and for zstd stores
numcodecs' Zstd decode rate on the same chunks (one core) and the reader's ratio to it.
Each rate is the best of ``--rounds`` rounds of about ``--seconds`` (the machine is shared:
the best round is the least disturbed). Page cache warm. ``--tensorstore`` also prints
tensorstore's ``zarr3`` driver on the same stores (all reads of a batch in flight).

``--loader``: images+targets/s of ``DistillTask.stream()`` (DALI CPU pixels + targets) on a
store of 197x768 fp16 targets (``--compressor``) over a folder of JPEGs (``--image-px``, default 256-400); uses only APIs older versions
have too, so the same file measures before and after a change.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fdcache.codecs import CodecSpec
from fdcache.store import Store, StoreInfo
from fdcache.store.layout import TeacherSpec
from fdcache.store.manifest import Manifest
from fdcache.store.views import ViewPolicy

CODECS = {"fp16": CodecSpec("fp16", "none"), "fp16+zstd": CodecSpec("fp16", "zstd"),
          "int8": CodecSpec("int8", "none"), "int8+zstd": CodecSpec("int8", "zstd")}


def feature_like(n: int, tokens: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, tokens, dim, generator=g) * (torch.rand(n, tokens, 1, generator=g) + 0.5) \
        + torch.randn(n, tokens, 1, generator=g)


def build(url: str, codec: CodecSpec, x: torch.Tensor, shard: int, manifest: Manifest | None = None) -> Store:
    n, tokens, dim = x.shape
    if manifest is None:
        manifest = Manifest(root=Path(url).parent, paths=[f"c/{i}.jpg" for i in range(n)],
                            labels=np.zeros(n, np.int32), widths=np.full(n, 256, np.int32),
                            heights=np.full(n, 256, np.int32), sizes=np.ones(n, np.int64), mtimes=np.ones(n, np.int64))
    side = int(np.sqrt(tokens - 1))  # CLS + a square grid of 16 px patches (197 tokens: 224 px)
    t = TeacherSpec("timm", "bench", None, 0, 16 * side, 16, tokens, 1, dim, (0.5,) * 3, (0.25,) * 3, "0" * 64)
    info = StoreInfo(t, ViewPolicy(), codec, 0, shard, n, manifest.fingerprint())
    store = Store.create(url, info, manifest, 1, overwrite=True)
    for k in range(store.num_shards):
        a, b = store.shard_range(k)
        store.write_shard(0, k, {name: v.numpy() for name, v in _encode(codec, x[a:b], a).items()},
                          np.zeros(b - a, bool))
    return Store.open(url)


def _encode(codec: CodecSpec, x: torch.Tensor, first: int) -> dict:
    try:
        return codec.encode(x, seed=0, samples=torch.arange(first, first + len(x)))
    except TypeError:  # fdcache before codecs took row keys (the --loader "before" run)
        return codec.encode(x)


def whitened_rel_l2(codec: CodecSpec, x: torch.Tensor) -> float:
    from fdcache.codecs import whitened_error

    return whitened_error(x, codec.decode(_encode(codec, x, 0)))["rel_l2"]


def best_rates(fns: dict, samples: dict, rounds: int, seconds: float) -> dict[str, float]:
    """Best samples/s of each function over ``rounds`` rounds of at least ``seconds`` each,
    the functions interleaved round by round so that all see the same machine load."""
    for fn in fns.values():
        fn()  # warm: page cache, open files, thread pool
    best = dict.fromkeys(fns, 0.0)
    for _ in range(rounds):
        for name, fn in fns.items():
            t0, calls = time.perf_counter(), 0
            while True:
                fn()
                calls += 1
                dt = time.perf_counter() - t0
                if dt >= seconds:
                    break
            best[name] = max(best[name], calls * samples[name] / dt)
    return best


def measure(store: Store, batch: int, rounds: int, seconds: float, tensorstore: bool) -> tuple[dict, dict]:
    reader = store.reader()
    n = store.info.num_samples
    order = np.random.default_rng(0).permutation(n)
    batches = [order[i:i + batch] for i in range(0, n - batch + 1, batch)]
    files = reader.shard_files(0)

    out = reader.empty(batch)  # as the trainer's source: one buffer, each batch copied away

    def read_all():
        for b in batches:
            reader.read(0, b, out=out)

    def floor():
        for f in files:
            with open(f, "rb") as fh:
                fh.read()

    fns = {"reader": read_all, "floor": floor}
    samples = {"reader": batch * len(batches), "floor": n}
    if store.info.codec.compressor == "zstd":
        from numcodecs import Zstd

        zstd = Zstd()
        payloads = [(np.empty(lay.shape, lay.dtype), p) for k in range(store.num_shards)
                    for lay, p in reader.chunk_payloads(0, k)]

        def decode():
            for out, p in payloads:
                zstd.decode(p, out=out)

        fns["zstd_decode"], samples["zstd_decode"] = decode, n
    if tensorstore:
        fns["tensorstore"] = lambda: ts_read_all(store, batches)
        samples["tensorstore"] = samples["reader"]
    rates = best_rates(fns, samples, rounds, seconds)
    r = {"reader": rates["reader"], "floor": rates["floor"], "ratio": rates["reader"] / rates["floor"]}
    if "zstd_decode" in rates:
        r["zstd_decode"] = rates["zstd_decode"]
        r["zstd_ratio"] = rates["reader"] / rates["zstd_decode"]
    extra = {"bytes_per_sample": store.stored_bytes() / n}
    if tensorstore:
        extra["tensorstore"] = rates["tensorstore"]
    return r, extra


def ts_read_all(store: Store, batches) -> None:
    import tensorstore as ts

    arrays = getattr(store, "_ts", None)
    if arrays is None:
        arrays = store._ts = [ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{store.url}/{a.name}"},
                                       "fill_missing_data_reads": False}).result() for a in store.array_specs()]
    for b in batches:
        futures = [a[0, int(i)].read() for a in arrays for i in b]
        for f in futures:
            f.result()


def run_reads(args) -> dict:
    out, extras = {}, {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        if args.features:
            real = torch.load(args.features).float()
            x = real.repeat((args.samples + len(real) - 1) // len(real), 1, 1)[: args.samples]
        else:
            x = feature_like(args.samples, 197, 768)
        for key, codec in CODECS.items():
            store = build(f"{work}/{key}.zarr", codec, x, args.shard)
            out[key], extras[key] = measure(store, args.batch, args.rounds, args.seconds, args.tensorstore)
            extras[key]["rel_l2"] = whitened_rel_l2(codec, x[:64])
            print(f"{key}: {out[key]} {extras[key]}", file=sys.stderr, flush=True)
        for key in args.extra:  # printed only: codecs beyond the four
            store = build(f"{work}/{key}.zarr", CodecSpec(key), x, args.shard)
            extras[key] = dict(zip(("rates", "x"), measure(store, args.batch, args.rounds, args.seconds, False)))
            extras[key]["rel_l2"] = whitened_rel_l2(CodecSpec(key), x[:64])
            print(f"{key}: {extras[key]}", file=sys.stderr, flush=True)
        small = feature_like(args.tiny_samples, 17, 64)
        tiny = build(f"{work}/tiny.zarr", CodecSpec(), small, args.shard)
        r, extras["tiny"] = measure(tiny, args.batch, args.rounds, args.seconds, args.tensorstore)
        out["tiny"] = {"reader": r["reader"]}
        tz = build(f"{work}/tiny-zstd.zarr", CodecSpec(compressor="zstd"), small, args.shard)
        extras["tiny+zstd"] = measure(tz, args.batch, args.rounds, args.seconds, False)[0]
        print(f"tiny: {r} {extras['tiny']}; with zstd: {extras['tiny+zstd']}", file=sys.stderr)
    raw = x.shape[1] * x.shape[2] * 2
    print("\n| store | reader samples/s | floor samples/s | reader/floor | zstd decode samples/s | "
          "reader/zstd | bytes/sample (of fp16) | rel. L2 after whitening |"
          + (" tensorstore samples/s |" if args.tensorstore else "")
          + "\n|---|---|---|---|---|---|---|---|" + ("---|" if args.tensorstore else ""))
    for key in CODECS:
        r, e = out[key], extras[key]
        z = (f"{r['zstd_decode']:,.0f} | {r['zstd_ratio']:.2f}" if "zstd_decode" in r else "– | –")
        print(f"| {key} | {r['reader']:,.0f} | {r['floor']:,.0f} | {r['ratio']:.2f} | {z} | "
              f"{e['bytes_per_sample'] / raw:.3f} | {100 * e['rel_l2']:.2f}% |"
              + (f" {e['tensorstore']:,.0f} |" if args.tensorstore else ""))
    for key in args.extra:
        r, e = extras[key]["rates"], extras[key]
        print(f"| {key} | {r['reader']:,.0f} | {r['floor']:,.0f} | {r['ratio']:.2f} | – | – | "
              f"{e['x']['bytes_per_sample'] / raw:.3f} | {100 * e['rel_l2']:.2f}% |")
    tz = extras["tiny+zstd"]
    print(f"| tiny 17x64 {CodecSpec().name}+{CodecSpec().compressor} (default) | {out['tiny']['reader']:,.0f} | | | | | | |")
    print(f"| tiny 17x64 fp16+zstd | {tz['reader']:,.0f} | | | {tz['zstd_decode']:,.0f} | {tz['zstd_ratio']:.2f} | | |")
    return out


def run_loader(args) -> dict:
    """Images+targets/s of the trainer's offline loader (DALI CPU)."""
    from fdcache.distill.train import DistillTask, TrainConfig
    from fdcache.samples import make_image_folder
    from fdcache.store.manifest import index

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        data = make_image_folder(Path(work, "images"), classes=4, per_class=args.samples // 4,
                                 min_size=args.image_px[0], max_size=args.image_px[1], variety=False)
        m = index(data)
        codec = CodecSpec("fp16", args.compressor)
        store = build(f"{work}/s.zarr", codec, feature_like(len(m), 197, 768), args.shard, manifest=m)
        t = DistillTask(TrainConfig(out=f"{work}/run", cache=store.url, student="fd-tiny", resolution=224, steps=1000,
                                batch_size=args.batch_loader, progress=False, num_threads=args.threads,
                                loader_workers=args.loader_workers))
        stream = t.stream()
        for _ in range(2):
            next(stream)
        best = 0.0
        for _ in range(args.rounds):
            t0, n = time.perf_counter(), 0
            while time.perf_counter() - t0 < args.seconds:
                b = next(stream)
                assert b.stored is not None
                n += b.images.shape[0]
            best = max(best, n / (time.perf_counter() - t0))
    r = {"images_targets_per_s": best, "batch": args.batch_loader, "threads": args.threads,
         "loader_workers": args.loader_workers, "image_px": "{}-{} JPEG".format(*args.image_px), "targets": f"197x768 fp16+{args.compressor}"}
    print(json.dumps(r))
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--tiny-samples", type=int, default=8192)
    ap.add_argument("--shard", type=int, default=128)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--features", help="torch file with real teacher maps [n, 197, 768]")
    ap.add_argument("--extra", nargs="*", default=["int4", "int4-dither"],
                    help="more codecs to time (printed, not in --json)")
    ap.add_argument("--tensorstore", action="store_true", help="also time tensorstore's zarr3 driver")
    ap.add_argument("--workdir", default=os.environ.get("TMPDIR"), help="where the stores go (local disk)")
    ap.add_argument("--loader", action="store_true", help="measure the trainer's DALI CPU loader instead")
    ap.add_argument("--batch-loader", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--loader-workers", type=int, default=0)
    ap.add_argument("--image-px", type=int, nargs=2, default=(256, 400), help="--loader: JPEG size range")
    ap.add_argument("--compressor", default="zstd", help="--loader: the store's compressor (zstd or none)")
    args = ap.parse_args()
    r = run_loader(args) if args.loader else run_reads(args)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
