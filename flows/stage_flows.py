"""One flow per GPU stage, deployed to the `gpu` pool (deploy/prefect.yaml) so that each stage of a run can
go to its own GPU worker (`orchestration.dispatch: workers`, started by `tasks/dispatch.py`).

    toss-train-stage   one training: a reference model (safety, utility), a TOSS-Pro round's safety
                       model (safety-r1, ...) or the selective fine-tune (finetune)
    toss-score-stage   one shard of the custom set scored under one model

Each runs the very task the in-process pipeline runs (`tasks/stages.py`), with the same inputs, so the
artifact lands in the store under the same content-addressed key, a training checkpoints to (and resumes
from) the same `_checkpoints/train/<key>/` whichever worker runs it, and a stage finished before is
reused. The flow returns the artifact's reference; the orchestrating flow reads the artifact from the
store. Parameters are the pipeline config (the stage takes its own section) and the input artifacts'
references, all pydantic, so the server validates them when the run is created.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from tasks import stages as t
from tasks.caching import result_storage
from toss_core.config import PipelineConfig
from toss_core.pipeline import train_recipe
from toss_core.stages import StageOutcome, TrainSource
from toss_core.store import ArtifactRef


def _run(task, label: str, config: PipelineConfig, force: bool, **kwargs) -> dict:
    opts = {"task_run_name": label, "result_storage": result_storage(config.store)}
    if force:
        opts["refresh_cache"] = True
    outcome: StageOutcome = task.with_options(**opts)(store=config.store, force=force, **kwargs)
    get_run_logger().info("%s: %s %s", label, "reused" if outcome.reused else "computed", outcome.ref.uri)
    return outcome.ref.model_dump(mode="json")


@flow(name="toss-train-stage", log_prints=True)
def toss_train_stage(config: PipelineConfig, role: str, model: ArtifactRef, sources: list[TrainSource],
                     force: bool = False) -> dict:
    """Train one LoRA adapter (role `finetune` with `config.finetune`, any other with `config.reference`)
    and publish it to the store; a rerun resumes from the newest checkpoint. Returns its ArtifactRef."""
    return _run(t.train, f"train {role}", config, force, role=role, model=model, sources=sources,
                cfg=train_recipe(config, role), dtype=config.model.dtype, gpu_limit=config.orchestration.gpu_limit)


@flow(name="toss-score-stage", log_prints=True)
def toss_score_stage(config: PipelineConfig, model: ArtifactRef, adapter: ArtifactRef | None, tokens: ArtifactRef,
                     shard: int, force: bool = False) -> dict:
    """Score shard `shard` (of `config.score.shards`) of a token table under the base model (+ adapter) and
    publish the per-token losses to the store. Returns their ArtifactRef."""
    return _run(t.score_shard, f"score shard {shard + 1}/{config.score.shards}", config, force, model=model,
                adapter=adapter, tokens=tokens, shard=shard, cfg=config.score,
                gpu_limit=config.orchestration.gpu_limit)
