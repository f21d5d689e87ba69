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

Modules too big for a full run on this machine are estimated from a seeded random sample of
their mutants (random mutant sampling: the score of a simple random sample of mutants
estimates the score of all of them, with a binomial confidence interval):

    nice -n 19 python tools/mutate.py sample 400 --seed 23 "fdcache.*"   # draw, then mutmut's stats run
    nice -n 19 python tools/mutate.py sample-run 300 --jobs 2   # the drawn mutants, each in its own pytest -x
    python tools/mutate.py score --sample        # the sample's caught / evaluated and its 95% interval

(``sample ... --run`` hands the drawn names to mutmut's own loop instead, which first reruns
every covering test clean, by node id.)

``sample`` runs in its own stage, ``.mutmut-sample/``, whose test selection is the whole suite
but ``tests/test_gpu_check.py`` and the tool's own tests (``SAMPLE_TESTS``; the per-module runs use pyproject's narrower selection; mutmut
resets every result when the selection changes, so the two keep separate stages). The drawn
names, the seed and the patterns are written to ``.mutmut-sample/sample.json`` and the same
seed over the same code draws the same names. ``--debug`` (before the subcommand) sets
mutmut's ``debug = true`` in the staged configuration: every pytest call and exit code shown.
"""

from __future__ import annotations

import filecmp
import fnmatch
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / ".mutmut"
SAMPLE_STAGE = ROOT / ".mutmut-sample"
# The sample's test selection: every test that runs in the staged layout (the GPU check runs
# benchmarks/gpu/ and this tool's own tests import tools/: neither is staged).
SAMPLE_TESTS = ["tests", "--ignore=tests/test_gpu_check.py", "--ignore=tests/test_mutate_tool.py"]
# Repository folder -> where it lives in the installed package (pyproject's package-dir).
LAYOUT = {"fdcache": "src/fdcache", "kernels": "src/fdcache/kernels", "cli": "src/fdcache/cli"}
FILES = ("README.md",)  # pyproject.toml: see _config
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


def _config(tests: list[str] | None, debug: bool) -> str:
    """pyproject.toml as staged: ``tests`` replaces the test selection, ``debug`` is mutmut's."""
    text = (ROOT / "pyproject.toml").read_text()
    if tests is not None:
        text, n = re.subn(r"^pytest_add_cli_args_test_selection = \[.*?\]\n",
                          f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n", text,
                          flags=re.M | re.S)
        assert n == 1, "pyproject.toml: [tool.mutmut] has no pytest_add_cli_args_test_selection"
    if debug:
        text = text.replace("[tool.mutmut]\n", "[tool.mutmut]\ndebug = true\n", 1)
    return text


def stage(where: Path = STAGE, tests: list[str] | None = None, debug: bool = False) -> Path:
    """``where``: the installed layout of the package, the tests and the files they read."""
    for folder, target in LAYOUT.items():
        _sync_tree(ROOT / folder, where / target)
    for name in FILES:
        _sync_file(ROOT / name, where / name)
    config = _config(tests, debug)
    if not (where / "pyproject.toml").exists() or (where / "pyproject.toml").read_text() != config:
        (where / "pyproject.toml").write_text(config)
    for name in FOLDERS:
        _sync_tree(ROOT / name, where / name)
    # mutmut runs the tests from mutants/ with mutants/src first on sys.path; subprocesses get
    # it from PYTHONPATH, which must name a folder that exists when Python starts.
    (where / "mutants" / "src").mkdir(parents=True, exist_ok=True)
    return where


def module_of(key: str) -> str:
    return key.split(".x_")[0].split(".xǁ")[0]


def _listed(heading: str, doc: Path = DOC) -> dict[str, str]:
    """``{mutant name: second column}`` of the table under docs/testing.md's ``heading``."""
    text = doc.read_text() if doc.exists() else ""
    section = text.split(heading, 1)[1].split("\n#", 1)[0] if heading in text else ""
    return dict(re.findall(r"^\| `([\w.ǁ]+__mutmut_\d+)` \| (.+?) \|$", section, flags=re.M))


def equivalent_mutants(doc: Path = DOC) -> dict[str, str]:
    """``{mutant name: why}`` from docs/testing.md's table of equivalent mutants."""
    return _listed("### Equivalent mutants", doc)


