"""GPU stages on GPU workers (`orchestration.dispatch: workers`): each training and score shard not already
in the store runs as a flow run of its stage deployment (`flows/stage_flows.py`), picked up by whichever
GPU worker is free, while the orchestrating flow waits.

    train_on_worker(store, config, role="safety", model=..., sources=[...], run_name="train safety")
    score_on_worker(store, config, model=..., adapter=..., tokens=..., shard=0, run_name="score utility 1/2")

Each is a Prefect task with the same cache key as the in-process task of its stage (the artifact key), so
the flow submits them exactly like the local tasks and they run side by side up to
`orchestration.max_workers` (the two reference trainings at once, the score shards at once). A task:
1. looks the artifact up in the store: a hit returns it; no flow run is created, no GPU is waited for;
2. otherwise creates a flow run of the stage deployment with `run_deployment(..., as_subflow=True)` (a
   child of this task run in the UI) and waits for it to finish;
3. reads the artifact the stage published from the store (it is never passed through Prefect), or
   raises `StageRunError` naming the stage, the flow run and its final state.
The stage flow resumes a training from its newest checkpoint in the store, so a rerun after a crash (of
the orchestrator, or of this task with `orchestration.retries`) creates a new flow run that continues.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from prefect import task
from prefect.deployments import run_deployment

from tasks.caching import ArtifactKeyPolicy, open_store
from toss_core.config import PipelineConfig, StoreConfig
from toss_core.pipeline import train_recipe
from toss_core.stages import StageOutcome, StagePlan, TrainSource, score_plan, train_plan
from toss_core.store import ArtifactRef

POLL_SECONDS = 2.0  # how often a waiting stage asks the server for its flow run's state
_TASK = dict(persist_result=True, result_serializer="json")
# Flow runs are created one at a time: run_deployment numbers the placeholder task run it creates in the
# parent flow from a per-flow counter that is not thread safe.
_CREATE = threading.Lock()


class StageRunError(RuntimeError):
    """A stage's flow run did not publish its artifact (failed, crashed, cancelled, or the wrong store)."""


def _log() -> logging.Logger:
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()  # type: ignore[return-value]
    except MissingContextError:
        return logging.getLogger(__name__)


def shared_store(store: StoreConfig) -> StoreConfig:
    """The store as a worker must be told it: a relative local folder made absolute (a flow run's working
    directory is the worker's project folder, not this process's). Keys never include the URL."""
    if "://" in store.url and not store.url.startswith("file://"):
        return store
    return store.model_copy(update={"url": str(Path(store.url.removeprefix("file://")).resolve())})


def train_parameters(config: PipelineConfig, role: str, model: ArtifactRef, sources: list[TrainSource],
                     force: bool = False) -> dict:
    """Parameters of a `toss-train-stage` flow run (JSON, as the server stores and validates them)."""
    return {"config": config.model_dump(mode="json"), "role": role, "model": model.model_dump(mode="json"),
            "sources": [s.model_dump(mode="json") for s in sources], "force": force}


def score_parameters(config: PipelineConfig, model: ArtifactRef, adapter: ArtifactRef | None, tokens: ArtifactRef,
                     shard: int, force: bool = False) -> dict:
    """Parameters of a `toss-score-stage` flow run."""
    return {"config": config.model_dump(mode="json"), "model": model.model_dump(mode="json"),
            "adapter": adapter.model_dump(mode="json") if adapter else None,
            "tokens": tokens.model_dump(mode="json"), "shard": shard, "force": force}


def _train_plan(i: dict) -> StagePlan:
    config: PipelineConfig = i["config"]
    return train_plan(i["role"], i["model"], i["sources"], train_recipe(config, i["role"]), config.model.dtype)


def _score_plan(i: dict) -> StagePlan:
    return score_plan(i["model"], i["adapter"], i["tokens"], i["shard"], i["config"].score)


@task(name="train-on-worker", cache_policy=ArtifactKeyPolicy(plan=_train_plan), **_TASK)
def train_on_worker(store: StoreConfig, config: PipelineConfig, role: str, model: ArtifactRef,
                    sources: list[TrainSource], run_name: str = "", force: bool = False) -> StageOutcome:
    """A training (reference, TOSS-Pro round, or the fine-tune) as a flow run of the train deployment."""
    config = config.model_copy(update={"store": shared_store(store)})
    plan = _train_plan({"config": config, "role": role, "model": model, "sources": sources})
    return run_stage(config, plan, config.orchestration.train_deployment, run_name or f"train {role}",
                     train_parameters(config, role, model, sources, force), force)


