"""Training pins SPEC section 4: masked loss normalisation, all-discarded samples, exact resume."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from toss_core.config import TrainConfig
from toss_core.faults import ENV, InjectedFault
from toss_core.train_data import Example
from toss_core.training import collate, masked_loss, per_token_nll, plan_steps, step_indices, train_lora


def examples(n=24, seed=0, all_discarded=()):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ids = rng.integers(3, 400, size=int(rng.integers(8, 30))).astype(np.int32)
        labels = np.arange(len(ids)) >= 4
        if i in all_discarded:
            labels[:] = False
        out.append(Example(i, ids, labels))
    return out


class FolderCheckpoints:
    """The Checkpoints protocol on a local folder (the store implements it for real runs)."""

    def __init__(self, root: Path):
        self.root = root

    def latest(self):
        steps = sorted(int(p.name) for p in self.root.glob("*") if (p / "COMPLETE").exists())
        return (steps[-1], self.root / str(steps[-1])) if steps else None

    def save(self, step, local_dir):
        import shutil

        dest = self.root / str(step)
        shutil.copytree(local_dir, dest)
        (dest / "COMPLETE").touch()


def test_token_and_sample_normalisation_by_hand():
    nll = torch.tensor([[0.0, 1.0, 3.0, 5.0], [0.0, 2.0, 2.0, 2.0]])
    labels = torch.tensor([[False, True, True, False], [False, False, False, True]])
    # token: (1 + 3 + 2) / 3 kept tokens
    assert masked_loss(nll, labels, "token", step_tokens=3, step_samples=2).item() == pytest.approx(2.0)
    # sample: mean(2, 2) over 2 samples
    assert masked_loss(nll, labels, "sample", step_tokens=3, step_samples=2).item() == pytest.approx(2.0)
    # split over two micro-batches, the shares add up to the step mean (accumulation is exact)
    a = masked_loss(nll[:1], labels[:1], "token", 3, 2) + masked_loss(nll[1:], labels[1:], "token", 3, 2)
    assert a.item() == pytest.approx(2.0)


@pytest.mark.parametrize("norm", ["token", "sample"])
def test_all_discarded_sample_contributes_zero_not_nan(norm):
    nll = torch.tensor([[0.0, 1.0, 3.0], [0.0, 9.0, 9.0]], requires_grad=True)
    labels = torch.tensor([[False, True, True], [False, False, False]])
    loss = masked_loss(nll, labels, norm, step_tokens=2, step_samples=1)
    assert loss.item() == pytest.approx(2.0)
    loss.backward()
    assert torch.isfinite(nll.grad).all() and nll.grad[1].abs().sum() == 0
    # a step where nothing is kept at all: zero loss, finite
    empty = masked_loss(nll, torch.zeros_like(labels), norm, step_tokens=0, step_samples=0)
    assert empty.item() == 0.0


def test_per_token_nll_is_aligned_with_input_ids():
    logits = torch.zeros(1, 3, 5)
    logits[0, 0, 2] = 10.0  # position 0 predicts token 2 strongly
    nll = per_token_nll(logits, torch.tensor([[1, 2, 4]]))
    assert nll[0, 0] == 0.0  # position 0 has no prediction
    assert nll[0, 1] < 0.01  # token 2 at position 1 was predicted from position 0
    assert nll[0, 2] == pytest.approx(math.log(5), rel=1e-4)


def test_data_order_is_a_function_of_the_step():
    cfg = TrainConfig(batch_size=8, micro_batch_size=4, epochs=2, seed=3)
    per_epoch, total = plan_steps(20, cfg)
    assert (per_epoch, total) == (3, 6)
    seen = np.concatenate([step_indices(s, 20, per_epoch, cfg) for s in range(per_epoch)])
    assert sorted(seen.tolist()) == list(range(20))  # an epoch visits every example once
    assert np.array_equal(step_indices(4, 20, per_epoch, cfg), step_indices(4, 20, per_epoch, cfg))


def test_collate_pads_right_and_masks_labels():
    pair = [Example(0, np.array([5, 6, 7], np.int32), np.array([0, 1, 1], bool)),
            Example(1, np.array([8, 9], np.int32), np.array([0, 1], bool))]
    b = collate(pair, pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7], [8, 9, 0]]
    assert b.model_kwargs()["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b.extra["labels"].tolist() == [[False, True, True], [False, True, False]]
    # packed: one row, positions restart at the second sample, which gets its own label positions
    p = collate(pair, pad_id=0, rows=[[0, 1]], packed=True)
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9]] and p.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert p.sample_of.tolist() == [[0, 0, 0, 1, 1]] and p.model_kwargs()["attention_mask"] is None
    assert p.extra["labels"].tolist() == [[False, True, True, False, True]]


def test_sample_normalisation_tells_packed_samples_apart():
    nll = torch.tensor([[0.0, 1.0, 3.0, 0.0, 6.0]])
    labels = torch.tensor([[False, True, True, False, True]])
    sample_of = torch.tensor([[0, 0, 0, 1, 1]])
    # mean(2, 6) over 2 samples, as if each were its own row
    assert masked_loss(nll, labels, "sample", 3, 2, sample_of).item() == pytest.approx(4.0)
    rows = masked_loss(torch.tensor([[0.0, 1.0, 3.0], [0.0, 6.0, 0.0]]),
                       torch.tensor([[False, True, True], [False, True, False]]), "sample", 3, 2)
    assert rows.item() == pytest.approx(4.0)


def _cfg(**kw):
    base = dict(lr=5e-3, batch_size=8, micro_batch_size=4, epochs=2, log_every=1, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def test_training_lowers_the_loss_and_writes_a_peft_adapter(tiny_model_dir, tmp_path):
    from peft import PeftModel

    from toss_core.models import load_with_adapter

    data = examples(24, all_discarded={0, 5})
    metrics = train_lora(tiny_model_dir, data, _cfg(epochs=3), tmp_path / "a", progress=False)
    losses = [h["loss"] for h in metrics["history"]]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    model = load_with_adapter(tiny_model_dir, tmp_path / "a")  # PeftModel.from_pretrained underneath
    assert isinstance(model, PeftModel) and any("lora_A" in n for n, _ in model.named_parameters())
    assert (tmp_path / "a" / "train_config.json").exists()


def test_resume_after_interruption_gives_the_same_weights(tiny_model_dir, tmp_path, monkeypatch):
    data = examples(24)
    cfg = _cfg(checkpoint_every=2)  # 6 steps; checkpoints at 2 and 4
    train_lora(tiny_model_dir, data, cfg, tmp_path / "straight", progress=False)

    ckpt = FolderCheckpoints(tmp_path / "ckpt")
    ckpt.root.mkdir()
    monkeypatch.setenv(ENV, "train@5")  # crash after step 5: the newest checkpoint is step 4
    with pytest.raises(InjectedFault):
        train_lora(tiny_model_dir, data, cfg, tmp_path / "resumed", checkpoints=ckpt, progress=False)
    assert ckpt.latest()[0] == 4
    monkeypatch.delenv(ENV)
    metrics = train_lora(tiny_model_dir, data, cfg, tmp_path / "resumed", checkpoints=ckpt, progress=False)
    assert metrics["resumed_from_step"] == 4

    a = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # and training moved the adapter at all (B starts at zero)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)


def test_deepspeed_zero2_lora_run_matches_the_plain_loop(tiny_model_dir, tmp_path):
    """The option users pick on GPUs is exercised here on CPU (single process, gloo): ZeRO-2 must
    train, checkpoint and save a PEFT adapter, and follow the plain loop's losses."""
    data = examples(16)
    plain = train_lora(tiny_model_dir, data, _cfg(epochs=1), tmp_path / "plain", progress=False)
    ckpt = FolderCheckpoints(tmp_path / "ckpt")
    ckpt.root.mkdir()
    ds_cfg = _cfg(epochs=1, checkpoint_every=1, deepspeed={"zero_optimization": {"stage": 2}})
    ds = train_lora(tiny_model_dir, data, ds_cfg, tmp_path / "ds", checkpoints=ckpt, progress=False)
    assert ds["engine"] == "deepspeed" and ds["zero_stage"] == 2
    np.testing.assert_allclose([h["loss"] for h in ds["history"]], [h["loss"] for h in plain["history"]], rtol=1e-4)
    a = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ds" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert ckpt.latest()[0] == 1  # a DeepSpeed checkpoint was written through the same protocol
    resumed = train_lora(tiny_model_dir, data, ds_cfg, tmp_path / "ds-resumed", checkpoints=ckpt, progress=False)
    assert resumed["resumed_from_step"] == 1
    c = load_file(str(tmp_path / "ds-resumed" / "adapter_model.safetensors"))
    for k in b:
        torch.testing.assert_close(b[k], c[k], rtol=1e-5, atol=1e-6)
    # a plain run still works in the same process afterwards
    again = train_lora(tiny_model_dir, data, _cfg(epochs=1), tmp_path / "plain2", progress=False)
    assert again["engine"] == "accelerate" and again["history"][-1]["loss"] == plain["history"][-1]["loss"]


