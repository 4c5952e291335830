"""Render and tokenize every sample exactly once into a token table (SPEC section 1).

    rows, stats = tokenize_conversations(conversations, tokenizer, max_len=2048)
    write_token_table(rows, "tokens.parquet")

The response mask comes from character offsets of the assistant spans in the rendered text, never
from re-tokenizing a prefix: with a template ending in "Assistant: " a prefix re-tokenization makes
the trailing space its own token and silently loses the first answer token (the reference code's
quirk, which this project does not reproduce). Ids, mask and digest are built together, so they
cannot drift apart, and each span is checked to contain its message's text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from toss_core.data import Conversation, Message
from toss_core.tables import ROWS_PER_GROUP, TOKENS_SCHEMA, ids_digest

REFERENCE_TEMPLATE = "Human: {user}\nAssistant: {assistant}"


class RenderError(ValueError):
    """The chat template renders a conversation in a way its assistant spans cannot be found in."""


@dataclass
class TokenizeStats:
    samples_in: int = 0
    samples_out: int = 0
    truncated: int = 0
    excluded_no_response: list[int] = field(default_factory=list)  # sample ids excluded, for the report
    response_tokens: int = 0
    total_tokens: int = 0

    def as_metrics(self) -> dict:
        return {
            "samples_in": self.samples_in,
            "samples_out": self.samples_out,
            "truncated": self.truncated,
            "excluded_no_response": len(self.excluded_no_response),
            "excluded_sample_ids": self.excluded_no_response[:100],
            "response_tokens": self.response_tokens,
            "total_tokens": self.total_tokens,
        }


def _as_dicts(messages: tuple[Message, ...]) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in messages]


def render_reference(messages: tuple[Message, ...], eos: str, bos: str = "") -> tuple[str, list[tuple[int, int]]]:
    """The reference template: `Human: {user}\\nAssistant: {assistant} <eos>`; system turns `<|system|>\\n{s}\\n`.

    Returns the text and the (start, end) character spans of the assistant turns, eos included.
    """
    text, spans = bos, []
    for m in messages:
        if m.role == "system":
            text += f"<|system|>\n{m.content}\n"
        elif m.role == "user":
            text += f"Human: {m.content}\n"
        else:
            text += "Assistant: "
            start = len(text)
            text += f"{m.content} {eos}"
            spans.append((start, len(text)))
            text += "\n"
    return text, spans


def render_chat_template(messages: tuple[Message, ...], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Render with the tokenizer's chat template; each assistant span is the text its turn adds after the
    generation prompt, right-stripped of whitespace (so `<|im_end|>`/`<|eot_id|>` is included)."""
    msgs = _as_dicts(messages)
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    spans = []
    for j, m in enumerate(messages):
        if m.role != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(msgs[:j], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(msgs[: j + 1], tokenize=False)
        if not (full.startswith(prefix) and full.startswith(upto.rstrip()) and upto.startswith(prefix)):
            raise RenderError(
                "the chat template does not render conversations prefix by prefix (its output for the first "
                f"{j} turns is not a prefix of the whole conversation), so assistant spans cannot be located. "
                "Set a simpler template (tokenizer.chat_template) or drop it to use the reference template."
            )
        start, end = len(prefix), len(upto.rstrip())
        if m.content.strip() not in full[start:end]:
            raise RenderError(
                f"assistant turn {j} is not inside its rendered span {full[start:end]!r}: the template changes "
                "assistant text (e.g. strips reasoning). The loss would cover the wrong characters."
            )
        spans.append((start, end))
    return full, spans


def render(messages: tuple[Message, ...], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    if getattr(tokenizer, "chat_template", None):
        return render_chat_template(messages, tokenizer)
    return render_reference(messages, eos=tokenizer.eos_token or "", bos=tokenizer.bos_token or "")


def response_mask_from_offsets(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """1 for every token whose characters overlap an assistant span.

    Overlap, not containment: BPE often merges the template's space with the first answer word
    (" Sure"), and that token IS the first response token.
    """
    starts = np.array([o[0] for o in offsets], dtype=np.int64)
    ends = np.array([o[1] for o in offsets], dtype=np.int64)
    mask = np.zeros(len(offsets), dtype=bool)
    for s, e in spans:
        mask |= (ends > s) & (starts < e) & (ends > starts)
    return mask


def tokenize_conversations(
    conversations: list[Conversation], tokenizer, max_len: int, batch_size: int = 256
) -> tuple[pa.Table, TokenizeStats]:
    """Token table of `conversations` (sample_id = position in the list); see the module docstring."""
    if not getattr(tokenizer, "is_fast", False):
        raise RenderError("a fast tokenizer (tokenizers-backed) is needed for character offsets")
    stats = TokenizeStats(samples_in=len(conversations))
    cols: dict[str, list] = {name: [] for name in TOKENS_SCHEMA.names}
    for lo in range(0, len(conversations), batch_size):
        chunk = conversations[lo : lo + batch_size]
        rendered = [render(c.messages, tokenizer) for c in chunk]
        enc = tokenizer(
            [text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True
        )
        for k, (conv, (_, spans)) in enumerate(zip(chunk, rendered)):
            sample_id = lo + k
            ids = np.asarray(enc["input_ids"][k], dtype=np.int32)
            mask = response_mask_from_offsets(enc["offset_mapping"][k], spans)
            if len(ids) > max_len:
                stats.truncated += 1
                ids, mask = ids[:max_len], mask[:max_len]
            # Position 0 has no prediction, so it can never carry a loss.
            mask[:1] = False
            if not mask.any():
                stats.excluded_no_response.append(sample_id)
                continue
            cols["sample_id"].append(sample_id)
            cols["input_ids"].append(ids)
            cols["response_mask"].append(mask)
            cols["ids_digest"].append(ids_digest(ids))
            cols["meta"].append(json.dumps(conv.meta, sort_keys=True, default=str))
            stats.response_tokens += int(mask.sum())
            stats.total_tokens += len(ids)
    stats.samples_out = len(cols["sample_id"])
    return pa.Table.from_pydict(cols, schema=TOKENS_SCHEMA), stats


def write_token_table(table: pa.Table, path_or_file, rows_per_group: int = ROWS_PER_GROUP) -> None:
    pq.write_table(table, path_or_file, row_group_size=rows_per_group)


def show_tokens(table: pa.Table, tokenizer, row: int = 0) -> str:
    """Debug view: the rendered sample with response tokens in [brackets]."""
    ids = table.column("input_ids")[row].as_py()
    mask = table.column("response_mask")[row].as_py()
    return "".join(f"[{tokenizer.decode([i])}]" if m else tokenizer.decode([i]) for i, m in zip(ids, mask))
