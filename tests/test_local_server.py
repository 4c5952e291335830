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
from flows.local_server import prefect_api
with prefect_api(Path(sys.argv[1])) as (url, started):
    print(url, started, flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
def test_sigterm_stops_the_server_it_started(tmp_path):
    from flows.local_server import DEFAULT_URL, healthy

    if healthy(DEFAULT_URL):
        pytest.skip("a Prefect server already listens on 127.0.0.1:4200: prefect_api would reuse it")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # its own database, not ~/.prefect
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        url, started = child.stdout.readline().split()
        assert started == "True" and healthy(url)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while healthy(url) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not healthy(url), "the server outlived the command that started it"
    finally:
        if child.poll() is None:
            child.kill()
