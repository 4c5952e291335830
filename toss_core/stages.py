"""Pipeline stages over the artifact store: compute an artifact once, reuse it forever after.

Each stage function takes the store, its own config and the refs of its inputs, and returns a
`StageOutcome` (the output's ArtifactRef, whether it was reused, seconds). The artifact key is
hash(stage, VERSION, the stage's config, the keys of its inputs); if a manifest with that key is in
the store, the stage returns it without computing. Bump a stage's VERSION when its logic changes.

    model   = base_model_stage(store, cfg.model)
    tokens  = tokenize_stage(store, model.ref, cfg.data.custom, cfg.data)
    adapter = train_stage(store, "safety", model.ref, [TrainSource(harmful.ref)], cfg.reference)
    scores  = score_stage(store, model.ref, adapter.ref, tokens.ref, shard=0, shards=4, cfg=cfg.score)
    mask    = select_stage(store, tokens.ref, [utility scores], [safety scores], cfg.select)

Prefect tasks (tasks/) are thin wrappers over these; `toss_core.pipeline` chains them without Prefect.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import time
from contextlib import ExitStack, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import fsspec
from pydantic import BaseModel

from toss_core.config import DataConfig, ModelConfig, ScoreConfig, SelectConfig, TrainConfig
from toss_core.faults import maybe_fail
from toss_core.progress import progress_bar
from toss_core.store import ArtifactRef, ArtifactStore, artifact_key

# The demo's stages (toss_core/demo/stages.py) are versioned here too: one table of every stage.
VERSIONS = {"model": 1, "tokens": 1, "train": 1, "scores": 1, "mask": 3,
            "model-import": 1, "demo-data": 2, "demo-sets": 1, "merged-model": 1}
EXTERNAL_MODEL = "external-model"


class StagePlan(BaseModel):
    """What an artifact is made from: its key is known before anything is computed."""

    stage: str
    config: dict
    inputs: dict[str, str]

    @property
    def key(self) -> str:
        return artifact_key(self.stage, VERSIONS[self.stage], self.config, self.inputs)


class StageOutcome(BaseModel):
    ref: ArtifactRef
    reused: bool
    seconds: float


class TrainSource(BaseModel):
    """One part of a training set: a token table, optionally with a mask that decides the labels."""

    tokens: ArtifactRef
    mask: ArtifactRef | None = None
    labels: Literal["response", "keep", "flagged"] = "response"
    only_samples: list[int] | None = None  # TOSS-Pro 'samples' mode: just these samples, whole

    def identity(self) -> dict:
        return {"tokens": self.tokens.key, "mask": self.mask.key if self.mask else None, "labels": self.labels,
                "only_samples": self.only_samples}


def _run(store: ArtifactStore, plan: StagePlan, compute, force: bool = False, guard=None) -> StageOutcome:
    """The caching contract shared by every stage: look up the key, else compute and publish.

    `guard` (a context manager, e.g. a GPU concurrency slot) is entered only when computing."""
    key, t0 = plan.key, time.perf_counter()
    if not force and (ref := store.ref(plan.stage, key)) is not None:
        return StageOutcome(ref=ref, reused=True, seconds=time.perf_counter() - t0)
    maybe_fail(plan.stage)
    with guard or nullcontext(), store.writer(plan.stage, key, config=plan.config, inputs=plan.inputs) as writer:
        started = _now()
        compute(writer, key)
        # Where and when it ran: which worker process, which GPUs (parallel stages are visible side by side).
        writer.metrics.update(pid=os.getpid(), host=socket.gethostname(),
                              cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
                              started_at=started, finished_at=_now())
    return StageOutcome(ref=writer.ref, reused=False, seconds=time.perf_counter() - t0)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def local_files(store: ArtifactStore, ref: ArtifactRef, suffix: str = ".parquet") -> list[str]:
    """Local paths of an artifact's files (downloaded once if the store is remote; digests checked)."""
    return sorted(str(p) for p in store.local_files(ref, suffix))


