"""The Prefect flows against a real (test-harness) Prefect server: caching, resume, TOSS-Pro, S3.

States, not timings: a reused stage is one whose task run finished Cached or whose store lookup hit,
and "nothing trained" means no training artifact was written.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from toss_core.config import load_config
from toss_core.faults import ENV, InjectedFault
from toss_core.store import ArtifactStore

pytest.importorskip("prefect")

from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows.toss import toss_pipeline, toss_pro  # noqa: E402

ROOT = Path(__file__).parents[1]
QUICK = ROOT / "configs" / "quick.yaml"


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        # No heartbeat thread per flow run (about 1 s each); nothing here runs long enough to need it.
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield PREFECT_API_URL.value()


def quick(store, *overrides):
    return load_config(QUICK, [f"store.url={store}", *overrides])


def status(out) -> dict[str, str]:
    return {r["stage"]: r["status"] for r in out["stages"]}


def computed(out) -> list[str]:
    return [r["stage"] for r in out["stages"] if r["status"] == "computed"]


def train_writes(store: Path) -> int:
    """Training artifacts written so far (published or not): each is a writer folder under train/."""
    return sum(1 for _ in (store / "train").glob("*/w-*"))


@pytest.fixture(scope="module")
def first_run(prefect_server, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    out = toss_pipeline(quick(store), [])
    return store, out


def test_second_run_reuses_every_stage_and_trains_nothing(first_run):
    store, out = first_run
    assert set(status(out).values()) == {"computed"}
    writes = train_writes(store)
    again = toss_pipeline(quick(store), [])
    assert computed(again) == []
    assert train_writes(store) == writes  # no model trained, no scores written
    assert again["mask"] == out["mask"] and again["finetune"] == out["finetune"]


def test_failed_stage_then_rerun_computes_only_it_and_later(first_run, monkeypatch):
    store, _ = first_run
    cfg = quick(store, "select.ratio=0.3")
    monkeypatch.setenv(ENV, "mask")  # the select stage raises
    with pytest.raises(InjectedFault):
        toss_pipeline(cfg, [])
    monkeypatch.delenv(ENV)
    rerun = toss_pipeline(cfg, [])
    assert computed(rerun) == ["select round 0", "train finetune"]


def test_changing_only_the_ratio_reuses_references_and_scores(first_run):
    store, _ = first_run
    out = toss_pipeline(quick(store, "select.ratio=0.2"), [])
    assert computed(out) == ["select round 0", "train finetune"]
    assert all(s == "reused" for k, s in status(out).items() if k.startswith(("train safety", "train utility", "score")))


def test_force_recomputes_the_named_step(first_run):
    store, _ = first_run
    out = toss_pipeline(quick(store), ["select"])
    assert computed(out) == ["select round 0"]  # same mask key again, so the fine-tune is reused


def test_toss_pro_two_rounds(first_run):
    store, _ = first_run
    out = toss_pro(quick(store), [])
    names = [r["stage"] for r in out["stages"]]
    assert names.count("train utility") == 1
    assert sum(n.startswith("score utility") for n in names) == 2  # one pass over 2 shards, never rescored
    assert [n for n in names if n.startswith("train safety")] == ["train safety", "train safety-r1", "train safety-r2"]
    rounds = {r["stage"]: r["artifact"] for r in out["stages"] if r["stage"].startswith(("select", "train safety"))}
    assert len(set(rounds.values())) == len(rounds)  # each round's artifacts are distinct
    assert set(computed(out)) == {"train safety-r1", "score safety-r1 1/2", "score safety-r1 2/2", "select round 1",
                                  "train safety-r2", "score safety-r2 1/2", "score safety-r2 2/2", "select round 2",
                                  "train finetune"}
    assert computed(toss_pro(quick(store), [])) == []  # and every round is cached


def test_sigkill_during_training_then_rerun_resumes_from_checkpoint(prefect_server, tmp_path):
    store = tmp_path / "store"
    sets = ["--set", "finetune.checkpoint_every=4", "--set", "reference.checkpoint_every=0"]
    env = {**os.environ, "PREFECT_API_URL": prefect_server, ENV: "train@6:kill", "HF_HUB_OFFLINE": "1"}
    # The reference trainings have 12 steps; the fault kills whichever training first completes step 6.
    # Only the fine-tune checkpoints, so first train the references without the fault.
    cmd = [sys.executable, "-m", "flows.cli", "run", str(QUICK), "--store", str(store), *sets]
    subprocess.run(cmd[:-4] + ["--set", "finetune.max_steps=1"], env={**env, ENV: ""}, check=True, cwd=ROOT,
                   capture_output=True)
    killed = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    ckpts = list((store / "_checkpoints" / "train").glob("*/step-00000004/COMPLETE"))
    assert len(ckpts) == 1
    out = toss_pipeline(quick(store, "finetune.checkpoint_every=4", "reference.checkpoint_every=0"), [])
    assert computed(out) == ["train finetune"]
    manifest = ArtifactStore(store).manifest("train", out["finetune"]["key"])
    assert manifest.metrics["resumed_from_step"] == 4


@pytest.fixture
def s3_server(monkeypatch):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": url}.items():
        monkeypatch.setenv(k, v)
    import boto3
    import s3fs

    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="toss-test")
    s3fs.S3FileSystem.clear_instance_cache()
    yield url
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_pipeline_on_s3_and_reuse_from_a_fresh_prefect_server(s3_server, tmp_path, monkeypatch):
    import s3fs

    monkeypatch.setenv("TOSS_CACHE_DIR", str(tmp_path / "cache"))
    cfg = quick("s3://toss-test/team")
    with prefect_test_harness(server_startup_timeout=120):
        first = toss_pipeline(cfg, [])
    fs = s3fs.S3FileSystem()
    listed = fs.ls("toss-test/team")
    assert {"mask", "scores", "tokens", "train", "_prefect_results"} <= {p.rsplit("/", 1)[-1] for p in listed}
    assert fs.ls("toss-test/team/_prefect_results")  # Prefect's task results live in the bucket too
    assert first["finetune"]["uri"].startswith("s3://toss-test/team/train/")

    # A teammate: fresh Prefect server (empty database), fresh local cache, same bucket.
    monkeypatch.setenv("TOSS_CACHE_DIR", str(tmp_path / "cache2"))
    with prefect_test_harness(server_startup_timeout=120):
        second = toss_pipeline(cfg, [])
    assert computed(second) == []
    assert second["finetune"] == first["finetune"]
