"""Selection pins SPEC section 3: sign of S, exact global top-d with ties, shard independence, digests."""

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from toss_core.config import SelectConfig
from toss_core.selection import select_tokens, top_flagged_samples
from toss_core.tables import TableError, read_mask
from toss_core.train_data import with_mask
from tests.factories import discard_rows, score_table, token_table, write_shards


def brute_force_global(tokens, util, safe, ratio, dtype=float):
    """The reference code's way: (score, sample, position) tuples, one sort, top floor(d*N). Its losses are
    Python floats (float64): S is the exact difference of the stored float32 values. `dtype=np.float32`
    subtracts in float32 instead (what the SPEC rules out; tests use it to show that the choice matters)."""
    items = []
    for sid, m, u, h in zip(
        tokens.column("sample_id").to_pylist(), tokens.column("response_mask").to_pylist(),
        util.column("loss").to_pylist(), safe.column("loss").to_pylist(),
    ):
        for p, is_resp in enumerate(m):
            if is_resp:
                s = float(dtype(u[p]) - dtype(h[p]))
                items.append((-s, sid, p))
    items.sort()
    k = math.floor(ratio * len(items))
    return {(sid, p) for _, sid, p in items[:k]}


def discarded_set(mask_path):
    table = pq.read_table(mask_path)
    assert table.column_names == ["sample_id", "ids_digest", "discard_pos"]  # positions only, no scores
    out = set()
    for sid, pos in zip(table.column("sample_id").to_pylist(), table.column("discard_pos").to_pylist()):
        assert pos == sorted(set(pos))
        out |= {(sid, p) for p in pos}
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


def test_s_is_the_exact_difference_when_float32_rounding_ties_tokens(tmp_path):
    """Utility losses near 16 (float32 spacing 2^-19 ~ 1.9e-6) minus safety losses that differ by ~1e-7:
    the exact (float64) differences are all distinct, their float32 roundings tie in groups. The mask must be
    the float64 brute force's, which a float32 subtraction would not give."""
    rng = np.random.default_rng(21)
    tokens = token_table(rng.integers(8, 40, size=60), seed=21)
    util = score_table(tokens, lambda sid, p: np.float32(16.0) + np.float32(2.0 ** -19) * ((sid * 5 + p) % 3))
    safe = score_table(tokens, lambda sid, p: np.float32(1e-7 * ((sid * 37 + p * 11) % 101)))
    for ratio in (0.1, 0.25, 0.5):
        out, stats = run_select(tmp_path / str(ratio), tokens, util, safe, SelectConfig(ratio=ratio))
        exact = brute_force_global(tokens, util, safe, ratio)
        assert discarded_set(out) == exact
        assert brute_force_global(tokens, util, safe, ratio, dtype=np.float32) != exact  # the test can fail
        assert stats["discarded_tokens"] == math.floor(ratio * stats["response_tokens"])


def test_global_top_breaks_exact_ties_by_position_after_the_float32_cut():
    from toss_core.selection import global_top

    s = np.array([1.0, 3.0, 1.0 + 1e-12, 3.0, 1.0 + 1e-12, 0.5, 3.0], np.float64)
    # 1.0 + 1e-12 rounds to 1.0 in float32: only float64 tells the three apart; exact ties go to the earliest.
    assert np.flatnonzero(global_top(s, 4)).tolist() == [1, 2, 3, 6]
    assert np.flatnonzero(global_top(s, 5)).tolist() == [1, 2, 3, 4, 6]
    assert np.flatnonzero(global_top(s, 6)).tolist() == [0, 1, 2, 3, 4, 6]
    assert global_top(s, 0).sum() == 0 and global_top(s, 7).all()


def test_same_mask_whatever_the_shard_split(tmp_path):
    rng = np.random.default_rng(3)
    tokens = token_table(rng.integers(4, 40, size=50), seed=3)
    util = score_table(tokens, lambda sid, p: float(round(rng.normal(), 1)))
    safe = score_table(tokens, lambda sid, p: float(round(rng.normal(), 1)))
    a, _ = run_select(tmp_path / "a", tokens, util, safe, SelectConfig(ratio=0.2))
    b, _ = run_select(tmp_path / "b", tokens, util, safe, SelectConfig(ratio=0.2),
                      cuts=([7, 30], [1, 2, 45], [25]))
    ta, tb = pq.read_table(a), pq.read_table(b)
    assert ta.equals(tb)


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


