"""``fdcache`` commands. Each parses its options, calls one library function and prints;
library errors (:class:`fdcache.errors.FdcacheError`) become a message and an exit code."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer

from fdcache.cli.common import (JSON_HELP, Amp, Codec, Compressor, Device, FdcacheGroup, LossImpl, Views, err,
                                existing_dir, existing_file, handles_errors, is_main, json_output, out, output_dir,
                                output_file, path_argument, path_option, store_input, store_output, tag_or_file,
                                value_of, write_json)
from fdcache.config import TrainConfig, option_default
from fdcache.options import parse_overrides
from fdcache.errors import ConfigError

__all__ = ["app", "main"]

app = typer.Typer(
    name="fdcache", cls=FdcacheGroup, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Cache a CLIP teacher's feature maps once; train feature-distillation students fast.")


def _version(value: bool) -> None:
    if value:
        from fdcache import __version__

        out.print(f"fdcache {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                        help="Print the version and exit.")) -> None:
    """Cache a CLIP teacher's feature maps once; train feature-distillation students fast."""


@app.command()
@handles_errors
def extract(
    data: Path = path_argument(existing_dir, "DATA", rich_help_panel="Input", help="Image folder (ImageFolder layout root/<class>/<image>)."),
    out_: str = path_option(store_output, ..., "--out", "-o", rich_help_panel="Views and storage", help="Store path or fsspec URL (Zarr v3 group)."),
    teacher: str = typer.Option(..., rich_help_panel="Teacher", help="open_clip name (ViT-B-16), openclip:<name> or timm:<name>."),
    pretrained: Optional[str] = path_option(tag_or_file, None, rich_help_panel="Teacher", help="open_clip/timm weight tag (openai) or a local checkpoint path."),
    random_init: bool = typer.Option(False, "--random-init", rich_help_panel="Teacher", help="Seeded random teacher (tests, benchmarks)."),
    init_seed: int = typer.Option(0, rich_help_panel="Teacher", help="Seed of --random-init weights (recorded in the store)."),
    seeds: Optional[int] = typer.Option(None, rich_help_panel="Views and storage", help="Augmentation seeds (views per image; default 1, with --views-from all of that store's); raise later to append."),
    resolution: Optional[int] = typer.Option(None, rich_help_panel="Teacher", help="Teacher input size (default: the model's)."),
    teacher_arg: list[str] = typer.Option([], metavar="KEY=VALUE", rich_help_panel="Teacher", help="timm option for a timm: teacher, key=value (repeatable; recorded in the store), e.g. window_size=14."),
    codec: Optional[Codec] = typer.Option(None, rich_help_panel="Views and storage", help="Target codec: fp16 (lossless vs the teacher; the default), int8 (per-token scale/offset), int4, int4-dither (4-bit, groups of 32). With --budget: kept, and only --seeds is chosen."),
    budget: Optional[str] = typer.Option(None, rich_help_panel="Views and storage", help="Size of the whole store (1.5TB, 800MB, 512GiB): choose the codec and seed count that fit, print why. --seeds is then the fewest seeds."),
    max_seeds: int = typer.Option(300, rich_help_panel="Views and storage", help="With --budget: the most seeds to store (a run of E epochs reads at most E)."),
    token_fraction: float = typer.Option(1.0, rich_help_panel="Views and storage", help="Fraction of each view's patch tokens to store (CLS always kept; a recorded, seeded subset per view): 0.5 stores twice the views in the same bytes."),
    compressor: Compressor = typer.Option(Compressor.none, rich_help_panel="Views and storage", help="Lossless compressor under the codec: none or zstd (saves 6-8%, reads 3-6x slower)."),
    batch_size: int = typer.Option(64, rich_help_panel="Performance", help="Teacher batch size."),
    shard_size: int = typer.Option(128, rich_help_panel="Views and storage", help="Samples per shard (the unit of writing and resuming)."),
    global_seed: int = typer.Option(0, rich_help_panel="Views and storage", help="Seed of the view generator."),
    views: Views = typer.Option(Views.rrc, rich_help_panel="Views and storage", help="View policy: rrc (RandomResizedCrop 0.08-1 + flip, as FD) or full."),
    views_from: Optional[str] = path_option(store_input, None, rich_help_panel="Views and storage", help="Take this store's manifest and recorded views byte for byte (a second teacher on the same views; train both with --cache A --cache B)."),
    file_list: Optional[Path] = path_option(existing_file, None, rich_help_panel="Input", help="Text file of 'relative/path \\[label]' lines under DATA instead of an ImageFolder."),
    skip_bad: bool = typer.Option(False, rich_help_panel="Input", help="Record unreadable images as skipped instead of stopping."),
    overwrite: bool = typer.Option(False, rich_help_panel="Views and storage", help="Replace an existing fdcache store (never a folder of other files)."),
    threads: int = typer.Option(4, rich_help_panel="Performance", help="DALI decoder threads."),
    device: Device = typer.Option(Device.auto, rich_help_panel="Performance", help="Where the teacher runs."),
):
    """Run the teacher on recorded crop views of every image and store its feature maps.

    Resumable (re-run the same command), appendable (raise --seeds), and sharded over
    processes with `torchrun --nproc-per-node N -m fdcache extract ...`.
    """
    from fdcache.distill.extract import ExtractConfig
    from fdcache.distill.extract import extract as run

    cfg = ExtractConfig(data=str(data), out=out_, teacher=teacher, pretrained=pretrained,
                        random_init=random_init, init_seed=init_seed, resolution=resolution,
                        teacher_args=parse_overrides(teacher_arg, "--teacher-arg"), seeds=seeds,
                        codec=value_of(codec), compressor=value_of(compressor), budget=budget,
                        max_seeds=max_seeds, token_fraction=token_fraction, policy=value_of(views),
                        batch_size=batch_size, shard_size=shard_size, global_seed=global_seed,
                        file_list=str(file_list) if file_list else None, skip_bad=skip_bad,
                        overwrite=overwrite, num_threads=threads, device=value_of(device),
                        progress=sys.stderr.isatty(), views_from=views_from)
    try:
        r = run(cfg, announce=lambda text: err.print(text, highlight=False, soft_wrap=True))
    except KeyboardInterrupt:
        # Each shard is marked done only after its data (the write protocol): what was done is kept.
        err.print(f"interrupted: the shards marked done in {out_} are kept; re-run the same fdcache extract "
                  "command to compute the rest", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    if is_main():
        out.print(f"extracted {r.samples} sample-views in {r.shards} shard(s) "
                  f"({r.already_done} shard(s) already done) in {r.seconds:.1f}s, "
                  f"{r.images_per_s:.1f} img/s -> {r.store}")
        if r.skipped:
            err.print(f"[yellow]skipped {len(r.skipped)} unreadable image(s)[/] (recorded in the store): "
                      + ", ".join(r.skipped[:10]))
        if r.ignored:
            err.print(f"[yellow]not indexed: {len(r.ignored)} file(s)[/] (hidden, not an image extension, "
                      "or an undecodable name): " + "; ".join(r.ignored[:5]), highlight=False)


def _one_or_many(values: list[str]):
    return None if not values else values[0] if len(values) == 1 else list(values)


def _weights(items: list[str]) -> dict:
    out = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        try:
            out[name] = float(value)
        except ValueError:
            name = ""
        if not sep or not name:
            raise typer.BadParameter(f"--teacher-weight wants NAME=WEIGHT (NAME: a --cache or --teacher as given), "
                                     f"got {item!r}")
    return out


T = functools.partial(option_default, TrainConfig)


@app.command()
@handles_errors
def train(
    out_: Path = path_option(output_dir, ..., "--out", "-o", rich_help_panel="Run", help="Run directory: log.jsonl, checkpoints/, config.json + model.safetensors (timm local-dir)."),
    cache: list[str] = path_option(store_input, [], rich_help_panel="Data", help="Store made by fdcache extract (offline distillation); repeat for several teachers on one view set (extract --views-from)."),
    data: Optional[Path] = path_option(existing_dir, None, rich_help_panel="Data", help="Image folder (default for --cache: the one recorded in the store)."),
    online: bool = typer.Option(False, "--online", rich_help_panel="Online teacher (--online)", help="Run the teacher in the loop instead of reading a store (baseline)."),
    teacher: list[str] = typer.Option([], metavar="NAME", rich_help_panel="Online teacher (--online)", help="--online: teacher, as for extract (repeat for several)."),
    teacher_weight: list[str] = typer.Option([], metavar="NAME=W", rich_help_panel="Data", help="Weight of that teacher's FD loss term (NAME: a --cache or --teacher as given; default 1; repeatable)."),
    pretrained: Optional[str] = path_option(tag_or_file, None, rich_help_panel="Online teacher (--online)", help="--online: teacher weights tag or path."),
    random_init: bool = typer.Option(False, "--random-init", rich_help_panel="Online teacher (--online)", help="--online: seeded random teacher."),
    init_seed: int = typer.Option(0, rich_help_panel="Online teacher (--online)", help="--online: seed of --random-init teacher weights."),
    teacher_arg: list[str] = typer.Option([], metavar="KEY=VALUE", rich_help_panel="Online teacher (--online)", help="--online: timm option for the teacher, key=value (repeatable)."),
    student: str = typer.Option(T("student"), rich_help_panel="Student", help="timm ViT name (FD's ViT-B/16 = beit_base_patch16_224 with shared rel-pos bias), swin_* / swinv2_* (last-stage grid), or fd-tiny / fd-small."),
    student_arg: list[str] = typer.Option([], metavar="KEY=VALUE", rich_help_panel="Student", help="timm option for the student, key=value (repeatable), e.g. depth=6."),
    resolution: Optional[int] = typer.Option(None, rich_help_panel="Student", help="Student input size (default: the teacher's)."),
    epochs: Optional[int] = typer.Option(None, rich_help_panel="Schedule and optimizer", help="Epochs (epoch e replays the store's seed e mod S)."),
    steps: Optional[int] = typer.Option(None, rich_help_panel="Schedule and optimizer", help="Optimizer steps (instead of --epochs)."),
    batch_size: int = typer.Option(T("batch_size"), rich_help_panel="Schedule and optimizer", help="Images per rank per micro-batch."),
    accum_steps: int = typer.Option(T("accum_steps"), rich_help_panel="Schedule and optimizer", help="Micro-batches per optimizer step."),
    lr: float = typer.Option(T("base_lr"), rich_help_panel="Schedule and optimizer", help="Base lr per 512 images of total batch (scaled linearly)."),
    warmup_epochs: float = typer.Option(T("warmup_epochs"), rich_help_panel="Schedule and optimizer", help="Warmup from 5e-7 (scaled), in epochs."),
    warmup_steps: Optional[int] = typer.Option(None, rich_help_panel="Schedule and optimizer", help="Warmup in steps (overrides --warmup-epochs)."),
    weight_decay: float = typer.Option(T("weight_decay"), rich_help_panel="Schedule and optimizer", help="AdamW weight decay (timm's no-decay groups)."),
    clip_grad: float = typer.Option(T("clip_grad"), rich_help_panel="Schedule and optimizer", help="Gradient-norm clip (0: off)."),
    drop_path: float = typer.Option(T("drop_path"), rich_help_panel="Student", help="Stochastic depth rate."),
    layer_scale: float = typer.Option(T("layer_scale"), rich_help_panel="Student", help="Layer-scale init (0: none; ViT/BEiT: timm's Swin and SwinV2 have none)."),
    ema_decay: Optional[float] = typer.Option(None, rich_help_panel="Schedule and optimizer", help="Keep an EMA of the weights (timm ModelEmaV3)."),
    loss_impl: LossImpl = typer.Option(LossImpl.auto, rich_help_panel="Performance", help="FD loss: auto is Triton on CUDA, PyTorch otherwise."),
    amp: Amp = typer.Option(Amp.auto, rich_help_panel="Performance", help="Autocast: auto is bf16 on CUDA, none on CPU."),
    compile_: bool = typer.Option(False, "--compile", rich_help_panel="Performance", help="torch.compile the student."),
    resize_targets: bool = typer.Option(False, rich_help_panel="Student", help="Resample the teacher's token grid to the student's."),
    allow_partial: bool = typer.Option(False, rich_help_panel="Data", help="Train on the completed shards of an unfinished store."),
    seeds_used: Optional[int] = typer.Option(None, rich_help_panel="Data", help="Replay only the store's first N seeds (epoch e replays seed e mod N): one store serves every smaller seed count."),
    resume: bool = typer.Option(False, "--resume", rich_help_panel="Run", help="Continue the run in --out from checkpoints/last.pt."),
    overwrite: bool = typer.Option(False, "--overwrite", rich_help_panel="Run", help="Replace the run in --out (removes only fdcache's files there)."),
    save_every: int = typer.Option(T("save_every"), rich_help_panel="Run", help="Checkpoint every N steps (and at the end, or on Ctrl-C)."),
    run_steps: Optional[int] = typer.Option(None, rich_help_panel="Run", help="Stop this invocation after N steps (checkpointed; --resume continues)."),
    log_every: Optional[int] = typer.Option(None, rich_help_panel="Run", help="Log (and check the loss is finite) every N steps (default: 1 on CPU, 10 on CUDA)."),
    tensorboard: bool = typer.Option(False, rich_help_panel="Run", help="Also write TensorBoard scalars to OUT/tb."),
    seed: int = typer.Option(T("seed"), rich_help_panel="Schedule and optimizer", help="Run seed: student init and sample order."),
    threads: int = typer.Option(T("num_threads"), rich_help_panel="Performance", help="DALI threads."),
    loader_workers: str = typer.Option(T("loader_workers"), metavar="auto|N", rich_help_panel="Performance", help="DALI parallel external-source worker processes (0: in-process; auto: on with CUDA)."),
    device: Device = typer.Option(Device.auto, rich_help_panel="Performance", help="Where the student trains."),
    shard_model: bool = typer.Option(False, "--shard-model", rich_help_panel="Performance", help="Under torchrun: shard the student's parameters, gradients and AdamW state over the ranks (FSDP2) instead of replicating them (DDP); checkpoints are torch.distributed.checkpoint folders, resumable at any world size with the same total batch."),
):
    """Distill a student from a store (offline) or from the teacher in the loop (--online).

    Ctrl-C (or SIGTERM) stops after the current step with a checkpoint and prints the
    command that resumes. Multi-GPU: `torchrun --nproc-per-node N -m fdcache train ...` (DDP;
    --shard-model: FSDP2)."""
    from fdcache.distill.train import train as run

    cfg = TrainConfig(
        out=str(out_), data=str(data) if data else None, cache=_one_or_many(cache), online=online,
        teacher=_one_or_many(teacher), teacher_weights=_weights(teacher_weight),
        pretrained=pretrained, random_init=random_init, init_seed=init_seed,
        teacher_args=parse_overrides(teacher_arg, "--teacher-arg"), student=student,
        student_overrides=parse_overrides(student_arg), resolution=resolution, drop_path=drop_path,
        layer_scale=layer_scale, epochs=epochs, steps=steps, batch_size=batch_size,
        accum_steps=accum_steps, base_lr=lr, warmup_epochs=warmup_epochs, warmup_steps=warmup_steps,
        weight_decay=weight_decay, clip_grad=clip_grad, ema_decay=ema_decay, loss_impl=value_of(loss_impl),
        amp=value_of(amp), compile=compile_, seed=seed, resize_targets=resize_targets, allow_partial=allow_partial,
        seeds_used=seeds_used, resume=resume, overwrite=overwrite, save_every=save_every, run_steps=run_steps,
        log_every=log_every, tensorboard=tensorboard, num_threads=threads, loader_workers=loader_workers,
        device=value_of(device), shard_model=shard_model, progress=sys.stderr.isatty())
    r = run(cfg, announce=lambda text: err.print(text, highlight=False))
    if is_main():
        last = f"{r.losses[-1]:.4f}" if r.losses else "-"
        out.print(f"trained {r.steps} step(s); last loss {last}; {r.images_per_s:,.1f} img/s; "
                  f"data wait {100 * r.data_wait_fraction:.0f}%; checkpoint {r.checkpoint}"
                  + (f"; student {r.export}" if r.export else ""))


@app.command()
@handles_errors
def bench(
    student: str = typer.Option(..., rich_help_panel="Models", help="Student (as for train), e.g. beit_base_patch16_224 or fd-tiny."),
    teacher: str = typer.Option(..., rich_help_panel="Models", help="Teacher (as for extract)."),
    pretrained: Optional[str] = path_option(tag_or_file, None, rich_help_panel="Models", help="Teacher weights tag or path."),
    random_init: bool = typer.Option(False, "--random-init", rich_help_panel="Models", help="Seeded random teacher."),
    resolution: Optional[int] = typer.Option(None, rich_help_panel="Models", help="Input size for both models (default: the teacher's)."),
    batch_size: int = typer.Option(32, rich_help_panel="Measurement", help="Images per step, for every mode."),
    steps: int = typer.Option(10, rich_help_panel="Measurement", help="Timed steps per mode and repeat."),
    warmup: int = typer.Option(2, rich_help_panel="Measurement", help="Untimed steps before each measurement."),
    repeats: int = typer.Option(3, rich_help_panel="Measurement", help="Interleaved repeats (median and spread are reported)."),
    cache: Optional[str] = path_option(store_input, None, rich_help_panel="Measurement", help="Use this store for offline mode instead of building one."),
    data: Optional[Path] = path_option(existing_dir, None, rich_help_panel="Measurement", help="Image folder (default: synthetic images)."),
    student_arg: list[str] = typer.Option([], metavar="KEY=VALUE", rich_help_panel="Models", help="timm option for the student, key=value (repeatable)."),
    codec: Codec = typer.Option(Codec.fp16, rich_help_panel="Measurement", help="Codec of the store built for offline mode."),
    loss_impl: LossImpl = typer.Option(LossImpl.auto, rich_help_panel="Performance", help="FD loss implementation."),
    amp: Amp = typer.Option(Amp.auto, rich_help_panel="Performance", help="Autocast dtype."),
    threads: int = typer.Option(4, rich_help_panel="Performance", help="DALI threads."),
    loader_workers: str = typer.Option(T("loader_workers"), metavar="auto|N", rich_help_panel="Performance", help="DALI parallel external-source worker processes (0: in-process; auto: on with CUDA)."),
    modes: str = typer.Option(",".join(("ceiling", "offline", "online", "teacher", "extract")), rich_help_panel="Measurement",
                              help="Comma-separated subset of ceiling,offline,online,teacher,extract."),
    json_out: Optional[str] = path_option(json_output, None, "--json", rich_help_panel="Output", help=JSON_HELP),
    plot_out: Optional[Path] = path_option(output_file, None, "--plot", rich_help_panel="Output", help="Write a PNG of the ratios here (needs matplotlib)."),
):
    """Throughput of offline vs online distillation vs the synthetic ceiling (interleaved)."""
    from fdcache.tables import bench_table
    from fdcache.tools.bench import MODES, BenchConfig, plot, run_bench

    chosen = tuple(m.strip() for m in modes.split(",") if m.strip())
    unknown = set(chosen) - set(MODES)
    if unknown or not chosen:
        raise ConfigError(f"{modes!r} names no mode or an unknown one (--modes): give a comma-separated subset "
                          f"of {','.join(MODES)}")
    cfg = BenchConfig(student=student, teacher=teacher, pretrained=pretrained, random_init=random_init,
                      resolution=resolution, batch_size=batch_size, steps=steps, warmup=warmup,
                      repeats=repeats, cache=cache, data=str(data) if data else None,
                      student_overrides=parse_overrides(student_arg), codec=value_of(codec), loss_impl=value_of(loss_impl), amp=value_of(amp),
                      threads=threads, loader_workers=loader_workers, modes=chosen)
    r = run_bench(cfg, log=lambda m: err.print(m, highlight=False))
    out.print(bench_table(r, MODES))
    for k, v in r["ratios"].items():
        out.print(f"{k}: {'-' if v is None else f'{v:.3f}'}")
    for note in r["diagnosis"]:
        out.print(f"[yellow]held back:[/] {note}", highlight=False)
    if json_out:
        write_json(json_out, "bench", r)
    if plot_out:
        plot(r, str(plot_out))


@app.command("inspect")
@handles_errors
def inspect_(store: str = path_argument(store_input, "STORE", help="Store path or URL."),
             as_json: Optional[str] = path_option(json_output, None, "--json", help=JSON_HELP)):
    """Teacher, shapes, codec, bytes per sample-view, compression ratio, completeness."""
    from fdcache.store.inspect import inspect_store
    from fdcache.tables import store_table

    r = inspect_store(store)
    if as_json:
        write_json(as_json, "inspect", r)
        if as_json == "-":
            return
    out.print(store_table(r))


@app.command()
@handles_errors
def verify(store: str = path_argument(store_input, "STORE", help="Store path or URL."),
           data: Optional[Path] = path_option(existing_dir, None, help="Image folder, if moved or copied since extraction."),
           files: bool = typer.Option(True, "--files/--no-files", help="Check that the images still match (--no-files: skip)."),
           content: bool = typer.Option(False, help="Compare every image's crc32c with the manifest (reads every file)."),
           repair: bool = typer.Option(False, help="Un-mark damaged shards so the same extract command recomputes them."),
           teacher_check: int = typer.Option(0, "--teacher-check", metavar="N", help="Also recompute N random recorded views with the store's teacher (weights hash checked) through the reference pixel path; each view's whitened error must be within the codec's bound."),
           check_seed: int = typer.Option(0, help="Seed of --teacher-check's choice of views (the same seed checks the same views)."),
           pretrained: Optional[str] = typer.Option(None, help="--teacher-check: where the teacher's local checkpoint is now (default: the recorded tag)."),
           device: Device = typer.Option(Device.auto, help="--teacher-check: where the teacher runs (check a GPU-extracted store on a GPU).")):
    """Read and checksum every chunk, check completeness and that the images still match.

    Exit 0 when the store is whole, 1 naming each problem otherwise."""
    from fdcache.options import check as check_range
    from fdcache.store.inspect import verify_store

    check_range(teacher_check=teacher_check)  # before the checksum pass
    r = verify_store(store, data=data, check_files=files, content=content, repair=repair)
    for w in r["warnings"]:
        err.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    out.print(f"[green]ok[/]: {r['shards_checked']} shard(s) of {r['seeds']} seed(s) x "
              f"{r['samples']} samples checksummed; {r['files_checked']} image file(s) "
              + ("byte-identical" if r["content_checked"] else "present with their recorded sizes"))
    if teacher_check:
        from fdcache import distributed
        from fdcache.distill.teacher_check import teacher_check as check

        views = check(store, teacher_check, seed=check_seed, data=data, pretrained=pretrained,
                      device=distributed.device_for(distributed.Dist(), value_of(device)),
                      progress=lambda v: out.print(f"  {v}", highlight=False, soft_wrap=True))
        out.print(f"[green]ok[/]: {len(views)} recomputed view(s) within the codec's bound "
                  f"({max(v.rel_l2 for v in views):.3g} at most)"
                  + (f"; --teacher-check {teacher_check} asked for more: that is every view the store holds"
                     if len(views) < teacher_check else ""))


@app.command()
@handles_errors
def score(
    run: Path = path_argument(existing_dir, "RUN", help="An fdcache train run directory (its checkpoints/last.pt: the student with its FD head)."),
    cache: str = path_option(store_input, ..., rich_help_panel="Held-out loss", help="Store of held-out images (views the run never saw), same teacher as the run's."),
    seed: list[int] = typer.Option([], metavar="SEED", rich_help_panel="Held-out loss", help="Seeds of --cache to score (repeatable; default: all)."),
    train_cache: Optional[str] = path_option(store_input, None, rich_help_panel="Train-store loss", help="The run's own store: its loss there, and the gap held-out - train."),
    train_seed: list[int] = typer.Option([0], metavar="SEED", rich_help_panel="Train-store loss", help="Seeds of --train-cache to score (repeatable; default 0, which every replay factor trained on)."),
    limit: Optional[int] = typer.Option(None, rich_help_panel="Held-out loss", help="Score at most the first N samples of each seed (both stores)."),
    probe_train: Optional[Path] = path_option(existing_dir, None, rich_help_panel="Linear probe", help="Labelled image folder the probe is fitted on (whole images)."),
    probe_val: Optional[Path] = path_option(existing_dir, None, rich_help_panel="Linear probe", help="Labelled image folder the probe's top-1 is read on."),
    probe_l2: float = typer.Option(1e-4, rich_help_panel="Linear probe", help="L2 weight of the logistic regression (standardized features)."),
    batch_size: int = typer.Option(64, rich_help_panel="Performance", help="Sample-views per forward pass."),
    threads: int = typer.Option(2, rich_help_panel="Performance", help="DALI threads."),
    loss_impl: LossImpl = typer.Option(LossImpl.auto, rich_help_panel="Performance", help="FD loss: auto is Triton on CUDA, PyTorch otherwise."),
    device: Device = typer.Option(Device.auto, rich_help_panel="Performance", help="Where the student runs."),
    json_out: Optional[str] = path_option(json_output, None, "--json", rich_help_panel="Output", help=JSON_HELP),
):
    """A train run's student on data it never saw: held-out FD loss, the train - held-out gap, linear probe top-1.

    The loss is training's own (same pixel pipeline, same codec inputs, same fd_loss) on a
    store's recorded views; the probe is a logistic regression on frozen, mean-pooled features."""
    from fdcache import distributed
    from fdcache.distill.score import score as run_score

    dev = distributed.device_for(distributed.Dist(), value_of(device))
    r = run_score(str(run), cache, train_cache=train_cache, train_seeds=train_seed or None, seeds=seed or None,
                  limit=limit, probe_train=str(probe_train) if probe_train else None,
                  probe_val=str(probe_val) if probe_val else None, probe_l2=probe_l2, batch_size=batch_size,
                  threads=threads, loss_impl=value_of(loss_impl), device=dev)
    out.print(f"held-out FD loss {r.heldout.loss:.5f} ({r.heldout.samples} sample-views, seeds {r.heldout.seeds})",
              highlight=False)
    if r.train is not None:
        out.print(f"train-store FD loss {r.train.loss:.5f} ({r.train.samples} sample-views, seeds {r.train.seeds}); "
                  f"gap held-out - train {r.gap:+.5f}", highlight=False)
    if r.probe is not None:
        out.print(f"linear probe top-1 {100 * r.probe.top1:.2f}% on {r.probe.val_images} images "
                  f"(fitted on {r.probe.train_images}, train top-1 {100 * r.probe.train_top1:.2f}%)", highlight=False)
    if json_out:
        write_json(json_out, "score", r.to_dict())


@app.command()
@handles_errors
def diagnose(
    models: list[str] = typer.Argument(..., metavar="MODEL...", help="Models: ViT-B-16, timm:<name> (as extract --teacher names them), or an fdcache run directory (train student or fine-tuned export)."),
    data: Path = path_option(existing_dir, ..., help="Folder of images (searched recursively; --images of them, evenly spaced in name order)."),
    pretrained: list[str] = path_option(tag_or_file, [], help="Weights of the named models: tag, local path, or random-init; once for all, or once per named model in order."),
    random_init: bool = typer.Option(False, "--random-init", help="Seeded random weights for every named model."),
    init_seed: int = typer.Option(0, help="Seed of random-init weights."),
    resolution: Optional[int] = typer.Option(None, help="Input size of the named models (default: the model's)."),
    label: list[str] = typer.Option([], metavar="NAME", help="Legend name per model (repeatable, in order)."),
    images: int = typer.Option(32, help="Images to average over (0: all)."),
    batch_size: int = typer.Option(16, help="Images per forward pass."),
    device: Device = typer.Option(Device.auto, help="Where the models run."),
    json_out: Optional[Path] = path_option(output_file, None, "--json", help="Write per-layer, per-head figures as JSON here."),
    plot_out: Optional[Path] = path_option(output_file, None, "--plot", help="Write the per-layer head scatter as PNG (needs matplotlib)."),
):
    """FD's attention diagnostics: attention distance and head diversity per layer and head.

    Mean attention distance in pixels (CLS excluded), for several models side by side."""
    from fdcache import distributed
    from fdcache.tables import diagnose_table
    from fdcache.tools.diagnose import run

    dev = str(distributed.device_for(distributed.Dist(), value_of(device)))
    results = run(models, data, pretrained=pretrained, random_init=random_init, resolution=resolution,
                  init_seed=init_seed, labels=label, images=images or None, batch_size=batch_size, device=dev,
                  progress=sys.stderr.isatty(), json_out=json_out, plot_out=plot_out)
    out.print(diagnose_table(results))


from fdcache.cli.tune import register  # noqa: E402 (the fine-tuning commands, in help order)

register(app)


@app.command()
@handles_errors
def quickstart(workdir: Optional[Path] = path_option(output_dir, None, help="Where to put images, store and runs (default: a temp dir)."),
               images: int = typer.Option(24, help="Synthetic images to generate.")):
    """The whole path in miniature on CPU (a minute or two): make images, extract with a tiny
    random teacher, inspect, verify, distill a tiny student, fine-tune it and evaluate; then
    FLYP on the tiny CLIP and a WiSE-FT sweep. Each step prints the command it equals."""
    from fdcache.tools.quickstart import quickstart as run

    def say(step, same_as: str | None = None) -> None:
        out.print(step, highlight=False)
        if same_as:
            out.print(f"   (same as: {same_as})", style="dim", highlight=False)

    run(workdir, images, say)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
