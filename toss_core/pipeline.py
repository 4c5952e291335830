"""TOSS and TOSS-Pro end to end in plain Python (no Prefect): the stages of `toss_core.stages` in order.

    result = run_pipeline(load_config("configs/quick.yaml"), pro=True)
    print(result.final["finetune"].ref.uri, result.final["mask"].ref.uri)

This is the sequential reference composition, used by `toss run --no-prefect`, the GPU benchmark and
anyone embedding the method; `flows/` composes the same stages as Prefect tasks (parallel references,
mapped scoring). Every stage is cached in the store, so a rerun recomputes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from toss_core.config import PipelineConfig, TrainConfig
from toss_core.stages import (
    StageOutcome,
    TrainSource,
    base_model_stage,
    local_files,
    score_stage,
    select_stage,
    tokenize_stage,
    train_stage,
)
from toss_core.store import ArtifactRef, ArtifactStore

STEPS = ("prepare", "train_reference", "score", "select", "finetune", "evaluate")


@dataclass
class PipelineResult:
    steps: list[tuple[str, StageOutcome]] = field(default_factory=list)  # in run order, for the summary table
    final: dict[str, StageOutcome] = field(default_factory=dict)  # "mask", "finetune", "safety", ...

    def add(self, name: str, outcome: StageOutcome) -> StageOutcome:
        self.steps.append((name, outcome))
        return outcome


def train_recipe(cfg: PipelineConfig, role: str) -> TrainConfig:
    """The training settings of a role: `finetune` is the selective fine-tune, every other role (safety,
    utility, safety-r1, ...) a reference model."""
    return cfg.finetune if role == "finetune" else cfg.reference


def pro_sources(store: ArtifactStore, harmful: ArtifactRef, custom: ArtifactRef, previous_mask: ArtifactRef,
                cfg: PipelineConfig, chosen: set[int]) -> list[TrainSource]:
    """Training set of a TOSS-Pro round (SPEC section 5): D^h plus what the previous round flagged.

    'tokens': custom samples with labels only on their flagged tokens.
    'samples': walking down the previous round's ranking of S, the first k distinct samples not collected
    in an earlier round, whole; `chosen` accumulates them over rounds (D^h grows cumulatively). The
    ranking comes from the score tables the previous mask was selected from (named in its manifest).
    """
    if cfg.pro.mode == "tokens":
        return [TrainSource(tokens=harmful), TrainSource(tokens=custom, mask=previous_mask, labels="flagged")]
    import pyarrow.parquet as pq

    from toss_core.selection import top_flagged_samples

    utility, safety = mask_score_files(store, previous_mask)
    n = sum(pq.ParquetFile(f).metadata.num_rows for f in utility)  # the custom set's samples
    k = int(cfg.pro.samples_k) if cfg.pro.samples_k >= 1 else max(1, math.floor(cfg.pro.samples_k * n))
    chosen |= set(top_flagged_samples(utility, safety, k, exclude=chosen))
    return [TrainSource(tokens=harmful), TrainSource(tokens=custom, only_samples=sorted(chosen))]


def mask_score_files(store: ArtifactStore, mask: ArtifactRef) -> tuple[list[str], list[str]]:
    """Local files of the utility and safety score tables a mask was selected from (its manifest's
    inputs utility0.., safety0.., in shard order)."""
    manifest = store.manifest(mask.stage, mask.key)
    if manifest is None:
        raise FileNotFoundError(f"{mask.uri}: no published mask (was the store garbage-collected?)")

    def files(role: str) -> list[str]:
        names = sorted((n for n in manifest.inputs if n[len(role):].isdigit() and n.startswith(role)),
                       key=lambda n: int(n[len(role):]))
        refs = [store.ref("scores", manifest.inputs[n]) for n in names]
        if not refs or any(r is None for r in refs):
            raise FileNotFoundError(f"{mask.uri}: the {role} score tables it was selected from are not in the store")
        return [f for r in refs for f in local_files(store, r)]

    return files("utility"), files("safety")


def run_pipeline(cfg: PipelineConfig, store: ArtifactStore | None = None, *, pro: bool = False,
                 force: tuple[str, ...] = (), progress: bool = True,
                 on_stage: Callable[[str, StageOutcome], None] | None = None) -> PipelineResult:
    store = store or ArtifactStore(cfg.store.url, cfg.store.storage_options)
    res = PipelineResult()

    def step(name: str, outcome: StageOutcome) -> StageOutcome:
        if on_stage:
            on_stage(name, outcome)
        return res.add(name, outcome)

    opts = cfg.store.storage_options
    model = step("model", base_model_stage(store, cfg.model)).ref
    tok = {
        name: step(f"prepare {name}", tokenize_stage(store, model, getattr(cfg.data, name), cfg.data, opts,
                                                     force="prepare" in force)).ref
        for name in ("custom", "harmful", "utility")
    }

    def train(role, sources):
        f = ("finetune" if role == "finetune" else "train_reference") in force
        return step(f"train {role}", train_stage(store, role, model, sources, train_recipe(cfg, role),
                                                 dtype=cfg.model.dtype, force=f, progress=progress)).ref

    def score(adapter, label):
        return [step(f"score {label} {i + 1}/{cfg.score.shards}",
                     score_stage(store, model, adapter, tok["custom"], i, cfg.score, force="score" in force,
                                 progress=progress)).ref
                for i in range(cfg.score.shards)]

    def select(util_scores, safety_scores, label):
        return step(f"select {label}", select_stage(store, tok["custom"], util_scores, safety_scores, cfg.select,
                                                    force="select" in force))

    safety = train("safety", [TrainSource(tokens=tok["harmful"])])
    utility = train("utility", [TrainSource(tokens=tok["utility"])])
    util_scores = score(utility, "utility")  # fixed across TOSS-Pro rounds
    safety_scores = score(safety, "safety")
    mask = round0 = select(util_scores, safety_scores, "round 0")

    chosen: set[int] = set()
    for r in range(1, cfg.pro.rounds + 1 if pro else 1):
        safety = train(f"safety-r{r}", pro_sources(store, tok["harmful"], tok["custom"], mask.ref, cfg, chosen))
        mask = select(util_scores, score(safety, f"safety-r{r}"), f"round {r}")

    train("finetune", [TrainSource(tokens=tok["custom"], mask=mask.ref, labels="keep")])
    res.final["mask"], res.final["finetune"] = mask, res.steps[-1][1]

    if cfg.eval.enabled:  # baselines + generations + judges + report (toss_core/evaluation.py)
        from toss_core.evaluation import EvalInputs, PlainRunner, run_evaluation

        masks = {"toss": round0.ref, **({"toss-pro": mask.ref} if pro else {})}
        inputs = EvalInputs(model=model, custom=tok["custom"], utility_scores=util_scores,
                            safety_scores=safety_scores, masks=masks)
        run_evaluation(store, cfg, inputs, PlainRunner(store, force=force, progress=progress, storage_options=opts,
                                                       on_stage=step))
        res.final["report"] = res.steps[-1][1]
    return res
