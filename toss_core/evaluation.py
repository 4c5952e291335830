"""The evaluation stages and the evaluation DAG (SPEC section 6; docs/evaluation.md).

    result = run_evaluation(store, cfg, EvalInputs(model=..., custom=..., utility_scores=[...],
                            safety_scores=[...], masks={"toss": mask_ref}), PlainRunner(store))
    print(result.markdown)

Stages (each a StagePlan + cached run + produce function, as in `toss_core.stages`):

    generations    model (+ adapter) x prompt set x decoding config -> generations.parquet
    judgements     generations x judge -> judgements.parquet (refused, harm 1-5)
    comparisons    generations x standard-SFT generations x judge -> comparisons.parquet (both orders)
    baseline-mask  token table (+ score tables) x method x budget -> mask.parquet (TOSS mask format)
    report         every measurement above -> results.json, report.md, scatter.png

and, reused as they are: `tokens` (the held-out utility answers), `scores` (their loss under each model:
the utility metric; the base model's losses on the custom set: the reference-free baseline), `train`
(one selective fine-tune per method and seed). A judge change recomputes only judgements, comparisons
and the report; a new seed only that seed's fine-tunes and everything downstream of them.

`run_evaluation` is the DAG, written once: it hands every stage to a `StageRunner`, phase by phase
(masks, fine-tunes, generations and utility losses, judges, report). `PlainRunner` runs each stage at
once in this process (`toss run --no-prefect`, tests); `flows/evaluate.py` submits them as Prefect tasks,
so the stages of a phase run in parallel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from pydantic import BaseModel, Field

from toss_core.config import GenerationConfig, JudgeConfig, PipelineConfig, PromptSetConfig, ScoreConfig
from toss_core.stages import (
    VERSIONS,
    StageOutcome,
    StagePlan,
    TrainSource,
    _run,
    data_digest,
    local_files,
    model_path,
    score_stage,
    tokenize_stage,
    train_stage,
)
from toss_core.store import ArtifactRef, ArtifactStore

# Registered next to the pipeline's own stage versions; bump one when its logic changes.
EVAL_VERSIONS = {"generations": 2, "judgements": 1, "comparisons": 1, "baseline-mask": 2, "report": 3}
VERSIONS.update(EVAL_VERSIONS)
SEEDLESS_MASKS = ("toss", "toss-pro")


# ---- generations --------------------------------------------------------------------------------

def generate_plan(model: ArtifactRef, adapter: ArtifactRef | None, prompts: PromptSetConfig, cfg: GenerationConfig,
                  dtype: str = "float32", storage_options: dict | None = None) -> StagePlan:
    from toss_core.generation import decoding_identity

    # The prompt set enters by content (its name and kind do not change the answers).
    return StagePlan(stage="generations",
                     config={"decoding": decoding_identity(cfg), "dtype": dtype, "limit": prompts.limit,
                             "split": prompts.split},
                     inputs={"model": model.key, "prompts": data_digest(prompts.path, storage_options),
                             **({"adapter": adapter.key} if adapter else {})})


def generate_stage(store: ArtifactStore, model: ArtifactRef, adapter: ArtifactRef | None, prompts: PromptSetConfig,
                   cfg: GenerationConfig, dtype: str = "float32", storage_options: dict | None = None,
                   force: bool = False, progress: bool = True, guard=None) -> StageOutcome:
    """A model's answers to a prompt set (see toss_core.generation)."""
    from toss_core.generation import produce_generations

    def compute(writer, key):
        produce_generations(writer, model_path(store, model), store.local_dir(adapter) if adapter else None,
                            prompts, cfg, dtype=dtype, storage_options=storage_options, progress=progress)

    return _run(store, generate_plan(model, adapter, prompts, cfg, dtype, storage_options), compute, force, guard)


# ---- judgements and comparisons -------------------------------------------------------------------

def judge_plan(generations: ArtifactRef, judge: JudgeConfig, kind: str) -> StagePlan:
    from toss_core.judges import make_judge

    return StagePlan(stage="judgements", config={"judge": make_judge(judge).identity(), "kind": kind},
                     inputs={"generations": generations.key})


