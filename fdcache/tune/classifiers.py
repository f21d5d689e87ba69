"""Models for fine-tuning and evaluation, and their export format.

Two kinds, described by a :class:`ModelSpec` that travels in ``model.json`` beside the
weights so an export rebuilds without downloading anything:

* ``classifier``: an image tower with a linear head. Towers: an open_clip CLIP image tower
  (``source=openclip``), a timm ViT (``timm``: e.g. ``vit_base_patch16_clip_224``), or a
  student exported by ``fdcache train`` (``student``). Heads: ``fresh`` is FT-CLIP's (mean
  of the patch tokens, a new LayerNorm, a new linear layer initialised near zero);
  ``zeroshot`` keeps CLIP's pooled, projected, L2-normalised embedding and starts the head
  from the text tower's zero-shot classifier times CLIP's logit scale (open_clip CLIP
  towers only; the WiSE-FT setting).
* ``clip``: the whole open_clip CLIP model (FLYP); it classifies through a zero-shot head
  rebuilt from its own text tower for whatever classes are asked.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FdcacheError, cause_of
from ..models import create_openclip, create_timm, openclip_name, parse_teacher_name
from ..userfiles import read_json

__all__ = ["TEMPLATES", "NO_DROP_PATH", "ModelSpec", "templates_of", "tokenizer_of", "zeroshot_weights",
           "CLIPImageClassifier", "SharedState", "ZeroShotClassifier", "read_student", "build", "init_model",
           "save_export", "library_forms", "read_clip_rest", "export_spec", "read_export", "load_export"]

TEMPLATES = ("openai", "simple")
NO_DROP_PATH = ("open_clip's CLIP towers have no drop path; use --drop-path 0, or the timm form of the "
                "model (e.g. --model timm:vit_base_patch16_clip_224)")


@dataclass(frozen=True)
class ModelSpec:
    kind: str  # classifier | clip
    source: str  # openclip | timm | student
    name: str  # open_clip or timm model name
    resolution: int
    mean: tuple
    std: tuple
    classnames: tuple = ()
    head: str = "fresh"  # classifier: fresh | zeroshot
    templates: str = "openai"
    pretrained: str | None = None  # as given at init (tag or checkpoint file name); informative
    drop_path: float = 0.0
    timm_kwargs: dict = field(default_factory=dict)
    crop_pct: float = 1.0  # evaluation: resize to resolution / crop_pct, centre crop

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"], d["classnames"] = list(self.mean), list(self.std), list(self.classnames)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        d["mean"], d["std"], d["classnames"] = tuple(d["mean"]), tuple(d["std"]), tuple(d["classnames"])
        return cls(**d)


def templates_of(name: str) -> list:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    try:
        return list({"openai": OPENAI_IMAGENET_TEMPLATES, "simple": SIMPLE_IMAGENET_TEMPLATES}[name])
    except KeyError:
        raise FdcacheError(f"--templates {name!r}: choose from {TEMPLATES}") from None


def tokenizer_of(spec: ModelSpec):
    import open_clip

    return open_clip.get_tokenizer(spec.name)


@torch.no_grad()
def zeroshot_weights(clip: nn.Module, tokenizer, classnames, templates: list) -> torch.Tensor:
    """``[embed_dim, C]``: per class, the mean of the L2-normalised embeddings of its prompts,
    normalised again (open_clip's builder, on the model's device, in eval mode)."""
    import open_clip

    was_training = clip.training
    clip.eval()
    device = next(clip.parameters()).device
    try:
        return open_clip.build_zero_shot_classifier(clip, tokenizer, list(classnames), templates,
                                                    num_classes_per_batch=10, device=device, use_tqdm=False)
    finally:
        clip.train(was_training)


class CLIPImageClassifier(nn.Module):
    """An open_clip CLIP image tower with a linear head (see the module doc for the heads)."""

    def __init__(self, visual: nn.Module, num_classes: int, head: str = "fresh"):
        super().__init__()
        self.visual = visual
        self.head_kind = head
        if head == "fresh":
            # FT-CLIP drops ln_post and the projection; unused parameters would also stall DDP.
            visual.ln_post, visual.proj = nn.Identity(), None
            width = visual.transformer.width
            self.fc_norm = nn.LayerNorm(width)
            self.head = nn.Linear(width, num_classes)
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            with torch.no_grad():
                self.head.weight.mul_(1e-3)
                self.head.bias.zero_()
        elif head == "zeroshot":
            self.fc_norm = None
            self.head = nn.Linear(visual.output_dim, num_classes)
        else:
            raise FdcacheError(f"--head {head!r}: choose fresh or zeroshot")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fc_norm is not None:
            tokens = self.visual.transformer(self.visual._embeds(x))
            return self.head(self.fc_norm(tokens[:, 1:].mean(1)))  # FT-CLIP: pool, then norm
        return self.head(F.normalize(self.visual(x), dim=-1))

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer ids for timm's layer-wise lr decay: stem, each block, then the rest."""
        return {"stem": r"^visual\.(?:class_embedding|positional_embedding|conv1|ln_pre)",
                "blocks": [(r"^visual\.transformer\.resblocks\.(\d+)", None),
                           (r"^visual\.(?:ln_post|proj)", (99999,))]}

    def no_weight_decay(self) -> set:
        return {"visual.class_embedding", "visual.positional_embedding"}


