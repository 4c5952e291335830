"""Mask inspection: one self-contained HTML page (plus PNG plots) showing what a mask drops, and where.

    report = mask_report(mask_files, token_files, tokenizer, utility_files=u, safety_files=s, samples=200)
    write_html(report, "report.html")    # opens offline: inline CSS and JS, plots as base64 PNG
    write_pngs(report, "plots/")         # the same plots as files

The page shows at most `samples` conversations token by token, but every statistic covers all tokens
of the mask. They are computed streaming, in batches of rows with numpy counters (never a Python object
per token), in three passes:
  1. the score tables alone: the range of S = loss_u - loss_h, so the histogram has fixed edges;
  2. the mask zipped with the token table (ids digests checked, so a mask is never shown against another
     token table) and the optional score tables: every counter, plus drops per sample for the ranking;
  3. the rows of the samples to show, decoded token by token.
The mask holds only which tokens are dropped; S comes from the two score tables (both are needed for it),
so the page shows no scores without them. Either mask layout (tables.discard_flags) gives the same page.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from toss_core.selection import POSITION_BUCKETS
from toss_core.tables import (
    SCORES_SCHEMA,
    TOKENS_SCHEMA,
    RowStream,
    TableError,
    check_aligned,
    check_columns,
    discard_flags,
    flat_values,
    list_offsets,
    mask_layout,
)

_ROWS = 1024  # samples per streamed batch
FINE_POSITIONS = 256  # the fine curve: response positions 1..256, then one "257+" bin (as in selection.py)
_SCORE_BINS = 60
_SHARE_BINS = 20
_TOP = 20  # rows in the top-token / n-gram tables
_NGRAM_BASE = 1 << 21  # n-gram key = id0 * B^2 + id1 * B + id2: fits int64 for vocabularies below 2M
_COLOUR_STEPS = 10  # shades on each side of S = 0


# ---- what a report holds ------------------------------------------------------------------------

@dataclass
class SampleView:
    """One shown conversation, token by token (only built for the samples on the page)."""

    sample_id: int
    meta: dict
    texts: list[str]  # what each token displays as
    special: np.ndarray  # bool: a special token (<|im_start|>, ...)
    response: np.ndarray  # bool
    discard: np.ndarray  # bool
    score: np.ndarray  # float32, NaN off the response
    loss_u: np.ndarray | None = None
    loss_h: np.ndarray | None = None

    @property
    def n_response(self) -> int:
        return int(self.response.sum())

    @property
    def n_dropped(self) -> int:
        return int(self.discard.sum())


@dataclass
class Dropped:
    """A token (or n-gram of consecutive tokens) and how often the mask dropped it."""

    ids: tuple[int, ...]
    text: str
    count: int
    total: int | None = None  # for single tokens: how often it occurs in responses


@dataclass
class GroundTruth:
    """The mask against the data's own `is_harmful` flags (samples without the flag are left out)."""

    labelled_samples: int
    flagged_samples: int
    flagged_touched: int  # flagged samples with at least one dropped token
    dropped: int  # dropped tokens in labelled samples
    dropped_in_flagged: int
    response: int  # response tokens in labelled samples
    response_in_flagged: int

    @property
    def precision(self) -> float | None:
        """Share of dropped tokens that sit inside flagged samples."""
        return self.dropped_in_flagged / self.dropped if self.dropped else None

    @property
    def recall(self) -> float | None:
        """Share of the flagged samples' response tokens that were dropped."""
        return self.dropped_in_flagged / self.response_in_flagged if self.response_in_flagged else None

    @property
    def random_precision(self) -> float | None:
        """The precision a mask dropping tokens at random would get: the flagged share of response tokens."""
        return self.response_in_flagged / self.response if self.response else None


@dataclass
class Report:
    samples_total: int
    response_tokens: int
    dropped_tokens: int
    samples_touched: int
    samples_fully_dropped: int
    cut: float | None  # the smallest discarded score
    score_edges: np.ndarray
    hist_all: np.ndarray
    hist_dropped: np.ndarray
    pos_total: np.ndarray  # index p < 256: response position p + 1 in its turn; index 256: positions 257+
    pos_dropped: np.ndarray
    share_zero: int  # samples with response tokens and nothing dropped
    share_edges: np.ndarray  # over (0, 1]
    share_counts: np.ndarray
    top_tokens: list[Dropped]  # the most often dropped token ids; `total`: times seen in a response
    top_ngrams: dict[int, list[Dropped]]  # n (2, 3) -> the most frequent runs of n consecutive dropped tokens
    truth: GroundTruth | None
    mean_losses: dict[str, float | None] | None  # "loss_u kept", "loss_u dropped", ... with score tables
    colour_limit: float  # |S| that gets the strongest shade
    shown: list[SampleView]
    context: dict[str, str] = field(default_factory=dict)  # where the inputs came from, for the header

    @property
    def dropped_share(self) -> float:
        return self.dropped_tokens / self.response_tokens if self.response_tokens else 0.0

    def position_rates(self) -> dict[str, tuple[int, int]]:
        """Discard counts by response position bucket: label -> (dropped, total)."""
        return {label: (int(self.pos_dropped[lo:hi].sum()), int(self.pos_total[lo:hi].sum()))
                for lo, hi, label in POSITION_BUCKETS}


# ---- streaming ----------------------------------------------------------------------------------

def _check_files(files: Sequence[str], schema: pa.Schema) -> list[str]:
    files = [files] if isinstance(files, (str, Path)) else list(files)
    if not files:
        raise TableError(f"no Parquet files given for a table with columns {schema.names}")
    for f in files:
        check_columns(pq.read_schema(f), schema, str(f))
    return [str(f) for f in files]


