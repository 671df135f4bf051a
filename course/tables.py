"""
The tables and figures of course/demos.py, made from per-seed numbers alone: `numbers()` takes what a
finished run logged (its final evaluation, its curve) into one dict per seed, course/demos.py writes them to
docs/demo_<name>.json, and everything here reads only those dicts. So `python course/demos.py NAME
--tables_only` rebuilds a demo's table and figure from its JSON without training, and
tests/test_results.py recomputes every cell of the committed tables from the JSON beside them.

A table is a list of columns, each a `Column`: its title, the per-seed key it reads, and how:
  mean     the mean over seeds ± the half-width of its 95 % t interval (support/stats.py)
  paired   the difference to the `base` variant seed by seed, its interval and verdict
  seeds    the per-seed values themselves
  params   total / active parameters
  worst    the largest value over seeds
"""

import os
from typing import NamedTuple, Optional

import numpy as np

from support.plots import plt
from support.stats import fmt_interval, fmt_paired, interval

CURVE_KEYS = ("cv", "entropy_norm", "topk_mass", "fluctuation", "id_binding", "logit_top", "beta", "load", "dead")


def layer_mean(layers, key):
    vals = [m[key] for m in layers if key in m]
    return float(np.sum(vals) if key == "dead" else np.mean(vals)) if vals else None


def numbers(record, log):
    """The per-seed numbers of a finished run: its final evaluation (the whole val split, a task's whole
    table or its fixed sample), layer means of every routing metric (dead experts summed over layers),
    and its curve (every evaluation on the fixed batches) for the figures."""
    whole = record.get("whole") or record
    layers = whole.get("layers") or []
    out = {"val_loss": whole["val_loss"], "se": whole.get("se"), "params": record.get("params"),
           "time_s": record.get("time_s")}
    if "bits" in whole:
        out["bits"] = whole["bits"]
    keys = {k for m in layers for k, v in m.items() if isinstance(v, (int, float))}
    out.update({k: layer_mean(layers, k) for k in sorted(keys)})
    if layers:
        out["maxvio_batch"] = layer_mean(record["layers"], "maxvio_batch")  # batches of the training size
        out["fluctuation"] = layer_mean(record["layers"], "fluctuation")    # since the evaluation before the last
        out["layer0_cv"] = layers[0]["cv"]
        out["max_max_mean"] = max(m["max_mean"] for m in layers)
        if "experts_per_label" in layers[0]:  # the facts tasks: experts the answering positions use (label 1)
            out["query_experts"] = float(np.mean([m["experts_per_label"][1] for m in layers]))
    out["curve"] = [{"iter": r["iter"], "val_loss": r["val_loss"],
                     "layers": [{k: m[k] for k in CURVE_KEYS if k in m} for m in r.get("layers") or []]}
                    for r in log if "val_loss" in r]
    return out


class Column(NamedTuple):
    title: str
    key: str
    kind: str = "mean"             # mean | paired | seeds | params | worst (module docstring)
    digits: int = 3
    base: Optional[str] = None     # paired: the variant ('@row': each row's own, given with the table)


def cell(runs, name, col):
    vals = [r.get(col.key) for r in runs[name]] if col.kind != "params" else None
    if col.kind == "params":
        p = runs[name][0]["params"]
        # millions where the active count keeps two significant digits at these decimals (0.87M), else thousands
        unit, scale = ("k", 1e3) if p["total"] < 1e5 or p["active"] < 10 ** (7 - col.digits) else ("M", 1e6)
        return f"{p['total'] / scale:,.{col.digits}f}{unit} / {p['active'] / scale:,.{col.digits}f}{unit}"
    if any(v is None for v in vals):
        return "–"
    if col.kind == "mean":
        return fmt_interval(vals, col.digits)
    if col.kind == "paired":
        return "–" if name == col.base else fmt_paired(vals, [r[col.key] for r in runs[col.base]], col.digits)
    if col.kind == "seeds":
        return ", ".join(f"{v:.{col.digits}f}" for v in vals)
    if col.kind == "worst":
        return f"{max(vals):.{col.digits}f}"
    raise ValueError(f"unknown column kind {col.kind}")


