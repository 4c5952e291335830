"""Selection pins SPEC section 3: sign of S, exact global top-d with ties, shard independence, digests."""

import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from toss_core.config import SelectConfig
from toss_core.selection import flagged_labels, read_mask, select_tokens, top_flagged_samples
from toss_core.tables import TableError
from tests.factories import score_table, token_table, write_shards


def brute_force_global(tokens, util, safe, ratio):
    """The reference code's way: (score, sample, position) tuples, one sort, top floor(d*N)."""
    items = []
    for sid, m, u, h in zip(
        tokens.column("sample_id").to_pylist(), tokens.column("response_mask").to_pylist(),
        util.column("loss").to_pylist(), safe.column("loss").to_pylist(),
    ):
        for p, is_resp in enumerate(m):
            if is_resp:
                s = float(np.float32(u[p]) - np.float32(h[p]))
                items.append((-s, sid, p))
    items.sort()
    k = math.floor(ratio * len(items))
    return {(sid, p) for _, sid, p in items[:k]}


def discarded_set(mask_path):
    table = pq.read_table(mask_path)
    out = set()
    for sid, d in zip(table.column("sample_id").to_pylist(), table.column("discard").to_pylist()):
        out |= {(sid, p) for p, x in enumerate(d) if x}
    return out


def run_select(tmp_path, tokens, util, safe, cfg, cuts=(None, None, None)):
    t = write_shards(tokens, tmp_path / "t", cuts[0] or [])
    u = write_shards(util, tmp_path / "u", cuts[1] or [])
    h = write_shards(safe, tmp_path / "h", cuts[2] or [])
    out = tmp_path / "mask.parquet"
    stats = select_tokens(t, u, h, cfg, str(out))
    return out, stats


def test_score_sign_drops_tokens_the_harmful_model_likes(tmp_path):
    tokens = token_table([10, 10], seed=1)
    # Sample 1, position 7: the safety-degraded model finds it likely (low loss), the utility model not.
    util = score_table(tokens, lambda sid, p: 5.0 if (sid, p) == (1, 7) else 1.0)
    safe = score_table(tokens, lambda sid, p: 0.1 if (sid, p) == (1, 7) else 1.0)
    # 14 response tokens, d = 0.1 -> floor(1.4) = 1 token dropped, the one with S = 4.9.
    out, stats = run_select(tmp_path, tokens, util, safe, SelectConfig(ratio=0.1))
    assert discarded_set(out) == {(1, 7)}
    assert stats["discarded_tokens"] == 1
    assert stats["score_cut"] == pytest.approx(4.9, abs=1e-5)


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.37])
def test_global_top_matches_brute_force_with_many_ties(tmp_path, ratio):
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 60, size=120)
    tokens = token_table(lengths, seed=2)
    # Losses from a tiny set of values: thousands of ties, also exactly at the cut.
    values = np.array([0.5, 1.0, 1.5, 2.0], np.float32)
    util = score_table(tokens, lambda sid, p: values[(sid * 7 + p * 3) % 4])
    safe = score_table(tokens, lambda sid, p: values[(sid + p) % 3])
    out, stats = run_select(tmp_path, tokens, util, safe, SelectConfig(ratio=ratio))
    expected = brute_force_global(tokens, util, safe, ratio)
    got = discarded_set(out)
    assert len(got) == math.floor(ratio * stats["response_tokens"])
    assert got == expected


def test_same_mask_whatever_the_shard_split(tmp_path):
    rng = np.random.default_rng(3)
    tokens = token_table(rng.integers(4, 40, size=50), seed=3)
    util = score_table(tokens, lambda sid, p: float(round(rng.normal(), 1)))
    safe = score_table(tokens, lambda sid, p: float(round(rng.normal(), 1)))
    a, _ = run_select(tmp_path / "a", tokens, util, safe, SelectConfig(ratio=0.2))
    b, _ = run_select(tmp_path / "b", tokens, util, safe, SelectConfig(ratio=0.2),
                      cuts=([7, 30], [1, 2, 45], [25]))
    ta, tb = pq.read_table(a), pq.read_table(b)
    assert ta.column("discard").equals(tb.column("discard"))
    assert ta.column("sample_id").equals(tb.column("sample_id"))
    sa = np.concatenate(ta.column("score").to_pylist()).astype(float)
    sb = np.concatenate(tb.column("score").to_pylist()).astype(float)
    np.testing.assert_array_equal(sa, sb)  # NaN == NaN here


