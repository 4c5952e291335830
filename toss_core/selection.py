"""Token selection (SPEC section 3): S = loss_utility - loss_safety; drop the tokens with the highest S.

    stats = select_tokens(tokens_files, utility_files, safety_files, SelectConfig(ratio=0.1),
                          ["mask-00000.parquet", "mask-00001.parquet"])   # or one path

S is the exact difference of the two stored float32 losses: they are subtracted in float64, as the
reference code's Python floats do (a float32 difference rounds near-ties together and changes which
tokens are cut). Global mode is exact: exactly floor(d * N) response tokens of the whole custom set are
discarded, ties broken by (sample_id, position) ascending, so the mask does not depend on how the scores
were sharded, how many files the mask is written as, or the hardware. One streaming pass over the inputs
keeps memory at ~13 bytes per response token at the peak (200M tokens in ~3 GB), never a Python object
per token:
  1. zip the token table with both score tables in sample_id order (digests checked; each table
     decoded in a background thread), keep the response tokens' S in one float64 array, in
     (sample_id, position) order, plus a compact layout of each chunk (ids, digests, offsets,
     bit-packed response mask, response tokens per sample);
  2. find the cut with a partition (O(N), no sort), then write the discarded positions chunk by chunk,
     as one or more files of consecutive samples, and accumulate the statistics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from toss_core.config import SelectConfig
from toss_core.tables import (
    MASK_SCHEMA,
    RowStream,
    TableError,
    check_aligned,
    discard_positions,
    flat_values,
    list_offsets,
)

_ROWS = 2048  # samples per streamed chunk
_COMPARE_CHUNK = 1 << 20  # scores compared with the cut at a time
# Discard rate by position inside an assistant turn: coarse buckets for the report, a fine curve to 256.
POSITION_BUCKETS = [(0, 1, "1"), (1, 5, "2-5"), (5, 20, "6-20"), (20, None, "21+")]
_FINE_POSITIONS = 256


def _turns(resp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) index of each run of response tokens, i.e. of each assistant turn."""
    step = np.diff(resp.view(np.int8), prepend=np.int8(0), append=np.int8(0))
    return np.flatnonzero(step == 1), np.flatnonzero(step == -1)


@dataclass
class _Chunk:
    """What pass 2 needs of a chunk of samples, kept from pass 1 so the token table is read once:
    ~40 bytes per sample plus 1 bit per token (response mask, bit-packed)."""

    sample_id: pa.Array
    ids_digest: pa.Array
    offsets: np.ndarray
    resp_bits: np.ndarray
    n_tokens: int
    counts: np.ndarray  # response tokens per sample

    @property
    def n_response(self) -> int:
        return int(self.counts.sum())

    def response_mask(self) -> np.ndarray:
        return np.unpackbits(self.resp_bits, count=self.n_tokens).astype(bool)


def _footer_counts(files: Sequence[str], column: str) -> tuple[int, int]:
    """(rows, values of the list column) of a sharded table, from the Parquet footers alone."""
    rows = values = 0
    for f in files:
        md = pq.ParquetFile(f).metadata
        rows += md.num_rows
        j = next((j for j in range(md.num_columns) if md.schema.column(j).path.startswith(column + ".")), None)
        if j is not None:
            values += sum(md.row_group(g).column(j).num_values for g in range(md.num_row_groups))
    return rows, values


def _check_score_rows(tokens: pa.Table, token_lengths: np.ndarray, scores: pa.Table, stream: RowStream,
                      what: str) -> None:
    """Score rows apply to their token rows only with the same digest and exactly one loss per token."""
    try:
        check_aligned(tokens, scores, what)
    except TableError as e:
        raise TableError(f"{stream.where(scores.column('sample_id')[0].as_py())}: {e}") from None
    lengths = np.diff(list_offsets(scores.column("loss")))
    if (bad := np.flatnonzero(lengths != token_lengths)).size:
        i, sid = int(bad[0]), scores.column("sample_id")[int(bad[0])].as_py()
        raise TableError(f"{stream.where(sid)}: {what}: sample {sid}: `loss` has {int(lengths[i])} entries for "
                         f"{int(token_lengths[i])} tokens (a shifted, truncated or foreign row)")


