"""The tables the commands print (rich renderables built from the library's result dicts),
so every front end shows the same figures the same way."""

from __future__ import annotations

import json

from rich.table import Table

__all__ = ["evals_table", "store_table", "bench_table", "diagnose_table"]


def evals_table(evals: dict, title: str = "evaluation") -> Table:
    """``{weights: {set: {"n", "top1", "top5"}}}`` as rows."""
    table = Table(title=title)
    for col in ("weights", "set", "images", "top-1", "top-5"):
        table.add_column(col, justify="right")
    for which, sets in evals.items():
        for name, r in sets.items():
            table.add_row(which, name, str(r["n"]), f"{100 * r['top1']:.2f}", f"{100 * r['top5']:.2f}")
    return table


def store_table(r: dict) -> Table:
    """``fdcache inspect``'s summary of :func:`fdcache.store.inspect.inspect_store`."""
    t = r["teacher"]
    table = Table(title=f"fdcache store {r['store']}", show_header=False)
    table.add_row("teacher", t["label"])
    g = r["grid"]
    table.add_row("feature map", f"{t['tokens']} tokens = {g['prefix_tokens']} prefix + {g['rows']}x{g['cols']} grid "
                  f"({g['stride_px']:g} px per token, patch {t['patch']}) x {t['dim']} dims, {t['layer']} layer, "
                  f"post-norm={t['post_norm']}")
    if t.get("model_args"):
        table.add_row("teacher options", json.dumps(t["model_args"]))
    table.add_row("weights sha256", t["weights_sha256"][:16] + "...")
    table.add_row("shape [S, N, L, D]", str(list(r["shape"].values())))
    if r.get("token_fraction", 1.0) < 1.0:
        k = r["arrays"].get("token_rows", {}).get("per_sample_shape", ["?"])[0]
        table.add_row("token subset", f"{r['token_fraction']:g} of each view's patch tokens: {k} of the {t['tokens']} "
                      "rows per view stored (token_rows)")
    table.add_row("view policy", json.dumps(r["view_policy"]))
    if "view_set" in r:
        views = r["view_set"][:16] + "..."
        table.add_row("view set", views + (f" (views of {r['views_from']})" if r.get("views_from") else ""))
    table.add_row("codec", json.dumps(r["codec"]))
    if "arrays" in r:
        table.add_row("arrays", ", ".join(f"{k} {v['dtype']} {v['per_sample_shape']}" for k, v in r["arrays"].items()))
    table.add_row("bytes / sample-view", f"{r['bytes_per_sample_view']:,.0f} (raw fp16 "
                  f"{r['raw_fp16_bytes_per_sample_view']:,}; ratio {r['compression_ratio'] or 0:.2f}x)")
    table.add_row("stored", f"{r['bytes_stored'] / 1e6:,.2f} MB")
    for c in r["completeness"]:
        table.add_row(f"seed {c['seed']}", f"{c['shards_done']}/{c['shards']} shards, "
                      f"{c['samples_done']} samples, {c['skipped']} skipped")
    return table


def bench_table(r: dict, modes) -> Table:
    """``fdcache bench``'s figures per mode (median, spread, data wait, peak memory)."""
    env = r["environment"]
    table = Table(title=f"fdcache bench: {env['student']} <- {env['teacher']}, batch {env['batch_size']}, "
                        f"{env['device']}")
    for col in ("mode", "img/s (median)", "min..max", "data wait", "peak MiB"):
        table.add_column(col, justify="right")
    for m in modes:
        if m in r:
            v = r[m]
            table.add_row(m, f"{v['images_per_s']:,.1f}", f"{v['min']:,.1f}..{v['max']:,.1f}",
                          "-" if v["data_wait_fraction"] is None else f"{100 * v['data_wait_fraction']:.0f}%",
                          "-" if v["peak_memory_MiB"] is None else f"{v['peak_memory_MiB']:,.0f}")
    return table


def diagnose_table(results) -> Table:
    """``fdcache diagnose``: per layer, each model's mean attention distance over heads
    [min..max] and its head diversity."""
    table = Table(title=f"attention distance in pixels: mean over heads \\[min..max]; head diversity (div); "
                        f"{results[0].images} images")
    table.add_column("layer", justify="right")
    for r in results:
        table.add_column(f"{r.model}\n{r.grid}x{r.grid} @ {r.resolution}px", justify="right")
    for layer in range(max(len(r.distance_px) for r in results)):
        cells = []
        for r in results:
            h = r.distance_px[layer] if layer < len(r.distance_px) else None
            cells.append("" if h is None else f"{sum(h) / len(h):.1f} [{min(h):.0f}..{max(h):.0f}]  div {r.diversity[layer]:.2f}")
        table.add_row(str(layer + 1), *cells)
    return table