def test_label_positions_only_loss_matches_full_logits(tiny_model_dir):
    """The training loss takes logits only where labels are: same losses and gradients as full logits."""
    from toss_core.config import LoraConfig
    from toss_core.models import attach_lora, load_model
    from toss_core.training import label_nll

    batch = collate(examples(4, seed=3), pad_id=0)
    batch.extra["labels"][1, :] = False  # a sample with nothing to learn
    batch.extra["labels"][2, 0] = True  # a label on the first position counts as 0, as in per_token_nll
    labels = batch.extra["labels"]
    results = []
    for fast in (True, False):
        torch.manual_seed(0)
        model = attach_lora(load_model(tiny_model_dir), LoraConfig(r=4, alpha=8), seed=0).train()
        if fast:
            nll = label_nll(model, batch)
        else:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.model_kwargs()["attention_mask"]).logits
            nll = per_token_nll(logits, batch.input_ids) * labels
            nll[:, 0] = 0
        loss = masked_loss(nll, labels, "token", int(labels.sum()), 3)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((nll.detach(), grads))
    (fast_nll, fast_grads), (full_nll, full_grads) = results
    assert fast_nll.shape == full_nll.shape and float(fast_nll[1].abs().sum()) == 0.0
    assert torch.allclose(fast_nll, full_nll, atol=1e-5)
    assert fast_grads.keys() == full_grads.keys() and len(fast_grads) > 0
    for name in fast_grads:
        assert torch.allclose(fast_grads[name], full_grads[name], atol=1e-6), name


