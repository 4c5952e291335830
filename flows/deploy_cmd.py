"""`toss server`, `toss worker`, `toss deploy`: run TOSS as Prefect deployments (docs/deploy.md).

    toss server                                    # a Prefect server with the UI, in the foreground
    toss deploy --store s3://team-bucket/toss      # work pools + result storage + deploy/prefect.yaml
    toss worker                                    # one process worker per visible GPU (or one CPU worker)

Also runnable without the `toss` registration: `python -m flows.deploy_cmd server|worker|deploy`.
The server and the workers are plain `prefect server start` / `prefect worker start` processes; these
commands only choose their settings (the queue the deployments target, one worker per GPU with its own
CUDA_VISIBLE_DEVICES and --limit 1, the project directory the deployments' pull step needs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = ROOT / "deploy" / "prefect.yaml"
K8S_TEMPLATE = ROOT / "deploy" / "k8s-job-template.json"
RESULTS_BLOCK = "toss-results"  # remote-file-system/toss-results: the flows' default result storage
DEFAULT_POOL, DEFAULT_QUEUE = "gpu", "toss"
STORE_ENV, PROJECT_ENV = "TOSS_STORE_URL", "TOSS_PROJECT_DIR"

app = typer.Typer(help="Prefect server, workers and deployments for TOSS.", no_args_is_help=True,
                  pretty_exceptions_enable=False)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _quiet_env(**extra: str) -> dict[str, str]:
    # No network here or on many GPU nodes: no analytics calls from the server or the workers.
    return {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}


# ---- server ----------------------------------------------------------------------------------------

def server(
    host: Annotated[str, typer.Option(help="address to listen on; 0.0.0.0 to serve a team")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port of the API and the UI")] = 4200,
    database: Annotated[Optional[str], typer.Option(
        help="database URL, e.g. postgresql+asyncpg://prefect:PASSWORD@db:5432/prefect (default: "
             "PREFECT_API_DATABASE_CONNECTION_URL, else SQLite in PREFECT_HOME)")] = None,
) -> None:
    """Start a Prefect server with the UI in the foreground (Ctrl-C stops it).

    One user on one machine needs nothing else: `toss run` finds it on 127.0.0.1:4200. A team runs it
    on PostgreSQL (SQLite locks under several workers): see deploy/docker-compose.yml.
    """
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    extra = {"PREFECT_UI_API_URL": os.environ.get("PREFECT_UI_API_URL", f"http://{shown}:{port}/api")}
    if database:
        extra["PREFECT_API_DATABASE_CONNECTION_URL"] = database
    typer.echo(f"Prefect UI: http://{shown}:{port}  (API {extra['PREFECT_UI_API_URL']})", err=True)
    typer.echo(f"Point clients and workers at it: export PREFECT_API_URL=http://{shown}:{port}/api", err=True)
    argv = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    # Replace this process: Ctrl-C and `kill <pid>` reach the server itself.
    os.execve(sys.executable, argv, _quiet_env(**extra))


# ---- workers ---------------------------------------------------------------------------------------

def visible_gpus() -> list[str]:
    """GPU ids this machine offers: CUDA_VISIBLE_DEVICES if set, else `nvidia-smi` (no torch import)."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return [g.strip() for g in cvd.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=False)
        if out.returncode == 0:
            return [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return []


def worker_commands(gpus: list[str], pool: str = DEFAULT_POOL, queue: str = DEFAULT_QUEUE, limit: int = 1,
                    name: str | None = None, project_dir: str | Path | None = None) -> list[tuple[dict, list[str]]]:
    """(environment additions, argv) of each worker: one per GPU, or one CPU worker when `gpus` is empty."""
    host = name or socket.gethostname()
    project = str(project_dir or os.environ.get(PROJECT_ENV) or ROOT)
    base = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--work-queue", queue,
            "--type", "process", "--limit", str(limit)]
    if not gpus:
        # CUDA_VISIBLE_DEVICES="" hides any GPU: a CPU worker never grabs a device another worker owns.
        return [({"CUDA_VISIBLE_DEVICES": "", PROJECT_ENV: project}, [*base, "--name", f"{host}-cpu"])]
    return [({"CUDA_VISIBLE_DEVICES": g, PROJECT_ENV: project}, [*base, "--name", f"{host}-gpu{g}"]) for g in gpus]


