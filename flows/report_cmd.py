"""`toss report`: print an evaluation's table (methods x metrics) and save its files (docs/evaluation.md).

    toss report store                                   # the newest report in the store ./store
    toss report store --name quick --out results/       # newest report of run "quick"; copy its files
    toss report store/report/<key> --format json        # one report artifact, as JSON

A report is the `report` artifact the evaluation writes (`eval.enabled: true` in the config): `report.md`
(the table and its notes), `results.json` (every cell with its per-seed values, and the raw records) and
`scatter.png` (safety against utility). Nothing is recomputed here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

console = Console(stderr=True, soft_wrap=True)
FILES = ("report.md", "report.html", "results.json", "scatter.png")


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


def find_report(run: str, name: str | None = None):
    """(artifact folder, manifest) of a report: `run` is a report artifact folder, or a store whose newest
    report (of run `name`, if given) is taken. Raises FileNotFoundError saying what was looked at."""
    from toss_core.store import ArtifactStore, open_artifact_dir

    artifact = open_artifact_dir(run)
    manifest = artifact.manifest()
    if manifest is not None:
        if manifest.stage != "report":
            raise FileNotFoundError(f"{run} is a {manifest.stage!r} artifact, not an evaluation report")
        return artifact, manifest
    store = ArtifactStore(run)
    reports = [m for m in store.list("report") if name is None or m.config.get("meta", {}).get("name") == name]
    if not reports:
        which = f" of run {name!r}" if name else ""
        raise FileNotFoundError(f"no evaluation report{which} in {run}: give a store (folder or URL) or a report "
                                "folder <store>/report/<key>; reports are written by `toss run` with eval.enabled")
    newest = max(reports, key=lambda m: m.created_at)
    return open_artifact_dir(store.uri("report", newest.key)), newest


def report(
    run: Annotated[str, typer.Argument(help="a store (folder or URL: its newest report) or a report artifact "
                                            "folder <store>/report/<key>")],
    name: Annotated[Optional[str], typer.Option(help="with a store: the newest report of this run name")] = None,
    out: Annotated[Optional[Path], typer.Option(help="copy report.md, results.json and scatter.png here")] = None,
    format: Annotated[str, typer.Option(help="what to print: markdown (the table) or json")] = "markdown",
) -> None:
    """Print an evaluation report: one row per method, one column per metric, mean ± standard error over seeds."""
    if format not in ("markdown", "json"):
        _fail(f"--format {format}: choose markdown or json")
    try:
        artifact, manifest = find_report(run, name)
    except FileNotFoundError as e:
        _fail(str(e))
    with artifact.open("report.md") as f:
        markdown = f.read().decode()
    if format == "json":
        with artifact.open("results.json") as f:
            print(json.dumps(json.loads(f.read()), indent=2))
    else:
        print(markdown, end="")
    console.print(f"report {artifact.uri} ({manifest.created_at[:19]})")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        listed = {e.path.split("/", 1)[1] for e in manifest.files}
        for fname in FILES:
            if fname in listed:
                with artifact.open(fname) as f:
                    (out / fname).write_bytes(f.read())
        console.print(f"[green]wrote[/] {', '.join(f for f in FILES if f in listed)} to {out}")