def judge_stage(store: ArtifactStore, generations: ArtifactRef, judge: JudgeConfig, kind: str,
                force: bool = False) -> StageOutcome:
    """One judge's ratings of a model's answers (refusal, harmfulness)."""

    def compute(writer, key):
        produce_judgements(writer, local_files(store, generations), judge, kind)

    return _run(store, judge_plan(generations, judge, kind), compute, force)


def produce_judgements(writer, generation_files: list[str], judge_cfg: JudgeConfig, kind: str) -> None:
    """`judgements.parquet` (prompt_id, refused, harm, raw) and the rates in the manifest metrics."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from toss_core.generation import read_generations
    from toss_core.judges import make_judge

    gens = read_generations(generation_files)
    judge = make_judge(judge_cfg)
    ratings = judge.rate(list(zip(gens.column("prompt").to_pylist(), gens.column("response").to_pylist())), kind)
    table = pa.table({"prompt_id": gens.column("prompt_id"), "refused": [r.refused for r in ratings],
                      "harm": pa.array([r.harm for r in ratings], pa.float32()), "raw": [r.raw for r in ratings]})
    with writer.open("judgements.parquet", "wb") as f:
        pq.write_table(table, f)
    refused = [r.refused for r in ratings if r.refused is not None]
    harms = [r.harm for r in ratings if r.harm is not None]
    writer.metrics.update(
        judge=judge_cfg.name, kind=kind, n=len(ratings),
        refusal_rate=100.0 * sum(refused) / len(refused) if refused else None,
        harm_mean=sum(harms) / len(harms) if harms else None,
        harm_unparsed=sum(r.harm is None for r in ratings) if judge_cfg.kind == "openai" else 0,
        **_client_counters(judge), **_judge_metrics(judge))


def compare_plan(candidate: ArtifactRef, reference: ArtifactRef, judge: JudgeConfig, kind: str) -> StagePlan:
    from toss_core.judges import make_judge

    return StagePlan(stage="comparisons", config={"judge": make_judge(judge).identity(), "kind": kind},
                     inputs={"candidate": candidate.key, "reference": reference.key})


def compare_stage(store: ArtifactStore, candidate: ArtifactRef, reference: ArtifactRef, judge: JudgeConfig,
                  kind: str, force: bool = False) -> StageOutcome:
    """Pairwise judgements of a model's answers against the reference model's, in both orders."""

    def compute(writer, key):
        produce_comparisons(writer, local_files(store, candidate), local_files(store, reference), judge, kind)

    return _run(store, compare_plan(candidate, reference, judge, kind), compute, force)


def produce_comparisons(writer, candidate_files: list[str], reference_files: list[str], judge_cfg: JudgeConfig,
                        kind: str) -> None:
    """`comparisons.parquet` (prompt_id, forward, backward, score) and the win rate in the metrics."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from toss_core.generation import read_generations
    from toss_core.judges import make_judge, win_rate, win_scores

    cand, ref = read_generations(candidate_files), read_generations(reference_files)
    if cand.column("prompt_id").to_pylist() != ref.column("prompt_id").to_pylist() or \
            cand.column("prompt").to_pylist() != ref.column("prompt").to_pylist():
        raise ValueError("comparisons: the two generation tables answer different prompts (another prompt set or "
                         "limit?); compare answers to the same prompt set only")
    judge = make_judge(judge_cfg)
    forward, backward = win_scores(judge, cand.column("prompt").to_pylist(), cand.column("response").to_pylist(),
                                   ref.column("response").to_pylist(), kind)
    scores = [(f + b) / 2 for f, b in zip(forward, backward)]
    table = pa.table({"prompt_id": cand.column("prompt_id"), "forward": pa.array(forward, pa.float32()),
                      "backward": pa.array(backward, pa.float32()), "score": pa.array(scores, pa.float32())})
    with writer.open("comparisons.parquet", "wb") as f:
        pq.write_table(table, f)
    writer.metrics.update(judge=judge_cfg.name, kind=kind, n=len(scores), win_rate=win_rate(forward, backward),
                          wins=sum(s == 1.0 for s in scores), ties=sum(s == 0.5 for s in scores),
                          losses=sum(s == 0.0 for s in scores), unparsed=getattr(judge, "unparsed", 0),
                          **_client_counters(judge), **_judge_metrics(judge))


