"""Generation: prompt sets in every layout, rendering, seeded sampling that does not depend on batching,
and the cached `generations` stage (a tiny random model: the answers are gibberish, the mechanics are not)."""

import json

import pyarrow.parquet as pq
import pytest

from toss_core.config import GenerationConfig, PromptSetConfig
from toss_core.data import DataError
from toss_core.generation import generate, load_prompts, render_prompt

FAST = GenerationConfig(max_new_tokens=6, batch_size=2)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one torch thread is far faster than two fighting others."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---- prompt sets --------------------------------------------------------------------------------


def test_prompt_sets_in_every_layout(tmp_path):
    rows = [
        {"prompt": "[harmful request 1]", "category": "c1"},  # prompt only, meta kept
        {"prompt": "[harmful request 2]", "response": "ignored"},
        {"messages": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "[request 3]"}]},
        {"messages": [{"role": "user", "content": "[request 4]"}, {"role": "assistant", "content": "a"},
                      {"role": "user", "content": "second turn"}]},
        {"instruction": "Sum up", "input": "[text]", "output": "ignored"},
        {"question": "[question 6]?", "answer": "ignored"},
        {"conversations": [{"from": "human", "value": "[request 7]"}, {"from": "gpt", "value": "b"}]},
    ]
    prompts = load_prompts(write_jsonl(tmp_path / "p.jsonl", rows))
    assert [p.text for p in prompts] == ["[harmful request 1]", "[harmful request 2]", "[request 3]", "[request 4]",
                                         "Sum up\n\n[text]", "[question 6]?", "[request 7]"]
    assert [p.prompt_id for p in prompts] == list(range(7))
    assert prompts[0].meta == {"category": "c1"} and prompts[2].system == "Be brief"
    assert load_prompts(str(tmp_path / "p.jsonl"), limit=2) == prompts[:2]


def test_prompt_set_limit_and_parquet(tmp_path):
    import pyarrow as pa

    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "id": [7, 8, 9]}), tmp_path / "p.parquet")
    prompts = load_prompts(str(tmp_path / "p.parquet"), limit=2)
    assert [(p.text, p.meta) for p in prompts] == [("a", {"id": 7}), ("b", {"id": 8})]


def test_a_record_without_a_prompt_names_its_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"text": "no prompt field"}])
    with pytest.raises(DataError, match="line 2"):
        load_prompts(path)


def test_rendering_uses_the_chat_template_or_the_reference_template(tiny_model_dir):
    from toss_core.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    assert render_prompt(tok, "Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    tok.chat_template = None
    assert render_prompt(tok, "Hi", system="S") == "<|system|>\nS\nHuman: Hi\nAssistant:"


# ---- decoding -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from toss_core.models import load_tokenizer, load_with_adapter

    tok = load_tokenizer(tiny_model_dir)
    texts = [render_prompt(tok, t) for t in ("What colour is the river?", "Hi", "Where is the lamp kept, and why?")]
    return load_with_adapter(tiny_model_dir, None), tok, texts


def answers(tiny, cfg, ids=(0, 1, 2)):
    model, tok, texts = tiny
    return generate(model, tok, texts, list(ids), cfg)


def test_sampling_is_reproducible_with_a_seed_and_changes_with_it(tiny):
    first = answers(tiny, FAST)
    assert answers(tiny, FAST) == first
    assert answers(tiny, FAST.model_copy(update={"seed": 1})) != first
    assert all(n == FAST.max_new_tokens or stopped for _, n, stopped in first)


def test_an_answer_does_not_depend_on_its_batch(tiny):
    # per-prompt generators: batch size and batch neighbours change nothing (left padding is exact)
    for decoding in ("sample", "greedy"):
        cfg = FAST.model_copy(update={"decoding": decoding})
        batched = answers(tiny, cfg.model_copy(update={"batch_size": 3}))
        assert answers(tiny, cfg.model_copy(update={"batch_size": 1})) == batched


def test_greedy_ignores_the_seed(tiny):
    greedy = FAST.model_copy(update={"decoding": "greedy"})
    assert answers(tiny, greedy) == answers(tiny, greedy.model_copy(update={"seed": 5}))


def test_sampling_does_not_use_or_disturb_the_global_rng(tiny):
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = answers(tiny, FAST)
    assert torch.equal(torch.rand(3), expected)  # torch's global stream was untouched
    torch.manual_seed(999)
    assert answers(tiny, FAST) == first


# ---- the stage ----------------------------------------------------------------------------------


def test_generations_stage_is_cached_by_model_prompts_and_decoding(tiny_model_dir, tmp_path):
    from toss_core.evaluation import generate_stage
    from toss_core.generation import GENERATIONS_SCHEMA
    from toss_core.stages import EXTERNAL_MODEL, local_files
    from toss_core.store import ArtifactRef, ArtifactStore

    store = ArtifactStore(str(tmp_path / "store"))
    model = ArtifactRef(uri=str(tiny_model_dir), stage=EXTERNAL_MODEL, key="tiny", digest="tiny")
    prompts = PromptSetConfig(name="benign", kind="benign",
                              path=write_jsonl(tmp_path / "b.jsonl", [{"prompt": "What colour is the lamp?"},
                                                                       {"prompt": "Hi"}]))
    first = generate_stage(store, model, None, prompts, FAST, progress=False)
    table = pq.read_table(local_files(store, first.ref)[0])
    assert table.schema.names == GENERATIONS_SCHEMA.names and table.num_rows == 2
    assert json.loads(table.column("decoding")[0].as_py())["top_p"] == 0.9
    # same answers asked again, or in other batches, or under another name: reused
    renamed = prompts.model_copy(update={"name": "other", "kind": "harmful"})
    assert generate_stage(store, model, None, renamed, FAST.model_copy(update={"batch_size": 1})).reused
    # another decoding or another prompt file: a new artifact
    assert not generate_stage(store, model, None, prompts, FAST.model_copy(update={"seed": 3}), progress=False).reused
    other = prompts.model_copy(update={"path": write_jsonl(tmp_path / "c.jsonl", [{"prompt": "Hello"}])})
    assert not generate_stage(store, model, None, other, FAST, progress=False).reused
