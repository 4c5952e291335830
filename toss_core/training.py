"""The one LoRA training loop: both reference models, the selective fine-tune and TOSS-Pro rounds.

    metrics = train_lora(base_dir, examples, TrainConfig(...), out_dir, checkpoints=ckpt)

What it does, top to bottom (the loop reads like the recipe in SPEC section 4):
- a fresh LoRA adapter on the base model, AdamW, constant or cosine schedule with warm-up;
- step s of epoch e takes `batch_size` samples of a permutation seeded by (seed, e), so the data
  order is a function of the step number: a resumed run continues with exactly the same batches;
- each step is split into micro-batches (gradient accumulation); losses are normalised by the kept
  tokens of the WHOLE step ('token') or per sample then over the step's samples ('sample'), so heavily
  masked micro-batches are not over-weighted, and a sample with no kept token adds exactly zero;
- grad clipping, bf16 autocast if asked, gradient checkpointing if asked;
- every `checkpoint_every` steps: adapter + optimizer + scheduler + RNG + step saved through
  `checkpoints` (the artifact store); on start the newest complete checkpoint is restored.
Accelerate places the model and handles data parallelism; a DeepSpeed config in `cfg.deepspeed` runs
the same loop on a DeepSpeed engine (ZeRO) instead (see `toss_core.distributed`).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from toss_core.config import TrainConfig
from toss_core.faults import maybe_fail
from toss_core.models import attach_lora, load_model
from toss_core.packing import Batch, label_targets, layout, micro_batches, supports_packing
from toss_core.train_data import Example


class Checkpoints(Protocol):
    """Where resumable state goes (the artifact store binds it to a stage and key)."""

    def latest(self) -> tuple[int, Path] | None: ...
    def save(self, step: int, local_dir: Path) -> None: ...


class TrainingError(RuntimeError):
    pass


# ---- schedule and data order --------------------------------------------------------------------

def plan_steps(n_examples: int, cfg: TrainConfig) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps)."""
    per_epoch = math.ceil(n_examples / cfg.batch_size)
    total = math.ceil(cfg.epochs * per_epoch)
    return per_epoch, min(total, cfg.max_steps) if cfg.max_steps else total


def step_indices(step: int, n_examples: int, per_epoch: int, cfg: TrainConfig) -> np.ndarray:
    epoch, j = divmod(step, per_epoch)
    perm = np.random.default_rng([cfg.seed, epoch]).permutation(n_examples)
    return perm[j * cfg.batch_size : (j + 1) * cfg.batch_size]


def lr_lambda(cfg: TrainConfig, total_steps: int):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def collate(examples: list[Example], pad_id: int, rows: list[list[int]] | None = None,
            packed: bool = False) -> Batch:
    """Examples as a batch: one per row, right-padded (default), or `rows` of indices packed together.
    The labels go in `extra["labels"]` at the tokens' positions."""
    rows = rows if rows is not None else [[i] for i in range(len(examples))]
    return layout([e.input_ids for e in examples], rows, pad_id, packed, {"labels": [e.labels for e in examples]})


def rank_micro_batches(batch: list[Example], rank: int, world_size: int, micro_batch_size: int, packing: bool,
                       hidden_size: int) -> tuple[list[Example], list[list[list[int]]], bool]:
    """This process's samples of a step, as micro-batches (rows of indices into the samples), and whether
    they are packed.

    One process: every sample; similar lengths share a micro-batch, or packed rows (less padding); the
    step's loss is a sum, so the grouping is neutral. Several processes: samples `rank::world_size`, and
    EVERY rank runs the same number of micro-batches: a rank short of samples (a short last batch) gets
    blank ones (a sample with no label: zero loss, zero gradient) so it still joins each gradient
    all-reduce instead of leaving the others waiting forever."""
    if world_size == 1:
        return batch, *micro_batches(np.array([len(e.input_ids) for e in batch]), micro_batch_size, packing,
                                     hidden_size)
    mine = batch[rank::world_size]
    plan, _ = micro_batches(np.array([len(e.input_ids) for e in mine], dtype=np.int64), micro_batch_size, False)
    needed = math.ceil(math.ceil(len(batch) / world_size) / micro_batch_size)
    if len(plan) < needed:
        blank = batch[0]
        mine = [*mine, Example(blank.sample_id, blank.input_ids, np.zeros_like(blank.labels))]
        plan += [[[len(mine) - 1]]] * (needed - len(plan))
    return mine, plan, False


