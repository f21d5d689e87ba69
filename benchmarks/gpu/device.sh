#!/usr/bin/env bash
# Device side of the GPU check (run from the repo root on the GPU machine, one call per part):
#
#   bash benchmarks/gpu/device.sh .gpu/carry/pK           # copy part K to the machine's disk
#   bash benchmarks/gpu/device.sh .gpu/carry/pN check     # the last part, then the check
#
# Each call copies its part into $STAGE (kept while the machine stays warm), says which parts
# are still missing, and once every file of MANIFEST.json is there (chunks joined, sizes and
# sha256 checked) installs the wheels into $STAGE/site without an index. `check` installs this
# call's fdcache (editable, no build isolation) and runs benchmarks/gpu/check.py into $OUT. Made by
# benchmarks/gpu/prepare.sh, which prints these calls in order.
set -euo pipefail
part=${1:?usage: device.sh PART_DIR [check] [check.py options]}
shift
STAGE=${FDCACHE_GPU_STAGE:-/tmp/fdcache-gpu}
mkdir -p "$STAGE/in"
cp -r "$part"/. "$STAGE/in/"
echo "copied $(du -sh "$part" | cut -f1) from $part to $STAGE/in"

python3 - "$STAGE" <<'EOF'
import hashlib, json, os, sys
from pathlib import Path

stage = Path(sys.argv[1]); inbox = stage / "in"
m = json.loads((inbox / "MANIFEST.json").read_text())
missing = sorted({c["part"] for f in m["files"].values() for c in f["chunks"] if not (inbox / c["name"]).exists()})
if missing:
    print(f"parts still to copy: {', '.join(f'p{k}' for k in missing)} (of {m['parts']}); a part copied before "
          "the machine went back is gone with it: copy it again", flush=True)
    sys.exit(0)
for rel, f in m["files"].items():
    dst = stage / "files" / rel
    if not (dst.exists() and dst.stat().st_size == f["bytes"]):
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(dst, "wb") as out:
            for c in f["chunks"]:
                out.write((inbox / c["name"]).read_bytes())
    h = hashlib.sha256(dst.read_bytes()).hexdigest()
    if h != f["sha256"]:
        sys.exit(f"{rel}: sha256 {h} != {f['sha256']} from MANIFEST.json: copy its parts again")
(stage / "complete").write_text("ok")
print(f"all {len(m['files'])} files present and checked", flush=True)
EOF

if [[ -f $STAGE/complete && ! -f $STAGE/installed ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$STAGE/site" "$STAGE"/files/wheels/*.whl
  touch "$STAGE/installed"
  echo "installed $(ls "$STAGE"/files/wheels/*.whl | wc -l) wheels into $STAGE/site"
fi

[[ ${1:-} == check ]] || exit 0
shift
[[ -f $STAGE/installed ]] || { echo "not every part is here yet: the check needs all of them"; exit 3; }
export PYTHONPATH=$STAGE/site${PYTHONPATH:+:$PYTHONPATH}
# this call's working tree (editable: fdcache.kernels and fdcache.cli map to kernels/ and cli/)
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec python3 benchmarks/gpu/check.py --out "${OUT:?OUT is the device call's result folder}" \
  --real-weights "$STAGE/files/real/vit_s14_224_fp16.pth" --photos "$STAGE/files/real/photos" "$@"