def caught_outside_the_map(doc: Path = DOC) -> dict[str, str]:
    """``{mutant name: test}``: survivors of mutmut's run that a test it does not map to their
    function catches (a torchrun or CLI subprocess: the stats run traces this process only),
    each shown by running that test with the mutant switched on."""
    return _listed("### Caught outside mutmut's map", doc)


STATUS = {1: "killed", 3: "killed", 0: "survived", 36: "timeout", 24: "timeout", -24: "timeout",
          152: "timeout", 255: "timeout", 5: "no tests", 33: "no tests", None: "not checked"}


def verdicts(stage_dir: Path = STAGE) -> dict[str, str]:
    """``{mutant name: verdict}`` from mutmut's result files; listed equivalents say so."""
    equivalent = equivalent_mutants()
    out = {}
    for meta in sorted((stage_dir / "mutants").rglob("*.py.meta")):
        for key, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            verdict = STATUS.get(code, "other")
            out[key] = "equivalent" if verdict in ("survived", "no tests") and key in equivalent else verdict
    return out


def score(stage_dir: Path = STAGE) -> list[dict]:
    """Per module: mutants, killed, timeouts, survived, equivalent, no tests, not checked.

    A mutant no selected test reaches ("no tests") is not caught: it counts against the score."""
    rows: dict[str, Counter] = {}
    for key, verdict in verdicts(stage_dir).items():
        c = rows.setdefault(module_of(key), Counter())
        c["mutants"] += 1
        c[verdict] += 1
    out = []
    for module, c in sorted(rows.items()):
        live = c["mutants"] - c["equivalent"] - c["not checked"]
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


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion k/n (95% by default)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def draw(names: list[str], patterns: list[str], n: int, seed: int) -> list[str]:
    """``n`` of the mutants matching ``patterns``, drawn without replacement by ``seed``."""
    pool = sorted(k for k in names if any(fnmatch.fnmatch(k, p) for p in patterns))
    if n > len(pool):
        raise SystemExit(f"error: {n} mutants asked for, {len(pool)} match {patterns}")
    return sorted(random.Random(seed).sample(pool, n))


def sample_score(stage_dir: Path = SAMPLE_STAGE) -> str:
    """The drawn mutants' verdicts: caught / (evaluated - equivalent) and its 95% interval.

    Counted: the longest run of the seeded evaluation order (``sample-run``'s) with a verdict
    each, so a sample cut short is still a random subsample; mutants evaluated beyond it are
    listed, not counted. "not finished" (over the time limit) is left out and listed."""
    drawn = json.loads((stage_dir / "sample.json").read_text())
    got = verdicts(stage_dir)
    equivalent = equivalent_mutants()
    got.update({k: ("equivalent" if v in ("survived", "no tests") and k in equivalent
                    else "killed" if v == "exit 4" else v)
                for k, v in drawn.get("verdicts", {}).items()})
    order = list(drawn["names"])
    random.Random(drawn["seed"]).shuffle(order)
    prefix = []
    for k in order:
        if got.get(k, "not checked") == "not checked":
            break
        prefix.append(k)
    c = Counter(got[k] for k in prefix)
    live = len(prefix) - c["equivalent"] - c["not finished"]
    caught = c["killed"] + c["timeout"]
    lo, hi = wilson(caught, live)
    plo, phi = wilson(caught, live + c["not finished"])
    outside = [k for k in prefix if got[k] in ("survived", "no tests") and k in caught_outside_the_map()]
    olo, ohi = wilson(caught + len(outside), live)
    by_module = Counter(module_of(k) for k in prefix)
    lines = [f"seed {drawn['seed']}: {len(drawn['names'])} of {drawn['pool']} mutants drawn from "
             f"{' '.join(drawn['patterns'])}; {len(prefix)} evaluated in the seeded order",
             "verdicts: " + ", ".join(f"{v} {c[v]}" for v in sorted(c)),
             f"estimate: {caught}/{live} = {100 * caught / live:.1f}% caught, 95% Wilson interval "
             f"{100 * lo:.1f}-{100 * hi:.1f}%" if live else "estimate: nothing evaluated yet",
             f"counting the {c['not finished']} not finished as not caught: {caught}/{live + c['not finished']} = "
             f"{100 * caught / (live + c['not finished']):.1f}%, interval {100 * plo:.1f}-{100 * phi:.1f}%"
             if c["not finished"] else "",
             f"with the {len(outside)} caught by tests outside mutmut's map: {caught + len(outside)}/{live} = "
             f"{100 * (caught + len(outside)) / live:.1f}%, interval {100 * olo:.1f}-{100 * ohi:.1f}%"
             if outside else "",
             "evaluated per module: " + ", ".join(f"{m} {k}" for m, k in sorted(by_module.items()))]
    lines += [f"  {got[k]}{' (caught outside the map)' if k in outside else ''}: {k}" for k in prefix
              if got[k] not in ("killed", "timeout")]
    lines += [f"  evaluated out of order, not counted: {k} ({got[k]})" for k in order[len(prefix):]
              if got.get(k, "not checked") != "not checked"]
    return "\n".join(line for line in lines if line)


