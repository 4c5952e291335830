"""Team deployment: deploy/prefect.yaml against a real `prefect server start` and a real process worker.

What a team does, step by step: start the server (SQLite for one box, PostgreSQL for a team), `toss
deploy` (work pools, result storage, deploy/prefect.yaml), start a worker, press Run on the `toss-quick`
deployment, watch a stage fail, press Retry. The store is S3 (moto on 127.0.0.1), shared by both
servers; the flow's result is read back from it. Every process started here is stopped by its own id
(its process group, so a worker's flow-run subprocesses go with it).

Then static checks that need no server: prefect.yaml against the repository's configs and flows, the
worker commands and deploy/start-gpu-workers.sh, the Kubernetes job template, and docker-compose.yml
against deploy/.env.example and docs/deploy.md. Only a missing binary skips anything (PostgreSQL's).
"""

from __future__ import annotations

import ast
import contextlib
import glob
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

pytest.importorskip("prefect")

ROOT = Path(__file__).parents[1]
DEPLOY = ROOT / "deploy"
BUCKET = "toss-deploy"
STORE = f"s3://{BUCKET}/team"
SELECT = "select round 0"


# ---- processes -------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A background process in its own session, logging to a file, stopped by its process-group id."""

    def __init__(self, argv, log: Path, env=None, cwd=None, user: str | None = None):
        self.log_path = log
        self.log = open(log, "ab")  # noqa: SIM115 (closed in stop)
        preexec = None
        if user is not None:
            pw = pwd.getpwnam(user)

            def preexec():  # PostgreSQL refuses to run as root
                os.setgid(pw.pw_gid)
                os.setuid(pw.pw_uid)
        self.p = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                  start_new_session=True, preexec_fn=preexec)  # noqa: PLW1509

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout: float = 20) -> None:
        if self.log.closed:
            return
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.p.pid, sig)
            try:
                self.p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        # Whatever is left of its group (a flow run of a dead worker) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.p.pid, signal.SIGKILL)
        self.log.close()

    def tail(self, n: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]


WORKERS: list[Proc] = []


@pytest.fixture(autouse=True)
def _stop_workers():
    """Workers a failing test left running are stopped (by their ids) before its server goes."""
    yield
    while WORKERS:
        WORKERS.pop().stop()


def _wait(predicate, timeout: float, what: str, proc: Proc | None = None, every: float = 0.3):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and not proc.alive():
            raise AssertionError(f"{what}: process exited\n{proc.tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: timed out" + (f"\n{proc.tail()}" if proc else ""))
        time.sleep(every)


def _healthy(api: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def _env(home: Path, **extra) -> dict:
    """A clean environment: no PREFECT_*/TOSS_*/AWS_* of the caller leak into servers and workers."""
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "TOSS_", "AWS_"))}
    return {**env, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT), **extra}


# ---- fixtures: S3, PostgreSQL, a Prefect server ----------------------------------------------------

@pytest.fixture(scope="module")
def s3():
    """moto's S3 on 127.0.0.1; returns the AWS_* environment every process (and the worker's runs) needs."""
    pytest.importorskip("moto")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    mp = pytest.MonkeyPatch()  # this process reads flow results from the bucket too
    for k, v in env.items():
        mp.setenv(k, v)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield env
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        mp.undo()
        server.stop()


def _pg_bin(name: str) -> str | None:
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return shutil.which(name) or (candidates[-1] if candidates else None)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


class Stack:
    """A Prefect server with `toss deploy` applied, for one database; brought up in the background."""

    def __init__(self, name: str, home: Path):
        self.name, self.home, self.api = name, home, None
        self.procs: list[Proc] = []
        self.skip: str | None = None
        self.scratch: Path | None = None

    def start(self, argv, log: str, **kw) -> Proc:
        self.procs.append(Proc(argv, self.home / log, **kw))
        return self.procs[-1]

    def close(self) -> None:
        _drain_prefect_events()  # this process's queued events go before the server does
        for proc in reversed(self.procs):  # the server, then the database
            proc.stop(signal.SIGINT if proc.p.args[0].endswith("postgres") else signal.SIGTERM)
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)


