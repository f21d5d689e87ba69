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
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from fdcache.errors import FdcacheError, VerifyError

class Codec(str, Enum):
    """Target codecs (fdcache.codecs); listed here so --help needs no torch import."""
    fp16 = "fp16"
    int8 = "int8"


class Amp(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    none = "none"


class Device(str, Enum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


class LossImpl(str, Enum):
    auto = "auto"
    triton = "triton"
    torch = "torch"


def _value(choice):
    return choice.value if isinstance(choice, Enum) else choice


if hasattr(typer.core.TyperOption, "display_type_rich"):  # typer >= 0.20 prints <bool> after every flag
    _display_type = typer.core.TyperOption.display_type_rich
    typer.core.TyperOption.display_type_rich = lambda self, ctx: None if self.is_flag else _display_type(self, ctx)

app = typer.Typer(
    name="fdcache", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Cache a CLIP teacher's feature maps once; train feature-distillation students fast.")
# Not a terminal (a log, a pipe): long lines stay whole, so printed commands copy as they are.
out = Console(soft_wrap=not sys.stdout.isatty())
err = Console(stderr=True)


def _fail(e: FdcacheError) -> None:
    err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
    for p in getattr(e, "problems", []):
        err.print(f"  - {p}", highlight=False, soft_wrap=True)
    raise typer.Exit(e.exit_code)


def _version(value: bool) -> None:
    if value:
        from fdcache import __version__

        out.print(f"fdcache {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                        help="Print the version and exit.")) -> None:
    """Cache a CLIP teacher's feature maps once; train feature-distillation students fast."""


JSON_HELP = "Also write the results as JSON to FILE (- for stdout): {command, fdcache_version, ...}."


def _write_json(dest: str, command: str, payload: dict) -> None:
    """Every --json: a FILE (or - for stdout) holding one object that names its command and
    version, then the command's fields."""
    from fdcache import __version__

    text = json.dumps({"command": command, "fdcache_version": __version__, **payload}, indent=2)
    if dest == "-":
        print(text)
    else:
        Path(dest).write_text(text + "\n")


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
    data: Path = typer.Argument(..., rich_help_panel="Input", help="Image folder (ImageFolder layout root/<class>/<image>)."),
    out_: str = typer.Option(..., "--out", "-o", rich_help_panel="Views and storage", help="Store path or fsspec URL (Zarr v3 group)."),
    teacher: str = typer.Option(..., rich_help_panel="Teacher", help="open_clip name (ViT-B-16), openclip:<name> or timm:<name>."),
    pretrained: Optional[str] = typer.Option(None, rich_help_panel="Teacher", help="open_clip/timm weight tag (openai) or a local checkpoint path."),
    random_init: bool = typer.Option(False, "--random-init", rich_help_panel="Teacher", help="Seeded random teacher (tests, benchmarks)."),
    init_seed: int = typer.Option(0, rich_help_panel="Teacher", help="Seed of --random-init weights (recorded in the store)."),
    seeds: int = typer.Option(1, rich_help_panel="Views and storage", help="Augmentation seeds (views per image); raise later to append."),
    resolution: Optional[int] = typer.Option(None, rich_help_panel="Teacher", help="Teacher input size (default: the model's)."),
    codec: Codec = typer.Option(Codec.fp16, rich_help_panel="Views and storage", help="Target codec: fp16 (lossless vs the teacher) or int8 (per-token scale/offset)."),
    compressor: str = typer.Option("zstd", rich_help_panel="Views and storage", help="Lossless compressor under the codec: zstd or none."),
    batch_size: int = typer.Option(64, rich_help_panel="Performance", help="Teacher batch size."),
    shard_size: int = typer.Option(128, rich_help_panel="Views and storage", help="Samples per shard (the unit of writing and resuming)."),
    global_seed: int = typer.Option(0, rich_help_panel="Views and storage", help="Seed of the view generator."),
    views: str = typer.Option("rrc", rich_help_panel="Views and storage", help="View policy: rrc (RandomResizedCrop 0.08-1 + flip, as FD) or full."),
    file_list: Optional[Path] = typer.Option(None, rich_help_panel="Input", help="Text file of 'relative/path \\[label]' lines under DATA instead of an ImageFolder."),
    skip_bad: bool = typer.Option(False, rich_help_panel="Input", help="Record unreadable images as skipped instead of stopping."),
    overwrite: bool = typer.Option(False, rich_help_panel="Views and storage", help="Replace an existing store made differently."),
    threads: int = typer.Option(4, rich_help_panel="Performance", help="DALI decoder threads."),
    device: Device = typer.Option(Device.auto, rich_help_panel="Performance", help="Where the teacher runs."),
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
                        seeds=seeds, codec=_spec(CodecSpec, name=_value(codec), compressor=compressor),
                        policy=_spec(ViewPolicy, kind=views), batch_size=batch_size,
                        shard_size=shard_size, global_seed=global_seed,
                        file_list=str(file_list) if file_list else None, skip_bad=skip_bad,
                        overwrite=overwrite, num_threads=threads, device=_value(device),
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
    out_: Path = typer.Option(..., "--out", "-o", rich_help_panel="Run", help="Run directory: log.jsonl, checkpoints/, config.json + model.safetensors (timm local-dir)."),
    cache: Optional[str] = typer.Option(None, rich_help_panel="Data", help="Store made by fdcache extract (offline distillation)."),
    data: Optional[Path] = typer.Option(None, rich_help_panel="Data", help="Image folder (default for --cache: the one recorded in the store)."),
    online: bool = typer.Option(False, "--online", rich_help_panel="Online teacher (--online)", help="Run the teacher in the loop instead of reading a store (baseline)."),
    teacher: Optional[str] = typer.Option(None, rich_help_panel="Online teacher (--online)", help="--online: teacher, as for extract."),
    pretrained: Optional[str] = typer.Option(None, rich_help_panel="Online teacher (--online)", help="--online: teacher weights tag or path."),
    random_init: bool = typer.Option(False, "--random-init", rich_help_panel="Online teacher (--online)", help="--online: seeded random teacher."),
    init_seed: int = typer.Option(0, rich_help_panel="Online teacher (--online)", help="--online: seed of --random-init teacher weights."),
    student: str = typer.Option("beit_base_patch16_224", rich_help_panel="Student", help="timm ViT name (FD's ViT-B/16 = beit_base_patch16_224 with shared rel-pos bias), or fd-tiny / fd-small."),
    student_arg: list[str] = typer.Option([], rich_help_panel="Student", help="timm option for the student, key=value (repeatable), e.g. depth=6."),
    resolution: Optional[int] = typer.Option(None, rich_help_panel="Student", help="Student input size (default: the teacher's)."),
    epochs: Optional[int] = typer.Option(None, rich_help_panel="Schedule and optimizer", help="Epochs (epoch e replays the store's seed e mod S)."),
    steps: Optional[int] = typer.Option(None, rich_help_panel="Schedule and optimizer", help="Optimizer steps (instead of --epochs)."),
    batch_size: int = typer.Option(128, rich_help_panel="Schedule and optimizer", help="Images per rank per micro-batch."),
    accum_steps: int = typer.Option(1, rich_help_panel="Schedule and optimizer", help="Micro-batches per optimizer step."),
    lr: float = typer.Option(3e-4, rich_help_panel="Schedule and optimizer", help="Base lr per 512 images of total batch (scaled linearly)."),
    warmup_epochs: float = typer.Option(10.0, rich_help_panel="Schedule and optimizer", help="Warmup from 5e-7 (scaled), in epochs."),
    warmup_steps: Optional[int] = typer.Option(None, rich_help_panel="Schedule and optimizer", help="Warmup in steps (overrides --warmup-epochs)."),
    weight_decay: float = typer.Option(0.05, rich_help_panel="Schedule and optimizer", help="AdamW weight decay (timm's no-decay groups)."),
    clip_grad: float = typer.Option(3.0, rich_help_panel="Schedule and optimizer", help="Gradient-norm clip (0: off)."),
    drop_path: float = typer.Option(0.2, rich_help_panel="Student", help="Stochastic depth rate."),
    layer_scale: float = typer.Option(0.1, rich_help_panel="Student", help="Layer-scale init (0: none)."),
    ema_decay: Optional[float] = typer.Option(None, rich_help_panel="Schedule and optimizer", help="Keep an EMA of the weights (timm ModelEmaV3)."),
    loss_impl: LossImpl = typer.Option(LossImpl.auto, rich_help_panel="Performance", help="FD loss: auto is Triton on CUDA, PyTorch otherwise."),
    amp: Amp = typer.Option(Amp.auto, rich_help_panel="Performance", help="Autocast: auto is bf16 on CUDA, none on CPU."),
    compile_: bool = typer.Option(False, "--compile", rich_help_panel="Performance", help="torch.compile the student."),
    resize_targets: bool = typer.Option(False, rich_help_panel="Student", help="Resample the teacher's token grid to the student's."),
    allow_partial: bool = typer.Option(False, rich_help_panel="Data", help="Train on the completed shards of an unfinished store."),
    resume: bool = typer.Option(False, "--resume", rich_help_panel="Run", help="Continue the run in --out from checkpoints/last.pt."),
    save_every: int = typer.Option(1000, rich_help_panel="Run", help="Checkpoint every N steps (and at the end)."),
    run_steps: Optional[int] = typer.Option(None, rich_help_panel="Run", help="Stop this invocation after N steps (checkpointed; --resume continues)."),
    log_every: int = typer.Option(1, rich_help_panel="Run", help="Log (and check the loss is finite) every N steps."),
    tensorboard: bool = typer.Option(False, rich_help_panel="Run", help="Also write TensorBoard scalars to OUT/tb."),
    seed: int = typer.Option(0, rich_help_panel="Schedule and optimizer", help="Run seed: student init and sample order."),
    threads: int = typer.Option(4, rich_help_panel="Performance", help="DALI threads."),
    loader_workers: int = typer.Option(0, rich_help_panel="Performance", help="DALI parallel external-source worker processes (0: in-process)."),
    device: Device = typer.Option(Device.auto, rich_help_panel="Performance", help="Where the student trains."),
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
        weight_decay=weight_decay, clip_grad=clip_grad or None, ema_decay=ema_decay, loss_impl=_value(loss_impl),
        amp=_value(amp), compile=compile_, seed=seed, resize_targets=resize_targets, allow_partial=allow_partial,
        resume=resume, save_every=save_every, run_steps=run_steps, log_every=log_every,
        tensorboard=tensorboard, num_threads=threads, loader_workers=loader_workers, device=_value(device),
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
    student: str = typer.Option(..., rich_help_panel="Models", help="Student (as for train), e.g. beit_base_patch16_224 or fd-tiny."),
    teacher: str = typer.Option(..., rich_help_panel="Models", help="Teacher (as for extract)."),
    pretrained: Optional[str] = typer.Option(None, rich_help_panel="Models", help="Teacher weights tag or path."),
    random_init: bool = typer.Option(False, "--random-init", rich_help_panel="Models", help="Seeded random teacher."),
    resolution: Optional[int] = typer.Option(None, rich_help_panel="Models", help="Input size for both models (default: the teacher's)."),
    batch_size: int = typer.Option(32, rich_help_panel="Measurement"),
    steps: int = typer.Option(10, rich_help_panel="Measurement", help="Timed steps per mode and repeat."),
    warmup: int = typer.Option(2, rich_help_panel="Measurement", help="Untimed steps before each measurement."),
    repeats: int = typer.Option(3, rich_help_panel="Measurement", help="Interleaved repeats (median and spread are reported)."),
    cache: Optional[str] = typer.Option(None, rich_help_panel="Measurement", help="Use this store for offline mode instead of building one."),
    data: Optional[Path] = typer.Option(None, rich_help_panel="Measurement", help="Image folder (default: synthetic images)."),
    student_arg: list[str] = typer.Option([], rich_help_panel="Models", help="timm option for the student, key=value (repeatable)."),
    codec: Codec = typer.Option(Codec.fp16, rich_help_panel="Measurement", help="Codec of the store built for offline mode."),
    loss_impl: LossImpl = typer.Option(LossImpl.auto, rich_help_panel="Performance", help="FD loss implementation."),
    amp: Amp = typer.Option(Amp.auto, rich_help_panel="Performance", help="Autocast dtype."),
    threads: int = typer.Option(4, rich_help_panel="Performance", help="DALI threads."),
    loader_workers: int = typer.Option(0, rich_help_panel="Performance", help="DALI parallel external-source workers."),
    modes: str = typer.Option(",".join(("ceiling", "offline", "online", "teacher", "extract")), rich_help_panel="Measurement",
                              help="Comma-separated subset of ceiling,offline,online,teacher,extract."),
    json_out: Optional[str] = typer.Option(None, "--json", metavar="FILE", rich_help_panel="Output", help=JSON_HELP),
    plot_out: Optional[Path] = typer.Option(None, "--plot", rich_help_panel="Output", help="Write a PNG of the ratios here (needs matplotlib)."),
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
                      student_overrides=_overrides(student_arg), codec=_value(codec), loss_impl=_value(loss_impl), amp=_value(amp),
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
        _write_json(json_out, "bench", r)
    if plot_out:
        plot(r, str(plot_out))


@app.command("inspect")
@handles_errors
def inspect_(store: str = typer.Argument(..., help="Store path or URL."),
             as_json: Optional[str] = typer.Option(None, "--json", metavar="FILE", help=JSON_HELP)):
    """Teacher, shapes, codec, bytes per sample-view, compression ratio, completeness."""
    from fdcache.inspection import inspect_store

    r = inspect_store(store)
    if as_json:
        _write_json(as_json, "inspect", r)
        if as_json == "-":
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
           files: bool = typer.Option(True, "--files/--no-files", help="Check that the images still match (--no-files: skip).")):
    """Read and checksum every chunk, check completeness and that the images still match.

    Exit 0 when the store is whole, 1 naming each problem otherwise."""
    from fdcache.inspection import verify_store

    r = verify_store(store, data=data, check_files=files)
    out.print(f"[green]ok[/]: {r['shards_checked']} shard(s) of {r['seeds']} seed(s) x "
              f"{r['samples']} samples checksummed; {r['files_checked']} image file(s) unchanged")


def _preset_values(name: str) -> dict:
    """A preset's values, read without importing the training code (help stays fast)."""
    path = Path(__file__).resolve().parents[1] / "fdcache" / "presets" / f"{name}.json"
    if not path.is_file():  # installed layout: fdcache/cli/app.py beside fdcache/presets
        path = Path(__file__).resolve().parent.parent / "presets" / f"{name}.json"
    return json.loads(path.read_text())["values"] if path.is_file() else {}


def _tune_command(mode: str, default_preset: str, doc: str):
    """``finetune`` and ``flyp`` share their options; a preset fills what is not given."""

    preset_values = _preset_values(default_preset)

    def pd(key: str) -> dict:
        """Show the default preset's value as the option's default (flags default to None: unset)."""
        if key not in preset_values:
            return {}
        value = preset_values[key]
        return {"show_default": f"{default_preset}: {'off' if value is None else value}"}

    finetune_only = {"hidden": mode == "flyp"}  # flyp's help lists only what flyp uses

    def command(
        out_: Optional[Path] = typer.Option(None, "--out", "-o", rich_help_panel="Run", help="Run directory: log.jsonl, checkpoints/, config.json, model.safetensors (+ model_ema), init/. Required."),
        data: Optional[Path] = typer.Option(None, rich_help_panel="Run", help="Training image folder (root/<class>/<image>). Required."),
        val: list[Path] = typer.Option([], rich_help_panel="Run", help="Eval image folder, after each epoch and at the end (repeatable: a val set and its shifts)."),
        preset: str = typer.Option(default_preset, rich_help_panel="Run", help="Recipe: ft-clip-vit-b16, ft-clip-vit-l14, fd-finetune-vit-b16, flyp-imagenet (fdcache/presets/*.json); flags override it."),
        print_config: bool = typer.Option(False, "--print-config", rich_help_panel="Run", help="Print the resolved configuration (the preset, then the flags given) as JSON and exit."),
        model: Optional[str] = typer.Option(None, **pd("model"), rich_help_panel="Model", help="open_clip name (ViT-B-16) or timm:<name> (finetune only)."),
        pretrained: Optional[str] = typer.Option(None, **pd("pretrained"), rich_help_panel="Model", help="Weight tag (openai) or local checkpoint path."),
        random_init: Optional[bool] = typer.Option(None, "--random-init", rich_help_panel="Model", help="Seeded random weights (tests, smoke runs)."),
        init_seed: Optional[int] = typer.Option(None, rich_help_panel="Model", help="Seed of --random-init weights."),
        student: Optional[Path] = typer.Option(None, **finetune_only, rich_help_panel="Model", help="finetune: an fdcache train --out directory instead of --model."),
        resolution: Optional[int] = typer.Option(None, **pd("resolution"), rich_help_panel="Model", help="Input size (default: the model's / the preset's)."),
        classnames: Optional[str] = typer.Option(None, **pd("classnames"), rich_help_panel="Model", help="Class names for prompts and matching: folder, imagenet, or a JSON/text file."),
        templates: Optional[str] = typer.Option(None, **pd("templates"), rich_help_panel="Model", help="Prompt templates: openai (80) or simple (open_clip's)."),
        head: Optional[str] = typer.Option(None, **finetune_only, **pd("head"), rich_help_panel="Model", help="finetune: fresh (FT-CLIP, mean-pooled tokens) or zeroshot (head from the text tower; writes init/ for WiSE-FT)."),
        epochs: Optional[int] = typer.Option(None, **pd("epochs"), rich_help_panel="Schedule and optimizer", help="Epochs."),
        steps: Optional[int] = typer.Option(None, rich_help_panel="Schedule and optimizer", help="Optimizer steps (instead of --epochs)."),
        batch_size: Optional[int] = typer.Option(None, **pd("batch_size"), rich_help_panel="Schedule and optimizer", help="Images per rank per micro-batch."),
        accum_steps: Optional[int] = typer.Option(None, **pd("accum_steps"), rich_help_panel="Schedule and optimizer", help="Micro-batches per optimizer step."),
        lr: Optional[float] = typer.Option(None, **pd("base_lr"), rich_help_panel="Schedule and optimizer", help="Peak lr per --lr-batch images of total batch (scaled linearly)."),
        lr_batch: Optional[int] = typer.Option(None, **pd("lr_batch"), rich_help_panel="Schedule and optimizer", help="Total batch at which --lr is given."),
        warmup_epochs: Optional[float] = typer.Option(None, **pd("warmup_epochs"), rich_help_panel="Schedule and optimizer", help="Linear warmup, in epochs."),
        warmup_steps: Optional[int] = typer.Option(None, **pd("warmup_steps"), rich_help_panel="Schedule and optimizer", help="Linear warmup, in steps (overrides --warmup-epochs)."),
        warmup_lr: Optional[float] = typer.Option(None, **pd("warmup_lr"), rich_help_panel="Schedule and optimizer", help="lr at the start of warmup (scaled like --lr)."),
        min_lr: Optional[float] = typer.Option(None, **pd("min_lr"), rich_help_panel="Schedule and optimizer", help="lr at the end of the cosine (scaled like --lr)."),
        weight_decay: Optional[float] = typer.Option(None, **pd("weight_decay"), rich_help_panel="Schedule and optimizer", help="AdamW weight decay (not on biases, norms, embeddings)."),
        layer_decay: Optional[float] = typer.Option(None, **finetune_only, **pd("layer_decay"), rich_help_panel="Schedule and optimizer", help="finetune: layer-wise lr decay (timm's groups); 1 turns it off."),
        drop_path: Optional[float] = typer.Option(None, **pd("drop_path"), rich_help_panel="Regularization and augmentation", help="Stochastic depth (timm models and students)."),
        clip_grad: Optional[float] = typer.Option(None, **pd("clip_grad"), rich_help_panel="Schedule and optimizer", help="Gradient-norm clip; 0 turns it off."),
        ema_decay: Optional[float] = typer.Option(None, **pd("ema_decay"), rich_help_panel="Schedule and optimizer", help="EMA of the weights (timm ModelEmaV3); 0 turns it off."),
        label_smoothing: Optional[float] = typer.Option(None, **finetune_only, **pd("label_smoothing"), rich_help_panel="Regularization and augmentation", help="finetune: label smoothing."),
        mixup: Optional[float] = typer.Option(None, **finetune_only, **pd("mixup"), rich_help_panel="Regularization and augmentation", help="finetune: mixup alpha (timm); 0 is off."),
        cutmix: Optional[float] = typer.Option(None, **finetune_only, **pd("cutmix"), rich_help_panel="Regularization and augmentation", help="finetune: cutmix alpha (timm); 0 is off."),
        auto_augment: Optional[str] = typer.Option(None, **finetune_only, **pd("auto_augment"), rich_help_panel="Regularization and augmentation", help="finetune: timm RandAugment policy (rand-m9-mstd0.5-inc1) or none."),
        reprob: Optional[float] = typer.Option(None, **finetune_only, **pd("re_prob"), rich_help_panel="Regularization and augmentation", help="finetune: random-erasing probability."),
        crop_pct: Optional[float] = typer.Option(None, **pd("crop_pct"), rich_help_panel="Regularization and augmentation", help="Evaluation centre-crop fraction (1.0: CLIP's; 0.875: BEiT/FT-CLIP)."),
        freeze_patch_embed: Optional[bool] = typer.Option(None, "--freeze-patch-embed/--train-patch-embed", **pd("freeze_patch_embed"), rich_help_panel="Regularization and augmentation", help="Freeze the patch embedding (FT-CLIP at 224)."),
        amp: Optional[Amp] = typer.Option(None, rich_help_panel="Performance", help="Autocast: auto is bf16 on CUDA, none on CPU. [default: auto]"),
        compile_: Optional[bool] = typer.Option(None, "--compile", rich_help_panel="Performance", help="torch.compile the model."),
        seed: Optional[int] = typer.Option(None, rich_help_panel="Schedule and optimizer", help="Run seed: sample order, augmentation, drop path."),
        resume: Optional[bool] = typer.Option(None, "--resume", rich_help_panel="Run", help="Continue the run in --out from checkpoints/last.pt."),
        save_every: Optional[int] = typer.Option(None, rich_help_panel="Run", help="Checkpoint every N steps (and at the end)."),
        run_steps: Optional[int] = typer.Option(None, rich_help_panel="Run", help="Stop this invocation after N steps (checkpointed; --resume continues)."),
        log_every: Optional[int] = typer.Option(None, rich_help_panel="Run", help="Log every N steps."),
        workers: Optional[int] = typer.Option(None, rich_help_panel="Performance", help="DataLoader worker processes."),
        device: Optional[Device] = typer.Option(None, rich_help_panel="Performance", help="Where to train. [default: auto]"),
    ):
        from fdcache.finetune import finetune as run, make_config

        if mode == "flyp":
            given = {"--student": student, "--head": head, "--layer-decay": layer_decay, "--label-smoothing": label_smoothing,
                     "--mixup": mixup, "--cutmix": cutmix, "--auto-augment": auto_augment, "--reprob": reprob}
            wrong = [k for k, v in given.items() if v is not None]
            if wrong:
                raise typer.BadParameter(f"{', '.join(wrong)}: fdcache finetune options; flyp trains both towers with "
                                         "the CLIP loss (see fdcache flyp --help)")
        if not print_config:
            for name, value in (("--out", out_), ("--data", data)):
                if value is None:
                    raise typer.BadParameter(f"{name} is required (or --print-config to only print the settings)")
        cfg = make_config(
            preset or None, mode=mode, out=str(out_) if out_ else "", data=str(data) if data else "",
            val=[str(v) for v in val] or None,
            model=model, pretrained=pretrained, random_init=random_init, init_seed=init_seed,
            student=str(student) if student else None, resolution=resolution, classnames=classnames,
            templates=templates, head=head, epochs=epochs, steps=steps, batch_size=batch_size,
            accum_steps=accum_steps, base_lr=lr, lr_batch=lr_batch, warmup_epochs=warmup_epochs,
            warmup_steps=warmup_steps, warmup_lr=warmup_lr, min_lr=min_lr, weight_decay=weight_decay,
            layer_decay=layer_decay, drop_path=drop_path, clip_grad=clip_grad, ema_decay=ema_decay,
            label_smoothing=label_smoothing, mixup=mixup, cutmix=cutmix, auto_augment=auto_augment,
            re_prob=reprob, crop_pct=crop_pct, freeze_patch_embed=freeze_patch_embed, amp=_value(amp),
            compile=compile_, seed=seed, resume=resume, save_every=save_every, run_steps=run_steps,
            log_every=log_every, workers=workers, device=_value(device), progress=sys.stderr.isatty())
        if print_config:
            shown = {k: (v if v != "" else None) for k, v in cfg.to_dict().items() if k != "progress"}
            out.print(json.dumps(shown, indent=2), highlight=False, soft_wrap=True)
            return
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
    amp: Amp = typer.Option(Amp.auto, help="Autocast: auto is bf16 on CUDA, none on CPU."),
    device: Device = typer.Option(Device.auto, help="Where to evaluate."),
    json_out: Optional[str] = typer.Option(None, "--json", metavar="FILE", help=JSON_HELP),
):
    """Top-1 / top-5 on one or more image folders (classifier head, or zero-shot for CLIP models)."""
    from fdcache import distributed
    from fdcache.classifiers import init_model, load_export
    from fdcache.evaluate import evaluate

    d = distributed.init()
    dev = distributed.device_for(d, _value(device))
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
                 batch_size=batch_size, workers=workers, device=dev, amp=_value(amp), dist=d)
    if d.is_main:
        _print_evals({weights: r})
        report = {"model": str(run or model), "weights": weights, "results": r}
        if len(r) > 1:  # FLYP's "avg OOD": the mean over the sets after the first (its shifts)
            shifts = list(r.values())[1:]
            report["shift_mean"] = {k: sum(x[k] for x in shifts) / len(shifts) for k in ("top1", "top5")}
            out.print(f"mean over the {len(shifts)} set(s) after the first: top-1 "
                      f"{100 * report['shift_mean']['top1']:.2f}, top-5 {100 * report['shift_mean']['top5']:.2f}")
        if json_out:
            _write_json(json_out, "eval", report)


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
    device: Device = typer.Option(Device.auto, help="Where to evaluate."),
    json_out: Optional[str] = typer.Option(None, "--json", metavar="FILE", help=JSON_HELP),
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
            dev = distributed.device_for(distributed.Dist(), _value(device))
            m, spec, _ = load_export(p)
            results[f"alpha={a:.2f}"] = evaluate(m.to(dev), spec, [str(x) for x in data], classnames=classnames,
                                                 batch_size=batch_size, workers=workers, device=dev)
    if results:
        _print_evals(results)
        sweep = {"finetuned": str(finetuned), "zeroshot": str(zeroshot), "results": results}
        _write_json(str(out_ / "wise.json"), "wise", sweep)  # for fdcache plot OUT
        if json_out:
            _write_json(json_out, "wise", sweep)


@app.command()
@handles_errors
def plot(
    path: Path = typer.Argument(..., help="A train/finetune/flyp --out directory, a wise --out directory (evaluated with --data), or a wise --json file."),
    out_: Optional[Path] = typer.Option(None, "--out", "-o", help="PNG to write (default: curves.png / wise.png beside the input)."),
):
    """Draw a run's loss/lr (and evaluation) curves from log.jsonl, or a WiSE-FT sweep as ID vs OOD top-1 (needs matplotlib: the plot extra)."""
    from fdcache.plots import plot_path

    out.print(f"wrote {plot_path(path, out_)}", highlight=False)


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
