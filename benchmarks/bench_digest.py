"""How much verifying digests on every read costs: streaming hash throughput over a file on disk.

    python benchmarks/bench_digest.py [--size 256M] [--repeats 3]

The store checks every file of an artifact against its manifest's sha256 before a reader gets it
(docs/security.md). This measures that check (toss_core.store._hash_stream: 8 MiB blocks through
hashlib) next to two cheaper hashes, on a file of random bytes read from the page cache, and writes
benchmarks/results/bench_digest.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time

from _common import RESULTS, parse_size

from toss_core.store import _BLOCK, _hash_stream


def _stream(path: str, make) -> float:
    t0 = time.perf_counter()
    h = make()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    h.hexdigest()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="256M")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    size = parse_size(args.size)
    hashes = {"sha256 (the store's, via _hash_stream)": None, "blake2b": hashlib.blake2b}
    try:
        import xxhash

        hashes["xxh3_64 (not cryptographic)"] = xxhash.xxh3_64
    except ImportError:
        pass
    with tempfile.NamedTemporaryFile(delete=False) as f:
        for _ in range(0, size, 1 << 24):
            f.write(os.urandom(min(1 << 24, size - f.tell())))
        path = f.name
    try:
        results = {}
        for name, make in hashes.items():
            runs = []
            for _ in range(args.repeats):
                if make is None:
                    t0 = time.perf_counter()
                    with open(path, "rb") as fh:
                        _hash_stream(fh)
                    runs.append(time.perf_counter() - t0)
                else:
                    runs.append(_stream(path, make))
            seconds = statistics.median(runs)
            results[name] = {"seconds": round(seconds, 4), "MB_per_s": round(size / seconds / 1e6, 1)}
            print(f"{name:<40} {results[name]['MB_per_s']:>9,.1f} MB/s  ({seconds:.3f} s for {size / 1e6:.0f} MB)")
    finally:
        os.unlink(path)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_digest.json").write_text(json.dumps(
        {"size_bytes": size, "repeats": args.repeats, "load_avg": os.getloadavg(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
