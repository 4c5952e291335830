"""Dispatching GPU stages to stage deployments (tasks/dispatch.py), without a server or a worker.

`run_deployment` is replaced by a stand-in that records what would be started and plays the worker: it
publishes the stage's artifact and ends Completed, or ends Failed/Crashed, or publishes nothing. The task
bodies run through `.fn`; the parameters they send are validated by the stage flows themselves, and the
artifact key the stage flow would publish under is recomputed from those parameters.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("prefect")

from prefect.exceptions import ObjectNotFound  # noqa: E402
from prefect.states import Completed, Crashed, Failed  # noqa: E402

from flows.stage_flows import toss_score_stage, toss_train_stage  # noqa: E402
from tasks import dispatch  # noqa: E402
from tasks import stages as local_tasks  # noqa: E402
from toss_core.config import load_config  # noqa: E402
from toss_core.pipeline import train_recipe  # noqa: E402
from toss_core.stages import TrainSource, score_plan, train_plan  # noqa: E402
from toss_core.store import ArtifactStore  # noqa: E402

QUICK = Path(__file__).parents[1] / "configs" / "quick.yaml"


def _publish(store: ArtifactStore, stage: str, key: str, config: dict | None = None, inputs: dict | None = None):
    with store.writer(stage, key, config=config or {}, inputs=inputs or {}) as w:
        w.write_json("done.json", {"stage": stage})
    return w.ref


class Inputs:
    """A store with a base model and two token tables (stand-ins: only their keys matter here)."""

    def __init__(self, root: Path, store_url: str, *overrides: str):
        self.cfg = load_config(QUICK, [f"store.url={store_url}", "orchestration.dispatch=workers", *overrides])
        self.store = ArtifactStore(str(root))
        self.model = _publish(self.store, "model", "m0")
        self.harmful = _publish(self.store, "tokens", "harmful0")
        self.custom = _publish(self.store, "tokens", "custom0")
        self.sources = [TrainSource(tokens=self.harmful)]

    def train_key(self, role: str = "safety") -> str:
        return train_plan(role, self.model, self.sources, train_recipe(self.cfg, role), self.cfg.model.dtype).key

    def train(self, role: str = "safety", force: bool = False):
        return dispatch.train_on_worker.fn(store=self.cfg.store, config=self.cfg, role=role, model=self.model,
                                           sources=self.sources, run_name=f"train {role}", force=force)

    def score(self, adapter=None, shard: int = 1):
        return dispatch.score_on_worker.fn(store=self.cfg.store, config=self.cfg, model=self.model, adapter=adapter,
                                           tokens=self.custom, shard=shard, run_name=f"score x {shard + 1}/2")


class Deployments:
    """Stand-in for run_deployment: records each call; `worker(name, parameters)` returns the final state
    (and may publish the artifact as a stage flow would)."""

    def __init__(self, worker):
        self.calls: list[dict] = []
        self.worker = worker

    def __call__(self, name, parameters=None, flow_run_name=None, timeout=None, as_subflow=True, **kw):
        self.calls.append({"name": name, "parameters": parameters, "flow_run_name": flow_run_name,
                           "timeout": timeout, "as_subflow": as_subflow})
        return SimpleNamespace(id=uuid.uuid4(), name=f"flow-run-{len(self.calls)}",
                               state=self.worker(name, parameters))


def _never(name, parameters):
    raise AssertionError(f"a cached stage must not start {name}")


@pytest.fixture
def inputs(tmp_path):
    return Inputs(tmp_path / "store", str(tmp_path / "store"))


def test_cache_hit_starts_no_flow_run(inputs, monkeypatch):
    fake = Deployments(_never)
    monkeypatch.setattr(dispatch, "run_deployment", fake)
    trained = _publish(inputs.store, "train", inputs.train_key())
    out = inputs.train()
    assert (out.ref, out.reused) == (trained, True)
    scored = _publish(inputs.store, "scores", score_plan(inputs.model, trained, inputs.custom, 1, inputs.cfg.score).key)
    out = inputs.score(adapter=trained)
    assert (out.ref, out.reused) == (scored, True)
    assert fake.calls == []
    # The Prefect cache key of the dispatch task is the in-process task's (the artifact key): a stage
    # computed either way is a cache hit for the other, and Prefect never even runs the task body.
    local = {"store": inputs.cfg.store, "role": "safety", "model": inputs.model, "sources": inputs.sources,
             "cfg": inputs.cfg.reference, "dtype": inputs.cfg.model.dtype}
    remote = {"store": inputs.cfg.store, "config": inputs.cfg, "role": "safety", "model": inputs.model,
              "sources": inputs.sources}
    key = local_tasks.train.cache_policy.compute_key(None, local, {})
    assert key == f"train-{inputs.train_key()}"
    assert dispatch.train_on_worker.cache_policy.compute_key(None, remote, {}) == key
    assert dispatch.train_on_worker.cache_policy.compute_key(None, {**remote, "role": "utility"}, {}) is None


def test_miss_starts_the_train_deployment_and_reads_the_published_artifact(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative store: workers run elsewhere, so they are sent an absolute path
    inputs = Inputs(tmp_path / "store", "store", "orchestration.train_deployment=team-train/a100")
    published = {}

    def worker(name, parameters):  # what toss-train-stage does on a worker, as far as the store goes
        p = toss_train_stage.validate_parameters(parameters)
        cfg = p["config"]
        plan = train_plan(p["role"], p["model"], p["sources"], train_recipe(cfg, p["role"]), cfg.model.dtype)
        published["ref"] = _publish(ArtifactStore(cfg.store.url), plan.stage, plan.key, plan.config, plan.inputs)
        return Completed()

    fake = Deployments(worker)
    monkeypatch.setattr(dispatch, "run_deployment", fake)
    out = inputs.train()
    call, = fake.calls
    assert call["name"] == "team-train/a100" and call["as_subflow"] is True and call["flow_run_name"] == "train safety"
    assert set(call["parameters"]) == {"config", "role", "model", "sources", "force"}
    assert call["parameters"]["config"]["store"]["url"] == str(tmp_path / "store")
    assert call["parameters"]["role"] == "safety" and call["parameters"]["force"] is False
    # The stage flow's artifact key (from the parameters it received) is the one the flow looks up.
    assert published["ref"].key == inputs.train_key()
    assert out.ref == published["ref"] and out.reused is False

    # A second dispatch of the same stage finds it: nothing more is started.
    assert inputs.train().reused and len(fake.calls) == 1
    # `force` recomputes on a worker even though the artifact exists, and tells the stage flow so.
    inputs.train(force=True)
    assert len(fake.calls) == 2 and fake.calls[1]["parameters"]["force"] is True


def test_miss_starts_the_score_deployment_with_its_shard(inputs, monkeypatch):
    adapter = _publish(inputs.store, "train", inputs.train_key())

    def worker(name, parameters):
        p = toss_score_stage.validate_parameters(parameters)
        plan = score_plan(p["model"], p["adapter"], p["tokens"], p["shard"], p["config"].score)
        _publish(ArtifactStore(p["config"].store.url), plan.stage, plan.key, plan.config, plan.inputs)
        return Completed()

    fake = Deployments(worker)
    monkeypatch.setattr(dispatch, "run_deployment", fake)
    out = inputs.score(adapter=adapter, shard=1)
    base = inputs.score(adapter=None, shard=0)  # the base model alone (a baseline's scores)
    assert [c["name"] for c in fake.calls] == ["toss-score-stage/toss-score-stage"] * 2
    first, second = (c["parameters"] for c in fake.calls)
    assert (first["shard"], first["adapter"]["key"], first["tokens"]["key"]) == (1, adapter.key, "custom0")
    assert (second["shard"], second["adapter"]) == (0, None)
    assert out.ref.key == score_plan(inputs.model, adapter, inputs.custom, 1, inputs.cfg.score).key
    assert base.ref.key == score_plan(inputs.model, None, inputs.custom, 0, inputs.cfg.score).key
    assert not out.reused and not base.reused


@pytest.mark.parametrize("state", [Failed(message="CUDA out of memory"), Crashed(message="exit code -9")],
                         ids=["failed", "crashed"])
def test_a_failed_stage_run_raises_naming_the_stage_and_the_flow_run(inputs, monkeypatch, state):
    fake = Deployments(lambda name, parameters: state)
    monkeypatch.setattr(dispatch, "run_deployment", fake)
    with pytest.raises(dispatch.StageRunError) as e:
        inputs.train()
    message = str(e.value)
    assert "stage 'train safety'" in message and "'flow-run-1'" in message
    assert f"ended {state.name}: {state.message}" in message and "toss-train-stage/toss-train-stage" in message
    assert not inputs.store.exists("train", inputs.train_key())


def test_a_completed_run_that_published_nothing_is_an_error(inputs, monkeypatch):
    monkeypatch.setattr(dispatch, "run_deployment", Deployments(lambda name, parameters: Completed()))
    with pytest.raises(dispatch.StageRunError, match=r"completed, but .* has no train/.*same store"):
        inputs.train()


def test_a_missing_deployment_is_named(inputs, monkeypatch):
    def missing(name, **kw):
        raise ObjectNotFound(RuntimeError("404"))

    monkeypatch.setattr(dispatch, "run_deployment", missing)
    with pytest.raises(dispatch.StageRunError, match=r"no deployment 'toss-train-stage/toss-train-stage'.*toss deploy"):
        inputs.train()


def test_shared_store_makes_local_folders_absolute_and_keeps_urls(tmp_path, monkeypatch):
    from toss_core.config import StoreConfig

    monkeypatch.chdir(tmp_path)
    assert dispatch.shared_store(StoreConfig(url="./s")).url == str(tmp_path / "s")
    assert dispatch.shared_store(StoreConfig(url="file://s")).url == str(tmp_path / "s")
    s3 = StoreConfig(url="s3://bucket/team", storage_options={"client_kwargs": {"region_name": "x"}})
    assert dispatch.shared_store(s3) == s3


class Recorder:
    """Stands in for a Prefect task in the flow's `_Run`: records what `.submit` is given, and checks it
    binds to the real task's signature."""

    def __init__(self, real):
        self.real, self.submitted = real, []

    def with_options(self, **opts):
        return self

    def submit(self, **kwargs):
        import inspect

        inspect.signature(self.real.fn).bind(**kwargs)
        self.submitted.append(kwargs)
        return SimpleNamespace()