def _check_finite(losses: np.ndarray, resp_rows: np.ndarray, sample_ids: pa.Array, stream: RowStream,
                  what: str) -> None:
    """Every response token needs a finite loss: inf - inf is NaN, and an inf S sorts above everything."""
    if (bad := np.flatnonzero(~np.isfinite(losses))).size:
        sid = sample_ids[int(resp_rows[bad[0]])].as_py()
        raise TableError(f"{stream.where(sid)}: {what}: sample {sid}: a response token's `loss` is "
                         f"{losses[bad[0]]} (expected a finite -log p; NaN means the scores were computed with "
                         "another response mask)")


def _collect_scores(tokens_files, utility_files, safety_files, rows: int,
                    capacity: int) -> tuple[np.ndarray, np.ndarray, list[_Chunk]]:
    """Pass 1: S of every response token in (sample_id, position) order, response tokens per sample,
    and the compact chunk layout for pass 2.

    The three tables are decoded in background threads (pyarrow releases the GIL). S goes into one
    buffer sized from the footers: per-chunk arrays joined at the end would double the peak, and the
    pages of the buffer that are never written (prompt tokens) never become resident. S is float64: the
    exact difference of the float32 losses (SPEC section 3)."""
    toks = RowStream(tokens_files, ["sample_id", "ids_digest", "response_mask"], rows, background=True)
    util = RowStream(utility_files, ["sample_id", "ids_digest", "loss"], rows, background=True)
    safe = RowStream(safety_files, ["sample_id", "ids_digest", "loss"], rows, background=True)
    scores = np.empty(capacity, np.float64)  # tokens in the table: an upper bound on response tokens
    n, chunks = 0, []
    while not toks.exhausted():
        t = toks.take(rows, exact=False)
        u, h = util.take(t.num_rows), safe.take(t.num_rows)
        resp = flat_values(t.column("response_mask"), bool)
        offsets = list_offsets(t.column("response_mask"))
        _check_score_rows(t, np.diff(offsets), u, util, "utility scores")
        _check_score_rows(t, np.diff(offsets), h, safe, "safety scores")
        m = int(np.count_nonzero(resp))
        if n + m > len(scores):  # footers without the column's value counts: grow
            scores = np.concatenate([scores[:n], np.empty(max(m, n), np.float64)])
        s = scores[n : n + m]
        # Keep the response tokens' losses, then subtract in float64, as the reference code's Python floats do.
        lu = np.compress(resp, flat_values(u.column("loss"), np.float32))
        lh = np.compress(resp, flat_values(h.column("loss"), np.float32))
        if not (np.isfinite(lu).all() and np.isfinite(lh).all()):
            resp_rows = np.repeat(np.arange(t.num_rows), np.diff(offsets))[resp]
            _check_finite(lu, resp_rows, t.column("sample_id"), util, "utility scores")
            _check_finite(lh, resp_rows, t.column("sample_id"), safe, "safety scores")
        np.subtract(lu.astype(np.float64), lh, out=s)
        n += m
        counts = np.add.reduceat(resp, offsets[:-1]) if len(resp) else np.zeros(t.num_rows, np.int64)
        chunks.append(_Chunk(t.column("sample_id").combine_chunks(), t.column("ids_digest").combine_chunks(),
                             offsets, np.packbits(resp), len(resp), counts))
    for name, stream in (("utility scores", util), ("safety scores", safe)):
        if not stream.exhausted():
            raise TableError(f"{name} have more samples than the token table")
    return scores[:n], (np.concatenate([c.counts for c in chunks]) if chunks else np.zeros(0, np.int64)), chunks


