"""What the air-gapped GPU machine lacks, fetched here and cut into device calls.

    python benchmarks/gpu/carry.py wheels --dest .gpu/wheels     # the dependency closure
    python benchmarks/gpu/carry.py photos --dest .gpu/real/photos
    python benchmarks/gpu/carry.py pack --src .gpu --out .gpu/carry

``wheels`` resolves what ``import fdcache`` and the GPU path need (fdcache's dependencies from
pyproject.toml, every extra a wheel's metadata names, recursively) for the device's Python
(3.12, manylinux x86_64) and downloads, one ``pip download --no-deps`` each, every package
that ``device-packages.txt`` (the device image's list) does not hold. Versions are pinned to
the ones installed here when they satisfy the requirement: the versions CI tests with.
``pack`` splits files over the part size and packs them into ``out/p1``, ``out/p2``, ... so
that each fits one device call (64 MiB with the working tree), writes ``MANIFEST.json``
(every file's size, sha256 and chunks) into every part, and prints the calls in order.
The device side is ``device.sh``.
"""

from __future__ import annotations

import argparse
import email.parser
import hashlib
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PYTHON = "3.12"
# pip matches manylinux_2_N exactly: list every N a wheel of the closure may carry.
PLATFORMS = ["manylinux1_x86_64", "manylinux2014_x86_64"] + [f"manylinux_2_{n}_x86_64" for n in range(5, 40)]
EXTRA_ROOTS = ["pytest"]  # the check runs the test suite's GPU tests
MiB = 1 << 20
CALL_LIMIT = 64 * MiB  # one device call: working tree + carried paths
PART_MAX = 60_000_000


def device_packages(path: Path = HERE / "device-packages.txt") -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            names.update(canonicalize_name(n) for n in line.split())
    return names


def marker_env(extra: str = "") -> dict:
    env = default_environment()
    env.update(python_version=PYTHON, python_full_version=f"{PYTHON}.3", platform_system="Linux",
               sys_platform="linux", platform_machine="x86_64", implementation_name="cpython",
               platform_python_implementation="CPython", os_name="posix", extra=extra)
    return env


def applies(req: Requirement, extras: set[str]) -> bool:
    """Whether ``req`` holds on the device, for a parent installed with ``extras``."""
    return req.marker is None or any(req.marker.evaluate(marker_env(e)) for e in extras | {""})


def pinned(req: Requirement) -> str:
    """``name==version`` of the copy installed here when it satisfies ``req``, else ``req``."""
    try:
        here = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        return f"{req.name}{req.specifier}"
    return f"{req.name}=={here}" if req.specifier.contains(here, prereleases=True) else f"{req.name}{req.specifier}"


def download(spec: str, dest: Path) -> Path:
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", PYTHON, "--implementation", "cp", "--abi", "cp312", "--abi", "abi3",
           "--abi", "none", *(a for p in PLATFORMS for a in ("--platform", p)), "-d", str(dest), spec]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"pip could not download {spec} for Python {PYTHON} manylinux x86_64:\n{r.stderr[-2000:]}")
    new = set(dest.glob("*.whl")) - before
    if not new:  # already there from an earlier run
        name = canonicalize_name(Requirement(spec).name)
        new = {w for w in before if canonicalize_name(w.name.split("-")[0]) == name}
    return sorted(new)[-1]


def wheel_requires(wheel: Path) -> tuple[str, str, list[Requirement]]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(z.read(meta).decode())
    return msg["Name"], msg["Version"], [Requirement(r) for r in msg.get_all("Requires-Dist") or []]


def resolve(dest: Path) -> list[dict]:
    """Download the closure into ``dest``; returns one record per wheel (and why it is there)."""
    dest.mkdir(parents=True, exist_ok=True)
    have = device_packages()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [(r, "fdcache") for r in map(Requirement, project["dependencies"] + EXTRA_ROOTS) if applies(r, set())]
    extras: dict[str, set[str]] = {}
    got: dict[str, dict] = {}
    skipped: dict[str, list[str]] = {}
    while todo:
        req, why = todo.pop(0)
        name = canonicalize_name(req.name)
        if name in have:
            skipped.setdefault(name, []).append(why)
            continue
        new_extras = set(req.extras) - extras.get(name, set())
        extras.setdefault(name, set()).update(req.extras)
        if name in got:
            got[name]["required_by"].append(why)
            if not new_extras:
                continue
        else:
            wheel = download(pinned(req), dest)
            n, v, requires = wheel_requires(wheel)
            got[name] = {"name": n, "version": v, "file": wheel.name, "bytes": wheel.stat().st_size,
                         "required_by": [why], "requires": requires}
        label = got[name]["name"] + (f"[{','.join(sorted(extras[name]))}]" if extras[name] else "")
        todo += [(r, label) for r in got[name]["requires"] if applies(r, extras[name])]
    records = [{k: v for k, v in g.items() if k != "requires"} for g in got.values()]
    keep = {r["file"] for r in records}
    for stale in dest.glob("*.whl"):  # an earlier run's other versions: two of one package stop the install
        if stale.name not in keep:
            stale.unlink()
    (dest / "wheels.json").write_text(json.dumps({"python": PYTHON, "wheels": records,
                                                  "already_on_device": sorted(skipped)}, indent=1))
    return records