@pytest.mark.parametrize("mode", ["local", "workers"])
def test_the_flow_dispatches_gpu_stages_only_in_workers_mode(inputs, monkeypatch, mode):
    from flows import toss

    recorders = {name: Recorder(getattr(module, name)) for module, names in
                 ((local_tasks, ("train", "score_shard")), (dispatch, ("train_on_worker", "score_on_worker")))
                 for name in names}
    for name, recorder in recorders.items():
        monkeypatch.setattr(local_tasks if name in ("train", "score_shard") else dispatch, name, recorder)
    run = object.__new__(toss._Run)  # no result storage block: nothing is really submitted
    run.cfg = inputs.cfg.model_copy(update={"orchestration": inputs.cfg.orchestration.model_copy(
        update={"dispatch": mode})})
    run.force, run.rows, run.results_at = set(), [], None
    run.train("train safety", "train_reference", "safety", inputs.model, inputs.sources)
    run.score("score safety 1/2", inputs.model, inputs.harmful, inputs.custom, 0)
    used = {name for name, r in recorders.items() if r.submitted}
    assert used == ({"train", "score_shard"} if mode == "local" else {"train_on_worker", "score_on_worker"})
    if mode == "local":  # exactly today's in-process task calls
        assert recorders["train"].submitted[0]["cfg"] == inputs.cfg.reference
    else:
        assert recorders["train_on_worker"].submitted[0]["run_name"] == "train safety"
        assert recorders["score_on_worker"].submitted[0]["shard"] == 0
