"""Baseline masks (SPEC section 6): other ways to pick the tokens the selective fine-tune ignores.

    discard, score = baseline_discard("first-k", budget=1200, resp=resp, positions=pos, counts=counts)
    stats = write_baseline_mask("random", token_files, {}, budget=1200, seed=0, sink="mask.parquet")

Every baseline is a mask in the TOSS mask format (`toss_core.tables.MASK_SCHEMA`: the discarded positions), fed to the same
selective fine-tune, and spends the same token budget as TOSS: the number of tokens the TOSS mask
discards (floor(d * N) in global mode). Token-level baselines reuse the exact global top-k rule of TOSS
(`selection.global_top`, ties to the earliest (sample_id, position)) over another score:

    method           score ranked, highest discarded first            needs scores of
    random           uniform draws, seeded by the fine-tune seed      -
    first-k          -(position inside its assistant turn): the first k tokens of every turn, with k set by
                     the budget (the last, partial layer goes to the earliest samples)   -
    safety-only      -l_h: tokens the safety-degraded model finds likely          f_h
    utility-only     l_u: tokens the utility model finds unlikely                 f_u
    reference-free   l_base: the highest-loss tokens under the base model         base model
    rank:<term>      any single term: l_u, -l_u, l_h, -l_h, l_base, -l_base

`safety-only` and `utility-only` are the two halves of TOSS's S = l_u - l_h, each with the sign it has in
S: the single-reference ablations. SPEC section 6 words them "rank by l_h alone, by -l_u alone"; read in
the SPEC's own notation (l = loss, discard the highest), those two would drop the tokens the harmful
model finds UNlikely and the utility model finds likely, the opposite of each half of S. The literal
readings stay available as `rank:l_h` and `rank:-l_u` (see docs/evaluation.md).

Two baselines are not token rankings:
- sample-level: whole samples, by their mean S, highest first, while the discarded total stays within
  the budget (stops at the first sample that would exceed it);
- oracle: every response token of the samples whose meta says `is_harmful` (its own budget; needs the
  ground-truth field in the custom data, which the method itself never reads).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from toss_core.selection import POSITION_BUCKETS, global_top
from toss_core.tables import (
    MASK_SCHEMA,
    SCORES_SCHEMA,
    TOKENS_SCHEMA,
    TableError,
    check_aligned,
    discard_flags,
    discard_positions,
    flat_values,
    list_offsets,
    read_mask,
    read_table,
)

TERM_OF = {"safety-only": "-l_h", "utility-only": "l_u", "reference-free": "l_base"}
_ROLE_OF_TERM = {"l_u": "utility", "l_h": "safety", "l_base": "base"}


def method_term(method: str) -> str | None:
    """The single loss term a ranking baseline uses ("-l_h", ...), or None for the others."""
    return method[5:] if method.startswith("rank:") else TERM_OF.get(method)


def needed_scores(method: str) -> set[str]:
    """Which score tables a baseline reads: a subset of {"utility", "safety", "base"}."""
    if method == "sample-level":
        return {"utility", "safety"}
    term = method_term(method)
    return {_ROLE_OF_TERM[term.lstrip("-")]} if term else set()


def turn_positions(resp: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Index of each response token inside its assistant turn (0 = the turn's first token); a turn starts
    wherever a response token follows a non-response token or a sample boundary."""
    idx = np.arange(len(resp))
    previous = np.concatenate([[False], resp[:-1]])
    previous[offsets[:-1][offsets[:-1] < len(resp)]] = False  # samples never continue each other's turns
    start_idx = np.maximum.accumulate(np.where(resp & ~previous, idx, 0)) if len(resp) else idx
    return (idx - start_idx)[resp]