def _start_postgres(stack: Stack) -> str | None:
    """A throw-away PostgreSQL on 127.0.0.1 (initdb in a temp dir, as `postgres`/nobody when root).
    Returns its SQLAlchemy URL, or None (and the reason in stack.skip) when it cannot run here."""
    initdb, postgres_bin = _pg_bin("initdb"), _pg_bin("postgres")
    if not (initdb and postgres_bin):
        stack.skip = "PostgreSQL binaries (initdb, postgres) not found: apt-get install postgresql"
        return None
    try:
        import asyncpg  # noqa: F401 (Prefect's PostgreSQL driver)
    except ImportError:
        stack.skip = "asyncpg is not installed"
        return None
    user = None
    if os.geteuid() == 0:  # initdb refuses to run as root
        user = next((u for u in ("postgres", "nobody") if _user_exists(u)), None)
        if user is None:
            stack.skip = "running as root and no unprivileged user to run PostgreSQL"
            return None
    stack.scratch = base = Path(tempfile.mkdtemp(prefix="toss-pg-"))
    if user:
        os.chown(base, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
    init = Proc([initdb, "-D", str(base / "data"), "-U", "prefect", "--auth=trust", "-E", "UTF8", "--no-sync"],
                stack.home / "initdb.log", user=user)
    assert init.p.wait(timeout=120) == 0, init.tail()
    init.stop()
    port = _free_port()
    pg = stack.start([postgres_bin, "-D", str(base / "data"), "-p", str(port), "-k", str(base),
                      "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
                      "-c", "full_page_writes=off"], "postgres.log", user=user)
    _wait(lambda: "ready to accept connections" in pg.tail(100000), 60, "PostgreSQL start", pg)
    return f"postgresql+asyncpg://prefect@127.0.0.1:{port}/postgres"


def _bring_up(stack: Stack, s3: dict) -> Stack:
    """Database, server, `toss deploy`. SQLite: plain `prefect server start`, every deployment.
    PostgreSQL (the team setup): `toss server --database postgresql+asyncpg://...`, toss-quick only."""
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    if stack.name == "sqlite":
        database = f"sqlite+aiosqlite:///{stack.home / 'prefect.db'}"
        argv = ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        only = []
    else:
        database = _start_postgres(stack)
        if database is None:
            return stack
        argv = ["flows.deploy_cmd", "server", "--host", "127.0.0.1", "--port", str(port), "--database", database]
        only = ["--name", "toss-quick"]
    env = _env(stack.home, PREFECT_API_DATABASE_CONNECTION_URL=database, PREFECT_UI_ENABLED="false")
    server = stack.start([sys.executable, "-m", *argv], "server.log", env=env, cwd=ROOT)
    _wait(lambda: _healthy(api), 180, f"Prefect server start ({stack.name})", server)
    toss_deploy(stack.home, api, s3, *only)
    stack.api = api
    return stack


STACK_TESTS = {"sqlite": "test_single_box_sqlite_run_fail_retry", "postgresql": "test_team_postgresql_fail_retry"}


@pytest.fixture(scope="module")
def stacks(request, s3, tmp_path_factory):
    """The servers of the selected tests come up at once, each deployed, in the background: the
    PostgreSQL one gets ready while the SQLite test runs (about a minute less in all)."""
    selected = {item.name for item in request.session.items}
    made = {name: Stack(name, tmp_path_factory.mktemp(f"home-{name}")) for name, test in STACK_TESTS.items()
            if test in selected}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_bring_up, stack, s3) for name, stack in made.items()}
        try:
            yield futures
        finally:
            for future in futures.values():
                with contextlib.suppress(Exception):
                    future.result()  # wait for a bring-up still in progress before stopping anything
            for stack in made.values():
                stack.close()


def _stack(stacks, name: str) -> Stack:
    stack = stacks[name].result(timeout=600)
    if stack.skip:
        pytest.skip(stack.skip)
    return stack


