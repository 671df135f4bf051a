"""
The published results, recomputed from what the repository holds: every cell of every committed
docs/demo_*.md table (the markdown as committed, not the code that wrote it) from the per-seed numbers
in the JSON beside it, with this file's own statistics (Student's t from its integrated density, not
support/stats.py): means, 95 % half-widths, paired differences and their verdicts, per-seed values,
parameter counts.
"""

import functools
import glob
import json
import math
import os
import re

import numpy as np
import pytest

from tests.helpers import REPO
from tests.test_stats import t_cdf_integrated

DOCS = os.path.join(REPO, "docs")


@functools.lru_cache(maxsize=None)  # a few degrees of freedom, thousands of intervals
def t975(df):
    lo, hi = 0.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf_integrated(mid, df, n=20001) < 0.975 else (lo, mid)
    return (lo + hi) / 2


def mean_half(values):
    v = np.asarray(values, dtype=np.float64)
    return v.mean(), t975(len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))


def decimals(text):
    return len(text.split(".")[1]) if "." in text else 0


def last_digit(printed):
    """One unit in the last printed place: '0.0756' -> 1e-4, '1.5e-06' -> 1e-7, '12' -> 1."""
    mantissa, _, exponent = printed.partition("e")
    return 10.0 ** (-decimals(mantissa) + int(exponent or 0))


def same_at_printed_digits(printed, value):
    """The printed number equals value rounded to its digits (one unit in the last place of slack for ties)."""
    return abs(float(printed.replace(",", "")) - value) <= last_digit(printed) * 0.5 + 1e-12


def table_rows(md):
    lines = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split(" | ")] for line in lines)}


def demo_files():
    return sorted(glob.glob(os.path.join(DOCS, "demo_*.md")))


def test_every_demo_table_has_its_per_seed_json():
    missing = [os.path.basename(md) for md in demo_files() if not os.path.exists(md[:-3] + ".json")]
    assert not missing, missing


@pytest.mark.parametrize("md_path", [p for p in demo_files() if os.path.exists(p[:-3] + ".json")],
                         ids=lambda p: os.path.basename(p))
def test_every_cell_recomputes_from_the_per_seed_json(md_path):
    doc = json.load(open(md_path[:-3] + ".json"))
    rows = table_rows(open(md_path).read())
    runs = doc["runs"]
    assert set(rows) == set(runs), (set(rows) ^ set(runs))
    for name, cells in rows.items():
        assert len(cells) == len(doc["columns"]), name
        for text, col in zip(cells, doc["columns"]):
            where = (os.path.basename(md_path), name, col["title"])
            vals = [r.get(col["key"]) for r in runs[name]] if col["kind"] != "params" else None
            if text == "–":
                assert col["kind"] == "params" or any(v is None for v in vals) or (
                    col["kind"] == "paired" and base_of(doc, col, name) == name), where
                continue
            if col["kind"] == "mean":
                m, h = re.fullmatch(r"([-\d.,]+) ± ([\d.,]+)", text).groups()
                mean, half = mean_half(vals)
                assert same_at_printed_digits(m, mean) and same_at_printed_digits(h, half), (where, text, mean, half)
            elif col["kind"] == "paired":
                m, h, verdict = re.fullmatch(r"([-+\d.,]+) ± ([\d.,]+) \((.*)\)", text).groups()
                base = [r[col["key"]] for r in runs[base_of(doc, col, name)]]
                mean, half = mean_half([a - b for a, b in zip(vals, base)])
                assert same_at_printed_digits(m, mean) and same_at_printed_digits(h, half), (where, text, mean, half)
                assert (verdict == "real") == (abs(mean) > half), (where, text)
                if verdict == "real":  # the printed interval does not touch zero
                    assert abs(float(m)) > float(h), (where, text)
            elif col["kind"] == "seeds":
                assert all(same_at_printed_digits(t, v) for t, v in zip(text.split(", "), vals)), (where, text)
            elif col["kind"] == "worst":
                assert same_at_printed_digits(text, max(vals)), (where, text)
            elif col["kind"] == "params":
                p = runs[name][0]["params"]
                total, active = (float(t.rstrip("kM").replace(",", "")) * (1e3 if t.endswith("k") else 1e6)
                                 for t in text.split(" / "))
                unit = 1e3 if text.endswith("k") else 1e6
                assert abs(total - p["total"]) <= unit * 10 ** -col["digits"] / 2 + 1e-6, (where, text)
                assert abs(active - p["active"]) <= unit * 10 ** -col["digits"] / 2 + 1e-6, (where, text)
            else:
                raise AssertionError(f"unknown column kind {col['kind']}")


ABLATIONS = sorted(glob.glob(os.path.join(DOCS, "ablation_*.md")))


