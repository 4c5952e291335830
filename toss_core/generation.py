"""Answers of a model (base + optional adapter) to a prompt set: the `generations` stage (SPEC section 6).

    prompts = load_prompts("eval/hexphi.jsonl", limit=100)
    answers = generate(model, tokenizer, [p.text for p in prompts], [p.prompt_id for p in prompts], GenerationConfig())
    outcome = generate_stage(store, model_ref, adapter_ref, PromptSetConfig(...), GenerationConfig())

Generations are their own cached artifact, keyed by (model, adapter, prompt set content, decoding config):
changing the judge never regenerates. The output is `generations.parquet`:

    prompt_id int64 | prompt string | system string | response string | new_tokens int32 | stopped bool
    | meta string (JSON: the record's other fields, e.g. a category) | decoding string (JSON)

Prompts are rendered with the tokenizer's chat template (add_generation_prompt), or the reference template
ending in "Assistant:", and padded on the left. Sampling (SEAL's defaults: top_p 0.9, temperature 1.0,
repetition penalty 1.2) draws from one private `torch.Generator` per prompt, seeded by (seed, prompt_id):
a prompt's answer does not depend on the batch it was generated in, on batch size, or on other threads
using torch's global RNG (Prefect runs stages in threads, and training calls `torch.manual_seed`).
Technically, the penalty, temperature and top-p processors are HF's own, and a last processor draws the
token and leaves it the only finite logit; `generate` then runs in greedy mode and takes it.
"""

from __future__ import annotations

import json
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from toss_core.config import GenerationConfig, PromptSetConfig
from toss_core.data import DataError
from toss_core.progress import progress_bar

GENERATIONS_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.int64()),
        ("prompt", pa.string()),
        ("system", pa.string()),
        ("response", pa.string()),
        ("new_tokens", pa.int32()),
        ("stopped", pa.bool_()),
        ("meta", pa.string()),
        ("decoding", pa.string()),
    ]
)
_PROMPT_FIELDS = ("prompt", "instruction", "question")


@dataclass(frozen=True)
class Prompt:
    prompt_id: int  # 0-based record index in the prompt set
    text: str
    system: str = ""
    meta: dict = field(default_factory=dict)


# ---- prompt sets --------------------------------------------------------------------------------

def load_prompts(source: str, *, storage_options: dict | None = None, split: str = "train",
                 limit: int | None = None) -> list[Prompt]:
    """The prompts of a prompt set: records with a `prompt` (or `instruction`, `question`) field, or any
    layout of `toss_core.data` (then the first user turn is the prompt; answers in the file are ignored)."""
    # The data loader's record reader, so prompt sets come from the same sources (files, folders, s3://,
    # datasets) as training data. Its conversation check needs an assistant turn; prompt sets have none.
    from toss_core.data import _records

    prompts: list[Prompt] = []
    with closing(_records(source, storage_options or {}, split)) as records:
        for record in records:
            prompts.append(_prompt_of(record, len(prompts)))
            if len(prompts) == limit:
                break
    if not prompts:
        raise DataError(f"{source}: no prompts found")
    return prompts


def _prompt_of(record, prompt_id: int) -> Prompt:
    from toss_core.data import _conversation, _present

    value = record.value
    if not isinstance(value, dict):
        raise DataError(f"{record.where}: record: expected a JSON object, got {type(value).__name__}")
    fields = _present(value)
    system = fields.get("system") if isinstance(fields.get("system"), str) else ""
    scalar_meta = lambda used: {k: v for k, v in fields.items()
                                if k not in used and k != "system" and isinstance(v, (str, int, float, bool))}
    for key in _PROMPT_FIELDS:
        if isinstance(fields.get(key), str) and fields[key].strip():
            text = fields[key]
            if key == "instruction" and isinstance(fields.get("input"), str) and fields["input"].strip():
                text += "\n\n" + fields["input"]  # as the data loader renders alpaca records
            return Prompt(prompt_id, text, system, scalar_meta({key, "input", *_ANSWER_FIELDS}))
    for key in ("messages", "conversations", "prompt"):
        if isinstance(fields.get(key), list):
            turns = [t for t in fields[key] if isinstance(t, dict)]
            user = next((t for t in turns if t.get("role") == "user" or t.get("from") == "human"), None)
            if user is not None and isinstance(user.get("content", user.get("value")), str):
                sys_turn = next((t for t in turns if t.get("role") == "system" or t.get("from") == "system"), None)
                if sys_turn is not None:
                    system = sys_turn.get("content", sys_turn.get("value")) or system
                return Prompt(prompt_id, user.get("content", user.get("value")), system,
                              scalar_meta({key, *_ANSWER_FIELDS}))
    conversation = _conversation(record)  # raises the loader's DataError, naming the record and its fields
    first_user = next(m for m in conversation.messages if m.role == "user")
    sys_msg = next((m.content for m in conversation.messages if m.role == "system"), "")
    return Prompt(prompt_id, first_user.content, sys_msg, dict(conversation.meta))