def worker(
    pool: Annotated[str, typer.Option(help="work pool to poll (deploy/prefect.yaml's deployments use gpu)")] = DEFAULT_POOL,
    queue: Annotated[str, typer.Option(help="work queue the deployments target")] = DEFAULT_QUEUE,
    gpus: Annotated[Optional[str], typer.Option(help="GPU ids, e.g. 0,1,3 (default: every visible GPU)")] = None,
    cpu: Annotated[bool, typer.Option("--cpu", help="one CPU worker even when GPUs are visible")] = False,
    limit: Annotated[int, typer.Option(help="flow runs at once per worker; 1 = one run per GPU")] = 1,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the worker commands, start nothing")] = False,
) -> None:
    """Start one Prefect process worker per GPU (or one CPU worker), in the foreground.

    Each worker gets its own CUDA_VISIBLE_DEVICES and --limit 1 (one flow run per GPU) and polls the pool
    and queue of deploy/prefect.yaml. Ctrl-C stops them all. Needs PREFECT_API_URL (the team's server). Each flow run is a subprocess of its worker and
    inherits its environment: export the store's credentials (AWS_*) before starting.
    """
    ids = [] if cpu else ([g.strip() for g in gpus.split(",") if g.strip()] if gpus else visible_gpus())
    commands = worker_commands(ids, pool, queue, limit)
    for env, argv in commands:
        shown = [f"{k}={v!r}" if v == "" else f"{k}={v}" for k, v in env.items()]
        typer.echo(" ".join([*shown, "prefect", *argv[3:]]), err=True)  # argv: python -m prefect ...
    if dry_run:
        return
    if not os.environ.get("PREFECT_API_URL"):
        typer.echo("warning: PREFECT_API_URL is not set; the workers use Prefect's profile setting", err=True)
    raise typer.Exit(run_workers(commands))


def run_workers(commands: list[tuple[dict, list[str]]]) -> int:
    """Start the workers, wait; stop all of them (by pid) on Ctrl-C/SIGTERM or when one exits."""
    procs = [subprocess.Popen(argv, env=_quiet_env(**env)) for env, argv in commands]
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stopping and all(p.poll() is None for p in procs):
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for s, h in old.items():
            signal.signal(s, h)
    return 0 if stopping else max((p.returncode or 0) for p in procs) or 1


# ---- deploy ----------------------------------------------------------------------------------------

def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    from flows.local_server import DEFAULT_URL, healthy

    url = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value() or None
    if url is None and healthy(DEFAULT_URL):
        url = DEFAULT_URL
    if url is None:
        _fail("no Prefect server: set PREFECT_API_URL, or start one with `toss server`")
    if not healthy(url, timeout=5):
        _fail(f"the Prefect server at {url} does not answer")
    return url


def pools_in(prefect_file: Path) -> dict[str, set[str]]:
    """Work pools (and their queues) that the deployments of a prefect.yaml target."""
    import yaml

    spec = yaml.safe_load(prefect_file.read_text())
    pools: dict[str, set[str]] = {}
    for d in spec.get("deployments") or []:
        wp = d.get("work_pool") or {}
        if wp.get("name"):
            pools.setdefault(wp["name"], set()).add(wp.get("work_queue_name") or "default")
    return pools


def base_job_template(pool_type: str) -> dict:
    """Process pools: Prefect's default template. Kubernetes pools: deploy/k8s-job-template.json."""
    if pool_type == "process":
        from prefect.workers.process import ProcessWorker

        return ProcessWorker.get_default_base_job_template()
    if pool_type == "kubernetes":
        return json.loads(K8S_TEMPLATE.read_text())
    raise ValueError(f"pool type {pool_type!r}: choose process or kubernetes")


def ensure_work_pools(pools: dict[str, set[str]], pool_type: str = "process") -> list[str]:
    """Create missing work pools (of `pool_type`) and queues; returns what was created. Existing pools
    are left as they are (their type and job template may have been edited in the UI)."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    created = []
    with get_client(sync_client=True) as client:
        for pool, queues in sorted(pools.items()):
            try:
                client.read_work_pool(pool)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(
                    name=pool, type=pool_type, base_job_template=base_job_template(pool_type),
                    description="TOSS flow runs (docs/deploy.md): one worker per GPU, --limit 1"))
                created.append(f"{pool_type} work pool {pool}")
            for queue in sorted(queues):
                try:
                    client.read_work_queue_by_name(queue, work_pool_name=pool)
                except ObjectNotFound:
                    client.create_work_queue(queue, work_pool_name=pool)
                    created.append(f"work queue {pool}/{queue}")
    return created


def ensure_bucket(store: str) -> str | None:
    """Create the S3 bucket of an s3:// store if it is missing (for MinIO; credentials from the environment)."""
    if not store.startswith("s3://"):
        return None
    import s3fs

    bucket = store.removeprefix("s3://").split("/", 1)[0]
    fs = s3fs.S3FileSystem()
    if not fs.exists(bucket):
        fs.mkdir(bucket)
        return bucket
    return None


def is_remote(store: str) -> bool:
    return "://" in store and not store.startswith("file://")


def results_location(store: str) -> str:
    """Where flow results go: `<store>/_prefect_results` (a local store resolved against the project)."""
    if is_remote(store):
        return store.rstrip("/") + "/_prefect_results"
    local = Path(store.removeprefix("file://"))
    return str((local if local.is_absolute() else ROOT / local).resolve() / "_prefect_results")