def _aligned(mask_files, token_files, token_columns, score_files: dict) -> Iterator[dict[str, pa.Table]]:
    """The mask in batches, each with the same rows of the token table and of each score table."""
    mask = RowStream(mask_files, ["sample_id", "ids_digest", mask_layout(mask_files)], _ROWS)
    others = {"tokens": RowStream(token_files, ["sample_id", "ids_digest", *token_columns], _ROWS)}
    for name, files in score_files.items():
        others[name] = RowStream(files, ["sample_id", "ids_digest", "loss"], _ROWS)
    while not mask.exhausted():
        m = mask.take(_ROWS, exact=False)
        batch = {"mask": m}
        for name, stream in others.items():
            try:
                batch[name] = stream.take(m.num_rows)
            except TableError as e:
                raise TableError(f"the mask has more samples than the {name} table ({e}): it belongs to another "
                                 "token table") from e
            check_aligned(batch[name], m, f"mask vs {name} table")
        yield batch
    for name, stream in others.items():
        if not stream.exhausted():
            raise TableError(f"the {name} table has more samples than the mask: it belongs to another mask")


def _scores_of(batch: dict[str, pa.Table], n_tokens: int) -> np.ndarray:
    """S = loss_u - loss_h per token of the batch (float64, exact), NaN without both score tables."""
    if "loss_u" not in batch or "loss_h" not in batch:
        return np.full(n_tokens, np.nan)
    return flat_values(batch["loss_u"].column("loss"), np.float64) - flat_values(batch["loss_h"].column("loss"),
                                                                              np.float32)


def _row_starts(offsets: np.ndarray, n: int) -> np.ndarray:
    starts = np.zeros(n, bool)
    starts[offsets[:-1][offsets[:-1] < n]] = True
    return starts


def _turn_positions(resp: np.ndarray, row_start: np.ndarray) -> np.ndarray:
    """0-based index of each response token inside its assistant turn (a turn never spans two rows)."""
    idx = np.arange(len(resp))
    prev = np.concatenate([[False], resp[:-1]]) & ~row_start
    start_idx = np.maximum.accumulate(np.where(resp & ~prev, idx, 0))
    return (idx - start_idx)[resp]