_ANSWER_FIELDS = ("response", "completion", "output", "answer", "chosen", "rejected")


# ---- rendering and decoding ---------------------------------------------------------------------

def render_prompt(tokenizer, text: str, system: str = "") -> str:
    """The text a model continues: its chat template with the generation prompt, or the reference
    template up to "Assistant:" (no trailing space: BPE merges the space into the first answer token,
    as it did when the training data was tokenized)."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    head = f"<|system|>\n{system}\n" if system else ""
    return (tokenizer.bos_token or "") + f"{head}Human: {text}\nAssistant:"


def prompt_seed(seed: int, prompt_id: int) -> int:
    """The private sampling seed of one prompt: independent streams for every (seed, prompt) pair."""
    return int(np.random.SeedSequence([seed, prompt_id]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _seeded_sampler(generators: list[torch.Generator]):
    """A logits processor that samples one token per row from softmax(scores), each row with its own
    generator, and returns scores where only that token is finite (so greedy decoding takes it)."""
    from transformers import LogitsProcessor

    class SeededSampler(LogitsProcessor):
        def __call__(self, input_ids, scores):
            probs = torch.softmax(scores.float(), dim=-1).cpu()
            picked = torch.stack([torch.multinomial(probs[i], 1, generator=g)[0] for i, g in enumerate(generators)])
            out = torch.full_like(scores, -float("inf"))
            out[torch.arange(len(picked)), picked.to(scores.device)] = 0.0
            return out

    return SeededSampler()


def _processors(cfg: GenerationConfig, generators: list[torch.Generator] | None):
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if cfg.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty))
    if cfg.decoding == "sample":
        if cfg.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_p < 1.0:
            procs.append(TopPLogitsWarper(cfg.top_p))
        procs.append(_seeded_sampler(generators))
    return procs


def decoding_identity(cfg: GenerationConfig) -> dict:
    """What changes the answers (the cache key); batch size only changes speed."""
    out = cfg.model_dump(mode="json", exclude={"batch_size"})
    if cfg.decoding == "greedy":  # sampling settings do not apply
        out.pop("temperature"), out.pop("top_p"), out.pop("seed")
    return out


def stop_ids(model, tokenizer) -> list[int]:
    """End-of-turn ids: the tokenizer's EOS and the model's own (Llama-3 chat models end a turn with
    <|eot_id|> while some tokenizer versions call <|end_of_text|> their EOS)."""
    ids = [tokenizer.eos_token_id]
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += own if isinstance(own, list) else [own]
    out = list(dict.fromkeys(i for i in ids if i is not None))
    if not out:
        raise ValueError("the tokenizer has no EOS token and the model's generation config names none: "
                         "answers would never end; set tokenizer.eos_token")
    return out


@torch.no_grad()
def generate(model, tokenizer, texts: list[str], prompt_ids: list[int], cfg: GenerationConfig,
             progress=None) -> list[tuple[str, int, bool]]:
    """(answer, new tokens, stopped at EOS) for each rendered prompt text, in input order."""
    from transformers import GenerationConfig as HFGenerationConfig

    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    eos = stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    # Greedy in HF's terms in both modes: for sampling, our last processor has already drawn the token.
    hf_cfg = HFGenerationConfig(do_sample=False, max_new_tokens=cfg.max_new_tokens, pad_token_id=pad,
                                eos_token_id=eos, num_beams=1)
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: (-lengths[i], i))  # similar lengths share a batch: less padding
    out: list[tuple[str, int, bool] | None] = [None] * len(texts)
    done = 0
    for lo in range(0, len(order), cfg.batch_size):
        rows = order[lo : lo + cfg.batch_size]
        enc = tokenizer([texts[i] for i in rows], add_special_tokens=False, padding=True, return_tensors="pt")
        gens = [torch.Generator().manual_seed(prompt_seed(cfg.seed, prompt_ids[i])) for i in rows]
        seqs = model.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                              generation_config=hf_cfg, logits_processor=_processors(cfg, gens))
        new = seqs[:, enc["input_ids"].shape[1]:].cpu().numpy()
        for row, i in enumerate(rows):
            ids = new[row]
            stop = np.flatnonzero(np.isin(ids, eos))
            n = int(stop[0]) if len(stop) else len(ids)
            out[i] = (tokenizer.decode(ids[:n], skip_special_tokens=True).strip(), n, bool(len(stop)))
        done += len(rows)
        if progress:
            progress(done, len(texts))
    return out  # type: ignore[return-value]


# ---- the stage ----------------------------------------------------------------------------------

def generations_table(prompts: list[Prompt], answers: list[tuple[str, int, bool]], cfg: GenerationConfig) -> pa.Table:
    decoding = json.dumps(decoding_identity(cfg), sort_keys=True)
    return pa.table(
        {
            "prompt_id": [p.prompt_id for p in prompts],
            "prompt": [p.text for p in prompts],
            "system": [p.system for p in prompts],
            "response": [a[0] for a in answers],
            "new_tokens": [a[1] for a in answers],
            "stopped": [a[2] for a in answers],
            "meta": [json.dumps(p.meta, sort_keys=True, default=str) for p in prompts],
            "decoding": [decoding] * len(prompts),
        },
        schema=GENERATIONS_SCHEMA,
    )


def produce_generations(writer, model_dir: Path, adapter_dir: Path | None, prompts_cfg: PromptSetConfig,
                        cfg: GenerationConfig, dtype: str = "float32", storage_options: dict | None = None,
                        progress: bool = True) -> None:
    """Answer a prompt set with base model (+ adapter): `generations.parquet` plus speed metrics."""
    from toss_core.models import load_tokenizer, load_with_adapter

    prompts = load_prompts(prompts_cfg.path, storage_options=storage_options, split=prompts_cfg.split,
                           limit=prompts_cfg.limit)
    tokenizer = load_tokenizer(model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_with_adapter(model_dir, adapter_dir, dtype=dtype, device=device)
    if adapter_dir is not None and hasattr(model, "merge_and_unload"):
        # A LoRA merged into the weights answers the same (to float rounding) and decodes faster: no adapter
        # matmuls and wrapper calls at every layer of every step.
        model = model.merge_and_unload()
    texts = [render_prompt(tokenizer, p.text, p.system) for p in prompts]
    t0 = time.perf_counter()
    answers = generate(model, tokenizer, texts, [p.prompt_id for p in prompts], cfg,
                       progress=progress_bar(f"generate {prompts_cfg.name}", progress, "prompt"))
    seconds = time.perf_counter() - t0
    with writer.open("generations.parquet", "wb") as f:
        pq.write_table(generations_table(prompts, answers, cfg), f)
    new_tokens = sum(a[1] for a in answers)
    writer.metrics.update(prompts=len(prompts), prompt_set=prompts_cfg.name, new_tokens=new_tokens,
                          seconds=round(seconds, 3), tokens_per_second=round(new_tokens / max(seconds, 1e-9), 1),
                          stopped_share=sum(a[2] for a in answers) / len(answers))


def read_generations(files: list[str]) -> pa.Table:
    from toss_core.tables import check_columns

    parts = []
    for f in files:
        table = pq.read_table(f)
        check_columns(table, GENERATIONS_SCHEMA, f)
        parts.append(table)
    return pa.concat_tables(parts).sort_by("prompt_id")
