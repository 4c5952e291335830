#!/usr/bin/env python
"""Benchmark of the select stage (SPEC section 3, global mode) against the reference code's approach.

OURS (timed end to end): toss_core.selection.select_tokens reads the token table and the two score tables
from Parquet, computes S = l_u - l_h (float64), finds the global top floor(d*N), and writes the mask Parquet
(the discarded positions of each sample).

REFERENCE (timed from data already in memory, as the issue's "before any I/O" figure): per-sample Python
lists of S, a list of (score, sample_idx, position) tuples for every response token, one Python sort
(key=score, reverse=True: stable, so ties keep (sample, position) order, the SPEC's tie-break), and the
top floor(d*N) of it. Loading the Parquet files into those lists is NOT timed (it is counted in its
peak memory, like the input of any in-memory method).

Each side runs in its own fresh subprocess, so each peak RSS (VmHWM) is its own; the RSS of a bare
interpreter that imported the same libraries is reported next to them as the fixed cost. Data is
synthetic (generated in a child process, chunk by chunk, not timed): log-normal sample lengths clipped to
20..2000 tokens, about a third of each sample prompt, the rest response; losses are float32 rounded to 3
decimals, so S has many ties. At --tokens both sides must discard the SAME set (asserted). At
--big-tokens only ours runs (the reference would need tens of GB; its need is extrapolated from the
--tokens run).

    python benchmarks/bench_select.py                      # 10M, then 200M response tokens
    python benchmarks/bench_select.py --tokens 1M --skip-big   # a quick run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

from toss_core.tables import ROWS_PER_GROUP  # noqa: E402  (row groups as every stage writes them)
VOCAB = 32000


# ---- children ----------------------------------------------------------------------------------------

def child_gen(a) -> dict:
    """Write tokens.parquet, utility.parquet, safety.parquet with >= a.tokens response tokens, chunk by chunk."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from toss_core.tables import SCORES_SCHEMA, TOKENS_SCHEMA, ids_digest, list_array

    out = Path(a.data)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    t0 = time.perf_counter()
    n_resp = n_tok = n_samples = 0
    writers = {
        "tokens": pq.ParquetWriter(out / "tokens.parquet", TOKENS_SCHEMA),
        # Scores as toss_core.tables.write_scores writes them: plain encoding, LZ4.
        "utility": pq.ParquetWriter(out / "utility.parquet", SCORES_SCHEMA, use_dictionary=False, compression="lz4"),
        "safety": pq.ParquetWriter(out / "safety.parquet", SCORES_SCHEMA, use_dictionary=False, compression="lz4"),
    }
    try:
        while n_resp < a.tokens:
            m = ROWS_PER_GROUP
            lengths = np.clip(np.rint(rng.lognormal(math.log(a.median_len), a.sigma, m)), 20, 2000).astype(np.int64)
            prompt = np.maximum(1, np.floor(lengths * rng.uniform(0.25, 0.42, m))).astype(np.int64)
            resp_n = lengths - prompt
            need = a.tokens - n_resp
            cum = np.cumsum(resp_n)
            if cum[-1] >= need:  # last chunk: stop at the first sample that reaches the target
                m = int(np.searchsorted(cum, need) + 1)
                lengths, prompt, resp_n = lengths[:m], prompt[:m], resp_n[:m]
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            total = int(offsets[-1])
            ids = rng.integers(3, VOCAB, total, dtype=np.int32)
            pos = np.arange(total) - np.repeat(offsets[:-1], lengths)
            resp = pos >= np.repeat(prompt, lengths)
            sid = np.arange(n_samples, n_samples + m, dtype=np.int64)
            digests = pa.array([ids_digest(ids[offsets[i]:offsets[i + 1]]) for i in range(m)], pa.string())
            writers["tokens"].write_table(pa.table({
                "sample_id": sid,
                "input_ids": list_array(ids, offsets, pa.int32()),
                "response_mask": list_array(resp, offsets, pa.bool_()),
                "ids_digest": digests,
                "meta": pa.array(["{}"] * m, pa.string()),
            }, schema=TOKENS_SCHEMA), row_group_size=ROWS_PER_GROUP)
            for name in ("utility", "safety"):
                loss = np.round(rng.gamma(2.0, 1.0, total), 3).astype(np.float32)
                loss[~resp] = np.nan
                writers[name].write_table(pa.table({
                    "sample_id": sid, "ids_digest": digests, "loss": list_array(loss, offsets, pa.float32()),
                }, schema=SCORES_SCHEMA), row_group_size=ROWS_PER_GROUP)
            n_samples += m
            n_tok += total
            n_resp += int(resp_n.sum())
    finally:
        for w in writers.values():
            w.close()
    sizes = {k: (out / f"{k}.parquet").stat().st_size for k in writers}
    return {
        "samples": n_samples, "tokens": n_tok, "response_tokens": n_resp,
        "file_bytes": sizes, "disk_bytes": sum(sizes.values()),
        "seconds": round(time.perf_counter() - t0, 2), **C.memory_report(),
    }