def model_path(store: ArtifactStore, ref: ArtifactRef) -> Path:
    return Path(ref.uri) if ref.stage == EXTERNAL_MODEL else Path(store.local_dir(ref))


# ---- base model ---------------------------------------------------------------------------------

def base_model_stage(store: ArtifactStore, cfg: ModelConfig, force: bool = False) -> StageOutcome:
    """A local model folder as-is (keyed by a fingerprint), or a tiny random model built into the store."""
    if cfg.path is not None:
        from toss_core.models import model_fingerprint

        fp = model_fingerprint(cfg.path)
        ref = ArtifactRef(uri=str(Path(cfg.path).resolve()), stage=EXTERNAL_MODEL, key=fp, digest=fp)
        return StageOutcome(ref=ref, reused=True, seconds=0.0)

    def compute(writer, key):
        from toss_core.models import build_tiny_model

        with tempfile.TemporaryDirectory() as tmp:
            build_tiny_model(cfg.tiny, tmp)
            writer.put_dir(tmp)

    return _run(store, StagePlan(stage="model", config={"tiny": cfg.tiny.model_dump()}, inputs={}), compute, force)


# ---- tokenize -----------------------------------------------------------------------------------

def data_digest(source: str, storage_options: dict | None = None) -> str:
    """Content digest of a data file or folder (a dataset name is its own identity)."""
    if source.startswith(("hf://", "datasets:")):
        return "name:" + source
    fs, path = fsspec.core.url_to_fs(source, **(storage_options or {}))
    files = sorted(fs.find(path)) if fs.isdir(path) else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.rsplit("/", 1)[-1].encode())
        with fs.open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:24]


def tokenize_plan(model: ArtifactRef, source: str, data: DataConfig, storage_options: dict | None = None) -> StagePlan:
    return StagePlan(stage="tokens", config={"max_len": data.max_len, "limit": data.limit},
                     inputs={"model": model.key, "data": data_digest(source, storage_options)})


def tokenize_stage(store: ArtifactStore, model: ArtifactRef, source: str, data: DataConfig,
                   storage_options: dict | None = None, force: bool = False) -> StageOutcome:
    def compute(writer, key):
        produce_tokens(writer, source, model_path(store, model), data, storage_options)

    return _run(store, tokenize_plan(model, source, data, storage_options), compute, force)


def produce_tokens(writer, source: str, model_dir: Path, data: DataConfig, storage_options: dict | None = None):
    """Load a data set, tokenize it with the model's tokenizer, write `tokens.parquet`."""
    from toss_core.data import load_conversations
    from toss_core.models import load_tokenizer
    from toss_core.tokenization import tokenize_conversations, write_token_table

    conversations = load_conversations(source, storage_options=storage_options, limit=data.limit)
    table, stats = tokenize_conversations(conversations, load_tokenizer(model_dir), data.max_len)
    with writer.open("tokens.parquet", "wb") as f:
        write_token_table(table, f)
    writer.metrics.update(stats.as_metrics(), source=source)


# ---- train --------------------------------------------------------------------------------------

class StoreCheckpoints:
    """training.Checkpoints bound to one (stage, key) of the store."""

    def __init__(self, store: ArtifactStore, stage: str, key: str):
        self.store, self.stage, self.key = store, stage, key

    def latest(self):
        return self.store.latest_checkpoint(self.stage, self.key)

    def save(self, step: int, local_dir: Path) -> None:
        self.store.save_checkpoint(self.stage, self.key, step, local_dir)
        self.store.prune_checkpoints(self.stage, self.key, keep_last=1)


def load_examples(store: ArtifactStore, sources: list[TrainSource]):
    from toss_core.tables import TOKENS_SCHEMA, read_mask, read_table
    from toss_core.train_data import examples_from_tokens, with_mask

    examples = []
    for src in sources:
        tokens = read_table(local_files(store, src.tokens), TOKENS_SCHEMA)
        if src.mask is None:
            only = set(src.only_samples) if src.only_samples is not None else None
            examples += examples_from_tokens(tokens, only=only)
        else:
            examples += with_mask(tokens, read_mask(local_files(store, src.mask)), src.labels)
    return examples


