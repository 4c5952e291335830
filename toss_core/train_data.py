"""What a training run learns from: token ids plus, per sample, which positions carry a loss.

Every training run of the method is the same loop over different label masks (SPEC sections 4-5):

    reference models        labels on every response token          examples_from_tokens(tokens)
    selective fine-tune     response tokens the mask KEEPS           with_mask(tokens, mask, "keep")
    TOSS-Pro, mode tokens   only the tokens the mask FLAGGED         with_mask(tokens, mask, "flagged")
    TOSS-Pro, mode samples  whole responses of chosen samples        examples_from_tokens(tokens, only=ids)

A mask row is applied only to the token row with the same `ids_digest` (checked here, never shifted);
either mask layout works (toss_core.tables.discard_flags).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa

from toss_core.tables import check_aligned, discard_flags, list_offsets


@dataclass(frozen=True)
class Example:
    sample_id: int
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # bool, same length: position t carries the loss of predicting token t


def examples_from_tokens(tokens: pa.Table, only: set[int] | None = None) -> list[Example]:
    out = []
    ids = tokens.column("sample_id").to_pylist()
    for sid, x, m in zip(ids, tokens.column("input_ids").to_numpy(), tokens.column("response_mask").to_numpy()):
        if only is None or sid in only:
            out.append(Example(sid, np.asarray(x, np.int32), np.asarray(m, bool)))
    return out


def with_mask(tokens: pa.Table, mask: pa.Table, use: Literal["keep", "flagged"]) -> list[Example]:
    """Labels from a selection mask: 'keep' trains on kept response tokens, 'flagged' only on discarded ones.

    With 'flagged', samples without a flagged token are left out (they would contribute nothing).
    """
    check_aligned(tokens, mask, "mask")
    offsets = list_offsets(tokens.column("input_ids"))
    discard = discard_flags(mask, offsets)
    out = []
    rows = zip(tokens.column("sample_id").to_pylist(), tokens.column("input_ids").to_numpy(),
               tokens.column("response_mask").to_numpy(), offsets[:-1], offsets[1:])
    for sid, x, resp, lo, hi in rows:
        resp, dropped = np.asarray(resp, bool), discard[lo:hi]
        labels = resp & ~dropped if use == "keep" else resp & dropped
        if use == "flagged" and not labels.any():
            continue
        out.append(Example(sid, np.asarray(x, np.int32), labels))
    return out


def label_tokens(examples: list[Example]) -> int:
    return int(sum(e.labels.sum() for e in examples))