def test_pro_flagged_labels_and_first_k_samples_skip_earlier_rounds(tmp_path):
    tokens = token_table([10, 10, 10, 10], prompt_share=0.0, seed=9)
    best = {0: 1.0, 1: 9.0, 2: 9.0, 3: 4.0}  # samples 1 and 2 tie for the top: smaller id first
    util = score_table(tokens, lambda sid, p: best[sid] if p == 4 else 0.0)
    safe = score_table(tokens, lambda sid, p: 0.0)
    u, h = write_shards(util, tmp_path / "us", [1]), write_shards(safe, tmp_path / "hs", [3])
    out, _ = run_select(tmp_path, tokens, util, safe, SelectConfig(mode="threshold", threshold=5.0))
    flagged = with_mask(tokens, read_mask([str(out)]), "flagged")  # mode 'tokens': labels only where flagged
    assert [e.sample_id for e in flagged] == [1, 2]
    assert [np.flatnonzero(e.labels).tolist() for e in flagged] == [[4], [4]]
    assert top_flagged_samples(u, h, 2) == [1, 2]
    assert top_flagged_samples(u, h, 3) == [1, 2, 3]
    # Round 2 walks the ranking again and skips what round 1 collected (the paper's Algorithm 1).
    assert top_flagged_samples(u, h, 2, exclude=[1, 2]) == [3, 0]
    assert top_flagged_samples(u, h, 9, exclude=[1]) == [2, 3, 0]


def multi_turn_tokens(n_samples, seed):
    """Samples with 1-3 assistant turns each (runs of response tokens); position 0 is always prompt."""
    rng = np.random.default_rng(seed)
    table = token_table(rng.integers(30, 400, size=n_samples), seed=seed)
    masks = []
    for m in table.column("response_mask").to_pylist():
        m = np.zeros(len(m), bool)
        for _ in range(rng.integers(1, 4)):
            a = int(rng.integers(1, len(m)))
            m[a : a + int(rng.integers(1, 300))] = True
        masks.append(m)
    return table.set_column(2, "response_mask", pa.array(masks, pa.list_(pa.bool_())))


def test_mask_files_written_in_parallel_hold_the_same_table_and_stats(tmp_path):
    tokens = multi_turn_tokens(300, seed=11)
    rng = np.random.default_rng(12)
    util = score_table(tokens, lambda sid, p: float(round(rng.gamma(2.0), 1)))
    safe = score_table(tokens, lambda sid, p: float(round(rng.gamma(2.0), 1)))
    t, u, h = (write_shards(x, tmp_path / n, []) for x, n in ((tokens, "t"), (util, "u"), (safe, "h")))
    one = str(tmp_path / "one.parquet")
    many = [str(tmp_path / f"mask-{i:05d}.parquet") for i in range(3)]
    cfg = SelectConfig(ratio=0.15)
    stats_one = select_tokens(t, u, h, cfg, one)
    stats_many = select_tokens(t, u, h, cfg, many)
    assert stats_many == stats_one
    assert all(pq.read_metadata(f).num_rows > 0 for f in many)  # really split, in sample order
    a, b = read_mask([one]), read_mask(many)
    assert a.equals(b)
    discard = discard_rows(a, tokens)

    # The statistics against a per-token count: the position of each response token in its turn.
    total, gone = np.zeros(257, int), np.zeros(257, int)
    for m, d in zip(tokens.column("response_mask").to_pylist(), discard):
        pos = -1
        for is_resp, x in zip(m, d):
            pos = pos + 1 if is_resp else -1
            if is_resp:
                total[min(pos, 256)] += 1
                gone[min(pos, 256)] += x
    curve = stats_one["discard_rate_curve"]
    assert curve == [g / t if t else None for g, t in zip(gone[:256], total)]
    assert stats_one["discard_rate_by_position"]["21+"] == pytest.approx(gone[20:].sum() / total[20:].sum())
    per_sample = [sum(d) for d in discard]
    assert stats_one["samples_touched"] == sum(x > 0 for x in per_sample)
    hist = stats_one["score_histogram"]
    assert sum(hist["all"]) == stats_one["response_tokens"]
    assert sum(hist["discarded"]) == stats_one["discarded_tokens"] == math.floor(0.15 * stats_one["response_tokens"])


def test_prefetch_hands_over_errors_and_stops_with_its_consumer():
    from toss_core.tables import prefetch

    def items():
        yield from range(3)
        raise TableError("row 3: broken")

    got = []
    with pytest.raises(TableError, match="row 3: broken"):
        for x in prefetch(items()):
            got.append(x)
    assert got == [0, 1, 2]

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    stream = prefetch(endless(), depth=2)
    assert [next(stream) for _ in range(5)] == [0, 1, 2, 3, 4]
    stream.close()  # the consumer stops: the thread must stop too, at most a few items ahead
    import time

    time.sleep(0.5)
    n = len(produced)
    time.sleep(0.3)
    assert len(produced) == n <= 5 + 2 + 2
