"""Prefect tasks of the evaluation stages: resolve the store, call toss_core.evaluation, return a StageOutcome.

Cached by artifact key like every stage task (`tasks.caching.ArtifactKeyPolicy`); generation takes the
GPU concurrency slot only while it computes. Judge API keys are read from the environment inside the
stage, never passed as task parameters (Prefect stores parameters).
"""

from __future__ import annotations

from prefect import task

from tasks.caching import ArtifactKeyPolicy, open_store
from tasks.stages import gpu_slot
from toss_core.config import GenerationConfig, JudgeConfig, PromptSetConfig, StoreConfig
from toss_core.evaluation import (
    ReportSpec,
    baseline_mask_plan,
    baseline_mask_stage,
    compare_plan,
    compare_stage,
    generate_plan,
    generate_stage,
    judge_plan,
    judge_stage,
    report_plan,
    report_stage,
)
from toss_core.stages import StageOutcome
from toss_core.store import ArtifactRef

_TASK = dict(persist_result=True, result_serializer="json")


@task(name="baseline-mask", cache_policy=ArtifactKeyPolicy(plan=
    lambda i: baseline_mask_plan(i["method"], i["tokens"], i["scores"], i["budget"], i["seed"])), **_TASK)
def baseline_mask(store: StoreConfig, method: str, tokens: ArtifactRef, scores: dict[str, list[ArtifactRef]],
                  budget: int, seed: int = 0, force: bool = False) -> StageOutcome:
    """A baseline's mask over the custom set (random, first-k, sample-level, single-term rankings, oracle)."""
    return baseline_mask_stage(open_store(store), method, tokens, scores, budget, seed, force=force)


@task(name="generate", cache_policy=ArtifactKeyPolicy(plan=lambda i: generate_plan(
    i["model"], i["adapter"], i["prompts"], i["cfg"], i["dtype"], i["store"].storage_options)), **_TASK)
def generate(store: StoreConfig, model: ArtifactRef, adapter: ArtifactRef | None, prompts: PromptSetConfig,
             cfg: GenerationConfig, dtype: str = "float32", gpu_limit: str | None = None,
             force: bool = False) -> StageOutcome:
    """One model's answers to one prompt set."""
    return generate_stage(open_store(store), model, adapter, prompts, cfg, dtype, store.storage_options,
                          force=force, progress=False, guard=gpu_slot(gpu_limit))


@task(name="judge", cache_policy=ArtifactKeyPolicy(plan=
    lambda i: judge_plan(i["generations"], i["judge"], i["kind"])), **_TASK)
def judge(store: StoreConfig, generations: ArtifactRef, judge: JudgeConfig, kind: str,
          force: bool = False) -> StageOutcome:
    """One judge's ratings of one set of answers."""
    return judge_stage(open_store(store), generations, judge, kind, force=force)


@task(name="compare", cache_policy=ArtifactKeyPolicy(plan=
    lambda i: compare_plan(i["candidate"], i["reference"], i["judge"], i["kind"])), **_TASK)
def compare(store: StoreConfig, candidate: ArtifactRef, reference: ArtifactRef, judge: JudgeConfig, kind: str,
            force: bool = False) -> StageOutcome:
    """Pairwise judgements against standard SFT's answers, both orders."""
    return compare_stage(open_store(store), candidate, reference, judge, kind, force=force)


@task(name="report", cache_policy=ArtifactKeyPolicy(plan=lambda i: report_plan(i["spec"])), **_TASK)
def report(store: StoreConfig, spec: ReportSpec, force: bool = False) -> StageOutcome:
    """The evaluation table, scatter and JSON."""
    return report_stage(open_store(store), spec, force=force)
