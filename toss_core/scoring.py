"""Per-token losses of response tokens under a model (SPEC section 2).

    scores = score_tokens(model, tokens_table, max_tokens_per_batch=8192)   # -> scores table

l(i, t) = -log P(token t | tokens < t), stored at position t, NaN where t is not a response token.
Three things make this fast and memory-flat, compared with scoring written as a training loop:
- samples are grouped by length under a token budget, so a batch pads to its own longest sample (not
  to a fixed 2048), and no sample is shorter than 80% of that one (padding < 20%); or, when that costs
  less, packed several to a row with their own position ids (toss_core.packing: no padding);
- the output layer is applied only at positions that predict a response token (with a 49k vocabulary
  it is ~20% of the FLOPs, and the (batch, length, vocab) logits tensor is the memory peak);
- each batch's losses go straight to the output arrays, so memory does not grow with the data set.
Log-softmax runs in float32 whatever the model dtype; the model is in eval mode (no dropout).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import torch

from toss_core.packing import Batch, layout, plan_batches, supports_packing
from toss_core.tables import SCORES_SCHEMA, flat_values, list_array, list_offsets

# Rows of the output layer computed at once: bounds the float32 logits buffer to rows x vocab.
_LOGIT_CHUNK = 2048


def _decoder_and_head(model):
    """The transformer body and the output layer, so logits can be taken at chosen positions only."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, base.base_model_prefix)
    return body, base.get_output_embeddings()


@torch.no_grad()
def token_losses(model, batch: Batch, targets: torch.Tensor) -> torch.Tensor:
    """Losses at `targets` positions (a bool (rows, width) tensor), in row-major order, float32."""
    body, head = _decoder_and_head(model)
    hidden = body(input_ids=batch.input_ids, **batch.model_kwargs()).last_hidden_state
    # Position t is predicted from the hidden state at t-1 (a target is never a sample's first token).
    pred_pos = torch.zeros_like(targets)
    pred_pos[:, :-1] = targets[:, 1:]
    h = hidden[pred_pos]
    gold = batch.input_ids[targets]
    out = torch.empty(len(gold), dtype=torch.float32, device=hidden.device)
    for lo in range(0, len(gold), _LOGIT_CHUNK):
        logits = head(h[lo : lo + _LOGIT_CHUNK]).float()
        logp = torch.log_softmax(logits, dim=-1)
        out[lo : lo + _LOGIT_CHUNK] = -logp.gather(1, gold[lo : lo + _LOGIT_CHUNK, None]).squeeze(1)
    return out


def score_tokens(
    model,
    tokens: pa.Table,
    max_tokens_per_batch: int = 8192,
    pad_id: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
    packing: bool = True,
) -> tuple[pa.Table, dict]:
    """Scores table (sample_id, ids_digest, loss) for every row of a token table.

    `packing`: pack samples several to a row when the model supports it and it saves compute (same losses,
    less padding; see toss_core.packing.plan_batches)."""
    model.eval()
    device = next(model.parameters()).device
    offsets = list_offsets(tokens.column("input_ids"))
    ids_flat = flat_values(tokens.column("input_ids"), np.int64)
    resp_flat = flat_values(tokens.column("response_mask"), bool)
    lengths = np.diff(offsets)
    loss_flat = np.full(len(ids_flat), np.nan, dtype=np.float32)
    plan, packed = plan_batches(lengths, max_tokens_per_batch, packing and len(lengths) > 0 and supports_packing(model),
                                model.config.hidden_size)
    # Response tokens at a sample's first position have no prediction (nothing precedes them).
    resp_scored = resp_flat.copy()
    resp_scored[offsets[:-1][lengths > 0]] = False

    start, done, positions = time.perf_counter(), 0, 0
    n_resp = int(resp_scored.sum())
    for rows in plan:
        members = [i for row in rows for i in row]
        local = {i: k for k, i in enumerate(members)}
        seqs = [ids_flat[offsets[i] : offsets[i + 1]] for i in members]
        batch = layout(seqs, [[local[i] for i in row] for row in rows], pad_id, packed,
                       {"targets": [resp_scored[offsets[i] : offsets[i + 1]] for i in members]})
        targets = batch.extra["targets"]
        losses = token_losses(model, batch.to(device), targets.to(device)).cpu().numpy()
        # Scatter back in the row-major order the targets were gathered in.
        owner = batch.sample_of.numpy()[targets.numpy()]
        start_of = offsets[np.asarray(members)][owner]
        within = batch.position_ids.numpy()[targets.numpy()]
        loss_flat[start_of + within] = losses
        done += len(losses)
        positions += batch.input_ids.numel()
        if progress:
            progress(done, n_resp, time.perf_counter() - start)

    elapsed = time.perf_counter() - start
    table = pa.table(
        {
            "sample_id": tokens.column("sample_id"),
            "ids_digest": tokens.column("ids_digest"),
            "loss": list_array(loss_flat, offsets, pa.float32()),
        },
        schema=SCORES_SCHEMA,
    )
    metrics = {
        "samples": tokens.num_rows,
        "response_tokens": n_resp,
        "seconds": round(elapsed, 3),
        "tokens_per_second": round(n_resp / elapsed, 1) if elapsed > 0 else None,
        "mean_loss": float(np.nanmean(loss_flat)) if n_resp else None,
        "packed": packed,
        "padding_share": round(1 - int(lengths.sum()) / positions, 4) if positions else 0.0,
    }
    return table, metrics
