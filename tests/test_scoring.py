"""Scoring pins SPEC section 2: per-token losses, aligned with input_ids, NaN off responses."""

import numpy as np
import pytest
import torch

from toss_core.models import load_model
from toss_core.packing import length_batches, pack_rows, plan_batches, supports_packing
from toss_core.scoring import score_tokens
from tests.factories import token_table


def reference_losses(model, ids):
    """One sample alone, logits at every position: the obvious way."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], dtype=torch.long)).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return np.concatenate([[np.nan], [-logp[t - 1, ids[t]].item() for t in range(1, len(ids))]])


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("budget", [64, 4096])
def test_losses_match_one_sample_at_a_time(tiny_model_dir, budget, packing):
    model = load_model(tiny_model_dir)
    tokens = token_table([30, 28, 25, 5, 3, 6, 4, 2], seed=11)
    scores, metrics = score_tokens(model, tokens, max_tokens_per_batch=budget, packing=packing)
    if packing and budget == 4096:  # long and short samples share rows: cheaper than padded batches
        assert metrics["packed"] and metrics["padding_share"] < 0.15
    if not packing:
        assert not metrics["packed"]
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


def test_packed_rows_cover_every_sample_once_within_width_and_budget():
    lengths = np.random.default_rng(1).integers(1, 300, size=400)
    batches = pack_rows(lengths, max_tokens=2048)
    placed = [i for rows in batches for row in rows for i in row]
    assert sorted(placed) == list(range(400))
    for rows in batches:
        width = max(lengths[row].sum() for row in rows)
        assert width == max(lengths[i] for row in rows for i in row)  # the batch's longest sample sets the width
        assert len(rows) == 1 or len(rows) * width <= 2048
    # A mixed set: long samples share rows with short ones (not so when sorted lengths are near-uniform).
    mixed = np.array([300, 290, 280, 20, 10, 15, 150, 140, 12, 8])
    rows = pack_rows(mixed, max_tokens=4096)
    assert rows == [[[0], [1, 9], [2, 4]], [[6], [7]], [[3]], [[5], [8]]]  # 290 + 8, 280 + 10 share rows
    positions = sum(len(r) * max(mixed[row].sum() for row in r) for r in rows)
    padded = sum(len(b) * mixed[b].max() for b in length_batches(mixed, 4096))
    assert positions < padded


def test_packing_probe_accepts_llama_and_rejects_a_model_that_mixes_samples(tiny_model_dir):
    model = load_model(tiny_model_dir)
    assert supports_packing(model)
    model.config._attn_implementation = "eager"  # the eager path also builds the block-diagonal mask
    del model._toss_supports_packing
    assert supports_packing(model)

    class Leaky(torch.nn.Module):  # attends across the whole row: packed samples would see each other
        base_model_prefix = "body"

        def __init__(self):
            super().__init__()
            self.body = Body()
            self.head = torch.nn.Linear(4, 8)

        def get_output_embeddings(self):
            return self.head

    class Body(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(16, 4)

        def forward(self, input_ids, **kw):
            h = self.emb(input_ids).cumsum(1)
            return type("Out", (), {"last_hidden_state": h})()

    assert not supports_packing(Leaky())


def test_plan_takes_the_cheaper_of_packed_and_padded():
    uniform = np.random.default_rng(2).integers(40, 128, size=400)  # sorted padding wastes ~3%: padded wins
    assert plan_batches(uniform, 8192, packing=True, hidden_size=576)[1] is False
    mixed = np.array([30, 28, 25, 5, 3, 6, 4, 2])
    plan, packed = plan_batches(mixed, 4096, packing=True, hidden_size=576)
    assert packed and sorted(i for rows in plan for row in rows for i in row) == list(range(8))
    assert plan_batches(mixed, 4096, packing=False)[1] is False
