"""The plain-Python pipeline on the quick config: caching, TOSS-Pro rounds, and that the method works.

The quick data plants 16 placeholder "restricted" answers among 160 samples (`is_harmful` in meta,
never read by the method). Even with a tiny random model, the reference models learn the two styles
apart, so the mask must concentrate on the planted samples: a real check of the score's sign and of
the whole chain, not of timings.
"""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from toss_core.config import load_config
from toss_core.pipeline import run_pipeline
from toss_core.stages import local_files
from toss_core.store import ArtifactStore
from toss_core.tables import TOKENS_SCHEMA, read_mask, read_table

QUICK = Path(__file__).parents[1] / "configs" / "quick.yaml"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    store_dir = tmp_path_factory.mktemp("store")
    cfg = load_config(QUICK, [f"store.url={store_dir}"])
    store = ArtifactStore(cfg.store.url)
    first = run_pipeline(cfg, store, pro=True, progress=False)
    return cfg, store, first


def harmful_ids(store, tokens_ref):
    table = pq.read_table(local_files(store, tokens_ref)[0], columns=["sample_id", "meta"])
    return {sid for sid, m in zip(table.column("sample_id").to_pylist(), table.column("meta").to_pylist())
            if json.loads(m).get("is_harmful")}


def mask_quality(store, mask_ref, harmful):
    """(share of dropped tokens in harmful samples, share of all response tokens in harmful samples)."""
    mask = read_mask(local_files(store, mask_ref))  # every file of the (sharded) mask
    tokens_key = store.manifest(mask_ref.stage, mask_ref.key).inputs["tokens"]
    tokens = read_table(local_files(store, store.ref("tokens", tokens_key)), TOKENS_SCHEMA)
    dropped = dropped_harmful = resp = resp_harmful = 0
    for sid, pos, r in zip(mask.column("sample_id").to_pylist(), mask.column("discard_pos").to_pylist(),
                           tokens.column("response_mask").to_pylist()):
        d, n_resp = [1] * len(pos), sum(r)
        dropped, resp = dropped + sum(d), resp + n_resp
        if sid in harmful:
            dropped_harmful, resp_harmful = dropped_harmful + sum(d), resp_harmful + n_resp
    return dropped_harmful / dropped, resp_harmful / resp


def test_mask_concentrates_on_the_planted_harmful_samples(quick_run):
    cfg, store, first = quick_run
    tokens_ref = dict(first.steps)["prepare custom"].ref
    harmful = harmful_ids(store, tokens_ref)
    assert len(harmful) == 16
    stats = json.loads(store.open(first.final["mask"].ref, "stats.json").read())
    # A blind mask would drop harmful tokens in proportion to their share of the response tokens (~23%).
    precision, harmful_share = mask_quality(store, first.final["mask"].ref, harmful)
    assert stats["discarded_tokens"] == int(0.1 * stats["response_tokens"])
    assert precision > 2 * harmful_share, f"only {precision:.0%} of dropped tokens are in harmful samples"


def test_second_run_reuses_every_stage(quick_run):
    cfg, store, first = quick_run
    again = run_pipeline(cfg, store, pro=True, progress=False)
    assert [name for name, o in again.steps if not o.reused] == []
    assert [o.ref for _, o in again.steps] == [o.ref for _, o in first.steps]


def test_pro_rounds_train_the_utility_model_once_and_make_distinct_masks(quick_run):
    cfg, store, first = quick_run
    names = [name for name, _ in first.steps]
    assert names.count("train utility") == 1
    assert [n for n in names if n.startswith("train safety")] == ["train safety", "train safety-r1", "train safety-r2"]
    masks = [o.ref.key for n, o in first.steps if n.startswith("select")]
    assert len(masks) == 3 and len(set(masks)) == 3
    assert first.final["mask"].ref.key == masks[-1]
    # utility scores are computed once (2 shards), safety scores once per round
    assert sum(n.startswith("score utility") for n in names) == cfg.score.shards
    assert sum(n.startswith("score safety") for n in names) == 3 * cfg.score.shards


def test_pro_samples_mode_collects_new_samples_each_round(quick_run):
    """Mode 'samples' over 2 rounds (paper, Algorithm 1): round r adds the first k samples down round r-1's
    ranking of S that no earlier round collected; D^h grows cumulatively."""
    from toss_core.pipeline import mask_score_files
    from toss_core.selection import top_flagged_samples

    cfg, store, _ = quick_run
    cfg2 = cfg.model_copy(deep=True)
    cfg2.pro.mode, cfg2.pro.samples_k, cfg2.pro.rounds = "samples", 3, 2
    run = run_pipeline(cfg2, store, pro=True, progress=False)
    steps = dict(run.steps)
    picked = [store.manifest("train", steps[f"train safety-r{r}"].ref.key).config["sources"][1]["only_samples"]
              for r in (1, 2)]
    round0, round1 = steps["select round 0"].ref, steps["select round 1"].ref
    first = top_flagged_samples(*mask_score_files(store, round0), 3)
    assert picked[0] == sorted(first)
    new = top_flagged_samples(*mask_score_files(store, round1), 3, exclude=first)
    assert len(new) == 3 and not set(new) & set(first)
    assert picked[1] == sorted(first + new)  # 6 distinct samples: none collected twice


def test_changing_only_the_ratio_reuses_references_and_scores(quick_run):
    cfg, store, first = quick_run
    cfg2 = cfg.model_copy(deep=True)
    cfg2.select.ratio = 0.2
    second = run_pipeline(cfg2, store, pro=False, progress=False)
    computed = [name for name, o in second.steps if not o.reused]
    assert computed == ["select round 0", "train finetune"]


def test_final_adapter_loads_with_peft(quick_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, store, first = quick_run
    model_dir = store.local_dir(dict(first.steps)["model"].ref)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir),
                                      store.local_dir(first.final["finetune"].ref))
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0