def _imports():
    """The libraries both sides import, before anything is timed, so their fixed cost is the same and is
    not in either timing. pandas is among them: pyarrow imports it (when installed, as here) on the first
    numpy -> Arrow conversion, ~0.4 s and ~35 MiB once per process, which would otherwise land in the
    timing of whichever side converts first."""
    import numpy  # noqa: F401
    import pandas  # noqa: F401
    import pyarrow
    import pyarrow.parquet  # noqa: F401

    import toss_core.selection  # noqa: F401


def child_baseline(a) -> dict:
    _imports()
    return C.memory_report()


def child_ours(a) -> dict:
    _imports()
    import toss_core.selection as S
    from toss_core.config import SelectConfig

    # Phase timers: thin wrappers around the three steps select_tokens calls (no change to what they do).
    phases: dict[str, dict] = {}

    def timed(name, label):
        fn = getattr(S, name)

        def wrapper(*args, **kwargs):
            t, c = time.perf_counter(), time.process_time()
            out = fn(*args, **kwargs)
            phases[label] = {"seconds": round(time.perf_counter() - t, 3), "cpu_seconds": round(time.process_time() - c, 3),
                             "peak_rss_mib_so_far": C.memory_report()["peak_rss_mib"]}
            return out
        setattr(S, name, wrapper)

    timed("_collect_scores", "pass 1: read tokens + 2 score tables, S")
    timed("choose", "cut: global top floor(d*N)")
    timed("_write_mask", "pass 2: write mask + stats")
    d = Path(a.data)
    cfg = SelectConfig(ratio=a.ratio, mask_files=a.mask_files)
    out = Path(a.mask)
    out.mkdir(parents=True, exist_ok=True)
    sinks = [str(out / f"mask-{i:05d}.parquet") for i in range(cfg.mask_files)]  # as the select stage names them
    t0, c0 = time.perf_counter(), time.process_time()
    stats = S.select_tokens([str(d / "tokens.parquet")], [str(d / "utility.parquet")], [str(d / "safety.parquet")],
                            cfg, sinks)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    mem = C.memory_report()
    return {"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3), **mem, "phases": phases,
            "mask_files": cfg.mask_files, "response_tokens": stats["response_tokens"],
            "discarded_tokens": stats["discarded_tokens"], "score_cut": stats["score_cut"],
            "mask_bytes": sum(Path(f).stat().st_size for f in sinks)}


def _load_s(d: Path):
    """S of every response token in (sample, position) order, float64 (the exact difference of the float32
    losses, as the reference's Python floats hold it), and the response tokens per sample."""
    import numpy as np
    import pyarrow.parquet as pq

    files = [pq.ParquetFile(d / f"{n}.parquet", pre_buffer=False) for n in ("tokens", "utility", "safety")]
    streams = [files[0].iter_batches(ROWS_PER_GROUP, columns=["sample_id", "response_mask"]),
               files[1].iter_batches(ROWS_PER_GROUP, columns=["sample_id", "loss"]),
               files[2].iter_batches(ROWS_PER_GROUP, columns=["sample_id", "loss"])]
    for t, u, h in zip(*streams):
        assert t.column(0).equals(u.column(0)) and t.column(0).equals(h.column(0))
        resp = t.column(1).flatten().to_numpy(zero_copy_only=False)
        lu = u.column(1).flatten().to_numpy()
        lh = h.column(1).flatten().to_numpy()
        s = lu[resp].astype(np.float64) - lh[resp]  # exact, as select_tokens computes S
        offs = np.concatenate([[0], np.cumsum(t.column(1).value_lengths().to_numpy())])
        yield s, np.add.reduceat(resp, offs[:-1]).astype(np.int64)