def _client_counters(judge) -> dict:
    client = getattr(judge, "_client", None)
    return {"requests": client.requests, "cache_hits": client.cache_hits} if client is not None else {}


def _judge_metrics(judge) -> dict:
    """A judge's own numbers for the manifest (the classifier: its held-out accuracy and inference time)."""
    metrics = getattr(judge, "metrics", None)
    return metrics() if callable(metrics) else {}


# ---- baseline masks -----------------------------------------------------------------------------

def baseline_mask_plan(method: str, tokens: ArtifactRef, scores: dict[str, list[ArtifactRef]], budget: int,
                       seed: int) -> StagePlan:
    inputs = {"tokens": tokens.key,
              **{f"{role}{i}": r.key for role in sorted(scores) for i, r in enumerate(scores[role])}}
    return StagePlan(stage="baseline-mask", inputs=inputs,
                     config={"method": method, "budget": budget, "seed": seed if method == "random" else None})


def baseline_mask_stage(store: ArtifactStore, method: str, tokens: ArtifactRef, scores: dict[str, list[ArtifactRef]],
                        budget: int, seed: int = 0, force: bool = False) -> StageOutcome:
    """A baseline's mask over the custom set (see toss_core.baselines), same format as TOSS's."""
    from toss_core.baselines import write_baseline_mask

    def compute(writer, key):
        files = {role: [f for r in refs for f in local_files(store, r)] for role, refs in scores.items()}
        with writer.open("mask.parquet", "wb") as f:
            stats = write_baseline_mask(method, local_files(store, tokens), files, budget, seed, f)
        writer.write_json("stats.json", stats)
        writer.metrics.update({k: v for k, v in stats.items() if not isinstance(v, (dict, list))})

    return _run(store, baseline_mask_plan(method, tokens, scores, budget, seed), compute, force)


# ---- report -------------------------------------------------------------------------------------

class Measured(BaseModel):
    """One measurement artifact of a subject: which prompt set and judge, and the seed it counts for."""

    ref: ArtifactRef
    set: str | None = None
    judge: str | None = None
    seed: int | None = None


class Subject(BaseModel):
    """One evaluated model: a method fine-tuned with one seed, or the base model (seed None)."""

    method: str
    seed: int | None = None
    adapter: ArtifactRef | None = None
    mask: ArtifactRef | None = None
    utility: ArtifactRef | None = None
    judgements: list[Measured] = Field(default_factory=list)
    comparisons: list[Measured] = Field(default_factory=list)


class ReportSpec(BaseModel):
    title: str
    methods: list[str]  # row order
    sets: list[tuple[str, str]]  # (name, kind), column order
    judges: list[str]
    pairwise: list[str]  # judges that measured win rates
    seeds: list[int]
    tokens: ArtifactRef  # the custom token table (ground truth of the oracle, if any)
    subjects: list[Subject]
    notes: list[str] = Field(default_factory=list)
    meta: dict[str, Any] = Field(default_factory=dict)


