"""``fdcache`` commands. Each parses its options, calls one library function and prints;
library errors (:class:`fdcache.errors.FdcacheError`) become a message and an exit code."""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from fdcache.errors import FdcacheError, VerifyError

app = typer.Typer(
    name="fdcache", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Cache a CLIP teacher's feature maps once; train feature-distillation students fast.")
out = Console()
err = Console(stderr=True)


def _fail(e: FdcacheError) -> None:
    err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
    for p in getattr(e, "problems", []):
        err.print(f"  - {p}", highlight=False, soft_wrap=True)
    raise typer.Exit(e.exit_code)


def handles_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FdcacheError as e:
            _fail(e)
    return wrapper


@app.command()
@handles_errors
def extract(
    data: Path = typer.Argument(..., help="Image folder (ImageFolder layout root/<class>/<image>)."),
    out_: str = typer.Option(..., "--out", "-o", help="Store path or fsspec URL (Zarr v3 group)."),
    teacher: str = typer.Option(..., help="open_clip name (ViT-B-16), openclip:<name> or timm:<name>."),
    pretrained: Optional[str] = typer.Option(None, help="open_clip/timm weight tag (openai) or a local checkpoint path."),
    random_init: bool = typer.Option(False, "--random-init", help="Seeded random teacher (tests, benchmarks)."),
    init_seed: int = typer.Option(0, help="Seed of --random-init weights (recorded in the store)."),
    seeds: int = typer.Option(1, help="Augmentation seeds (views per image); raise later to append."),
    resolution: Optional[int] = typer.Option(None, help="Teacher input size (default: the model's)."),
    codec: str = typer.Option("fp16", help="Target codec: fp16 (lossless vs the teacher), int8 (per-token scale/offset), int4, int4-dither."),
    compressor: str = typer.Option("none", help="Lossless compressor under the codec: none or zstd (saves 6-8%, reads 3-6x slower)."),
    batch_size: int = typer.Option(64, help="Teacher batch size."),
    shard_size: int = typer.Option(128, help="Samples per shard (the unit of writing and resuming)."),
    global_seed: int = typer.Option(0, help="Seed of the view generator."),
    views: str = typer.Option("rrc", help="View policy: rrc (RandomResizedCrop 0.08-1 + flip, as FD) or full."),
    file_list: Optional[Path] = typer.Option(None, help="Text file of 'relative/path [label]' lines under DATA instead of an ImageFolder."),
    skip_bad: bool = typer.Option(False, help="Record unreadable images as skipped instead of stopping."),
    overwrite: bool = typer.Option(False, help="Replace an existing store made differently."),
    threads: int = typer.Option(4, help="DALI decoder threads."),
    device: str = typer.Option("auto", help="auto | cuda | cpu."),
):
    """Run the teacher on recorded crop views of every image and store its feature maps.

    Resumable (re-run the same command), appendable (raise --seeds), and sharded over
    processes with `torchrun --nproc-per-node N -m fdcache extract ...`.
    """
    from fdcache.codecs import CodecSpec
    from fdcache.extract import ExtractConfig, extract as run
    from fdcache.views import ViewPolicy

    cfg = ExtractConfig(data=str(data), out=out_, teacher=teacher, pretrained=pretrained,
                        random_init=random_init, init_seed=init_seed, resolution=resolution,
                        seeds=seeds, codec=_spec(CodecSpec, name=codec, compressor=compressor),
                        policy=_spec(ViewPolicy, kind=views), batch_size=batch_size,
                        shard_size=shard_size, global_seed=global_seed,
                        file_list=str(file_list) if file_list else None, skip_bad=skip_bad,
                        overwrite=overwrite, num_threads=threads, device=device,
                        progress=sys.stderr.isatty())
    r = run(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        out.print(f"extracted {r.samples} sample-views in {r.shards} shard(s) "
                  f"({r.already_done} shard(s) already done) in {r.seconds:.1f}s, "
                  f"{r.images_per_s:.1f} img/s -> {r.store}")
        if r.skipped:
            err.print(f"[yellow]skipped {len(r.skipped)} unreadable image(s)[/] (recorded in the store): "
                      + ", ".join(r.skipped[:10]))


def _spec(cls, **kw):
    try:
        return cls(**kw)
    except ValueError as e:
        raise typer.BadParameter(str(e))


def _overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--student-arg wants key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@app.command()
@handles_errors
def train(
    out_: Path = typer.Option(..., "--out", "-o", help="Run directory: log.jsonl, checkpoints/, student.safetensors."),
    cache: Optional[str] = typer.Option(None, help="Store made by fdcache extract (offline distillation)."),
    data: Optional[Path] = typer.Option(None, help="Image folder (default for --cache: the one recorded in the store)."),
    online: bool = typer.Option(False, "--online", help="Run the teacher in the loop instead of reading a store (baseline)."),
    teacher: Optional[str] = typer.Option(None, help="--online: teacher, as for extract."),
    pretrained: Optional[str] = typer.Option(None, help="--online: teacher weights tag or path."),
    random_init: bool = typer.Option(False, "--random-init", help="--online: seeded random teacher."),
    init_seed: int = typer.Option(0, help="--online: seed of --random-init teacher weights."),
    student: str = typer.Option("beit_base_patch16_224", help="timm ViT name (FD's ViT-B/16 = beit_base_patch16_224 with shared rel-pos bias), or fd-tiny / fd-small."),
    student_arg: list[str] = typer.Option([], help="timm option for the student, key=value (repeatable), e.g. depth=6."),
    resolution: Optional[int] = typer.Option(None, help="Student input size (default: the teacher's)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (epoch e replays the store's seed e mod S)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (instead of --epochs)."),
    batch_size: int = typer.Option(128, help="Images per rank per micro-batch."),
    accum_steps: int = typer.Option(1, help="Micro-batches per optimizer step."),
    lr: float = typer.Option(3e-4, help="Base lr per 512 images of total batch (scaled linearly)."),
    warmup_epochs: float = typer.Option(10.0, help="Warmup from 5e-7 (scaled), in epochs."),
    warmup_steps: Optional[int] = typer.Option(None, help="Warmup in steps (overrides --warmup-epochs)."),
    weight_decay: float = typer.Option(0.05),
    clip_grad: float = typer.Option(3.0, help="Gradient-norm clip (0: off)."),
    drop_path: float = typer.Option(0.2),
    layer_scale: float = typer.Option(0.1),
    ema_decay: Optional[float] = typer.Option(None, help="Keep an EMA of the weights (timm ModelEmaV3)."),
    loss_impl: str = typer.Option("auto", help="auto (Triton on CUDA) | triton | torch."),
    amp: str = typer.Option("auto", help="auto (bf16 on CUDA) | bf16 | fp16 | none."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the student."),
    resize_targets: bool = typer.Option(False, help="Resample the teacher's token grid to the student's."),
    allow_partial: bool = typer.Option(False, help="Train on the completed shards of an unfinished store."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from checkpoints/last.pt."),
    save_every: int = typer.Option(1000, help="Checkpoint every N steps (and at the end)."),
    run_steps: Optional[int] = typer.Option(None, help="Stop this invocation after N steps (checkpointed; --resume continues)."),
    log_every: int = typer.Option(1, help="Log (and check the loss is finite) every N steps."),
    tensorboard: bool = typer.Option(False, help="Also write TensorBoard scalars to OUT/tb."),
    seed: int = typer.Option(0, help="Run seed: student init and sample order."),
    threads: int = typer.Option(4, help="DALI threads."),
    loader_workers: int = typer.Option(0, help="DALI parallel external-source worker processes (0: in-process)."),
    device: str = typer.Option("auto"),
):
    """Distill a student from a store (offline) or from the teacher in the loop (--online).

    Multi-GPU: `torchrun --nproc-per-node N -m fdcache train ...` (DDP)."""
    from fdcache.train import TrainConfig, train as run

    cfg = TrainConfig(
        out=str(out_), data=str(data) if data else None, cache=cache, online=online, teacher=teacher,
        pretrained=pretrained, random_init=random_init, init_seed=init_seed, student=student,
        student_overrides=_overrides(student_arg), resolution=resolution, drop_path=drop_path,
        layer_scale=layer_scale or None, epochs=epochs, steps=steps, batch_size=batch_size,
        accum_steps=accum_steps, base_lr=lr, warmup_epochs=warmup_epochs, warmup_steps=warmup_steps,
        weight_decay=weight_decay, clip_grad=clip_grad or None, ema_decay=ema_decay, loss_impl=loss_impl,
        amp=amp, compile=compile_, seed=seed, resize_targets=resize_targets, allow_partial=allow_partial,
        resume=resume, save_every=save_every, run_steps=run_steps, log_every=log_every,
        tensorboard=tensorboard, num_threads=threads, loader_workers=loader_workers, device=device,
        progress=sys.stderr.isatty())
    r = run(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        last = f"{r.losses[-1]:.4f}" if r.losses else "-"
        out.print(f"trained {r.steps} step(s); last loss {last}; {r.images_per_s:,.1f} img/s; "
                  f"data wait {100 * r.data_wait_fraction:.0f}%; checkpoint {r.checkpoint}"
                  + (f"; student {r.export}" if r.export else ""))


@app.command()
@handles_errors
def bench(
    student: str = typer.Option(..., help="Student (as for train), e.g. beit_base_patch16_224 or fd-tiny."),
    teacher: str = typer.Option(..., help="Teacher (as for extract)."),
    pretrained: Optional[str] = typer.Option(None, help="Teacher weights tag or path."),
    random_init: bool = typer.Option(False, "--random-init", help="Seeded random teacher."),
    resolution: Optional[int] = typer.Option(None, help="Input size for both models (default: the teacher's)."),
    batch_size: int = typer.Option(32),
    steps: int = typer.Option(10, help="Timed steps per mode and repeat."),
    warmup: int = typer.Option(2, help="Untimed steps before each measurement."),
    repeats: int = typer.Option(3, help="Interleaved repeats (median and spread are reported)."),
    cache: Optional[str] = typer.Option(None, help="Use this store for offline mode instead of building one."),
    data: Optional[Path] = typer.Option(None, help="Image folder (default: synthetic images)."),
    student_arg: list[str] = typer.Option([], help="timm option for the student, key=value (repeatable)."),
    codec: str = typer.Option("fp16", help="Codec of the store built for offline mode."),
    loss_impl: str = typer.Option("auto"),
    amp: str = typer.Option("auto"),
    threads: int = typer.Option(4, help="DALI threads."),
    loader_workers: int = typer.Option(0, help="DALI parallel external-source workers."),
    modes: str = typer.Option(",".join(("ceiling", "offline", "online", "teacher", "extract")),
                              help="Comma-separated subset of ceiling,offline,online,teacher,extract."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write every figure as JSON here."),
    plot_out: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG bar chart here (needs matplotlib)."),
):
    """Throughput of offline vs online distillation vs the synthetic ceiling (interleaved)."""
    from fdcache.bench import MODES, BenchConfig, plot, run_bench

    chosen = tuple(m.strip() for m in modes.split(",") if m.strip())
    unknown = set(chosen) - set(MODES)
    if unknown:
        raise typer.BadParameter(f"unknown mode(s) {sorted(unknown)}; choose from {MODES}")
    cfg = BenchConfig(student=student, teacher=teacher, pretrained=pretrained, random_init=random_init,
                      resolution=resolution, batch_size=batch_size, steps=steps, warmup=warmup,
                      repeats=repeats, cache=cache, data=str(data) if data else None,
                      student_overrides=_overrides(student_arg), codec=codec, loss_impl=loss_impl, amp=amp,
                      threads=threads, loader_workers=loader_workers, modes=chosen)
    r = run_bench(cfg, log=lambda m: err.print(m, highlight=False))
    env = r["environment"]
    table = Table(title=f"fdcache bench: {env['student']} <- {env['teacher']}, batch {env['batch_size']}, "
                        f"{env['device']}")
    for col in ("mode", "img/s (median)", "min..max", "data wait", "peak MiB"):
        table.add_column(col, justify="right")
    for m in MODES:
        if m in r:
            v = r[m]
            table.add_row(m, f"{v['images_per_s']:,.1f}", f"{v['min']:,.1f}..{v['max']:,.1f}",
                          "-" if v["data_wait_fraction"] is None else f"{100 * v['data_wait_fraction']:.0f}%",
                          "-" if v["peak_memory_MiB"] is None else f"{v['peak_memory_MiB']:,.0f}")
    out.print(table)
    for k, v in r["ratios"].items():
        out.print(f"{k}: {'-' if v is None else f'{v:.3f}'}")
    for note in r["diagnosis"]:
        out.print(f"[yellow]held back:[/] {note}", highlight=False)
    if json_out:
        json_out.write_text(json.dumps(r, indent=2))
    if plot_out:
        plot(r, str(plot_out))


@app.command("inspect")
@handles_errors
def inspect_(store: str = typer.Argument(..., help="Store path or URL."),
             as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """Teacher, shapes, codec, bytes per sample-view, compression ratio, completeness."""
    from fdcache.inspection import inspect_store

    r = inspect_store(store)
    if as_json:
        print(json.dumps(r, indent=2))
        return
    t = r["teacher"]
    table = Table(title=f"fdcache store {store}", show_header=False)
    table.add_row("teacher", t["label"])
    table.add_row("feature map", f"{t['tokens']} tokens ({t['prefix_tokens']} prefix) x {t['dim']} dims, "
                  f"patch {t['patch']}, {t['layer']} layer, post-norm={t['post_norm']}")
    table.add_row("weights sha256", t["weights_sha256"][:16] + "...")
    table.add_row("shape [S, N, L, D]", str(list(r["shape"].values())))
    table.add_row("view policy", json.dumps(r["view_policy"]))
    table.add_row("codec", json.dumps(r["codec"]))
    table.add_row("arrays", ", ".join(f"{k} {v['dtype']} {v['per_sample_shape']}" for k, v in r["arrays"].items()))
    table.add_row("bytes / sample-view", f"{r['bytes_per_sample_view']:,.0f} (raw fp16 "
                  f"{r['raw_fp16_bytes_per_sample_view']:,}; ratio "
                  f"{r['compression_ratio'] or 0:.2f}x)")
    table.add_row("stored", f"{r['bytes_stored'] / 1e6:,.2f} MB")
    for c in r["completeness"]:
        table.add_row(f"seed {c['seed']}", f"{c['shards_done']}/{c['shards']} shards, "
                      f"{c['samples_done']} samples, {c['skipped']} skipped")
    out.print(table)


@app.command()
@handles_errors
def verify(store: str = typer.Argument(..., help="Store path or URL."),
           data: Optional[Path] = typer.Option(None, help="Image folder, if moved since extraction."),
           no_files: bool = typer.Option(False, help="Skip the image-folder check.")):
    """Read and checksum every chunk, check completeness and that the images still match.

    Exit 0 when the store is whole, 1 naming each problem otherwise."""
    from fdcache.inspection import verify_store

    r = verify_store(store, data=data, check_files=not no_files)
    out.print(f"[green]ok[/]: {r['shards_checked']} shard(s) of {r['seeds']} seed(s) x "
              f"{r['samples']} samples checksummed; {r['files_checked']} image file(s) unchanged")


def _tune_command(mode: str, default_preset: str, doc: str):
    """``finetune`` and ``flyp`` share their options; a preset fills what is not given."""

    def command(
        out_: Path = typer.Option(..., "--out", "-o", help="Run directory: log.jsonl, checkpoints/, model.safetensors (+ model_ema), init/."),
        data: Path = typer.Option(..., help="Training image folder (root/<class>/<image>)."),
        val: list[Path] = typer.Option([], help="Eval image folder, after each epoch and at the end (repeatable: a val set and its shifts)."),
        preset: str = typer.Option(default_preset, help="Recipe: ft-clip-vit-b16, ft-clip-vit-l14, fd-finetune-vit-b16, flyp-imagenet (fdcache/presets/*.json); flags override it."),
        model: Optional[str] = typer.Option(None, help="open_clip name (ViT-B-16) or timm:<name> (finetune only)."),
        pretrained: Optional[str] = typer.Option(None, help="Weight tag (openai) or local checkpoint path."),
        random_init: Optional[bool] = typer.Option(None, "--random-init", help="Seeded random weights (tests, smoke runs)."),
        init_seed: Optional[int] = typer.Option(None, help="Seed of --random-init weights."),
        student: Optional[Path] = typer.Option(None, help="finetune: an fdcache train --out directory (student.safetensors) instead of --model."),
        resolution: Optional[int] = typer.Option(None, help="Input size (default: the model's / the preset's)."),
        classnames: Optional[str] = typer.Option(None, help="Class names for prompts and matching: folder, imagenet, or a JSON/text file."),
        templates: Optional[str] = typer.Option(None, help="Prompt templates: openai (80) or simple (open_clip's)."),
        head: Optional[str] = typer.Option(None, help="finetune: fresh (FT-CLIP, mean-pooled tokens) or zeroshot (head from the text tower; writes init/ for WiSE-FT)."),
        epochs: Optional[int] = typer.Option(None, help="Epochs."),
        steps: Optional[int] = typer.Option(None, help="Optimizer steps (instead of --epochs)."),
        batch_size: Optional[int] = typer.Option(None, help="Images per rank per micro-batch."),
        accum_steps: Optional[int] = typer.Option(None, help="Micro-batches per optimizer step."),
        lr: Optional[float] = typer.Option(None, help="Peak lr per --lr-batch images of total batch (scaled linearly)."),
        lr_batch: Optional[int] = typer.Option(None, help="Total batch at which --lr is given."),
        warmup_epochs: Optional[float] = typer.Option(None, help="Linear warmup, in epochs."),
        warmup_steps: Optional[int] = typer.Option(None, help="Linear warmup, in steps (overrides --warmup-epochs)."),
        warmup_lr: Optional[float] = typer.Option(None, help="lr at the start of warmup (scaled like --lr)."),
        min_lr: Optional[float] = typer.Option(None, help="lr at the end of the cosine (scaled like --lr)."),
        weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay (not on biases, norms, embeddings)."),
        layer_decay: Optional[float] = typer.Option(None, help="finetune: layer-wise lr decay (timm's groups); 1 turns it off."),
        drop_path: Optional[float] = typer.Option(None, help="Stochastic depth (timm models and students)."),
        clip_grad: Optional[float] = typer.Option(None, help="Gradient-norm clip; 0 turns it off."),
        ema_decay: Optional[float] = typer.Option(None, help="EMA of the weights (timm ModelEmaV3); 0 turns it off."),
        label_smoothing: Optional[float] = typer.Option(None, help="finetune: label smoothing."),
        mixup: Optional[float] = typer.Option(None, help="finetune: mixup alpha (timm); 0 is off."),
        cutmix: Optional[float] = typer.Option(None, help="finetune: cutmix alpha (timm); 0 is off."),
        auto_augment: Optional[str] = typer.Option(None, help="finetune: timm RandAugment policy (rand-m9-mstd0.5-inc1) or none."),
        reprob: Optional[float] = typer.Option(None, help="finetune: random-erasing probability."),
        crop_pct: Optional[float] = typer.Option(None, help="Evaluation centre-crop fraction (1.0: CLIP's; 0.875: BEiT/FT-CLIP)."),
        freeze_patch_embed: Optional[bool] = typer.Option(None, "--freeze-patch-embed/--train-patch-embed", help="Freeze the patch embedding (FT-CLIP at 224)."),
        amp: Optional[str] = typer.Option(None, help="auto (bf16 on CUDA) | bf16 | fp16 | none."),
        compile_: Optional[bool] = typer.Option(None, "--compile", help="torch.compile the model."),
        seed: Optional[int] = typer.Option(None, help="Run seed: sample order, augmentation, drop path."),
        resume: Optional[bool] = typer.Option(None, "--resume", help="Continue the run in --out from checkpoints/last.pt."),
        save_every: Optional[int] = typer.Option(None, help="Checkpoint every N steps (and at the end)."),
        run_steps: Optional[int] = typer.Option(None, help="Stop this invocation after N steps (checkpointed; --resume continues)."),
        log_every: Optional[int] = typer.Option(None, help="Log every N steps."),
        workers: Optional[int] = typer.Option(None, help="DataLoader worker processes."),
        device: Optional[str] = typer.Option(None, help="auto | cuda | cpu."),
    ):
        from fdcache.finetune import finetune as run, make_config

        cfg = make_config(
            preset or None, mode=mode, out=str(out_), data=str(data), val=[str(v) for v in val] or None,
            model=model, pretrained=pretrained, random_init=random_init, init_seed=init_seed,
            student=str(student) if student else None, resolution=resolution, classnames=classnames,
            templates=templates, head=head, epochs=epochs, steps=steps, batch_size=batch_size,
            accum_steps=accum_steps, base_lr=lr, lr_batch=lr_batch, warmup_epochs=warmup_epochs,
            warmup_steps=warmup_steps, warmup_lr=warmup_lr, min_lr=min_lr, weight_decay=weight_decay,
            layer_decay=layer_decay, drop_path=drop_path, clip_grad=clip_grad, ema_decay=ema_decay,
            label_smoothing=label_smoothing, mixup=mixup, cutmix=cutmix, auto_augment=auto_augment,
            re_prob=reprob, crop_pct=crop_pct, freeze_patch_embed=freeze_patch_embed, amp=amp,
            compile=compile_, seed=seed, resume=resume, save_every=save_every, run_steps=run_steps,
            log_every=log_every, workers=workers, device=device, progress=sys.stderr.isatty())
        r = run(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            last = f"{r.losses[-1]:.4f}" if r.losses else "-"
            out.print(f"{mode}: {r.steps} step(s); last loss {last}; {r.images_per_s:,.1f} img/s"
                      + (f"; model {r.export}" if r.export else f"; checkpoint in {r.out}/checkpoints"))
            if r.evals:
                _print_evals(r.evals[-1]["eval"])

    command.__doc__ = doc
    return handles_errors(command)


app.command("finetune")(_tune_command("finetune", "ft-clip-vit-b16", """Supervised fine-tuning with the FT-CLIP recipe (layer-wise lr decay, EMA, cosine).

    Start from a CLIP image tower (--model ViT-B-16 --pretrained openai), a timm ViT
    (--model timm:<name>), or a distilled student (--student TRAIN_OUT). Every ingredient is a
    flag; --preset picks the paper's values. Multi-GPU: torchrun --nproc-per-node N -m fdcache finetune ..."""))
app.command("flyp")(_tune_command("flyp", "flyp-imagenet", """FLYP: contrastive fine-tuning with class-name prompts (both towers, CLIP loss).

    Evaluates through a zero-shot head rebuilt from the fine-tuned text tower and writes
    OUT/init (the starting model) for `fdcache wise`."""))


def _print_evals(evals: dict) -> None:
    table = Table(title="evaluation")
    for col in ("weights", "set", "images", "top-1", "top-5"):
        table.add_column(col, justify="right")
    for which, sets in evals.items():  # {weights: {set: result}}
        for name, r in sets.items():
            table.add_row(which, name, str(r["n"]), f"{100 * r['top1']:.2f}", f"{100 * r['top5']:.2f}")
    out.print(table)


@app.command("eval")
@handles_errors
def eval_(
    data: list[Path] = typer.Option(..., help="Eval image folder (repeatable: a val set and its distribution shifts)."),
    run: Optional[Path] = typer.Option(None, help="Output of fdcache finetune / flyp / wise (holds model.json)."),
    model: Optional[str] = typer.Option(None, help="Or: zero-shot evaluation of an open_clip model (ViT-B-16)."),
    pretrained: Optional[str] = typer.Option(None, help="--model weights: tag (openai) or local path."),
    random_init: bool = typer.Option(False, "--random-init", help="--model with seeded random weights."),
    resolution: Optional[int] = typer.Option(None, help="--model input size."),
    templates: str = typer.Option("openai", help="--model prompt templates: openai or simple."),
    classnames: str = typer.Option("folder", help="Class names: folder, imagenet, or a JSON/text file."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Use model_ema.safetensors when the run kept an EMA."),
    crop_pct: Optional[float] = typer.Option(None, help="Centre-crop fraction (default: the run's)."),
    batch_size: int = typer.Option(128),
    workers: int = typer.Option(4, help="DataLoader worker processes."),
    amp: str = typer.Option("auto"),
    device: str = typer.Option("auto"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON here."),
):
    """Top-1 / top-5 on one or more image folders (classifier head, or zero-shot for CLIP models)."""
    from fdcache import distributed
    from fdcache.classifiers import init_model, load_export
    from fdcache.evaluate import evaluate

    d = distributed.init()
    dev = distributed.device_for(d, device)
    if (run is None) == (model is None):
        raise typer.BadParameter("give --run DIR (a fine-tuned export) or --model NAME (zero-shot)")
    if run is not None:
        m, spec, weights = load_export(run, ema=ema)
    else:
        from fdcache.imagefolder import classnames_for, find_classes

        m, spec = init_model(model=model, pretrained=pretrained, random_init=random_init, student=None, kind="clip",
                             classnames=classnames_for(find_classes(data[0]), classnames), head="zeroshot",
                             templates=templates, resolution=resolution, drop_path=0.0)
        weights = pretrained or "random-init"
    r = evaluate(m.to(dev), spec, [str(p) for p in data], classnames=classnames, crop_pct=crop_pct,
                 batch_size=batch_size, workers=workers, device=dev, amp=amp, dist=d)
    if d.is_main:
        _print_evals({weights: r})
        report = {"model": str(run or model), "weights": weights, "results": r}
        if len(r) > 1:  # FLYP's "avg OOD": the mean over the sets after the first (its shifts)
            shifts = list(r.values())[1:]
            report["shift_mean"] = {k: sum(x[k] for x in shifts) / len(shifts) for k in ("top1", "top5")}
            out.print(f"mean over the {len(shifts)} set(s) after the first: top-1 "
                      f"{100 * report['shift_mean']['top1']:.2f}, top-5 {100 * report['shift_mean']['top5']:.2f}")
        if json_out:
            json_out.write_text(json.dumps(report, indent=2))


@app.command()
@handles_errors
def wise(
    zeroshot: Path = typer.Option(..., help="Zero-shot end: a run's init/ directory (or any export of the same model)."),
    finetuned: Path = typer.Option(..., help="Fine-tuned end: the run's --out directory."),
    alpha: list[float] = typer.Option([0.5], help="Mixing weight of the fine-tuned model (repeatable for a sweep)."),
    out_: Path = typer.Option(..., "--out", "-o", help="Writes OUT/alpha-<a>/ per alpha."),
    data: list[Path] = typer.Option([], help="Evaluate each alpha on these folders too (repeatable)."),
    classnames: str = typer.Option("folder", help="Class names for --data: folder, imagenet, or a file."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Fine-tuned end: EMA weights when kept."),
    batch_size: int = typer.Option(128),
    workers: int = typer.Option(4),
    device: str = typer.Option("auto"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the sweep's results as JSON here."),
):
    """WiSE-FT: (1 - alpha) * zero-shot + alpha * fine-tuned weights, for one alpha or a sweep."""
    from fdcache import distributed
    from fdcache.classifiers import load_export
    from fdcache.evaluate import evaluate
    from fdcache.wise import wise as run

    paths = run(zeroshot, finetuned, alpha, out_, ema=ema)
    results = {}
    for a, p in zip(alpha, paths):
        out.print(f"alpha {a:.2f} -> {p}")
        if data:
            dev = distributed.device_for(distributed.Dist(), device)
            m, spec, _ = load_export(p)
            results[f"alpha={a:.2f}"] = evaluate(m.to(dev), spec, [str(x) for x in data], classnames=classnames,
                                                 batch_size=batch_size, workers=workers, device=dev)
    if results:
        _print_evals(results)
        if json_out:
            json_out.write_text(json.dumps(results, indent=2))


@app.command()
@handles_errors
def quickstart(workdir: Optional[Path] = typer.Option(None, help="Where to put images, store and runs (default: a temp dir)."),
               images: int = typer.Option(24, help="Synthetic images to generate.")):
    """The whole path in miniature on CPU (a minute or two): make images, extract with a tiny
    random teacher, inspect, verify, distill a tiny student, fine-tune it and evaluate; then
    FLYP on the tiny CLIP and a WiSE-FT sweep. Each step prints the command it equals."""
    from fdcache.classifiers import load_export
    from fdcache.evaluate import evaluate
    from fdcache.extract import ExtractConfig, extract as run
    from fdcache.finetune import finetune, make_config
    from fdcache.inspection import verify_store
    from fdcache.samples import make_image_folder
    from fdcache.teachers import TINY_TEACHER
    from fdcache.train import TrainConfig, train as run_train
    from fdcache.wise import wise as run_wise

    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fdcache-quickstart-"))
    data, store = root / "images", str(root / "teacher.zarr")
    for d in ("student", "finetune", "flyp", "wise"):
        shutil.rmtree(root / d, ignore_errors=True)
    t0 = time.perf_counter()

    def say(step: str, same_as: str) -> None:
        out.print(step, highlight=False)
        out.print(f"   (same as: {same_as})", style="dim", highlight=False)

    make_image_folder(data, classes=3, per_class=max(2, images // 3))
    out.print(f"1. made {images} images in 3 classes under {data}")
    r = run(ExtractConfig(data=str(data), out=store, teacher=TINY_TEACHER, random_init=True, seeds=2,
                          batch_size=8, shard_size=8, overwrite=True, progress=False))
    say(f"2. extract: {r.samples} sample-views (2 seeds) from random-init {TINY_TEACHER} in {r.seconds:.1f}s -> {store}",
        f"fdcache extract {data} --out {store} --teacher {TINY_TEACHER} --random-init --seeds 2 "
        "--batch-size 8 --shard-size 8")
    out.print("3. inspect:")
    inspect_(store, as_json=False)
    v = verify_store(store)
    out.print(f"4. verify: ok, {v['shards_checked']} shards checksummed")
    student = root / "student"
    r = run_train(TrainConfig(out=str(student), cache=store, student="fd-tiny", steps=20, batch_size=8,
                              warmup_steps=2, base_lr=0.01, progress=False, check_data=True))
    say(f"5. train: {r.steps} steps of fd-tiny on the cache, loss {r.losses[0]:.4f} -> {r.losses[-1]:.4f}, "
        f"{r.images_per_s:.0f} img/s -> {r.export}",
        f"fdcache train --cache {store} --student fd-tiny --steps 20 --batch-size 8 --warmup-steps 2 "
        f"--lr 0.01 --out {student}")
    small = dict(data=str(data), val=[str(data)], steps=12, batch_size=8, lr_batch=8, warmup_steps=2,
                 log_every=1, workers=0, progress=False)
    ft = root / "finetune"
    r = finetune(make_config("fd-finetune-vit-b16", mode="finetune", out=str(ft), student=str(student),
                             base_lr=1e-3, **small))
    say(f"6. finetune (FD recipe, mixup/cutmix, layer decay): {r.steps} steps, loss {r.losses[0]:.3f} -> "
        f"{r.losses[-1]:.3f} -> {r.export}",
        f"fdcache finetune --preset fd-finetune-vit-b16 --student {student} --data {data} --val {data} "
        "--steps 12 --batch-size 8 --lr 1e-3 --lr-batch 8 --warmup-steps 2 --workers 0 "
        f"--out {ft}")
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
    paths = run_wise(fl / "init", fl, alphas, root / "wise")
    tops = []
    for p in paths:
        m, spec, _ = load_export(p)
        tops.append(100 * evaluate(m, spec, [str(data)], workers=0)["images"]["top1"])
    say("9. wise: " + ", ".join(f"alpha {a:.1f} top-1 {t:.1f}%" for a, t in zip(alphas, tops)),
        f"fdcache wise --zeroshot {fl / 'init'} --finetuned {fl} --alpha 0 --alpha 0.5 --alpha 1 "
        f"--out {root / 'wise'} --data {data} --workers 0")
    out.print(f"done in {time.perf_counter() - t0:.1f}s; everything is under {root}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