def render(runs, columns):
    """The markdown table: a row per variant, a cell per column."""
    lines = ["| variant | " + " | ".join(c.title for c in columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(cell(runs, name, c) for c in columns) + " |" for name in runs]
    return "\n".join(lines) + "\n"


def loss_columns(base, extra=(), params=True):
    """The common table: parameters, the val loss, its difference to `base` seed by seed, other metrics."""
    head = [Column("parameters total / active", "params", "params", 2)] if params else []
    return head + [Column("val loss (whole split)", "val_loss", "mean", 4),
                   Column(f"- {base.split(' (')[0]} (paired)", "val_loss", "paired", 4, base), *extra]


# ------------------------------------------------------------------------------------------------
# figures: each from the per-seed numbers (and their curves) of one demo

def curve_mean(records, key, layer_key=None):
    """(iters, mean over seeds) of a curve: the val loss, or the layer mean of a routing metric."""
    its = [p["iter"] for p in records[0]["curve"]]
    per_seed = []
    for r in records:
        pts = r["curve"] if layer_key is None else [{"v": layer_mean(p["layers"], layer_key)} for p in r["curve"]]
        per_seed.append([p[key] if layer_key is None else p["v"] for p in pts])
    if any(v is None for s in per_seed for v in s):
        keep = [i for i in range(len(its)) if all(s[i] is not None for s in per_seed)]
        return [its[i] for i in keep], [np.mean([s[i] for s in per_seed]) for i in keep]
    return its, list(np.mean(per_seed, axis=0))


def bar_panel(ax, runs, key, title, names=None):
    names = names or list(runs)
    ys = [interval([r[key] for r in runs[n]]) for n in names]
    ax.bar(range(len(names)), [m for m, _ in ys], yerr=[h for _, h in ys], capsize=3, color="tab:blue")
    ax.set_xticks(range(len(names)), [n.split(" (")[0].split(": ")[-1] for n in names], rotation=20, fontsize=8)
    lo, hi = min(m - h for m, h in ys), max(m + h for m, h in ys)
    if key == "val_loss":  # the differences are small: no bar from zero
        ax.set_ylim(lo - 0.1 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))
    ax.set(title=title)


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def loss_curves(ax, runs, title, ylim=None, line=None):
    for name, records in runs.items():
        ax.plot(*curve_mean(records, "val_loss"), "o-", ms=3, label=name.split(" (")[0])
    if line:
        ax.axhline(line[0], color="k", ls="--", lw=1, label=line[1])
    ax.set(xlabel="iter", ylabel="val loss (fixed batches, mean of seeds)", title=title)
    if ylim:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=7)


def figure_losses(runs, path, title="character-level Shakespeare, nanoGPT's CPU recipe"):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    loss_curves(axes[0], runs, title, (1.4, 2.6), (1.88, "nanoGPT's published figure (CPU recipe), ~1.88"))
    bar_panel(axes[1], runs, "val_loss", "val loss, whole split (95 % t interval over seeds)")
    save(fig, path)


def figure_routing_curves(runs, path, keys=(("val_loss", "val loss"), ("fluctuation", "routing fluctuation"),
                                            ("id_binding", "token-id binding"), ("cv", "load CV"))):
    """The val loss bars, then routing metrics over training (layer means, mean of seeds), every arm."""
    moe = {n: r for n, r in runs.items() if r[0]["curve"][0]["layers"]}
    fig, axes = plt.subplots(1, len(keys), figsize=(4.4 * len(keys), 3.8))
    bar_panel(axes[0], runs, "val_loss", "val loss, whole split")
    for (key, title), ax in zip(keys[1:], axes[1:]):
        for i, (name, records) in enumerate(moe.items()):
            its, ys = curve_mean(records, None, key)
            if its:
                ax.plot(its, ys, "o-", ms=3, color=plt.get_cmap("tab10")(i % 10), label=name.split(" (")[0])
        ax.set(title=title, xlabel="iter")
    axes[-1].legend(fontsize=7)
    save(fig, path)


def figure_bars(runs, path, keys):
    fig, axes = plt.subplots(1, len(keys), figsize=(4.3 * len(keys), 3.8), squeeze=False)
    for (key, title), ax in zip(keys, axes[0]):
        bar_panel(ax, runs, key, title)
    save(fig, path)


