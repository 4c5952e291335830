"""Prefect tasks of the demo's own stages (model import, demo data, merge); thin like tasks/stages.py."""

from __future__ import annotations

from prefect import task

from tasks.caching import ArtifactKeyPolicy, open_store
from tasks.stages import _TASK
from toss_core.config import StoreConfig
from toss_core.demo.config import DemoDataConfig
from toss_core.demo.sources import load_sources
from toss_core.demo.stages import (
    demo_data_plan,
    demo_data_stage,
    demo_sets_plan,
    demo_sets_stage,
    import_model_stage,
    import_plan,
    merge_plan,
    merge_stage,
    resolve_source,
)
from toss_core.stages import StageOutcome
from toss_core.store import ArtifactRef


@task(name="import-model", cache_policy=ArtifactKeyPolicy(plan=
    lambda i: import_plan(resolve_source(i["source"]), i["dtype"])), **_TASK)
def import_model(store: StoreConfig, source: str, dtype: str = "float32", force: bool = False) -> StageOutcome:
    """A GGUF file (or HF folder) converted once into a trainable HF folder in the store."""
    return import_model_stage(open_store(store), source, dtype, force=force)


@task(name="demo-data", cache_policy=ArtifactKeyPolicy(plan=
    lambda i: demo_data_plan(i["model"], i["cfg"], i["max_len"], load_sources().identity())), **_TASK)
def demo_data(store: StoreConfig, model: ArtifactRef, cfg: DemoDataConfig, max_len: int,
              force: bool = False) -> StageOutcome:
    """The demo's data files from the installed packages (benign answers self-distilled by the model)."""
    return demo_data_stage(open_store(store), model, cfg, max_len, force=force)


@task(name="demo-sets", cache_policy=ArtifactKeyPolicy(plan=lambda i: demo_sets_plan(i["data"], i["aligned"])), **_TASK)
def demo_sets(store: StoreConfig, data: ArtifactRef, aligned: ArtifactRef, cfg: DemoDataConfig,
              force: bool = False) -> StageOutcome:
    """Every data file of the demo: D^u and the custom set's benign answers come from the aligned base."""
    return demo_sets_stage(open_store(store), data, aligned, cfg, force=force)


@task(name="merge", cache_policy=ArtifactKeyPolicy(plan=lambda i: merge_plan(i["model"], i["adapter"])), **_TASK)
def merge(store: StoreConfig, model: ArtifactRef, adapter: ArtifactRef, force: bool = False) -> StageOutcome:
    """A LoRA adapter merged into the base model's weights: a new base model."""
    return merge_stage(open_store(store), model, adapter, force=force)
