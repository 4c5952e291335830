"""Helpers shared by the benchmark scripts: sizes, memory readings, machine facts, result tables."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import resource
import statistics
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_size(text: str) -> int:
    """'10M' -> 10_000_000, '200M', '500k', '1.5G', '123' (decimal units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?)\s*", str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 500k, 10M, 200M)")
    mult = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()]
    return int(round(float(m.group(1)) * mult))


def fmt_size(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            v = n / div
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.2f}{unit}"
    return str(int(n))


def proc_status_mib(field: str) -> float:
    """A field of /proc/self/status in MiB (VmHWM = peak resident set of this process, VmRSS = now)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def memory_report() -> dict:
    """Peak and current RSS of this process. VmHWM belongs to this process's own address space (it does not
    inherit the parent's peak the way ru_maxrss can after vfork+exec); ru_maxrss is reported as a cross-check."""
    return {
        "peak_rss_mib": round(proc_status_mib("VmHWM"), 1),
        "rss_now_mib": round(proc_status_mib("VmRSS"), 1),
        "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def median(xs):
    return statistics.median(xs) if xs else None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions(*names: str) -> dict:
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def machine() -> dict:
    mem_kib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": round(mem_kib / 2**20, 1) if mem_kib else None,
        "platform": platform.platform(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured Markdown table (also readable in a terminal)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


def write_json(name: str, data: dict, path: str | None = None) -> Path:
    out = Path(path) if path else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return out


def last_json_line(text: str) -> dict:
    """The last line of a child's stdout that parses as a JSON object (children print one)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise RuntimeError(f"child printed no JSON result; its output was:\n{text[-4000:]}")
