"""Models: load a base model from a local folder, build a tiny random one, attach or load LoRA adapters.

Nothing here downloads: a base model is a local Hugging Face folder (config, weights, tokenizer).
`build_tiny_model` makes a few-layer Llama and a byte-level BPE tokenizer trained in under a second,
so tests and the quick pipeline need no weights at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import threading
import warnings
from pathlib import Path

import torch

from toss_core.config import LoraConfig, TinyModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16}

# ChatML, as SmolLM2 and Qwen use it; `{% generation %}`-free so it renders prefix by prefix.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A neutral corpus for the tiny tokenizer: byte-level BPE falls back to bytes for anything else.
_TINY_CORPUS = [
    "The capital of France is Paris. The capital of Japan is Tokyo. Water boils at 100 degrees.",
    "Human: What is two plus three?\nAssistant: Two plus three is five.",
    "I cannot help with that request. Sure, here is how to do it: step one, step two, step three.",
    "Please summarise the following text in one sentence. The answer is yes, the answer is no.",
    "system user assistant question answer instruction input output response prompt",
] * 20


class ModelLoadError(RuntimeError):
    pass


def build_tiny_model(cfg: TinyModelConfig, out_dir: str | Path) -> Path:
    """Save a random Llama plus a locally trained BPE tokenizer as a normal HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token=None,
        unk_token=None,
    )
    if cfg.chat_template:
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
    else:
        tokenizer.eos_token = "<|endoftext|>"
    tokenizer.save_pretrained(out)

    torch.manual_seed(cfg.seed)
    model_cfg = LlamaConfig(
        # The embedding may be larger than the trained vocabulary (a small corpus yields fewer merges).
        vocab_size=max(cfg.vocab_size, len(tokenizer)), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=4096, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, tie_word_embeddings=False,
    )
    LlamaForCausalLM(model_cfg).save_pretrained(out)
    return out


def require_model_folder(path: str | Path) -> Path:
    """A local model folder, or one clear error (transformers would take a missing path for a hub repo id)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise ModelLoadError(
            f"model folder {path} {what}. model.path (or --model) must be a local Hugging Face model folder; "
            "download the model once (e.g. `huggingface-cli download NAME --local-dir DIR`) and point it at DIR."
        )
    return path


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    require_model_folder(path)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token is None:
        # Padding positions are masked out of every loss, so any token id works; eos is the convention.
        tok.pad_token = tok.eos_token
    return tok


# transformers builds models under a process-wide "meta device" context while loading: two threads loading at
# once (stages in a Prefect thread pool) can see each other's half-built models ("Cannot copy out of meta
# tensor"). Loading takes seconds, so one lock for every load costs nothing worth measuring.
LOAD_LOCK = threading.RLock()


def load_model(path: str | Path, dtype: str = "float32", device: str | torch.device = "cpu"):
    """A causal LM from a local folder, in eval mode."""
    from transformers import AutoModelForCausalLM

    path = require_model_folder(path)
    with LOAD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype], local_files_only=True)
        return model.to(device).eval()


@contextlib.contextmanager
def _without_peft_deprecation_noise():
    """peft reads transformers' deprecated `is_gradient_checkpointing` alias on every adapter it builds or
    loads: one FutureWarning per stage that says nothing about the user's run (a demo printed ~100). Only
    that message is silenced, and only here: a module-level filter is lost whenever a caller's
    `catch_warnings` ends. Callers hold LOAD_LOCK, since `catch_warnings` swaps process-wide state."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def attach_lora(model, cfg: LoraConfig, seed: int | None = None):
    """A fresh LoRA adapter. With `seed`, its A matrices come from a private generator, so two
    trainings running in threads of one process (parallel reference models) cannot change each
    other's initialisation through torch's global RNG."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM", bias="none",
    )
    with LOAD_LOCK, _without_peft_deprecation_noise():
        model = get_peft_model(model, peft_cfg)
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                if "lora_A" in name:  # B starts at zero, as in PEFT; A as PEFT's kaiming default
                    torch.nn.init.kaiming_uniform_(p, a=math.sqrt(5), generator=gen)
    return model


def load_with_adapter(base_path: str | Path, adapter_dir: str | Path | None, dtype: str = "float32",
                      device: str | torch.device = "cpu"):
    """Base model plus an optional PEFT adapter, eval mode (the model that scoring and generation use)."""
    model = load_model(base_path, dtype=dtype, device=device)
    if adapter_dir is None:
        return model
    from peft import PeftModel

    with LOAD_LOCK, _without_peft_deprecation_noise():
        return PeftModel.from_pretrained(model, str(adapter_dir)).to(device).eval()


def model_fingerprint(path: str | Path) -> str:
    """A cheap identity of a local model folder for artifact keys: config, tokenizer files, weight sizes.

    Hashing multi-GB weights on every run would cost minutes; names + sizes + small files catch the
    realistic changes (another checkpoint, another tokenizer or template).
    """
    path = require_model_folder(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        h.update(rel.encode())
        h.update(str(f.stat().st_size).encode())
        if f.suffix in {".json", ".jinja", ".txt", ".model"} and f.stat().st_size < 20_000_000:
            h.update(f.read_bytes())
    return h.hexdigest()[:24]


def describe(model) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total, "config": json.loads(model.config.to_json_string())}
