"""The DeepSpeed side of the training engine (ZeRO 0-3), selected by `train.deepspeed`.

We call `deepspeed.initialize` directly rather than through Accelerate's plugin: Accelerate silently
drops the plugin when asked for a CPU run, and its process-wide state makes a DeepSpeed run followed
by a plain one in the same process fail. Measured facts this code relies on (CPU, deepspeed 0.19):
- a lone process needs RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (we set only the
  missing ones, for the duration of the run; a real launcher sets them all);
- the shared-memory comm op is JIT-compiled at first init (~45 s); on CPU we switch it off and use
  plain gloo collectives, and pass our own torch AdamW so no fused Adam op is compiled either;
- the loop hands us micro-batch losses already normalised by the whole step's kept tokens, so the
  engine must not divide by the accumulation steps again (`scale_wrt_gas=False`), and we mark the
  last micro-batch of each step explicitly (the last step of an epoch may be short).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch

from toss_core.config import TrainConfig
from toss_core.distributed import _adamw, single_process_env

_TAG = "state"


def _plain_deepspeed_types() -> list:
    """The few DeepSpeed classes its optimizer states hold: plain records (numbers, enums), rebuilt from
    their fields by the weights-only loader; no other class or function is ever called."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class DeepSpeedEngine:
    kind = "deepspeed"

    def __init__(self, model, cfg: TrainConfig, total_steps: int, lr_factor, ds_config: dict):
        import deepspeed

        self._env = single_process_env()
        self._saved_env = {k: os.environ.get(k) for k in self._env}
        os.environ.update(self._env)
        on_cpu = not torch.cuda.is_available()
        if on_cpu:
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self._owns_group = not torch.distributed.is_initialized()

        world = int(os.environ["WORLD_SIZE"])
        per_rank = max(1, cfg.batch_size // world)
        config = {
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": max(1, per_rank // cfg.micro_batch_size),
            "gradient_clipping": cfg.grad_clip or 0.0,
            "steps_per_print": 10**9,
            **ds_config,
        }
        config.pop("optimizer", None)  # ours: the same AdamW as the plain path, nothing to compile
        config.pop("scheduler", None)
        if cfg.precision == "bf16":
            config.setdefault("bf16", {"enabled": True})
        self.ds_config = config
        optimizer = _adamw([p for p in model.parameters() if p.requires_grad], cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        self.peft_model = model
        if not on_cpu:
            model = model.to(f"cuda:{int(os.environ['LOCAL_RANK'])}")
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config,
            dist_init_required=True,
        )
        self.device = self.model.device
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        self.is_main = self.rank == 0

    @contextmanager
    def accumulating(self, last: bool):
        self.model.set_gradient_accumulation_boundary(last)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        # ZeRO averages gradients over ranks; the loss is already a share of the global step mean.
        self.model.backward(loss * self.world_size, scale_wrt_gas=False)
        self.model.step()  # a real optimizer step only at the boundary set in `accumulating`

    def step(self, grad_clip: float | None) -> None:
        pass  # DeepSpeed stepped (and clipped, from its config) at the last micro-batch

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_state(self, folder: Path) -> None:
        self.model.save_checkpoint(str(folder), tag=_TAG, exclude_frozen_parameters=True)

    def load_state(self, folder: Path) -> None:
        import pickle

        from toss_core.distributed import CheckpointError, weights_only_loads

        try:  # DeepSpeed asks torch.load for a full unpickle; a checkpoint from a shared store gets weights only
            with weights_only_loads(), torch.serialization.safe_globals(_plain_deepspeed_types()):
                self.model.load_checkpoint(str(folder), tag=_TAG, load_module_strict=False)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{folder}: a DeepSpeed checkpoint file holds objects other than tensors and "
                                  f"plain values: refusing to load it; remove that checkpoint folder "
                                  f"({str(e).splitlines()[0][:200]})") from None

    def save_adapter(self, folder: Path) -> None:
        # fp32 master weights (under bf16 the module itself holds bf16 copies; under ZeRO-3, shards).
        from deepspeed.utils import safe_get_full_fp32_param

        state = {}
        for name, p in self.peft_model.named_parameters():
            if p.requires_grad:
                full = safe_get_full_fp32_param(p)
                state[name] = (full if full is not None else p).detach().float().cpu()
        if self.is_main:
            self.peft_model.save_pretrained(str(folder), state_dict=state)

    def print(self, msg: str) -> None:
        if self.is_main:
            print(msg)

    def describe(self) -> dict:
        zero = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        return {"device": str(self.device), "processes": self.world_size, "zero_stage": zero}

    def close(self) -> None:
        import deepspeed.comm as dist

        self.model.destroy()
        if self._owns_group and torch.distributed.is_initialized():
            dist.destroy_process_group()  # DeepSpeed's wrapper: torch's leaves stale group references
        for k, v in self._saved_env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