def child_core(a) -> dict:
    """Ours, in-memory core only (like for like with the reference's timing): global_top on the float64 S array."""
    _imports()
    import numpy as np

    from toss_core.selection import global_top

    scores = np.concatenate([s for s, _ in _load_s(Path(a.data))])
    k = math.floor(a.ratio * len(scores))
    t0 = time.perf_counter()
    discard = global_top(scores, k)
    seconds = time.perf_counter() - t0
    mem = C.memory_report()
    np.save(a.mask, np.flatnonzero(discard))
    return {"seconds": round(seconds, 4), **mem, "response_tokens": len(scores), "discarded_tokens": int(discard.sum())}


def child_ref(a) -> dict:
    _imports()
    import gc

    import numpy as np

    d = Path(a.data)
    # -- load (not timed): per-sample Python lists of S = l_u - l_h over the response tokens ---------------
    t_load = time.perf_counter()
    scores: list[list[float]] = []
    for s, counts in _load_s(d):
        scores.extend(x.tolist() for x in np.split(s, np.cumsum(counts)[:-1]))
    del s, counts
    gc.collect()
    load_seconds = time.perf_counter() - t_load
    loaded = C.memory_report()

    # -- timed: the reference's selection ---------------------------------------------------------------
    t0 = time.perf_counter()
    items = []
    for i, sample_scores in enumerate(scores):
        for j, s in enumerate(sample_scores):
            items.append((s, i, j))
    items.sort(key=lambda x: x[0], reverse=True)
    k = math.floor(a.ratio * len(items))
    top = items[:k]
    seconds = time.perf_counter() - t0
    mem = C.memory_report()

    # -- hand the discarded set to the parent (not timed, after the memory reading) --------------------
    counts = np.fromiter((len(x) for x in scores), np.int64, len(scores))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    flat = np.sort(np.fromiter((starts[i] + j for _, i, j in top), np.int64, len(top)))
    np.save(a.mask, flat)
    return {"seconds": round(seconds, 3), **mem, "load_seconds": round(load_seconds, 2),
            "rss_after_load_mib": loaded["rss_now_mib"], "response_tokens": len(items), "discarded_tokens": k,
            "score_cut": float(top[-1][0]) if k else None}


# ---- parent ------------------------------------------------------------------------------------------

def run_child(role: str, a, **extra) -> dict:
    cmd = [sys.executable, __file__, "--child", role, "--ratio", repr(a.ratio), "--seed", str(a.seed),
           "--median-len", repr(a.median_len), "--sigma", repr(a.sigma)]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    load = os.getloadavg()[0]
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"child {role} failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return {**C.last_json_line(p.stdout), "loadavg_1min_before": round(load, 2)}


