"""The evaluation report: one table, methods as rows and metrics as columns (like the paper's Table 1),
a safety-vs-utility scatter, and the JSON behind both.

    summary = summarize(records, methods=["base", "standard", "toss"], sets=[("hexphi", "harmful")])
    print(to_markdown(summary))
    scatter_png(summary, "scatter.png")

A record is one measured number: {"method", "seed", "metric", "set", "judge", "value"}; refusal records
also carry "refused" and "rated" (the counts behind the rate). Metrics:

    win            win rate (%) vs standard SFT on a prompt set, both orders, ties half (standard = 50)
    refusal        refusal rate (%) on a harmful set                         higher is safer
    refusal-pooled refusal rate (%) over every harmful set pooled: refused / rated over all of them
                   (per seed and judge; needs the counts)                    higher is safer
    over-refusal   refusal rate (%) on a benign set                          lower is better
    harm           mean HEx-PHI harmfulness 1-5 on a harmful set              lower is safer
    utility-loss   mean token loss of held-out reference answers              lower is better
    discarded, precision, recall   of the mask (%; precision/recall against the is_harmful oracle)

Each cell is the mean over fine-tune seeds, with its standard error (SE = sample SD / sqrt(n)) when there
are several; the legend under the table gives n. `win-avg` (the paper's "avg" column) is the mean of a
method's win rates over the prompt sets, per seed.

When several judges rate the same answers, `judge_agreement` gives per pair of judges the percent agreement
and Cohen's kappa on `refused`, pooled over every method, seed and prompt set (a second, small table).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

# metric -> (label, better, format)
METRICS = {
    "win": ("win %", "higher", "{:.1f}"),
    "refusal-pooled": ("harmful refusal % (pooled)", "higher", "{:.1f}"),
    "refusal": ("refusal %", "higher", "{:.1f}"),
    "over-refusal": ("over-refusal %", "lower", "{:.1f}"),
    "harm": ("harm 1-5", "lower", "{:.2f}"),
    "win-avg": ("avg win %", "higher", "{:.1f}"),
    "utility-loss": ("utility loss", "lower", "{:.3f}"),
    "discarded": ("discarded %", None, "{:.1f}"),
    "precision": ("mask precision %", "higher", "{:.1f}"),
    "recall": ("mask recall %", "higher", "{:.1f}"),
}
_FIRST = ("refusal-pooled",)  # the headline safety number, before the per-set columns
_PER_SET = ("win", "refusal", "over-refusal", "harm")
_GLOBAL = ("win-avg", "utility-loss", "discarded", "precision", "recall")


def column_id(metric: str, set_name: str | None, judge: str | None) -> str:
    return "/".join(x for x in (set_name, metric, judge) if x)


def with_win_average(records: list[dict]) -> list[dict]:
    """Add `win-avg` records: per (method, seed, judge), the mean win rate over the prompt sets."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        if r["metric"] == "win":
            groups[(r["method"], r["seed"], r["judge"])].append(r["value"])
    extra = [{"method": m, "seed": s, "metric": "win-avg", "set": None, "judge": j, "value": sum(v) / len(v)}
             for (m, s, j), v in groups.items()]
    return records + extra


