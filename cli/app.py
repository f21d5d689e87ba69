"""``fdcache`` commands. Each parses its options, calls one library function and prints;
library errors (:class:`fdcache.errors.FdcacheError`) become a message and an exit code."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from fdcache.config import TrainConfig, option_default
from fdcache.errors import FdcacheError, Interrupted

app = typer.Typer(
    name="fdcache", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Cache a CLIP teacher's feature maps once; train feature-distillation students fast.")
out = Console()
err = Console(stderr=True)


def _fail(e: FdcacheError) -> None:
    label = "[bold yellow]stopped:[/]" if isinstance(e, Interrupted) else "[bold red]error:[/]"
    err.print(f"{label} {e}", highlight=False, soft_wrap=True)
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


def _is_main() -> bool:
    """Rank 0 prints (the process group is already joined by the command's library call)."""
    from fdcache import distributed

    return distributed.init().is_main


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
    codec: str = typer.Option("fp16", help="Target codec: fp16 (lossless vs the teacher) or int8 (per-token scale/offset)."),
    compressor: str = typer.Option("zstd", help="Lossless compressor under the codec: zstd or none."),
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
                        overwrite=overwrite, num_threads=threads, device=device)
    r = run(cfg)
    if _is_main():
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


T = functools.partial(option_default, TrainConfig)


@app.command()
@handles_errors
def train(
    out_: Path = typer.Option(..., "--out", "-o", help="Run directory: log.jsonl, checkpoints/, student.safetensors."),
    cache: Optional[str] = typer.Option(None, help="Store made by fdcache extract (offline distillation)."),
    data: Optional[Path] = typer.Option(None, help="Image folder (default for --cache: the one recorded in the store)."),
    online: bool = typer.Option(T("online"), "--online", help="Run the teacher in the loop instead of reading a store (baseline)."),
    teacher: Optional[str] = typer.Option(None, help="--online: teacher, as for extract."),
    pretrained: Optional[str] = typer.Option(None, help="--online: teacher weights tag or path."),
    random_init: bool = typer.Option(T("random_init"), "--random-init", help="--online: seeded random teacher."),
    init_seed: int = typer.Option(T("init_seed"), help="--online: seed of --random-init teacher weights."),
    student: str = typer.Option(T("student"), help="timm ViT name (FD's ViT-B/16 = beit_base_patch16_224 with shared rel-pos bias), or fd-tiny / fd-small."),
    student_arg: list[str] = typer.Option([], help="timm option for the student, key=value (repeatable), e.g. depth=6."),
    resolution: Optional[int] = typer.Option(None, help="Student input size (default: the teacher's)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (epoch e replays the store's seed e mod S)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (instead of --epochs)."),
    batch_size: int = typer.Option(T("batch_size"), help="Images per rank per micro-batch."),
    accum_steps: int = typer.Option(T("accum_steps"), help="Micro-batches per optimizer step."),
    lr: float = typer.Option(T("base_lr"), help="Base lr per 512 images of total batch (scaled linearly)."),
    warmup_epochs: float = typer.Option(T("warmup_epochs"), help="Warmup from 5e-7 (scaled), in epochs."),
    warmup_steps: Optional[int] = typer.Option(None, help="Warmup in steps (overrides --warmup-epochs)."),
    weight_decay: float = typer.Option(T("weight_decay")),
    clip_grad: float = typer.Option(T("clip_grad"), help="Gradient-norm clip (0: off)."),
    drop_path: float = typer.Option(T("drop_path")),
    layer_scale: float = typer.Option(T("layer_scale")),
    ema_decay: Optional[float] = typer.Option(None, help="Keep an EMA of the weights (timm ModelEmaV3)."),
    loss_impl: str = typer.Option(T("loss_impl"), help="auto (Triton on CUDA) | triton | torch."),
    amp: str = typer.Option(T("amp"), help="auto (bf16 on CUDA) | bf16 | fp16 | none."),
    compile_: bool = typer.Option(T("compile"), "--compile", help="torch.compile the student."),
    resize_targets: bool = typer.Option(T("resize_targets"), help="Resample the teacher's token grid to the student's."),
    allow_partial: bool = typer.Option(T("allow_partial"), help="Train on the completed shards of an unfinished store."),
    resume: bool = typer.Option(T("resume"), "--resume", help="Continue the run in --out from checkpoints/last.pt."),
    overwrite: bool = typer.Option(T("overwrite"), "--overwrite", help="Replace the run in --out (removes only fdcache's files there)."),
    save_every: int = typer.Option(T("save_every"), help="Checkpoint every N steps (and at the end, or on Ctrl-C)."),
    run_steps: Optional[int] = typer.Option(None, help="Stop this invocation after N steps (checkpointed; --resume continues)."),
    log_every: Optional[int] = typer.Option(None, help="Log (and check the loss is finite) every N steps (default: 1 on CPU, 10 on CUDA)."),
    tensorboard: bool = typer.Option(T("tensorboard"), help="Also write TensorBoard scalars to OUT/tb."),
    seed: int = typer.Option(T("seed"), help="Run seed: student init and sample order."),
    threads: int = typer.Option(T("num_threads"), help="DALI threads."),
    loader_workers: int = typer.Option(T("loader_workers"), help="DALI parallel external-source worker processes (0: in-process)."),
    device: str = typer.Option(T("device")),
):
    """Distill a student from a store (offline) or from the teacher in the loop (--online).

    Ctrl-C (or SIGTERM) stops after the current step with a checkpoint and prints the
    command that resumes. Multi-GPU: `torchrun --nproc-per-node N -m fdcache train ...` (DDP)."""
    from fdcache.train import train as run

    cfg = TrainConfig(
        out=str(out_), data=str(data) if data else None, cache=cache, online=online, teacher=teacher,
        pretrained=pretrained, random_init=random_init, init_seed=init_seed, student=student,
        student_overrides=_overrides(student_arg), resolution=resolution, drop_path=drop_path,
        layer_scale=layer_scale or None, epochs=epochs, steps=steps, batch_size=batch_size,
        accum_steps=accum_steps, base_lr=lr, warmup_epochs=warmup_epochs, warmup_steps=warmup_steps,
        weight_decay=weight_decay, clip_grad=clip_grad or None, ema_decay=ema_decay, loss_impl=loss_impl,
        amp=amp, compile=compile_, seed=seed, resize_targets=resize_targets, allow_partial=allow_partial,
        resume=resume, overwrite=overwrite, save_every=save_every, run_steps=run_steps, log_every=log_every,
        tensorboard=tensorboard, num_threads=threads, loader_workers=loader_workers, device=device)
    r = run(cfg)
    if _is_main():
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
    from fdcache.tables import bench_table

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
    out.print(bench_table(r, MODES))
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
    from fdcache.tables import store_table

    r = inspect_store(store)
    if as_json:
        print(json.dumps(r, indent=2))
        return
    out.print(store_table(r))


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
        overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace the run in --out (removes only fdcache's files there)."),
        save_every: Optional[int] = typer.Option(None, help="Checkpoint every N steps (and at the end)."),
        run_steps: Optional[int] = typer.Option(None, help="Stop this invocation after N steps (checkpointed; --resume continues)."),
        log_every: Optional[int] = typer.Option(None, help="Log every N steps (default: 1 on CPU, 10 on CUDA)."),
        workers: Optional[int] = typer.Option(None, help="DataLoader worker processes."),
        device: Optional[str] = typer.Option(None, help="auto | cuda | cpu."),
    ):
        from fdcache.finetune import finetune as run, make_config
        from fdcache.tables import evals_table

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
            compile=compile_, seed=seed, resume=resume, overwrite=overwrite, save_every=save_every,
            run_steps=run_steps, log_every=log_every, workers=workers, device=device)
        r = run(cfg)
        if _is_main():
            last = f"{r.losses[-1]:.4f}" if r.losses else "-"
            out.print(f"{mode}: {r.steps} step(s); last loss {last}; {r.images_per_s:,.1f} img/s"
                      + (f"; model {r.export}" if r.export else f"; checkpoint in {r.out}/checkpoints"))
            if r.evals:
                out.print(evals_table(r.evals[-1]["eval"]))

    command.__doc__ = doc
    return handles_errors(command)