def figure_paired_lines(runs, path, keys):
    """One line per seed across the variants (the pairing), each minus the first variant."""
    names = list(runs)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.8 * len(keys), 3.6), squeeze=False)
    for (key, title), ax in zip(keys, axes[0]):
        base = [r[key] for r in runs[names[0]]]
        for s in range(len(base)):
            ax.plot(range(len(names)), [runs[n][s][key] - base[s] for n in names], "o-", alpha=0.7, label=f"seed {s}")
        ax.axhline(0, color="k", lw=1)
        ax.set_xticks(range(len(names)), [n.split(" (")[0] for n in names], rotation=15, fontsize=8)
        ax.set(title=f"{title} - {names[0].split(' (')[0]} (paired)")
    axes[0, 0].legend(fontsize=8)
    save(fig, path)


def figure_load_history(runs, path):
    """Load history of every layer for the first seed of each variant."""
    names = list(runs)
    fig, axes = plt.subplots(len(names), 1, figsize=(11, 2.1 * len(names) + 0.8), squeeze=False, layout="constrained")
    im = None
    for i, name in enumerate(names):
        curve = [p for p in runs[name][0]["curve"] if p["layers"]]
        L, E = len(curve[-1]["layers"]), len(curve[-1]["layers"][0]["load"])
        hist = np.concatenate([np.array([p["layers"][layer]["load"] for p in curve]) * E for layer in range(L)], axis=1)
        ax = axes[i, 0]
        im = ax.imshow(hist, cmap="RdBu_r", vmin=0, vmax=2, aspect="auto")
        ax.set_title(name, loc="left")
        ax.set_ylabel("evaluation")
        ax.set_xticks([layer * E + E / 2 - 0.5 for layer in range(L)],
                      [f"layer {layer}" for layer in range(L)] if i == len(names) - 1 else [])
        for layer in range(1, L):
            ax.axvline(layer * E - 0.5, color="k", lw=1)
    fig.colorbar(im, ax=axes[:, 0], label="load x E (1 = uniform, 0 = dead)")
    fig.suptitle("expert load at every evaluation, the experts of each layer side by side (first seed)")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def figure_capacity(runs, path, table_bits):
    names = list(runs)
    params = {n: runs[n][0]["params"] for n in names}
    groups = {}
    for n in names:
        groups.setdefault(n.split(" ")[0] + (" iso-total" if "iso-total" in n else ""), []).append(n)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (group, members), style in zip(groups.items(), ("o-", "s", "^", "D")):
        xs = [params[n]["total"] for n in members]
        ys = [interval([r["bits"] for r in runs[n]]) for n in members]
        axes[0].errorbar(xs, [m for m, _ in ys], yerr=[h for _, h in ys], fmt=style, capsize=3, label=group)
        axes[1].plot(xs, [m / x for (m, _), x in zip(ys, xs)], style, label=f"{group}, per total parameter")
    x = np.array([min(p["total"] for p in params.values()), max(p["total"] for p in params.values())])
    for rate in (1, 2):
        axes[0].plot(x, rate * x, "k--" if rate == 2 else "k:", lw=1,
                     label=f"{rate} bit{'s' * (rate > 1)} per parameter")
    axes[0].axhline(table_bits, color="tab:red", lw=1, label=f"the whole table: {table_bits:,.0f} bits")
    axes[0].set(xscale="log", yscale="log", xlabel="total parameters", ylabel="bits stored", title="bits stored")
    axes[1].set(xscale="log", xlabel="total parameters", ylabel="bits / parameter", title="bits per parameter")
    for ax in axes:
        ax.legend(fontsize=7)
    save(fig, path)


def figure_exposures(runs, path, seen, table_bits):
    """Bits per total parameter against exposures per record (`seen`: name -> exposures), one line per model with
    its ceiling (the whole table over its parameters), beside Allen-Zhu & Li's two points (~1 bit per parameter
    at 100 exposures, ~2 at 1,000)."""
    models = {}
    for n in runs:
        models.setdefault(n.rsplit(", ", 1)[0], []).append(n)  # "<model>, <steps>"
    fig, ax = plt.subplots(figsize=(6, 4))
    for model, members in models.items():
        ys = [interval([r["bits_per_total"] for r in runs[n]]) for n in members]  # set by the demo
        line = ax.errorbar([seen[n] for n in members], [m for m, _ in ys], yerr=[h for _, h in ys], fmt="o-",
                           capsize=3, label=model)
        ax.axhline(table_bits / runs[members[0]][0]["params"]["total"], color=line[0].get_color(), ls=":", lw=1,
                   label=f"{model}: the whole table")
    ax.plot([100, 1000], [1, 2], "k--", lw=1, label="Allen-Zhu & Li: ~1 bit at 100, ~2 at 1,000 exposures")
    ax.set(xscale="log", xlabel="exposures per record", ylabel="bits / total parameter (95 % t interval)",
           title="does more exposure store more per parameter?")
    ax.legend(fontsize=7)
    save(fig, path)


