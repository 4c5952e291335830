"""Shared fixtures: a tiny random Llama with a locally trained tokenizer (built once per session)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from toss_core.config import TinyModelConfig
    from toss_core.models import build_tiny_model

    return build_tiny_model(TinyModelConfig(seed=0), tmp_path_factory.mktemp("tiny") / "model")