def _top_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Ascending indices of the k largest values, ties at the cut to the earliest indices."""
    if k <= 0:
        return np.zeros(0, np.int64)
    if k >= len(values):
        return np.arange(len(values))
    cut = np.partition(values, len(values) - k)[len(values) - k]  # the k-th largest value
    above = np.flatnonzero(values > cut)
    return np.union1d(above, np.flatnonzero(values == cut)[: k - len(above)])


def global_top(scores: np.ndarray, k: int) -> np.ndarray:
    """Bool mask of the k largest scores; ties at the cut go to the earliest indices (index order is
    (sample_id, position) order, so this is the SPEC's tie-break). Exact for float64 scores.

    The cut is found on a float32 copy, partitioned in place (half the bytes of a float64 partition;
    rounding to float32 keeps the order and only merges near-equal values), then settled exactly, in
    float64, among the few tokens that round to the cut value. An exact histogram of sort keys avoids
    the copy but measured 3-4x slower at 10M tokens (docs/benchmarks.md)."""
    n = len(scores)
    discard = np.zeros(n, dtype=bool)
    if k <= 0 or k >= n:
        discard[:] = k >= n > 0
        return discard
    approx = scores.astype(np.float32)
    approx.partition(n - k)
    cut = approx[n - k]
    del approx
    ties = []
    for lo in range(0, n, _COMPARE_CHUNK):  # chunked: no second full-size float32 copy
        part = scores[lo : lo + _COMPARE_CHUNK].astype(np.float32, copy=False)
        np.greater(part, cut, out=discard[lo : lo + _COMPARE_CHUNK])
        ties.append(np.flatnonzero(part == cut) + lo)
    at_cut = np.concatenate(ties)
    discard[at_cut[_top_indices(scores[at_cut], k - int(np.count_nonzero(discard)))]] = True
    return discard


def per_sample_top(scores: np.ndarray, counts: np.ndarray, ratio: float) -> np.ndarray:
    """The top floor(ratio * n_i) scores inside each sample, ties to the earlier position."""
    sample = np.repeat(np.arange(len(counts)), counts)
    position = np.arange(len(scores))
    order = np.lexsort((position, -scores, sample))
    starts = np.repeat(np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    rank = np.empty(len(scores), dtype=np.int64)
    rank[order] = np.arange(len(scores)) - starts
    budget = np.floor(ratio * counts).astype(np.int64)
    return rank < np.repeat(budget, counts)


def choose(scores: np.ndarray, counts: np.ndarray, cfg: SelectConfig) -> np.ndarray:
    if cfg.mode == "global":
        return global_top(scores, math.floor(cfg.ratio * len(scores)))
    if cfg.mode == "sample":
        return per_sample_top(scores, counts, cfg.ratio)
    return scores > cfg.threshold


class _Stats:
    """Counters accumulated while the mask is written (pass 2); one per writer thread, then added up."""

    def __init__(self, lo: float, hi: float, bins: int = 50):
        self.lo, self.hi, self.bins = lo, (hi if hi > lo else lo + 1.0), bins
        self.edges = np.linspace(self.lo, self.hi, bins + 1)
        self.hist_all = np.zeros(bins, np.int64)
        self.hist_discarded = np.zeros(bins, np.int64)
        self.pos_total = np.zeros(_FINE_POSITIONS + 1, np.int64)
        self.pos_discarded = np.zeros(_FINE_POSITIONS + 1, np.int64)
        self.samples = self.samples_touched = self.samples_emptied = 0

    def add(self, s, d, resp, gone, per_sample_discards, per_sample_counts):
        """s, d: scores and discard flags of the response tokens; resp: per token of the chunk; gone: the
        chunk-level indices of the discarded tokens."""
        # Equal-width bins by arithmetic + bincount: np.histogram with explicit edges sorts the data.
        b = ((s - self.lo) * (self.bins / (self.hi - self.lo))).astype(np.intp)
        np.clip(b, 0, self.bins - 1, out=b)
        self.hist_all += np.bincount(b, minlength=self.bins)
        self.hist_discarded += np.bincount(b[d], minlength=self.bins)
        # Discard rate by position in the turn, without a position per token: the totals follow from the
        # turn lengths (a turn of length L has a token at every position < L); only discarded tokens
        # (a tenth of them) get their position looked up.
        starts, ends = _turns(resp)
        lengths = ends - starts
        longer = np.bincount(np.minimum(lengths, _FINE_POSITIONS + 1), minlength=_FINE_POSITIONS + 2)[::-1].cumsum()[::-1]
        self.pos_total[:_FINE_POSITIONS] += longer[1 : _FINE_POSITIONS + 1]  # turns longer than p
        self.pos_total[_FINE_POSITIONS] += int(np.maximum(lengths - _FINE_POSITIONS, 0).sum())
        pos = gone - starts[np.searchsorted(starts, gone, side="right") - 1]
        self.pos_discarded += np.bincount(np.minimum(pos, _FINE_POSITIONS), minlength=_FINE_POSITIONS + 1)
        self.samples += len(per_sample_counts)
        self.samples_touched += int((per_sample_discards > 0).sum())
        self.samples_emptied += int(((per_sample_discards == per_sample_counts) & (per_sample_counts > 0)).sum())

    def __iadd__(self, other: "_Stats") -> "_Stats":
        for name in ("hist_all", "hist_discarded", "pos_total", "pos_discarded"):
            getattr(self, name).__iadd__(getattr(other, name))
        self.samples += other.samples
        self.samples_touched += other.samples_touched
        self.samples_emptied += other.samples_emptied
        return self

    def as_dict(self) -> dict:
        def rate(lo, hi):
            tot = self.pos_total[lo:hi].sum()
            return float(self.pos_discarded[lo:hi].sum() / tot) if tot else None

        return {
            "samples": self.samples,
            "samples_touched": self.samples_touched,
            "samples_fully_discarded": self.samples_emptied,
            "discard_rate_by_position": {label: rate(lo, hi) for lo, hi, label in POSITION_BUCKETS},
            "discard_rate_curve": [
                float(d / t) if t else None for d, t in zip(self.pos_discarded[:_FINE_POSITIONS], self.pos_total)
            ],
            "score_histogram": {
                "edges": self.edges.tolist(), "all": self.hist_all.tolist(), "discarded": self.hist_discarded.tolist()
            },
        }


def _write_part(chunks: list[_Chunk], scores, discard, cursor: int, sink, stats: _Stats) -> _Stats:
    """Write consecutive chunks as one Parquet file of the mask: the discarded positions of each sample."""
    # Digests are unique: a dictionary and page statistics cost time for nothing.
    with pq.ParquetWriter(sink, MASK_SCHEMA, use_dictionary=False, write_statistics=False) as writer:
        for c in chunks:
            resp = c.response_mask()
            s, d = scores[cursor : cursor + c.n_response], discard[cursor : cursor + c.n_response]
            cursor += c.n_response
            gone = np.flatnonzero(resp)[d]  # chunk-level token indices, ascending
            row_d = np.bincount(np.searchsorted(c.offsets, gone, side="right") - 1, minlength=len(c.counts))
            stats.add(s, d, resp, gone, row_d, c.counts)
            writer.write_table(pa.table(
                {"sample_id": c.sample_id, "ids_digest": c.ids_digest,
                 "discard_pos": discard_positions(gone, c.offsets)},
                schema=MASK_SCHEMA,
            ))
    return stats


def _write_mask(chunks: list[_Chunk], scores, discard, sinks: Sequence) -> _Stats:
    """Pass 2: the mask as len(sinks) files of consecutive samples, written in parallel (pyarrow encodes
    without the GIL; the statistics are most of this pass)."""
    lo, hi = (float(scores.min()), float(scores.max())) if len(scores) else (0.0, 1.0)
    # Cut the chunk list into len(sinks) runs of about equal token counts: each chunk goes to the file
    # whose share of the tokens holds the chunk's middle.
    sizes = np.array([c.n_tokens for c in chunks], np.float64)
    middles = np.cumsum(sizes) - sizes / 2
    run_of = np.minimum((middles * len(sinks) / max(sizes.sum(), 1)).astype(np.int64), len(sinks) - 1)
    runs = np.split(np.arange(len(chunks)), np.searchsorted(run_of, np.arange(1, len(sinks))))
    cursors = np.concatenate([[0], np.cumsum([c.n_response for c in chunks])])
    with ThreadPoolExecutor(len(sinks), thread_name_prefix="toss-mask") as pool:
        parts = [
            pool.submit(_write_part, [chunks[i] for i in run], scores, discard,
                        int(cursors[run[0]]) if len(run) else 0, sink, _Stats(lo, hi))
            for run, sink in zip(runs, sinks)
        ]
        stats = _Stats(lo, hi)
        for part in parts:
            stats += part.result()
    return stats


def select_tokens(
    tokens_files: Sequence[str],
    utility_files: Sequence[str],
    safety_files: Sequence[str],
    cfg: SelectConfig,
    sink,
) -> dict:
    """Write the mask table to `sink` and return its statistics (SPEC section 3).

    `sink` is a path or file object, or a list of them: the mask is then split into that many files of
    consecutive samples (a sharded table, as every reader accepts), written in parallel."""
    sinks = list(sink) if isinstance(sink, (list, tuple)) else [sink]
    # Chunks small enough that a small table still spreads over every file.
    samples, tokens = _footer_counts(tokens_files, "response_mask")
    rows = min(_ROWS, max(64, math.ceil(samples / len(sinks))))
    scores, counts, chunks = _collect_scores(tokens_files, utility_files, safety_files, rows, tokens)
    pa.default_memory_pool().release_unused()  # pass 1's decode buffers: not kept through pass 2's peak
    discard = choose(scores, counts, cfg)
    stats = _write_mask(chunks, scores, discard, sinks)
    n, k = len(scores), int(np.count_nonzero(discard))
    cut = float(scores[discard].min()) if k else None
    return {
        "mode": cfg.mode,
        "ratio": cfg.ratio,
        "threshold": cfg.threshold,
        "response_tokens": n,
        "discarded_tokens": k,
        "discarded_share": k / n if n else 0.0,
        "score_cut": cut,
        "score_mean": float(scores.mean()) if n else None,
        **stats.as_dict(),
    }


# ---- what TOSS-Pro needs from the scores (SPEC section 5) ------------------------------------------

def sample_best_scores(utility_files: Sequence[str], safety_files: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(sample ids, each sample's highest S over its response tokens), streamed from the two score tables
    (digests checked against each other); -inf for a sample without a scored token."""
    util = RowStream(utility_files, ["sample_id", "ids_digest", "loss"], _ROWS, background=True)
    safe = RowStream(safety_files, ["sample_id", "ids_digest", "loss"], _ROWS, background=True)
    ids, best = [], []
    while not util.exhausted():
        u = util.take(_ROWS, exact=False)
        h = safe.take(u.num_rows)
        _check_score_rows(u, np.diff(list_offsets(u.column("loss"))), h, safe, "safety scores vs utility scores")
        lu, lh = flat_values(u.column("loss"), np.float64), flat_values(h.column("loss"), np.float32)
        for losses, stream, what in ((lu, util, "utility scores"), (lh, safe, "safety scores")):
            if np.isinf(losses).any():  # NaN is "not a response token" here; inf is never a loss
                rows = np.repeat(np.arange(u.num_rows), np.diff(list_offsets(u.column("loss"))))
                _check_finite(np.where(np.isnan(losses), 0, losses), rows, u.column("sample_id"), stream, what)
        s = lu - lh
        s = np.where(np.isnan(s), -np.inf, s)
        offsets = list_offsets(u.column("loss"))
        starts = np.minimum(offsets[:-1], max(len(s) - 1, 0))
        top = np.maximum.reduceat(s, starts) if len(s) else np.full(u.num_rows, -np.inf)
        top[np.diff(offsets) == 0] = -np.inf  # reduceat gives an empty row its neighbour's value
        ids.append(u.column("sample_id").to_numpy())
        best.append(top)
    if not safe.exhausted():
        raise TableError("safety scores have more samples than the utility scores")
    cat = lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dt)  # noqa: E731
    return cat(ids, np.int64), cat(best, np.float64)


def top_flagged_samples(utility_files: Sequence[str], safety_files: Sequence[str], k: int,
                        exclude: Sequence[int] = ()) -> list[int]:
    """Mode 'samples': walking down the global ranking of S, the first k distinct samples not in `exclude`
    (those collected in earlier rounds: the paper's Algorithm 1).

    A sample's first appearance in the ranking is its highest S; ties go to the smaller sample id (the
    SPEC's (sample_id, position) tie-break)."""
    ids, best = sample_best_scores(utility_files, safety_files)
    order = np.lexsort((ids, -best))
    skip = set(int(i) for i in exclude)
    picked = [int(ids[i]) for i in order if np.isfinite(best[i]) and int(ids[i]) not in skip]
    return picked[:k]
