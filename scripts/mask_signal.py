"""How well each loss term tells the custom set's harmful tokens from its benign ones (docs/results.md, design 3).

    python scripts/mask_signal.py --store store

Reads a store a demo (or any run whose custom data has `is_harmful`) filled: the custom token table, and the
score tables of the same tokens under the base model and the reference adapters (found through the manifests).
Prints AUROC (0.5 = no signal) of each ranking term over all response tokens, over the first 3 answer tokens
of each sample, and of the per-sample mean. Read-only; local stores only.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Mann-Whitney AUROC with average ranks for ties: P(pos ranks above neg)."""
    x = np.concatenate([pos, neg])
    order = x.argsort(kind="stable")
    xs = x[order]
    ranks = np.empty(len(x))
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b - 1) / 2 + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def manifests(store: Path) -> dict[str, tuple[str, dict]]:
    return {p.parent.name: (p.parent.parent.name, json.loads(p.read_text())) for p in store.glob("*/*/MANIFEST.json")}


def files(store: Path, stage: str, key: str, manifest: dict) -> list[Path]:
    return sorted(store / stage / key / f["path"] for f in manifest["files"] if f["path"].endswith(".parquet"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="store", help="a local artifact store (default ./store)")
    args = ap.parse_args()
    store = Path(args.store)
    man = manifests(store)

    harmful: dict[int, bool] = {}
    custom = None
    for key, (stage, m) in man.items():
        if stage != "tokens":
            continue
        table = pq.read_table(files(store, stage, key, m)[0], columns=["sample_id", "meta"])
        metas = [json.loads(x or "{}") for x in table.column("meta").to_pylist()]
        if metas and "is_harmful" in metas[0]:
            custom = key
            harmful = {sid: bool(me["is_harmful"]) for sid, me in zip(table.column("sample_id").to_pylist(), metas)}
            break
    if custom is None:
        raise SystemExit(f"{store}: no token table with an is_harmful field (run the demo first)")

    roles = {key: m.get("config", {}).get("role") for key, (stage, m) in man.items() if stage == "train"}
    losses: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    for key, (stage, m) in man.items():
        if stage != "scores" or m.get("inputs", {}).get("tokens") != custom:
            continue
        adapter = m["inputs"].get("adapter")
        name = "base" if adapter is None else str(roles.get(adapter))
        for f in files(store, stage, key, m):
            t = pq.read_table(f, columns=["sample_id", "loss"])
            for sid, row in zip(t.column("sample_id").to_pylist(), t.column("loss").to_pylist()):
                a = np.asarray(row, dtype=np.float64)
                losses[name][sid] = a[~np.isnan(a)]  # response positions only
    need = {"base", "utility", "safety"}
    if missing := need - set(losses):
        raise SystemExit(f"{store}: no score tables of the custom set for {', '.join(sorted(missing))}")

    terms = {
        "l_base (reference-free)": lambda s: losses["base"][s],
        "S = l_u - l_h (TOSS)": lambda s: losses["utility"][s] - losses["safety"][s],
        "-l_h (safety reference)": lambda s: -losses["safety"][s],
        "l_u (utility reference)": lambda s: losses["utility"][s],
    }
    if "safety-r1" in losses:
        terms["S round 1 (TOSS-Pro)"] = lambda s: losses["utility"][s] - losses["safety-r1"][s]
    print(f"custom set: {sum(harmful.values())} harmful / {len(harmful)} samples (token table {custom})")
    print("| term | token AUROC | first 3 answer tokens | per-sample mean |")
    print("|---|---|---|---|")
    for label, fn in terms.items():
        def split(cut=None, reduce=None):
            pos, neg = [], []
            for sid, h in harmful.items():
                v = fn(sid)[:cut]
                v = np.array([v.mean()]) if reduce else v
                (pos if h else neg).append(v)
            return auroc(np.concatenate(pos), np.concatenate(neg))
        print(f"| {label} | {split():.3f} | {split(3):.3f} | {split(reduce=True):.3f} |")


if __name__ == "__main__":
    main()
