"""``fdcache quickstart``: the whole path in miniature on CPU (a minute or two). Each step
reports through ``say(text, same_as)``, ``same_as`` being the command it equals."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

__all__ = ["quickstart"]


def quickstart(workdir: str | Path | None, images: int, say: Callable) -> Path:
    """Make images, extract with a tiny random teacher, inspect, verify, distill a tiny
    student, fine-tune and evaluate it; then FLYP on the tiny CLIP and a WiSE-FT sweep.
    Re-running into the same ``workdir`` replaces its runs (``overwrite``). Returns it."""
    from ..distill.extract import ExtractConfig, extract
    from ..distill.train import TrainConfig, train
    from ..models import TINY_TEACHER
    from ..samples import make_image_folder
    from ..store.inspect import inspect_store, verify_store
    from ..tables import store_table
    from ..tune.classifiers import load_export
    from ..tune.evaluate import evaluate
    from ..tune.finetune import finetune, make_config
    from ..tune.wise import wise
    from ..options import check

    check(images=images)
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fdcache-quickstart-"))
    data, store = root / "images", str(root / "teacher.zarr")
    t0 = time.perf_counter()
    make_image_folder(data, classes=3, per_class=max(2, images // 3))
    say(f"1. made {images} images in 3 classes under {data}")
    r = extract(ExtractConfig(data=str(data), out=store, teacher=TINY_TEACHER, random_init=True, seeds=2,
                              batch_size=8, shard_size=8, overwrite=True, progress=False))
    say(f"2. extract: {r.samples} sample-views (2 seeds) from random-init {TINY_TEACHER} in {r.seconds:.1f}s -> {store}",
        f"fdcache extract {data} --out {store} --teacher {TINY_TEACHER} --random-init --seeds 2 "
        "--batch-size 8 --shard-size 8")
    say("3. inspect:")
    say(store_table(inspect_store(store)), f"fdcache inspect {store}")
    v = verify_store(store)
    say(f"4. verify: ok, {v['shards_checked']} shards checksummed", f"fdcache verify {store}")
    student = root / "student"
    r = train(TrainConfig(out=str(student), cache=store, student="fd-tiny", steps=20, batch_size=8,
                          warmup_steps=2, base_lr=0.01, progress=False, check_data=True, overwrite=True))
    say(f"5. train: {r.steps} steps of fd-tiny on the cache, loss {r.losses[0]:.4f} -> {r.losses[-1]:.4f}, "
        f"{r.images_per_s:.0f} img/s -> {r.export}",
        f"fdcache train --cache {store} --student fd-tiny --steps 20 --batch-size 8 --warmup-steps 2 "
        f"--lr 0.01 --out {student}")
    small = dict(data=str(data), val=[str(data)], steps=12, batch_size=8, lr_batch=8, warmup_steps=2,
                 log_every=1, workers=0, progress=False, overwrite=True)
    ft = root / "finetune"
    r = finetune(make_config("fd-finetune-vit-b16", mode="finetune", out=str(ft), student_run=str(student),
                             base_lr=1e-3, **small))
    say(f"6. finetune (FD recipe, mixup/cutmix, layer decay): {r.steps} steps, loss {r.losses[0]:.3f} -> "
        f"{r.losses[-1]:.3f} -> {r.export}",
        f"fdcache finetune --preset fd-finetune-vit-b16 --student-run {student} --data {data} --val {data} "
        f"--steps 12 --batch-size 8 --lr 1e-3 --lr-batch 8 --warmup-steps 2 --workers 0 --out {ft}")
    m, spec, weights = load_export(ft)
    res = evaluate(m, spec, [str(data)], workers=0)
    say(f"7. eval ({weights}): top-1 {100 * res['images']['top1']:.1f}% of {res['images']['n']} images "
        "(random-init teacher: the path, not the accuracy, is the point)",
        f"fdcache eval --run {ft} --data {data} --workers 0")
    fl = root / "flyp"
    r = finetune(make_config("flyp-imagenet", mode="flyp", out=str(fl), model=TINY_TEACHER, random_init=True,
                             classnames="folder", base_lr=1e-4, **small))
    say(f"8. flyp (CLIP loss on class-name prompts, both towers): {r.steps} steps, loss {r.losses[0]:.3f} -> "
        f"{r.losses[-1]:.3f} -> {r.export}",
        f"fdcache flyp --model {TINY_TEACHER} --random-init --classnames folder --data {data} --val {data} "
        f"--steps 12 --batch-size 8 --lr 1e-4 --lr-batch 8 --warmup-steps 2 --workers 0 --out {fl}")
    alphas = [0.0, 0.5, 1.0]
    tops = []
    for p in wise(fl / "init", fl, alphas, root / "wise"):
        m, spec, _ = load_export(p)
        tops.append(100 * evaluate(m, spec, [str(data)], workers=0)["images"]["top1"])
    say("9. wise: " + ", ".join(f"alpha {a:.1f} top-1 {t:.1f}%" for a, t in zip(alphas, tops)),
        f"fdcache wise --zeroshot {fl / 'init'} --finetuned {fl} --alpha 0 --alpha 0.5 --alpha 1 "
        f"--out {root / 'wise'} --data {data} --workers 0")
    say(f"done in {time.perf_counter() - t0:.1f}s; everything is under {root}")
    return root
