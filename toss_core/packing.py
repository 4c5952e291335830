"""Batches for scoring and training: samples padded one per row, or packed several per row.

    rows = pack_rows(lengths, max_tokens=8192)              # batches of rows of sample indices
    batch = layout([ids[i] for i in members], rows[0], pad_id, packed=True, extra={"labels": [...]})
    body(input_ids=batch.input_ids, **batch.model_kwargs())

Padding costs as much as a real token in the model's body. Packing puts several samples in one row and
gives each its own `position_ids` (0, 1, ... again at every sample start): transformers then builds a
block-diagonal causal mask from them, so a token attends only to earlier tokens of its own sample and its
loss is the padded one's up to float rounding (tested). A row is as wide as the longest sample in its
batch, so attention (quadratic in the row width) costs no more per token than in a padded batch; the
shortest samples fill the rows' free space. `plan_batches` takes whichever plan costs less.

Not every model honours position_ids this way (packed detection needs `attention_mask=None` and no KV
cache; some architectures ignore it): `supports_packing` checks the model itself on a tiny probe, and
callers fall back to padded rows when it fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


def length_batches(lengths: np.ndarray, max_tokens: int, max_padding: float = 0.2) -> list[np.ndarray]:
    """Padded batches: indices grouped by similar length, batch_size * longest <= max_tokens, and no sample
    shorter than (1 - max_padding) * the batch's longest, so padding stays under that share of a batch.

    The bound matters most for small shards, where a token budget alone would put a 300-token sample next
    to a 1,000-token one. A sample longer than the budget gets a batch of its own.
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


def pack_rows(lengths: np.ndarray, max_tokens: int, max_padding: float = 0.2) -> list[list[list[int]]]:
    """Packed batches: each a list of rows, each row a list of sample indices whose lengths add up to at
    most the batch's width (its longest sample); rows * width <= max_tokens (a sample longer than the
    budget gets a batch of its own). Every index appears exactly once; the plan depends only on `lengths`.

    A row starts with the longest sample left and is topped up with the shortest ones left (two pointers
    over the sorted lengths); it joins the current batch if it fills at least (1 - max_padding) of the
    width, as `length_batches` bounds padding, else it starts the next, narrower batch."""
    order = np.asarray(np.argsort(-np.asarray(lengths), kind="stable"))
    size = np.asarray(lengths)[order]
    lo, hi, batches, rows, width = 0, len(order) - 1, [], [], 0
    while lo <= hi:
        row, used, top = [int(order[lo])], int(size[lo]), hi
        cap = width if rows else used
        while top > lo and used + size[top] <= cap:
            row.append(int(order[top]))
            used += int(size[top])
            top -= 1
        if rows and ((len(rows) + 1) * width > max_tokens or used < (1 - max_padding) * width):
            batches.append(rows)  # this row would pad too much or overflow: it opens the next batch
            rows = []
            continue
        if not rows:
            width = int(size[lo])
        rows.append(row)
        lo, hi = lo + 1, top
    if rows:
        batches.append(rows)
    return batches


def plan_cost(lengths: np.ndarray, batches: list[list[list[int]]], hidden_size: int) -> float:
    """Relative compute of a plan: every position of a (rows, width) batch, plus attention, which grows
    with the square of the width. Per layer a position costs ~24 d^2 FLOPs and an attended pair ~4 d;
    attention kernels run less efficiently, and one position weighs about 2 d pairs (measured on
    SmolLM2, d = 576, CPU)."""
    cost = 0.0
    for rows in batches:
        width = max(int(sum(lengths[i] for i in row)) for row in rows)
        cost += len(rows) * width * (1 + width / (2 * hidden_size))
    return cost


def plan_batches(lengths: np.ndarray, max_tokens: int, packing: bool,
                 hidden_size: int = 1024) -> tuple[list[list[list[int]]], bool]:
    """(batches of rows of sample indices, packed?): the packed plan when packing is allowed and cheaper
    than padded batches of similar lengths (`length_batches`, one sample per row), else the padded one.
    Padding a large set sorted by length wastes only a few per cent, so packing mostly pays on small or
    mixed sets, such as a training step's random samples."""
    lengths = np.asarray(lengths)
    padded = [[[int(i)] for i in b] for b in length_batches(lengths, max_tokens)]
    return _cheaper(lengths, padded, max_tokens, packing, hidden_size)


def _cheaper(lengths: np.ndarray, padded: list[list[list[int]]], max_tokens: int, packing: bool,
             hidden_size: int) -> tuple[list[list[list[int]]], bool]:
    """The packed plan within `max_tokens` per batch if allowed and cheaper than `padded`, else `padded`."""
    if not packing or not len(lengths):
        return padded, False
    packed = pack_rows(lengths, max_tokens)
    if plan_cost(lengths, packed, hidden_size) < plan_cost(lengths, padded, hidden_size):
        return packed, True
    return padded, False