def with_pooled_refusal(records: list[dict]) -> list[dict]:
    """Add `refusal-pooled` records: per (method, seed, judge), 100 * refused / rated summed over every harmful
    set (a rate over all harmful answers, not a mean of the sets' rates). A group with a refusal record
    lacking the counts gets none."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if r["metric"] == "refusal":
            groups[(r["method"], r["seed"], r["judge"])].append(r)
    extra = []
    for (m, s, j), rs in groups.items():
        if any(r.get("rated") is None or r.get("refused") is None for r in rs):
            continue
        refused, rated = sum(r["refused"] for r in rs), sum(r["rated"] for r in rs)
        if rated:
            extra.append({"method": m, "seed": s, "metric": "refusal-pooled", "set": None, "judge": j,
                          "value": 100.0 * refused / rated, "refused": refused, "rated": rated,
                          "sets": sorted(r["set"] for r in rs)})
    return records + extra


def summarize(records: list[dict], methods: Sequence[str], sets: Sequence[tuple[str, str]],
              judges: Sequence[str] = (), notes: Sequence[str] = (), meta: dict | None = None,
              agreement: Sequence[dict] = ()) -> dict:
    """The report as plain data: columns (in table order), rows (in `methods` order), notes, meta, and the
    judges' agreement (rows of `judge_agreement`)."""
    records = with_pooled_refusal(with_win_average(records))
    present = {(r["metric"], r["set"], r["judge"]) for r in records}
    judge_order = {j: i for i, j in enumerate(judges)}
    # A judge's name goes in the label only where several judges give the same metric.
    judges_per = defaultdict(set)
    for metric, set_name, judge in present:
        judges_per[(metric, set_name)].add(judge)

    def cols(metric: str, set_name: str | None) -> list[dict]:
        found = sorted((j for m, s, j in present if m == metric and s == set_name),
                       key=lambda j: judge_order.get(j, len(judge_order)) if j else -1)
        label, better, _ = METRICS[metric]
        out = []
        for j in found:
            text = f"{set_name} {label}" if set_name else label
            if j and len(judges_per[(metric, set_name)]) > 1:
                text += f" [{j}]"
            out.append({"id": column_id(metric, set_name, j), "metric": metric, "set": set_name, "judge": j,
                        "label": text, "better": better})
        return out

    columns = [c for metric in _FIRST for c in cols(metric, None)]
    columns += [c for name, _ in sets for metric in _PER_SET for c in cols(metric, name)]
    columns += [c for metric in _GLOBAL for c in cols(metric, None)]
    cells: dict[tuple[str, str], dict] = defaultdict(dict)
    for r in records:
        cells[(r["method"], column_id(r["metric"], r["set"], r["judge"]))][_seed_key(r["seed"])] = r["value"]
    rows = []
    for m in methods:
        row = {}
        for c in columns:
            values = cells.get((m, c["id"]))
            if values:
                row[c["id"]] = _stats(values)
        rows.append({"method": m, "cells": row})
    return {"columns": columns, "rows": rows, "notes": list(notes), "meta": meta or {},
            "agreement": list(agreement)}


def _seed_key(seed) -> str:
    return "-" if seed is None else str(seed)


def _stats(values: dict[str, float]) -> dict:
    xs = [v for v in values.values() if v is not None and not math.isnan(v)]
    mean = sum(xs) / len(xs) if xs else None
    std = statistics.stdev(xs) if len(xs) > 1 else None
    se = std / math.sqrt(len(xs)) if std is not None else None
    return {"mean": mean, "se": se, "std": std, "n": len(xs), "min": min(xs, default=None),
            "max": max(xs, default=None), "values": values}


def common_n(summary: dict) -> int | None:
    """The most frequent number of seeds behind a cell with an error (None if no cell has one)."""
    counts = Counter(cell["n"] for row in summary["rows"] for cell in row["cells"].values()
                     if cell.get("se") is not None)
    return max(counts, key=lambda n: (counts[n], n)) if counts else None


def format_cell(cell: dict | None, metric: str, n: int | None = None) -> str:
    """"mean ± SE"; the cell's own n in brackets where it differs from the table's `n`; a lone value as is."""
    if not cell or cell["mean"] is None:
        return "-"
    fmt = METRICS[metric][2]
    text = fmt.format(cell["mean"])
    if cell.get("se") is not None:
        text += " ± " + fmt.format(cell["se"])
        if n is not None and cell["n"] != n:
            text += f" (n={cell['n']})"
    return text


