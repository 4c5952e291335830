"""The Prefect server a `toss run` / `toss demo` starts for itself is stopped on every exit path."""

import os
import signal
import subprocess
import sys
import time

import pytest

CHILD = """
import sys, time
from pathlib import Path
from prefect import flow, task
from prefect.settings import PREFECT_API_URL, temporary_settings
from flows.local_server import prefect_api

@task
def long_stage():  # a training that would run for ten minutes, in a worker thread
    time.sleep(600)

@flow
def long_flow():
    long_stage.submit().result()

with prefect_api(Path(sys.argv[1])) as (url, started):
    print(url, started, flush=True)
    with temporary_settings(updates={PREFECT_API_URL: url}):  # as the CLI does
        long_flow() if sys.argv[2] == "flow" else time.sleep(600)
"""


@pytest.mark.slow
@pytest.mark.parametrize("inside, sig", [("idle", signal.SIGTERM), ("flow", signal.SIGKILL)])
def test_killing_the_command_stops_the_server_it_started(tmp_path, inside, sig):
    """`kill PID` of a `toss run` (SIGTERM while not in a flow; SIGKILL in the middle of a stage, where
    Prefect's engine defers SIGTERM until the stage ends): the server it started does not outlive it."""
    from flows.local_server import DEFAULT_URL, healthy

    if healthy(DEFAULT_URL):
        pytest.skip("a Prefect server already listens on 127.0.0.1:4200: prefect_api would reuse it")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # its own database, not ~/.prefect
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), inside], stdout=subprocess.PIPE, text=True,
                             env=env)
    try:
        url, started = child.stdout.readline().split()
        assert started == "True" and healthy(url)
        time.sleep(5 if inside == "flow" else 0)  # the flow run and its task have started
        child.send_signal(sig)
        code = child.wait(timeout=60)
        assert code == (128 + sig if sig == signal.SIGTERM else -sig)
        deadline = time.monotonic() + 10
        while healthy(url) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not healthy(url), "the server outlived the command that started it"
    finally:
        if child.poll() is None:
            child.kill()
