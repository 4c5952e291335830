"""The demo end to end in plain Python: import the model, build the data, align the base, run TOSS-Pro
with the evaluation on top. `flows/demo.py` composes the same stages as Prefect tasks and flows.

    result = run_demo(load_demo_config("configs/demo.yaml"))
    print(result.final["report"].ref.uri)
"""

from __future__ import annotations

from collections.abc import Callable

from toss_core.demo.config import DemoConfig
from toss_core.pipeline import PipelineResult, run_pipeline
from toss_core.stages import StageOutcome, model_path
from toss_core.store import ArtifactRef, ArtifactStore

DEMO_STEPS = ("import", "data", "aligned")


def pipeline_for(cfg: DemoConfig, store: ArtifactStore, aligned: ArtifactRef, data: ArtifactRef):
    """The PipelineConfig of the TOSS run on the aligned base, with the demo's data files and prompt sets."""
    from toss_core.demo.stages import data_file

    f = lambda name: data_file(store, data, name)  # noqa: E731
    prompts = [{"name": "advbench", "path": f("eval_advbench"), "kind": "harmful"},
               {"name": "donotanswer", "path": f("eval_donotanswer"), "kind": "harmful"},
               {"name": "benign", "path": f("eval_benign"), "kind": "benign"}]
    return cfg.pipeline_config(str(model_path(store, aligned)),
                               {"custom": f("custom"), "harmful": f("harmful"), "utility": f("utility")},
                               prompts, f("eval_utility"))


def prepare_demo(cfg: DemoConfig, store: ArtifactStore, *, force: tuple[str, ...] = (), progress: bool = True,
                 step: Callable[[str, StageOutcome], StageOutcome] = lambda n, o: o) -> tuple[ArtifactRef, ArtifactRef]:
    """Import, data, aligned base, data sets: returns (aligned base model, data sets) refs."""
    from toss_core.demo.stages import aligned_base_stages, demo_data_stage, demo_sets_stage, import_model_stage

    model = step("import model", import_model_stage(store, cfg.source, cfg.import_dtype, force="import" in force)).ref
    data = step("demo data", demo_data_stage(store, model, cfg.data, cfg.max_len, force="data" in force,
                                             progress=progress)).ref
    outcomes = aligned_base_stages(store, model, data, cfg, force="aligned" in force, progress=progress)
    for name, outcome in outcomes:
        step(name, outcome)
    aligned = outcomes[-1][1].ref
    sets = step("demo sets", demo_sets_stage(store, data, aligned, cfg.data, force="data" in force, progress=progress))
    return aligned, sets.ref


def run_demo(cfg: DemoConfig, store: ArtifactStore | None = None, *, pro: bool = True, force: tuple[str, ...] = (),
             progress: bool = True, on_stage: Callable[[str, StageOutcome], None] | None = None) -> PipelineResult:
    store = store or ArtifactStore(cfg.store.url, cfg.store.storage_options)
    res = PipelineResult()

    def step(name, outcome):
        if on_stage:
            on_stage(name, outcome)
        return res.add(name, outcome)

    aligned, data = prepare_demo(cfg, store, force=force, progress=progress, step=step)
    pipe = run_pipeline(pipeline_for(cfg, store, aligned, data), store, pro=pro, force=force, progress=progress,
                        on_stage=on_stage)
    res.steps += pipe.steps
    res.final.update(pipe.final)
    return res