def _mutmut(where: Path, argv: list[str]) -> int:
    env = dict(os.environ, PYTHONPATH=str(where / "mutants" / "src"), OMP_NUM_THREADS="1",
               PYTHONDONTWRITEBYTECODE="1")
    return subprocess.call([sys.executable, "-m", "mutmut", *argv], cwd=where, env=env)


# mutmut's own generation step (what ``mutmut run`` does before its stats run), alone: the
# names must exist before they are drawn, and a run would first run the whole selection twice.
_GENERATE = """
import os
from mutmut.__main__ import create_mutants, store_lines_covered_by_tests
from mutmut.mutation.trampoline import set_mutant_under_test
from mutmut.utils.file_utils import copy_also_copy_files, copy_src_dir, setup_source_paths
set_mutant_under_test("mutant_generation")
os.makedirs("mutants", exist_ok=True)
copy_src_dir(); copy_also_copy_files(); setup_source_paths(); store_lines_covered_by_tests()
create_mutants(1)
"""

# mutmut's stats run alone (the first step of ``mutmut run``): which tests reach each function,
# and each test's call time. The run's next step, every covering test rerun clean by node id,
# is left out: sample-run evaluates the drawn mutants itself.
_STATS = """
from mutmut.__main__ import collect_or_load_stats
from mutmut.workers.isolation import get_mutant_runner
collect_or_load_stats(get_mutant_runner(1), apply_config_invalidation=True)
"""


def _generate(where: Path) -> None:
    subprocess.run([sys.executable, "-c", _GENERATE], cwd=where, check=True,
                   env=dict(os.environ, PYTHONPATH=str(where / "mutants" / "src")))


def sample(argv: list[str], debug: bool) -> int:
    """``sample N --seed S [--max-children K] PATTERN...``: draw, record, run the drawn names."""
    n, rest = int(argv[0]), argv[1:]
    seed = int(rest[rest.index("--seed") + 1]) if "--seed" in rest else 0
    children = rest[rest.index("--max-children") + 1] if "--max-children" in rest else "1"
    patterns = [a for i, a in enumerate(rest) if not a.startswith("--")
                and (i == 0 or rest[i - 1] not in ("--seed", "--max-children"))]
    where = stage(SAMPLE_STAGE, SAMPLE_TESTS, debug)
    _generate(where)
    names = list(verdicts(where))
    drawn = draw(names, patterns or ["*"], n, seed)
    pool = sum(any(fnmatch.fnmatch(k, p) for p in patterns or ["*"]) for k in names)
    (where / "sample.json").write_text(json.dumps(
        {"seed": seed, "patterns": patterns or ["*"], "pool": pool, "names": drawn}, indent=1))
    if "--run" in rest:  # mutmut's own loop: every covering test clean first, then the mutants
        return _mutmut(where, ["run", "--max-children", children, *drawn])
    env = dict(os.environ, PYTHONPATH=str(where / "mutants" / "src"), OMP_NUM_THREADS="1",
               PYTHONDONTWRITEBYTECODE="1")
    return subprocess.call([sys.executable, "-c", _STATS], cwd=where, env=env)


