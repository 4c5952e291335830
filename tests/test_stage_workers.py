"""Each GPU stage on its own GPU worker (`orchestration.dispatch: workers`), for real: a `prefect server
start` (SQLite), the stage deployments applied with `toss deploy`, and two process workers on the `gpu`
pool started as `toss worker` starts them on a two-GPU box (CUDA_VISIBLE_DEVICES "0" and "1", --limit 1;
on CPU here). The pipeline's flow runs in this process on the quick config; every training and score
shard is a flow run of `toss-train-stage` / `toss-score-stage` on a worker.

What is checked, from the artifacts' manifests (pid, CUDA_VISIBLE_DEVICES, start and end of the
computation) and the server's flow runs, not from timings of this process:
- the two reference trainings ran in different worker processes, on different GPUs, overlapping in time;
  the whole DAG completed and the final adapter is in the store;
- a rerun dispatches nothing: no new stage flow run, every stage reused;
- a training's flow-run process SIGKILLed mid-training (slowed by TOSS_INJECT_FAULT=train:sleep) fails the
  run with an error naming the stage and its flow run; the rerun starts a new flow run that resumes from
  the newest checkpoint (resumed_from_step > 0) and completes.
Helpers (processes stopped by their own ids, a clean environment, `toss deploy`) come from test_deploy.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

import pytest

pytest.importorskip("prefect")

from tests.test_deploy import (  # noqa: E402
    ROOT,
    Proc,
    Stack,
    _env,
    _free_port,
    _healthy,
    _start_postgres,
    _wait,
    toss_deploy,
)
from toss_core.config import load_config  # noqa: E402
from toss_core.faults import ENV as FAULT  # noqa: E402
from toss_core.stages import TrainSource, train_plan  # noqa: E402
from toss_core.store import ArtifactStore  # noqa: E402

pytestmark = pytest.mark.slow

QUICK = ROOT / "configs" / "quick.yaml"
GPUS = ("0", "1")
# Slower training steps: the two reference trainings last long enough to overlap however the two workers'
# flow-run processes start (seconds apart on 2 cores), and a fine-tune is still running when it is killed.
SLOW_TRAINING = "train:sleep=0.5"
# One shard per model: the two score stages go to the two workers at once (a wave less than 2 shards each).
OVERRIDES = ("orchestration.dispatch=workers", "score.shards=1")
CRASH_CHECKPOINT_EVERY = 3  # the run that is killed: its own fine-tune key, checkpoints every 3 steps


class Cluster:
    def __init__(self, home: Path, api: str, store: Path, server: Proc, workers: list[Proc]):
        self.home, self.api, self.store, self.server, self.workers = home, api, store, server, workers

    def config(self, *overrides: str):
        return load_config(QUICK, [f"store.url={self.store}", *OVERRIDES, *overrides])

    @contextlib.contextmanager
    def client(self):
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.api, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}), \
                get_client(sync_client=True) as client:
            yield client

    def run(self, *overrides: str) -> dict:
        """The pipeline's flow in this process, against the cluster's server."""
        from flows.toss import toss_pipeline

        with self.client():
            return toss_pipeline(self.config(*overrides), [])

    def stage_runs(self) -> dict[str, list]:
        """Flow runs of each stage deployment, oldest first."""
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
        from prefect.client.schemas.sorting import FlowRunSort

        out = {}
        with self.client() as client:
            for name in ("toss-train-stage/toss-train-stage", "toss-score-stage/toss-score-stage"):
                deployment = client.read_deployment_by_name(name)
                out[name.split("/")[0]] = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                    sort=FlowRunSort.START_TIME_ASC)
        return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    home = tmp_path_factory.mktemp("stage-workers")
    store = home / "store"
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    # PostgreSQL where it is installed, as docs/deploy.md advises for several workers (SQLite logs
    # "database is locked" when both workers write at once); else SQLite.
    stack = Stack("postgresql", home)
    database = _start_postgres(stack) or f"sqlite+aiosqlite:///{home / 'prefect.db'}"
    env = _env(home, PREFECT_API_DATABASE_CONNECTION_URL=database, PREFECT_UI_ENABLED="false")
    server = stack.start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                          str(port)], "server.log", env=env, cwd=ROOT)
    workers: list[Proc] = []
    try:
        _wait(lambda: _healthy(api), 180, "Prefect server start", server)
        toss_deploy(home, api, {}, "--name", "toss-train-stage", "--name", "toss-score-stage", store=str(store))
        from flows.deploy_cmd import worker_commands

        for env_add, argv in worker_commands(list(GPUS), name="test"):  # exactly what `toss worker` starts
            label = f"gpu{env_add['CUDA_VISIBLE_DEVICES']}"
            workers.append(Proc(argv, home / f"worker-{label}.log", cwd=home, env=_env(
                home, PREFECT_API_URL=api, **env_add, TOSS_CACHE_DIR=str(home / f"cache-{label}"),
                PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="2", **{FAULT: SLOW_TRAINING})))
        cluster = Cluster(home, api, store, server, workers)

        def online() -> bool:  # both polling, so the two reference trainings can start together
            with cluster.client() as client:
                return sum(w.status.value == "ONLINE" for w in client.read_workers_for_work_pool("gpu")) == len(GPUS)

        _wait(online, 120, "two online workers", workers[0])
        yield cluster
    finally:
        for proc in workers:
            proc.stop()
        stack.close()  # this process's queued events, then the server, then the database


def _metrics(store: ArtifactStore, artifact: dict | str) -> dict:
    stage, key = (artifact["stage"], artifact["key"]) if isinstance(artifact, dict) else artifact.split("/")[-2:]
    return store.manifest(stage, key).metrics


def _rows(out: dict) -> dict[str, dict]:
    return {r["stage"]: r for r in out["stages"]}


@pytest.fixture(scope="module")
def first_run(cluster):
    before = cluster.stage_runs()
    assert before == {"toss-train-stage": [], "toss-score-stage": []}
    out = cluster.run()
    return out, cluster.stage_runs()


def test_reference_trainings_run_on_two_workers_at_once(cluster, first_run):
    out, runs = first_run
    rows = _rows(out)
    assert {r["status"] for r in rows.values()} == {"computed"}
    store = ArtifactStore(str(cluster.store))
    safety, utility = (_metrics(store, rows[f"train {role}"]["artifact"]) for role in ("safety", "utility"))
    # Different worker processes, each on its own GPU, none of them this process.
    assert safety["pid"] != utility["pid"] and os.getpid() not in (safety["pid"], utility["pid"])
    assert {safety["cuda_visible_devices"], utility["cuda_visible_devices"]} == set(GPUS)
    # At the same time: each started before the other finished (ISO-8601 UTC strings of one format).
    assert safety["started_at"] < utility["finished_at"] and utility["started_at"] < safety["finished_at"], \
        (safety, utility)

    # The rest of the DAG: every score shard on a worker, the mask here, the final adapter on a worker.
    for label, row in rows.items():
        metrics = _metrics(store, row["artifact"])
        on_worker = label.startswith(("train", "score"))
        assert (metrics["pid"] != os.getpid()) == on_worker, (label, metrics)
        assert not on_worker or metrics["cuda_visible_devices"] in GPUS, (label, metrics)
    final = store.manifest("train", out["finetune"]["key"])
    assert final is not None and final.metrics["role"] == "finetune"
    assert out["finetune"]["uri"] == rows["train finetune"]["artifact"]

    # One flow run per stage, completed, named after the stage, a subflow of this run's task.
    assert sorted(r.name for r in runs["toss-train-stage"]) == ["train finetune", "train safety", "train utility"]
    assert sorted(r.name for r in runs["toss-score-stage"]) == ["score safety 1/1", "score utility 1/1"]
    for run in runs["toss-train-stage"] + runs["toss-score-stage"]:
        assert run.state.is_completed() and run.parent_task_run_id is not None, run


def test_rerun_dispatches_nothing(cluster, first_run):
    out, runs = first_run
    again = cluster.run()
    assert {r["status"] for r in again["stages"]} == {"reused"}
    assert again["finetune"] == out["finetune"] and again["mask"] == out["mask"]
    after = cluster.stage_runs()
    assert {k: [r.id for r in v] for k, v in after.items()} == {k: [r.id for r in v] for k, v in runs.items()}


def _finetune_key(store: ArtifactStore, out: dict, cfg) -> str:
    """The artifact key of the fine-tune `cfg` trains after the run `out` (same inputs, its own recipe)."""
    rows = _rows(out)
    model = store.ref(*rows["base model"]["artifact"].split("/")[-2:])
    custom = store.ref(*rows["prepare custom"]["artifact"].split("/")[-2:])
    mask = store.ref(out["mask"]["stage"], out["mask"]["key"])
    sources = [TrainSource(tokens=custom, mask=mask, labels="keep")]
    return train_plan("finetune", model, sources, cfg.finetune, cfg.model.dtype).key


def test_killed_training_resumes_from_its_checkpoint_on_rerun(cluster, first_run):
    out, _ = first_run
    store = ArtifactStore(str(cluster.store))
    overrides = (f"finetune.checkpoint_every={CRASH_CHECKPOINT_EVERY}",)
    key = _finetune_key(store, out, cluster.config(*overrides))
    checkpoints = cluster.store / "_checkpoints" / "train" / key
    trained_before = len(cluster.stage_runs()["toss-train-stage"])

    # The run as a user starts it: `toss run ... --set orchestration.dispatch=workers` against the server.
    argv = [sys.executable, "-m", "flows.cli", "run", str(QUICK), "--store", str(cluster.store),
            *(a for o in (*OVERRIDES, *overrides) for a in ("--set", o))]
    cli = Proc(argv, cluster.home / "toss-run-killed.log", env=_env(cluster.home, PREFECT_API_URL=cluster.api),
               cwd=ROOT)
    try:
        _wait(lambda: list(checkpoints.glob("step-*/COMPLETE")), 240, "a fine-tune checkpoint", cli)

        def running_finetune():
            runs = cluster.stage_runs()["toss-train-stage"][trained_before:]
            return next((r for r in runs if r.name == "train finetune" and r.infrastructure_pid), None)

        victim = _wait(running_finetune, 30, "the fine-tune's flow run")
        pid = int(str(victim.infrastructure_pid).rsplit(":", 1)[-1])  # the worker's flow-run process
        assert f"PREFECT__FLOW_RUN_ID={victim.id}".encode() in Path(f"/proc/{pid}/environ").read_bytes()
        os.kill(pid, signal.SIGKILL)
        assert cli.p.wait(timeout=120) != 0
    finally:
        cli.stop()
    log = " ".join(cli.log_path.read_text(errors="replace").split())  # the CLI's error line is wrapped
    assert "StageRunError" in log and f"stage 'train finetune': flow run 'train finetune' ({victim.id})" in log, \
        log[-3000:]
    assert "ended Crashed" in log, log[-3000:]
    with cluster.client() as client:
        assert client.read_flow_run(victim.id).state.is_crashed()
    assert all(w.alive() for w in cluster.workers)  # a worker outlives its flow run's process
    assert not store.exists("train", key)
    saved = sorted(int(p.parent.name.removeprefix("step-")) for p in checkpoints.glob("step-*/COMPLETE"))
    assert saved and saved[-1] > 0

    # The rerun: only the fine-tune runs, as ONE new flow run, from the newest checkpoint, to the end.
    rerun = cluster.run(*overrides)
    assert [r["stage"] for r in rerun["stages"] if r["status"] == "computed"] == ["train finetune"]
    new = cluster.stage_runs()["toss-train-stage"][trained_before:]
    assert [r.name for r in new] == ["train finetune", "train finetune"] and new[-1].state.is_completed()
    metrics = _metrics(store, rerun["finetune"])
    assert rerun["finetune"]["key"] == key and metrics["resumed_from_step"] == saved[-1]
    assert metrics["pid"] != pid and metrics["steps"] > saved[-1]


def test_a_missing_stage_deployment_fails_before_any_stage(cluster, first_run):
    from tasks.dispatch import StageRunError

    def ids():
        return {k: [r.id for r in v] for k, v in cluster.stage_runs().items()}

    def masks():
        return sorted(p.parent.name for p in (cluster.store / "mask").glob("*/MANIFEST.json"))

    runs, made = ids(), masks()
    with pytest.raises(StageRunError, match=r"has no deployment 'toss-train-stage/elsewhere'.*toss deploy"):
        cluster.run("orchestration.train_deployment=toss-train-stage/elsewhere", "select.ratio=0.3")
    assert ids() == runs and masks() == made  # nothing started, not even the CPU stages of the new ratio
