"""Per-token losses of response tokens under a model (SPEC section 2).

    scores = score_tokens(model, tokens_table, max_tokens_per_batch=8192)   # -> scores table

l(i, t) = -log P(token t | tokens < t), stored at position t, NaN where t is not a response token.
Three things make this fast and memory-flat, compared with scoring written as a training loop:
- samples are grouped by length under a token budget, so a batch pads to its own longest sample
  (not to a fixed 2048), and no sample is shorter than 80% of that one (padding < 20%);
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

from toss_core.tables import SCORES_SCHEMA, flat_values, list_array, list_offsets

# Rows of the output layer computed at once: bounds the float32 logits buffer to rows x vocab.
_LOGIT_CHUNK = 2048


def length_batches(lengths: np.ndarray, max_tokens: int, max_padding: float = 0.2) -> list[np.ndarray]:
    """Indices grouped into batches of similar length: batch_size * longest <= max_tokens, and no sample
    shorter than (1 - max_padding) * the batch's longest, so padding stays under that share of a batch.

    Padding costs as much as real tokens in the model's body; the bound matters most for small shards,
    where a token budget alone would put a 300-token sample next to a 1,000-token one. A sample longer
    than the budget gets a batch of its own.
    """
    order = np.argsort(-lengths, kind="stable")  # longest first: a batch's first sample sets its width
    batches, current, longest = [], [], 0
    for i in order:
        n = int(lengths[i])
        if current and (longest * (len(current) + 1) > max_tokens or n < (1 - max_padding) * longest):
            batches.append(np.array(current))
            current = []
        if not current:
            longest = n
        current.append(i)
    if current:
        batches.append(np.array(current))
    return batches


def _decoder_and_head(model):
    """The transformer body and the output layer, so logits can be taken at chosen positions only."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, base.base_model_prefix)
    return body, base.get_output_embeddings()


@torch.no_grad()
def token_losses(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Losses at `targets` positions (a bool (B, T) tensor), in row-major order, float32."""
    body, head = _decoder_and_head(model)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    # Position t is predicted from the hidden state at t-1.
    pred_pos = torch.zeros_like(targets)
    pred_pos[:, :-1] = targets[:, 1:]
    h = hidden[pred_pos]
    gold = input_ids[targets]
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
) -> tuple[pa.Table, dict]:
    """Scores table (sample_id, ids_digest, loss) for every row of a token table."""
    model.eval()
    device = next(model.parameters()).device
    offsets = list_offsets(tokens.column("input_ids"))
    ids_flat = flat_values(tokens.column("input_ids"), np.int64)
    resp_flat = flat_values(tokens.column("response_mask"), bool)
    lengths = np.diff(offsets)
    loss_flat = np.full(len(ids_flat), np.nan, dtype=np.float32)

    start, done = time.perf_counter(), 0
    n_resp = int(resp_flat.sum())
    for batch in length_batches(lengths, max_tokens_per_batch):
        width = int(lengths[batch].max())
        ids = np.full((len(batch), width), pad_id, dtype=np.int64)
        targets = np.zeros((len(batch), width), dtype=bool)
        for row, i in enumerate(batch):
            lo, hi = offsets[i], offsets[i + 1]
            ids[row, : hi - lo] = ids_flat[lo:hi]
            targets[row, : hi - lo] = resp_flat[lo:hi]
        attn = np.arange(width)[None, :] < lengths[batch][:, None]
        losses = token_losses(
            model, torch.from_numpy(ids).to(device), torch.from_numpy(attn).long().to(device),
            torch.from_numpy(targets).to(device),
        ).cpu().numpy()
        # Scatter back in the same row-major order the targets were gathered in.
        k = 0
        for row, i in enumerate(batch):
            n = int(targets[row].sum())
            lo = offsets[i]
            loss_flat[lo + np.flatnonzero(targets[row])] = losses[k : k + n]
            k += n
        done += int(targets.sum())
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
    }
    return table, metrics
