"""Evaluation: baseline masks on hand-made tables (exact budgets and picks), the report table, and a full
quick-config comparison run (every baseline, two seeds) through the plain pipeline and `toss report`.

The quick run's prompt sets are placeholder files written here ("[restricted task N]"): the repository
ships no harmful text. The tiny models answer gibberish, so the safety numbers mean nothing; what is
checked is that every method is trained, answers, is judged and lands in one table, and that caching
holds (a rerun computes nothing; a judge change regenerates nothing).
"""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.factories import score_table, token_table
from toss_core.baselines import (
    baseline_discard,
    mask_quality,
    needed_scores,
    response_layout,
    write_baseline_mask,
)
from toss_core.report import cohen_kappa, judge_agreement, scatter_png, summarize, to_markdown

QUICK = Path(__file__).parents[1] / "configs" / "quick.yaml"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one torch thread is several times faster than two that
    fight other processes for the cores (measured: the comparison run takes 47 s instead of 162 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
ALL_METHODS = ["standard", "toss", "random", "first-k", "sample-level", "safety-only", "utility-only",
               "reference-free", "oracle"]


# ---- baseline masks -----------------------------------------------------------------------------


def layout(lengths, prompt_share=0.5):
    tokens = token_table(lengths, prompt_share=prompt_share)
    _, counts, positions = response_layout(tokens)
    return tokens, counts, positions


def test_first_k_masks_the_first_tokens_of_every_response_within_the_budget():
    _, counts, positions = layout([8, 12, 6])  # responses of 4, 6 and 3 tokens
    assert counts.tolist() == [4, 6, 3]
    discard, _ = baseline_discard("first-k", 10, counts=counts, positions=positions)
    # k = 3 everywhere (9 tokens); the 10th budget token is position 3 of the earliest sample
    per_sample = np.split(discard, np.cumsum(counts)[:-1])
    assert [d.tolist() for d in per_sample] == [[True] * 4, [True] * 3 + [False] * 3, [True] * 3]


def test_random_mask_spends_the_budget_and_follows_the_seed():
    _, counts, positions = layout([20] * 10)
    a, _ = baseline_discard("random", 17, counts=counts, positions=positions, seed=0)
    b, _ = baseline_discard("random", 17, counts=counts, positions=positions, seed=0)
    c, _ = baseline_discard("random", 17, counts=counts, positions=positions, seed=1)
    assert a.sum() == 17 and np.array_equal(a, b) and not np.array_equal(a, c)


def test_single_reference_rankings_use_one_term_with_its_sign_in_S():
    _, counts, positions = layout([6, 6])  # 3 response tokens each
    l_u = np.array([1, 9, 2, 8, 3, 7], np.float32)
    l_h = np.array([5, 4, 0.5, 6, 0.1, 3], np.float32)
    losses = {"utility": l_u, "safety": l_h, "base": l_u + l_h}

    def picks(method):
        discard, _ = baseline_discard(method, 2, counts=counts, positions=positions, losses=losses)
        return np.flatnonzero(discard).tolist()

    assert picks("safety-only") == [2, 4]  # -l_h: what the harmful model finds likely
    assert picks("utility-only") == [1, 3]  # l_u: what the utility model finds unlikely
    assert picks("rank:l_h") == [0, 3]  # the SPEC's literal wording, available on request
    assert picks("reference-free") == [1, 3]  # l_base = l_u + l_h here
    assert needed_scores("safety-only") == {"safety"} and needed_scores("reference-free") == {"base"}
    assert needed_scores("sample-level") == {"utility", "safety"} and needed_scores("random") == set()


def test_sample_level_drops_whole_samples_by_mean_score_within_the_budget():
    _, counts, positions = layout([6, 8, 6, 4])  # 3, 4, 3, 2 response tokens
    s = {0: 0.5, 1: 3.0, 2: 2.0, 3: 1.0}  # mean S per sample (l_h = 0)
    l_u = np.concatenate([np.full(n, s[i], np.float32) for i, n in enumerate(counts)])
    losses = {"utility": l_u, "safety": np.zeros_like(l_u)}
    discard, score = baseline_discard("sample-level", 8, counts=counts, positions=positions, losses=losses)
    # ranking 1 (4 tokens), 2 (3 tokens: 7 in all), 3 (2 more would make 9 > 8): stop
    assert [bool(d.all()) for d in np.split(discard, np.cumsum(counts)[:-1])] == [False, True, True, False]
    assert discard.sum() == 7 and score[3] == 3.0


def test_oracle_and_mask_quality():
    _, counts, positions = layout([6, 6, 6])
    flags = np.array([False, True, False])
    oracle, _ = baseline_discard("oracle", 0, counts=counts, positions=positions, flags=flags)
    assert mask_quality(oracle, counts, flags)["precision"] == 1.0
    some = np.zeros(9, bool)
    some[[0, 3, 4]] = True  # one token outside, two of the three harmful ones
    q = mask_quality(some, counts, flags)
    assert q["precision"] == pytest.approx(2 / 3) and q["recall"] == pytest.approx(2 / 3)
    assert q["discarded_tokens"] == 3 and q["harmful_samples"] == 1
    assert "precision" not in mask_quality(some, counts, None)


def test_baseline_mask_table_lines_up_with_its_tokens_and_trains(tmp_path):
    from toss_core.tables import TOKENS_SCHEMA, read_mask, read_table
    from toss_core.train_data import with_mask

    tokens = token_table([10, 14, 9, 12], seed=3)
    tokens = tokens.set_column(4, "meta", pa.array([json.dumps({"is_harmful": i == 1}) for i in range(4)]))
    pq.write_table(tokens, tmp_path / "tokens.parquet")
    pq.write_table(score_table(tokens, lambda sid, pos: float(pos)), tmp_path / "safety.parquet")
    stats = write_baseline_mask("safety-only", [str(tmp_path / "tokens.parquet")],
                                {"safety": [str(tmp_path / "safety.parquet")]}, 5, 0, str(tmp_path / "mask.parquet"))
    assert stats["discarded_tokens"] == 5 and stats["recall"] is not None
    mask = read_mask([str(tmp_path / "mask.parquet")])
    assert mask.column_names == ["sample_id", "ids_digest", "discard_pos"]
    assert sum(len(p) for p in mask.column("discard_pos").to_pylist()) == 5
    examples = with_mask(read_table([str(tmp_path / "tokens.parquet")], TOKENS_SCHEMA), mask, "keep")
    resp = sum(int(np.sum(m)) for m in tokens.column("response_mask").to_pylist())
    assert sum(int(e.labels.sum()) for e in examples) == resp - 5


# ---- report -------------------------------------------------------------------------------------


def rec(method, seed, metric, value, set_name=None, judge=None):
    return {"method": method, "seed": seed, "metric": metric, "set": set_name, "judge": judge, "value": value}


def test_summary_table_has_methods_as_rows_and_mean_and_standard_error(tmp_path):
    records = [
        rec("standard", 0, "win", 50.0, "hexphi", "llm"), rec("standard", 1, "win", 50.0, "hexphi", "llm"),
        rec("toss", 0, "win", 80.0, "hexphi", "llm"), rec("toss", 1, "win", 90.0, "hexphi", "llm"),
        rec("toss", 0, "win", 60.0, "slimorca", "llm"), rec("toss", 1, "win", 70.0, "slimorca", "llm"),
        rec("toss", 0, "refusal", 40.0, "hexphi", "kw"), rec("toss", 1, "refusal", 60.0, "hexphi", "kw"),
        rec("toss", 0, "utility-loss", 0.5), rec("toss", 1, "utility-loss", 0.7),
        rec("standard", 0, "utility-loss", 0.6), rec("standard", 1, "utility-loss", 0.6),
        rec("toss", None, "precision", 75.0),
    ]
    summary = summarize(records, ["standard", "toss"], [("hexphi", "harmful"), ("slimorca", "benign")],
                        ["kw", "llm"], meta={"sets": [["hexphi", "harmful"], ["slimorca", "benign"]]})
    labels = [c["label"] for c in summary["columns"]]
    assert labels == ["hexphi win %", "hexphi refusal %", "slimorca win %", "avg win %", "utility loss",
                      "mask precision %"]
    toss = summary["rows"][1]["cells"]
    assert toss["hexphi/win/llm"]["mean"] == 85.0 and toss["hexphi/win/llm"]["std"] == pytest.approx(7.0711, 1e-4)
    assert toss["hexphi/win/llm"]["se"] == pytest.approx(5.0) and toss["hexphi/win/llm"]["n"] == 2  # SD / sqrt(2)
    assert toss["win-avg/llm"]["values"] == {"0": 70.0, "1": 80.0}  # the paper's avg, per seed
    md = to_markdown(summary, "t")
    assert "| toss | 85.0 ± 5.0 | 50.0 ± 10.0 | 65.0 ± 5.0 | 75.0 ± 5.0 | 0.600 ± 0.100 | 75.0 |" in md
    assert "| standard | 50.0 ± 0.0 | - | - | 50.0 ± 0.0 | 0.600 ± 0.000 | - |" in md
    assert "mean ± standard error (SE = sample SD / √n) over n = 2 fine-tune seeds" in md
    assert scatter_png(summary, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_a_cell_with_another_number_of_seeds_shows_its_n():
    records = [rec(m, s, "utility-loss", v) for m, s, v in
               [("a", 0, 1.0), ("a", 1, 2.0), ("a", 2, 3.0), ("b", 0, 1.0), ("b", 1, 2.0), ("b", 2, 3.0),
                ("c", 0, 1.0), ("c", 1, 3.0), ("base", None, 2.5)]]
    md = to_markdown(summarize(records, ["base", "a", "b", "c"], []))
    assert "| a | 2.000 ± 0.577 |" in md  # SD 1, n = 3
    assert "| c | 2.000 ± 1.000 (n=2) |" in md and "| base | 2.500 |" in md
    assert "over n = 3 fine-tune seeds" in md


def refusal_rec(method, seed, set_name, judge, refused, rated):
    return {**rec(method, seed, "refusal", 100.0 * refused / rated, set_name, judge), "refused": refused,
            "rated": rated}


def test_pooled_harmful_refusal_is_refused_over_rated_across_harmful_sets():
    sets = [("small", "harmful"), ("large", "harmful"), ("chat", "benign")]
    records = [
        # seed 0: 2/10 and 24/30 -> 26/40 = 65 % (the mean of the two rates would be 50 %)
        refusal_rec("toss", 0, "small", "kw", 2, 10), refusal_rec("toss", 0, "large", "kw", 24, 30),
        # seed 1: 4/10 and 21/30 -> 25/40 = 62.5 %
        refusal_rec("toss", 1, "small", "kw", 4, 10), refusal_rec("toss", 1, "large", "kw", 21, 30),
        rec("toss", 0, "over-refusal", 90.0, "chat", "kw"), rec("toss", 1, "over-refusal", 90.0, "chat", "kw"),
        # another judge, one seed: 5/10 and 15/30 -> 50 %
        refusal_rec("toss", 0, "small", "clf", 5, 10), refusal_rec("toss", 0, "large", "clf", 15, 30),
        # no counts (an older record): no pooled value for this group
        rec("standard", 0, "refusal", 10.0, "small", "kw"),
    ]
    summary = summarize(records, ["standard", "toss"], sets, ["kw", "clf"],
                        meta={"sets": [list(s) for s in sets]})
    ids = [c["id"] for c in summary["columns"]]
    assert ids[:2] == ["refusal-pooled/kw", "refusal-pooled/clf"]  # first, before the per-set columns
    assert summary["columns"][0]["label"] == "harmful refusal % (pooled) [kw]"
    toss = summary["rows"][1]["cells"]
    assert toss["refusal-pooled/kw"]["values"] == {"0": 65.0, "1": 62.5}
    assert toss["refusal-pooled/kw"]["mean"] == pytest.approx(63.75)
    assert toss["refusal-pooled/kw"]["se"] == pytest.approx(1.25)  # SD 2.5/sqrt(2), over sqrt(2)
    assert toss["refusal-pooled/clf"]["values"] == {"0": 50.0} and toss["refusal-pooled/clf"]["se"] is None
    assert "refusal-pooled/kw" not in summary["rows"][0]["cells"]  # standard: a record without counts
    pooled = [r for r in summary_records(records) if r["metric"] == "refusal-pooled" and r["judge"] == "kw"]
    assert {(r["seed"], r["refused"], r["rated"]) for r in pooled} == {(0, 26, 40), (1, 25, 40)}


def summary_records(records):
    from toss_core.report import with_pooled_refusal

    return with_pooled_refusal(records)


def test_cohen_kappa_by_hand():
    # A refuses 25 of 50, B 30 of 50, they agree on 20 + 15: p_o = 0.7, p_e = 0.5*0.6 + 0.5*0.4 = 0.5
    assert cohen_kappa(both=20, only_a=5, only_b=10, neither=15) == pytest.approx(0.4)
    assert cohen_kappa(10, 0, 0, 5) == pytest.approx(1.0)
    assert cohen_kappa(0, 5, 5, 0) == pytest.approx(-1.0)  # always disagree, balanced
    assert cohen_kappa(0, 0, 72, 80) == 0.0  # A never refuses: agreement is what chance gives, exactly 0
    assert cohen_kappa(0, 0, 0, 12) is None  # both always say no: chance agreement is 1, kappa undefined
    assert cohen_kappa(0, 0, 0, 0) is None
    (row,) = judge_agreement({("kw", "clf"): [20, 5, 10, 15]})
    assert row["judges"] == ["kw", "clf"] and row["n"] == 50 and row["agreement"] == pytest.approx(70.0)
    assert row["kappa"] == pytest.approx(0.4) and (row["refused_a"], row["refused_b"]) == (50.0, 60.0)
    md = to_markdown(summarize([rec("toss", 0, "utility-loss", 1.0)], ["toss"], [], agreement=[row]))
    assert "## Judge agreement on refused" in md
    assert "| kw / clf | 50 | 70.0 | 0.40 | 50.0 | 60.0 | 20 / 5 / 10 / 15 |" in md


# ---- the full comparison on the quick config ------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def eval_overrides(tmp: Path) -> list[str]:
    harmful = write_jsonl(tmp / "harmful-prompts.jsonl",
                          [{"prompt": f"Explain how to do [restricted task {200 + i}]."} for i in range(4)])
    benign = write_jsonl(tmp / "benign-prompts.jsonl",
                         [{"prompt": f"What colour is the {o}?"} for o in ("lamp", "river", "comet", "tower")])
    held_out = write_jsonl(tmp / "held-out.jsonl", [{"prompt": f"What colour is the {o}?", "response": f"The {o} is {c}."}
                                                     for o, c in (("lamp", "red"), ("comet", "green"), ("tower", "grey"))])
    return [
        f"store.url={tmp / 'store'}", "eval.enabled=true",
        f"eval.prompts=[{{name: restricted, path: {harmful}, kind: harmful}}, "
        f"{{name: benign, path: {benign}, kind: benign}}]",
        f"eval.utility={held_out}", "eval.seeds=[0, 1]",
        # a second judge on the same answers (no win rates): the agreement table
        "eval.judges=[{name: refusal, kind: refusal}, "
        "{name: strict, kind: refusal, pairwise: false, extra_refusal_phrases: ['e']}]",
        "eval.generation.max_new_tokens=4",
        # a short fine-tune per method and seed: the mechanics, not a result
        "finetune.max_steps=2", "finetune.batch_size=8", "finetune.micro_batch_size=8",
    ]


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    from toss_core.config import load_config
    from toss_core.pipeline import run_pipeline
    from toss_core.store import ArtifactStore

    tmp = tmp_path_factory.mktemp("eval")
    cfg = load_config(QUICK, eval_overrides(tmp))
    store = ArtifactStore(cfg.store.url)
    result = run_pipeline(cfg, store, progress=False)
    results = json.loads(store.open(result.final["report"].ref, "results.json").read())
    return cfg, store, result, results


def cell(results, method, column):
    row = next(r for r in results["rows"] if r["method"] == method)
    return row["cells"].get(column)


def test_every_method_is_a_row_with_safety_and_utility(comparison):
    _, _, result, results = comparison
    assert [r["method"] for r in results["rows"]] == ["base", *ALL_METHODS]
    for method in ["base", *ALL_METHODS]:
        for column in ("restricted/refusal/refusal", "benign/over-refusal/refusal", "restricted/win/refusal",
                       "benign/win/refusal", "win-avg/refusal", "utility-loss"):
            assert cell(results, method, column)["mean"] is not None, (method, column)
    for method in ALL_METHODS:  # fine-tuned with both seeds: a spread
        assert cell(results, method, "utility-loss")["n"] == 2
    assert cell(results, "standard", "restricted/win/refusal")["mean"] == 50.0  # by construction
    names = [n for n, _ in result.steps]
    assert sum(n.startswith("eval train ") for n in names) == len(ALL_METHODS) * 2


def test_pooled_refusal_and_judge_agreement_come_from_the_judgement_tables(comparison):
    _, store, result, results = comparison
    assert results["columns"][0]["id"] == "refusal-pooled/refusal"
    for method in ["base", *ALL_METHODS]:  # one harmful set here: the pooled rate is that set's rate, per seed
        assert cell(results, method, "refusal-pooled/refusal")["values"] == \
            cell(results, method, "restricted/refusal/refusal")["values"]
    (row,) = results["agreement"]
    subjects = 1 + 2 * len(ALL_METHODS)  # the base model and every method x 2 seeds
    assert row["judges"] == ["refusal", "strict"] and row["n"] == subjects * (4 + 4)  # both prompt sets
    t = row["table"]
    assert t["only_a"] == 0  # "strict" is "refusal" with one more phrase: it refuses wherever "refusal" does
    assert row["agreement"] == pytest.approx(100 * (t["both"] + t["neither"]) / row["n"])
    markdown = store.open(result.final["report"].ref, "report.md").read().decode()
    assert "## Judge agreement on refused" in markdown and "| refusal / strict |" in markdown
    manifest = store.manifest("report", result.final["report"].ref.key)
    assert manifest.metrics["agreement"]["refusal / strict"]["n"] == row["n"]


def test_masks_spend_the_same_token_budget(comparison):
    results = comparison[3]
    toss = cell(results, "toss", "discarded")["mean"]
    assert toss == pytest.approx(10.0, abs=0.1)  # select.ratio = 0.1
    for method in ("random", "first-k", "safety-only", "utility-only", "reference-free"):
        assert cell(results, method, "discarded")["mean"] == pytest.approx(toss)
    assert cell(results, "sample-level", "discarded")["mean"] <= toss
    assert cell(results, "oracle", "precision")["mean"] == cell(results, "oracle", "recall")["mean"] == 100.0
    # the planted harmful samples: TOSS's mask is far more precise than chance
    assert cell(results, "toss", "precision")["mean"] > 2 * cell(results, "random", "precision")["mean"]


def test_report_files_and_the_report_command(comparison, tmp_path):
    import typer
    from typer.testing import CliRunner

    from flows.report_cmd import report

    cfg, store, result, _ = comparison
    listed = {f.path.split("/", 1)[1] for f in store.manifest("report", result.final["report"].ref.key).files}
    assert listed == {"report.md", "report.html", "results.json", "scatter.png"}

    app = typer.Typer()
    app.command()(report)
    app.command("noop")(lambda: None)  # two commands, so typer keeps the subcommand name
    out = CliRunner().invoke(app, ["report", cfg.store.url, "--out", str(tmp_path / "r")])
    assert out.exit_code == 0, out.output
    for method in ["base", *ALL_METHODS]:
        assert f"| {method} |" in out.stdout
    assert (tmp_path / "r" / "scatter.png").read_bytes()[:4] == b"\x89PNG"
    page = (tmp_path / "r" / "report.html").read_text()  # one self-contained page: the table and the plot inline
    assert "<table>" in page and "data:image/png;base64," in page and "<td>toss</td>" in page
    as_json = CliRunner().invoke(app, ["report", result.final["report"].ref.uri, "--format", "json"])
    assert json.loads(as_json.stdout)["rows"][0]["method"] == "base"
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "no evaluation report" in missing.output


def test_rerun_reuses_everything_and_a_new_judge_regenerates_nothing(comparison):
    from toss_core.pipeline import run_pipeline

    cfg, store, _, _ = comparison
    again = run_pipeline(cfg, store, progress=False)
    assert [n for n, o in again.steps if not o.reused] == []
    cfg2 = cfg.model_copy(deep=True)
    cfg2.eval.judges[0].extra_refusal_phrases = ["[placeholder refusal]"]
    changed = run_pipeline(cfg2, store, progress=False)
    computed = [n for n, o in changed.steps if not o.reused]
    assert computed and all(n.startswith(("eval judge", "eval compare", "eval report")) for n in computed)


# ---- the same evaluation as Prefect tasks ----------------------------------------------------------


def test_prefect_flow_runs_the_evaluation_as_cached_tasks(comparison):
    """The Prefect flow on the comparison's store, with another generation seed: the pipeline, masks and
    fine-tunes are reused (the two executors share every artifact), the rest runs as Prefect tasks."""
    pytest.importorskip("prefect")
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    from flows.toss import toss_pipeline

    cfg, store, _, _ = comparison
    cfg = cfg.model_copy(deep=True)
    cfg.eval.methods, cfg.eval.seeds, cfg.eval.include_base = ["standard", "toss", "random"], [0], False
    cfg.eval.generation.seed = 1
    with prefect_test_harness(server_startup_timeout=120), \
            temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        out = toss_pipeline(cfg, [])
        again = toss_pipeline(cfg, [])
    computed = [r["stage"] for r in out["stages"] if r["status"] == "computed"]
    assert computed and all(n.startswith(("eval generate", "eval judge", "eval compare", "eval report"))
                            for n in computed)
    assert "eval compare refusal random s0 vs standard s0 restricted" in computed
    assert {"eval train random s0", "eval mask random s0", "train finetune"} <= {r["stage"] for r in out["stages"]}
    assert [r["stage"] for r in again["stages"] if r["status"] == "computed"] == []
    report = store.ref("report", out["report"]["key"])
    rows = json.loads(store.open(report, "results.json").read())["rows"]
    assert [r["method"] for r in rows] == ["standard", "toss", "random"]
