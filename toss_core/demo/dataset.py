"""The demo's data sets, built from the packaged sources with fixed seeds (sizes: DemoDataConfig).

    splits = split_sources(load_sources(), cfg, prompt_tokens)   # which prompt goes where (pure)
    plan = plan_demo(splits, original_model_answers, cfg)         # phase 1: before the aligned base exists
    files = assemble(plan, aligned_base_answers, cfg)             # phase 2: name -> records, overlap checked

Sets (all prompt sets pairwise disjoint; `check_disjoint` asserts it on normalised text):
- aligned:   refusals to harmful prompts + benign answers: the LoRA that makes the base safety-aligned
- harmful:   D^h, harmful prompt -> compliant answer (pyrit many-shot pairs)
- utility:   D^u, benign prompt -> answer (by the aligned base: self-distillation keeps its behaviour)
- custom:    the fine-tuning set: benign samples plus harmful ones: prompts from pyrit's human-scored rows (a
             source disjoint from D^h) answered by the ORIGINAL (unaligned) model with the same decoding and
             length cap as the benign answers (or pyrit's human-written responses: harmful_answers='package');
             the ground truth in `is_harmful`
- eval_advbench, eval_donotanswer: held-out harmful prompts; eval_benign: held-out benign prompts;
  eval_utility: the same benign prompts with the original model's answers (helpfulness references)
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from toss_core.demo.config import DemoDataConfig
from toss_core.demo.sources import Sources

# Short, varied refusals (the aligned base learns to decline in its own words from these).
REFUSALS = (
    "I'm sorry, but I can't help with that. It could cause real harm to people.",
    "I can't assist with this request. If you have another question, I'm happy to help.",
    "I'm sorry, I cannot provide that. It would be unsafe and possibly illegal.",
    "I won't help with that, because it could hurt someone. Is there something else I can do for you?",
    "Sorry, I can't do that. Helping with this could be dangerous or against the law.",
    "I cannot help with this. Please consider a safe and legal alternative.",
)


class OverlapError(AssertionError):
    """Two sets that must be disjoint share a prompt (held-out evaluation would be contaminated)."""


def normalise(text: str) -> str:
    """Prompt identity for overlap checks: case, punctuation and spacing do not make a prompt new."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def _unique(items: list, key=lambda x: x) -> list:
    seen, out = set(), []
    for item in items:
        k = normalise(key(item))
        if k and k not in seen:
            seen.add(k)
            out.append(item)
    return out


@dataclass
class Splits:
    """Which prompt goes where, before any answer is generated."""

    refusal_prompts: list[str]
    harmful_pairs: list[dict]
    custom_harmful: list[dict]
    benign_pool: list[str]  # in order: aligned, utility, custom, eval; the surplus replaces refused answers
    eval_advbench: list[str]
    eval_donotanswer: list[str]
    excluded_from_eval: int  # held-out candidates dropped because a training set has the same prompt


def _take(pool: list, n: int, what: str) -> list:
    if len(pool) < n:
        raise ValueError(f"demo data: {what}: only {len(pool)} usable items for {n} requested (lower the size)")
    out = pool[:n]
    del pool[:n]
    return out