def covering_tests(stats: dict, name: str) -> list[str]:
    """The tests mutmut's stats run recorded for ``name``'s function, a file at a time (a
    module-scoped fixture is set up once), the files with the least recorded call time first
    (a mutant most tests catch fails in the cheapest file), in the stats run's order inside."""
    rank = {t: i for i, t in enumerate(stats["duration_by_test"])}
    tests = stats["tests_by_mangled_function_name"].get(re.sub(r"__mutmut_\d+$", "", name), [])
    files: dict[str, list[str]] = {}
    for t in sorted(tests, key=lambda t: rank.get(t, len(rank))):
        files.setdefault(t.split("::")[0], []).append(t)
    cost = {f: sum(stats["duration_by_test"].get(t, 0.0) for t in ts) for f, ts in files.items()}
    return [t for f in sorted(files, key=lambda f: (cost[f], f)) for t in files[f]]


def _evaluate(stage_dir: Path, name: str, tests: list[str], limit_s: int) -> str:
    env = dict(os.environ, MUTANT_UNDER_TEST=name, PYTHONPATH=str(stage_dir / "mutants" / "src"),
               OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    p = subprocess.Popen([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                         cwd=stage_dir / "mutants", env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        code = p.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        p.wait()
        return "not finished"
    # 1: a test failed; 2: interrupted (a collection error); 3: internal error; 4: conftest's
    # import raised (the mutated package cannot be imported: every use of it fails).
    return {0: "survived", 1: "killed", 2: "killed", 3: "killed", 4: "killed"}.get(code, f"exit {code}")


def sample_run(limit_s: int, jobs: int = 1, stage_dir: Path = SAMPLE_STAGE) -> int:
    """Run the drawn mutants here, not through mutmut's run loop: each in a fresh ``python -m
    pytest -x`` with ``MUTANT_UNDER_TEST`` set (mutmut's own switch), on the tests mutmut's stats
    run recorded for its function (``covering_tests``). mutmut's loop would first rerun every
    covering test clean, by node id (half an hour for a sample's tests here); the stats run
    already ran them clean. A mutant still running after 4 times its tests' recorded call time
    plus 3 minutes (at least ``limit_s`` seconds) is "not finished": left out of the estimate
    and listed. ``jobs`` mutants run at once, taken in the
    seeded order. Verdicts go to sample.json as each one ends."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    path = stage_dir / "sample.json"
    drawn = json.loads(path.read_text())
    stats = json.loads((stage_dir / "mutants" / "mutmut-stats.json").read_text())
    done = drawn.setdefault("verdicts", {})
    order = list(drawn["names"])
    random.Random(drawn["seed"]).shuffle(order)  # a run cut short is still a random subsample
    todo = [n for n in order if n not in done]
    with ThreadPoolExecutor(jobs) as pool:
        running = {}
        while todo or running:
            while todo and len(running) < jobs:
                name = todo.pop(0)
                tests = covering_tests(stats, name)
                # its tests' recorded call time, 4 times over (fixtures, subprocess start-up and
                # a shared machine are not in it), and 3 minutes; at least limit_s
                seconds = max(limit_s, int(4 * sum(stats["duration_by_test"].get(t, 0.0) for t in tests)) + 180)
                running[pool.submit(_evaluate, stage_dir, name, tests, seconds) if tests
                        else pool.submit(lambda: "no tests")] = name
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                name = running.pop(f)
                done[name] = f.result()
                path.write_text(json.dumps(drawn, indent=1))
                print(f"{done[name]:12} {name}", flush=True)
    return 0


def main(argv: list[str]) -> int:
    debug = argv[:1] == ["--debug"]
    argv = argv[1:] if debug else argv
    if argv[:1] == ["score"]:
        print(sample_score() if "--sample" in argv else markdown(score()))
        return 0
    if argv[:1] == ["stage"]:
        print(stage(debug=debug))
        return 0
    if argv[:1] == ["sample"]:
        return sample(argv[1:], debug)
    if argv[:1] == ["sample-run"]:
        jobs = int(argv[argv.index("--jobs") + 1]) if "--jobs" in argv else 1
        rest = [a for i, a in enumerate(argv[1:], 1) if a != "--jobs" and argv[i - 1] != "--jobs"]
        return sample_run(int(rest[0]) if rest else 300, jobs)
    if argv[:1] != ["run"]:  # results, show, browse: read the stage as the last run left it
        return _mutmut(STAGE, argv)
    return _mutmut(stage(debug=debug), argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