def _sum_over_processes(value: float, engine) -> float:
    """A step's loss is split over ranks: the logged value is their sum."""
    if engine.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=engine.device)  # NCCL reduces GPU tensors only
    torch.distributed.all_reduce(t)
    return float(t.item())


# ---- loss ---------------------------------------------------------------------------------------

def per_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) float32 losses; position t holds -log P(token t | < t); position 0 is 0."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(nll, (1, 0))


def label_nll(model, batch: Batch, single_process: bool = True) -> torch.Tensor:
    """(rows, width) float32 losses at label positions (`label_targets`), 0 elsewhere.

    The output layer and log-softmax run only where a label is (a 49k-vocabulary head over every prompt
    and padding position is ~20% of a small model's compute, and B x T x V floats of memory). Models wrapped
    for several processes (DDP, DeepSpeed) go through their own forward: their hooks need it."""
    targets = label_targets(batch)
    if not single_process or hasattr(model, "module"):
        logits = model(input_ids=batch.input_ids, **batch.model_kwargs()).logits
        return per_token_nll(logits, batch.input_ids) * targets
    from toss_core.scoring import _decoder_and_head

    body, head = _decoder_and_head(model)
    hidden = body(input_ids=batch.input_ids, **batch.model_kwargs()).last_hidden_state
    pred_pos = torch.zeros_like(targets)
    pred_pos[:, :-1] = targets[:, 1:]  # position t is predicted from the hidden state at t-1
    logits = head(hidden[pred_pos]).float()
    nll = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    nll[targets] = torch.nn.functional.cross_entropy(logits, batch.input_ids[targets], reduction="none")
    return nll


def masked_loss(nll: torch.Tensor, labels: torch.Tensor, norm: str, step_tokens: int, step_samples: int,
                sample_of: torch.Tensor | None = None) -> torch.Tensor:
    """This micro-batch's share of the step loss (sums to the step mean over all micro-batches).

    'token': sum of kept-token losses / kept tokens of the step.
    'sample': sum over samples of (mean kept-token loss of the sample) / samples of the step with any
    kept token; `sample_of` (rows, width: the sample of each position, -1 on padding) tells packed samples
    apart, else each row is one sample. A sample with no kept token adds 0 in both (never 0/0 = NaN).
    """
    kept = nll * labels
    if norm == "token":
        return kept.sum() / max(step_tokens, 1)
    if sample_of is None:
        per_sample = kept.sum(dim=1) / labels.sum(dim=1).clamp(min=1)
    else:
        n = int(sample_of.max()) + 1 if sample_of.numel() else 0
        owner = sample_of.clamp(min=0)
        sums = torch.zeros(n, dtype=kept.dtype, device=kept.device).index_add(0, owner.flatten(), kept.flatten())
        counts = torch.zeros(n, dtype=kept.dtype, device=kept.device).index_add(0, owner.flatten(),
                                                                              labels.flatten().to(kept.dtype))
        per_sample = sums / counts.clamp(min=1)
    return per_sample.sum() / max(step_samples, 1)


# ---- checkpoints --------------------------------------------------------------------------------

def _rng_state() -> dict:
    # Tensors, tuples and numbers only, so the file loads with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- the loop -----------------------------------------------------------------------------------

