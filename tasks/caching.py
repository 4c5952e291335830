"""The one cache policy of every stage task, and where Prefect keeps task results.

Prefect's DEFAULT policy includes the flow-run id (no reuse across runs) and TASK_SOURCE hashes only
the function's own text. Ours is the artifact key: hash(stage, stage VERSION, stage config, input
artifact keys), computed by the same `*_plan` function the stage itself uses, so a Prefect cache hit
and a store hit can never disagree. No run id, no URI, no source text in it: the same config reuses
across runs, Prefect servers, machines and teammates sharing the store.

The store stays the source of truth: the policy yields a key only when the artifact is published,
so a cached Prefect result never points at an artifact that `toss store gc` removed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from prefect.cache_policies import CachePolicy

from toss_core.config import StoreConfig
from toss_core.stages import StagePlan
from toss_core.store import ArtifactStore

RESULTS_FOLDER = "_prefect_results"


def open_store(cfg: StoreConfig) -> ArtifactStore:
    return ArtifactStore(cfg.url, cfg.storage_options)


@dataclass
class ArtifactKeyPolicy(CachePolicy):
    """Cache key = the key of the artifact the task publishes (see module docstring)."""

    plan: Callable[[dict[str, Any]], StagePlan] | None = None

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> Optional[str]:
        if self.plan is None or inputs.get("force"):
            return None
        plan = self.plan(inputs)
        if not open_store(inputs["store"]).exists(plan.stage, plan.key):
            return None
        return f"{plan.stage}-{plan.key}"


def result_storage(cfg: StoreConfig) -> str:
    """Prefect result storage inside the artifact store, so every worker can read every result.

    Prefect wants result storage saved server-side; the block's name is derived from the store URL,
    so saving it again is idempotent. Returns the block's slug ("local-file-system/toss-results-...").
    Storage options are saved with it: they must not hold secrets (those come from the environment).
    """
    from prefect.filesystems import LocalFileSystem, RemoteFileSystem

    if "://" not in cfg.url or cfg.url.startswith("file://"):
        base = str(Path(cfg.url.removeprefix("file://")).resolve() / RESULTS_FOLDER)
        block = LocalFileSystem(basepath=base)
    else:
        base = f"{cfg.url.rstrip('/')}/{RESULTS_FOLDER}"
        block = RemoteFileSystem(basepath=base, settings=cfg.storage_options)
    name = "toss-results-" + hashlib.sha256(base.encode()).hexdigest()[:12]
    block.save(name, overwrite=True)
    return f"{block.get_block_type_slug()}/{name}"
