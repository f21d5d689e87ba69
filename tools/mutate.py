"""Mutation testing with hand-written mutants: does each small, realistic bug make a test fail?

Copies the package and the tests to a temporary directory (the working tree is never
touched), checks that the selected tests pass there unchanged, then applies the mutants of
``tools/mutants.py`` one at a time and runs only the tests listed for each. A mutant is
*killed* when a test fails, *survives* when all pass, and is *stale* when its ``old`` text
is no longer in the file (the code changed: update the mutant).

    python tools/mutate.py                    # every mutant; prints a table and the kill ratio
    python tools/mutate.py -k store -k wise   # mutants whose id contains one of the words
    python tools/mutate.py --list
    python tools/mutate.py --markdown docs/mutation-table.md
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Where each repository folder lives in the installed package (pyproject's package-dir).
PACKAGE_DIRS = {"fdcache": "fdcache", "kernels": "fdcache/kernels", "cli": "fdcache/cli"}


def load_mutants() -> list[tuple]:
    spec = importlib.util.spec_from_file_location("mutants", ROOT / "tools" / "mutants.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.MUTANTS


def make_copy(work: Path) -> None:
    """``work/src`` importable as the package (PYTHONPATH wins over the editable install)."""
    for folder, target in PACKAGE_DIRS.items():
        shutil.copytree(ROOT / folder, work / "src" / target,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
    shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", work / "pyproject.toml")


def copied(work: Path, file: str) -> Path:
    top, rest = file.split("/", 1)
    return work / "src" / PACKAGE_DIRS[top] / rest


def run_tests(work: Path, tests: list[str], timeout: float) -> tuple[str, float, str]:
    """Run every listed test (no -x: the table shows how many of them catch the mutant)."""
    env = dict(os.environ, PYTHONPATH=str(work / "src"), PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0, ""
    status = {0: "pass", 1: "fail"}.get(r.returncode, f"error (pytest exit {r.returncode})")
    return status, time.perf_counter() - t0, r.stdout[-2000:] + r.stderr[-2000:]


def caught_by(out: str) -> str:
    """'failed/run' from pytest's summary line."""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (failed|passed|error)", out)}
    failed = counts.get("failed", 0) + counts.get("error", 0)
    return f"{failed}/{failed + counts.get('passed', 0)}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", action="append", default=[], help="only mutants whose id contains this (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mutant (a timeout counts as killed)")
    ap.add_argument("--markdown", type=Path, help="also write the result table here")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selected tests")
    args = ap.parse_args(argv)

    mutants = [m for m in load_mutants() if not args.k or any(w in m[0] for w in args.k)]
    if args.list:
        for mid, file, *_ , tests in mutants:
            print(f"{mid:40s} {file:22s} {len(tests)} test(s)")
        return 0
    with tempfile.TemporaryDirectory(prefix="fdcache-mutate-") as tmp:
        work = Path(tmp)
        make_copy(work)
        if not args.no_baseline:
            tests = sorted({t for m in mutants for t in m[4]})
            status, secs, out = run_tests(work, tests, args.timeout * 2)
            print(f"baseline: {len(tests)} test selection(s) {status} in {secs:.0f}s", flush=True)
            if status != "pass":
                print(out)
                return 2
        rows = []
        for mid, file, old, new, tests in mutants:
            path = copied(work, file)
            source = path.read_text()
            if source.count(old) != 1:
                rows.append((mid, file, "stale", 0.0, f"'old' found {source.count(old)} times"))
                print(f"{mid:40s} stale", flush=True)
                continue
            path.write_text(source.replace(old, new))
            try:
                status, secs, out = run_tests(work, tests, args.timeout)
            finally:
                path.write_text(source)
            verdict = {"fail": "killed", "timeout": "killed (timeout)", "pass": "SURVIVED"}.get(status, status)
            note = f"{caught_by(out)} tests failed" if status in ("fail", "pass") else ""
            rows.append((mid, file, verdict, secs, note))
            print(f"{mid:40s} {verdict:16s} {note:18s} {secs:5.0f}s", flush=True)
    counted = [r for r in rows if r[2] != "stale"]
    killed = sum(r[2].startswith("killed") for r in counted)
    ratio = killed / max(len(counted), 1)
    summary = (f"{killed}/{len(counted)} mutants killed ({100 * ratio:.0f}%); "
               f"{len(rows) - len(counted)} stale; {sum(r[3] for r in rows):.0f}s of tests")
    print(summary)
    if args.markdown:
        lines = ["| mutant | file | result | tests that failed | seconds |", "|---|---|---|---|---|"]
        lines += [f"| `{m}` | `{f}` | {v} | {n} | {s:.0f} |" for m, f, v, s, n in rows]
        args.markdown.write_text("\n".join(lines + ["", summary, ""]))
    return 0 if all(r[2] != "SURVIVED" for r in counted) else 1


if __name__ == "__main__":
    sys.exit(main())