def response_layout(tokens: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(response mask flat, response tokens per sample, position of each response token in its turn)."""
    resp = flat_values(tokens.column("response_mask"), bool)
    offsets = list_offsets(tokens.column("response_mask"))
    counts = np.add.reduceat(resp, offsets[:-1]).astype(np.int64) if len(resp) else np.zeros(0, np.int64)
    return resp, counts, turn_positions(resp, offsets)


def response_losses(tokens: pa.Table, score_files: Sequence[str], what: str) -> np.ndarray:
    """Losses of the response tokens, in (sample_id, position) order, checked against the token table."""
    scores = read_table(list(score_files), SCORES_SCHEMA)
    check_aligned(tokens, scores, what)
    resp = flat_values(tokens.column("response_mask"), bool)
    loss = flat_values(scores.column("loss"), np.float32)[resp]
    if np.isnan(loss).any():
        raise TableError(f"{what}: a response token has no loss (NaN): computed with another response mask?")
    return loss


def harmful_flags(tokens: pa.Table) -> np.ndarray | None:
    """Per sample, the ground-truth `is_harmful` of its meta; None unless every sample has the field."""
    flags = []
    for meta in tokens.column("meta").to_pylist():
        value = json.loads(meta or "{}").get("is_harmful")
        if isinstance(value, str):
            value = {"true": True, "1": True, "false": False, "0": False}.get(value.strip().lower())
        if not isinstance(value, (bool, int)):
            return None
        flags.append(bool(value))
    return np.array(flags, dtype=bool)


def term_score(term: str, losses: dict[str, np.ndarray]) -> np.ndarray:
    sign = -1.0 if term.startswith("-") else 1.0
    return (sign * losses[_ROLE_OF_TERM[term.lstrip("-")]]).astype(np.float32)


def sample_level(mean_score: np.ndarray, counts: np.ndarray, budget: int) -> np.ndarray:
    """Per sample, whether it is dropped: down the ranking by mean score (ties to the smaller sample
    index) while the dropped response tokens stay within `budget`."""
    order = np.lexsort((np.arange(len(counts)), -mean_score))
    total = np.cumsum(counts[order])  # strictly increasing (every sample has a response token): a prefix fits
    dropped = np.zeros(len(counts), dtype=bool)
    dropped[order[total <= budget]] = True
    return dropped


def baseline_discard(method: str, budget: int, *, counts: np.ndarray, positions: np.ndarray,
                     losses: dict[str, np.ndarray] | None = None, flags: np.ndarray | None = None,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(discard, score) over the response tokens in (sample_id, position) order; see the module docstring."""
    n = int(counts.sum())
    losses = losses or {}
    if method == "random":
        score = np.random.default_rng([seed, 0x70551]).random(n).astype(np.float32)
    elif method == "first-k":
        score = -positions.astype(np.float32)
    elif method == "sample-level":
        s = losses["utility"].astype(np.float64) - losses["safety"]  # S exactly, as TOSS ranks it
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        mean = np.add.reduceat(s, starts) / counts if n else np.zeros(0)
        drop = sample_level(mean, counts, budget)
        return np.repeat(drop, counts), np.repeat(mean, counts).astype(np.float32)
    elif method == "oracle":
        if flags is None:
            raise TableError("oracle mask: the custom data has no `is_harmful` field in every sample's meta")
        drop = np.repeat(flags, counts)
        return drop, drop.astype(np.float32)
    elif (term := method_term(method)) is not None:
        score = term_score(term, losses)
    else:
        raise ValueError(f"unknown baseline {method!r}")
    return global_top(score, budget), score


def mask_quality(discard: np.ndarray, counts: np.ndarray, flags: np.ndarray | None) -> dict:
    """Discarded share, and against the oracle (all response tokens of harmful samples): precision, recall."""
    n, k = int(counts.sum()), int(discard.sum())
    out = {"response_tokens": n, "discarded_tokens": k, "discarded_share": k / n if n else 0.0}
    if flags is not None:
        truth = np.repeat(flags, counts)
        hit = int((discard & truth).sum())
        out.update(precision=hit / k if k else None, recall=hit / int(truth.sum()) if truth.any() else None,
                   harmful_samples=int(flags.sum()))
    return out


def mask_table(tokens: pa.Table, discard: np.ndarray) -> pa.Table:
    """A mask table (MASK_SCHEMA) from per-response-token discard flags in (sample_id, position) order."""
    resp = flat_values(tokens.column("response_mask"), bool)
    return pa.table({"sample_id": tokens.column("sample_id"), "ids_digest": tokens.column("ids_digest"),
                     "discard_pos": discard_positions(np.flatnonzero(resp)[discard],
                                                      list_offsets(tokens.column("response_mask")))},
                    schema=MASK_SCHEMA)


def mask_stats(discard: np.ndarray, counts: np.ndarray, positions: np.ndarray) -> dict:
    """Samples touched or emptied, and the discard rate by position inside a turn (as TOSS reports it)."""
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    per_sample = np.add.reduceat(discard, starts) if len(discard) else np.zeros(len(counts), np.int64)

    def rate(lo, hi):
        at = (positions >= lo) & (positions < hi if hi is not None else True)
        return float(discard[at].mean()) if at.any() else None

    return {"samples": len(counts), "samples_touched": int((per_sample > 0).sum()),
            "samples_fully_discarded": int(((per_sample == counts) & (counts > 0)).sum()),
            "discard_rate_by_position": {label: rate(lo, hi) for lo, hi, label in POSITION_BUCKETS}}


def write_baseline_mask(method: str, token_files: Sequence[str], score_files: dict[str, list[str]], budget: int,
                        seed: int, sink) -> dict:
    """Write a baseline's mask table to `sink`; return its statistics (budget, quality, positions)."""
    tokens = read_table(list(token_files), TOKENS_SCHEMA)
    _, counts, positions = response_layout(tokens)
    losses = {role: response_losses(tokens, files, f"{role} scores") for role, files in score_files.items()}
    flags = harmful_flags(tokens)
    discard, _ = baseline_discard(method, budget, counts=counts, positions=positions, losses=losses,
                                  flags=flags, seed=seed)
    pq.write_table(mask_table(tokens, discard), sink)
    return {"method": method, "budget": budget, "seed": seed if method == "random" else None,
            **mask_quality(discard, counts, flags), **mask_stats(discard, counts, positions)}


def read_mask_quality(token_files: Sequence[str], mask_files: Sequence[str]) -> dict:
    """`mask_quality` of any published mask (TOSS's or a baseline's) against its token table."""
    tokens = read_table(list(token_files), TOKENS_SCHEMA)
    mask = read_mask(list(mask_files))
    check_aligned(tokens, mask, "mask")
    resp, counts, _ = response_layout(tokens)
    discard = discard_flags(mask, list_offsets(tokens.column("input_ids")))[resp]
    return mask_quality(discard, counts, harmful_flags(tokens))