def _drain_prefect_events() -> None:
    """Send this process's queued Prefect events and logs while the server is still there."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=10)


@contextlib.contextmanager
def api_client(api: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        yield client
        _drain_prefect_events()


def toss_deploy(home: Path, api: str, s3: dict, *args: str, store: str = STORE) -> None:
    """`toss deploy` as a team member runs it (python -m flows.deploy_cmd = the registered command)."""
    done = subprocess.run([sys.executable, "-m", "flows.deploy_cmd", "deploy", "--store", store, "--create-bucket",
                           *args], cwd=ROOT, env=_env(home, PREFECT_API_URL=api, **s3), capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def start_worker(home: Path, api: str, s3: dict, label: str, **extra: str) -> Proc:
    """One worker exactly as `toss worker` starts it on a machine without GPUs (pool gpu, queue toss)."""
    from flows.deploy_cmd import worker_commands

    (env_add, argv), = worker_commands([], name=f"test-{label}")
    env = _env(home, PREFECT_API_URL=api, **s3, **env_add, TOSS_CACHE_DIR=str(home / f"cache-{label}"),
               PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="2", **extra)
    WORKERS.append(Proc(argv, home / f"worker-{label}.log", env=env, cwd=home))
    return WORKERS[-1]


def wait_final(client, flow_run_id, worker: Proc, after=None, timeout: float = 300):
    def final():
        state = client.read_flow_run(flow_run_id).state
        return state if state and state.is_final() and state.id != after else None

    return _wait(final, timeout, f"flow run {flow_run_id}", worker, every=0.5)


def retry_from_ui(client, flow_run_id) -> None:
    """What the UI's Retry button sends: POST /flow_runs/{id}/set_state, Scheduled named AwaitingRetry."""
    from prefect.states import State, StateType

    result = client.set_flow_run_state(flow_run_id, State(type=StateType.SCHEDULED, name="AwaitingRetry",
                                                          message="Retry from the UI"), force=False)
    assert result.status.value == "ACCEPT", result


def task_states(client, flow_run_id) -> dict[str, str]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r.state.name for r in runs if r.state}


def wait_taken(client, flow_run_id, worker: Proc, timeout: float = 120) -> None:
    """Until a worker has taken the run (Pending, Running or already final)."""
    def taken():
        state = client.read_flow_run(flow_run_id).state
        return state is not None and not state.is_scheduled()

    _wait(taken, timeout, f"flow run {flow_run_id} picked up", worker, every=0.5)


def fail_then_retry(client, deployment, home, api, s3, faulty: Proc | None = None) -> dict[str, str]:
    """A run forced to recompute `select` fails on a worker whose select stage breaks
    (TOSS_INJECT_FAULT=mask); Retry from the UI runs it again on a healthy worker. Returns the stages'
    statuses of the retried run, read from the flow's result in the store. The next worker always
    starts while a run is already taken, so its start-up overlaps the run and no two workers compete."""
    from toss_core.faults import ENV as FAULT

    faulty = faulty or start_worker(home, api, s3, "faulty", **{FAULT: "mask"})
    run = client.create_flow_run_from_deployment(deployment.id, parameters={"force": ["select"]})
    wait_taken(client, run.id, faulty)
    healthy = start_worker(home, api, s3, "healthy")  # idle until the retry
    failed = wait_final(client, run.id, faulty)
    faulty.stop()
    assert failed.is_failed(), failed
    assert task_states(client, run.id)[SELECT] == "Failed"
    retry_from_ui(client, run.id)
    done = wait_final(client, run.id, healthy, after=failed.id)
    healthy.stop()
    assert done.is_completed(), done
    assert client.read_flow_run(run.id).run_count == 2  # the same flow run, retried
    out = done.result()  # persisted in the store by the deployment's default result storage
    assert {r["stage"] for r in out["stages"]} >= {SELECT, "train finetune", "train safety", "train utility"}
    return {r["stage"]: r["status"] for r in out["stages"]}


# ---- the integration tests -------------------------------------------------------------------------

