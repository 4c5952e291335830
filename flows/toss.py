"""The TOSS and TOSS-Pro flows. The bodies read like the DAG:

    prepare(custom, D^h, D^u)
    train(safety) || train(utility)                 submitted together
    score(shard i, model) for every shard x model   mapped
    select -> mask
    [TOSS-Pro] round r = 1..R, each a subflow "round-r": retrain safety on D^h + flagged tokens,
               rescore with it only (utility scores are reused), reselect
    finetune(base, custom, mask)

Every task is cached by its artifact key, so rerunning a flow (or pressing Retry in the UI) reuses
every finished stage and computes only what failed or changed. With `orchestration.dispatch: workers`
the GPU stages (trainings, score shards) not in the store run as flow runs of their stage deployments on
GPU workers (`tasks/dispatch.py`, `flows/stage_flows.py`); the DAG and its caching are the same.

    from toss_core.config import load_config
    toss_pipeline(load_config("configs/quick.yaml"))
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from tasks import dispatch as d
from tasks import stages as t
from tasks.caching import open_store, result_storage
from toss_core.config import PipelineConfig
from toss_core.pipeline import STEPS, pro_sources, train_recipe
from toss_core.stages import StageOutcome, TrainSource
from toss_core.store import ArtifactRef


class _Run:
    """Submits stage tasks, and records for each whether it computed or was reused (for the summary)."""

    def __init__(self, cfg: PipelineConfig, force: list[str], steps: tuple[str, ...] = STEPS):
        unknown = sorted(set(force) - set(steps))
        if unknown:
            raise ValueError(f"force: unknown step(s) {unknown}; choose from {list(steps)}")
        self.cfg, self.force, self.rows = cfg, set(force), []
        # Task results live in the artifact store, so a retry on another worker finds them.
        self.results_at = result_storage(cfg.store)

    def submit(self, task, label: str, step: str, **kwargs):
        opts = {"task_run_name": label, "retries": self.cfg.orchestration.retries, "result_storage": self.results_at}
        if step in self.force:
            opts["refresh_cache"] = True
        return label, task.with_options(**opts).submit(store=self.cfg.store, force=step in self.force, **kwargs)

    @property
    def on_workers(self) -> bool:
        return self.cfg.orchestration.dispatch == "workers"

    def train(self, label: str, step: str, role: str, model: ArtifactRef, sources: list[TrainSource]):
        """A training: in this process (dispatch: local), or a flow run of the train deployment (workers)."""
        if self.on_workers:
            return self.submit(d.train_on_worker, label, step, config=self.cfg, role=role, model=model,
                               sources=sources, run_name=label)
        cfg = self.cfg
        return self.submit(t.train, label, step, role=role, model=model, sources=sources,
                           cfg=train_recipe(cfg, role), dtype=cfg.model.dtype, gpu_limit=cfg.orchestration.gpu_limit)

    def score(self, label: str, model: ArtifactRef, adapter: ArtifactRef, tokens: ArtifactRef, shard: int):
        """A score shard: in this process, or a flow run of the score deployment."""
        if self.on_workers:
            return self.submit(d.score_on_worker, label, "score", config=self.cfg, model=model, adapter=adapter,
                               tokens=tokens, shard=shard, run_name=label)
        return self.submit(t.score_shard, label, "score", model=model, adapter=adapter, tokens=tokens, shard=shard,
                           cfg=self.cfg.score, gpu_limit=self.cfg.orchestration.gpu_limit)

    def result(self, submitted) -> ArtifactRef:
        label, future = submitted
        outcome: StageOutcome = future.result()
        # A Prefect cache hit returns the outcome recorded when it was computed: it is reused now.
        reused = outcome.reused or future.state.name == "Cached"
        self.rows.append({"stage": label, "status": "reused" if reused else "computed",
                          "seconds": round(outcome.seconds if not reused else 0.0, 2), "artifact": outcome.ref.uri})
        return outcome.ref

    def results(self, submitted: list) -> list[ArtifactRef]:
        return [self.result(s) for s in submitted]


def _references(run: _Run, model: ArtifactRef, tok: dict[str, ArtifactRef]) -> tuple[ArtifactRef, ArtifactRef]:
    safety = run.train("train safety", "train_reference", "safety", model, [TrainSource(tokens=tok["harmful"])])
    utility = run.train("train utility", "train_reference", "utility", model, [TrainSource(tokens=tok["utility"])])
    return run.result(safety), run.result(utility)


def _submit_scores(run: _Run, model: ArtifactRef, adapter: ArtifactRef, tokens: ArtifactRef, label: str) -> list:
    shards = run.cfg.score.shards
    return [run.score(f"score {label} {i + 1}/{shards}", model, adapter, tokens, i) for i in range(shards)]


def _score(run: _Run, model: ArtifactRef, adapter: ArtifactRef, tokens: ArtifactRef, label: str) -> list[ArtifactRef]:
    return run.results(_submit_scores(run, model, adapter, tokens, label))


def _select(run: _Run, tokens, utility_scores, safety_scores, label: str) -> ArtifactRef:
    return run.result(run.submit(t.select, f"select {label}", "select", tokens=tokens, utility=utility_scores,
                                 safety=safety_scores, cfg=run.cfg.select))


def _toss(config: PipelineConfig, force: list[str], pro: bool) -> dict:
    run = _Run(config, force)
    cfg = config
    if run.on_workers:  # fail before any stage runs when the stage deployments are missing
        d.check_stage_deployments(cfg)
    model = run.result(run.submit(t.base_model, "base model", "prepare", model=cfg.model))
    tok = dict(zip(("custom", "harmful", "utility"), run.results([
        run.submit(t.prepare, f"prepare {name}", "prepare", model=model, source=getattr(cfg.data, name), data=cfg.data)
        for name in ("custom", "harmful", "utility")
    ])))
    safety, utility = _references(run, model, tok)
    # Every shard under both models is submitted before any is waited for (on workers: all at once).
    pending = [_submit_scores(run, model, adapter, tok["custom"], label)
               for adapter, label in ((utility, "utility"), (safety, "safety"))]
    utility_scores, safety_scores = (run.results(p) for p in pending)  # utility's: fixed across TOSS-Pro rounds
    mask = round0 = _select(run, tok["custom"], utility_scores, safety_scores, "round 0")

    chosen: list[int] = []
    for r in range(1, cfg.pro.rounds + 1 if pro else 1):
        done = pro_round.with_options(flow_run_name=f"round-{r}", task_runner=ThreadPoolTaskRunner(
            max_workers=cfg.orchestration.max_workers))(cfg, force, r, model, tok, utility_scores, mask, chosen)
        mask, chosen = ArtifactRef.model_validate(done["mask"]), done["chosen"]
        run.rows += done["stages"]

    final = run.result(run.train("train finetune", "finetune", "finetune", model,
                                 [TrainSource(tokens=tok["custom"], mask=mask, labels="keep")]))
    _report(run, mask, final)
    out = {"mask": mask.model_dump(), "finetune": final.model_dump()}
    if cfg.eval.enabled:  # baselines, generations, judges, report: flows/evaluate.py
        from flows.evaluate import evaluate
        from toss_core.evaluation import EvalInputs

        inputs = EvalInputs(model=model, custom=tok["custom"], utility_scores=utility_scores,
                            safety_scores=safety_scores, masks={"toss": round0, **({"toss-pro": mask} if pro else {})})
        done = evaluate.with_options(flow_run_name="evaluate", task_runner=ThreadPoolTaskRunner(
            max_workers=cfg.orchestration.max_workers))(cfg, force, inputs)
        run.rows += done["stages"]
        out["report"] = done["report"]
    return {**out, "stages": run.rows}


@flow(name="toss-pro-round", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=2))
def pro_round(config: PipelineConfig, force: list[str], r: int, model: ArtifactRef, tok: dict[str, ArtifactRef],
              utility_scores: list[ArtifactRef], previous_mask: ArtifactRef, chosen: list[int]) -> dict:
    """TOSS-Pro round r: the safety-degraded model retrained from the base on D^h + round r-1's flags,
    rescoring with it only (the utility scores are given), and reselecting."""
    run = _Run(config, force)
    picked = set(chosen)
    sources = pro_sources(open_store(config.store), tok["harmful"], tok["custom"], previous_mask, config, picked)
    safety = run.result(run.train(f"train safety-r{r}", "train_reference", f"safety-r{r}", model, sources))
    mask = _select(run, tok["custom"], utility_scores, _score(run, model, safety, tok["custom"], f"safety-r{r}"),
                   f"round {r}")
    return {"mask": mask.model_dump(), "chosen": sorted(picked), "stages": run.rows}


def _report(run: _Run, mask: ArtifactRef, final: ArtifactRef) -> None:
    create_table_artifact(run.rows, key="toss-stages", description="Stages of this run: computed or reused")
    stats = open_store(run.cfg.store).manifest(mask.stage, mask.key).metrics
    lines = [f"# TOSS run `{run.cfg.name}`", "", f"- mask: `{mask.uri}`", f"- final adapter: `{final.uri}`", "",
             "| statistic | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in stats.items()]
    create_markdown_artifact("\n".join(lines), key="toss-mask", description="Mask statistics")
    get_run_logger().info("mask %s | final adapter %s", mask.uri, final.uri)


@flow(name="toss", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=2))
def toss_pipeline(config: PipelineConfig, force: list[str] = []) -> dict:  # noqa: B006 (Prefect parameters)
    """TOSS: reference models, token scores, mask, selective fine-tune. Finished stages are reused."""
    return _toss(config, force, pro=False)


@flow(name="toss-pro", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=2))
def toss_pro(config: PipelineConfig, force: list[str] = []) -> dict:  # noqa: B006
    """TOSS-Pro: TOSS, then `pro.rounds` rounds refining the safety-degraded model on flagged tokens."""
    return _toss(config, force, pro=True)