def photos(dest: Path) -> Path:
    """foolbox's 20 ImageNet photos as an ImageFolder (benchmarks/real_features.py's layout)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from real_features import photo_folder

    return photo_folder(dest)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def tree_bytes() -> int:
    """What every device call sends besides its carried paths: tracked and untracked,
    not-ignored files of the checkout."""
    r = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                       capture_output=True, check=True)
    return sum((ROOT / p).stat().st_size for p in r.stdout.decode().split("\0") if p and (ROOT / p).is_file())


def pack(src: Path, out: Path, part_max: int) -> list[list[str]]:
    """Files under ``src`` (``out`` aside) into ``out/p1..pk``, largest first, each into the
    first part with room; files over ``part_max`` travel as chunks of it."""
    if out.exists():  # an earlier pack: only its part folders
        strangers = [p.name for p in out.iterdir() if not (p.is_dir() and re.fullmatch(r"p\d+", p.name))]
        if strangers:
            raise SystemExit(f"{out} holds {', '.join(strangers[:5])}, which pack did not write: give another --out")
        shutil.rmtree(out)
    files = sorted(p for p in src.rglob("*") if p.is_file() and out not in p.parents and p.name != "wheels.json")
    manifest = {"files": {}}
    pieces = []  # (name in the part, source file, offset, size)
    for p in files:
        rel, size = p.relative_to(src).as_posix(), p.stat().st_size
        manifest["files"][rel] = {"bytes": size, "sha256": sha256(p), "chunks": []}
        if size <= part_max:
            pieces.append((rel, p, 0, size))
        else:
            pieces += [(f"{rel}.chunk-{k:02d}", p, off, min(part_max, size - off))
                       for k, off in enumerate(range(0, size, part_max))]
    parts: list[list] = []  # [names, bytes]
    for name, p, off, size in sorted(pieces, key=lambda c: -c[3]):
        part = next((q for q in parts if q[1] + size <= part_max), None)
        if part is None:
            part = [[], 0]
            parts.append(part)
        part[0].append(name); part[1] += size
        k = parts.index(part) + 1
        target = out / f"p{k}" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "rb") as f:
            f.seek(off)
            target.write_bytes(f.read(size))
        manifest["files"][name.partition(".chunk-")[0]]["chunks"].append({"name": name, "part": k})
    for f in manifest["files"].values():
        f["chunks"].sort(key=lambda c: c["name"])
    manifest["parts"] = len(parts)
    for k in range(1, len(parts) + 1):
        (out / f"p{k}" / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
    return [names for names, _ in parts]


def describe(names: list[str]) -> str:
    wheels = sorted({Path(n).name.split("-")[0] for n in names if ".whl" in n})
    photos = sum(n.endswith(".jpg") for n in names)
    other = [Path(n).name for n in names if ".whl" not in n and not n.endswith(".jpg")]
    return ", ".join(wheels + other + ([f"{photos} photos"] if photos else []))


def print_plan(out: Path, parts: list[list[str]]) -> None:
    rel = out.resolve().relative_to(ROOT).as_posix()
    tree = tree_bytes()
    print(f"\n{len(parts)} device calls, back to back (the machine goes back ~30 s after a call and a fresh "
          f"one starts bare; device.sh says which parts are missing):")
    for k in range(1, len(parts) + 1):
        size = sum(p.stat().st_size for p in (out / f"p{k}").rglob("*") if p.is_file())
        last = k == len(parts)
        cmd = f"bash benchmarks/gpu/device.sh {rel}/p{k}" + (" check" if last else "")
        what = describe(parts[k - 1]) + ("; then the check (at most 9 min)" if last else "")
        print(f"  {k}. run(carry=['{rel}/p{k}'], timeout_s={600 if last else 120}, command='{cmd}')"
              f"\n     {size / MiB:.1f} MiB + tree {tree / MiB:.1f} MiB: {what}")
    print("Results: gpu.json and gpu.log under the last call's files_at (docs/benchmarks.md, GPU section).")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wheels"); w.add_argument("--dest", type=Path, required=True)
    ph = sub.add_parser("photos"); ph.add_argument("--dest", type=Path, required=True)
    pk = sub.add_parser("pack"); pk.add_argument("--src", type=Path, required=True)
    pk.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.cmd == "wheels":
        records = resolve(args.dest)
        for r in sorted(records, key=lambda r: -r["bytes"]):
            needed_by = ", ".join(sorted(set(r["required_by"])))
            print(f"  {r['bytes'] / 1e6:7.1f} MB  {r['name']} {r['version']}  <- {needed_by}")
        print(f"  {sum(r['bytes'] for r in records) / 1e6:7.1f} MB in {len(records)} wheels")
    elif args.cmd == "photos":
        print(photos(args.dest))
    else:
        part_max = min(PART_MAX, CALL_LIMIT - tree_bytes() - 2 * MiB)
        print_plan(args.out, pack(args.src, args.out, part_max))


if __name__ == "__main__":
    main()