def test_single_box_sqlite_run_fail_retry(stacks, s3):
    """`prefect server start` on SQLite: deploy everything, Run toss-quick, fail a run, Retry it."""
    stack = _stack(stacks, "sqlite")
    home, api = stack.home, stack.api
    with api_client(api) as client:
        deployments = {d.name: d for d in client.read_deployments()}
        assert set(deployments) == {"toss-quick", "toss", "toss-pro", "toss-demo", "toss-train-stage",
                                    "toss-score-stage"}
        for name in STAGE_FLOWS.values():  # the stage deployments, as the config names them
            stage = client.read_deployment_by_name(name)
            assert (stage.work_pool_name, stage.work_queue_name) == ("gpu", "toss") and stage.enforce_parameter_schema
        # the demo's form is its own DemoConfig (model source, data sizes, aligned base, the pipeline on top)
        assert deployments["toss-demo"].parameter_openapi_schema["properties"]["config"]["$ref"].endswith("/DemoConfig")
        quick = deployments["toss-quick"]
        assert (quick.work_pool_name, quick.work_queue_name) == ("gpu", "toss")
        assert quick.parameters["config"]["store"]["url"] == STORE
        assert quick.job_variables["env"]["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] == "remote-file-system/toss-results"
        assert quick.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $TOSS_PROJECT_DIR }}"}}]
        # The UI's form: the PipelineConfig schema, enforced when a run is created.
        assert quick.parameter_openapi_schema["properties"]["config"]["$ref"].endswith("/PipelineConfig")
        assert quick.enforce_parameter_schema
        assert [s.active for s in quick.schedules] == [False]
        assert quick.global_concurrency_limit.limit == 1
        assert quick.concurrency_options.collision_strategy.value == "ENQUEUE"
        bad = json.loads(json.dumps(quick.parameters))
        bad["config"]["select"]["ratio"] = 2
        with pytest.raises(Exception, match="(?i)validation"):
            client.create_flow_run_from_deployment(quick.id, parameters=bad)

        # The Kubernetes job template is accepted by the server as a work pool's template.
        from flows.deploy_cmd import ensure_work_pools

        assert ensure_work_pools({"k8s-gpu": {"toss"}}, "kubernetes") == [
            "kubernetes work pool k8s-gpu", "work queue k8s-gpu/toss"]
        assert client.read_work_pool("k8s-gpu").base_job_template["variables"]["properties"]["gpus"]["default"] == 1

        # Run (the UI's quick run: the deployment's own parameters).
        from toss_core.faults import ENV as FAULT

        worker = start_worker(home, api, s3, "first")
        run = client.create_flow_run_from_deployment(quick.id)
        wait_taken(client, run.id, worker)
        faulty = start_worker(home, api, s3, "faulty", **{FAULT: "mask"})  # idle until run 2 exists
        state = wait_final(client, run.id, worker)
        worker.stop()
        assert state.is_completed(), state
        first = {r["stage"]: r["status"] for r in state.result()["stages"]}
        assert {SELECT, "train finetune", "score safety 2/2"} <= set(first)
        assert set(first.values()) == {"computed"}  # a fresh bucket: everything ran, on the worker

        statuses = fail_then_retry(client, quick, home, api, s3, faulty=faulty)
    # Only the failed stage ran again; everything finished before was reused (the fine-tune too: the
    # recomputed mask has the same key).
    assert [s for s, v in statuses.items() if v == "computed"] == [SELECT], statuses


def test_team_postgresql_fail_retry(stacks, s3):
    """`toss server --database postgresql+asyncpg://...` (the team setup): a run fails, Retry resumes it."""
    stack = _stack(stacks, "postgresql")
    home, api = stack.home, stack.api
    with api_client(api) as client:
        quick = client.read_deployment_by_name("toss/toss-quick")
        statuses = fail_then_retry(client, quick, home, api, s3)
    # Whatever ran before the failure (or, with the SQLite test first, on the other server) is reused.
    computed = [s for s, v in statuses.items() if v == "computed"]
    assert SELECT in computed and set(computed) <= {SELECT, "train finetune"}, statuses
    assert all(v == "reused" for s, v in statuses.items() if s.startswith(("prepare", "train s", "train u", "score")))


# ---- prefect.yaml against the repository -----------------------------------------------------------

def _prefect_yaml() -> dict:
    return yaml.safe_load((DEPLOY / "prefect.yaml").read_text())


def _deployments() -> dict[str, dict]:
    return {d["name"]: d for d in _prefect_yaml()["deployments"]}


def _as_config(params: dict, store: str = "./store"):
    from toss_core.config import PipelineConfig

    raw = json.loads(json.dumps(params["config"]).replace("{{ $TOSS_STORE_URL }}", store))
    return PipelineConfig.model_validate(raw)


