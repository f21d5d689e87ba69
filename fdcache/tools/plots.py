"""Pictures of what fdcache measured: a run's loss/lr (and evaluation) curves from its
``log.jsonl``, a WiSE-FT sweep as ID vs OOD accuracy, and ``fdcache bench`` as ratios.
matplotlib (the ``plot`` extra) is imported only here."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import FdcacheError
from ..userfiles import read_json

__all__ = ["WISE_RESULTS", "read_log", "run_curves", "wise_sweep", "plot_path", "bench_figure"]

WISE_RESULTS = "wise.json"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise FdcacheError("plots need matplotlib: pip install 'fdcache[plot]'") from e
    return plt


def read_log(run: str | Path) -> tuple[list[dict], list[dict]]:
    """(step records, evaluation records) of a run's ``log.jsonl``."""
    path = Path(run) / "log.jsonl"
    if not path.is_file():
        raise FdcacheError(f"{run} holds no log.jsonl: pass the --out directory of fdcache train/finetune/flyp")
    steps, evals = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise FdcacheError(f"{path} line {n} is not JSON (a run killed mid-write leaves at most the last "
                               "line so; remove it)") from None
        (evals if "eval" in rec else steps).append(rec)
    if not steps:
        raise FdcacheError(f"{path} holds no step records yet")
    return steps, evals


