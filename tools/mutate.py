"""Mutation testing with mutmut, in the package's installed layout (not part of CI).

mutmut names each mutant after its file's path (``src/fdcache/store/views.py`` ->
``fdcache.store.views.x_sample_view__mutmut_3``) and switches it on only inside functions whose
``__module__`` is that name. This repository installs ``kernels/`` and ``cli/`` as
``fdcache.kernels`` and ``fdcache.cli`` (pyproject's ``package-dir``), so run from the root,
mutmut would name ``kernels/loss.py``'s mutants ``kernels.loss.*`` and never switch one on (and
the editable install would import the unmutated copy). This script lays the package out as it
is installed, in ``.mutmut/`` (git-ignored): ``src/fdcache`` with ``kernels`` and ``cli`` inside,
plus ``pyproject.toml``, whose ``[tool.mutmut]`` table is the configuration (which modules,
which files the tests read). Then it runs ``mutmut`` there with your arguments. Files are
copied only when their bytes changed, so mutmut keeps the results of unchanged functions
between runs; the working tree is never touched.

mutmut first runs the whole suite once and records which tests reach each function; each
mutant then runs only those tests (``-x``: the first failure kills it). Subprocesses started by
the tests (``python -m fdcache``, torchrun) import the mutated package too (``PYTHONPATH``).

    nice -n 19 python tools/mutate.py run --max-children 1 "fdcache.store.views.*"
    python tools/mutate.py results                      # survivors (mutmut's own listing)
    python tools/mutate.py show fdcache.store.views.x_sample_view__mutmut_3
    python tools/mutate.py score                        # per-module table for docs/testing.md

``score`` counts the equivalent mutants listed in docs/testing.md ("Equivalent mutants").
"""

from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / ".mutmut"
# Repository folder -> where it lives in the installed package (pyproject's package-dir).
LAYOUT = {"fdcache": "src/fdcache", "kernels": "src/fdcache/kernels", "cli": "src/fdcache/cli"}
FILES = ("pyproject.toml", "README.md")
FOLDERS = ("tests", "docs")
DOC = ROOT / "docs" / "testing.md"


def _sync_file(src: Path, dst: Path) -> None:
    if dst.exists() and filecmp.cmp(src, dst, shallow=False):
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)  # a changed file gets the source's newer mtime: mutmut regenerates it


def _sync_tree(src: Path, dst: Path) -> None:
    want = {p.relative_to(src) for p in src.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    for rel in want:
        _sync_file(src / rel, dst / rel)
    if dst.exists():  # files deleted from the source go from the stage too
        for p in dst.rglob("*"):
            rel = p.relative_to(dst)
            if p.is_file() and rel not in want and "__pycache__" not in p.parts and not _nested(rel):
                p.unlink()


def _nested(rel: Path) -> bool:
    """A path under another mapped folder (``fdcache/kernels`` is ``kernels/``'s)."""
    return rel.parts[0] in ("kernels", "cli")


def stage() -> Path:
    """``.mutmut/``: the installed layout of the package, the tests and the files they read."""
    for folder, target in LAYOUT.items():
        _sync_tree(ROOT / folder, STAGE / target)
    for name in FILES:
        _sync_file(ROOT / name, STAGE / name)
    for name in FOLDERS:
        _sync_tree(ROOT / name, STAGE / name)
    # mutmut runs the tests from mutants/ with mutants/src first on sys.path; subprocesses get
    # it from PYTHONPATH, which must name a folder that exists when Python starts.
    (STAGE / "mutants" / "src").mkdir(parents=True, exist_ok=True)
    return STAGE


def module_of(key: str) -> str:
    return key.split(".x_")[0].split(".xǁ")[0]


def equivalent_mutants(doc: Path = DOC) -> dict[str, str]:
    """``{mutant name: why}`` from docs/testing.md's table of equivalent mutants."""
    text = doc.read_text() if doc.exists() else ""
    section = text.split("### Equivalent mutants", 1)[-1] if "### Equivalent mutants" in text else ""
    return dict(re.findall(r"^\| `([\w.ǁ]+__mutmut_\d+)` \| (.+?) \|$", section, flags=re.M))


def score(stage_dir: Path = STAGE) -> list[dict]:
    """Per module: mutants, killed, survived, timeouts, no tests, not checked, equivalent."""
    equivalent = equivalent_mutants()
    rows: dict[str, Counter] = {}
    status = {1: "killed", 3: "killed", 0: "survived", 36: "timeout", 24: "timeout", -24: "timeout",
              152: "timeout", 255: "timeout", 5: "no tests", 33: "no tests", None: "not checked"}
    for meta in sorted((stage_dir / "mutants").rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        for key, code in codes.items():
            c = rows.setdefault(module_of(key), Counter())
            c["mutants"] += 1
            verdict = status.get(code, "other")
            if verdict == "survived" and key in equivalent:
                verdict = "equivalent"
            c[verdict] += 1
    out = []
    for module, c in sorted(rows.items()):
        live = c["mutants"] - c["equivalent"] - c["no tests"] - c["not checked"]
        caught = c["killed"] + c["timeout"]
        out.append({"module": module, **{k: c[k] for k in ("mutants", "killed", "timeout", "survived",
                                                          "equivalent", "no tests", "not checked")},
                    "score": caught / live if live else None})
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| module | mutants | killed | timeouts | survived | equivalent | no tests | not run | score |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = "" if r["score"] is None else f"{100 * r['score']:.1f}%"
        lines.append(f"| `{r['module']}` | {r['mutants']} | {r['killed']} | {r['timeout']} | {r['survived']} | "
                     f"{r['equivalent']} | {r['no tests']} | {r['not checked']} | {s} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv[:1] == ["score"]:
        print(markdown(score()))
        return 0
    if argv[:1] == ["stage"]:
        print(stage())
        return 0
    where = stage()
    env = dict(os.environ, PYTHONPATH=str(where / "mutants" / "src"), OMP_NUM_THREADS="1",
               PYTHONDONTWRITEBYTECODE="1")
    return subprocess.call([sys.executable, "-m", "mutmut", *argv], cwd=where, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