def train_plan(role: str, model: ArtifactRef, sources: list[TrainSource], cfg: TrainConfig,
               dtype: str = "float32") -> StagePlan:
    # Packing and the process count change speed, not the result (beyond float rounding): not in the key.
    config = {"role": role, "train": cfg.model_dump(mode="json", exclude={"packing", "gpus"}), "dtype": dtype,
              "sources": [s.identity() for s in sources]}
    inputs = {"model": model.key, **{f"source{i}": s.tokens.key for i, s in enumerate(sources)},
              **{f"mask{i}": s.mask.key for i, s in enumerate(sources) if s.mask}}
    return StagePlan(stage="train", config=config, inputs=inputs)


def train_stage(store: ArtifactStore, role: str, model: ArtifactRef, sources: list[TrainSource], cfg: TrainConfig,
                dtype: str = "float32", force: bool = False, progress: bool = True,
                on_step=None, guard=None) -> StageOutcome:
    """A LoRA adapter on the base model; `role` names it (safety, utility, finetune, safety-r1, ...)."""

    def compute(writer, key):
        if cfg.gpus > 1:  # torchrun child processes; the store carries examples in and checkpoints out
            produce_adapter_in_processes(writer, store, model_path(store, model), sources, cfg, dtype=dtype,
                                         checkpoint_key=key, desc=f"train {role}")
        else:
            produce_adapter(writer, model_path(store, model), load_examples(store, sources), cfg, dtype=dtype,
                            checkpoints=StoreCheckpoints(store, "train", key), desc=f"train {role}",
                            progress=progress, on_step=on_step)
        writer.metrics["role"] = role

    return _run(store, train_plan(role, model, sources, cfg, dtype), compute, force, guard)


def produce_adapter(writer, model_dir: Path, examples, cfg: TrainConfig, *, dtype: str = "float32",
                    checkpoints=None, desc: str = "train", progress: bool = True, on_step=None) -> None:
    """Train a LoRA adapter and publish it in PEFT's format (loadable by PeftModel.from_pretrained)."""
    from toss_core.training import train_lora

    with tempfile.TemporaryDirectory() as tmp:
        metrics = train_lora(model_dir, examples, cfg, tmp, dtype=dtype, checkpoints=checkpoints, desc=desc,
                             progress=progress, on_step=on_step)
        writer.put_dir(tmp)
    writer.metrics.update({k: v for k, v in metrics.items() if k != "history"})


def produce_adapter_in_processes(writer, store: ArtifactStore, model_dir: Path, sources: list[TrainSource],
                                 cfg: TrainConfig, *, dtype: str, checkpoint_key: str, desc: str) -> None:
    """The same adapter trained by `cfg.gpus` processes under torchrun; published once, from here."""
    from toss_core.launch import TrainJob, train_in_processes

    with tempfile.TemporaryDirectory() as tmp:
        job = TrainJob(model_dir=str(model_dir), store_url=store.root_uri, storage_options=store.storage_options,
                       sources=sources, cfg=cfg, dtype=dtype, checkpoint_key=checkpoint_key, desc=desc, out_dir=tmp)
        metrics = train_in_processes(job, cfg.gpus)
        writer.put_dir(tmp)
    writer.metrics.update({k: v for k, v in metrics.items() if k != "history"})


# ---- score --------------------------------------------------------------------------------------

def shard_rows(n_rows: int, shard: int, shards: int) -> tuple[int, int]:
    """Contiguous row range of a shard: shards differ by at most one row."""
    return n_rows * shard // shards, n_rows * (shard + 1) // shards