def micro_batches(lengths: np.ndarray, micro_batch_size: int, packing: bool,
                  hidden_size: int = 1024) -> tuple[list[list[list[int]]], bool]:
    """A training step's samples as micro-batches (lists of rows of indices), and whether they are packed.

    Padded: sorted by length, `micro_batch_size` samples each. Packed: rows within the same token budget
    (micro_batch_size x the step's longest sample) when that costs less; a step's samples are a random
    draw, so their lengths are mixed and padding them wastes the most."""
    lengths = np.asarray(lengths)
    order = np.argsort(lengths, kind="stable")  # short to long
    padded = [[[int(i)] for i in order[k : k + micro_batch_size]] for k in range(0, len(order), micro_batch_size)]
    budget = micro_batch_size * int(lengths.max()) if len(lengths) else 0
    return _cheaper(lengths, padded, budget, packing, hidden_size)


def label_targets(batch: "Batch", name: str = "labels") -> torch.Tensor:
    """The positions whose token is learnt/scored: flagged in `batch.extra[name]` and not a sample's first
    token (nothing in its own sample predicts it; in a packed row the previous sample would)."""
    return batch.extra[name] & (batch.position_ids > 0)


@dataclass
class Batch:
    """A (rows, width) batch: ids, positions, which sample each position belongs to, and per-sample flags
    (e.g. labels) placed at the same positions."""

    input_ids: torch.Tensor  # long
    position_ids: torch.Tensor  # long: restarts at 0 at every sample (and for a row's padding tail)
    sample_of: torch.Tensor  # long: index into the samples given to `layout`, -1 on padding
    packed: bool
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> bool (rows, width)

    def model_kwargs(self) -> dict[str, torch.Tensor | None]:
        """What the model's forward takes: position_ids and no attention mask when packed (transformers
        derives the block-diagonal mask from the positions), else the padding mask."""
        if self.packed:
            return {"position_ids": self.position_ids, "attention_mask": None, "use_cache": False}
        return {"attention_mask": (self.sample_of >= 0).long(), "use_cache": False}

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.position_ids.to(device), self.sample_of.to(device), self.packed,
                     {k: v.to(device) for k, v in self.extra.items()})


def layout(seqs: list[np.ndarray], rows: list[list[int]], pad_id: int, packed: bool,
           extra: dict[str, list[np.ndarray]] | None = None) -> Batch:
    """Place samples (token id arrays) in rows: `rows` lists indices into `seqs`, one per row when not
    packed. `extra` arrays (one per sample, same lengths) are placed at the same positions, False elsewhere."""
    extra = extra or {}
    width = max(sum(len(seqs[i]) for i in row) for row in rows)
    ids = np.full((len(rows), width), pad_id, np.int64)
    pos = np.zeros((len(rows), width), np.int64)
    owner = np.full((len(rows), width), -1, np.int64)
    flags = {k: np.zeros((len(rows), width), bool) for k in extra}
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(seqs[i])
            ids[r, at : at + n] = seqs[i]
            pos[r, at : at + n] = np.arange(n)
            owner[r, at : at + n] = i
            for k, values in extra.items():
                flags[k][r, at : at + n] = values[i]
            at += n
        pos[r, at:] = np.arange(width - at)  # the padding tail: its own segment, never attended to by samples
    return Batch(torch.from_numpy(ids), torch.from_numpy(pos), torch.from_numpy(owner), packed,
                 {k: torch.from_numpy(v) for k, v in flags.items()})


@torch.no_grad()
def supports_packing(model) -> bool:
    """Whether `model` keeps packed samples apart: the second of two samples packed in one row must get the
    hidden states it gets alone. Checked once per model object, on 9 tokens."""
    cached = getattr(model, "_toss_supports_packing", None)
    if cached is not None:
        return cached
    from toss_core.scoring import _decoder_and_head

    body, _ = _decoder_and_head(model)
    device = next(model.parameters()).device
    a, b = np.array([3, 4, 5, 6, 7]), np.array([8, 9, 10, 11])
    was_training = model.training
    model.eval()
    try:
        both = layout([a, b], [[0, 1]], 0, packed=True).to(device)
        alone = layout([b], [[0]], 0, packed=False).to(device)
        h_both = body(input_ids=both.input_ids, **both.model_kwargs()).last_hidden_state[0, len(a):].float()
        h_alone = body(input_ids=alone.input_ids, **alone.model_kwargs()).last_hidden_state[0].float()
        tol = 1e-3 if h_alone.dtype == torch.float32 and next(model.parameters()).dtype == torch.float32 else 3e-2
        ok = bool(torch.allclose(h_both, h_alone, rtol=tol, atol=tol * float(h_alone.abs().max())))
    except (TypeError, ValueError, RuntimeError):
        ok = False  # a forward that does not take position_ids without a mask
    finally:
        model.train(was_training)
    try:
        model._toss_supports_packing = ok
    except AttributeError:
        pass
    return ok
