"""Multi-GPU stages: a training run under `torchrun --nproc_per_node N`, as a child process of its stage.

    metrics = train_in_processes(TrainJob(...), nproc=4)    # blocks; raises LaunchError if a rank fails

Why a child process and not `accelerate launch` around the whole flow: only the stage that asked for N
GPUs pays for N processes, the flow (and its other stages) stays one ordinary process, and a worker
that runs one stage at a time can give that stage all its GPUs. Each rank runs `main` below: it reads
the job file, loads the training examples from the store itself, and trains (DDP, or DeepSpeed ZeRO
when `train.deepspeed` is set). Rank 0 writes the adapter and its metrics to `out_dir`; the parent
stage publishes that folder once, as it does for a one-process training, so the caching and
checkpoint contract (`toss_core.stages`) is the same for both. Checkpoints go to the store under the
stage's key, so a rerun (on any worker) resumes from the newest one.

The rendezvous is on 127.0.0.1 with a free port (one machine; several nodes are out of scope), and on
a machine without CUDA the ranks use gloo, which is how the tests run this path on CPU.
"""

from __future__ import annotations

import collections
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from pydantic import BaseModel

from toss_core.config import TrainConfig
from toss_core.stages import StoreCheckpoints, TrainSource, load_examples
from toss_core.store import ArtifactStore

_ROOT = Path(__file__).resolve().parents[1]
_TAIL_LINES = 60


class LaunchError(RuntimeError):
    pass


class TrainJob(BaseModel):
    """Everything a rank needs to train (written to a private file the ranks read)."""

    model_dir: str
    store_url: str
    storage_options: dict = {}
    sources: list[TrainSource]
    cfg: TrainConfig
    dtype: str = "float32"
    checkpoint_key: str | None = None
    desc: str = "train"
    out_dir: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_argv(job_file: Path, nproc: int, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "toss_core.launch", str(job_file)]


def _check_devices(nproc: int) -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() < nproc:
        raise LaunchError(f"train.gpus={nproc} but this worker sees {torch.cuda.device_count()} GPU(s) "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): run the "
                          "stage on a worker with that many GPUs, or lower train.gpus")


def train_in_processes(job: TrainJob, nproc: int) -> dict:
    """Train under torchrun with `nproc` processes; returns rank 0's metrics (train_metrics.json)."""
    import json

    _check_devices(nproc)
    with tempfile.TemporaryDirectory(prefix="toss-launch-") as tmp:
        job_file = Path(tmp) / "job.json"
        # Storage options may name an endpoint; keep the file private all the same.
        fd = os.open(job_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(job.model_dump_json())
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))}
        run_child(torchrun_argv(job_file, nproc, free_port()), env, f"{job.desc} ({nproc} processes)")
    metrics_file = Path(job.out_dir) / "train_metrics.json"
    if not metrics_file.exists():
        raise LaunchError(f"{job.desc}: torchrun finished but rank 0 wrote no {metrics_file}")
    return json.loads(metrics_file.read_text())


def run_child(argv: list[str], env: dict, what: str) -> None:
    """Run a child, passing its output through; on failure raise with the last lines of that output."""
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace") as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            print(line, end="", flush=True)
        rc = proc.wait()
    if rc:
        shown = "\n".join(tail)
        raise LaunchError(f"{what}: torchrun exited with code {rc}; the last lines of its output:\n{shown}")


def main(argv: list[str]) -> None:
    """One rank (torchrun set RANK, WORLD_SIZE, MASTER_ADDR/PORT): load the examples, train."""
    from toss_core.training import train_lora

    job = TrainJob.model_validate_json(Path(argv[0]).read_text())
    store = ArtifactStore(job.store_url, job.storage_options)
    checkpoints = StoreCheckpoints(store, "train", job.checkpoint_key) if job.checkpoint_key else None
    rank = int(os.environ.get("RANK", "0"))
    train_lora(job.model_dir, load_examples(store, job.sources), job.cfg, job.out_dir, dtype=job.dtype,
               checkpoints=checkpoints, desc=job.desc, progress=rank == 0)


if __name__ == "__main__":
    main(sys.argv[1:])
