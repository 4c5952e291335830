"""The demo flow (`toss demo`, `make run`): a real model made safety-aligned, then TOSS and TOSS-Pro
against standard SFT on data with hidden harmful samples, evaluated side by side.

    import model (GGUF -> HF)  ->  demo data (packages; the original model's answers)
    -> aligned base (tokenize, LoRA on refusals + benign, merge)  ->  demo sets (the aligned base's answers)
    -> toss-pro subflow on the aligned base (references, scores, masks, fine-tunes, evaluation)

The same stages as `toss_core.demo.run.run_demo` (plain Python), each a cached task: a rerun reuses all.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows.toss import _Run, toss_pipeline, toss_pro
from tasks import demo as td
from tasks import stages as t
from tasks.caching import open_store
from toss_core.config import DataConfig
from toss_core.demo.config import DemoConfig
from toss_core.demo.run import DEMO_STEPS, pipeline_for
from toss_core.demo.stages import data_file
from toss_core.pipeline import STEPS
from toss_core.stages import TrainSource


@flow(name="toss-demo", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def toss_demo(config: DemoConfig, force: list[str] = [], pro: bool = True) -> dict:  # noqa: B006 (Prefect parameters)
    """SmolLM2 demo: import, data, aligned base, then TOSS(-Pro) with the evaluation. Finished stages are reused."""
    run = _Run(config, force, steps=DEMO_STEPS + STEPS)
    store = open_store(config.store)
    model = run.result(run.submit(td.import_model, "import model", "import", source=config.source,
                                  dtype=config.import_dtype))
    data = run.result(run.submit(td.demo_data, "demo data", "data", model=model, cfg=config.data,
                                 max_len=config.max_len))
    data_cfg = DataConfig(custom="-", harmful="-", utility="-", max_len=config.max_len)  # as aligned_base_stages
    tokens = run.result(run.submit(t.prepare, "prepare aligned", "aligned", model=model,
                                   source=data_file(store, data, "aligned"), data=data_cfg))
    adapter = run.result(run.submit(t.train, "train aligned", "aligned", role="aligned", model=model,
                                    sources=[TrainSource(tokens=tokens)], cfg=config.aligned))
    aligned = run.result(run.submit(td.merge, "merge aligned", "aligned", model=model, adapter=adapter))
    sets = run.result(run.submit(td.demo_sets, "demo sets", "data", data=data, aligned=aligned, cfg=config.data))

    cfg = pipeline_for(config, store, aligned, sets)
    flow_ = (toss_pro if pro else toss_pipeline).with_options(
        flow_run_name="toss-pro" if pro else "toss",
        task_runner=ThreadPoolTaskRunner(max_workers=cfg.orchestration.max_workers))
    out = flow_(cfg, [f for f in force if f in STEPS])
    get_run_logger().info("aligned base %s | report %s", aligned.uri, out.get("report", {}).get("uri"))
    return {**out, "aligned": aligned.model_dump(), "data": sets.model_dump(), "stages": run.rows + out["stages"]}