def _keys_only(value):
    """A spec as the report's identity: every ArtifactRef replaced by its key (no store URIs)."""
    if isinstance(value, dict):
        if set(value) == {"uri", "stage", "key", "digest"}:
            return value["key"]
        return {k: _keys_only(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_keys_only(v) for v in value]
    return value


def report_plan(spec: ReportSpec) -> StagePlan:
    identity = _keys_only(spec.model_dump(mode="json"))
    inputs = {"tokens": spec.tokens.key}
    for s in spec.subjects:
        tag = f"{s.method}|{'-' if s.seed is None else s.seed}"
        for what in ("adapter", "mask", "utility"):
            if (ref := getattr(s, what)) is not None:
                inputs[f"{tag}|{what}"] = ref.key
        for m in s.judgements + s.comparisons:
            inputs[f"{tag}|{m.ref.stage}|{m.set}|{m.judge}|{m.seed}"] = m.ref.key
    return StagePlan(stage="report", config=identity, inputs=inputs)


def report_stage(store: ArtifactStore, spec: ReportSpec, force: bool = False) -> StageOutcome:
    """The table, scatter and JSON of an evaluation, from the measurements' manifests."""

    def compute(writer, key):
        produce_report(writer, store, spec)

    return _run(store, report_plan(spec), compute, force)


def collect_records(store: ArtifactStore, spec: ReportSpec, read=None) -> list[dict]:
    """One record per measured number (see toss_core.report), read from manifests and mask tables; refusal
    records carry their counts (`refused`, `rated`) from the judgements tables (`read`: a `refused_reader`)."""
    from toss_core.baselines import read_mask_quality

    read = read or refused_reader(store)
    kinds = dict(spec.sets)
    records: list[dict] = []

    def add(method, seed, metric, value, set_name=None, judge=None, **counts):
        if value is not None:
            records.append({"method": method, "seed": seed, "metric": metric, "set": set_name, "judge": judge,
                            "value": float(value), **counts})

    masks_seen: set[tuple[str, str]] = set()
    for s in spec.subjects:
        if s.utility is not None:
            add(s.method, s.seed, "utility-loss", _metrics(store, s.utility).get("mean_loss"))
        for m in s.judgements:
            got = _metrics(store, m.ref)
            if kinds[m.set] == "harmful":
                counts = {}
                if got.get("refusal_rate") is not None:  # the counts behind the rate, for the pooled column
                    refused = [r for r in read(m.ref).values() if r is not None]
                    counts = {"refused": sum(refused), "rated": len(refused)}
                add(s.method, s.seed, "refusal", got.get("refusal_rate"), m.set, m.judge, **counts)
                add(s.method, s.seed, "harm", got.get("harm_mean"), m.set, m.judge)
            else:
                add(s.method, s.seed, "over-refusal", got.get("refusal_rate"), m.set, m.judge)
        for m in s.comparisons:
            add(s.method, m.seed, "win", _metrics(store, m.ref).get("win_rate"), m.set, m.judge)
        if s.method == "standard":
            for set_name, _ in spec.sets:
                for judge in spec.pairwise:
                    add(s.method, s.seed, "win", 50.0, set_name, judge)  # by construction
            if ("standard", "") not in masks_seen:  # no mask: nothing discarded, whatever the seed
                masks_seen.add(("standard", ""))
                add(s.method, None, "discarded", 0.0)
        if s.mask is not None:
            seed = s.seed if s.method == "random" else None  # one mask for every seed: count it once
            if (s.method, s.mask.key) in masks_seen:
                continue
            masks_seen.add((s.method, s.mask.key))
            q = read_mask_quality(local_files(store, spec.tokens), local_files(store, s.mask))
            add(s.method, seed, "discarded", 100 * q["discarded_share"])
            add(s.method, seed, "precision", None if q.get("precision") is None else 100 * q["precision"])
            add(s.method, seed, "recall", None if q.get("recall") is None else 100 * q["recall"])
    return records


def refused_reader(store: ArtifactStore) -> Callable[[ArtifactRef], dict]:
    """A reader of judgements artifacts, each read once: ref -> {prompt_id: refused (None: the judge did not say)}."""
    import pyarrow.parquet as pq

    seen: dict[str, dict] = {}

    def read(ref: ArtifactRef) -> dict:
        if ref.key not in seen:
            out: dict = {}
            for path in local_files(store, ref):
                table = pq.read_table(path, columns=["prompt_id", "refused"])
                out.update(zip(table.column("prompt_id").to_pylist(), table.column("refused").to_pylist()))
            seen[ref.key] = out
        return seen[ref.key]

    return read


def collect_agreement(store: ArtifactStore, spec: ReportSpec, read=None) -> dict[tuple[str, str], list[int]]:
    """(judge A, judge B) -> [both refused, only A, only B, neither]: every answer two judges both rated
    `refused` (same generations: same subject and prompt set), pooled over methods, seeds and prompt sets.
    Pairs in `spec.judges` order; judges that never say `refused` (the rubric-only LLM judge) drop out."""
    read = read or refused_reader(store)
    order = {j: i for i, j in enumerate(spec.judges)}
    tables: dict[tuple[str, str], list[int]] = {}
    for s in spec.subjects:
        by_set: dict[str, dict[str, ArtifactRef]] = {}
        for m in s.judgements:
            by_set.setdefault(m.set, {})[m.judge] = m.ref
        for refs in by_set.values():
            if len(refs) < 2:
                continue
            judged = {j: read(ref) for j, ref in refs.items()
                      if _metrics(store, ref).get("refusal_rate") is not None}
            names = sorted(judged, key=lambda j: (order.get(j, len(order)), j))
            for i, a in enumerate(names):
                for b in names[i + 1:]:
                    t = tables.setdefault((a, b), [0, 0, 0, 0])
                    for pid, ra in judged[a].items():
                        rb = judged[b].get(pid)
                        if ra is None or rb is None:
                            continue
                        t[0 if ra and rb else 1 if ra else 2 if rb else 3] += 1
    return tables


def _metrics(store: ArtifactStore, ref: ArtifactRef) -> dict:
    manifest = store.manifest(ref.stage, ref.key)
    if manifest is None:
        raise FileNotFoundError(f"{ref.uri}: no manifest (was the store garbage-collected?); rerun the evaluation")
    return manifest.metrics


def produce_report(writer, store: ArtifactStore, spec: ReportSpec) -> None:
    import json
    import tempfile
    from pathlib import Path

    from toss_core.report import judge_agreement, scatter_png, summarize, to_html, to_json, to_markdown

    read = refused_reader(store)
    records = collect_records(store, spec, read)
    agreement = judge_agreement(collect_agreement(store, spec, read))
    meta = {**spec.meta, "title": spec.title, "sets": [list(s) for s in spec.sets], "seeds": spec.seeds}
    summary = summarize(records, spec.methods, spec.sets, spec.judges, spec.notes, meta, agreement)
    markdown = to_markdown(summary, spec.title)
    with writer.open("report.md", "wb") as f:
        f.write(markdown.encode())
    with writer.open("results.json", "wb") as f:
        f.write(to_json({**summary, "records": records}).encode())
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "scatter.png"
        image = png.read_bytes() if scatter_png(summary, png) else None
    if image is not None:
        with writer.open("scatter.png", "wb") as f:
            f.write(image)
    with writer.open("report.html", "wb") as f:  # one self-contained file: the table and the plot inline
        f.write(to_html(markdown, image, spec.title).encode())
    writer.metrics.update(rows=len(summary["rows"]), columns=[c["id"] for c in summary["columns"]],
                          records=len(records), table=json.loads(json.dumps(_compact(summary))),
                          agreement={" / ".join(r["judges"]): {"n": r["n"], "agreement": r["agreement"],
                                                               "kappa": r["kappa"]} for r in agreement})


def _compact(summary: dict) -> dict:
    """method -> column -> mean: the headline numbers, readable with `toss store show`."""
    return {row["method"]: {c: cell["mean"] for c, cell in row["cells"].items()} for row in summary["rows"]}


# ---- runners ------------------------------------------------------------------------------------

class StageRunner(Protocol):
    """Runs the evaluation's stages: `submit(what, label, **stage kwargs)` starts one (or runs it), `result`
    waits for its ArtifactRef. `what` is a key of STEP_OF; the kwargs are the stage function's own."""

    def submit(self, what: str, label: str, **kwargs) -> Any: ...

    def result(self, handle: Any) -> ArtifactRef: ...


# what (a stage kind) -> the pipeline step whose --force recomputes it
STEP_OF = {"tokens": "prepare", "score": "score", "train": "finetune", "baseline_mask": "select",
           "generate": "evaluate", "judge": "evaluate", "compare": "evaluate", "report": "evaluate"}


class PlainRunner:
    """Runs each stage at once, in this process, in submission order."""

    def __init__(self, store: ArtifactStore, *, force: tuple[str, ...] | list[str] = (), progress: bool = True,
                 storage_options: dict | None = None,
                 on_stage: Callable[[str, StageOutcome], Any] | None = None):
        self.store, self.force, self.progress = store, set(force), progress
        self.storage_options, self.on_stage = storage_options, on_stage

    def submit(self, what: str, label: str, **kw) -> StageOutcome:
        store, force, progress = self.store, STEP_OF[what] in self.force, self.progress
        calls = {
            "tokens": lambda: tokenize_stage(store, storage_options=self.storage_options, force=force, **kw),
            "score": lambda: score_stage(store, force=force, progress=progress, **kw),
            "train": lambda: train_stage(store, force=force, progress=progress, **kw),
            "baseline_mask": lambda: baseline_mask_stage(store, force=force, **kw),
            "generate": lambda: generate_stage(store, storage_options=self.storage_options, force=force,
                                               progress=progress, **kw),
            "judge": lambda: judge_stage(store, force=force, **kw),
            "compare": lambda: compare_stage(store, force=force, **kw),
            "report": lambda: report_stage(store, force=force, **kw),
        }
        outcome = calls[what]()
        if self.on_stage:
            self.on_stage(label, outcome)
        return outcome

    def result(self, handle: StageOutcome) -> ArtifactRef:
        return handle.ref


# ---- the DAG ------------------------------------------------------------------------------------

class EvalInputs(BaseModel):
    """What the pipeline hands to the evaluation: the base model, the custom token table, its round-0
    score tables and the TOSS masks ("toss": round 0; "toss-pro": the final round of a TOSS-Pro run)."""

    model: ArtifactRef
    custom: ArtifactRef
    utility_scores: list[ArtifactRef]
    safety_scores: list[ArtifactRef]
    masks: dict[str, ArtifactRef]


class EvalResult(BaseModel):
    report: ArtifactRef
    markdown: str
    methods: list[str]
    notes: list[str]


def resolve_methods(store: ArtifactStore, cfg: PipelineConfig, inputs: EvalInputs) -> tuple[list[str], list[str]]:
    """The methods to run, with a note for every one added or left out (never silently)."""
    from toss_core.baselines import harmful_flags
    from toss_core.tables import TOKENS_SCHEMA, read_table

    methods, notes = list(cfg.eval.methods), []
    if "toss-pro" in inputs.masks and "toss-pro" not in methods:
        at = methods.index("toss") + 1 if "toss" in methods else len(methods)
        methods.insert(at, "toss-pro")
        notes.append(f"toss-pro: the final mask of this TOSS-Pro run ({cfg.pro.rounds} rounds, mode {cfg.pro.mode})")
    if "toss-pro" in methods and "toss-pro" not in inputs.masks:
        methods.remove("toss-pro")
        notes.append("toss-pro: left out, this is not a TOSS-Pro run (toss run --pro)")
    if "oracle" in methods:
        tokens = read_table(local_files(store, inputs.custom), TOKENS_SCHEMA, columns=["sample_id", "meta"])
        if harmful_flags(tokens) is None:
            methods.remove("oracle")
            notes.append("oracle: left out, the custom data has no `is_harmful` field on every record "
                         "(mask precision/recall need it too)")
    return methods, notes


def _budget(store: ArtifactStore, mask: ArtifactRef) -> int:
    return int(_metrics(store, mask)["discarded_tokens"])


def _build_masks(runner: StageRunner, store: ArtifactStore, cfg: PipelineConfig, inputs: EvalInputs,
                 methods: list[str]) -> dict[tuple[str, int | None], ArtifactRef | None]:
    """Phase 1: the mask of every method; key (method, seed) for the random mask, (method, None) otherwise."""
    from toss_core.baselines import needed_scores

    budget = _budget(store, inputs.masks["toss"])
    scores = {"utility": inputs.utility_scores, "safety": inputs.safety_scores}
    if any("base" in needed_scores(m) for m in methods):  # the reference-free control: the base model's losses
        n = cfg.score.shards
        scores["base"] = [runner.result(h) for h in [
            runner.submit("score", f"eval score base {i + 1}/{n}", model=inputs.model, adapter=None,
                          tokens=inputs.custom, shard=i, cfg=cfg.score) for i in range(n)]]
    masks: dict[tuple[str, int | None], Any] = {}
    for m in methods:
        if m == "standard":
            masks[(m, None)] = None
        elif m in SEEDLESS_MASKS:
            masks[(m, None)] = inputs.masks[m]
        else:
            for seed in (cfg.eval.seeds if m == "random" else [None]):
                masks[(m, seed)] = runner.submit(
                    "baseline_mask", f"eval mask {m}" + ("" if seed is None else f" s{seed}"), method=m,
                    tokens=inputs.custom, scores={r: scores[r] for r in needed_scores(m)}, budget=budget,
                    seed=seed or 0)
    return {k: v if v is None or isinstance(v, ArtifactRef) else runner.result(v) for k, v in masks.items()}


def _finetune(runner: StageRunner, cfg: PipelineConfig, inputs: EvalInputs, methods: list[str],
              masks: dict) -> list[Subject]:
    """Phase 2: one selective fine-tune per method and seed (TOSS's own fine-tune is reused when it matches)."""
    handles = []
    for m in methods:
        for seed in cfg.eval.seeds:
            mask = masks.get((m, seed), masks.get((m, None)))
            sources = [TrainSource(tokens=inputs.custom)] if mask is None else \
                [TrainSource(tokens=inputs.custom, mask=mask, labels="keep")]
            role = "finetune" if m in SEEDLESS_MASKS else f"finetune-{m}"
            h = runner.submit("train", f"eval train {m} s{seed}", role=role, model=inputs.model, sources=sources,
                              cfg=cfg.finetune.model_copy(update={"seed": seed}), dtype=cfg.model.dtype)
            handles.append((m, seed, mask, h))
    return [Subject(method=m, seed=s, mask=mask, adapter=runner.result(h)) for m, s, mask, h in handles]


def _generate_and_score(runner: StageRunner, cfg: PipelineConfig, inputs: EvalInputs,
                        subjects: list[Subject]) -> dict[tuple[str, int | None, str], ArtifactRef]:
    """Phase 3: every subject answers every prompt set; its loss on the held-out utility answers."""
    ev = cfg.eval
    utility_tokens = None
    if ev.utility is not None:
        data = cfg.data.model_copy(update={"limit": ev.utility_limit})
        utility_tokens = runner.result(runner.submit("tokens", "eval prepare utility answers", model=inputs.model,
                                                     source=ev.utility, data=data))
    score_cfg = ScoreConfig(shards=1, max_tokens_per_batch=cfg.score.max_tokens_per_batch,
                            precision=cfg.score.precision)
    gens, utility = {}, {}
    for s in subjects:
        tag = s.method + ("" if s.seed is None else f" s{s.seed}")
        for p in ev.prompts:
            gens[(s.method, s.seed, p.name)] = runner.submit(
                "generate", f"eval generate {tag} {p.name}", model=inputs.model, adapter=s.adapter, prompts=p,
                cfg=ev.generation, dtype=cfg.model.dtype)
        if utility_tokens is not None:
            utility[id(s)] = runner.submit("score", f"eval utility loss {tag}", model=inputs.model,
                                           adapter=s.adapter, tokens=utility_tokens, shard=0, cfg=score_cfg)
    for s in subjects:
        if id(s) in utility:
            s.utility = runner.result(utility[id(s)])
    return {k: runner.result(h) for k, h in gens.items()}


def _judge(runner: StageRunner, cfg: PipelineConfig, subjects: list[Subject], gens: dict) -> None:
    """Phase 4: every judge rates every generation set; pairwise judges compare with standard SFT."""
    from toss_core.judges import make_judge

    ev = cfg.eval
    pending = []
    for s in subjects:
        tag = s.method + ("" if s.seed is None else f" s{s.seed}")
        for p in ev.prompts:
            mine = gens[(s.method, s.seed, p.name)]
            for j in ev.judges:
                if make_judge(j).rates(p.kind):
                    h = runner.submit("judge", f"eval judge {j.name} {tag} {p.name}", generations=mine, judge=j,
                                      kind=p.kind)
                    pending.append((s.judgements, Measured(ref=mine, set=p.name, judge=j.name, seed=s.seed), h))
                if not j.pairwise or s.method == "standard":
                    continue
                # Paired by seed; the base model (no seed) against standard SFT of every seed.
                for seed in ([s.seed] if s.seed is not None else ev.seeds):
                    ref = gens[("standard", seed, p.name)]
                    h = runner.submit("compare", f"eval compare {j.name} {tag} vs standard s{seed} {p.name}",
                                      candidate=mine, reference=ref, judge=j, kind=p.kind)
                    pending.append((s.comparisons, Measured(ref=mine, set=p.name, judge=j.name, seed=seed), h))
    for target, measured, h in pending:
        target.append(measured.model_copy(update={"ref": runner.result(h)}))


def _notes(cfg: PipelineConfig, methods: list[str], budget: int, pairwise: list[str]) -> list[str]:
    """What a reader of the table needs to know to interpret it."""
    ev, gen = cfg.eval, cfg.eval.generation
    notes = [f"{len(methods)} methods x seeds {ev.seeds} (the fine-tune seed)",
             (f"token budget of every token-level mask: {budget} response tokens (what TOSS discards at "
              f"select.ratio={cfg.select.ratio}, mode {cfg.select.mode})")]
    if pairwise:
        notes.append(f"win rates vs standard SFT by judge(s) {', '.join(pairwise)}: both orders, ties half; "
                     "standard = 50 by construction")
    sampling = f", top_p {gen.top_p}, temperature {gen.temperature}, seed {gen.seed}" if gen.decoding == "sample" else ""
    notes.append(f"decoding: {gen.decoding}{sampling}, repetition penalty {gen.repetition_penalty}, "
                 f"max {gen.max_new_tokens} new tokens")
    return notes


def run_evaluation(store: ArtifactStore, cfg: PipelineConfig, inputs: EvalInputs, runner: StageRunner) -> EvalResult:
    """Masks -> fine-tunes -> generations and utility losses -> judges -> report (see module docstring)."""
    ev = cfg.eval
    methods, notes = resolve_methods(store, cfg, inputs)
    masks = _build_masks(runner, store, cfg, inputs, methods)
    subjects = _finetune(runner, cfg, inputs, methods, masks)
    if ev.include_base:
        subjects.insert(0, Subject(method="base", seed=None))
    gens = _generate_and_score(runner, cfg, inputs, subjects)
    _judge(runner, cfg, subjects, gens)

    budget = _budget(store, inputs.masks["toss"])
    pairwise = [j.name for j in ev.judges if j.pairwise] if ev.prompts else []
    notes = _notes(cfg, methods, budget, pairwise) + notes
    spec = ReportSpec(title=f"TOSS evaluation: {cfg.name}", methods=(["base"] if ev.include_base else []) + methods,
                      sets=[(p.name, p.kind) for p in ev.prompts], judges=[j.name for j in ev.judges],
                      pairwise=pairwise, seeds=ev.seeds, tokens=inputs.custom,
                      subjects=subjects, notes=notes,
                      meta={"name": cfg.name, "budget": budget, "generation": ev.generation.model_dump(mode="json"),
                            "utility": ev.utility})
    report = runner.result(runner.submit("report", "eval report", spec=spec))
    markdown = store.open(report, "report.md").read().decode()
    return EvalResult(report=report, markdown=markdown, methods=methods, notes=notes)
