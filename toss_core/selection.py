"""Token selection (SPEC section 3): S = loss_utility - loss_safety; drop the tokens with the highest S.

    stats = select_tokens(tokens_files, utility_files, safety_files, SelectConfig(ratio=0.1), "mask.parquet")

Global mode is exact: exactly floor(d * N) response tokens of the whole custom set are discarded,
ties broken by (sample_id, position) ascending, so the mask does not depend on how the scores were
sharded or on the hardware. One streaming pass over the inputs keeps memory at ~10 bytes per
response token (200M tokens in ~2 GB), never a Python object per token:
  1. zip the token table with both score tables in sample_id order (digests checked), keep the
     response tokens' S in one float32 array, in (sample_id, position) order, plus a compact layout
     of each chunk (ids, digests, offsets, bit-packed response mask);
  2. find the cut with a partition (O(N), no sort), then write the mask rows chunk by chunk and
     accumulate the statistics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
    flat_values,
    list_array,
    list_offsets,
    read_table,
)

_ROWS = 2048  # samples per streamed chunk
# Discard rate by position inside an assistant turn: coarse buckets for the report, a fine curve to 256.
POSITION_BUCKETS = [(0, 1, "1"), (1, 5, "2-5"), (5, 20, "6-20"), (20, None, "21+")]
_FINE_POSITIONS = 256


def _turn_positions(resp: np.ndarray) -> np.ndarray:
    """Index of each response token inside its assistant turn (0 = the turn's first token)."""
    idx = np.arange(len(resp))
    starts = resp & ~np.concatenate([[False], resp[:-1]])
    start_idx = np.maximum.accumulate(np.where(starts, idx, 0))
    return (idx - start_idx)[resp]


@dataclass
class _Chunk:
    """What pass 2 needs of a chunk of samples, kept from pass 1 so the token table is read once:
    ~40 bytes per sample plus 1 bit per token (response mask, bit-packed)."""

    sample_id: pa.Array
    ids_digest: pa.Array
    offsets: np.ndarray
    resp_bits: np.ndarray
    n_tokens: int

    def response_mask(self) -> np.ndarray:
        return np.unpackbits(self.resp_bits, count=self.n_tokens).astype(bool)


def _collect_scores(tokens_files, utility_files, safety_files) -> tuple[np.ndarray, np.ndarray, list[_Chunk]]:
    """Pass 1: S of every response token in (sample_id, position) order, response tokens per sample,
    and the compact chunk layout for pass 2."""
    toks = RowStream(tokens_files, ["sample_id", "ids_digest", "response_mask"], _ROWS)
    util = RowStream(utility_files, ["sample_id", "ids_digest", "loss"], _ROWS)
    safe = RowStream(safety_files, ["sample_id", "ids_digest", "loss"], _ROWS)
    parts, counts, chunks = [], [], []
    while not toks.exhausted():
        t = toks.take(_ROWS, exact=False)
        u, h = util.take(t.num_rows), safe.take(t.num_rows)
        check_aligned(t, u, "utility scores")
        check_aligned(t, h, "safety scores")
        resp = flat_values(t.column("response_mask"), bool)
        offsets = list_offsets(t.column("response_mask"))
        s = flat_values(u.column("loss"), np.float32)[resp] - flat_values(h.column("loss"), np.float32)[resp]
        if np.isnan(s).any():
            raise TableError("a response token has no loss in the score tables (NaN): were they computed "
                             "with another response mask?")
        parts.append(s)
        counts.append(np.add.reduceat(resp, offsets[:-1]) if len(resp) else np.zeros(t.num_rows, np.int64))
        chunks.append(_Chunk(t.column("sample_id").combine_chunks(), t.column("ids_digest").combine_chunks(),
                             offsets, np.packbits(resp), len(resp)))
    for name, stream in (("utility scores", util), ("safety scores", safe)):
        if not stream.exhausted():
            raise TableError(f"{name} have more samples than the token table")
    scores = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    return scores, (np.concatenate(counts) if counts else np.zeros(0, np.int64)), chunks


def global_top(scores: np.ndarray, k: int) -> np.ndarray:
    """Bool mask of the k largest scores; ties at the cut go to the earliest indices (index order is
    (sample_id, position) order, so this is the SPEC's tie-break)."""
    discard = np.zeros(len(scores), dtype=bool)
    if k <= 0:
        return discard
    if k >= len(scores):
        discard[:] = True
        return discard
    cut = np.partition(scores, len(scores) - k)[len(scores) - k]  # the k-th largest value
    np.greater(scores, cut, out=discard)
    remaining = k - int(discard.sum())
    discard[np.flatnonzero(scores == cut)[:remaining]] = True
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
    """Counters accumulated while the mask is written (pass 2)."""

    def __init__(self, lo: float, hi: float, bins: int = 50):
        self.lo, self.hi, self.bins = lo, (hi if hi > lo else lo + 1.0), bins
        self.edges = np.linspace(self.lo, self.hi, bins + 1)
        self.hist_all = np.zeros(bins, np.int64)
        self.hist_discarded = np.zeros(bins, np.int64)
        self.pos_total = np.zeros(_FINE_POSITIONS + 1, np.int64)
        self.pos_discarded = np.zeros(_FINE_POSITIONS + 1, np.int64)
        self.samples = self.samples_touched = self.samples_emptied = 0

    def add(self, s, d, pos, per_sample_discards, per_sample_counts):
        # Equal-width bins by arithmetic + bincount: np.histogram with explicit edges sorts the data.
        b = np.minimum(((s - self.lo) * (self.bins / (self.hi - self.lo))).astype(np.int64), self.bins - 1)
        self.hist_all += np.bincount(b, minlength=self.bins)
        self.hist_discarded += np.bincount(b[d], minlength=self.bins)
        p = np.minimum(pos, _FINE_POSITIONS)
        self.pos_total += np.bincount(p, minlength=_FINE_POSITIONS + 1)
        self.pos_discarded += np.bincount(p[d], minlength=_FINE_POSITIONS + 1)
        self.samples += len(per_sample_counts)
        self.samples_touched += int((per_sample_discards > 0).sum())
        self.samples_emptied += int(((per_sample_discards == per_sample_counts) & (per_sample_counts > 0)).sum())

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


def _write_mask(chunks: list[_Chunk], scores, discard, sink) -> _Stats:
    """Pass 2: write full-length discard/score lists per sample, chunk by chunk."""
    stats = _Stats(float(scores.min()) if len(scores) else 0.0, float(scores.max()) if len(scores) else 1.0)
    cursor = 0
    # Scores are continuous and ids unique: dictionary encoding costs time for nothing.
    with pq.ParquetWriter(sink, MASK_SCHEMA, use_dictionary=False) as writer:
        for c in chunks:
            offsets, resp = c.offsets, c.response_mask()
            n = int(resp.sum())
            s, d = scores[cursor : cursor + n], discard[cursor : cursor + n]
            cursor += n
            full_s = np.full(len(resp), np.nan, np.float32)
            full_s[resp] = s
            full_d = np.zeros(len(resp), bool)
            full_d[resp] = d
            rows = len(c.sample_id)
            row_d = np.add.reduceat(full_d, offsets[:-1]) if len(resp) else np.zeros(rows, np.int64)
            row_n = np.add.reduceat(resp, offsets[:-1]) if len(resp) else np.zeros(rows, np.int64)
            stats.add(s, d, _turn_positions(resp), row_d, row_n)
            writer.write_table(pa.table(
                {
                    "sample_id": c.sample_id,
                    "ids_digest": c.ids_digest,
                    "discard": list_array(full_d, offsets, pa.bool_()),
                    "score": list_array(full_s, offsets, pa.float32()),
                },
                schema=MASK_SCHEMA,
            ))
    return stats


def select_tokens(
    tokens_files: Sequence[str],
    utility_files: Sequence[str],
    safety_files: Sequence[str],
    cfg: SelectConfig,
    sink,
) -> dict:
    """Write the mask table to `sink` (path or file object); return its statistics (SPEC section 3)."""
    scores, counts, chunks = _collect_scores(tokens_files, utility_files, safety_files)
    discard = choose(scores, counts, cfg)
    stats = _write_mask(chunks, scores, discard, sink)
    n, k = len(scores), int(discard.sum())
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


# ---- what TOSS-Pro needs from a mask (SPEC section 5) ----------------------------------------------

def read_mask(files: Sequence[str]) -> pa.Table:
    return read_table(files, MASK_SCHEMA)


def flagged_labels(mask: pa.Table) -> dict[int, np.ndarray]:
    """Mode 'tokens': for each sample with flagged tokens, a label mask that is true ONLY at them."""
    out = {}
    ids = mask.column("sample_id").to_numpy()
    for sid, d in zip(ids, mask.column("discard").to_pylist()):
        d = np.asarray(d, dtype=bool)
        if d.any():
            out[int(sid)] = d
    return out


def top_flagged_samples(mask: pa.Table, k: int) -> list[int]:
    """Mode 'samples': the first k distinct samples walking down the global ranking of S.

    A sample's first appearance in the ranking is its highest score; ties go to the smaller sample id
    (the SPEC's (sample_id, position) tie-break)."""
    ids = mask.column("sample_id").to_numpy()
    offsets = list_offsets(mask.column("score"))
    s = flat_values(mask.column("score"), np.float32)
    s = np.where(np.isnan(s), -np.inf, s)
    best = np.maximum.reduceat(s, offsets[:-1]) if len(s) else np.zeros(0)
    order = np.lexsort((ids, -best))
    return [int(ids[i]) for i in order[:k] if np.isfinite(best[i])]
