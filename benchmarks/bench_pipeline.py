"""Quick pipeline wall time: first run vs fully cached rerun, plain Python vs Prefect.

    python benchmarks/bench_pipeline.py            # ~2 min on 2 cores; writes benchmarks/results/pipeline.json

In one process, after a warm-up run (imports, first kernels) on a throwaway store: plain first,
plain cached, Prefect first, Prefect cached (against one local Prefect server started once; its
start-up time is reported separately), each `--repeats` times on fresh stores, keeping the minimum.
Prefect's per-stage overhead is the difference to the plain run divided by the number of stages.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "quick.yaml"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipeline.json"))
    ap.add_argument("--repeats", type=int, default=2, help="runs of each kind; the minimum is reported")
    args = ap.parse_args()

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.local_server import prefect_api
    from flows.toss import toss_pipeline
    from toss_core.config import load_config
    from toss_core.pipeline import run_pipeline

    results: dict[str, float] = {}
    tmp = Path(tempfile.mkdtemp(prefix="toss-bench-"))

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        seconds = round(time.perf_counter() - t0, 2)
        results[name] = min(results.get(name, seconds), seconds)
        print(f"{name:<16} {seconds:8.2f} s", flush=True)
        return out

    cfg = lambda name: load_config(args.config, [f"store.url={tmp / name}"])  # noqa: E731
    n_stages = len(run_pipeline(cfg("warmup"), progress=False).steps)
    for r in range(args.repeats):
        plain = cfg(f"plain{r}")
        timed("plain_first", lambda: run_pipeline(plain, progress=False))
        timed("plain_cached", lambda: run_pipeline(plain, progress=False))

    t0 = time.perf_counter()
    with prefect_api(tmp / "logs") as (url, _):
        results["prefect_server_start"] = round(time.perf_counter() - t0, 2)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            for r in range(args.repeats):
                pcfg = cfg(f"prefect{r}")
                timed("prefect_first", lambda: toss_pipeline(pcfg, []))
                timed("prefect_cached", lambda: toss_pipeline(pcfg, []))

    summary = {
        "stages": n_stages,
        "seconds": results,
        "cached_over_first_plain": round(results["plain_cached"] / results["plain_first"], 3),
        "cached_over_first_prefect": round(results["prefect_cached"] / results["prefect_first"], 3),
        "prefect_overhead_per_stage_first_s": round((results["prefect_first"] - results["plain_first"]) / n_stages, 3),
        "prefect_overhead_per_stage_cached_s": round((results["prefect_cached"] - results["plain_cached"]) / n_stages, 3),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