@pytest.mark.parametrize("md_path", ABLATIONS, ids=lambda p: os.path.basename(p))
def test_every_ablation_cell_recomputes_from_the_per_seed_json(md_path):
    """tools/ablate.py's tables (mean ± half-width, per metric): each from its JSON, as committed."""
    assert os.path.exists(md_path[:-3] + ".json"), md_path
    doc = json.load(open(md_path[:-3] + ".json"))
    rows, runs = table_rows(open(md_path).read()), doc["runs"]
    assert set(rows) == set(runs), set(rows) ^ set(runs)
    for name, cells in rows.items():
        assert len(cells) == len(doc["columns"]), name
        for text, col in zip(cells, doc["columns"]):
            vals = [r[col["key"]] for r in runs[name] if col["key"] in r]
            if text == "–":
                assert not vals, (name, col["key"])
                continue
            printed = text.split(" ± ")
            mean, half = mean_half(vals) if len(vals) > 1 else (vals[0], None)
            for p, v in zip(printed, (mean, half)):
                assert same_at_printed_digits(p, v), (os.path.basename(md_path), name, col["key"], text)


def base_of(doc, col, name):
    return doc["bases"][name] if col.get("base") == "@row" else col.get("base")


# ------------------------------------------------------------------------------------------------
# the numbers the README and the lecture plan quote

ALLOWED = {  # numbers the README quotes from outside this repository's runs, with their source
    "1.88": "nanoGPT's README, its CPU recipe", "1.898": "nanoGPT's own code on this split (docs/results.md §2)",
    "0.04": "Wang et al. 2024, MaxVio_global with their bias", "0.52": "Wang et al. 2024, with L_lb",
    "0.72": "Wang et al. 2024, with L_lb", "0.76": "nanochat's MoE, tokens/s against dense",
    "19.63": "StableMoE (Dai et al. 2022), hash", "19.79": "StableMoE, Switch",
}


def derived_numbers():
    """Every number the JSON files let one state: per-seed values, means and half-widths of every key of every
    variant, and the paired difference (and half-width) of every two variants of a demo, at 0-4 decimals."""
    values = []
    for path in glob.glob(os.path.join(DOCS, "*.json")):
        doc = json.load(open(path))
        stack = [doc]
        while stack:  # every numeric leaf
            x = stack.pop()
            if isinstance(x, dict):
                stack += list(x.values())
            elif isinstance(x, list):
                stack += x
            elif isinstance(x, (int, float)) and not isinstance(x, bool):
                values.append(float(x))
        runs = doc.get("runs") if isinstance(doc.get("runs"), dict) else {}
        for a, ra in runs.items():
            keys = {k for r in ra for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for key in keys:
                vals = [r.get(key) for r in ra]
                if None in vals or len(vals) < 2:
                    continue
                values += list(mean_half(vals))
                for b, rb in runs.items():
                    other = [r.get(key) for r in rb]
                    if b != a and None not in other and len(other) == len(vals):
                        values += [abs(x) for x in mean_half([x - y for x, y in zip(vals, other)])]
    return values


def quoted(text):
    """The decimal numbers of a text (thousands in k: '31.3k' -> 31300), as printed."""
    return [(m.group(1), 1e3 if m.group(2) else 1) for m in re.finditer(r"(?<![\w.])(\d+\.\d+)(k?)(?![\w.])", text)]


def readme_rows():
    text = open(os.path.join(REPO, "README.md")).read()
    table = text.split("| question | command (seeds, wall time) | answer |")[1].split("\n\n")[0]
    return [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("|---")]


def test_every_number_of_the_readmes_results_rows_comes_from_a_json_or_a_named_source():
    values = np.array(derived_numbers())
    for row in readme_rows():
        for printed, scale in quoted(row):
            if printed in ALLOWED:
                continue
            value = float(printed) * scale
            tol = 10 ** -decimals(printed) * scale * 0.5 + 1e-9
            assert np.any(np.abs(values - value) <= tol) or np.any(np.abs(values * 100 - value) <= tol), (
                printed, row[:80])


def test_the_lectures_tables_are_the_demos_tables():
    """docs/teaching.md quotes demo tables: each quoted row equals the row of the committed demo table."""
    rows = {}
    for md in demo_files():
        for line in open(md).read().splitlines():
            if line.startswith("| ") and not line.startswith(("| variant", "|---")):
                rows.setdefault(line.split(" | ")[0], []).append(line)
    for line in open(os.path.join(DOCS, "teaching.md")).read().splitlines():
        name = line.split(" | ")[0]
        if line.startswith("| ") and name in rows:
            assert line in rows[name], line


def test_the_multiplicity_table_is_the_json_files_own():
    """docs/verdicts.md: every paired comparison of the JSON files, its p-value and Holm's correction, as
    `python course/demos.py verdicts` computes them now (a table changed without it fails here)."""
    from course.tables import holm_table
    md, n, kept = holm_table(DOCS)
    path = os.path.join(DOCS, "verdicts.md")
    if n == 0:
        assert not os.path.exists(path)
        return
    text = open(path).read()
    assert md in text and f"({n})" in text and f"{kept} keep" in text
