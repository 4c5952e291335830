#!/usr/bin/env python
"""Throughput of the two GPU stages, scoring and LoRA training, on any device: tokens/s and MFU, packed vs
padded batches, for SmolLM2-135M and a 1B-class Llama, both built from their configs (random weights:
throughput does not depend on the values), so it runs with no network and nothing to download or carry.

    python benchmarks/bench_throughput.py                        # CUDA if present, else CPU; both models
    python benchmarks/bench_throughput.py --models smollm2 --samples 48 --train-steps 4   # quick, CPU
    python benchmarks/bench_throughput.py --model-dir /models/smollm2   # a real folder instead of a config

What is timed, per model (same process, same data; packed and padded runs interleaved, median of --repeats):
- scoring: toss_core.scoring.score_tokens on a token table (log-normal lengths, a third prompt), with
  packing allowed (toss_core.packing.plan_batches picks packed rows when cheaper) and with padded batches
  only; throughput = all tokens of the table / s (the model reads them all) and response tokens / s.
  Per-token losses of the two must agree within 1e-4 (float32 rounding); the max difference is reported.
- training: toss_core.training.train_lora, LoRA r=16 on q_proj and v_proj (the paper's), `--train-steps`
  optimizer steps of `--batch-size` samples (micro-batches of `--micro-batch-size`), packed vs padded;
  throughput = tokens of the step's samples / s, after a one-step warm-up run. Loss histories must agree.
- MFU: model FLOPs per token / achieved time / peak. Scoring: 2 N + attention (4 d per attended pair per
  layer, causal half); LoRA training: 4 N + attention x 2 (the frozen weights need no weight gradient:
  forward 2 N, input gradients 2 N; LoRA's own FLOPs are negligible). Peak: the nominal dense bf16 peak
  for known GPUs (--peak-tflops overrides), and on every device the measured throughput of a large
  matmul in the same dtype (so CPU numbers have a reference too).

Results: benchmarks/results/bench_throughput-<device>.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import numpy as np
import torch

# SmolLM2-135M-Instruct's architecture (its config.json) and a Llama-3.2-1B-like one.
CONFIGS = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0,
                    max_position_embeddings=8192),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0,
               max_position_embeddings=8192),
}
# Nominal dense bf16 peak, TFLOP/s (vendor data sheets, SXM parts).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def build_model_dir(name: str, out: Path, dtype: torch.dtype) -> Path:
    """An HF folder of a random model with `name`'s config, plus a tiny tokenizer (scoring/training read
    only the pad id from it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**CONFIGS[name], pad_token_id=0, bos_token_id=None, eos_token_id=0)
    with torch.device("cpu"):
        LlamaForCausalLM(cfg).to(dtype).save_pretrained(out)
    return out