def test_deployment_defaults_are_the_repository_configs():
    from toss_core.config import load_config
    from toss_core.demo.config import load_demo_config

    deps = _deployments()
    quick = _as_config(deps["toss-quick"]["parameters"])
    # prefect.yaml's data paths are relative to the worker's project dir; load_config makes them absolute.
    quick.data = quick.data.model_copy(update={k: str(ROOT / getattr(quick.data, k))
                                               for k in ("custom", "harmful", "utility")})
    assert quick == load_config(ROOT / "configs" / "quick.yaml", ["store.url=./store"])
    for name in ("toss", "toss-pro"):
        paper = _as_config(deps[name]["parameters"])
        assert paper == load_config(ROOT / "configs" / "paper-llama3-8b.yaml", ["store.url=./store"])
    assert _as_demo_config(deps["toss-demo"]["parameters"]) == load_demo_config(ROOT / "configs" / "demo.yaml")


def _as_demo_config(params: dict, store: str = "./store"):
    from toss_core.demo.config import DemoConfig

    raw = json.loads(json.dumps(params["config"]).replace("{{ $TOSS_STORE_URL }}", store))
    return DemoConfig.model_validate(raw)


def test_every_deployment_is_consistent_with_the_flows_and_the_workers():
    from flows.deploy_cmd import DEFAULT_POOL, DEFAULT_QUEUE, pools_in
    from toss_core.demo.run import DEMO_STEPS
    from toss_core.pipeline import STEPS

    spec = _prefect_yaml()
    assert spec["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $TOSS_PROJECT_DIR }}"}}]
    assert pools_in(DEPLOY / "prefect.yaml") == {DEFAULT_POOL: {DEFAULT_QUEUE}}  # what `toss worker` polls
    flows = {f for path in (ROOT / "flows").glob("*.py") for f in _top_level_flows(path)}
    deployed = set()
    for d in spec["deployments"]:
        path, func = d["entrypoint"].split(":")
        assert func in _top_level_flows(ROOT / path), d["entrypoint"]
        deployed.add(func)
        assert d["enforce_parameter_schema"] is True
        assert "toss" in d["tags"]
        assert d["work_pool"]["job_variables"]["env"]["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] == "true"
        if func in STAGE_FLOWS:  # started per stage by a run's flow: named as the config expects, no defaults
            assert f"{_flow_name(ROOT / path, func)}/{d['name']}" == STAGE_FLOWS[func]
            assert "parameters" not in d and "schedules" not in d, d["name"]
            continue
        if func == "toss_demo":  # the demo's own config (a DemoConfig) and its extra steps
            assert set(d["parameters"]) == {"config", "force", "pro"}
            assert set(d["parameters"]["force"]) <= set(DEMO_STEPS + STEPS)
            _as_demo_config(d["parameters"])
        else:
            assert set(d["parameters"]) == {"config", "force"} and set(d["parameters"]["force"]) <= set(STEPS)
            _as_config(d["parameters"])  # a valid PipelineConfig
        assert d["concurrency_limit"]["limit"] >= 1 and d["concurrency_limit"]["collision_strategy"] == "ENQUEUE"
        assert all(s.get("active") is False for s in d.get("schedules", []))
    # Every flow is deployed, except subflows fed with another flow's artifacts.
    assert deployed == flows - SUBFLOWS, flows - SUBFLOWS - deployed
    assert any(d.get("schedules") for d in spec["deployments"])


SUBFLOWS = {"pro_round",  # flows/toss.py: a TOSS-Pro round, inside toss_pro
            "evaluate"}  # flows/evaluate.py: takes the pipeline's ArtifactRefs; run toss with eval.enabled


def _stage_flows() -> dict[str, str]:
    """flows/stage_flows.py's flows -> the "flow/deployment" name the config's defaults start them by."""
    from toss_core.config import OrchestrationConfig

    orch = OrchestrationConfig()
    return {"toss_train_stage": orch.train_deployment, "toss_score_stage": orch.score_deployment}


STAGE_FLOWS = _stage_flows()


def _flow_decorators(path: Path) -> dict[str, ast.Call]:
    tree = ast.parse(path.read_text())
    return {n.name: dec for n in tree.body if isinstance(n, ast.FunctionDef) for dec in n.decorator_list
            if isinstance(dec, ast.Call) and getattr(dec.func, "id", "") == "flow"}


def _top_level_flows(path: Path) -> list[str]:
    return list(_flow_decorators(path))


def _flow_name(path: Path, func: str) -> str:
    names = [k.value.value for k in _flow_decorators(path)[func].keywords if k.arg == "name"]
    return names[0] if names else func.replace("_", "-")


# ---- workers ---------------------------------------------------------------------------------------

def test_worker_commands_one_per_gpu_or_one_cpu_worker(monkeypatch):
    from flows import deploy_cmd

    cmds = deploy_cmd.worker_commands(["0", "3"], name="box", project_dir="/srv/toss")
    assert [env["CUDA_VISIBLE_DEVICES"] for env, _ in cmds] == ["0", "3"]
    for env, argv in cmds:
        assert argv[1:5] == ["-m", "prefect", "worker", "start"]
        opts = dict(zip(argv[5::2], argv[6::2]))
        assert opts == {"--pool": "gpu", "--work-queue": "toss", "--type": "process", "--limit": "1",
                        "--name": f"box-gpu{env['CUDA_VISIBLE_DEVICES']}"}
        assert env["TOSS_PROJECT_DIR"] == "/srv/toss"
    (env, argv), = deploy_cmd.worker_commands([], name="box")
    assert env["CUDA_VISIBLE_DEVICES"] == "" and argv[-1] == "box-cpu"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert deploy_cmd.visible_gpus() == ["2", "5"]


def test_toss_worker_stops_every_worker_together():
    """`toss worker` in the foreground: SIGTERM stops all its workers (exit 0); one worker dying stops the
    others and fails (so a supervisor restarts the set). Stand-in workers: sleeping Python processes."""
    code = ("import sys; from flows.deploy_cmd import run_workers; sleep = [sys.executable, '-c', "
            "'import time; time.sleep(60)']; die = [sys.executable, '-c', 'raise SystemExit(3)']; "
            "sys.exit(run_workers([({}, sleep), ({}, die if sys.argv[1] == 'die' else sleep)]))")
    died = subprocess.run([sys.executable, "-c", code, "die"], cwd=ROOT, timeout=60, check=False)
    assert died.returncode == 3
    proc = subprocess.Popen([sys.executable, "-c", code, "stay"], cwd=ROOT, start_new_session=True)
    try:
        time.sleep(2)  # both workers started
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_start_gpu_workers_script(tmp_path):
    script = DEPLOY / "start-gpu-workers.sh"
    assert os.access(script, os.X_OK)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "TOSS_GPUS")}
    dry = subprocess.run([str(script)], env={**env, "DRY_RUN": "1", "TOSS_GPUS": "0 1", "TOSS_WORKER_NAME": "box"},
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert dry == [f"CUDA_VISIBLE_DEVICES={g} TOSS_PROJECT_DIR={ROOT} prefect worker start --pool gpu --work-queue "
                   f"toss --type process --limit 1 --name box-gpu{g}" for g in (0, 1)]
    # No GPU: a clear error, not a worker that would train on CPU.
    none = subprocess.run([str(script)], env={**env, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          check=False)
    assert none.returncode == 1 and "no GPU found" in none.stderr

    # The real thing with a stand-in `prefect`: one process per GPU, all stopped on SIGTERM.
    fake = tmp_path / "prefect"
    fake.write_text(f'#!/usr/bin/env bash\necho "$CUDA_VISIBLE_DEVICES $*" >> {tmp_path}/started\nexec sleep 60\n')
    fake.chmod(0o755)
    proc = subprocess.Popen([str(script)], env={**env, "PREFECT": str(fake), "CUDA_VISIBLE_DEVICES": "4,7",
                                                "PREFECT_API_URL": "http://x/api"},
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait(lambda: (tmp_path / "started").exists()
              and len((tmp_path / "started").read_text().splitlines()) == 2, 20, "workers start")
        proc.send_signal(signal.SIGTERM)  # by its pid
        assert proc.wait(timeout=20) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    started = sorted((tmp_path / "started").read_text().splitlines())
    assert [s.split()[0] for s in started] == ["4", "7"]
    assert all("--limit 1" in s and "--pool gpu --work-queue toss" in s for s in started)


def test_toss_deploy_renders_results_location_and_pool(tmp_path):
    from flows.deploy_cmd import (
        pools_in,
        render_prefect_file,
        results_env,
        results_location,
    )

    assert results_location("s3://team/toss/") == "s3://team/toss/_prefect_results"
    assert results_env("s3://team/toss") == {"PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": "remote-file-system/toss-results"}
    assert results_env("./store") == {"PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(ROOT / "store" / "_prefect_results")}
    assert results_location("/data/store") == "/data/store/_prefect_results"

    extra = results_env("s3://team/toss")
    moved = render_prefect_file(DEPLOY / "prefect.yaml", tmp_path, extra, pool="k8s-gpu")
    assert pools_in(moved) == {"k8s-gpu": {"toss"}}
    before, after = _deployments(), {d["name"]: d for d in yaml.safe_load(moved.read_text())["deployments"]}
    for name, d in before.items():
        pool = d["work_pool"]
        env = {**pool["job_variables"]["env"], **extra}
        assert after[name] == {**d, "work_pool": {**pool, "name": "k8s-gpu", "job_variables": {"env": env}}}
    kept = render_prefect_file(DEPLOY / "prefect.yaml", tmp_path, {})
    assert pools_in(kept) == {"gpu": {"toss"}}
    assert yaml.safe_load(kept.read_text())["pull"] == _prefect_yaml()["pull"]  # placeholders untouched


# ---- Kubernetes ------------------------------------------------------------------------------------

def test_k8s_job_template_declares_every_placeholder_and_requests_a_gpu():
    template = json.loads((DEPLOY / "k8s-job-template.json").read_text())
    text = json.dumps(template["job_configuration"])
    used = set(re.findall(r"\{\{\s*([a-z_]+)\s*\}\}", text))
    declared = set(template["variables"]["properties"])
    assert used <= declared, used - declared
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert container["envFrom"] == [{"secretRef": {"name": "{{ store_secret }}"}}]  # credentials from a Secret
    assert not re.search(r"(?i)(password|secret_access_key)\"?\s*:\s*\"[^{]", json.dumps(template))


# ---- the team stack: docker-compose.yml, .env.example, docs ----------------------------------------

def _compose() -> tuple[dict, str]:
    text = (DEPLOY / "docker-compose.yml").read_text()
    return yaml.safe_load(text), text


def _env_example() -> dict[str, str]:
    lines = (DEPLOY / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def _env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    return dict(e.split("=", 1) for e in env) if isinstance(env, list) else {k: str(v) for k, v in env.items()}


def test_compose_services_images_and_builds():
    compose, _ = _compose()
    services = compose["services"]
    assert set(services) == {"postgres", "prefect-server", "minio", "deploy", "gpu-worker"}
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            context = (DEPLOY / svc["build"]["context"]).resolve()
            assert context == ROOT and (context / svc["build"]["dockerfile"]).is_file(), name
        elif ":" in svc["image"]:
            assert not svc["image"].endswith(":latest"), f"{name}: pin the image"
        for dep in svc.get("depends_on", {}):
            assert dep in services, (name, dep)
    # Workers (the image) run the server's Prefect version: clients must not be newer than the server.
    server_version = re.fullmatch(r"prefecthq/prefect:(\d+\.\d+\.\d+)-python3\.\d+",
                                  services["prefect-server"]["image"]).group(1)
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"ARG PREFECT_VERSION={server_version}\n" in dockerfile and '"prefect==${PREFECT_VERSION}"' in dockerfile
    worker = services["gpu-worker"]
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert worker["command"] == ["deploy/start-gpu-workers.sh"]
    assert services["deploy"]["command"][:4] == ["python", "-m", "flows.deploy_cmd", "deploy"]

    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:", dockerfile, re.MULTILINE) and "torch" in dockerfile
    assert 'CMD ["deploy/start-gpu-workers.sh"]' in dockerfile
    assert "TOSS_PROJECT_DIR=/opt/toss" in dockerfile and "WORKDIR /opt/toss" in dockerfile
    for copied in re.findall(r"^COPY (\S+)", dockerfile, re.MULTILINE):
        assert (ROOT / copied).exists(), copied


def test_compose_env_ports_and_volumes_match_env_example_and_docs():
    compose, text = _compose()
    services = compose["services"]
    example = _env_example()
    docs = (ROOT / "docs" / "deploy.md").read_text()

    # Every ${VAR} the stack reads is in .env.example, and .env.example holds nothing unused.
    referenced = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    assert referenced == set(example), (referenced ^ set(example))
    # Secrets only from the environment: no literal password or key anywhere in the compose file.
    for name, svc in services.items():
        for key, value in _env_of(svc).items():
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY|API_KEY", key):
                assert value.startswith("${"), (name, key)
    assert "${POSTGRES_PASSWORD" in _env_of(services["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"]

    # The server's database is the postgres service, with its user and database.
    pg = _env_of(services["postgres"])
    db_url = _env_of(services["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert db_url.startswith(f"postgresql+asyncpg://{pg['POSTGRES_USER']}:") and db_url.endswith(
        f"@postgres:5432/{pg['POSTGRES_DB']}")
    # Workers reach the server and the store by service name and container port.
    server_port = services["prefect-server"]["command"][services["prefect-server"]["command"].index("--port") + 1]
    for name in ("deploy", "gpu-worker"):
        env = _env_of(services[name])
        assert env["PREFECT_API_URL"] == f"http://prefect-server:{server_port}/api"
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
        assert env["AWS_ACCESS_KEY_ID"].startswith("${AWS_ACCESS_KEY_ID")
    minio = _env_of(services["minio"])
    assert minio["MINIO_ROOT_USER"].startswith("${AWS_ACCESS_KEY_ID") and \
        minio["MINIO_ROOT_PASSWORD"].startswith("${AWS_SECRET_ACCESS_KEY")
    assert example["TOSS_STORE_URL"].startswith("s3://")
    assert "TOSS_STORE_URL" in _env_of(services["deploy"])

    # Published ports: the container side is what the service listens on; each is in the docs.
    published = {name: [p.rsplit(":", 1)[1] for p in svc.get("ports", [])] for name, svc in services.items()}
    assert published == {"postgres": [], "prefect-server": [server_port], "minio": ["9000", "9001"], "deploy": [],
                         "gpu-worker": []}
    assert ":9001" in services["minio"]["command"]
    for port in ("4200", "9000", "9001"):
        assert port in docs, port

    # Volumes: named ones declared; the worker's mounts are where the configs and the image expect them.
    def parse(volume: str) -> tuple[str, str]:  # "source:target[:mode]"; a source may be ${VAR:?message}
        source, target = re.fullmatch(r"(\$\{[^}]*\}|[^:]+):([^:]+)(?::ro|:rw)?", volume).groups()
        return source, target

    named = {parse(v)[0] for svc in services.values() for v in svc.get("volumes", []) if not v.startswith("$")}
    assert named == set(compose["volumes"])
    mounts = {parse(v)[1]: parse(v)[0] for v in services["gpu-worker"]["volumes"]}
    assert mounts["/home/toss/.cache"] == "toss-cache"
    assert mounts["/models"].startswith("${TOSS_MODELS_DIR") and mounts["/data"].startswith("${TOSS_DATA_DIR")
    paper = _deployments()["toss"]["parameters"]["config"]
    assert paper["model"]["path"].startswith("/models/")
    assert all(paper["data"][k].startswith("/data/") for k in ("custom", "harmful", "utility"))

    # The docs name every service and every setting of .env.example.
    for name in services:
        assert f"`{name}`" in docs, name
    for var in example:
        assert var in docs, var


def test_compose_file_is_valid_for_docker_compose(tmp_path):
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode:
        pytest.skip("docker compose is not installed")
    env_file = tmp_path / ".env"
    env_file.write_text((DEPLOY / ".env.example").read_text())
    subprocess.run([docker, "compose", "--env-file", str(env_file), "-f", str(DEPLOY / "docker-compose.yml"),
                    "config", "-q"], check=True)
