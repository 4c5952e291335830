"""Multi-GPU stages on CPU: a training stage with `train.gpus: 2` runs under torchrun (2 gloo processes).

The batch is chosen so a step does not split evenly over the ranks (13 samples, batch 4: the last step
has ONE sample, so rank 1 has none): before the fix rank 1 skipped the gradient all-reduce and the run
hung. Both engines (DDP through Accelerate, DeepSpeed ZeRO-2) must finish, publish one adapter through
the store, checkpoint through a folder both ranks see, and train the same adapter as one process.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from tests.factories import token_table
from toss_core.config import ModelConfig, TrainConfig
from toss_core.faults import ENV
from toss_core.launch import LaunchError
from toss_core.stages import TrainSource, base_model_stage, model_path, train_stage
from toss_core.store import ArtifactStore
from toss_core.train_data import Example
from toss_core.training import rank_micro_batches

N_SAMPLES = 13  # batch 4: steps of 4, 4, 4 and 1 sample


def _cfg(**kw) -> TrainConfig:
    base = dict(lr=5e-3, batch_size=4, micro_batch_size=2, epochs=1, log_every=1, seed=1, packing=False,
                checkpoint_every=2, lora={"dropout": 0.0})
    return TrainConfig(**{**base, **kw})


def _store_with_tokens(root, model_dir):
    store = ArtifactStore(str(root))
    model = base_model_stage(store, ModelConfig(path=str(model_dir))).ref
    with store.writer("tokens", "t" * 16, config={}, inputs={}) as w, w.open("tokens.parquet", "wb") as f:
        pq.write_table(token_table([10 + 3 * i for i in range(N_SAMPLES)], seed=3), f)
    return store, model, [TrainSource(tokens=w.ref)]


def _train(tmp_path, model_dir, name: str, **kw):
    store, model, sources = _store_with_tokens(tmp_path / name, model_dir)
    out = train_stage(store, "safety", model, sources, _cfg(**kw), progress=False)
    manifest = store.manifest(out.ref.stage, out.ref.key)
    return load_file(str(model_path(store, out.ref) / "adapter_model.safetensors")), manifest.metrics


def test_every_rank_runs_the_same_number_of_micro_batches():
    batch = [Example(i, np.arange(5 + i, dtype=np.int32), np.ones(5 + i, bool)) for i in range(5)]
    for size in (1, 5):  # a rank with no sample at all, and a rank one sample short
        plans = [rank_micro_batches(batch[:size], r, 2, 2, False, 64) for r in range(2)]
        assert len({len(plan) for _, plan, _ in plans}) == 1
        used = [mine[i] for mine, plan, _ in plans for mb in plan for row in mb for i in row]
        real = sorted(e.sample_id for e in used if e.labels.any())
        assert real == list(range(size))  # every sample exactly once; the padding has no label
        assert all(not e.labels.any() for e in used if not any(e is b for b in batch))


@pytest.mark.slow
def test_two_process_stage_matches_one_process_ddp_and_zero2(tiny_model_dir, tmp_path):
    one, _ = _train(tmp_path, tiny_model_dir, "one")
    for name, extra in (("ddp", {}), ("zero2", {"deepspeed": {"zero_optimization": {"stage": 2}}})):
        two, metrics = _train(tmp_path, tiny_model_dir, name, gpus=2, **extra)
        assert metrics["processes"] == 2 and metrics["steps"] == 4, metrics
        assert metrics["engine"] == ("deepspeed" if extra else "accelerate")
        assert one.keys() == two.keys()
        for k in one:
            torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")
    assert any(v.abs().sum() > 0 for k, v in one.items() if "lora_B" in k)  # training moved the adapter


@pytest.mark.slow
def test_a_failing_rank_surfaces_as_a_launch_error(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "train@1")
    store, model, sources = _store_with_tokens(tmp_path / "s", tiny_model_dir)
    with pytest.raises(LaunchError, match=r"(?s)train safety \(2 processes\).*InjectedFault"):
        train_stage(store, "safety", model, sources, _cfg(gpus=2), progress=False)
    assert not list((tmp_path / "s" / "train").glob("*/MANIFEST.json"))  # nothing published
