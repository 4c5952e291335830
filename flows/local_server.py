"""A Prefect server for the duration of one `toss run`, when none is configured.

Prefect's ephemeral mode (no server configured) starts a temporary server inside the process, and at
exit it can drop the last task-run events and print tracebacks: a newcomer's first run would look
broken and leave no history. So when PREFECT_API_URL is unset, `toss run` uses a server already
listening on 127.0.0.1:4200 if there is one, and otherwise starts `prefect server start` on a free
port with the default database (~/.prefect), runs the flow against it, and stops it by its process id.
The run's history stays in that database: `prefect server start` shows it later in the UI.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:4200/api"


def healthy(api_url: str, timeout: float = 0.5) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def prefect_api(log_dir: Path, start_timeout: float = 120) -> Iterator[tuple[str, bool]]:
    """Yield (api_url, started_here). Sets PREFECT_API_URL for this process while inside."""
    configured = os.environ.get("PREFECT_API_URL")
    if configured:
        yield configured, False
        return
    if healthy(DEFAULT_URL):
        with _env("PREFECT_API_URL", DEFAULT_URL):
            yield DEFAULT_URL, False
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    log_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_dir / "prefect-server.log", "ab")
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform == "linux" and _main_thread() else None,
    )
    # SIGTERM (a scheduler, `kill PID`) would end Python without running `finally` and orphan the server:
    # stop it from the handler. During a flow run Prefect's own handler is active instead; it raises
    # TerminationSignal, which reaches the `except` below.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: _stop_and_exit(proc, signum)) \
        if _main_thread() else None
    interrupted = False
    try:
        deadline = time.monotonic() + start_timeout
        while not healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the local Prefect server did not start; see {log.name}")
            time.sleep(0.3)
        with _env("PREFECT_API_URL", url):
            yield url, True
    except BaseException as e:
        interrupted = not isinstance(e, Exception)  # SIGTERM, Ctrl-C, Prefect's TerminationSignal
        raise
    finally:
        _drain_prefect_clients()
        proc.terminate()  # by its own pid, never by name
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if interrupted:
            _stop_and_exit(proc, signal.SIGTERM)


def _die_with_parent() -> None:
    """In the server's process, before it starts: the kernel sends it SIGTERM when the command that started it
    dies, however it dies (SIGKILL included; Prefect's flow engine defers SIGTERM until a running stage ends)."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _stop_and_exit(proc: subprocess.Popen, signum: int) -> None:
    """Stop the server and leave now. Stage tasks run in worker threads that the interpreter would wait for
    at exit (a training could go on for an hour after `kill`); an unfinished artifact is never published,
    so leaving mid-stage loses nothing but that stage's progress since its last checkpoint."""
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
    os._exit(128 + signum)


def _drain_prefect_clients(timeout: float = 15) -> None:
    """Send the queued logs and events before the server goes; otherwise they are retried against a
    closed port at interpreter exit (slow, and an error message on a successful run)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout)


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