def make_tokens(n: int, vocab: int, seed: int, median_len: float, max_len: int):
    from toss_core.tables import TOKENS_SCHEMA, ids_digest, list_array
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    lengths = np.clip(np.rint(rng.lognormal(math.log(median_len), 0.8, n)), 16, max_len).astype(np.int64)
    prompt = np.maximum(1, np.floor(lengths * rng.uniform(0.25, 0.42, n))).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = rng.integers(3, vocab, int(offsets[-1]), dtype=np.int32)
    pos = np.arange(len(ids)) - np.repeat(offsets[:-1], lengths)
    resp = pos >= np.repeat(prompt, lengths)
    return pa.table({"sample_id": np.arange(n, dtype=np.int64), "input_ids": list_array(ids, offsets, pa.int32()),
                     "response_mask": list_array(resp, offsets, pa.bool_()),
                     "ids_digest": [ids_digest(ids[offsets[i]:offsets[i + 1]]) for i in range(n)],
                     "meta": ["{}"] * n}, schema=TOKENS_SCHEMA)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_tflops(device: str, dtype: torch.dtype, n: int) -> float:
    """Measured dense matmul throughput (TFLOP/s) of an n x n x n product: the device's practical peak."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 2.0:
        a @ b
        reps += 1
        sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def flops_per_token(model_cfg: dict, params: int, mean_len: float, training: bool) -> float:
    """2 N (or 4 N for LoRA training) plus attention over the causal half of a mean-length sequence."""
    attn = 4 * model_cfg["hidden_size"] * model_cfg["num_hidden_layers"] * mean_len / 2
    return (4 if training else 2) * params + attn * (2 if training else 1)


def bench_scoring(model, tokens, budget: int, repeats: int, device: str) -> dict:
    from toss_core.scoring import score_tokens

    n_tokens = sum(len(x) for x in tokens.column("input_ids").to_pylist())
    runs = {True: [], False: []}
    losses, metrics = {}, {}
    score_tokens(model, tokens.slice(0, min(4, tokens.num_rows)), budget)  # warm-up (kernels, allocator)
    for _ in range(repeats):
        for packing in (True, False):
            sync(device)
            t0 = time.perf_counter()
            table, m = score_tokens(model, tokens, budget, packing=packing)
            sync(device)
            runs[packing].append(time.perf_counter() - t0)
            losses[packing] = np.concatenate([np.asarray(x, np.float64) for x in table.column("loss").to_pylist()])
            metrics[packing] = m
    diff = np.nanmax(np.abs(losses[True] - losses[False]))
    out = {"max_abs_loss_difference": float(diff), "losses_agree_1e-4": bool(diff <= 1e-4),
           "tokens": n_tokens, "response_tokens": metrics[True]["response_tokens"]}
    for packing, label in ((True, "packing allowed"), (False, "padded")):
        sec = statistics.median(runs[packing])
        out[label] = {"seconds": sec, "runs": runs[packing], "tokens_per_second": n_tokens / sec,
                      "response_tokens_per_second": metrics[packing]["response_tokens"] / sec,
                      "packed": metrics[packing]["packed"], "padding_share": metrics[packing]["padding_share"]}
    out["speed_up"] = out["padded"]["seconds"] / out["packing allowed"]["seconds"]
    return out


def bench_training(model_dir: Path, tokens, a, dtype_name: str) -> dict:
    from toss_core.config import LoraConfig, TrainConfig
    from toss_core.train_data import examples_from_tokens
    from toss_core.training import train_lora

    examples = examples_from_tokens(tokens)
    runs = {True: [], False: []}
    hist, meta = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        def run(packing: bool, steps: int) -> dict:
            cfg = TrainConfig(lora=LoraConfig(r=16, alpha=16), lr=1e-5, batch_size=a.batch_size,
                              micro_batch_size=a.micro_batch_size, epochs=100, max_steps=steps, log_every=1,
                              precision="bf16" if a.dtype == "bfloat16" else "fp32", packing=packing, seed=0)
            return train_lora(model_dir, examples, cfg, Path(tmp) / f"a{packing}{steps}", dtype=dtype_name,
                              progress=False)

        run(True, 1)  # warm-up: kernels, allocator, the packing probe
        for _ in range(a.repeats):
            for packing in (True, False):
                m = run(packing, a.train_steps)
                runs[packing].append(m["seconds"])
                hist[packing], meta[packing] = [h["loss"] for h in m["history"]], m
    per_step = [examples[i] for s in range(a.train_steps) for i in _step_indices(s, len(examples), a)]
    n_tokens = sum(len(e.input_ids) for e in per_step)
    out = {"steps": a.train_steps, "tokens": n_tokens,
           "loss_histories_agree": bool(np.allclose(hist[True], hist[False], rtol=1e-3, atol=1e-4)),
           "loss_history": {"packing allowed": hist[True], "padded": hist[False]}}
    for packing, label in ((True, "packing allowed"), (False, "padded")):
        sec = statistics.median(runs[packing])
        out[label] = {"seconds": sec, "runs": runs[packing], "tokens_per_second": n_tokens / sec,
                      "packed_steps": meta[packing]["packed_steps"], "padding_share": meta[packing]["padding_share"]}
    out["speed_up"] = out["padded"]["seconds"] / out["packing allowed"]["seconds"]
    return out


def _step_indices(step: int, n: int, a) -> list[int]:
    from toss_core.config import TrainConfig
    from toss_core.training import plan_steps, step_indices

    cfg = TrainConfig(batch_size=a.batch_size, micro_batch_size=a.micro_batch_size, epochs=100, seed=0)
    per_epoch, _ = plan_steps(n, cfg)
    return step_indices(step, n, per_epoch, cfg).tolist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,1b", help="comma list of: " + ", ".join(CONFIGS))
    p.add_argument("--model-dir", help="a real HF model folder to use instead of the smollm2 config")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 (default on CUDA) or float32 (default on CPU)")
    p.add_argument("--samples", type=int, default=None, help="samples scored (default 2048 on CUDA, 64 on CPU)")
    p.add_argument("--median-len", type=float, default=None, help="median sample length (default 384 CUDA, 96 CPU)")
    p.add_argument("--max-len", type=int, default=None, help="longest sample (default 2048 CUDA, 256 CPU)")
    p.add_argument("--budget", type=int, default=None, help="scoring tokens per batch (default 65536 CUDA, 4096 CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="training samples per step (default 64 CUDA, 8 CPU)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="(default 8 CUDA, 4 CPU)")
    p.add_argument("--train-steps", type=int, default=None, help="timed optimizer steps (default 8 CUDA, 3 CPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None, help="nominal peak of the device, TFLOP/s")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/bench_throughput-<device>.json)")
    a = p.parse_args()
    gpu = a.device == "cuda"
    a.dtype = a.dtype or ("bfloat16" if gpu else "float32")
    for name, gpu_default, cpu_default in (("samples", 2048, 64), ("median_len", 384, 96), ("max_len", 2048, 256),
                                           ("budget", 65536, 4096), ("batch_size", 64, 8),
                                           ("micro_batch_size", 8, 4), ("train_steps", 8, 3)):
        if getattr(a, name) is None:
            setattr(a, name, gpu_default if gpu else cpu_default)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[a.dtype]

    from toss_core.models import load_model
    import _common as C

    device_name = torch.cuda.get_device_name() if gpu else C.cpu_model()
    nominal = a.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)
    measured_peak = matmul_tflops(a.device, dtype, 8192 if gpu else 2048)
    print(f"[throughput] {device_name}: matmul {measured_peak:.2f} TFLOP/s measured ({a.dtype}); nominal "
          f"{nominal or 'unknown'}", flush=True)
    results = {"device": device_name, "device_kind": a.device, "dtype": a.dtype, "matmul_tflops": measured_peak,
               "nominal_peak_tflops": nominal, "settings": vars(a), "machine": C.machine(),
               "versions": C.versions("torch", "transformers", "peft", "accelerate"), "models": {}}
    rows = []
    for name in a.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = Path(a.model_dir) if (a.model_dir and name == "smollm2") else \
                build_model_dir(name, Path(tmp) / name, dtype)
            model = load_model(model_dir, dtype=a.dtype, device=a.device)
            params = sum(p.numel() for p in model.parameters())
            tokens = make_tokens(a.samples, CONFIGS[name]["vocab_size"], 0, a.median_len, a.max_len)
            mean_len = float(np.mean([len(x) for x in tokens.column("input_ids").to_pylist()]))
            print(f"[throughput] {name}: {params / 1e6:.0f}M params, {a.samples} samples, mean length {mean_len:.0f}",
                  flush=True)
            score = bench_scoring(model, tokens, a.budget, a.repeats, a.device)
            del model
            if gpu:
                torch.cuda.empty_cache()
            train_tokens = tokens.slice(0, min(tokens.num_rows, a.batch_size * a.train_steps))
            train = bench_training(model_dir, train_tokens, a, a.dtype)
        for stage, res, training in (("score", score, False), ("train", train, True)):
            fpt = flops_per_token(CONFIGS[name], params, mean_len, training)
            for label in ("packing allowed", "padded"):
                tflops = res[label]["tokens_per_second"] * fpt / 1e12
                res[label]["achieved_tflops"] = tflops
                res[label]["mfu_vs_matmul"] = tflops / measured_peak
                res[label]["mfu_vs_nominal"] = tflops / nominal if nominal else None
                rows.append([name, stage, label, f"{res[label]['tokens_per_second']:,.0f}",
                             f"{res[label].get('padding_share', 0):.1%}", f"{tflops:.3f}",
                             f"{tflops / measured_peak:.1%}", f"{tflops / nominal:.1%}" if nominal else "-"])
            rows.append([name, stage, "packed / padded", f"{res['speed_up']:.2f}x", "", "", "", ""])
        results["models"][name] = {"params": params, "mean_len": mean_len, "score": score, "train": train}
        print(f"[throughput] {name}: score {score['speed_up']:.2f}x (losses max diff "
              f"{score['max_abs_loss_difference']:.2e}), train {train['speed_up']:.2f}x", flush=True)
    out = Path(a.out) if a.out else C.RESULTS / f"bench_throughput-{a.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print()
    print(C.table(["model", "stage", "batches", "tokens/s", "padding", "TFLOP/s", "MFU vs matmul", "MFU vs nominal"],
                  rows))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
