"""The stage commands chain without Prefect or a store, through artifact folders and plain Parquet."""

import json
from pathlib import Path

import pyarrow.parquet as pq
from typer.testing import CliRunner

from flows.cli import app
from toss_core.store import read_manifest

DATA = Path(__file__).parents[1] / "configs" / "data" / "quick"
runner = CliRunner()


def toss(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_stages_chain_through_artifact_folders(tiny_model_dir, tmp_path):
    m = tiny_model_dir
    for name in ("custom", "harmful", "utility"):
        toss("prepare", DATA / f"{name}.jsonl", "--model", m, "--out", tmp_path / f"tok-{name}", "--max-len", 96)
    fast = ["--set", "epochs=1", "--set", "batch_size=16", "--set", "micro_batch_size=16", "--set", "lr=3e-3"]
    toss("train", "--model", m, "--tokens", tmp_path / "tok-harmful", "--out", tmp_path / "safety", *fast)
    toss("train", "--model", m, "--tokens", tmp_path / "tok-utility", "--out", tmp_path / "utility", *fast)
    for role in ("safety", "utility"):
        for shard in (0, 1):
            toss("score", "--model", m, "--adapter", tmp_path / role, "--tokens", tmp_path / "tok-custom",
                 "--shard", shard, "--shards", 2, "--out", tmp_path / f"s-{role}-{shard}")
    toss("select", "--tokens", tmp_path / "tok-custom", "--utility", tmp_path / "s-utility-0",
         "--utility", tmp_path / "s-utility-1", "--safety", tmp_path / "s-safety-0", "--safety",
         tmp_path / "s-safety-1", "--ratio", 0.1, "--out", tmp_path / "mask")
    toss("finetune", "--model", m, "--tokens", tmp_path / "tok-custom", "--mask", tmp_path / "mask",
         "--out", tmp_path / "final", *fast)

    manifest = read_manifest(tmp_path / "mask")
    assert manifest.stage == "mask"
    assert manifest.metrics["discarded_tokens"] == int(0.1 * manifest.metrics["response_tokens"])
    assert {"tokens", "utility0", "utility1", "safety0", "safety1"} == set(manifest.inputs)
    final = read_manifest(tmp_path / "final")
    assert any(f.path.endswith("adapter_model.safetensors") for f in final.files)


def test_select_reads_plain_parquet_made_elsewhere(tmp_path):
    from tests.factories import score_table, token_table

    tokens = token_table([12, 15, 9], seed=1)
    pq.write_table(tokens, tmp_path / "tokens.parquet")
    pq.write_table(score_table(tokens, lambda s, p: float(p)), tmp_path / "u.parquet")
    (tmp_path / "h").mkdir()  # a folder of Parquet files works too
    pq.write_table(score_table(tokens, lambda s, p: 0.0), tmp_path / "h" / "part-0.parquet")
    toss("select", "--tokens", tmp_path / "tokens.parquet", "--utility", tmp_path / "u.parquet",
         "--safety", tmp_path / "h", "--ratio", 0.2, "--out", tmp_path / "mask")
    mask = read_manifest(tmp_path / "mask")
    assert mask.metrics["discarded_tokens"] == int(0.2 * mask.metrics["response_tokens"])


def test_bad_input_gives_one_clear_message(tmp_path):
    bad = runner.invoke(app, ["select", "--tokens", str(tmp_path / "nope.parquet"), "--utility", "x", "--safety", "y",
                              "--out", tmp_path / "m"])
    assert bad.exit_code == 2 and "nope.parquet does not exist" in bad.output
    ratio = runner.invoke(app, ["select", "--tokens", "t", "--utility", "u", "--safety", "s", "--ratio", "1.4",
                                "--out", tmp_path / "m"])
    assert ratio.exit_code == 2 and "--ratio: Input should be less than 1" in ratio.output


def test_validate_names_every_bad_field(tmp_path):
    quick = Path(__file__).parents[1] / "configs" / "quick.yaml"
    ok = toss("validate", quick)
    assert "is valid" in ok.output
    bad = runner.invoke(app, ["validate", str(quick), "--set", "select.ratio=1.4", "--set", "reference.lr=-1",
                              "--set", "select.ratoi=0.2"])
    assert bad.exit_code == 2
    for field in ("select.ratio", "reference.lr", "select.ratoi"):
        assert field in bad.output


def test_store_ls_show_gc(tmp_path):
    from toss_core.store import ArtifactStore

    store = ArtifactStore(tmp_path / "store")
    with store.writer("tokens", "abc123", config={}, inputs={}) as w:
        w.write_json("x.json", {"a": 1})
    out = toss("store", "ls", "--store", tmp_path / "store").output
    assert "abc123" in out and "tokens" in out
    shown = json.loads(toss("store", "show", "abc", "--store", tmp_path / "store").output)
    assert shown["key"] == "abc123"
    (tmp_path / "store" / "tokens" / "abc123" / "w-orphan").mkdir()
    gc = toss("store", "gc", "--store", tmp_path / "store", "--grace-seconds", 0).output
    assert "w-orphan" in gc
    assert store.exists("tokens", "abc123")
