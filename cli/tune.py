"""``fdcache finetune``, ``flyp``, ``eval``, ``wise`` and ``plot``: the fine-tuning side of the
CLI. Like the rest of the CLI, each command parses, calls one library function and prints."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from fdcache.cli.common import (JSON_HELP, Amp, Device, Head, Templates, classnames_arg, existing_dir, existing_path,
                                handles_errors, is_main, json_output, out, output_dir, output_file, path_argument,
                                path_option, tag_or_file, value_of, write_json)
from fdcache.errors import ConfigError

__all__ = ["eval_", "wise", "plot", "register"]


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
        out_: Optional[Path] = path_option(output_dir, None, "--out", "-o", rich_help_panel="Run", help="Run directory (needed unless --print-config): log.jsonl, checkpoints/, config.json, model.safetensors (+ model_ema), init/."),
        data: Optional[Path] = path_option(existing_dir, None, rich_help_panel="Run", help="Training image folder, root/<class>/<image> (needed unless --print-config)."),
        val: list[Path] = path_option(existing_dir, [], rich_help_panel="Run", help="Eval image folder, after each epoch and at the end (repeatable: a val set and its shifts)."),
        preset: str = typer.Option(default_preset, rich_help_panel="Run", help=("Recipe: ft-clip-vit-b16, ft-clip-vit-l14, fd-finetune-vit-b16" if mode == "finetune" else "Recipe: flyp-imagenet") + " (fdcache/presets/*.json); flags override it."),
        print_config: bool = typer.Option(False, "--print-config", rich_help_panel="Run", help="Print the resolved configuration (the preset, then the flags given) as JSON and exit."),
        model: Optional[str] = typer.Option(None, **pd("model"), rich_help_panel="Model", help="open_clip name (ViT-B-16)" + (" or timm:<name>." if mode == "finetune" else ".")),
        pretrained: Optional[str] = path_option(tag_or_file, None, **pd("pretrained"), rich_help_panel="Model", help="Weight tag (openai) or local checkpoint path."),
        random_init: Optional[bool] = typer.Option(None, "--random-init", rich_help_panel="Model", help="Seeded random weights (tests, smoke runs)."),
        init_seed: Optional[int] = typer.Option(None, rich_help_panel="Model", help="Seed of --random-init weights."),
        student_run: Optional[Path] = path_option(existing_dir, None, "--student-run", "--student", **finetune_only, rich_help_panel="Model", help="finetune: start from a distilled student (the --out folder of its train run) instead of --model."),
        resolution: Optional[int] = typer.Option(None, **pd("resolution"), rich_help_panel="Model", help="Input size (default: the model's / the preset's)."),
        classnames: Optional[str] = path_option(classnames_arg, None, **pd("classnames"), rich_help_panel="Model", help="Class names for prompts and matching: folder, imagenet, or a JSON/text file."),
        templates: Optional[Templates] = typer.Option(None, **pd("templates"), rich_help_panel="Model", help="Prompt templates: openai (80) or simple (open_clip's)."),
        head: Optional[Head] = typer.Option(None, **finetune_only, **pd("head"), rich_help_panel="Model", help="finetune: fresh (FT-CLIP, mean-pooled tokens) or zeroshot (head from the text tower; writes init/ for WiSE-FT)."),
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
        overwrite: Optional[bool] = typer.Option(None, "--overwrite", rich_help_panel="Run", help="Replace the run in --out (removes only fdcache's files there)."),
        save_every: Optional[int] = typer.Option(None, rich_help_panel="Run", help="Checkpoint every N steps (and at the end)."),
        run_steps: Optional[int] = typer.Option(None, rich_help_panel="Run", help="Stop this invocation after N steps (checkpointed; --resume continues)."),
        log_every: Optional[int] = typer.Option(None, rich_help_panel="Run", help="Log every N steps (default: 1 on CPU, 10 on CUDA)."),
        workers: Optional[int] = typer.Option(None, rich_help_panel="Performance", help="DataLoader worker processes."),
        device: Optional[Device] = typer.Option(None, rich_help_panel="Performance", help="Where to train. [default: auto]"),
    ):
        from fdcache.tables import evals_table
        from fdcache.tune.finetune import finetune as run
        from fdcache.tune.finetune import make_config

        if mode == "flyp":
            given = {"--student-run": student_run, "--head": head, "--layer-decay": layer_decay, "--label-smoothing": label_smoothing,
                     "--mixup": mixup, "--cutmix": cutmix, "--auto-augment": auto_augment, "--reprob": reprob}
            wrong = [k for k, v in given.items() if v is not None]
            if wrong:
                raise ConfigError(f"fdcache finetune options given to flyp ({', '.join(wrong)}): flyp trains both "
                                  "towers with the CLIP loss; see fdcache flyp --help")
        if not print_config:
            for name, value in (("--out", out_), ("--data", data)):
                if value is None:
                    raise ConfigError(f"a required option is missing ({name}): give it, or --print-config to only "
                                      "print the settings")
        cfg = make_config(
            preset or None, mode=mode, out=str(out_) if out_ else "", data=str(data) if data else "",
            val=[str(v) for v in val] or None,
            model=model, pretrained=pretrained, random_init=random_init, init_seed=init_seed,
            student_run=str(student_run) if student_run else None, resolution=resolution, classnames=classnames,
            templates=value_of(templates), head=value_of(head), epochs=epochs, steps=steps, batch_size=batch_size,
            accum_steps=accum_steps, base_lr=lr, lr_batch=lr_batch, warmup_epochs=warmup_epochs,
            warmup_steps=warmup_steps, warmup_lr=warmup_lr, min_lr=min_lr, weight_decay=weight_decay,
            layer_decay=layer_decay, drop_path=drop_path, clip_grad=clip_grad, ema_decay=ema_decay,
            label_smoothing=label_smoothing, mixup=mixup, cutmix=cutmix, auto_augment=auto_augment,
            re_prob=reprob, crop_pct=crop_pct, freeze_patch_embed=freeze_patch_embed, amp=value_of(amp),
            compile=compile_, seed=seed, resume=resume, overwrite=overwrite, save_every=save_every, run_steps=run_steps,
            log_every=log_every, workers=workers, device=value_of(device), progress=sys.stderr.isatty())
        if print_config:
            shown = {k: (v if v != "" else None) for k, v in cfg.to_dict().items() if k != "progress"}
            out.print(json.dumps(shown, indent=2), highlight=False, soft_wrap=True)
            return
        r = run(cfg)
        if is_main():
            last = f"{r.losses[-1]:.4f}" if r.losses else "-"
            out.print(f"{mode}: {r.steps} step(s); last loss {last}; {r.images_per_s:,.1f} img/s"
                      + (f"; model {r.export}" if r.export else f"; checkpoint in {r.out}/checkpoints"))
            if r.evals:
                out.print(evals_table(r.evals[-1]["eval"]))

    command.__doc__ = doc
    return handles_errors(command)


@handles_errors
def eval_(
    data: list[Path] = path_option(existing_dir, ..., help="Eval image folder (repeatable: a val set and its distribution shifts)."),
    run: Optional[Path] = path_option(existing_dir, None, help="Output of fdcache finetune / flyp / wise (holds model.json)."),
    model: Optional[str] = typer.Option(None, help="Or: zero-shot evaluation of an open_clip model (ViT-B-16)."),
    pretrained: Optional[str] = path_option(tag_or_file, None, help="--model weights: tag (openai) or local path."),
    random_init: bool = typer.Option(False, "--random-init", help="--model with seeded random weights."),
    resolution: Optional[int] = typer.Option(None, help="--model input size."),
    templates: Templates = typer.Option(Templates.openai, help="--model prompt templates: openai or simple."),
    classnames: str = path_option(classnames_arg, "folder", help="Class names: folder, imagenet, or a JSON/text file."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Use model_ema.safetensors when the run kept an EMA."),
    crop_pct: Optional[float] = typer.Option(None, help="Centre-crop fraction (default: the run's)."),
    batch_size: int = typer.Option(128, help="Images per forward pass."),
    workers: int = typer.Option(4, help="DataLoader worker processes."),
    amp: Amp = typer.Option(Amp.auto, help="Autocast: auto is bf16 on CUDA, none on CPU."),
    device: Device = typer.Option(Device.auto, help="Where to evaluate."),
    json_out: Optional[str] = path_option(json_output, None, "--json", help=JSON_HELP),
):
    """Top-1 / top-5 on one or more image folders (classifier head, or zero-shot for CLIP models)."""
    from fdcache.tables import evals_table
    from fdcache.tune.evaluate import evaluate_run

    report = evaluate_run([str(p) for p in data], run=str(run) if run else None, model=model, pretrained=pretrained,
                          random_init=random_init, resolution=resolution, templates=value_of(templates),
                          classnames=classnames, ema=ema, crop_pct=crop_pct, batch_size=batch_size,
                          workers=workers, amp=value_of(amp), device=value_of(device), progress=True)
    if report is None:  # not rank 0
        return
    out.print(evals_table({report["weights"]: report["results"]}))
    if "shift_mean" in report:
        m = report["shift_mean"]
        out.print(f"mean over the {len(report['results']) - 1} set(s) after the first: top-1 "
                  f"{100 * m['top1']:.2f}, top-5 {100 * m['top5']:.2f}")
    if json_out:
        write_json(json_out, "eval", report)


@handles_errors
def wise(
    zeroshot: Path = path_option(existing_dir, ..., help="Zero-shot end: a run's init/ directory (or any export of the same model)."),
    finetuned: Path = path_option(existing_dir, ..., help="Fine-tuned end: the run's --out directory."),
    alpha: list[float] = typer.Option([0.5], metavar="ALPHA", help="Mixing weight of the fine-tuned model, in [0, 1] (repeatable for a sweep)."),
    out_: Path = path_option(output_dir, ..., "--out", "-o", help="Writes OUT/alpha-<a>/ per alpha."),
    data: list[Path] = path_option(existing_dir, [], help="Evaluate each alpha on these folders too (repeatable)."),
    classnames: str = path_option(classnames_arg, "folder", help="Class names for --data: folder, imagenet, or a file."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Fine-tuned end: EMA weights when kept."),
    batch_size: int = typer.Option(128, help="Images per forward pass (with --data)."),
    workers: int = typer.Option(4, help="DataLoader worker processes (with --data)."),
    device: Device = typer.Option(Device.auto, help="Where to evaluate."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace alpha-<a>/ exports already in --out."),
    json_out: Optional[str] = path_option(json_output, None, "--json", help=JSON_HELP),
):
    """WiSE-FT: (1 - alpha) * zero-shot + alpha * fine-tuned weights, for one alpha or a sweep."""
    from fdcache.tables import evals_table
    from fdcache.tune.wise import sweep

    rows = sweep(zeroshot, finetuned, alpha, out_, ema=ema, overwrite=overwrite, data=[str(x) for x in data], classnames=classnames,
                 batch_size=batch_size, workers=workers, device=value_of(device), progress=True)
    for a, p, _ in rows:
        out.print(f"alpha {a:.2f} -> {p}")
    results = {f"alpha={a:.2f}": r for a, _, r in rows if r is not None}
    if results:
        out.print(evals_table(results))
        sweep = {"finetuned": str(finetuned), "zeroshot": str(zeroshot), "results": results}
        write_json(str(out_ / "wise.json"), "wise", sweep)  # for fdcache plot OUT
        if json_out:
            write_json(json_out, "wise", sweep)


@handles_errors
def plot(
    path: Path = path_argument(existing_path, "PATH", help="A train/finetune/flyp --out directory, a wise --out directory (evaluated with --data), or a wise --json file."),
    out_: Optional[Path] = path_option(output_file, None, "--out", "-o", help="PNG to write (default: curves.png / wise.png beside the input)."),
):
    """Draw a run's loss/lr (and evaluation) curves from log.jsonl, or a WiSE-FT sweep as ID vs OOD top-1 (needs matplotlib: the plot extra)."""
    from fdcache.tools.plots import plot_path

    out.print(f"wrote {plot_path(path, out_)}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("finetune")(_tune_command("finetune", "ft-clip-vit-b16", """Supervised fine-tuning with the FT-CLIP recipe (layer-wise lr decay, EMA, cosine).

    Start from a CLIP image tower (--model ViT-B-16 --pretrained openai), a timm ViT
    (--model timm:<name>), or a distilled student (--student-run TRAIN_OUT). Every ingredient is a
    flag; --preset picks the paper's values. Multi-GPU: torchrun --nproc-per-node N -m fdcache finetune ..."""))
    app.command("flyp")(_tune_command("flyp", "flyp-imagenet", """FLYP: contrastive fine-tuning with class-name prompts (both towers, CLIP loss).

    Evaluates through a zero-shot head rebuilt from the fine-tuned text tower and writes
    OUT/init (the starting model) for `fdcache wise`."""))
    app.command("eval")(eval_)
    app.command()(wise)
    app.command()(plot)
