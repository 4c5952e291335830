"""One Prefect task per pipeline stage: resolve the store, call toss_core, return a small StageOutcome.

Each task is cached by its artifact key (`tasks.caching.ArtifactKeyPolicy`); its body checks the store
again and only computes on a miss. GPU stages take a Prefect global concurrency limit only when they compute
(a tag-based limit is taken before the cache lookup, so cached tasks would queue for GPU slots), and
only when `gpu_limit` names one.
"""

from __future__ import annotations

import contextlib
import time

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from tasks.caching import ArtifactKeyPolicy, open_store
from toss_core.config import DataConfig, ModelConfig, ScoreConfig, SelectConfig, StoreConfig, TrainConfig
from toss_core.stages import (
    StageOutcome,
    TrainSource,
    base_model_stage,
    score_plan,
    score_stage,
    select_plan,
    select_stage,
    tokenize_plan,
    tokenize_stage,
    train_plan,
    train_stage,
)
from toss_core.store import ArtifactRef

_TASK = dict(persist_result=True, result_serializer="json")


def gpu_slot(limit: str | None):
    """Hold one slot of a Prefect global concurrency limit while using the GPU (no-op when None)."""
    if not limit:
        return contextlib.nullcontext()
    from prefect.concurrency.sync import concurrency

    return concurrency(limit, occupy=1)


class _TrainingProgress:
    """A Prefect progress artifact that follows training steps (updated at most every 2 seconds)."""

    def __init__(self, role: str):
        self.id = create_progress_artifact(0.0, key=None, description=f"training {role}")
        self.last = 0.0

    def __call__(self, step: int, total: int, row: dict) -> None:
        if time.monotonic() - self.last > 2 or step == total:
            update_progress_artifact(self.id, 100.0 * step / total)
            self.last = time.monotonic()


@task(name="base-model", **_TASK)
def base_model(store: StoreConfig, model: ModelConfig, force: bool = False) -> StageOutcome:
    """The base model: a local folder as-is, or a tiny random model built into the store."""
    return base_model_stage(open_store(store), model, force=force)


@task(name="prepare", cache_policy=ArtifactKeyPolicy(plan=
    lambda i: tokenize_plan(i["model"], i["source"], i["data"], i["store"].storage_options)), **_TASK)
def prepare(store: StoreConfig, model: ArtifactRef, source: str, data: DataConfig, force: bool = False) -> StageOutcome:
    """Tokenize one data set into a token table."""
    return tokenize_stage(open_store(store), model, source, data, store.storage_options, force=force)


@task(name="train", cache_policy=ArtifactKeyPolicy(plan=
    lambda i: train_plan(i["role"], i["model"], i["sources"], i["cfg"], i["dtype"])), **_TASK)
def train(store: StoreConfig, role: str, model: ArtifactRef, sources: list[TrainSource], cfg: TrainConfig,
          dtype: str = "float32", gpu_limit: str | None = None, force: bool = False) -> StageOutcome:
    """Train a LoRA adapter: a reference model, a TOSS-Pro round's safety model, or the selective fine-tune."""
    return train_stage(open_store(store), role, model, sources, cfg, dtype=dtype, force=force,
                       on_step=_TrainingProgress(role), guard=gpu_slot(gpu_limit))


@task(name="score-shard", cache_policy=ArtifactKeyPolicy(plan=
    lambda i: score_plan(i["model"], i["adapter"], i["tokens"], i["shard"], i["cfg"])), **_TASK)
def score_shard(store: StoreConfig, model: ArtifactRef, adapter: ArtifactRef | None, tokens: ArtifactRef, shard: int,
                cfg: ScoreConfig, gpu_limit: str | None = None, force: bool = False) -> StageOutcome:
    """Per-token losses of one shard of the custom set under one model."""
    return score_stage(open_store(store), model, adapter, tokens, shard, cfg, force=force, guard=gpu_slot(gpu_limit))


@task(name="select", cache_policy=ArtifactKeyPolicy(plan=
    lambda i: select_plan(i["tokens"], i["utility"], i["safety"], i["cfg"])), **_TASK)
def select(store: StoreConfig, tokens: ArtifactRef, utility: list[ArtifactRef], safety: list[ArtifactRef],
           cfg: SelectConfig, force: bool = False) -> StageOutcome:
    """Merge the score shards into the mask (CPU)."""
    return select_stage(open_store(store), tokens, utility, safety, cfg, force=force)
