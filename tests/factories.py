"""Hand-made tables for tests: token tables, score tables with chosen values, split into shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from toss_core.tables import MASK_V2_SCHEMA, SCORES_SCHEMA, TOKENS_SCHEMA, ids_digest


def token_table(lengths, prompt_share=0.3, seed=0, first_id=0) -> pa.Table:
    """Samples of the given lengths; the first `prompt_share` of each is prompt, the rest response."""
    rng = np.random.default_rng(seed)
    ids, masks = [], []
    for n in lengths:
        x = rng.integers(3, 500, size=n).astype(np.int32)
        m = np.zeros(n, bool)
        m[max(1, int(n * prompt_share)):] = True
        ids.append(x)
        masks.append(m)
    return pa.table(
        {
            "sample_id": np.arange(first_id, first_id + len(lengths), dtype=np.int64),
            "input_ids": ids,
            "response_mask": masks,
            "ids_digest": [ids_digest(x) for x in ids],
            "meta": ["{}"] * len(lengths),
        },
        schema=TOKENS_SCHEMA,
    )


def score_table(tokens: pa.Table, values_fn) -> pa.Table:
    """A scores table whose loss at every response token is values_fn(sample_id, position)."""
    losses = []
    for sid, m in zip(tokens.column("sample_id").to_pylist(), tokens.column("response_mask").to_pylist()):
        m = np.asarray(m)
        loss = np.full(len(m), np.nan, np.float32)
        pos = np.flatnonzero(m)
        loss[pos] = [values_fn(sid, int(p)) for p in pos]
        losses.append(loss)
    return pa.table(
        {"sample_id": tokens.column("sample_id"), "ids_digest": tokens.column("ids_digest"), "loss": losses},
        schema=SCORES_SCHEMA,
    )


def write_shards(table: pa.Table, folder: Path, cuts: list[int]) -> list[str]:
    """Write `table` split at row indices `cuts`; returns the files (in a scrambled order on purpose)."""
    folder.mkdir(parents=True, exist_ok=True)
    bounds = [0, *cuts, table.num_rows]
    files = []
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        path = folder / f"part-{i:03d}.parquet"
        pq.write_table(table.slice(lo, hi - lo), path)
        files.append(str(path))
    return files[::-1]


def discard_rows(mask: pa.Table, tokens: pa.Table) -> list[list[bool]]:
    """Per-token discard flags of each row of a mask in the current layout (discard_pos)."""
    out = []
    for ids, pos in zip(tokens.column("input_ids").to_pylist(), mask.column("discard_pos").to_pylist()):
        flags = [False] * len(ids)
        for p in pos:
            flags[p] = True
        out.append(flags)
    return out


def v2_mask(mask: pa.Table, tokens: pa.Table, util: pa.Table, safe: pa.Table) -> pa.Table:
    """The same mask in the earlier layout: full-length `discard` flags and float32 S, NaN off the response."""
    scores = [(np.asarray(u, np.float64) - np.asarray(h, np.float64)).astype(np.float32)
              for u, h in zip(util.column("loss").to_pylist(), safe.column("loss").to_pylist())]
    return pa.table({"sample_id": mask.column("sample_id"), "ids_digest": mask.column("ids_digest"),
                     "discard": discard_rows(mask, tokens), "score": scores}, schema=MASK_V2_SCHEMA)