def train_lora(
    base_dir: str | Path,
    examples: list[Example],
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    checkpoints: Checkpoints | None = None,
    desc: str = "train",
    progress: bool = True,
    fault_stage: str = "train",
    on_step: Callable[[int, int, dict], None] | None = None,
) -> dict:
    """Train a fresh LoRA adapter on `examples`; save it (PEFT format) to `out_dir`; return metrics."""
    from toss_core.distributed import make_engine, safe_load

    if not examples:
        raise TrainingError(f"{desc}: no training examples (is the data set empty, or every label masked?)")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    model = attach_lora(load_model(base_dir, dtype=dtype), cfg.lora, seed=cfg.seed)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    per_epoch, total_steps = plan_steps(len(examples), cfg)
    engine = make_engine(model, cfg, total_steps, lr_lambda(cfg, total_steps))
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    # Packed micro-batches (one process): same loss and gradients as padded ones, less padding.
    packing = cfg.packing and engine.world_size == 1 and supports_packing(model)
    hidden_size = int(getattr(model.config, "hidden_size", 1024))

    start_step = 0
    if checkpoints is not None and (found := checkpoints.latest()) is not None:
        start_step, path = found
        engine.load_state(path)
        _set_rng_state(safe_load(Path(path) / "rng.pt"))
        engine.print(f"{desc}: resuming from the checkpoint at step {start_step}/{total_steps}")

    history: list[dict] = []
    tokens_seen, real, positions, packed_steps, t0 = 0, 0, 0, 0, time.perf_counter()
    bar = tqdm(total=total_steps, initial=start_step, desc=desc, disable=not (progress and engine.is_main), unit="step")
    autocast = (
        torch.autocast(device_type=engine.device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext()
    )
    for step in range(start_step, total_steps):
        batch = [examples[i] for i in step_indices(step, len(examples), per_epoch, cfg)]
        step_tokens = int(sum(e.labels.sum() for e in batch))
        step_samples = sum(1 for e in batch if e.labels.any())
        mine, plan, packed = rank_micro_batches(batch, engine.rank, engine.world_size, cfg.micro_batch_size,
                                                packing, hidden_size)
        packed_steps += packed
        real += sum(len(e.input_ids) for e in mine)
        step_loss = 0.0
        for k, rows in enumerate(plan):
            b = collate(mine, pad_id, rows, packed).to(engine.device)
            positions += b.input_ids.numel()
            with engine.accumulating(last=k == len(plan) - 1), autocast:
                nll = label_nll(engine.model, b, single_process=engine.world_size == 1)
                loss = masked_loss(nll, label_targets(b), cfg.loss_norm, step_tokens, step_samples, b.sample_of)
            engine.backward(loss)
            step_loss += loss.item()
        engine.step(cfg.grad_clip)
        step_loss = _sum_over_processes(step_loss, engine)
        tokens_seen += step_tokens
        done = step + 1
        if done % cfg.log_every == 0 or done == total_steps:
            rate = tokens_seen / max(time.perf_counter() - t0, 1e-9)
            row = {"step": done, "loss": round(step_loss, 6), "lr": engine.lr(), "tokens": step_tokens,
                   "tokens_per_second": round(rate, 1)}
            history.append(row)
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{rate:,.0f}")
            if on_step:  # e.g. a Prefect progress artifact
                on_step(done, total_steps, row)
        bar.update(1)
        if checkpoints is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < total_steps:
            _save_checkpoint(engine, checkpoints, done)
        maybe_fail(fault_stage, done)
    bar.close()

    out = Path(out_dir)
    engine.save_adapter(out)
    metrics = {
        "steps": total_steps,
        "resumed_from_step": start_step,
        "examples": len(examples),
        "label_tokens_per_epoch": int(sum(e.labels.sum() for e in examples)),
        "seconds": round(time.perf_counter() - t0, 3),
        "final_loss": history[-1]["loss"] if history else None,
        "packed_steps": packed_steps,
        "padding_share": round(1 - real / positions, 4) if positions else 0.0,
        "history": history,
        "engine": engine.kind,
        **engine.describe(),
    }
    if engine.is_main:
        (out / "train_config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
        (out / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
    engine.close()
    return metrics


def _save_checkpoint(engine, checkpoints: Checkpoints, step: int) -> None:
    """Every rank writes its part (DeepSpeed: its optimizer shard) into ONE folder; rank 0 uploads it."""
    with _shared_tmpdir(engine) as tmp:
        engine.save_state(tmp)
        if engine.is_main:
            torch.save(_rng_state(), tmp / "rng.pt")
        if engine.world_size > 1:
            torch.distributed.barrier()
        if engine.is_main:
            checkpoints.save(step, tmp)


@contextmanager
def _shared_tmpdir(engine):
    """A temporary folder every process of the run sees (rank 0 makes it and tells the others; the
    processes of one stage share a machine)."""
    folder = [tempfile.mkdtemp(prefix="toss-ckpt-") if engine.is_main else None]
    if engine.world_size > 1:
        torch.distributed.broadcast_object_list(folder, src=0)
    try:
        yield Path(folder[0])
    finally:
        if engine.world_size > 1:
            torch.distributed.barrier()  # nobody still writing when rank 0 removes it
        if engine.is_main:
            shutil.rmtree(folder[0], ignore_errors=True)