def figure_dose(runs, path, keys, xlabel):
    xs = [float(n.split("=")[1]) for n in runs]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.3), squeeze=False)
    for (key, title), ax in zip(keys, axes[0]):
        ys = [interval([r[key] for r in records]) for records in runs.values()]
        ax.errorbar(xs, [m for m, _ in ys], yerr=[h for _, h in ys], fmt="o-", capsize=3)
        ax.set(title=title, xlabel=xlabel)
        ax.set_xscale("symlog", linthresh=1e-3)
    save(fig, path)


def figure_grouped_bars(runs, path, keys, groups):
    fig, axes = plt.subplots(1, len(keys), figsize=(3.8 * len(keys), 3.4), squeeze=False)
    for (key, title), ax in zip(keys, axes[0]):
        for j, group in enumerate(groups):
            names = [n for n in runs if n.startswith(group)]
            ys = [interval([r[key] for r in runs[n]]) for n in names]
            ax.bar(np.arange(len(names)) + 0.38 * (j - 0.5), [m for m, _ in ys], width=0.36,
                   yerr=[h for _, h in ys], capsize=3, label=f"{group} experts")
            ax.set_xticks(np.arange(len(names)), [n.split(", ")[1] for n in names])
        if key == "coact_floor":
            ax.axhline(1.0, color="k", ls="--", lw=1)
            ax.set_yscale("log")
        if key == "val_loss":
            ax.set_ylim(min(p.get_height() for p in ax.patches) - 0.01, max(p.get_height() for p in ax.patches) + 0.01)
        ax.set(title=title)
    axes[0, 0].legend(fontsize=8)
    save(fig, path)


def wall_times(runs):
    return "\nthe runs' own wall times (s, two runs at a time, one thread each): " + "; ".join(
        f"{n.split(' (')[0]}: {fmt_interval([r['time_s'] for r in rs], 0)}" for n, rs in runs.items()) + "\n"


def figure_path(docs, demo):
    return os.path.join(docs, f"demo_{demo}.png")


# ------------------------------------------------------------------------------------------------
# every paired comparison of the published tables at once: p-values and Holm's correction

def comparisons(docs):
    """Every paired comparison of the docs/demo_*.json tables, each once (the same two arms in two columns
    or two demos are one test) -> [(demo, variant, against, key, mean, p)]."""
    import glob
    import json
    from support.stats import p_value
    out, seen = [], set()
    for path in sorted(glob.glob(os.path.join(docs, "demo_*.json"))):
        doc = json.load(open(path))
        for col in doc["columns"]:
            if col["kind"] != "paired":
                continue
            for name, records in doc["runs"].items():
                base = doc["bases"][name] if col["base"] == "@row" else col["base"]
                vals, other = [r.get(col["key"]) for r in records], [r.get(col["key"]) for r in doc["runs"][base]]
                pair = (col["key"], frozenset({tuple(vals), tuple(other)}))  # one test, however many tables show it
                if base == name or None in vals or None in other or len(vals) < 2 or pair in seen:
                    continue
                seen.add(pair)
                diffs = [a - b for a, b in zip(vals, other)]
                out.append((doc["demo"], name, base, col["key"], sum(diffs) / len(diffs), p_value(vals, other)))
    return out


def holm_table(docs):
    """The markdown table of every paired comparison: its p-value, Holm's adjusted p over the whole family,
    and whether it survives (adjusted p <= 0.05)."""
    from support.stats import holm
    rows = comparisons(docs)
    adjusted = holm([r[-1] for r in rows])
    lines = ["| demo | variant | against | difference | p | Holm-adjusted p | survives |",
             "|---|---|---|---|---|---|---|"]
    for (demo, name, base, key, mean, p), q in zip(rows, adjusted):
        lines.append(f"| {demo} | {name} | {base} | {key} {mean:+.4g} | {p:.2g} | {q:.2g} | "
                     f"{'yes' if q <= 0.05 else 'no'} |")
    return "\n".join(lines) + "\n", len(rows), sum(q <= 0.05 for q in adjusted)