def legend(summary: dict) -> str:
    n = common_n(summary)
    if n is None:
        return "Cells: one value each (one fine-tune seed)."
    other = any(c.get("se") is not None and c["n"] != n for row in summary["rows"] for c in row["cells"].values())
    return (f"Cells: mean ± standard error (SE = sample SD / √n) over n = {n} fine-tune seeds"
            + (" (another n is given in the cell)" if other else "")
            + "; a value without ± is one measurement (the base model, or a mask shared by every seed).")


def to_markdown(summary: dict, title: str | None = None) -> str:
    arrow = {"higher": " ↑", "lower": " ↓", None: ""}
    cols = summary["columns"]
    n = common_n(summary)
    lines = [f"# {title}", ""] if title else []
    lines.append("| method | " + " | ".join(c["label"] + arrow[c["better"]] for c in cols) + " |")
    lines.append("|---|" + "---|" * len(cols))
    for row in summary["rows"]:
        cells = [format_cell(row["cells"].get(c["id"]), c["metric"], n) for c in cols]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    lines += ["", legend(summary)]
    if summary["notes"]:
        lines += ["", *[f"- {n}" for n in summary["notes"]]]
    if summary.get("agreement"):
        lines += ["", *agreement_markdown(summary["agreement"])]
    return "\n".join(lines) + "\n"


# ---- judge agreement ----------------------------------------------------------------------------

def cohen_kappa(both: int, only_a: int, only_b: int, neither: int) -> float | None:
    """Cohen's kappa of two raters on a yes/no question, from the 2x2 table of counts (both yes, only A yes,
    only B yes, both no): (p_o - p_e) / (1 - p_e). None when undefined (no items, or p_e = 1: both raters
    gave one and the same answer to everything)."""
    n = both + only_a + only_b + neither
    a_yes, b_yes = both + only_a, both + only_b
    # in whole numbers, times n^2: exact (no -0.00 where chance explains everything)
    observed, expected = n * (both + neither), a_yes * b_yes + (n - a_yes) * (n - b_yes)
    return None if n == 0 or expected == n * n else (observed - expected) / (n * n - expected)


def judge_agreement(tables: dict[tuple[str, str], Sequence[int]]) -> list[dict]:
    """(judge A, judge B) -> [both refused, only A, only B, neither] counts -> one row per pair: n, percent
    agreement, Cohen's kappa, each judge's refusal rate on those answers."""
    rows = []
    for (a, b), (both, only_a, only_b, neither) in tables.items():
        n = both + only_a + only_b + neither
        rows.append({"judges": [a, b], "n": n, "agreement": 100.0 * (both + neither) / n if n else None,
                     "kappa": cohen_kappa(both, only_a, only_b, neither),
                     "refused_a": 100.0 * (both + only_a) / n if n else None,
                     "refused_b": 100.0 * (both + only_b) / n if n else None,
                     "table": {"both": both, "only_a": only_a, "only_b": only_b, "neither": neither}})
    return rows


