"""Tokenization pins SPEC section 1: the response mask from character offsets, first token included."""

import numpy as np
import pytest

from toss_core.data import Conversation, Message
from toss_core.models import load_tokenizer
from toss_core.tables import ids_digest
from toss_core.tokenization import RenderError, render_reference, tokenize_conversations

# A template whose generation prompt ends in a space, like the reference code's "Assistant: ".
SPACE_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}Human: {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}Assistant: {{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)


def conv(*turns, meta=None):
    roles = ["user", "assistant"] * len(turns)
    return Conversation(tuple(Message(r, t) for r, t in zip(roles, turns)), source="test", row=0, meta=meta or {})


def response_text(tok, table, row=0):
    ids = np.array(table.column("input_ids")[row].as_py())
    mask = np.array(table.column("response_mask")[row].as_py())
    return tok.decode(ids[mask].tolist())


@pytest.fixture
def space_tokenizer(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    tok.chat_template = SPACE_TEMPLATE
    return tok


def test_first_response_token_is_in_the_mask_when_the_template_ends_in_a_space(space_tokenizer):
    tok = space_tokenizer
    table, stats = tokenize_conversations([conv("What is two plus three?", "Sure five")], tok, max_len=256)
    ids = table.column("input_ids")[0].as_py()
    mask = table.column("response_mask")[0].as_py()
    first = mask.index(True)
    # The first masked token carries the beginning of the answer ("Sure", possibly merged with the space).
    assert tok.decode([ids[first]]).strip().startswith("S")
    assert response_text(tok, table).strip() == "Sure five<|im_end|>"
    # Re-tokenizing the prefix "...Assistant: " (the reference code's way) would have lost that token:
    prefix_len = len(tok("Human: What is two plus three?\nAssistant: ", add_special_tokens=False)["input_ids"])
    assert prefix_len > first, "the prefix method would start the mask after the first answer token"
    assert stats.response_tokens == sum(mask)


def test_chatml_multi_turn_masks_every_assistant_turn_and_its_end_token(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    table, _ = tokenize_conversations([conv("hi", "Hello there", "and then?", "The end")], tok, max_len=256)
    assert response_text(tok, table) == "Hello there<|im_end|>The end<|im_end|>"
    ids = table.column("input_ids")[0].as_py()
    assert table.column("ids_digest")[0].as_py() == ids_digest(ids)


def test_reference_template_without_chat_template(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    tok.chat_template = None
    text, spans = render_reference(conv("Q1", "A1").messages, eos="<|im_end|>")
    assert text == "Human: Q1\nAssistant: A1 <|im_end|>\n"
    assert [text[s:e] for s, e in spans] == ["A1 <|im_end|>"]
    table, _ = tokenize_conversations([conv("Q1", "A1")], tok, max_len=64)
    assert response_text(tok, table).strip() == "A1 <|im_end|>"


def test_truncation_and_exclusion_keep_sample_ids(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    long_prompt = "word " * 80
    data = [conv("short", "ok"), conv(long_prompt, "lost answer"), conv("again", "fine " * 40)]
    table, stats = tokenize_conversations(data, tok, max_len=40)
    # The second sample's answer is cut off entirely: reported and excluded, ids not renumbered.
    assert table.column("sample_id").to_pylist() == [0, 2]
    assert stats.excluded_no_response == [1]
    assert stats.truncated == 2
    assert max(len(x) for x in table.column("input_ids").to_pylist()) == 40


def test_template_that_rewrites_the_answer_is_refused(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(RenderError, match="not inside its rendered span"):
        tokenize_conversations([conv("q", "answer")], tok, max_len=64)


def test_meta_is_kept_for_reports(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    table, _ = tokenize_conversations([conv("q", "a", meta={"is_harmful": True})], tok, max_len=64)
    assert table.column("meta")[0].as_py() == '{"is_harmful": true}'