app.command("finetune")(_tune_command("finetune", "ft-clip-vit-b16", """Supervised fine-tuning with the FT-CLIP recipe (layer-wise lr decay, EMA, cosine).

    Start from a CLIP image tower (--model ViT-B-16 --pretrained openai), a timm ViT
    (--model timm:<name>), or a distilled student (--student TRAIN_OUT). Every ingredient is a
    flag; --preset picks the paper's values. Multi-GPU: torchrun --nproc-per-node N -m fdcache finetune ..."""))
app.command("flyp")(_tune_command("flyp", "flyp-imagenet", """FLYP: contrastive fine-tuning with class-name prompts (both towers, CLIP loss).

    Evaluates through a zero-shot head rebuilt from the fine-tuned text tower and writes
    OUT/init (the starting model) for `fdcache wise`."""))


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
    from fdcache.evaluate import evaluate_run
    from fdcache.tables import evals_table

    report = evaluate_run([str(p) for p in data], run=str(run) if run else None, model=model, pretrained=pretrained,
                          random_init=random_init, resolution=resolution, templates=templates,
                          classnames=classnames, ema=ema, crop_pct=crop_pct, batch_size=batch_size,
                          workers=workers, amp=amp, device=device, progress=True)
    if report is None:  # not rank 0
        return
    out.print(evals_table({report["weights"]: report["results"]}))
    if "shift_mean" in report:
        m = report["shift_mean"]
        out.print(f"mean over the {len(report['results']) - 1} set(s) after the first: top-1 "
                  f"{100 * m['top1']:.2f}, top-5 {100 * m['top5']:.2f}")
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
    from fdcache.tables import evals_table
    from fdcache.wise import sweep

    rows = sweep(zeroshot, finetuned, alpha, out_, ema=ema, data=[str(x) for x in data], classnames=classnames,
                 batch_size=batch_size, workers=workers, device=device, progress=True)
    for a, p, _ in rows:
        out.print(f"alpha {a:.2f} -> {p}")
    results = {f"alpha={a:.2f}": r for a, _, r in rows if r is not None}
    if results:
        out.print(evals_table(results))
        if json_out:
            json_out.write_text(json.dumps(results, indent=2))


@app.command()
@handles_errors
def quickstart(workdir: Optional[Path] = typer.Option(None, help="Where to put images, store and runs (default: a temp dir)."),
               images: int = typer.Option(24, help="Synthetic images to generate.")):
    """The whole path in miniature on CPU (a minute or two): make images, extract with a tiny
    random teacher, inspect, verify, distill a tiny student, fine-tune it and evaluate; then
    FLYP on the tiny CLIP and a WiSE-FT sweep. Each step prints the command it equals."""
    from fdcache.quickstart import quickstart as run

    def say(step, same_as: str | None = None) -> None:
        out.print(step, highlight=False)
        if same_as:
            out.print(f"   (same as: {same_as})", style="dim", highlight=False)

    run(workdir, images, say)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
