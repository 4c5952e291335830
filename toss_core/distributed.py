"""Training engines: the few operations the loop needs, on Accelerate or on DeepSpeed.

`make_engine(model, cfg, total_steps, lr_factor)` returns an object with `backward`, `step`,
`accumulating`, `save_state`/`load_state`, `save_adapter`, so `training.train_lora` has one loop:
- `AccelerateEngine`: plain PyTorch AdamW; Accelerate picks the device and, under `accelerate launch`
  on several GPUs, wraps the model in DDP.
- `DeepSpeedEngine`: when `cfg.deepspeed` is set (ZeRO stages 0-3, offload, ...). Works on CPU too
  (single process, gloo), which is how the tests keep this path alive on machines without a GPU.
Mixed precision is done by the loop with `torch.autocast`, not by Accelerate, because Accelerate's
precision is a process-wide singleton and one process trains several models.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from toss_core.config import TrainConfig


class CheckpointError(RuntimeError):
    """A checkpoint file that is not plain tensors and values: never unpickled."""


def safe_load(path: str | Path):
    """torch.load that only rebuilds tensors and plain values (dict, list, str, numbers): a checkpoint in a
    shared store can be planted, and a full unpickle would run whatever code it names."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds objects other than tensors and plain values (not a checkpoint this "
                              f"project writes): refusing to load it. Remove that checkpoint folder to restart "
                              f"the stage from scratch. ({str(e).splitlines()[0][:200]})") from None


@contextmanager
def weights_only_loads():
    """Within: every torch.load, even one asking for weights_only=False (DeepSpeed's), loads weights only."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def _adamw(params, cfg: TrainConfig):
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


class AccelerateEngine:
    kind = "accelerate"

    def __init__(self, model, cfg: TrainConfig, total_steps: int, lr_factor):
        from accelerate import Accelerator

        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = _adamw(params, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.scheduler = scheduler
        self.device = self.accelerator.device
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process

    @contextmanager
    def accumulating(self, last: bool):
        # Skip the gradient all-reduce on all but the last micro-batch of a step (DDP).
        with nullcontext() if last or self.world_size == 1 else self.accelerator.no_sync(self.model):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        # DDP averages gradients over processes; the loss is already a share of the global step mean.
        self.accelerator.backward(loss * self.world_size)

    def step(self, grad_clip: float | None) -> None:
        if grad_clip:
            self.accelerator.clip_grad_norm_(self.model.parameters(), grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def _peft_model(self):
        return self.accelerator.unwrap_model(self.model)

    def save_state(self, folder: Path) -> None:
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        if not self.is_main:
            return
        state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self._peft_model()).items()}
        save_file(state, str(folder / "adapter_state.safetensors"))
        torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), folder / "scheduler.pt")

    def load_state(self, folder: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self._peft_model(), load_file(str(Path(folder) / "adapter_state.safetensors")))
        self.optimizer.load_state_dict(safe_load(Path(folder) / "optimizer.pt"))
        self.scheduler.load_state_dict(safe_load(Path(folder) / "scheduler.pt"))

    def save_adapter(self, folder: Path) -> None:
        self.accelerator.wait_for_everyone()
        if self.is_main:
            self._peft_model().save_pretrained(str(folder))

    def print(self, msg: str) -> None:
        self.accelerator.print(msg)

    def describe(self) -> dict:
        return {"device": str(self.device), "processes": self.world_size}

    def close(self) -> None:
        self.accelerator.free_memory()


def load_deepspeed_config(value: dict | str) -> dict:
    if isinstance(value, dict):
        return dict(value)
    path = Path(value)
    if not path.exists():
        raise FileNotFoundError(f"deepspeed config {value}: file not found (train.deepspeed takes a dict or a JSON path)")
    return json.loads(path.read_text())


def make_engine(model, cfg: TrainConfig, total_steps: int, lr_factor):
    if cfg.deepspeed is not None:
        from toss_core.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg, total_steps, lr_factor, load_deepspeed_config(cfg.deepspeed))
    return AccelerateEngine(model, cfg, total_steps, lr_factor)


def single_process_env() -> dict[str, str]:
    """The torch.distributed variables a lone process needs, for those not already set."""
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    env = {k: v for k, v in defaults.items() if k not in os.environ}
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            env["MASTER_PORT"] = str(s.getsockname()[1])
    return env