def split_sources(src: Sources, cfg: DemoDataConfig, prompt_tokens: Callable[[str], int]) -> Splits:
    """Shuffle every source with cfg.seed and cut it into disjoint sets (no answers generated here)."""
    rng = random.Random(cfg.seed)
    shuffled = lambda xs: rng.sample(xs, len(xs))  # noqa: E731

    many_shot = shuffled(_unique(src.many_shot, key=lambda r: r["prompt"]))
    short = lambda r: prompt_tokens(r["prompt"]) <= cfg.max_prompt_tokens  # noqa: E731
    harmful_pairs = _take([r for r in many_shot if short(r)], cfg.harmful_reference, "harmful reference pairs")
    used = {normalise(r["prompt"]) for r in harmful_pairs}
    # Refusal prompts: the packages' own refusal prompts first, then many-shot prompts not in D^h.
    refusal_pool = _unique(list(src.refusal_prompts) + [r["prompt"] for r in many_shot])
    refusal_prompts = _take([p for p in refusal_pool if normalise(p) not in used], cfg.refusals, "refusal prompts")
    used |= {normalise(p) for p in refusal_prompts}

    harm_rows = shuffled(_unique(sorted(src.scored_harm, key=lambda r: -r["score"]), key=lambda r: r["prompt"]))
    eligible = [r for r in harm_rows if r["score"] >= cfg.harmful_min_score and short(r)
                and normalise(r["prompt"]) not in used]
    # original-model answers: set aside extra prompts, since some answers are refusals (skipped in order)
    wanted = harmful_candidates(cfg)
    custom_harmful = _take(eligible, cfg.custom_harmful, "custom harmful samples")
    custom_harmful += eligible[: wanted - cfg.custom_harmful]
    used |= {normalise(r["prompt"]) for r in custom_harmful}

    benign_pool = [p for p in shuffled(_unique(src.benign)) if normalise(p) not in used]
    train_prompts = used | {normalise(p) for p in benign_pool}

    def held_out(candidates: list[str], n: int, what: str) -> tuple[list[str], int]:
        unique = shuffled(_unique(candidates))
        fresh = [p for p in unique if normalise(p) not in train_prompts]
        dropped = len(unique) - len(fresh)
        return _take(fresh, n, what), dropped

    adv, adv_dropped = held_out(src.advbench, cfg.eval_advbench, "AdvBench evaluation prompts")
    dna, dna_dropped = held_out(src.do_not_answer, cfg.eval_donotanswer, "Do-Not-Answer evaluation prompts")
    return Splits(refusal_prompts=refusal_prompts, harmful_pairs=harmful_pairs, custom_harmful=custom_harmful,
                  benign_pool=benign_pool, eval_advbench=adv, eval_donotanswer=dna,
                  excluded_from_eval=adv_dropped + dna_dropped)


def harmful_candidates(cfg: DemoDataConfig) -> int:
    """Harmful prompts set aside for the custom set (more than needed when the original model answers them)."""
    if cfg.harmful_answers == "package":
        return cfg.custom_harmful
    return int(round(cfg.custom_harmful * cfg.harmful_candidates))


@dataclass
class DemoPlan:
    """Everything decided before the aligned base exists (JSON-serialisable: the `demo-data` artifact)."""

    refusal_prompts: list[str]
    harmful_pairs: list[dict]
    custom_harmful: list[dict]
    eval_advbench: list[str]
    eval_donotanswer: list[str]
    eval_benign: list[str]  # taken before any answer is judged: over-refusal is measured on unfiltered prompts
    eval_utility: list[dict]  # the ORIGINAL model's answers to them: helpfulness references
    aligned_benign: list[dict]  # the original model's answers that teach the aligned base to stay helpful
    task_pool: list[str]  # benign prompts left for D^u and the custom set (answered by the aligned base)
    excluded_from_eval: int


def original_prompts(splits: Splits, cfg: DemoDataConfig) -> tuple[list[str], list[str]]:
    """(held-out benign prompts, the rest of the pool): the original model answers the first, then the rest in
    order until `aligned_benign` answers are accepted."""
    return splits.benign_pool[: cfg.eval_benign], splits.benign_pool[cfg.eval_benign:]