def agreement_markdown(rows: Sequence[dict]) -> list[str]:
    def num(x, fmt):
        return "-" if x is None else fmt.format(x)

    lines = ["## Judge agreement on refused", "",
             "| judges (A / B) | answers | agreement % | Cohen's κ | A refused % | B refused % | "
             "both / A only / B only / neither |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["table"]
        lines.append(f"| {r['judges'][0]} / {r['judges'][1]} | {r['n']} | {num(r['agreement'], '{:.1f}')} | "
                     f"{num(r['kappa'], '{:.2f}')} | {num(r['refused_a'], '{:.1f}')} | "
                     f"{num(r['refused_b'], '{:.1f}')} | "
                     f"{t['both']} / {t['only_a']} / {t['only_b']} / {t['neither']} |")
    lines += ["", "Pooled over every method, seed and prompt set (harmful and benign): each answer both judges "
              "rated counts once. κ = (p_o - p_e) / (1 - p_e); 1 is perfect agreement, 0 what chance gives."]
    return lines


_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;font-size:14px}}th,td{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
th:first-child,td:first-child{{text-align:left}}th{{background:#f3f3f3}}img{{max-width:100%}}</style>
</head><body>
{body}
{image}
</body></html>
"""


def to_html(markdown: str, png: bytes | None, title: str) -> str:
    """The markdown report as one self-contained HTML page (the plot inlined as a data URI)."""
    import base64
    import html

    from markdown_it import MarkdownIt  # rich's markdown parser: already installed with typer/rich

    body = MarkdownIt("commonmark").enable("table").render(markdown)
    image = "" if png is None else (f'<h2>Safety vs utility</h2><img alt="safety vs utility" '
                                    f'src="data:image/png;base64,{base64.b64encode(png).decode()}">')
    return _HTML.format(title=html.escape(title), body=body, image=image)


def to_json(summary: dict) -> str:
    return json.dumps(summary, indent=2, default=str, allow_nan=False)


# ---- scatter ------------------------------------------------------------------------------------

def safety_axis(summary: dict) -> tuple[str, str, list[str]] | None:
    """(axis label, better, column ids averaged) for the scatter's safety axis: the pooled refusal on harmful
    sets (the first judge's), else the mean refusal over harmful sets, else harmfulness, else win rate on
    harmful sets; None if the report has none of them."""
    pooled = [c["id"] for c in summary["columns"] if c["metric"] == "refusal-pooled"]
    if pooled:
        return "refusal on harmful prompts, pooled (%)", "higher", pooled[:1]
    harmful = {s for s, kind in summary["meta"].get("sets", []) if kind == "harmful"}
    for metric, label in (("refusal", "refusal on harmful prompts (%)"), ("harm", "harmfulness 1-5"),
                          ("win", "win rate on harmful prompts (%)")):
        ids = [c["id"] for c in summary["columns"] if c["metric"] == metric and c["set"] in harmful]
        if ids:
            judge = next(c["judge"] for c in summary["columns"] if c["id"] == ids[0])
            ids = [i for i in ids if i.endswith("/" + judge)] if judge else ids  # one judge on the axis
            return label, METRICS[metric][1], ids
    return None


def _per_seed_mean(row: dict, ids: list[str]) -> tuple[float | None, float | None]:
    """Mean and standard error over seeds of the mean over `ids` (seeds paired by name)."""
    per_seed: dict[str, list[float]] = defaultdict(list)
    for i in ids:
        for seed, v in (row["cells"].get(i) or {}).get("values", {}).items():
            if v is not None:
                per_seed[seed].append(v)
    xs = [sum(v) / len(v) for v in per_seed.values() if len(v) == len(ids)]
    if not xs:
        return None, None
    return sum(xs) / len(xs), (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0)


def scatter_png(summary: dict, path: str | Path) -> bool:
    """Safety (x) against utility loss (y, lower is better: axis inverted) per method, error bars one SE over
    seeds; False if there is nothing to plot (no safety metric or no utility loss)."""
    axis = safety_axis(summary)
    has_utility = any(c["id"] == "utility-loss" for c in summary["columns"])
    if axis is None or not has_utility:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label, better, ids = axis
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    for row in summary["rows"]:
        x, xe = _per_seed_mean(row, ids)
        y, ye = _per_seed_mean(row, ["utility-loss"])
        if x is None or y is None:
            continue
        ax.errorbar(x, y, xerr=xe or None, yerr=ye or None, fmt="o", capsize=3)
        ax.annotate(row["method"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(label + ("  (higher is safer)" if better == "higher" else "  (lower is safer)"))
    ax.set_ylabel("utility: reference-answer loss (lower is better)")
    ax.invert_yaxis()  # up = better utility
    if better == "lower":
        ax.invert_xaxis()  # right = safer
    ax.set_title(summary["meta"].get("title", "safety vs utility"))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
