"""The views budget: student quality against stored views, codec, bytes and teacher compute.

    python benchmarks/views_budget.py --work DIR --teacher-ckpt vit_s14_112.pth --plan   # print, exit
    nice -n 19 nohup python benchmarks/views_budget.py --work DIR --teacher-ckpt vit_s14_112.pth \\
        > DIR/run.log 2>&1 &                                                           # run / resume

Teacher: the trained ViT-S/14 (``benchmarks/convert_real_vit.py --resolution 112``). Images:
Fashion-MNIST (Debian ``dataset-fashion-mnist``): ``--train-per-class`` training images per class,
``--heldout-per-class`` test-set images per class held out. Everything goes through fdcache's
own commands: ``extract``, ``train --seeds-used S``, ``score`` (held-out FD loss, train-store gap,
linear probe), ``finetune --student-run`` + ``eval`` (top-1 on the held-out images, one short
recipe for every arm).

Arms. ``--epochs E`` per run; a stored arm trains on the first ``S`` seeds of its codec's store
(epoch ``e`` replays seed ``e mod S``: replay factor ``E / S``). A store's first S seeds are
exactly the store ``extract --seeds S`` makes (views are a pure function of the seed; tested),
so one store per codec serves every S. ``online`` is the fp16 store of ``E`` seeds replayed once
each: per view it is what ``train --online`` computes (same views, same pixels, targets equal up
to fp16 rounding; tests/test_train.py), and extracting it once serves every run seed and student,
where ``--online`` would pay the teacher again in every run. An arm is one entry of
:func:`grid`: a new codec, a token-subset store or a ``--fresh-views`` run is another
:class:`Arm` (its store, its extra ``train`` options, its teacher views and bytes).

Per (student, arm, run seed) one JSON line is appended to ``WORK/results.jsonl`` as the run
finishes: held-out FD loss (fresh views of held-out images), train-store loss (seed 0 of the fp16
store, which every arm trained on) and the gap, linear probe top-1, fine-tune top-1, teacher
FLOPs (``torch.utils.flop_counter`` on the teacher, times the views the arm computed) and bytes
stored (``Store.stored_bytes`` of the seeds the arm reads). Then ``WORK/table.md`` and
``WORK/views_budget.png``. Re-running the same command resumes: finished runs are skipped, an
interrupted ``train``/``finetune`` continues from its checkpoint, an unfinished store is
completed by the same ``extract``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fd_fashion_mnist import read_idx, run, write_folder

TEACHER = "timm:vit_small_patch14_dinov2"
# Students: timm options on fd-small (BEiT layout, shared rel-pos bias); patch 14 = the teacher's grid.
STUDENTS = {
    "tiny": ("fd-small", {"patch_size": 14}),  # 4 blocks x 192 (the first look)
    "mid": ("fd-small", {"patch_size": 14, "embed_dim": 288, "num_heads": 6, "depth": 6}),
}


@dataclass(frozen=True)
class StoreSpec:
    """One extracted store of the training images; it grows (``extract --seeds N`` appends)
    to the seeds the arms that read it need, when they first need them."""

    codec: str
    extract_args: tuple[str, ...] = ()  # more `fdcache extract` options (e.g. a token subset)

    @property
    def name(self) -> str:
        return self.codec + "".join(a.lstrip("-") for a in self.extract_args)


@dataclass(frozen=True)
class Arm:
    """How one student run gets its targets, and what that costs."""

    label: str  # table row, e.g. "int4 S=4"
    store: StoreSpec
    seeds_used: int  # S: the store's first S seeds
    online: bool = False  # replay once of E fresh seeds: online FD's views and targets
    train_args: tuple[str, ...] = ()  # more `fdcache train` options (e.g. --fresh-views P)
    fresh_per_epoch: float = 0.0  # teacher views per image per epoch computed during training

    def replay(self, epochs: int) -> float:
        return epochs / self.seeds_used

    def teacher_views(self, images: int, epochs: int) -> float:
        """Teacher forwards this arm needs: its stored seeds (shared by every run that reads
        them) or, online, one per image and epoch of every run."""
        if self.online:
            return images * epochs
        return images * (self.seeds_used + self.fresh_per_epoch * epochs)

    def bytes_stored(self, store_bytes: int, store_seeds: int) -> int:
        """Online stores nothing; a stored arm holds its S seeds (every seed's shards are equal)."""
        return 0 if self.online else store_bytes * self.seeds_used // store_seeds


def grid(epochs: int, seeds: list[int], codecs: dict[str, list[str]], token_fraction: float | None = None,
         token_seeds: list[int] = ()) -> dict[str, list[Arm]]:
    """Arms per student: every codec at every S, and online (the fp16 store's first ``epochs``
    seeds, each replayed once). One store per codec, read by every S. ``token_fraction``: also
    fp16 stores keeping that fraction of each view's patch tokens (``extract --token-fraction``)
    at each S of ``token_seeds``: about ``1 / fraction`` times the views in the same bytes."""
    out = {}
    for student, names in codecs.items():
        arms = [Arm(f"{c} S={s}", StoreSpec(c), s) for c in names for s in seeds]
        if token_fraction is not None:
            sub = StoreSpec("fp16", ("--token-fraction", f"{token_fraction:g}"))
            arms += [Arm(f"fp16 tokens {token_fraction:g} S={s}", sub, s) for s in token_seeds]
        arms.append(Arm("online", StoreSpec("fp16"), epochs, online=True))
        out[student] = arms
    return out


def teacher_flops(ckpt: str, resolution: int) -> float:
    """Forward FLOPs of the teacher per image (torch.utils.flop_counter). timm's fused
    attention (CPU SDPA) is invisible to the counter, so it is counted on the explicit
    matmul path (same maths): 2.867 GFLOPs per 112 px image, of which attention 0.078."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fdcache.distill.teachers import load_teacher

    teacher = load_teacher(TEACHER, ckpt, resolution=resolution, device="cpu")
    for m in teacher.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    with FlopCounterMode(display=False) as fc:
        teacher(torch.randn(2, 3, resolution, resolution))
    return fc.get_total_flops() / 2


# -- costs -------------------------------------------------------------------------------------
@dataclass
class Rates:
    """Measured on this machine (``--measure``, at this process's niceness beside the team's
    jobs): images per second of the teacher (extract) and of each student (train, startup
    included), and the seconds of a run's other commands (score, finetune, eval) per student;
    each in wall seconds and in CPU seconds (user + system of the commands). At nice 19 the
    wall rates follow the team's load; the CPU rates are what the grid costs."""

    wall: dict = field(default_factory=lambda: {"teacher": 20.0, "tiny": 40.0, "mid": 15.0})
    cpu: dict = field(default_factory=lambda: {"teacher": 20.0, "tiny": 30.0, "mid": 12.0})
    other_s: dict = field(default_factory=lambda: {"tiny": 120.0, "mid": 240.0})  # wall
    other_cpu_s: dict = field(default_factory=lambda: {"tiny": 80.0, "mid": 160.0})
    measured: bool = False


def estimate(plan: dict[str, list[Arm]], run_seeds: list[int], n_train: int, n_held: int, epochs: int,
             rates: Rates) -> dict:
    """Hours of the whole grid, wall (at the measured load) and CPU."""
    seeds: dict = {}
    for a in (a for arms in plan.values() for a in arms):
        seeds[a.store] = max(seeds.get(a.store, 0), a.seeds_used)
    views = sum(seeds.values()) * n_train + 2 * n_held
    out = {"runs": sum(len(a) for a in plan.values()) * len(run_seeds), "teacher_views": views}
    for kind, rate, other in (("wall", rates.wall, rates.other_s), ("cpu", rates.cpu, rates.other_cpu_s)):
        runs = sum(len(arms) * len(run_seeds) * (epochs * n_train / rate[st] + other[st]) for st, arms in plan.items())
        out[f"{kind}_h"] = (views / rate["teacher"] + runs) / 3600
    return out


# -- one run ------------------------------------------------------------------------------------
def resumable(out: Path, done: Path) -> list[str]:
    """How to (re)start a train/finetune into ``out``: continue its checkpoint, else replace
    what an earlier attempt left before its first checkpoint."""
    if done.exists():
        return []
    return ["--resume"] if (out / "checkpoints" / "last.pt").exists() else ["--overwrite"]


def results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--teacher-ckpt", required=True, help="converted ViT-S/14 at --resolution")
    ap.add_argument("--fmnist", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--train-per-class", type=int, default=15)
    ap.add_argument("--heldout-per-class", type=int, default=50)
    ap.add_argument("--heldout-seeds", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=112)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seeds", default="1,2,4,8", help="stored seeds S per arm (online: S = epochs)")
    ap.add_argument("--run-seeds", default="0,1,2", help="train --seed values per arm")
    ap.add_argument("--students", default="tiny,mid")
    ap.add_argument("--codecs", default="tiny=fp16+int8+int4,mid=fp16", help="codecs per student")
    ap.add_argument("--token-fraction", type=float, default=None,
                    help="also arms on fp16 stores keeping this fraction of each view's patch tokens "
                         "(needs `fdcache extract --token-fraction`, not landed yet)")
    ap.add_argument("--token-seeds", default="2", help="S values of the --token-fraction arms")
    ap.add_argument("--batch", type=int, default=15)
    ap.add_argument("--lr", type=float, default=1.5e-3, help="distillation lr per 512 images")
    ap.add_argument("--drop-path", type=float, default=0.1)
    ap.add_argument("--ft-epochs", type=int, default=4)
    ap.add_argument("--ft-batch", type=int, default=15)
    ap.add_argument("--ft-lr", type=float, default=2e-3, help="fine-tune lr per 512 images")
    ap.add_argument("--threads", type=int, default=1,
                    help="DALI threads per command, and OMP_NUM_THREADS (torch's): on the shared 2-core machine "
                         "torch at one thread trained the tiny student 10x faster than at two (50.8 vs 5.0 img/s, "
                         "load average 7.6: OpenMP's workers wait on each other)")
    ap.add_argument("--plan", action="store_true", help="print the plan and its time estimate, then exit")
    ap.add_argument("--measure", action="store_true", help="time the teacher and one epoch of each student "
                    "first (WORK/rates.json), then plan with those rates")
    ap.add_argument("--report", action="store_true", help="only write the table and plot from results.jsonl")
    args = ap.parse_args()

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by every fdcache command below
    w = args.work.resolve()
    w.mkdir(parents=True, exist_ok=True)
    res_file = w / "results.jsonl"
    if args.report:
        report(w, res_file, args)
        return
    # What every finished run depends on: a resumed WORK must keep it (the grid may grow).
    fixed = {k: v for k, v in vars(args).items() if k not in ("work", "teacher_ckpt", "fmnist", "seeds", "run_seeds",
                                                               "students", "codecs", "plan", "measure", "report", "threads",
                                                               "token_fraction", "token_seeds")}
    fixed_file = w / "settings.json"
    if fixed_file.exists() and json.loads(fixed_file.read_text()) != fixed:
        sys.exit(f"{w} holds runs made with other settings ({fixed_file.read_text().strip()}): use another --work")
    fixed_file.write_text(json.dumps(fixed))
    src = args.fmnist
    write_folder(w / "train", read_idx(src / "train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28),
                 read_idx(src / "train-labels-idx1-ubyte.gz", 8), args.train_per_class)
    write_folder(w / "heldout", read_idx(src / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28),
                 read_idx(src / "t10k-labels-idx1-ubyte.gz", 8), args.heldout_per_class)
    n_train, n_held = 10 * args.train_per_class, 10 * args.heldout_per_class
    seeds = [int(s) for s in args.seeds.split(",")]
    run_seeds = [int(s) for s in args.run_seeds.split(",")]
    codecs = dict(item.split("=") for item in args.codecs.split(","))
    plan = grid(args.epochs, seeds, {st: codecs[st].split("+") for st in args.students.split(",")},
                args.token_fraction, [int(s) for s in args.token_seeds.split(",")])
    log = w / "commands.log"
    times_file = w / "times.json"
    times: dict = json.loads(times_file.read_text()) if times_file.exists() else {}
    fd = [sys.executable, "-m", "fdcache"]
    teacher = ["--teacher", TEACHER, "--pretrained", str(Path(args.teacher_ckpt).resolve()),
               "--resolution", str(args.resolution)]

    def extract(folder: str, store: Path, codec: str, nseeds: int, extra=()) -> None:
        """Extract (or grow to) ``nseeds`` seeds: once a store holds more, a smaller call is done."""
        done = [int(p.suffixes[-2][1:-1]) for p in store.parent.glob(f"{store.stem}.*s.done")]
        if any(n >= nseeds for n in done):
            return
        marker = store.with_suffix(f".{nseeds}s.done")
        run(fd + ["extract", str(w / folder), "--out", str(store), *teacher, "--seeds", str(nseeds), "--codec", codec,
                  *extra, "--batch-size", "64", "--threads", str(args.threads), "--device", "cpu"],
            log, times, f"extract.{store.name}.{nseeds}s", marker)
        marker.touch()

    def train_cmd(student: str, out: Path, cache: Path, seeds_used: int, seed: int, extra=(), epochs=None,
                  steps=None) -> list[str]:
        name, opts = STUDENTS[student]
        when = ["--epochs", str(epochs)] if epochs else ["--steps", str(steps)]
        return fd + ["train", "--cache", str(cache), "--seeds-used", str(seeds_used), "--out", str(out),
                     "--student", name, *[f for k, v in opts.items() for f in ("--student-arg", f"{k}={v}")],
                     "--resolution", str(args.resolution), "--batch-size", str(args.batch), "--lr", str(args.lr),
                     "--warmup-epochs", "2", "--drop-path", str(args.drop_path), "--seed", str(seed), *when,
                     "--save-every", "50", "--threads", str(args.threads), "--device", "cpu", *extra]

    held = w / "stores" / "heldout-fp16.zarr"
    extract("heldout", held, "fp16", args.heldout_seeds, ["--global-seed", "1"])
    rates = Rates()
    rates_file = w / "rates.json"
    if rates_file.exists():
        rates = Rates(**json.loads(rates_file.read_text()))
    elif args.measure:
        rates = measure(w, args, plan, train_cmd, held, n_held, times)
        rates_file.write_text(json.dumps(asdict(rates), indent=1))
    est = estimate(plan, run_seeds, n_train, n_held, args.epochs, rates)
    print(f"plan: {n_train} training images, {n_held} held out, {args.resolution} px, {args.epochs} epochs of "
          f"{n_train // args.batch} steps (batch {args.batch}); S in {seeds} + online; run seeds {run_seeds}",
          flush=True)
    for st, arms in plan.items():
        print(f"  {st} ({STUDENTS[st][1]}): " + ", ".join(f"{a.label} (replay {a.replay(args.epochs):g})"
                                                          for a in arms), flush=True)
    print(f"  {est['runs']} runs; {est['teacher_views']:,} teacher views; estimate {est['cpu_h']:.1f} CPU hours, "
          f"{est['wall_h']:.1f} h wall at the load measured (rates {'measured' if rates.measured else 'assumed'}: "
          f"{json.dumps(asdict(rates))})", flush=True)
    if args.plan:
        return
    flops = times.get("teacher_flops") or teacher_flops(args.teacher_ckpt, args.resolution)
    times["teacher_flops"] = flops
    failed: list[str] = []
    fp16_train = StoreSpec("fp16")  # its seed 0 is the train-store loss of every arm
    # fp16 and online first (the replay curve), then the other codecs; within them arm by arm,
    # every run seed of an arm before the next arm, online first, then from the most replayed:
    # a run cut short has the line to reach and the ends of the curve with their spreads.
    order = [(phase, seed, st, arm) for phase in (0, 1) for st, arms in plan.items()
             for arm in sorted(arms, key=lambda a: (not a.online, a.seeds_used))
             for seed in run_seeds if (arm.store.codec != "fp16") == phase]
    for _, seed, st, arm in order:
        key = f"{st}/{arm.label.replace(' ', '')}/seed{seed}"
        if any(r["key"] == key for r in results(res_file)):
            continue
        try:
            one_run(w, args, key, st, arm, seed, held, fp16_train, extract, train_cmd, log, times, res_file,
                    n_train, flops, fd)
        except subprocess.CalledProcessError as e:  # the next invocation retries it
            failed.append(key)
            print(f"FAILED {key}: exit {e.returncode} of {' '.join(e.cmd[2:4])}; see {log}", flush=True)
    report(w, res_file, args)
    if failed:
        sys.exit(f"{len(failed)} run(s) failed ({', '.join(failed)}): re-run the same command to retry them")


def measure(w, args, plan, train_cmd, held, n_held, times) -> Rates:
    """Time the teacher (the held-out extract just done) and one short run of each student on
    the held-out store (startup included), at this process's niceness."""
    key = f"extract.{held.name}.{args.heldout_seeds}s"
    views = args.heldout_seeds * n_held
    rates = Rates(wall={"teacher": views / times[key]}, cpu={"teacher": views / times[key + ".cpu"]}, other_s={},
                  other_cpu_s={}, measured=True)
    n_train = 10 * args.train_per_class
    for st in plan:
        out = w / "timing" / st
        steps = 2 * n_held // args.batch
        cmd = train_cmd(st, out, held, args.heldout_seeds, 0, steps=steps) + ["--overwrite"]
        t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        rates.wall[st] = steps * args.batch / (time.perf_counter() - t0)
        rates.cpu[st] = steps * args.batch / (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
        # score (forwards: held-out views, train seed 0, probe images) + finetune + eval, in
        # training-image equivalents (a forward ~ 1/3 of a training step), plus three startups
        work = (views + 2 * n_train + 2 * n_held) / 3 + args.ft_epochs * n_train
        rates.other_s[st] = 3 * 15 + work / rates.wall[st]
        rates.other_cpu_s[st] = 3 * 10 + work / rates.cpu[st]
    return rates


def one_run(w, args, key, st, arm: Arm, seed, held, fp16_train, extract, train_cmd, log, times, res_file,
            n_train, flops, fd):
    from fdcache.store.store import Store

    stores = w / "stores"
    extract("train", stores / f"{fp16_train.name}.zarr", "fp16", 1)
    extract("train", stores / f"{arm.store.name}.zarr", arm.store.codec, arm.seeds_used, arm.store.extract_args)
    cache = stores / f"{arm.store.name}.zarr"
    out = w / "runs" / key
    out.mkdir(parents=True, exist_ok=True)
    done = out / "model.safetensors"
    run(train_cmd(st, out, cache, arm.seeds_used, seed, arm.train_args, epochs=args.epochs) + resumable(out, done),
        log, times, f"{key}.train", done)
    score_json = out.parent / f"{out.name}.score.json"
    run(fd + ["score", str(out), "--cache", str(held), "--train-cache", str(stores / f"{fp16_train.name}.zarr"),
              "--train-seed", "0", "--probe-train", str(w / "train"), "--probe-val", str(w / "heldout"),
              "--threads", str(args.threads), "--device", "cpu", "--json", str(score_json)], log, times, f"{key}.score", score_json)
    ft = out.parent / f"{out.name}-ft"
    ft_done = ft / "model.json"
    run(fd + ["finetune", "--student-run", str(out), "--out", str(ft), "--preset", "fd-finetune-vit-b16",
              "--data", str(w / "train"), "--epochs", str(args.ft_epochs), "--batch-size", str(args.ft_batch),
              "--lr", str(args.ft_lr), "--lr-batch", "512", "--warmup-steps", "5", "--layer-decay", "0.75",
              "--drop-path", "0.1", "--mixup", "0", "--cutmix", "0", "--auto-augment", "none", "--reprob", "0",
              "--resolution", str(args.resolution), "--workers", "0", "--save-every", "100000", "--seed", str(seed),
              "--device", "cpu", *resumable(ft, ft_done)], log, times, f"{key}.finetune", ft_done)
    eval_json = out.parent / f"{out.name}-eval.json"
    run(fd + ["eval", "--run", str(ft), "--data", str(w / "heldout"), "--no-ema", "--workers", "0", "--device", "cpu",
              "--json", str(eval_json)], log, times, f"{key}.eval", eval_json)
    sc = json.loads(score_json.read_text())
    ev = next(iter(json.loads(eval_json.read_text())["results"].values()))
    store = Store.open(str(cache))
    rec = {"key": key, "student": st, "arm": arm.label, "codec": arm.store.codec, "S": arm.seeds_used,
           "online": arm.online, "replay": arm.replay(args.epochs), "run_seed": seed, "epochs": args.epochs,
           "train_images": n_train, "heldout_loss": sc["heldout"]["loss"], "train_loss": sc["train"]["loss"],
           "gap": sc["gap"], "probe_top1": sc["probe"]["top1"], "ft_top1": ev["top1"],
           "teacher_flops": flops * arm.teacher_views(n_train, args.epochs),
           "bytes_stored": arm.bytes_stored(store.stored_bytes(), store.num_seeds),
           "seconds": {k.rsplit(".", 1)[1]: v for k, v in times.items() if k.startswith(key + ".")},
           "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(res_file, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(f"{key}: held-out {rec['heldout_loss']:.4f}, gap {rec['gap']:+.4f}, probe {100 * rec['probe_top1']:.1f}%, "
          f"fine-tune {100 * rec['ft_top1']:.1f}%", flush=True)
    report(w, res_file, args)


# -- table and plot --------------------------------------------------------------------------------
def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def summarize(rows: list[dict]) -> list[dict]:
    """One line per (student, arm): mean and sample standard deviation over run seeds."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["student"], r["arm"]), []).append(r)
    out = []
    for (st, arm), rs in groups.items():
        line = {"student": st, "arm": arm, "codec": rs[0]["codec"], "S": rs[0]["S"], "online": rs[0]["online"],
                "replay": rs[0]["replay"], "seeds": sorted(r["run_seed"] for r in rs),
                "teacher_flops": rs[0]["teacher_flops"], "bytes_stored": rs[0]["bytes_stored"]}
        for k in ("heldout_loss", "gap", "probe_top1", "ft_top1"):
            line[k] = mean_sd([r[k] for r in rs])
        # Paired by run seed (same init and sample order): the arm's held-out loss minus the
        # online run's. The run seeds' own spread is far larger than the arms' differences.
        online = {r["run_seed"]: r["heldout_loss"] for r in rows if r["student"] == st and r["online"]}
        diffs = [r["heldout_loss"] - online[r["run_seed"]] for r in rs if r["run_seed"] in online]
        line["vs_online"] = mean_sd(diffs) if diffs else (math.nan, math.nan)
        out.append(line)
    return sorted(out, key=lambda x: (x["student"], x["online"], x["codec"], x["S"]))


def fmt(ms: tuple[float, float], pct: bool = False, digits: int = 4) -> str:
    m, s = ms
    if pct:
        return f"{100 * m:.1f} ± {100 * s:.1f}%" if not math.isnan(s) else f"{100 * m:.1f}%"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if not math.isnan(s) else f"{m:.{digits}f}"


def table(lines: list[dict]) -> str:
    head = ("| student | arm | replay | bytes stored | teacher TFLOPs (stored: once; online: per run) "
            "| held-out FD loss | minus online's (same run seed) | held-out - train "
            "| linear probe | fine-tune top-1 | run seeds |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {x['student']} | {x['arm']} | {x['replay']:g}x | {x['bytes_stored'] / 1e6:,.1f} MB | "
        f"{x['teacher_flops'] / 1e12:,.2f} | {fmt(x['heldout_loss'])} | {fmt(x['vs_online'], digits=5)} | "
        f"{fmt(x['gap'])} | "
        f"{fmt(x['probe_top1'], True)} | {fmt(x['ft_top1'], True)} | {','.join(map(str, x['seeds']))} |\n"
        for x in lines)
    return head + body


def report(w: Path, res_file: Path, args) -> None:
    rows = results(res_file)
    if not rows:
        return
    lines = summarize(rows)
    text = table(lines)
    (w / "table.md").write_text(text)
    print(text, flush=True)
    try:
        plot(lines, w / "views_budget.png")
    except ImportError:
        print("(no plot: pip install matplotlib)", flush=True)


def plot(lines: list[dict], out: Path) -> None:
    """Held-out FD loss against bytes stored and against teacher FLOPs, one line per (student,
    arm family: codec, or codec and token fraction) through its S values; online as the horizontal line to reach (mean, band = ± sd)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    students = sorted({x["student"] for x in lines})
    markers = dict(zip(students, "os^D"))
    def family(x):  # the arm without its S: "fp16", "int4", "fp16 tokens 0.5"
        return x["arm"].rsplit(" S=", 1)[0]

    codecs = sorted({family(x) for x in lines if not x["online"]})
    colours = {c: f"C{i}" for i, c in enumerate(codecs)}
    for ax, key, label in ((axes[0], "bytes_stored", "bytes stored (MB)"),
                           (axes[1], "teacher_flops", "teacher TFLOPs spent (per student run, online)")):
        scale = 1e6 if key == "bytes_stored" else 1e12
        for st in students:
            for c in codecs:
                pts = sorted((x[key] / scale, *x["heldout_loss"], x["S"]) for x in lines
                             if x["student"] == st and family(x) == c and not x["online"])
                if not pts:
                    continue
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                            yerr=[0 if math.isnan(p[2]) else p[2] for p in pts], color=colours[c],
                            marker=markers[st], ms=5, capsize=2, label=f"{st} {c}")
                for p in pts:
                    ax.annotate(f"S={p[3]}", (p[0], p[1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
            on = [x for x in lines if x["student"] == st and x["online"]]
            if on:
                m, s = on[0]["heldout_loss"]
                ax.axhline(m, color="k", ls="--" if st == students[0] else ":", lw=1, label=f"{st} online")
                if not math.isnan(s):
                    ax.axhspan(m - s, m + s, color="k", alpha=0.06)
                if key == "teacher_flops":
                    ax.plot([on[0][key] / scale], [m], marker=markers[st], color="k", ms=6)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap the major ones
        ax.set(xlabel=label, title=f"held-out FD loss vs {label.split(' (')[0]}")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("held-out FD loss (fresh views, mean ± sd over run seeds)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