@task(name="score-on-worker", cache_policy=ArtifactKeyPolicy(plan=_score_plan), **_TASK)
def score_on_worker(store: StoreConfig, config: PipelineConfig, model: ArtifactRef, adapter: ArtifactRef | None,
                    tokens: ArtifactRef, shard: int, run_name: str = "", force: bool = False) -> StageOutcome:
    """One score shard as a flow run of the score deployment."""
    config = config.model_copy(update={"store": shared_store(store)})
    plan = _score_plan({"config": config, "model": model, "adapter": adapter, "tokens": tokens, "shard": shard})
    return run_stage(config, plan, config.orchestration.score_deployment, run_name or f"score shard {shard}",
                     score_parameters(config, model, adapter, tokens, shard, force), force)


def run_stage(config: PipelineConfig, plan: StagePlan, deployment: str, label: str, parameters: dict,
              force: bool = False) -> StageOutcome:
    """Store lookup, else a flow run of `deployment`, waited for; returns the artifact it published."""
    t0 = time.perf_counter()
    store = open_store(config.store)
    if not force and (ref := store.ref(plan.stage, plan.key)) is not None:
        return StageOutcome(ref=ref, reused=True, seconds=time.perf_counter() - t0)
    flow_run = start_stage(deployment, parameters, label)
    _log().info("%s: flow run %r (%s) of deployment %s, waiting for a worker", label, flow_run.name, flow_run.id,
                deployment)
    flow_run = wait_final(flow_run)
    state = flow_run.state
    what = f"stage {label!r}: flow run {flow_run.name!r} ({flow_run.id}) of deployment {deployment}"
    if not state.is_completed():
        reason = f": {state.message.rstrip('.')}" if state.message else ""
        raise StageRunError(f"{what} ended {state.name}{reason}. Its logs are in the Prefect UI. Rerun (or Retry) "
                            "the pipeline: finished stages are reused and a training resumes from its newest "
                            "checkpoint.")
    ref = store.ref(plan.stage, plan.key)
    if ref is None:
        raise StageRunError(f"{what} completed, but {config.store.url} has no {plan.stage}/{plan.key}: do the "
                            "workers and this flow use the same store (store.url, a shared S3 bucket or folder)?")
    return StageOutcome(ref=ref, reused=False, seconds=time.perf_counter() - t0)


def start_stage(deployment: str, parameters: dict, label: str):
    """A flow run of `deployment`, linked under the calling task run; returned at once (Scheduled)."""
    from prefect.exceptions import ObjectNotFound

    try:
        with _CREATE:
            return run_deployment(deployment, parameters=parameters, flow_run_name=label, timeout=0,
                                  as_subflow=True)
    except ObjectNotFound as e:
        raise StageRunError(f"stage {label!r}: no deployment {deployment!r} on the Prefect server "
                            f"({_api_url()}). Deploy the stage deployments (`toss deploy`, deploy/prefect.yaml) "
                            "or run with orchestration.dispatch: local") from e


def wait_final(flow_run):
    """Poll the server until the flow run is in a final state (Completed, Failed, Crashed, Cancelled)."""
    from prefect import get_client

    while not (flow_run.state and flow_run.state.is_final()):
        time.sleep(POLL_SECONDS)
        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(flow_run.id)
    return flow_run


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or "no PREFECT_API_URL"


def check_stage_deployments(config: PipelineConfig) -> None:
    """Before any stage runs: both stage deployments exist (else StageRunError), and their work pools have
    an online worker (else a warning: the stages will wait, "Late", until one starts)."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    orch = config.orchestration
    with get_client(sync_client=True) as client:
        for name in (orch.train_deployment, orch.score_deployment):
            try:
                deployment = client.read_deployment_by_name(name)
            except ObjectNotFound as e:
                raise StageRunError(
                    f"orchestration.dispatch is 'workers' but the Prefect server ({_api_url()}) has no deployment "
                    f"{name!r}: deploy the stage deployments (`toss deploy`, deploy/prefect.yaml) and start GPU "
                    "workers (`toss worker`), or run with orchestration.dispatch: local") from e
            pool = deployment.work_pool_name
            online = [w for w in client.read_workers_for_work_pool(pool) if w.status.value == "ONLINE"] if pool else []
            if not online:
                _log().warning("deployment %s: no worker of work pool %s is online; its flow runs wait until one "
                               "starts (`toss worker`)", name, pool)