def mixed_examples(n=24, seed=4):
    """Lengths from 4 to 60 tokens: a step's random samples pad a lot, so packing pays."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ids = rng.integers(3, 400, size=int(rng.choice([4, 6, 9, 40, 60]))).astype(np.int32)
        out.append(Example(i, ids, np.arange(len(ids)) >= 2))
    return out


@pytest.mark.parametrize("norm", ["token", "sample"])
def test_packed_micro_batches_train_the_same_adapter_as_padded_ones(tiny_model_dir, tmp_path, norm):
    data = mixed_examples()
    runs = {}
    for packing in (True, False):
        runs[packing] = train_lora(tiny_model_dir, data, _cfg(packing=packing, loss_norm=norm), tmp_path / str(packing),
                                   progress=False)
    assert runs[True]["packed_steps"] > 0 and runs[False]["packed_steps"] == 0
    assert runs[True]["padding_share"] < runs[False]["padding_share"]
    np.testing.assert_allclose([h["loss"] for h in runs[True]["history"]], [h["loss"] for h in runs[False]["history"]],
                               rtol=1e-5)
    a = load_file(str(tmp_path / "True" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "False" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)  # float rounding over 6 Adam steps


def test_building_and_loading_an_adapter_prints_no_peft_deprecation_warning(tiny_model_dir, tmp_path):
    """peft touches transformers' deprecated `is_gradient_checkpointing`; every stage printed it to the user."""
    import warnings

    from toss_core.config import LoraConfig
    from toss_core.models import attach_lora, load_model, load_with_adapter

    with warnings.catch_warnings(record=True) as caught:
        attach_lora(load_model(tiny_model_dir), LoraConfig(r=4, alpha=8), seed=0).save_pretrained(tmp_path / "a")
        load_with_adapter(tiny_model_dir, tmp_path / "a")
    assert [str(w.message) for w in caught if "is_gradient_checkpointing" in str(w.message)] == []
