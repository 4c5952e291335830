"""Fault injection for resume tests: make a stage fail on purpose, from the environment.

    TOSS_INJECT_FAULT=train            raise in every training run at its first step
    TOSS_INJECT_FAULT=train@3          raise right after optimizer step 3 (a checkpoint may exist)
    TOSS_INJECT_FAULT=train@3:kill     SIGKILL the process there (no cleanup runs, as in a real crash)
    TOSS_INJECT_FAULT=select           raise in the select stage
    TOSS_INJECT_FAULT=train:sleep=0.5  slow every training step by 0.5 s (a test can kill a worker mid-training)
Several faults are separated by commas. Unset in normal use; costs one dict lookup per call.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "TOSS_INJECT_FAULT"


class InjectedFault(RuntimeError):
    pass


def maybe_fail(stage: str, step: int | None = None) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in spec.split(","):
        item, _, action = item.strip().partition(":")
        name, _, at = item.partition("@")
        if name != stage:
            continue
        if at and (step is None or int(at) != step):
            continue
        if action.startswith("sleep="):
            time.sleep(float(action.removeprefix("sleep=")))
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise InjectedFault(f"fault injected by {ENV}={spec!r} in stage {stage!r}" + (f" at step {step}" if step else ""))