def ours_discarded(data: Path, mask: Path):
    """Flat response-token indices our mask discards (read back after the timed run)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from toss_core.tables import discard_flags, list_offsets

    tokens = pq.read_table(data / "tokens.parquet", columns=["response_mask"]).column(0).combine_chunks()
    resp = tokens.flatten().to_numpy(zero_copy_only=False)
    files = sorted(Path(mask).glob("mask-*.parquet"))  # the files in name order = sample order
    table = pa.concat_tables([pq.read_table(f) for f in files])
    disc = discard_flags(table, list_offsets(tokens))  # positions inside each sample's row (checked)
    assert len(disc) == len(resp), "mask does not line up with the token table"
    assert not disc[~resp].any(), "a non-response token was discarded"
    return np.flatnonzero(disc[resp])


def summarize(runs: list[dict]) -> dict:
    out = {
        "seconds_median": C.median([r["seconds"] for r in runs]),
        "peak_rss_mib_median": C.median([r["peak_rss_mib"] for r in runs]),
        "runs": runs,
    }
    if runs and "phases" in runs[0]:
        out["phases_seconds_median"] = {k: C.median([r["phases"][k]["seconds"] for r in runs]) for k in runs[0]["phases"]}
    return out


def _line(tag: str, r: dict) -> str:
    return f"{tag} {r['seconds']:.2f} s, peak {r['peak_rss_mib']:.0f} MiB (load {r['loadavg_1min_before']})"


def run_small(a, work: Path) -> dict:
    import numpy as np

    data = work / "small"
    print(f"[select] generating {C.fmt_size(a.tokens)} response tokens in {data} ...", flush=True)
    gen = run_child("gen", a, data=data, tokens=a.tokens)
    print(f"[select]   {gen['samples']} samples, {gen['tokens']} tokens, {gen['response_tokens']} response tokens, "
          f"{gen['disk_bytes'] / 1e6:.0f} MB on disk, {gen['seconds']} s", flush=True)
    k = math.floor(a.ratio * gen["response_tokens"])
    base = [run_child("baseline", a) for _ in range(a.repeats)]
    ours, ref, core, single = [], [], [], []
    for r in range(a.repeats):  # interleaved, so background load hits every side alike
        ours.append(run_child("ours", a, data=data, mask=work / "mask_small", mask_files=a.mask_files))
        print(f"[select]   run {r + 1}: " + _line("ours", ours[-1]), flush=True)
        ref.append(run_child("ref", a, data=data, mask=work / "ref_discarded.npy"))
        print(f"[select]   run {r + 1}: " + _line("reference", ref[-1])
              + f", RSS with its input lists loaded {ref[-1]['rss_after_load_mib']:.0f} MiB", flush=True)
        core.append(run_child("core", a, data=data, mask=work / "core_discarded.npy"))
        print(f"[select]   run {r + 1}: " + _line("ours, in-memory core", core[-1]), flush=True)
        if a.mask_files > 1:  # the same with one file, i.e. one writer thread: what the parallel write buys
            single.append(run_child("ours", a, data=data, mask=work / "mask_small_1", mask_files=1))
            print(f"[select]   run {r + 1}: " + _line("ours, mask as 1 file", single[-1]), flush=True)
    # The same discarded set (the last run of each side; every run of a side is deterministic).
    mine = ours_discarded(data, work / "mask_small")
    theirs = np.load(work / "ref_discarded.npy")
    assert len(mine) == len(theirs) == k, (len(mine), len(theirs), k)
    assert np.array_equal(mine, theirs), "ours and the reference discard different tokens"
    assert np.array_equal(np.load(work / "core_discarded.npy"), theirs)
    if single:
        assert np.array_equal(ours_discarded(data, work / "mask_small_1"), theirs)
    assert all(r["discarded_tokens"] == k for r in ours + ref + core + single)
    print(f"[select]   same discarded set: {k} tokens (floor({a.ratio} * {gen['response_tokens']}))", flush=True)
    o, f, c = summarize(ours), summarize(ref), summarize(core)
    b = C.median([x["peak_rss_mib"] for x in base])
    ref_per_token = (f["peak_rss_mib_median"] - b) * 2**20 / gen["response_tokens"]
    out = {
        "data": gen, "baseline_rss_mib": b, "baseline_runs": base, "ours": o, "reference": f, "ours_core": c,
        "same_discarded_set": True, "discarded_tokens": k,
        "speedup": f["seconds_median"] / o["seconds_median"],
        "speedup_core": f["seconds_median"] / c["seconds_median"],
        "memory_ratio_ours_over_ref": o["peak_rss_mib_median"] / f["peak_rss_mib_median"],
        "memory_ratio_above_baseline": (o["peak_rss_mib_median"] - b) / (f["peak_rss_mib_median"] - b),
        "reference_bytes_per_response_token_above_baseline": ref_per_token,
        "reference_load_seconds_median": C.median([r["load_seconds"] for r in ref]),
    }
    if single:
        out["ours_one_file"] = summarize(single)
        out["speedup_one_file"] = f["seconds_median"] / out["ours_one_file"]["seconds_median"]
    return out


def run_big(a, work: Path, small: dict | None) -> dict:
    data = work / "big"
    print(f"[select] generating {C.fmt_size(a.big_tokens)} response tokens in {data} ...", flush=True)
    gen = run_child("gen", a, data=data, tokens=a.big_tokens)
    print(f"[select]   {gen['samples']} samples, {gen['tokens']} tokens, {gen['response_tokens']} response tokens, "
          f"{gen['disk_bytes'] / 1e9:.2f} GB on disk, {gen['seconds']} s (generator peak {gen['peak_rss_mib']:.0f} MiB)",
          flush=True)
    k = math.floor(a.ratio * gen["response_tokens"])
    ours = []
    for r in range(a.big_repeats):
        ours.append(run_child("ours", a, data=data, mask=work / "mask_big", mask_files=a.mask_files))
        assert ours[-1]["discarded_tokens"] == k and ours[-1]["response_tokens"] == gen["response_tokens"]
        print(f"[select]   run {r + 1}: " + _line("ours", ours[-1]), flush=True)
    o = summarize(ours)
    out = {"data": gen, "ours": o, "discarded_tokens": k,
           "peak_under_4GB": max(r["peak_rss_mib"] for r in ours) * 2**20 < 4e9}
    if small:
        per = small["reference_bytes_per_response_token_above_baseline"]
        out["reference_extrapolated_peak_gib"] = (small["baseline_rss_mib"] * 2**20 + per * gen["response_tokens"]) / 2**30
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="Select stage end to end (Parquet in, mask Parquet out) vs the reference's in-memory "
                    "Python sort of (score, sample, position) tuples. Writes benchmarks/results/bench_select.json.")
    p.add_argument("--tokens", type=C.parse_size, default=C.parse_size("10M"),
                   help="response tokens of the head-to-head case (default 10M)")
    p.add_argument("--big-tokens", type=C.parse_size, default=C.parse_size("200M"),
                   help="response tokens of the ours-only scale case (default 200M; ~1.5 GB of temp Parquet)")
    p.add_argument("--skip-big", action="store_true", help="skip the --big-tokens case")
    p.add_argument("--skip-small", action="store_true", help="skip the head-to-head case")
    p.add_argument("--ratio", type=float, default=0.1, help="discard ratio d (default 0.1)")
    p.add_argument("--repeats", type=int, default=3, help="runs per side at --tokens; the median is reported (3)")
    p.add_argument("--big-repeats", type=int, default=3, help="runs of ours at --big-tokens (3)")
    p.add_argument("--workdir", default=None, help="folder for the temporary Parquet files (default: a new folder "
                   "under $TMPDIR or /tmp); deleted afterwards unless --keep")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--median-len", type=float, default=250.0, help="median sample length (log-normal, default 250)")
    p.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma of sample lengths (default 1.0)")
    p.add_argument("--mask-files", type=int, default=None, help="select.mask_files for ours (default: the config's "
                   "default); when > 1, ours also runs with 1 file at --tokens, as an extra row")
    p.add_argument("--out", default=None, help="JSON results path (default benchmarks/results/bench_select.json)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mask", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.mask_files is None:
        from toss_core.config import SelectConfig

        a.mask_files = SelectConfig().mask_files

    if a.child:
        fn = {"gen": child_gen, "baseline": child_baseline, "ours": child_ours, "ref": child_ref,
              "core": child_core}[a.child]
        print(json.dumps(fn(a)), flush=True)
        return 0

    if a.workdir:
        Path(a.workdir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="toss-bench-select-", dir=a.workdir))
    results = {"benchmark": "bench_select", "command": " ".join(["python", *sys.argv]),
               "machine": C.machine(), "versions": C.versions("numpy", "pyarrow", "pandas", "toss"),
               "ratio": a.ratio, "lengths": {"distribution": "log-normal clipped to 20..2000", "median": a.median_len,
                                             "sigma": a.sigma, "prompt_share": "uniform 0.25..0.42 (mean 1/3)"},
               "repeats": a.repeats, "big_repeats": a.big_repeats}
    try:
        small = None
        if not a.skip_small:
            small = results["small"] = run_small(a, work)
            if not a.keep:  # free the disk before the big case
                shutil.rmtree(work / "small", ignore_errors=True)
        if not a.skip_big:
            results["big"] = run_big(a, work, small)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"[select] kept {work}")
    path = C.write_json("bench_select", results, a.out)
    print()
    print(report(results))
    print(f"\nwrote {path}")
    return 0


def a_files(side: dict) -> int:
    return side["runs"][0].get("mask_files", 1)


def report(res: dict) -> str:
    lines = []
    s = res.get("small")
    if s:
        o, f, c = s["ours"], s["reference"], s["ours_core"]
        b = s["baseline_rss_mib"]
        n = C.fmt_size(s["data"]["response_tokens"])
        lines.append(f"Select, {n} response tokens ({s['data']['samples']} samples), d={res['ratio']}, "
                     f"median of {res['repeats']} runs; peak RSS = VmHWM of each side's own process")
        rows = [[f"ours: select_tokens, mask as {a_files(o)} files", "Parquet read + select + mask write",
                 f"{o['seconds_median']:.2f}",
                 f"{f['seconds_median'] / o['seconds_median']:.1f}x", f"{o['peak_rss_mib_median']:.0f}",
                 f"{o['peak_rss_mib_median'] - b:.0f}"]]
        if "ours_one_file" in s:
            w = s["ours_one_file"]
            rows.append(["ours, mask as 1 file (1 writer thread)", "same", f"{w['seconds_median']:.2f}",
                         f"{f['seconds_median'] / w['seconds_median']:.1f}x", f"{w['peak_rss_mib_median']:.0f}",
                         f"{w['peak_rss_mib_median'] - b:.0f}"])
        rows += [["ours: in-memory core (global_top)", "S already a float64 array", f"{c['seconds_median']:.3f}",
                  f"{f['seconds_median'] / c['seconds_median']:.0f}x", f"{c['peak_rss_mib_median']:.0f}",
                  f"{c['peak_rss_mib_median'] - b:.0f}"],
                 ["reference: tuples + sort", "in memory, from Python lists", f"{f['seconds_median']:.2f}", "1.0x",
                  f"{f['peak_rss_mib_median']:.0f}", f"{f['peak_rss_mib_median'] - b:.0f}"],
                 ["interpreter + imports only", "-", "-", "-", f"{b:.0f}", "0"]]
        lines.append(C.table(["side", "what is timed", "wall s", "speed-up vs ref", "peak RSS MiB",
                              "above import baseline MiB"], rows))
        lines.append(f"end to end speed-up (ref time / ours): {s['speedup']:.1f}x   (target >= 10x: "
                     f"{'met' if s['speedup'] >= 10 else 'MISSED'})")
        lines.append(f"peak memory (ours / ref): {s['memory_ratio_ours_over_ref']:.3f} = 1/"
                     f"{1 / s['memory_ratio_ours_over_ref']:.1f}   (target <= 1/4: "
                     f"{'met' if s['memory_ratio_ours_over_ref'] <= 0.25 else 'MISSED'}); above the import baseline: "
                     f"1/{1 / s['memory_ratio_above_baseline']:.1f}")
        lines.append("ours, by phase (median s): " + "; ".join(
            f"{k} {v:.2f}" for k, v in o["phases_seconds_median"].items()))
        lines.append(f"ours, CPU seconds (both cores) per run, median: {C.median([r['cpu_seconds'] for r in o['runs']]):.2f}")
        lines.append(f"same discarded set: {s['same_discarded_set']} ({s['discarded_tokens']} tokens)")
    bg = res.get("big")
    if bg:
        o = bg["ours"]
        lines.append("")
        lines.append(f"Select, {C.fmt_size(bg['data']['response_tokens'])} response tokens ({bg['data']['samples']} "
                     f"samples, {bg['data']['disk_bytes'] / 1e9:.2f} GB of Parquet), ours only, median of "
                     f"{res['big_repeats']} runs")
        rows = [["ours: select_tokens", f"{o['seconds_median']:.1f}", f"{o['peak_rss_mib_median']:.0f}",
                 f"{o['peak_rss_mib_median'] * 2**20 / 1e9:.2f}", str(bg["peak_under_4GB"])]]
        lines.append(C.table(["side", "wall s", "peak RSS MiB", "peak RSS GB", "under 4 GB"], rows))
        lines.append("ours, by phase (median s): " + "; ".join(
            f"{k} {v:.1f}" for k, v in o["phases_seconds_median"].items()))
        if "reference_extrapolated_peak_gib" in bg:
            lines.append(f"reference, extrapolated from its measured bytes per token at the small size: "
                         f"~{bg['reference_extrapolated_peak_gib']:.0f} GiB (not run)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