def results_env(store: str) -> dict[str, str]:
    """The flow-run environment that makes the store Prefect's default result storage.

    A remote store: the `remote-file-system/toss-results` block (saved by `toss deploy`; it holds only the
    location, credentials come from each worker's environment). A local store: a folder in it."""
    if is_remote(store):
        return {"PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": f"remote-file-system/{RESULTS_BLOCK}"}
    return {"PREFECT_RESULTS_LOCAL_STORAGE_PATH": results_location(store)}


def save_results_block(store: str) -> str | None:
    """Save the `remote-file-system/toss-results` block for a remote store (nothing for a local one)."""
    if not is_remote(store):
        return None
    from prefect.filesystems import RemoteFileSystem

    RemoteFileSystem(basepath=results_location(store)).save(RESULTS_BLOCK, overwrite=True)
    return f"remote-file-system/{RESULTS_BLOCK}"


def render_prefect_file(prefect_file: Path, folder: Path, env: dict[str, str], pool: str | None = None) -> Path:
    """The prefect.yaml that `toss deploy` applies: every deployment's job-variable `env` extended with
    `env` (where results go), and optionally moved to another work pool (`prefect deploy --pool` is
    ignored when several deployments are deployed at once). Placeholders stay as they are."""
    import yaml

    spec = yaml.safe_load(prefect_file.read_text())
    for d in spec.get("deployments") or []:
        work_pool = dict(d.get("work_pool") or {})  # copies: YAML aliases share one mapping
        job_variables = dict(work_pool.get("job_variables") or {})
        job_variables["env"] = {**(job_variables.get("env") or {}), **env}
        work_pool["job_variables"] = job_variables
        if pool:
            work_pool["name"] = pool
        d["work_pool"] = work_pool
    spec.pop("definitions", None)  # only anchors, already expanded
    out = folder / "prefect.yaml"
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def deploy_env(store: str) -> dict[str, str]:
    env = _quiet_env(**{STORE_ENV: store})
    # Resolved per worker at run time: must stay a placeholder in the saved pull step.
    env.pop(PROJECT_ENV, None)
    return env


def deploy(
    store: Annotated[Optional[str], typer.Option(
        help=f"artifact store of the deployments' default configs (default: ${STORE_ENV}, else ./store "
             "under each worker's project dir); a team uses s3://bucket/prefix")] = None,
    name: Annotated[list[str], typer.Option(help="deploy only these deployments (default: all)")] = [],
    pool: Annotated[Optional[str], typer.Option(
        help="put every deployment in this work pool instead of prefect.yaml's (e.g. a Kubernetes pool)")] = None,
    pool_type: Annotated[str, typer.Option(
        help="type of the pools created when missing: process, or kubernetes (with deploy/k8s-job-template.json)")]
        = "process",
    create_bucket: Annotated[bool, typer.Option("--create-bucket", help="create the s3:// store's bucket if "
                                                                       "missing (MinIO)")] = False,
    prefect_file: Annotated[Path, typer.Option(help="the deployments")] = PREFECT_FILE,
) -> None:
    """Create the work pools, make the store Prefect's result storage, apply deploy/prefect.yaml.

    Against the server at PREFECT_API_URL: missing work pools and the queue are created, the flows'
    results go to <store>/_prefect_results, and `prefect deploy` applies the deployments (all, or --name)."""
    store = store or os.environ.get(STORE_ENV) or "./store"
    url = _api_url()
    os.environ["PREFECT_API_URL"] = url
    if create_bucket and (bucket := ensure_bucket(store)):
        typer.echo(f"created bucket {bucket}", err=True)
    pools = pools_in(prefect_file)
    if pool:
        pools = {pool: set().union(*pools.values()) if pools else {DEFAULT_QUEUE}}
    try:
        created = ensure_work_pools(pools, pool_type)
    except ValueError as e:
        _fail(str(e))
    for line in created:
        typer.echo(f"created {line}", err=True)
    block = save_results_block(store)
    typer.echo(f"flow results: {results_location(store)}" + (f" (block {block})" if block else ""), err=True)
    with tempfile.TemporaryDirectory() as tmp:
        source = render_prefect_file(prefect_file, Path(tmp), results_env(store), pool)
        argv = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file", str(source),
                *([a for n in name for a in ("--name", n)] or ["--all"])]
        # Entrypoints (flows/toss.py:...) are relative to the repository root.
        done = subprocess.run(argv, cwd=ROOT, env={**deploy_env(store), "PREFECT_API_URL": url}, check=False)
    if done.returncode:
        _fail(f"prefect deploy failed (exit {done.returncode})")
    typer.echo(f"deployed (store {store}). Start workers with `toss worker` (one per GPU), then press Run in the "
               f"UI ({url.removesuffix('/api')}) or: prefect deployment run toss/toss-quick", err=True)


for _cmd in (server, worker, deploy):
    app.command()(_cmd)

if __name__ == "__main__":
    app()