def test_digest_mismatch_raises(tmp_path):
    tokens = token_table([8, 9, 10], seed=4)
    util = score_table(tokens, lambda sid, p: 1.0)
    other = token_table([8, 9, 10], seed=5)  # same shape, other token ids
    safe = score_table(other, lambda sid, p: 1.0)
    with pytest.raises(TableError, match="ids_digest of sample 0 differs"):
        run_select(tmp_path, tokens, util, safe, SelectConfig(ratio=0.1))


def test_sample_mode_drops_floor_d_per_sample(tmp_path):
    tokens = token_table([20, 30, 11], prompt_share=0.0, seed=6)  # 19, 29, 10 response tokens
    util = score_table(tokens, lambda sid, p: float(p))  # later positions score higher
    safe = score_table(tokens, lambda sid, p: 0.0)
    out, _ = run_select(tmp_path, tokens, util, safe, SelectConfig(mode="sample", ratio=0.2))
    got = discarded_set(out)
    # floor(0.2 * n): 3, 5, 2 highest positions of each sample.
    assert got == {(0, p) for p in (17, 18, 19)} | {(1, p) for p in range(25, 30)} | {(2, 9), (2, 10)}


def test_threshold_mode_and_stats(tmp_path):
    tokens = token_table([10, 10], prompt_share=0.0, seed=7)
    util = score_table(tokens, lambda sid, p: 3.0 if p == 1 else 0.0)
    safe = score_table(tokens, lambda sid, p: 0.0)
    out, stats = run_select(tmp_path, tokens, util, safe, SelectConfig(mode="threshold", threshold=1.0, ratio=0.1))
    assert discarded_set(out) == {(0, 1), (1, 1)}
    # Position 1 is each turn's first response token (position 0 is never a response token).
    assert stats["discard_rate_by_position"]["1"] == 1.0
    assert stats["discard_rate_by_position"]["2-5"] == 0.0
    assert stats["samples_touched"] == 2


def test_scores_stored_and_nan_outside_responses(tmp_path):
    tokens = token_table([10], seed=8)
    util = score_table(tokens, lambda sid, p: 2.0)
    safe = score_table(tokens, lambda sid, p: 0.5)
    out, _ = run_select(tmp_path, tokens, util, safe, SelectConfig(ratio=0.1))
    row = pq.read_table(out).to_pylist()[0]
    resp = tokens.column("response_mask")[0].as_py()
    for s, r in zip(row["score"], resp):
        assert (s == pytest.approx(1.5)) if r else math.isnan(s)


def test_pro_helpers_flagged_labels_and_first_k_samples(tmp_path):
    tokens = token_table([10, 10, 10], prompt_share=0.0, seed=9)
    best = {0: 1.0, 1: 9.0, 2: 9.0}  # samples 1 and 2 tie for the top: smaller id first
    util = score_table(tokens, lambda sid, p: best[sid] if p == 4 else 0.0)
    safe = score_table(tokens, lambda sid, p: 0.0)
    out, _ = run_select(tmp_path, tokens, util, safe, SelectConfig(mode="threshold", threshold=5.0))
    mask = read_mask([str(out)])
    labels = flagged_labels(mask)
    assert sorted(labels) == [1, 2]
    assert np.flatnonzero(labels[1]).tolist() == [4]
    assert top_flagged_samples(mask, 2) == [1, 2]
    assert top_flagged_samples(mask, 3) == [1, 2, 0]
