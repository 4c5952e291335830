"""`toss inspect`: one self-contained HTML page showing what a mask drops (see docs/inspect.md).

    toss inspect store/mask/<key>                     # tokens, tokenizer and scores found through manifests
    toss inspect store/mask/<key> --samples 50 --png-dir plots/ --out report.html
    toss inspect mask/ --tokens art/tokens --model models/base --ids 3,7,9

A mask published in a store (<store>/mask/<key>/) names its inputs in MANIFEST.json: the token table
(inputs.tokens -> <store>/tokens/<key>/), the score tables (inputs.utility0, safety0, ... ->
<store>/scores/<key>/), and the token table names the model whose tokenizer decodes it (inputs.model ->
<store>/model/<key>/). An option given on the command line always wins; each input's source is printed.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

console = Console(stderr=True, soft_wrap=True)


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


def _manifest(path: str):
    from toss_core.store import ArtifactError, open_artifact_dir

    try:
        return open_artifact_dir(path).manifest()
    except (ArtifactError, FileNotFoundError, NotADirectoryError):
        return None


def _parquet(path: str) -> list[str]:
    """Parquet files of an artifact folder (local copy) or of a plain file/folder."""
    from toss_core.store import open_artifact_dir, resolve_parquet_files

    if _manifest(path) is not None:
        return sorted(str(p) for p in open_artifact_dir(path).local_files(".parquet"))
    try:
        return resolve_parquet_files(path)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))


def _store_input(path: str, name: str, stage: str) -> tuple[str | None, str]:
    """The artifact <store>/<stage>/<key> that `path`'s manifest names as inputs[name], or (None, why not).

    Works for an artifact folder sitting at <store>/<its stage>/<its key>, as every store artifact does."""
    manifest = _manifest(path)
    where = path.rstrip("/")
    parent = posixpath.dirname(where)
    if manifest is None or posixpath.basename(where) != manifest.key or posixpath.basename(parent) != manifest.stage:
        return None, f"{path} is not an artifact folder inside a store (<store>/<stage>/<key>/)"
    if (key := manifest.inputs.get(name)) is None:
        return None, f"the manifest of {path} names no {name!r} input"
    found = posixpath.join(posixpath.dirname(parent), stage, key)
    if _manifest(found) is None:
        return None, f"{path} was made from {stage} {key}, but {found} holds no published artifact"
    return found, ""


def _required_input(path: str, name: str, stage: str, flag: str) -> str:
    found, why = _store_input(path, name, stage)
    if found is None:
        _fail(f"cannot find the {name} input: {why}. Pass {flag}")
    return found


def _score_inputs(mask: str, role: str) -> list[str]:
    """The mask manifest's score inputs for a role (utility0, utility1, ...: one per shard), in order.

    Scores only add loss_u / loss_h to the page, so when any is missing the page goes without them."""
    manifest = _manifest(mask)
    names = sorted((n for n in (manifest.inputs if manifest else {}) if re.fullmatch(rf"{role}\d+", n)),
                   key=lambda n: int(n[len(role):]))
    found = [_store_input(mask, n, "scores") for n in names]
    if not found or any(path is None for path, _ in found):
        if found:
            console.print(f"  [dim]no {role} scores: {next(why for path, why in found if path is None)}[/]")
        return []
    return [path for path, _ in found]


def _parse_ids(ids: str | None) -> list[int] | None:
    if ids is None:
        return None
    try:
        return [int(x) for x in ids.split(",") if x.strip()]
    except ValueError:
        _fail(f"--ids {ids!r}: expected sample ids separated by commas, e.g. --ids 3,7,9")


def inspect(
    mask: Annotated[str, typer.Argument(
        help="mask artifact folder (e.g. store/mask/<key>) or mask Parquet file/folder")],
    tokens: Annotated[Optional[str], typer.Option(
        help="token table the mask was made from; default: the mask manifest's inputs.tokens in the same store",
    )] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", "--tokenizer", help="model folder (or model artifact folder) whose tokenizer decodes the tokens; "
        "default: the token table manifest's inputs.model in the same store")] = None,
    utility: Annotated[list[str], typer.Option(
        help="loss_u scores (repeat for shards); default: the mask manifest's utility inputs, when in the store")] = [],
    safety: Annotated[list[str], typer.Option(
        help="loss_h scores (repeat for shards); default: the mask manifest's safety inputs, when in the store")] = [],
    samples: Annotated[int, typer.Option(help="show at most this many samples (statistics always cover all)")] = 200,
    ids: Annotated[Optional[str], typer.Option(help="show exactly these sample ids, e.g. 3,7,9")] = None,
    out: Annotated[Path, typer.Option(help="HTML file to write (self-contained, opens offline)")] = Path("report.html"),
    png_dir: Annotated[Optional[Path], typer.Option(help="also write the summary plots as PNG files here")] = None,
) -> None:
    """Write an HTML page that shows what a mask drops: conversations token by token, shaded by score, plus
    summary plots (score histogram with the cut, discard rate by position, top dropped tokens and n-grams)."""
    from toss_core.inspection import mask_report, write_html, write_pngs
    from toss_core.models import load_tokenizer
    from toss_core.store import open_artifact_dir
    from toss_core.tables import TableError

    wanted = _parse_ids(ids)
    if samples < 0:
        _fail(f"--samples {samples}: must be 0 or more")
    tokens = _given_or_found("tokens", tokens, "--tokens", "mask manifest, inputs.tokens",
                             lambda: _required_input(mask, "tokens", "tokens", "--tokens"))
    model = _given_or_found("tokenizer", model, "--model", "tokens manifest, inputs.model", lambda: _required_input(
        tokens, "model", "model", "--model (the model folder the tokens were made with)"))
    utility = _given_or_found("utility", utility, "--utility", "mask manifest, inputs.utility*",
                              lambda: _score_inputs(mask, "utility"))
    safety = _given_or_found("safety", safety, "--safety", "mask manifest, inputs.safety*",
                             lambda: _score_inputs(mask, "safety"))

    model_dir = open_artifact_dir(model).local_dir() if _manifest(model) else Path(model)
    try:
        tokenizer = load_tokenizer(model_dir)
    except (OSError, ValueError) as e:
        _fail(f"no tokenizer in {model_dir} ({e}): pass --model with the model folder the tokens were made with")
    context = {"mask": mask, "tokens": tokens}
    if (manifest := _manifest(mask)) is not None:
        context["select"] = ", ".join(f"{k}={v}" for k, v in manifest.config.items() if v is not None)
    try:
        report = mask_report(
            _parquet(mask), _parquet(tokens), tokenizer, samples=samples, ids=wanted, context=context,
            utility_files=[f for u in utility for f in _parquet(u)],
            safety_files=[f for h in safety for f in _parquet(h)],
        )
    except (TableError, ValueError) as e:
        _fail(str(e))
    write_html(report, out)
    console.print(f"[green]wrote[/] {out}: {len(report.shown)} of {report.samples_total:,} samples shown; "
                  f"{report.dropped_tokens:,} of {report.response_tokens:,} response tokens dropped "
                  f"({report.dropped_share:.1%})")
    if png_dir is not None:
        for path in write_pngs(report, png_dir):
            console.print(f"[green]wrote[/] {path}")


def _given_or_found(name: str, given, flag: str, where: str, find):
    """The command-line value when given, else what the manifests point to; prints which one it is."""
    value, origin = (given, flag) if given else (find(), where)
    if value:
        shown = ", ".join(value) if isinstance(value, list) else value
        console.print(f"  {name:<9} {shown} [dim]({origin})[/]")
    return value