def score_plan(model: ArtifactRef, adapter: ArtifactRef | None, tokens: ArtifactRef, shard: int,
               cfg: ScoreConfig) -> StagePlan:
    # The batch token budget and packing change speed, not results, so they are not part of the key.
    return StagePlan(stage="scores", config={"shard": shard, "shards": cfg.shards, "precision": cfg.precision},
                     inputs={"model": model.key, "tokens": tokens.key, **({"adapter": adapter.key} if adapter else {})})


def score_stage(store: ArtifactStore, model: ArtifactRef, adapter: ArtifactRef | None, tokens: ArtifactRef,
                shard: int, cfg: ScoreConfig, force: bool = False, progress: bool = True, guard=None) -> StageOutcome:

    def compute(writer, key):
        produce_scores(writer, model_path(store, model), store.local_dir(adapter) if adapter else None,
                       local_files(store, tokens), shard, cfg, progress=progress)

    return _run(store, score_plan(model, adapter, tokens, shard, cfg), compute, force, guard)


def produce_scores(writer, model_dir: Path, adapter_dir: Path | None, token_files: list[str], shard: int,
                   cfg: ScoreConfig, progress: bool = True) -> None:
    """Per-token losses of one shard of a token table under base model (+ adapter): `scores-<shard>.parquet`."""
    from toss_core.models import load_with_adapter
    from toss_core.scoring import score_tokens
    from toss_core.tables import TOKENS_SCHEMA, read_table, write_scores

    table = read_table(token_files, TOKENS_SCHEMA)
    lo, hi = shard_rows(table.num_rows, shard, cfg.shards)
    net = load_with_adapter(model_dir, adapter_dir, dtype="bfloat16" if cfg.precision == "bf16" else "float32",
                            device=_device())
    pad = net.config.pad_token_id or 0
    scores, metrics = score_tokens(net, table.slice(lo, hi - lo), cfg.max_tokens_per_batch, pad_id=pad,
                                   progress=progress_bar(f"score shard {shard + 1}/{cfg.shards}", progress, "tok", True),
                                   packing=cfg.packing)
    with writer.open(f"scores-{shard:05d}.parquet", "wb") as f:
        write_scores(scores, f)
    writer.metrics.update(metrics, rows=[lo, hi])


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---- select -------------------------------------------------------------------------------------

def select_plan(tokens: ArtifactRef, utility: list[ArtifactRef], safety: list[ArtifactRef],
                cfg: SelectConfig) -> StagePlan:
    inputs = {"tokens": tokens.key, **{f"utility{i}": r.key for i, r in enumerate(utility)},
              **{f"safety{i}": r.key for i, r in enumerate(safety)}}
    return StagePlan(stage="mask", config=cfg.model_dump(mode="json"), inputs=inputs)


def select_stage(store: ArtifactStore, tokens: ArtifactRef, utility: list[ArtifactRef], safety: list[ArtifactRef],
                 cfg: SelectConfig, force: bool = False) -> StageOutcome:

    def compute(writer, key):
        files = lambda refs: [f for r in refs for f in local_files(store, r)]  # noqa: E731
        produce_mask(writer, local_files(store, tokens), files(utility), files(safety), cfg)

    return _run(store, select_plan(tokens, utility, safety, cfg), compute, force)


def produce_mask(writer, token_files: list[str], utility_files: list[str], safety_files: list[str],
                 cfg: SelectConfig) -> None:
    """Select tokens: `mask-00000.parquet`... (cfg.mask_files files, one table of discarded positions) plus
    `stats.json` (the headline numbers also go in the manifest)."""
    from toss_core.selection import select_tokens

    with ExitStack() as files:
        sinks = [files.enter_context(writer.open(f"mask-{i:05d}.parquet", "wb")) for i in range(cfg.mask_files)]
        stats = select_tokens(token_files, utility_files, safety_files, cfg, sinks)
    writer.write_json("stats.json", stats)
    writer.metrics.update({k: v for k, v in stats.items() if not isinstance(v, (dict, list))})