class SharedState(dict):
    """Tensors a model carries but does not train: copies of the model (its EMA) share them."""

    def __deepcopy__(self, memo):
        return self


class ZeroShotClassifier(nn.Module):
    """A CLIP model and class embeddings ``[D, C]``: logits = 100 * cos(image, class)."""

    def __init__(self, clip: nn.Module, weights: torch.Tensor):
        super().__init__()
        self.clip = clip
        self.register_buffer("weights", weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 100.0 * self.clip.encode_image(x, normalize=True) @ self.weights.to(x.dtype)


# -- building -----------------------------------------------------------------------------
def _student_kwargs(kwargs: dict, name: str, drop_path: float) -> dict:
    """FD's fine-tuning form of an exported student: mean pooling + fc_norm, drop path, and
    (BEiT) one relative position bias per block instead of the shared one. Swin and SwinV2
    keep their own head: the mean of the final-normed last-stage grid (FD's SwinV2 form)."""
    kw = dict(kwargs)
    for k in ("pretrained_cfg_overlay", "num_classes"):
        kw.pop(k, None)
    kw["drop_path_rate"] = drop_path
    if name.startswith("beit"):
        kw.update(use_shared_rel_pos_bias=False, use_rel_pos_bias=True, use_fc_norm=True, global_pool="avg")
    elif name.startswith("swin"):
        kw.update(global_pool="avg")
    else:
        kw.update(global_pool="avg", fc_norm=True)
    return kw


def _student_state(state: dict, model: nn.Module) -> dict:
    """Copy the shared rel-pos bias table into every block (BEiT's fine-tuning conversion);
    a final norm the classifier replaces by fc_norm after pooling goes (Swin keeps it)."""
    state = dict(state)
    table = state.pop("rel_pos_bias.relative_position_bias_table", None)
    state.pop("rel_pos_bias.relative_position_index", None)
    if table is not None:
        for i in range(len(model.blocks)):
            state[f"blocks.{i}.attn.relative_position_bias_table"] = table.clone()
    if "norm.weight" in model.state_dict():
        return state
    return {k: v for k, v in state.items() if not k.startswith("norm.")}


def read_student(path: str | Path) -> tuple[dict, dict]:
    """(``{"timm_name", "kwargs"}``, state dict) of an ``fdcache train`` export: its run
    directory (timm's layout: ``config.json`` + ``model.safetensors``) or that weights file."""
    from safetensors.torch import load_file

    path = Path(path)
    run = path if path.is_dir() else path.parent
    cfg = read_json(run / "config.json", "a run's config.json", "--student-run",
                    "give the --out folder of a finished fdcache train run") if (run / "config.json").is_file() else {}
    weights = run / "model.safetensors"
    if not isinstance(cfg, dict) or cfg.get("fdcache", {}).get("export", {}).get("kind") != "student" \
            or not weights.is_file():
        raise FdcacheError(f"--student {path}: expected the --out directory of a finished fdcache train run "
                           "(config.json + model.safetensors)")
    try:
        return {"timm_name": cfg["architecture"], "kwargs": dict(cfg.get("model_args", {}))}, load_file(str(weights))
    except Exception as e:  # a damaged config.json, a cut-short weights file
        raise FdcacheError(f"the student export in {run} is damaged ({cause_of(e)}) (--student-run): re-run its "
                           "fdcache train, or give another run") from None


def build(spec: ModelSpec, *, pretrained: str | None = None, student: str | None = None) -> nn.Module:
    """The model ``spec`` describes. ``pretrained`` (tag or path) / ``student`` (export) load
    initial weights; without them the weights are random (an export's are loaded after)."""
    n = len(spec.classnames)
    if spec.kind == "clip":
        return create_openclip(spec.name, pretrained, spec.resolution)
    if spec.source == "openclip":
        if spec.drop_path:
            raise FdcacheError(NO_DROP_PATH)
        clip = create_openclip(spec.name, pretrained, spec.resolution)
        return CLIPImageClassifier(clip.visual, n, spec.head)
    if spec.source in ("timm", "student"):
        model = create_timm(spec.name, pretrained, num_classes=n, **spec.timm_kwargs)
        if student is not None:
            _, state = read_student(student)
            state = _student_state(state, model)
            try:
                missing, unexpected = model.load_state_dict(state, strict=False)
            except RuntimeError as e:
                raise FdcacheError(f"student {student} does not fit {spec.name} with {spec.timm_kwargs} "
                                   f"(fine-tune at the resolution it was distilled at): {e}") from None
            fresh = [k for k in missing if not k.startswith(("head.", "fc_norm."))
                     and not k.endswith("relative_position_index")]
            if fresh or unexpected:
                raise FdcacheError(f"student {student} does not fit {spec.name} with {spec.timm_kwargs}: "
                                   f"missing {fresh[:5]}, unexpected {list(unexpected)[:5]}")
        return model
    raise FdcacheError(f"unknown model source {spec.source!r}")


def init_model(*, model: str | None, pretrained: str | None, random_init: bool, student: str | None,
               kind: str, classnames: list[str], head: str, templates: str, resolution: int | None,
               drop_path: float, init_seed: int = 0) -> tuple[nn.Module, ModelSpec]:
    """Build the starting model of a fine-tuning run (weights loaded, head initialised)."""
    if (model is None) == (student is None):
        raise FdcacheError("give exactly one of --model NAME (a CLIP / timm model) or --student RUN "
                           "(an fdcache train export)")
    if model is not None and not model.startswith("hf-hub:") and (pretrained is None) == (not random_init):
        raise FdcacheError(f"--model {model}: give --pretrained TAG|PATH (e.g. openai) or --random-init")
    size = {"img_size": resolution} if resolution else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        if student is not None:
            if kind != "classifier" or head != "fresh":
                raise FdcacheError("a distilled student has no text tower: fine-tune it with --head fresh")
            meta, _ = read_student(student)
            name = meta["timm_name"]
            spec = ModelSpec(kind="classifier", source="student", name=name, resolution=0, mean=(), std=(),
                             classnames=tuple(classnames), pretrained=Path(student).name, drop_path=drop_path,
                             timm_kwargs=_student_kwargs(meta["kwargs"], name, drop_path) | size)
            net = build(spec, student=student)
            return net, _with_timm_cfg(spec, net)
        source, name = parse_teacher_name(model)
        name = openclip_name(name, pretrained) if source == "openclip" else name
        if source == "timm":
            if kind != "classifier" or head != "fresh":
                raise FdcacheError(f"timm:{name} has no text tower: zero-shot heads and FLYP need an "
                                   "open_clip model (e.g. --model ViT-B-16 --pretrained openai)")
            # Mean pooling after the model's own final norm (fc_norm=False keeps the pretrained
            # norm, so a CLIP checkpoint loads strictly); open_clip towers get FT-CLIP's new fc_norm.
            spec = ModelSpec(kind="classifier", source="timm", name=name, resolution=0, mean=(), std=(),
                             classnames=tuple(classnames), pretrained=_label(pretrained), drop_path=drop_path,
                             timm_kwargs={"global_pool": "avg", "fc_norm": False, "drop_path_rate": drop_path} | size)
            net = build(spec, pretrained=pretrained)
            return net, _with_timm_cfg(spec, net)
        if drop_path:
            raise FdcacheError(NO_DROP_PATH)
        import open_clip

        clip = create_openclip(name, pretrained, resolution)
        visual = clip.visual
        size = visual.image_size
        spec = ModelSpec(kind=kind, source="openclip", name=name,
                         resolution=int(size[0] if isinstance(size, (tuple, list)) else size),
                         mean=tuple(float(v) for v in (visual.image_mean or open_clip.OPENAI_DATASET_MEAN)),
                         std=tuple(float(v) for v in (visual.image_std or open_clip.OPENAI_DATASET_STD)),
                         classnames=tuple(classnames),
                         head=head if kind == "classifier" else "zeroshot", templates=templates,
                         pretrained=_label(pretrained), drop_path=drop_path)
        if kind == "clip":
            return clip, spec
        classifier = CLIPImageClassifier(visual, len(classnames), head)
        if head == "zeroshot":
            w = zeroshot_weights(clip, tokenizer_of(spec), classnames, templates_of(templates))
            with torch.no_grad():
                classifier.head.weight.copy_(clip.logit_scale.exp() * w.T)
                classifier.head.bias.zero_()
            # The rest of the CLIP (text tower, logit scale): not trained, kept for the open_clip form.
            classifier.clip_rest = SharedState(
                {k: v.detach().cpu().clone() for k, v in clip.state_dict().items() if not k.startswith("visual.")})
        return classifier, spec


def _label(pretrained: str | None) -> str | None:
    return Path(pretrained).name if pretrained and Path(pretrained).exists() else pretrained


def _with_timm_cfg(spec: ModelSpec, model: nn.Module) -> ModelSpec:
    """Input size and mean/std from the built timm model's pretrained config."""
    cfg = model.pretrained_cfg
    return replace(spec, resolution=int(model.patch_embed.img_size[0]),
                   mean=tuple(float(v) for v in cfg.get("mean", (0.5,) * 3)),
                   std=tuple(float(v) for v in cfg.get("std", (0.5,) * 3)))


# -- export ---------------------------------------------------------------------------------
def save_export(out: str | Path, spec: ModelSpec, model: nn.Module | dict, ema: nn.Module | None = None,
                info: dict | None = None, clip_rest: dict | None = None) -> Path:
    """``model.json`` (the spec and ``info``), ``model.safetensors`` (a module's weights or a
    state dict) and, with an EMA, ``model_ema.safetensors``; then the files timm or open_clip
    read to load the same weights themselves (:mod:`fdcache.exports`). fdcache's own export is
    complete before those are tried: a library form that cannot be written is a warning,
    recorded in ``model.json``, not a lost run."""
    import warnings

    from ..exports import save_weights

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = _cpu_state(model)
    ema_state = _cpu_state(ema) if ema is not None else None
    save_weights(state, out / "model.safetensors")
    if ema_state is not None:
        save_weights(ema_state, out / "model_ema.safetensors")
    meta = {"spec": spec.to_dict(), "ema": ema is not None, **(info or {})}
    (out / "model.json").write_text(json.dumps(meta, indent=2))
    rest = clip_rest if clip_rest is not None else getattr(model, "clip_rest", None)
    try:
        meta["loads_with"] = library_forms(out, spec, model, state, ema_state, rest)
    except FdcacheError as e:
        meta["library_form_error"] = str(e)
        warnings.warn(f"{out}: fdcache's export is written, but not its timm/open_clip form: {e}", stacklevel=2)
    (out / "model.json").write_text(json.dumps(meta, indent=2))
    return out


def library_forms(out: Path, spec: ModelSpec, model: nn.Module | dict, state: dict,
                  ema_state: dict | None, clip_rest: dict | None = None) -> list[str]:
    """Write the timm / open_clip form of an export; returns the calls that load it."""
    from .. import exports

    if spec.kind == "clip":
        exports.write_openclip_config(out, spec.name, spec.resolution, spec.mean, spec.std)
        return [f"open_clip.create_model_and_transforms('local-dir:{out}')"]
    if spec.source in ("timm", "student"):
        net = model if isinstance(model, nn.Module) else _with_state(spec, state)
        args = spec.timm_kwargs | {"num_classes": len(spec.classnames), "img_size": spec.resolution}
        exports.write_timm_config(out, net, args, mean=spec.mean, std=spec.std, crop_pct=spec.crop_pct,
                                  label_names=spec.classnames)
        return [f"timm.create_model('local-dir:{out}', pretrained=True)"]
    if spec.source == "openclip" and spec.head == "fresh":
        # Checked against a CPU copy in fp32: the live model may sit on a GPU with TF32 convolutions.
        if exports.write_timm_from_openclip(out / "timm", spec, state, ema_state,
                                            check=_with_state(spec, state)) is not None:
            return [f"timm.create_model('local-dir:{out / 'timm'}', pretrained=True)"]
    if spec.source == "openclip" and spec.head == "zeroshot" and clip_rest is not None:
        exports.write_openclip_with_head(out / "open_clip", spec, state, clip_rest)
        return [f"open_clip.create_model_and_transforms('local-dir:{out / 'open_clip'}') + head.safetensors"]
    return []


def read_clip_rest(run: str | Path) -> dict | None:
    """The untrained rest of a zero-shot-headed run's CLIP (text tower, logit scale), from its
    open_clip form; None where the run has none."""
    from safetensors.torch import load_file

    path = Path(run) / "open_clip" / "open_clip_model.safetensors"
    if not path.is_file():
        return None
    return {k: v for k, v in load_file(str(path)).items() if not k.startswith("visual.")}


def _with_state(spec: ModelSpec, state: dict) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        model = build(spec)
    model.load_state_dict(state)
    return model


def _cpu_state(model: nn.Module | dict) -> dict:
    state = model if isinstance(model, dict) else model.state_dict()
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


_EXPORT_FIX = "give the --out folder of fdcache finetune/flyp/wise (re-run it if its files were damaged)"


def export_spec(path: str | Path) -> tuple[ModelSpec, dict]:
    """(spec, model.json) of an export or run directory, without its weights."""
    path = Path(path)
    if not (path / "model.json").is_file():
        raise FdcacheError(f"{path} holds no model.json: pass the --out directory of fdcache finetune/flyp/wise")
    meta = read_json(path / "model.json", "an export's model.json", str(path), _EXPORT_FIX)
    try:
        return ModelSpec.from_dict(meta["spec"]), meta
    except Exception as e:  # a model.json of another shape
        raise FdcacheError(f"the export in {path} is damaged ({cause_of(e)}) ({path / 'model.json'}): "
                           f"{_EXPORT_FIX}") from None


def read_export(path: str | Path, ema: bool = True) -> tuple[ModelSpec, dict, dict, str]:
    """(spec, model.json, state dict, which weights file) of an export or run directory."""
    from safetensors.torch import load_file

    path = Path(path)
    spec, meta = export_spec(path)
    file = "model_ema.safetensors" if ema and (path / "model_ema.safetensors").is_file() else "model.safetensors"
    try:
        state = load_file(str(path / file))
    except Exception as e:  # a missing or cut-short weights file
        raise FdcacheError(f"the export in {path} is damaged ({cause_of(e)}) ({path / file}): {_EXPORT_FIX}") from None
    return spec, meta, state, file


def load_export(path: str | Path, ema: bool = True) -> tuple[nn.Module, ModelSpec, str]:
    """Rebuild an export (random init, then its weights; nothing downloaded)."""
    spec, _, state, file = read_export(path, ema)
    return _with_state(spec, state), spec, file
