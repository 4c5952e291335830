"""The evaluation subflow: baselines, fine-tunes, generations, judges and the report, as Prefect tasks.

    evaluate(config, force, EvalInputs(model=..., custom=..., utility_scores=[...], safety_scores=[...],
                                       masks={"toss": mask}))

`flows/toss.py` runs it after the selective fine-tune when `eval.enabled` (flow run name "evaluate").
The DAG itself is `toss_core.evaluation.run_evaluation`, written once for both executors; here a
`PrefectRunner` submits each stage as a task, so the stages of a phase (all baseline fine-tunes, all
generations, all judgements) run in parallel, up to `orchestration.max_workers`, and every one is cached by
its artifact key. The table is published as the markdown artifact `toss-evaluation`.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from flows.toss import _Run
from tasks import evaluation as te
from tasks import stages as t
from tasks.caching import open_store
from toss_core.config import PipelineConfig
from toss_core.evaluation import STEP_OF, EvalInputs, run_evaluation
from toss_core.store import ArtifactRef

_TASKS = {"tokens": t.prepare, "score": t.score_shard, "train": t.train, "baseline_mask": te.baseline_mask,
          "generate": te.generate, "judge": te.judge, "compare": te.compare, "report": te.report}
_GPU = {"score", "train", "generate"}


class PrefectRunner:
    """`toss_core.evaluation.StageRunner` over Prefect tasks: submit returns a future, result waits for it."""

    def __init__(self, run: _Run):
        self.run = run

    def submit(self, what: str, label: str, **kwargs):
        if what in _GPU:
            kwargs["gpu_limit"] = self.run.cfg.orchestration.gpu_limit
        return self.run.submit(_TASKS[what], label, STEP_OF[what], **kwargs)

    def result(self, handle) -> ArtifactRef:
        return self.run.result(handle)


@flow(name="toss-evaluate", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=2))
def evaluate(config: PipelineConfig, force: list[str], inputs: EvalInputs) -> dict:
    """Every method's mask and fine-tune, their answers, the judges, and the report (SPEC section 6)."""
    run = _Run(config, force)
    result = run_evaluation(open_store(config.store), config, inputs, PrefectRunner(run))
    create_markdown_artifact(result.markdown, key="toss-evaluation",
                             description=f"Evaluation of run {config.name}: safety and utility per method")
    get_run_logger().info("evaluation report %s", result.report.uri)
    return {"report": result.report.model_dump(), "stages": run.rows}
