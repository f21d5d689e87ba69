"""``fdcache finetune``, ``flyp``, ``eval`` and ``wise``: the fine-tuning side of the CLI.
Like the rest of the CLI, each command parses, calls one library function and prints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from fdcache.cli.app import _is_main, handles_errors, out


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
        student_run: Optional[Path] = typer.Option(None, "--student-run", "--student", help="finetune: an fdcache train --out directory (student.safetensors) instead of --model."),
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
            student_run=str(student_run) if student_run else None, resolution=resolution, classnames=classnames,
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
