"""Scoring pins SPEC section 2: per-token losses, aligned with input_ids, NaN off responses."""

import numpy as np
import pytest
import torch

from toss_core.models import load_model
from toss_core.scoring import length_batches, score_tokens
from tests.factories import token_table


def reference_losses(model, ids):
    """One sample alone, logits at every position: the obvious way."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], dtype=torch.long)).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return np.concatenate([[np.nan], [-logp[t - 1, ids[t]].item() for t in range(1, len(ids))]])


@pytest.mark.parametrize("budget", [64, 4096])
def test_losses_match_one_sample_at_a_time(tiny_model_dir, budget):
    model = load_model(tiny_model_dir)
    tokens = token_table([5, 17, 9, 30, 12], seed=11)
    scores, metrics = score_tokens(model, tokens, max_tokens_per_batch=budget)
    assert scores.column("sample_id").to_pylist() == tokens.column("sample_id").to_pylist()
    assert scores.column("ids_digest").equals(tokens.column("ids_digest"))
    for ids, resp, loss in zip(tokens.column("input_ids").to_pylist(), tokens.column("response_mask").to_pylist(),
                               scores.column("loss").to_pylist()):
        ref = reference_losses(model, ids)
        loss = np.array(loss, dtype=float)
        resp = np.array(resp)
        assert np.isnan(loss[~resp]).all()
        np.testing.assert_allclose(loss[resp], ref[resp], atol=1e-4)
    assert metrics["response_tokens"] == sum(sum(m) for m in tokens.column("response_mask").to_pylist())


def test_length_batches_respect_the_budget_and_cover_everything():
    lengths = np.array([5, 100, 7, 50, 50, 300, 1])
    batches = length_batches(lengths, max_tokens=120)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or lengths[b].max() * len(b) <= 120


def test_length_batches_bound_the_padding():
    lengths = np.random.default_rng(0).integers(20, 2000, size=500)
    batches = length_batches(lengths, max_tokens=8192, max_padding=0.2)
    assert sorted(np.concatenate(batches).tolist()) == list(range(500))
    for b in batches:
        assert lengths[b].min() >= 0.8 * lengths[b].max()
        assert len(b) == 1 or lengths[b].max() * len(b) <= 8192
    positions = sum(len(b) * lengths[b].max() for b in batches)
    assert positions <= 1.2 * lengths.sum()
    # With the budget alone, one batch mixes 110- and 30-token samples: 220 padded positions for 140 real.
    assert [b.tolist() for b in length_batches(np.array([110, 30]), max_tokens=256, max_padding=1.0)] == [[0, 1]]
    assert [b.tolist() for b in length_batches(np.array([110, 30]), max_tokens=256)] == [[0], [1]]