def run_curves(run: str | Path, out: str | Path) -> Path:
    """Loss and lr against the step (a moving mean over the noisy loss), and top-1 per
    evaluation when the run has them."""
    plt = _pyplot()
    steps, evals = read_log(run)
    x = [r["step"] for r in steps]
    loss = [r["loss"] for r in steps]
    k = max(1, len(loss) // 50)
    smooth = [sum(loss[max(0, i - k + 1): i + 1]) / len(loss[max(0, i - k + 1): i + 1]) for i in range(len(loss))]
    panels = 3 if evals else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4))
    ax = axes[0]
    ax.plot(x, loss, color="#bbb", lw=0.8, marker="o" if len(x) < 30 else None, ms=3, label="loss")
    if k > 1:
        ax.plot(x, smooth, color="#c53", lw=1.5, label=f"mean of {k}")
        ax.legend(fontsize=7)
    ax.set(xlabel="step", ylabel="loss", title="training loss")
    ax = axes[1]
    ax.plot(x, [r["lr"] for r in steps], color="#58c", marker="o" if len(x) < 30 else None, ms=3)
    ax.set(xlabel="step", ylabel="lr (largest group)", title="learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if evals:
        ax = axes[2]
        series: dict[str, list] = {}
        for rec in evals:
            for weights, sets in rec["eval"].items():
                for name, res in sets.items():
                    series.setdefault(f"{name} ({weights})", []).append((rec["step"], 100 * res["top1"]))
        for label, pts in series.items():
            ax.plot(*zip(*pts), marker="o", ms=3, label=label)
        ax.set(xlabel="step", ylabel="top-1 (%)", title="evaluation")
        ax.legend(fontsize=7)
    fig.suptitle(str(Path(run).name), fontsize=9)
    return _save(fig, out)


def wise_sweep(results: dict, out: str | Path) -> Path:
    """ID (the first set) vs OOD (the mean over the others) top-1, one point per alpha; with
    one set, top-1 against alpha. ``results``: ``{"alpha=0.50": {set: {"top1", ...}}}``."""
    plt = _pyplot()
    alphas = sorted(results, key=lambda a: float(a.split("=")[-1]))
    sets = list(results[alphas[0]])
    fig, ax = plt.subplots(figsize=(4.8, 4))
    if len(sets) > 1:
        idv = [100 * results[a][sets[0]]["top1"] for a in alphas]
        ood = [100 * sum(results[a][s]["top1"] for s in sets[1:]) / (len(sets) - 1) for a in alphas]
        ax.plot(idv, ood, "-o", color="#58c", zorder=1)
        ax.scatter(idv[:1], ood[:1], marker="*", s=160, color="#c53", zorder=2, label="zero-shot end")
        ax.scatter(idv[-1:], ood[-1:], marker="s", s=60, color="#2a7", zorder=2, label="fine-tuned end")
        labels: dict[tuple, list] = {}  # alphas that land on one point share one label
        for a, xv, yv in zip(alphas, idv, ood):
            labels.setdefault((xv, yv), []).append(a.split("=")[-1])
        for (xv, yv), names in labels.items():
            ax.annotate("a=" + ", ".join(names), (xv, yv), textcoords="offset points", xytext=(5, 5), fontsize=7)
        ax.legend(fontsize=7, loc="best")
        ax.set(xlabel=f"ID top-1 (%): {sets[0]}", ylabel=f"OOD top-1 (%): mean of {', '.join(sets[1:])}"[:80],
               title="WiSE-FT: zero-shot (0) to fine-tuned (1)")
    else:
        ax.plot([float(a.split("=")[-1]) for a in alphas], [100 * results[a][sets[0]]["top1"] for a in alphas], "-o")
        ax.set(xlabel="alpha (fine-tuned weight)", ylabel=f"top-1 (%): {sets[0]}", title="WiSE-FT sweep")
    ax.grid(alpha=0.3)
    return _save(fig, out)


def plot_path(path: str | Path, out: str | Path | None = None) -> Path:
    """``fdcache plot``: a run directory (curves), a WiSE-FT ``--out`` directory (its
    ``wise.json``), or a ``fdcache wise --json`` file."""
    path = Path(path)
    sweep = path / WISE_RESULTS if path.is_dir() else path
    if sweep.is_file() and sweep.suffix == ".json":
        data = read_json(sweep, "a WiSE-FT sweep", "PATH", "give the --json file or --out folder of fdcache wise")
        if not isinstance(data, dict) or data.get("command") != "wise" or not data.get("results"):
            raise FdcacheError(f"{sweep} is not a WiSE-FT sweep with evaluations (fdcache wise ... --data DIR)")
        return wise_sweep(data["results"], out or (path if path.is_dir() else path.parent) / "wise.png")
    if path.is_dir() and (path / "log.jsonl").is_file():
        return run_curves(path, out or path / "curves.png")
    raise FdcacheError(f"{path}: expected a run directory (log.jsonl), a wise --out directory evaluated with "
                       "--data (wise.json), or a fdcache wise --json file")


def bench_figure(result: dict, out: str | Path) -> Path:
    """``fdcache bench`` as its ratios: how close offline gets to the synthetic ceiling, the
    offline/online speed-up against the limit the FLOP counts allow, extract against the
    teacher's forward, and how long each trainer waits on data. Bars span min..max over the
    repeats (ratios of the extremes), so a noisy run shows as one."""
    plt = _pyplot()
    r, q = result, result["ratios"]

    def spread(a: str, b: str):
        if a not in r or b not in r:
            return None
        mid = r[a]["images_per_s"] / r[b]["images_per_s"]
        return mid, mid - r[a]["min"] / r[b]["max"], r[a]["max"] / r[b]["min"] - mid

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6), gridspec_kw={"width_ratios": [2, 1.2, 1.4]})
    ax = axes[0]
    bars = [(label, spread(a, b)) for label, a, b in (("offline / ceiling", "offline", "ceiling"),
                                                       ("extract / teacher", "extract", "teacher"))]
    bars = [(label, s) for label, s in bars if s]
    if bars:
        ax.barh([b[0] for b in bars], [b[1][0] for b in bars], xerr=[[b[1][1] for b in bars], [b[1][2] for b in bars]],
                color=["#2a7", "#a6c"][: len(bars)], capsize=4)
        for i, (_, s) in enumerate(bars):
            ax.text(s[0], i + 0.42, f"{s[0]:.2f}", ha="center", va="center", fontsize=8,
                    bbox=dict(fc="white", ec="none", pad=1))
    ax.axvline(1.0, color="k", lw=1)
    ax.axvline(0.9, color="k", lw=0.8, ls="--")
    ax.set(xlim=(0, max([1.25] + [1.1 * (b[1][0] + b[1][2]) for b in bars])), xlabel="fraction of the upper bound (dashed: 0.9)", title="how close to the bound")
    ax = axes[1]
    s = spread("offline", "online")
    if s:
        ax.bar(["offline / online"], [s[0]], yerr=[[s[1]], [s[2]]], color="#58c", capsize=4)
        ax.text(0.25, s[0], f"{s[0]:.2f}x", ha="left", va="center", fontsize=8, bbox=dict(fc="white", ec="none", pad=1))
    ax.axhline(q["flop_ratio_limit"], color="#c53", ls="--", label=f"FLOP-ratio limit {q['flop_ratio_limit']:.2f}x")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set(ylabel="speed-up", title="cache vs teacher in the loop")
    ax.legend(fontsize=7, loc="lower right")
    ax = axes[2]
    waits = [(m, r[m]["data_wait_fraction"]) for m in ("offline", "online") if m in r and r[m]["data_wait_fraction"] is not None]
    if waits:
        ax.bar([w[0] for w in waits], [100 * w[1] for w in waits], color=["#2a7", "#c53"][: len(waits)])
        for i, (_, w) in enumerate(waits):
            ax.text(i, 100 * w, f"{100 * w:.0f}%", ha="center", va="bottom", fontsize=8)
    ax.set(ylim=(0, 100), ylabel="% of step time", title="waiting on data")
    env = r["environment"]
    ips = ", ".join(f"{m} {r[m]['images_per_s']:,.0f}" for m in ("ceiling", "offline", "online", "teacher", "extract") if m in r)
    fig.suptitle(f"{env['student']} <- {env['teacher']}, batch {env['batch_size']}; {env['device']}\nimages/s: {ips}",
                 fontsize=8)
    return _save(fig, out)


def _save(fig, out: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(str(out), dpi=120)
    plt.close(fig)
    return Path(out)