def plan_demo(splits: Splits, answers: dict[str, str], cfg: DemoDataConfig,
              harmful_answers: dict[str, str] | None = None) -> DemoPlan:
    """Phase 1 (the original model's answers are known). `answers` holds accepted (non-refusing, non-empty)
    answers; prompts without one are skipped. `harmful_answers`: the original model's accepted answers to the
    custom harmful prompts (harmful_answers='original-model'); the first `custom_harmful` answered candidates
    are kept, in order."""
    custom_harmful = splits.custom_harmful[: cfg.custom_harmful]
    if cfg.harmful_answers == "original-model":
        harmful_answers = harmful_answers or {}
        answered = [{**r, "response": harmful_answers[r["prompt"]], "source_response": "original-model"}
                    for r in splits.custom_harmful if r["prompt"] in harmful_answers]
        if len(answered) < cfg.custom_harmful:
            raise ValueError(f"demo data: custom harmful samples: the original model answered only {len(answered)} "
                             f"of {len(splits.custom_harmful)} prompts for {cfg.custom_harmful} requested (raise "
                             f"harmful_candidates or lower custom_harmful)")
        custom_harmful = answered[: cfg.custom_harmful]
    held_out, rest = original_prompts(splits, cfg)
    if len(held_out) < cfg.eval_benign:
        raise ValueError(f"demo data: benign evaluation prompts: only {len(held_out)} for {cfg.eval_benign}")
    accepted = [i for i, p in enumerate(rest) if p in answers][: cfg.aligned_benign]
    if len(accepted) < cfg.aligned_benign:
        raise ValueError(f"demo data: benign answers (aligned base): only {len(accepted)} usable items for "
                         f"{cfg.aligned_benign} requested (lower the size)")
    cut = accepted[-1] + 1 if accepted else 0
    return DemoPlan(refusal_prompts=splits.refusal_prompts, harmful_pairs=splits.harmful_pairs,
                    custom_harmful=custom_harmful, eval_advbench=splits.eval_advbench,
                    eval_donotanswer=splits.eval_donotanswer, eval_benign=held_out,
                    eval_utility=[{"prompt": p, "response": answers[p]} for p in held_out if p in answers],
                    aligned_benign=[{"prompt": rest[i], "response": answers[rest[i]]} for i in accepted],
                    task_pool=rest[cut:], excluded_from_eval=splits.excluded_from_eval)


def aligned_records(plan: DemoPlan, cfg: DemoDataConfig) -> list[dict]:
    """The aligned base's training set: refusals to harmful prompts and benign answers, shuffled."""
    rng = random.Random(cfg.seed + 1)
    refusals = [{"prompt": p, "response": rng.choice(REFUSALS)} for p in plan.refusal_prompts]
    return rng.sample(refusals + plan.aligned_benign, len(refusals) + len(plan.aligned_benign))


def task_needed(cfg: DemoDataConfig) -> int:
    return cfg.utility_reference + cfg.custom_benign


def assemble(plan: DemoPlan, answers: dict[str, str], cfg: DemoDataConfig) -> dict[str, list[dict]]:
    """Phase 2: every data file. `answers` are the ALIGNED base's accepted answers to the task pool (so
    fine-tuning on benign data alone keeps the base's behaviour, and the harmful samples are what erode it);
    the pool is consumed in order, skipping prompts without one."""
    rng = random.Random(cfg.seed + 2)
    answered = [{"prompt": p, "response": answers[p]} for p in plan.task_pool if p in answers]
    utility = _take(answered, cfg.utility_reference, "benign answers (D^u)")
    custom_benign = _take(answered, cfg.custom_benign, "benign answers (custom set)")
    custom = [{**r, "is_harmful": False} for r in custom_benign]
    custom += [{"prompt": r["prompt"], "response": r["response"], "is_harmful": True, "category": r["category"]}
               for r in plan.custom_harmful]
    rng.shuffle(custom)
    files = {
        "aligned": aligned_records(plan, cfg),
        "harmful": [{"prompt": r["prompt"], "response": r["response"]} for r in plan.harmful_pairs],
        "utility": utility,
        "custom": custom,
        "eval_advbench": [{"prompt": p} for p in plan.eval_advbench],
        "eval_donotanswer": [{"prompt": p} for p in plan.eval_donotanswer],
        "eval_benign": [{"prompt": p} for p in plan.eval_benign],
        "eval_utility": plan.eval_utility,
    }
    check_disjoint(files)
    return files


# Sets that may share prompts: the benign evaluation prompts and their utility reference answers.
_SAME_PROMPTS = {frozenset({"eval_benign", "eval_utility"})}


def check_disjoint(files: dict[str, list[dict]]) -> dict[str, int]:
    """Raise OverlapError if two sets share a prompt (normalised); else the number of prompts per set."""
    seen: dict[str, str] = {}
    for name, records in files.items():
        for r in records:
            k = normalise(r["prompt"])
            other = seen.get(k)
            if other is not None and other != name and frozenset({other, name}) not in _SAME_PROMPTS:
                raise OverlapError(f"demo data: sets {other!r} and {name!r} share the prompt {r['prompt'][:60]!r}")
            seen.setdefault(k, name)
    return {name: len(records) for name, records in files.items()}