def _per_row(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    cs = np.concatenate([[0], np.cumsum(values, dtype=np.int64)])
    return cs[offsets[1:]] - cs[offsets[:-1]]


def _grow_add(acc: np.ndarray, counts: np.ndarray) -> np.ndarray:
    if len(counts) > len(acc):
        acc = np.concatenate([acc, np.zeros(len(counts) - len(acc), np.int64)])
    acc[: len(counts)] += counts
    return acc


def _score_range(score_files: dict) -> tuple[float, float]:
    lo, hi = math.inf, -math.inf
    if {"loss_u", "loss_h"} <= set(score_files):
        streams = {name: RowStream(score_files[name], ["sample_id", "ids_digest", "loss"], _ROWS)
                   for name in ("loss_u", "loss_h")}
        while not streams["loss_u"].exhausted():
            u = streams["loss_u"].take(_ROWS, exact=False)
            batch = {"loss_u": u, "loss_h": streams["loss_h"].take(u.num_rows)}
            check_aligned(u, batch["loss_h"], "safety scores vs utility scores")
            s = _scores_of(batch, 0)
            s = s[~np.isnan(s)]
            if len(s):
                lo, hi = min(lo, float(s.min())), max(hi, float(s.max()))
    if lo > hi:
        return 0.0, 1.0
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


class _Counters:
    """Everything pass 2 accumulates; memory is O(samples + vocabulary + distinct dropped n-grams)."""

    def __init__(self, lo: float, hi: float, with_losses: bool):
        self.edges = np.linspace(lo, hi, _SCORE_BINS + 1)
        self.hist_all = np.zeros(_SCORE_BINS, np.int64)
        self.hist_dropped = np.zeros(_SCORE_BINS, np.int64)
        self.pos_total = np.zeros(FINE_POSITIONS + 1, np.int64)
        self.pos_dropped = np.zeros(FINE_POSITIONS + 1, np.int64)
        self.tok_dropped = np.zeros(0, np.int64)
        self.tok_response = np.zeros(0, np.int64)
        self.ngrams = {2: [], 3: []}  # pending (keys, counts) pairs, merged now and then
        self.ids, self.n_resp, self.n_drop, self.flag = [], [], [], []  # per sample
        self.cut = math.inf
        self.loss_sums = {} if with_losses else None

    def add(self, batch: dict[str, pa.Table]) -> None:
        m, t = batch["mask"], batch["tokens"]
        offsets = list_offsets(t.column("input_ids"))
        x = flat_values(t.column("input_ids"), np.int64)
        resp = flat_values(t.column("response_mask"), bool)
        d = discard_flags(m, offsets, "mask")
        s = _scores_of(batch, len(x))
        if (bad := d & ~resp).any():
            row = int(np.searchsorted(offsets, np.flatnonzero(bad)[0], side="right") - 1)
            raise TableError(f"the mask drops a prompt token of sample {m.column('sample_id')[row].as_py()}: it was "
                             "made with another response mask; rerun the select stage on this token table")
        row_start = _row_starts(offsets, len(x))
        self._add_scores(s[resp], d[resp])
        p = np.minimum(_turn_positions(resp, row_start), FINE_POSITIONS)
        self.pos_total += np.bincount(p, minlength=FINE_POSITIONS + 1)
        self.pos_dropped += np.bincount(p[d[resp]], minlength=FINE_POSITIONS + 1)
        self.tok_dropped = _grow_add(self.tok_dropped, np.bincount(x[d]))
        self.tok_response = _grow_add(self.tok_response, np.bincount(x[resp]))
        self._add_ngrams(x, d, row_start)
        self.ids.append(m.column("sample_id").to_numpy())
        self.n_resp.append(_per_row(resp, offsets))
        self.n_drop.append(_per_row(d, offsets))
        self.flag.append(np.array([_harmful_flag(v) for v in t.column("meta").to_pylist()], np.int8))
        if self.loss_sums is not None:
            for name in ("loss_u", "loss_h"):
                if name in batch:
                    loss = flat_values(batch[name].column("loss"), np.float64)
                    for part, sel in (("kept", resp & ~d), ("dropped", d)):
                        v = loss[sel]
                        v = v[~np.isnan(v)]
                        total, n = self.loss_sums.get(f"{name} {part}", (0.0, 0))
                        self.loss_sums[f"{name} {part}"] = (total + float(v.sum()), n + len(v))

    def _add_scores(self, s: np.ndarray, d: np.ndarray) -> None:
        ok = ~np.isnan(s)
        self.hist_all += np.histogram(s[ok], self.edges)[0]
        self.hist_dropped += np.histogram(s[ok & d], self.edges)[0]
        if (ok & d).any():
            self.cut = min(self.cut, float(s[ok & d].min()))

    def _add_ngrams(self, x: np.ndarray, d: np.ndarray, row_start: np.ndarray) -> None:
        if len(x) and x.max() >= _NGRAM_BASE:
            return  # token ids beyond 2M: no n-gram table rather than wrong keys
        for n in (2, 3):
            if len(d) < n:
                continue
            ok = d[: len(d) - n + 1].copy()
            for k in range(1, n):  # all n tokens dropped, none of them starting a new row
                ok &= d[k: len(d) - n + 1 + k] & ~row_start[k: len(d) - n + 1 + k]
            idx = np.flatnonzero(ok)
            keys = np.zeros(len(idx), np.int64)
            for k in range(n):
                keys = keys * _NGRAM_BASE + x[idx + k]
            self.ngrams[n].append(np.unique(keys, return_counts=True))
            if sum(len(k) for k, _ in self.ngrams[n]) > 2_000_000:  # keep the pending parts bounded
                self.ngrams[n] = [_merge_counts(self.ngrams[n])]

    def top_ngrams(self, n: int) -> list[tuple[tuple[int, ...], int]]:
        keys, counts = _merge_counts(self.ngrams[n])
        order = np.lexsort((keys, -counts))[:_TOP]
        out = []
        for key, c in zip(keys[order], counts[order]):
            ids = [int(key // _NGRAM_BASE ** (n - 1 - k) % _NGRAM_BASE) for k in range(n)]
            out.append((tuple(ids), int(c)))
        return out

    def per_sample(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        cat = lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dt)  # noqa: E731
        return (cat(self.ids, np.int64), cat(self.n_resp, np.int64), cat(self.n_drop, np.int64),
                cat(self.flag, np.int8))


def _merge_counts(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    keys = np.concatenate([k for k, _ in parts])
    counts = np.concatenate([c for _, c in parts])
    uniq, inv = np.unique(keys, return_inverse=True)
    return uniq, np.bincount(inv, weights=counts, minlength=len(uniq)).astype(np.int64)


def _harmful_flag(meta: str | None) -> int:
    """1 / 0 for a boolean `is_harmful` in the row's meta JSON, -1 when the row has no such flag."""
    if not meta or "is_harmful" not in meta:
        return -1
    value = json.loads(meta).get("is_harmful")
    return int(value) if isinstance(value, bool) else -1


def _ground_truth(n_resp, n_drop, flag) -> GroundTruth | None:
    labelled = flag >= 0
    if not labelled.any():
        return None
    flagged = flag == 1
    return GroundTruth(
        labelled_samples=int(labelled.sum()), flagged_samples=int(flagged.sum()),
        flagged_touched=int((flagged & (n_drop > 0)).sum()),
        dropped=int(n_drop[labelled].sum()), dropped_in_flagged=int(n_drop[flagged].sum()),
        response=int(n_resp[labelled].sum()), response_in_flagged=int(n_resp[flagged].sum()),
    )


def _colour_limit(edges: np.ndarray, hist: np.ndarray) -> float:
    """|S| at the 99th percentile of |S| (from the histogram), so a few outliers do not wash out the shades."""
    if hist.sum() == 0:
        return 1.0
    centres = np.abs((edges[:-1] + edges[1:]) / 2)
    order = np.argsort(centres)
    cum = np.cumsum(hist[order]) / hist.sum()
    limit = float(centres[order][np.searchsorted(cum, 0.99)])
    return limit if limit > 0 else float(np.abs(edges).max()) or 1.0


def _choose_samples(ids, n_resp, n_drop, samples: int, wanted: Sequence[int] | None) -> list[int]:
    """Most dropped tokens first, then the highest dropped share, then the smaller sample id."""
    share = np.divide(n_drop, n_resp, out=np.zeros(len(ids)), where=n_resp > 0)
    order = np.lexsort((ids, -share, -n_drop))
    if wanted is None:
        return [int(i) for i in ids[order[:samples]]]
    wanted_set = {int(i) for i in wanted}
    missing = sorted(wanted_set - set(ids.tolist()))
    if missing:
        raise TableError(f"sample id(s) {missing[:10]} are not in the mask (it has {len(ids)} samples, ids "
                         f"{int(ids.min()) if len(ids) else '-'}..{int(ids.max()) if len(ids) else '-'})")
    return [int(i) for i in ids[order] if int(i) in wanted_set]


# ---- decoding -----------------------------------------------------------------------------------

class _Decoder:
    """Per-token text, cached by id. Byte-level BPE can split one character over several tokens (each alone
    decodes to U+FFFD); such a run is decoded together and its text shown on the run's first token."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[int, str] = {}
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])

    def one(self, i: int) -> str:
        if i not in self.cache:
            self.cache[i] = self.tok.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return self.cache[i]

    def texts(self, ids: list[int]) -> list[str]:
        out = [self.one(i) for i in ids]
        i = 0
        while i < len(out):
            if "\ufffd" in out[i]:
                for j in range(i + 2, min(i + 9, len(out) + 1)):
                    joined = self.tok.decode(ids[i:j], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                    if "\ufffd" not in joined:
                        out[i:j] = [joined] + [""] * (j - i - 1)
                        i = j - 1
                        break
            i += 1
        return out


def _token_label(text: str) -> str:
    """A token as a table cell or plot label: spaces and newlines made visible."""
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "→") or "∅"


# ---- the report ---------------------------------------------------------------------------------

def mask_report(
    mask_files: Sequence[str],
    token_files: Sequence[str],
    tokenizer,
    *,
    utility_files: Sequence[str] | None = None,
    safety_files: Sequence[str] | None = None,
    samples: int = 200,
    ids: Sequence[int] | None = None,
    context: dict[str, str] | None = None,
) -> Report:
    """Statistics over the whole mask, and up to `samples` conversations to show (or exactly `ids`).

    `utility_files` / `safety_files` (score tables) only add loss_u / loss_h to the hover text and the
    mean losses; `context` (name -> text) is printed in the page header, e.g. where the inputs came from.
    Raises TableError when a table has the wrong columns or does not line up with the token table.
    """
    if samples < 0:
        raise ValueError(f"samples={samples}: must be 0 or more (how many conversations the page shows)")
    mask_files = [str(f) for f in ([mask_files] if isinstance(mask_files, (str, Path)) else mask_files)]
    mask_layout(mask_files)  # a mask table, one layout throughout (else a TableError naming the file)
    token_files = _check_files(token_files, TOKENS_SCHEMA)
    scores = {name: _check_files(files, SCORES_SCHEMA)
              for name, files in (("loss_u", utility_files), ("loss_h", safety_files)) if files}

    counters = _Counters(*_score_range(scores), with_losses=bool(scores))
    for batch in _aligned(mask_files, token_files, ["input_ids", "response_mask", "meta"], scores):
        counters.add(batch)

    sid, n_resp, n_drop, flag = counters.per_sample()
    decoder = _Decoder(tokenizer)
    chosen = _choose_samples(sid, n_resp, n_drop, samples, ids)
    has_resp = n_resp > 0
    shares = n_drop[has_resp] / n_resp[has_resp]
    share_edges = np.linspace(0, 1, _SHARE_BINS + 1)
    top = np.argsort(-counters.tok_dropped, kind="stable")[:_TOP]
    return Report(
        samples_total=len(sid), response_tokens=int(n_resp.sum()), dropped_tokens=int(n_drop.sum()),
        samples_touched=int((n_drop > 0).sum()), samples_fully_dropped=int(((n_drop == n_resp) & has_resp).sum()),
        cut=counters.cut if math.isfinite(counters.cut) else None,
        score_edges=counters.edges, hist_all=counters.hist_all, hist_dropped=counters.hist_dropped,
        pos_total=counters.pos_total, pos_dropped=counters.pos_dropped,
        share_zero=int((shares == 0).sum()), share_edges=share_edges,
        share_counts=np.histogram(shares[shares > 0], share_edges)[0],
        top_tokens=[Dropped((int(i),), decoder.one(int(i)), int(counters.tok_dropped[i]), int(counters.tok_response[i]))
                    for i in top if counters.tok_dropped[i] > 0],
        top_ngrams={n: [Dropped(g, "".join(decoder.texts(list(g))), c) for g, c in counters.top_ngrams(n)]
                    for n in (2, 3)},
        truth=_ground_truth(n_resp, n_drop, flag),
        mean_losses=None if counters.loss_sums is None else
        {k: (total / n if n else None) for k, (total, n) in sorted(counters.loss_sums.items())},
        colour_limit=_colour_limit(counters.edges, counters.hist_all),
        shown=_load_samples(mask_files, token_files, scores, chosen, decoder),
        context=dict(context or {}),
    )


def _load_samples(mask_files, token_files, scores, chosen: list[int], decoder: _Decoder) -> list[SampleView]:
    """Pass 3: the chosen rows only, in the chosen order."""
    if not chosen:
        return []
    wanted = pa.array(sorted(chosen), pa.int64())
    last = max(chosen)
    found: dict[int, SampleView] = {}
    for batch in _aligned(mask_files, token_files, ["input_ids", "response_mask", "meta"], scores):
        m = batch["mask"]
        rows = np.flatnonzero(pc.is_in(m.column("sample_id"), value_set=wanted).to_numpy(zero_copy_only=False))
        offsets = list_offsets(batch["tokens"].column("input_ids"))
        discard, score = discard_flags(m, offsets, "mask"), _scores_of(batch, int(offsets[-1]))
        for r in rows:
            row = {name: t.slice(int(r), 1).to_pylist()[0] for name, t in batch.items() if name != "mask"}
            ids = row["tokens"]["input_ids"]
            lo, hi = offsets[r], offsets[r + 1]
            view = SampleView(
                sample_id=m.column("sample_id")[int(r)].as_py(), meta=json.loads(row["tokens"]["meta"] or "{}"),
                texts=decoder.texts(ids), special=np.array([i in decoder.special for i in ids], bool),
                response=np.array(row["tokens"]["response_mask"], bool), discard=discard[lo:hi],
                score=score[lo:hi].astype(np.float32),
                loss_u=np.array(row["loss_u"]["loss"], np.float32) if "loss_u" in row else None,
                loss_h=np.array(row["loss_h"]["loss"], np.float32) if "loss_h" in row else None,
            )
            found[view.sample_id] = view
        if m.column("sample_id")[-1].as_py() >= last:
            break  # rows are sorted by sample_id: nothing wanted is left
    return [found[i] for i in chosen]


# ---- plots (matplotlib's object API with the Agg canvas: no pyplot, no global backend switch) ------

_RED, _BLUE, _GREY, _INK = "#b2182b", "#2166ac", "#9aa3ad", "#26303a"
_SMALL, _WIDE = (4.2, 2.8), (8.6, 2.8)  # inches; the page shows them at about 440 and 900 px wide


def _figure(size=_SMALL):
    from matplotlib.figure import Figure

    return Figure(figsize=size, dpi=130, layout="constrained")


def _style(ax, title: str, xlabel: str = "", ylabel: str = "") -> None:
    ax.set_title(title, fontsize=10, loc="left", color=_INK)
    ax.set_xlabel(xlabel, fontsize=8.5, color=_INK)
    ax.set_ylabel(ylabel, fontsize=8.5, color=_INK)
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(labelsize=8, colors=_INK)
    ax.grid(axis="y", color="#e6e9ed", lw=0.6)
    ax.set_axisbelow(True)


def _percent_axis(axis) -> None:
    axis.set_major_formatter(lambda v, _: f"{v:.0%}")


def _plot_scores(r: Report):
    fig = _figure()
    ax = fig.add_subplot()
    left, width = r.score_edges[:-1], np.diff(r.score_edges)
    kept = r.hist_all - r.hist_dropped
    ax.bar(left, kept, width, align="edge", color=_GREY, label="kept")
    ax.bar(left, r.hist_dropped, width, bottom=kept, align="edge", color=_RED, label="dropped")
    if r.cut is not None:
        ax.axvline(r.cut, color=_INK, ls="--", lw=1)
        ax.annotate(f"cut {r.cut:+.3f}", (r.cut, 1), xycoords=("data", "axes fraction"), ha="left", va="top",
                    fontsize=8, color=_INK, xytext=(3, 0), textcoords="offset points")
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    _style(ax, "Score S of every response token", "S = loss_u - loss_h", "tokens")
    return fig


def _plot_positions(r: Report):
    """The fine curve on a log axis, with the coarse buckets drawn as flat segments over their ranges."""
    fig = _figure()
    ax = fig.add_subplot()
    total, dropped = r.pos_total[:FINE_POSITIONS], r.pos_dropped[:FINE_POSITIONS]
    n = int(np.flatnonzero(total).max()) + 1 if total.any() else 1
    pos = np.arange(1, n + 1)
    rate = np.divide(dropped[:n], total[:n], out=np.full(n, np.nan), where=total[:n] > 0)
    enough = total[:n] >= max(20, 0.02 * total.max())  # fewer tokens: a noisy rate, drawn faint
    ax.plot(pos, np.where(enough, rate, np.nan), color=_RED, lw=1.2, label="per position")
    ax.plot(pos, rate, color=_RED, lw=0.6, alpha=0.18)
    for (lo, hi, label), (d, t) in zip(POSITION_BUCKETS, r.position_rates().values()):
        if t:
            right = (hi or max(n, lo + 1)) + 0.5
            ax.hlines(d / t, lo + 0.5, right, color=_INK, lw=2.2)
            ax.annotate(f"{label}: {d / t:.1%}", (np.sqrt((lo + 0.5) * right), d / t), ha="center", va="bottom",
                        fontsize=7.5, color=_INK, xytext=(0, 3), textcoords="offset points",
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})
    ax.set_xscale("log")
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 256) if t <= max(n, 2)]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlim(0.8, max(n, 2) + 1)
    ax.set_ylim(0, max(0.05, min(1.0, np.nanmax(np.where(enough, rate, 0), initial=r.dropped_share) * 1.3)))
    _percent_axis(ax.yaxis)
    _style(ax, "Discard rate by response position", "position in the assistant turn (1 = first token)",
           "dropped")
    return fig


def _plot_shares(r: Report):
    fig = _figure()
    ax = fig.add_subplot()
    w = np.diff(r.share_edges)
    ax.bar([-w[0]], [r.share_zero], w[0] * 0.9, align="edge", color=_GREY, label="nothing dropped")
    ax.bar(r.share_edges[:-1], r.share_counts, w * 0.9, align="edge", color=_RED, label="some dropped")
    ax.set_xlim(-w[0] * 1.2, 1.02)
    ax.xaxis.set_major_formatter(lambda v, _: f"{v:.0%}" if v >= 0 else "")
    ax.legend(fontsize=8, frameon=False)
    _style(ax, "Share of each sample dropped", "dropped share of the sample's response tokens", "samples")
    return fig


def _mpl_text(text: str) -> str:
    return _token_label(text).replace("$", r"\$")  # a '$' pair would start mathtext


def _plot_top(r: Report):
    fig = _figure(_WIDE)
    panels = [("Top dropped tokens", [(x.text, x.count, f"{x.count}/{x.total}") for x in r.top_tokens[:10]]),
              ("Top dropped bigrams", [(x.text, x.count, str(x.count)) for x in r.top_ngrams[2][:10]]),
              ("Top dropped trigrams", [(x.text, x.count, str(x.count)) for x in r.top_ngrams[3][:10]])]
    for ax, (title, rows) in zip(fig.subplots(1, 3), panels):
        rows = rows[::-1]
        bars = ax.barh(range(len(rows)), [c for _, c, _ in rows], color=_RED, height=0.7)
        for bar, (_, _, note) in zip(bars, rows):
            ax.annotate(note, (bar.get_width(), bar.get_y() + bar.get_height() / 2), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=7, color=_INK)
        ax.set_yticks(range(len(rows)), [_mpl_text(t)[:22] for t, _, _ in rows], fontsize=8, family="monospace")
        ax.set_xticks([])
        ax.spines[["top", "right", "bottom"]].set_visible(False)
        ax.set_title(title, fontsize=10, loc="left", color=_INK)
        if rows:
            ax.set_xlim(0, max(c for _, c, _ in rows) * 1.25)
        else:
            ax.set_yticks([])
            ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes, color=_GREY)
    return fig


def _plot_truth(r: Report):
    t = r.truth
    fig = _figure()
    ax = fig.add_subplot()
    touched = t.flagged_touched / t.flagged_samples if t.flagged_samples else None
    rows = [("precision", t.precision, _RED), ("random mask", t.random_precision, _GREY),
            ("recall (tokens)", t.recall, _BLUE), ("flagged samples\ntouched", touched, _BLUE)][::-1]
    ax.barh(range(len(rows)), [v or 0 for _, v, _ in rows], color=[c for *_, c in rows], height=0.65)
    for i, (_, v, _) in enumerate(rows):
        ax.annotate(_pct(v), (v or 0, i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8,
                    color=_INK)
    ax.set_yticks(range(len(rows)), [label for label, *_ in rows], fontsize=8.5)
    ax.set_xlim(0, 1.15)
    _percent_axis(ax.xaxis)
    _style(ax, f"Mask vs is_harmful ({t.flagged_samples}/{t.labelled_samples} flagged)")
    ax.grid(False)
    return fig


def figures(report: Report) -> dict[str, bytes]:
    """The summary plots as PNG bytes, by file name."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    makers = {"score_histogram.png": _plot_scores, "discard_by_position.png": _plot_positions,
              "sample_drop_share.png": _plot_shares, "top_dropped.png": _plot_top}
    if report.truth is not None:
        makers["ground_truth.png"] = _plot_truth
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Glyph missing from font" for exotic token text
        for name, make in makers.items():
            fig = make(report)
            buf = io.BytesIO()
            FigureCanvasAgg(fig).print_png(buf)
            out[name] = buf.getvalue()
    return out


def write_pngs(report: Report, folder: str | Path) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in figures(report).items():
        (path := folder / name).write_bytes(data)
        paths.append(path)
    return paths


# ---- HTML ---------------------------------------------------------------------------------------

def _shade(t: float) -> str:
    """RdBu-like diverging colour for t in [-1, 1]: blue (S < 0, kept side), white, red (S > 0, dropped side)."""
    end = (178, 24, 43) if t > 0 else (33, 102, 172)
    a = min(abs(t), 1.0) * 0.85
    r, g, b = (round(255 + (e - 255) * a) for e in end)
    return f"#{r:02x}{g:02x}{b:02x}"


def _shade_class(s: float, limit: float) -> int:
    return int(np.clip(round(s / limit * _COLOUR_STEPS), -_COLOUR_STEPS, _COLOUR_STEPS)) + _COLOUR_STEPS


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _render_tokens(v: SampleView, limit: float) -> str:
    parts, i, turn_pos = [], 0, 0
    while i < len(v.texts):
        if v.response[i]:
            parts.append(_response_span(v, i, turn_pos, limit))
            i, turn_pos = i + 1, turn_pos + 1
            continue
        j = i + 1  # prompt: one span per special token, one per run of plain text
        while not v.special[i] and j < len(v.texts) and not v.response[j] and not v.special[j]:
            j += 1
        where = f"position {i}" if j == i + 1 else f"positions {i}-{j - 1}"
        parts.append(f'<span class="{"p s" if v.special[i] else "p"}" title="prompt · {where}">'
                     f"{html.escape(''.join(v.texts[i:j]))}</span>")
        i, turn_pos = j, 0
    return "".join(parts)


def _response_span(v: SampleView, i: int, turn_pos: int, limit: float) -> str:
    s = float(v.score[i])
    title = ["S n/a" if math.isnan(s) else f"S {s:+.3f}"]
    for name, loss in (("loss_u", v.loss_u), ("loss_h", v.loss_h)):
        if loss is not None:
            title.append(f"{name} {_fmt(float(loss[i]))}")
    title.append(f"position {i} (response token {turn_pos + 1} of its turn)")
    cls = ["r", f"c{_COLOUR_STEPS if math.isnan(s) else _shade_class(s, limit)}"]
    if v.discard[i]:
        title.append("DROPPED")
        cls.append("d")
    if v.special[i]:
        cls.append("s")
    text = v.texts[i].replace("\n", "↵\n")  # a dropped newline stays visible
    return f'<span class="{" ".join(cls)}" title="{html.escape(" · ".join(title))}">{html.escape(text)}</span>'


def _sample_html(v: SampleView, limit: float) -> str:
    flag = v.meta.get("is_harmful")
    badge = ('<span class="badge flag">is_harmful</span>' if flag is True else
             '<span class="badge">benign</span>' if flag is False else "")
    share = v.n_dropped / v.n_response if v.n_response else 0.0
    resp_scores = v.score[v.response & ~np.isnan(v.score)]
    top = f" · max S {resp_scores.max():+.3f}" if len(resp_scores) else ""
    other = {k: val for k, val in v.meta.items() if k != "is_harmful"}
    meta = f'<span class="meta">{html.escape(json.dumps(other, default=str)[:160])}</span>' if other else ""
    return (f'<section class="sample" data-id="{v.sample_id}" data-flag="{int(flag is True)}" '
            f'data-dropped="{v.n_dropped}"><header><b>#{v.sample_id}</b>{badge}'
            f'<span>dropped <b>{v.n_dropped}</b> of {v.n_response} response tokens ({share:.1%}){top}</span>{meta}'
            f'</header><div class="conv">{_render_tokens(v, limit)}</div></section>')


def _card(label: str, value: str, note: str = "") -> str:
    return (f'<div class="card"><div class="v">{value}</div><div class="l">{label}</div>'
            f'<div class="n">{note}</div></div>')


def _header_cards(r: Report) -> str:
    cards = [
        _card("samples", f"{r.samples_total:,}"),
        _card("response tokens", f"{r.response_tokens:,}"),
        _card("dropped tokens", f"{r.dropped_tokens:,}", f"{r.dropped_share:.1%} of response tokens"),
        _card("samples touched", f"{r.samples_touched:,}",
              f"{r.samples_touched / r.samples_total:.0%} of samples" if r.samples_total else ""),
        _card("samples fully dropped", f"{r.samples_fully_dropped:,}"),
        _card("cut", "none" if r.cut is None else f"{r.cut:+.3f}", "smallest dropped S"),
    ]
    if (t := r.truth) is not None:
        cards.append(_card("precision vs is_harmful", _pct(t.precision),
                           f"random mask: {_pct(t.random_precision)}"))
        cards.append(_card("recall vs is_harmful", _pct(t.recall),
                           f"{t.flagged_touched} of {t.flagged_samples} flagged samples touched"))
    return "".join(cards)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def _tables(r: Report) -> str:
    rows = "".join(f"<tr><td><code>{html.escape(_token_label(x.text))}</code></td><td>{x.count:,}</td>"
                   f"<td>{x.total:,}</td><td>{x.count / x.total:.0%}</td></tr>" for x in r.top_tokens)
    out = [f'<div class="tbl"><h3>Top dropped tokens</h3><table><tr><th>token</th><th>dropped</th>'
           f'<th>in responses</th><th>rate</th></tr>{rows}</table></div>']
    for n, name in ((2, "bigrams"), (3, "trigrams")):
        rows = "".join(f"<tr><td><code>{html.escape(_token_label(x.text))}</code></td><td>{x.count:,}</td></tr>"
                       for x in r.top_ngrams[n])
        out.append(f'<div class="tbl"><h3>Top dropped {name}</h3><p class="hint">consecutive tokens, all dropped</p>'
                   f'<table><tr><th>{name[:-1]}</th><th>count</th></tr>'
                   f'{rows or "<tr><td>none</td></tr>"}</table></div>')
    return "".join(out)


def _legend(limit: float, cut: float | None) -> str:
    stops = ", ".join(_shade(k / _COLOUR_STEPS) for k in range(-_COLOUR_STEPS, _COLOUR_STEPS + 1))
    cut_txt = "" if cut is None else f" · cut {cut:+.3f}"
    return (f'<div class="legend"><span>S ≤ {-limit:+.2f}</span><span class="bar" style="background:linear-gradient('
            f'90deg,{stops})"></span><span>S ≥ {limit:+.2f}</span><span class="ex"><span class="r c{_COLOUR_STEPS} d">'
            f"dropped</span> struck through{cut_txt} · hover a token for its scores</span></div>")


_CSS = """
* { box-sizing: border-box }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #26303a;
       background: #f5f6f8 }
main { max-width: 1360px; margin: 0 auto; padding: 20px 28px 60px }
h1 { font-size: 22px; margin: 0 0 2px }
h2 { font-size: 17px; margin: 28px 0 10px }
h3 { font-size: 14px; margin: 0 0 4px }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px }
.ctx { color: #5b6672; font-size: 12.5px; margin: 0 0 14px }
.ctx code { background: #e9ecf0; padding: 1px 5px; border-radius: 3px }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(145px, 1fr)); gap: 10px }
.card, .tbl, .plots img, .sample { background: #fff; border: 1px solid #e1e5ea; border-radius: 8px }
.card { padding: 10px 12px }
.card .v { font-size: 21px; font-weight: 600 }
.card .l { font-size: 12px; color: #5b6672 }
.card .n, .hint, .meta { font-size: 11.5px; color: #8a949e }
.plots { display: grid; grid-template-columns: repeat(3, 1fr); gap: 12px }
.plots img { width: 100% }
.plots .wide { grid-column: span 2 }
@media (max-width: 900px) { .plots { grid-template-columns: 1fr } .plots .wide { grid-column: auto } }
details { margin-top: 12px }
summary { cursor: pointer; color: #2166ac; font-size: 13px }
.tables { display: grid; grid-template-columns: repeat(auto-fit, minmax(250px, 1fr)); gap: 12px; margin-top: 10px }
.tbl { padding: 10px 12px }
.hint { margin: 0 0 6px }
table { border-collapse: collapse; width: 100%; font-size: 12.5px }
th, td { text-align: left; padding: 2px 6px; border-bottom: 1px solid #eef0f3 }
th { color: #5b6672; font-weight: 500 }
td:not(:first-child), th:not(:first-child) { text-align: right }
.toolbar { position: sticky; top: 0; z-index: 2; background: #f5f6f8; padding: 10px 0; display: flex;
           flex-wrap: wrap; gap: 14px; align-items: center; border-bottom: 1px solid #e1e5ea }
#q { flex: 1; min-width: 240px; padding: 7px 10px; font-size: 14px; border: 1px solid #c9d0d8; border-radius: 6px }
.toolbar label, #count { font-size: 13px; color: #5b6672 }
.legend { display: flex; align-items: center; gap: 8px; font-size: 12px; color: #5b6672; margin: 10px 0 }
.legend .bar { width: 220px; height: 12px; border-radius: 3px; border: 1px solid #d5dae0 }
.legend .ex { margin-left: 10px }
.sample { margin: 10px 0; overflow: hidden }
.sample header { display: flex; flex-wrap: wrap; gap: 10px; align-items: baseline; padding: 7px 12px;
                 background: #fafbfc; border-bottom: 1px solid #eef0f3; font-size: 13px }
.badge { font-size: 11px; padding: 1px 7px; border-radius: 9px; background: #e6eef6; color: #2166ac }
.badge.flag { background: #fbe3e5; color: #b2182b }
/* the conversation: whitespace kept, one span per response token */
.conv { padding: 10px 12px; white-space: pre-wrap; word-break: break-word; font-size: 14px; line-height: 1.8;
        font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace }
.p { color: #8a949e }
.s { font-size: 11px; color: #a3acb5 }
.r { border-radius: 2px; box-shadow: inset -1px 0 #ffffffb0; color: #1b232b }
.r.s { color: #5b6672 }
.d { text-decoration: line-through 1.5px currentColor; box-shadow: inset 0 -2px #5a0a14 }
.r:hover { outline: 2px solid #26303a }
"""

# Filters the shown samples as you type: by text (the conversation as displayed, without the newline
# markers) or by "#id", and by the two checkboxes.
_JS = """
const q = document.getElementById('q'), onlyFlag = document.getElementById('flag');
const onlyDrop = document.getElementById('drop'), count = document.getElementById('count');
const cards = [...document.querySelectorAll('.sample')];
const texts = cards.map(c => ('#' + c.dataset.id + ' ' +
  c.querySelector('.conv').textContent.replaceAll('↵', '')).toLowerCase());
function apply() {
  const v = q.value.toLowerCase().trim();
  let n = 0;
  cards.forEach((c, i) => {
    const ok = (!v || texts[i].includes(v)) && (!onlyFlag.checked || c.dataset.flag === '1')
      && (!onlyDrop.checked || c.dataset.dropped !== '0');
    c.hidden = !ok;
    n += ok;
  });
  count.textContent = n + ' of ' + cards.length + ' shown samples';
}
[q, onlyFlag, onlyDrop].forEach(e => e.addEventListener('input', apply));
apply();
"""


def write_html(report: Report, path: str | Path) -> Path:
    """One self-contained page: inline CSS, JS and base64 PNG plots; nothing is fetched when it opens."""
    r = report
    css_shades = "".join(f".c{k + _COLOUR_STEPS}{{background:{_shade(k / _COLOUR_STEPS)}"
                         f"{';color:#fff' if abs(k) > 0.6 * _COLOUR_STEPS else ''}}}"  # dark shades: white text
                         for k in range(-_COLOUR_STEPS, _COLOUR_STEPS + 1))
    imgs = "".join(f'<img class="{"wide" if name == "top_dropped.png" else ""}" alt="{name}" '
                   f'src="data:image/png;base64,{base64.b64encode(data).decode()}">'
                   for name, data in figures(r).items())
    losses = ""
    if r.mean_losses:
        pairs = " · ".join(f"{name} {_fmt(r.mean_losses.get(name + ' kept'))} kept / "
                           f"{_fmt(r.mean_losses.get(name + ' dropped'))} dropped" for name in ("loss_u", "loss_h")
                           if name + " kept" in r.mean_losses)
        losses = f'<p class="ctx">Mean loss over response tokens: {pairs}</p>'

    ctx = " · ".join(f"{html.escape(k)} <code>{html.escape(str(v))}</code>" for k, v in r.context.items())
    shown = "".join(_sample_html(v, r.colour_limit) for v in r.shown)
    order = "ordered by dropped tokens, then dropped share"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>TOSS mask inspection</title><style>{_CSS}{css_shades}</style></head>
<body><main>
<h1>TOSS mask inspection</h1><p class="ctx">{ctx}</p>
<div class="cards">{_header_cards(r)}</div>
{losses}
<h2>Summary</h2><p class="ctx">Every statistic covers all tokens of the mask; the page shows {len(r.shown)} of
{r.samples_total:,} samples.</p>
<div class="plots">{imgs}</div>
<details><summary>Top dropped tokens and n-grams as tables, with drop rates</summary>
<div class="tables">{_tables(r)}</div></details>
<h2>Samples</h2><p class="ctx">{len(r.shown)} samples, {order}. Response tokens are shaded by S
(red: the safety-degraded model finds the token likely and the utility model does not); prompt text is grey.</p>
<div class="toolbar">
<input id="q" type="search" placeholder="Search the shown samples (text or #id)" autocomplete="off">
<label><input id="flag" type="checkbox"> only is_harmful</label><label><input id="drop" type="checkbox"> only with drops
</label><span id="count"></span></div>
{_legend(r.colour_limit, r.cut)}
<div id="samples">{shown}</div>
</main><script>{_JS}</script></body></html>
"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
