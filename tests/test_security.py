"""A shared store is untrusted input (docs/security.md): each attack or fault found by hand is replayed here,
and each test shows the clear error and that nothing outside the store changed, nothing corrupt was
published, no planted code ran."""

import hashlib
import json
import os

import pyarrow.parquet as pq
import pytest

from tests.factories import token_table
from toss_core.store import MANIFEST, ArtifactError, ArtifactStore


def publish_tokens(store, key="k", rows=(5, 7, 9)):
    with store.writer("tokens", key, config={}, inputs={}) as w:
        with w.open("tokens.parquet") as f:
            pq.write_table(token_table(list(rows)), f)
    return w.ref


def plant_manifest(store, at: str, changes: dict):
    """Rewrite the published manifest at <stage>/<key> `at`, as anyone with write access to the store could."""
    path = f"{store.root}/{at}/{MANIFEST}"
    manifest = json.loads(store.fs.cat_file(path))
    manifest.update(changes)
    store.fs.pipe_file(path, json.dumps(manifest).encode())
    return manifest


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- manifests: names that become paths ------------------------------------------------------------

@pytest.mark.parametrize("change", [{"stage": "../victim"}, {"key": "../../victim"}, {"writer_id": "../victim"},
                                    "file"])
def test_a_planted_manifest_cannot_reach_outside_the_cache(s3_store, tmp_path, change):
    victim = tmp_path / "cache" / "victim"  # a folder next to the cache's stage folders
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text("mine")
    (tmp_path / "victim-outside.txt").write_text("mine too")
    before = snapshot(tmp_path)
    ref = publish_tokens(s3_store)
    if change == "file":
        m = json.loads(s3_store.fs.cat_file(f"{ref.uri}/{MANIFEST}"))
        m["files"][0]["path"] = f"{m['writer_id']}/../../../victim-outside.txt"
        s3_store.fs.pipe_file(f"{ref.uri}/{MANIFEST}", json.dumps(m).encode())
    else:
        plant_manifest(s3_store, "tokens/k", change)
    with pytest.raises(ArtifactError, match="not a valid manifest|claims to be"):
        s3_store.local_dir(ref)
    with pytest.raises(ArtifactError):
        s3_store.ref("tokens", "k")
    assert snapshot(tmp_path) == before  # no download, no replaced folder
    assert s3_store.list() == []  # listed as nobody's artifact


def test_a_manifest_copied_to_another_key_is_not_trusted_and_gc_keeps_the_real_files(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    real = publish_tokens(store, "real")
    stray = tmp_path / "store" / "tokens" / "stray"
    stray.mkdir()
    (stray / MANIFEST).write_bytes((tmp_path / "store" / "tokens" / "real" / MANIFEST).read_bytes())
    manifest = json.loads((stray / MANIFEST).read_text())
    manifest["writer_id"] = "w-20000101T000000Z-00000000"  # claims 'real' with another writer folder
    manifest["files"] = []
    (stray / MANIFEST).write_text(json.dumps(manifest))
    before = snapshot(tmp_path / "store")
    assert store.gc(grace_seconds=0) == []  # the stray manifest is nobody's: neither it nor 'real' is touched
    assert snapshot(tmp_path / "store") == before
    assert [m.key for m in store.list()] == ["real"]
    assert store.local_files(real)[0].exists()
    with pytest.raises(ArtifactError, match="claims to be tokens/real"):
        store.manifest("tokens", "stray")


def test_a_ref_pointing_elsewhere_in_the_store_is_refused(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    ref = publish_tokens(store, "a")
    publish_tokens(store, "b")
    forged = ref.model_copy(update={"uri": ref.uri[:-1] + "b"})
    with pytest.raises(ArtifactError, match="points at"):
        store.local_files(forged)


# ---- digests on every read -------------------------------------------------------------------------

def test_a_flipped_byte_in_a_local_store_is_caught_before_anything_reads_it(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    ref = publish_tokens(store)
    path = store.local_files(ref)[0]  # verified once (and remembered)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    stat = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with its old mtime back
    with pytest.raises(ArtifactError, match="does not match its manifest digest"):
        store.local_files(ref)
    with pytest.raises(ArtifactError, match="does not match its manifest digest"):
        store.open(ref, "tokens.parquet")


def test_a_file_added_to_a_published_local_artifact_is_refused(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    ref = publish_tokens(store)
    (store.local_dir(ref) / "extra.parquet").write_bytes(b"planted")
    with pytest.raises(ArtifactError, match="extra.parquet is not listed in the manifest"):
        store.local_files(ref)


def test_a_tampered_s3_file_is_refused_when_opened(s3_store):
    with s3_store.writer("mask", "k", config={}, inputs={}) as w:
        w.write_json("stats.json", {"a": 1})
    s3_store.fs.pipe_file(s3_store.files(w.ref)[0], b'{"a": 2}')
    with pytest.raises(ArtifactError, match="does not match its manifest digest"):
        s3_store.open(w.ref, "stats.json")


# ---- checkpoints: no pickle ------------------------------------------------------------------------

class _Payload:
    """What a planted checkpoint would carry: unpickling it calls os.mkdir (a harmless witness)."""

    def __init__(self, witness):
        self.witness = str(witness)

    def __reduce__(self):
        return os.mkdir, (self.witness,)


def _crash_after_one_checkpoint(tiny_model_dir, store, tmp_path, monkeypatch):
    from tests.test_training import _cfg, examples
    from toss_core.faults import ENV, InjectedFault
    from toss_core.stages import StoreCheckpoints
    from toss_core.training import train_lora

    cfg, data = _cfg(epochs=1, checkpoint_every=1), examples(24)  # 3 steps
    monkeypatch.setenv(ENV, "train@1")
    with pytest.raises(InjectedFault):
        train_lora(tiny_model_dir, data, cfg, tmp_path / "a", checkpoints=StoreCheckpoints(store, "train", "k"),
                   progress=False)
    monkeypatch.delenv(ENV)
    return lambda: train_lora(tiny_model_dir, data, cfg, tmp_path / "b",
                              checkpoints=StoreCheckpoints(store, "train", "k"), progress=False)


@pytest.mark.parametrize("planted", ["optimizer.pt", "rng.pt"])
def test_a_planted_pickle_checkpoint_never_runs(tiny_model_dir, tmp_path, monkeypatch, planted):
    import torch

    from toss_core.distributed import CheckpointError

    store = ArtifactStore(tmp_path / "store")
    resume = _crash_after_one_checkpoint(tiny_model_dir, store, tmp_path, monkeypatch)
    folder = tmp_path / "store" / "_checkpoints" / "train" / "k" / "step-00000001"
    witness = tmp_path / "payload-ran"
    torch.save({"state": _Payload(witness)}, folder / planted)
    complete = json.loads((folder / "COMPLETE").read_text())  # an attacker can recompute the digests
    complete["files"][planted] = hashlib.sha256((folder / planted).read_bytes()).hexdigest()
    (folder / "COMPLETE").write_text(json.dumps(complete))
    with pytest.raises(CheckpointError, match="refusing to load it"):
        resume()
    assert not witness.exists()
    assert not (tmp_path / "b" / "adapter_model.safetensors").exists()


def test_a_checkpoint_changed_after_saving_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path / "store")
    resume = _crash_after_one_checkpoint(tiny_model_dir, store, tmp_path, monkeypatch)
    folder = tmp_path / "store" / "_checkpoints" / "train" / "k" / "step-00000001"
    (folder / "scheduler.pt").write_bytes(b"changed")
    with pytest.raises(ArtifactError, match="does not match its manifest digest"):
        resume()


# ---- rows: lengths, types, values ------------------------------------------------------------------

def _select_inputs(tmp_path, util_fn=None, safe_fn=None):
    from tests.factories import score_table

    tokens = token_table([6, 9, 12, 7])
    util = score_table(tokens, util_fn or (lambda s, p: 1.0 + 0.1 * p))
    safe = score_table(tokens, safe_fn or (lambda s, p: 0.5 + 0.01 * s))
    paths = {}
    for name, t in (("tokens", tokens), ("utility", util), ("safety", safe)):
        paths[name] = str(tmp_path / f"{name}.parquet")
        pq.write_table(t, paths[name])
    return tokens, util, safe, paths


def _select(paths, tmp_path, cfg=None):
    """Select through a store writer, as the stage does: on an error nothing may be published."""
    from toss_core.config import SelectConfig
    from toss_core.stages import produce_mask

    store = ArtifactStore(tmp_path / "store")
    try:
        with store.writer("mask", "k", config={}, inputs={}) as w:
            produce_mask(w, [paths["tokens"]], [paths["utility"]], [paths["safety"]], cfg or SelectConfig())
    finally:
        assert store.exists("mask", "k") == (w.ref is not None)
    return store, w.ref


def _rewrite(path, table, column, rows):
    """Replace the lists of `column` at the given rows (a dict row -> new list)."""
    import pyarrow as pa

    values = table.column(column).to_pylist()
    for row, new in rows.items():
        values[row] = new
    table = table.set_column(table.schema.get_field_index(column), column,
                             pa.array(values, type=table.schema.field(column).type))
    pq.write_table(table, path)


def test_a_shifted_score_row_is_refused_naming_file_and_sample(tmp_path):
    from toss_core.tables import TableError

    _, util, _, paths = _select_inputs(tmp_path)
    loss = util.column("loss").to_pylist()
    _rewrite(paths["utility"], util, "loss", {1: loss[1][:-1], 2: [float("nan")] + loss[2]})  # same total
    with pytest.raises(TableError, match=r"utility\.parquet: utility scores: sample 1: `loss` has 8 entries for 9"):
        _select(paths, tmp_path)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf")])
def test_infinite_losses_are_refused_by_name(tmp_path, bad):
    from toss_core.tables import TableError

    _, _, _, paths = _select_inputs(tmp_path, safe_fn=lambda s, p: bad if (s, p) == (2, 8) else 0.5)
    with pytest.raises(TableError, match=rf"safety\.parquet: safety scores: sample 2: a response token's `loss` is "
                                         rf"{bad}"):
        _select(paths, tmp_path)


def test_score_tables_made_elsewhere_without_ids_digest_get_a_clear_error(tmp_path):
    from toss_core.tables import TableError

    _, util, _, paths = _select_inputs(tmp_path)
    pq.write_table(util.drop_columns(["ids_digest"]), paths["utility"])
    with pytest.raises(TableError, match=r"utility\.parquet: missing column\(s\) \['ids_digest'\]"):
        _select(paths, tmp_path)


def test_a_score_column_of_the_wrong_type_is_named(tmp_path):
    import pyarrow as pa

    from toss_core.tables import TableError

    _, util, _, paths = _select_inputs(tmp_path)
    as_text = pa.array([[str(x) for x in row] for row in util.column("loss").to_pylist()], pa.list_(pa.string()))
    pq.write_table(util.set_column(2, "loss", as_text), paths["utility"])
    with pytest.raises(TableError, match=r"utility\.parquet: column `loss` is list<element: string>, expected "
                                         r"list<item: float>"):
        _select(paths, tmp_path)


def test_select_threshold_nan_fails_validation():
    from toss_core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="select.threshold: Input should be a finite number"):
        load_config(None, ["model.tiny={}", "data.custom=a", "data.harmful=a", "data.utility=a",
                           "select.mode=threshold", "select.threshold=.nan"])


def _mask_and_tokens(tmp_path):
    from toss_core.config import SelectConfig
    from toss_core.tables import TOKENS_SCHEMA, read_mask, read_table

    tokens, _, _, paths = _select_inputs(tmp_path)
    store, ref = _select(paths, tmp_path, SelectConfig(ratio=0.3, mask_files=1))
    mask_file = str(store.local_files(ref, ".parquet")[0])
    return read_table([paths["tokens"]], TOKENS_SCHEMA), read_mask([mask_file]), mask_file


@pytest.mark.parametrize("row, positions, message", [
    (1, [8, 7], "not sorted and unique"), (1, [7, 7], "not sorted and unique"),
    (1, [9], "discard_pos 9 is outside its 9 tokens"), (1, [-1], "discard_pos -1 is outside")])
def test_a_bad_v3_mask_row_is_refused(tmp_path, row, positions, message):
    from toss_core.tables import TableError, read_mask
    from toss_core.train_data import with_mask

    tokens, mask, mask_file = _mask_and_tokens(tmp_path)
    _rewrite(mask_file, mask, "discard_pos", {row: positions})
    with pytest.raises(TableError, match=f"sample 1 \\(row 1\\): .*{message}"):
        with_mask(tokens, read_mask([mask_file]), "keep")


def test_a_one_element_v2_discard_row_is_refused_not_applied(tmp_path):
    from tests.factories import discard_rows
    from toss_core.tables import MASK_V2_SCHEMA, TableError, read_mask
    import pyarrow as pa

    tokens, mask, _ = _mask_and_tokens(tmp_path)
    flags = discard_rows(mask, tokens)
    flags[2] = [True]  # one entry for a 12-token sample
    v2 = pa.table({"sample_id": mask.column("sample_id"), "ids_digest": mask.column("ids_digest"),
                   "discard": flags, "score": [[0.0] * len(f) for f in flags]}, schema=MASK_V2_SCHEMA)
    pq.write_table(v2, tmp_path / "v2.parquet")
    from toss_core.train_data import with_mask

    with pytest.raises(TableError, match=r"sample 2 \(row 2\): its `discard` list has 1 entries for 12 tokens"):
        with_mask(tokens, read_mask([str(tmp_path / "v2.parquet")]), "keep")


def test_a_token_table_whose_ids_were_changed_is_refused(tmp_path):
    from toss_core.tables import TOKENS_SCHEMA, TableError, read_table

    tokens = token_table([5, 6])
    ids = tokens.column("input_ids").to_pylist()
    ids[1][3] += 1  # one token id changed, the digest left as it was
    _rewrite(str(tmp_path / "t.parquet"), tokens, "input_ids", {1: ids[1]})
    with pytest.raises(TableError, match=r"t\.parquet: sample 1 \(row 1\): `ids_digest` does not match"):
        read_table([str(tmp_path / "t.parquet")], TOKENS_SCHEMA)


# ---- secrets ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", ["{key: AKIAXXXX, secret: s3cr3t-value}",
                                     "{client_kwargs: {aws_secret_access_key: s3cr3t-value}}",
                                     "{token: s3cr3t-value}"])
def test_secrets_in_storage_options_are_refused_and_never_echoed(options):
    from toss_core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="credentials are never part of a config") as err:
        load_config(None, ["model.tiny={}", "data.custom=a", "data.harmful=a", "data.utility=a",
                           f"store.storage_options={options}"])
    assert "s3cr3t-value" not in str(err.value)
    ok = load_config(None, ["model.tiny={}", "data.custom=a", "data.harmful=a", "data.utility=a",
                            "store.storage_options={client_kwargs: {endpoint_url: 'http://127.0.0.1:9000'}}"])
    assert ok.store.storage_options["client_kwargs"]["endpoint_url"].startswith("http://")


# ---- the command line ------------------------------------------------------------------------------

def run_main(monkeypatch, *args):
    """`toss ARGS` through the real entry point; returns (exit code, stderr)."""
    import flows.cli as cli

    monkeypatch.setattr("sys.argv", ["toss", *map(str, args)])
    monkeypatch.setitem(cli._DEBUG, "on", False)
    from io import StringIO

    err = StringIO()
    monkeypatch.setattr(cli.console, "_file", err)  # (not `file`: restoring it would pin a stale stream)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    return exit_.value.code, err.getvalue()


def _select_args(paths, out):
    return ["select", "--tokens", paths["tokens"], "--utility", paths["utility"], "--safety", paths["safety"],
            "--out", out]


def test_select_out_refuses_a_published_artifact(tmp_path, monkeypatch):
    _, _, _, paths = _select_inputs(tmp_path)
    out = tmp_path / "mask"
    assert run_main(monkeypatch, *_select_args(paths, out))[0] == 0
    before = snapshot(out)
    code, err = run_main(monkeypatch, *_select_args(paths, out) + ["--ratio", "0.3"])
    assert code == 2 and "is already a published mask artifact" in err
    assert snapshot(out) == before


def test_stage_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, monkeypatch):
    _, util, _, paths = _select_inputs(tmp_path)
    pq.write_table(util.drop_columns(["ids_digest"]), paths["utility"])
    code, err = run_main(monkeypatch, *_select_args(paths, tmp_path / "mask"))
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 2 and "Traceback" not in err
    assert lines[0].startswith("error: TableError:") and "missing column(s) ['ids_digest']" in lines[0]
    assert "--debug" in lines[1]
    from toss_core.tables import TableError

    monkeypatch.setattr("sys.argv", ["toss", "--debug", *_select_args(paths, tmp_path / "mask")])
    import flows.cli as cli

    with pytest.raises(TableError):
        cli.main()


def test_a_missing_model_folder_is_named_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    code, err = run_main(monkeypatch, "prepare", data, "--model", tmp_path / "no-such-model", "--out", tmp_path / "t")
    assert code == 2 and f"model folder {tmp_path / 'no-such-model'} does not exist" in err
    assert "repo" not in err.lower()


def test_store_ls_on_a_missing_bucket_fails(s3_endpoint, monkeypatch, tmp_path):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    code, err = run_main(monkeypatch, "store", "ls", "--store", "s3://no-such-bucket/toss")
    assert code == 1 and "no store at s3://no-such-bucket/toss" in err
    code, err = run_main(monkeypatch, "store", "ls", "--store", tmp_path / "nowhere")
    assert code == 1 and "no store at" in err
    s3fs.S3FileSystem.clear_instance_cache()


def test_train_out_writes_checkpoints_and_resumes_from_them(tiny_model_dir, tmp_path, monkeypatch):
    from toss_core.faults import ENV

    tokens = token_table([12] * 24)
    pq.write_table(tokens, tmp_path / "tokens.parquet")
    out = tmp_path / "adapter"
    args = ["train", "--model", tiny_model_dir, "--tokens", tmp_path / "tokens.parquet", "--out", out,
            "--set", "epochs=1", "--set", "batch_size=8", "--set", "micro_batch_size=8", "--set", "checkpoint_every=1"]
    monkeypatch.setenv(ENV, "train@2")
    code, err = run_main(monkeypatch, *args)
    assert code == 1 and "InjectedFault" in err
    assert [p.name for p in (out / "_checkpoints" / "train").glob("*/step-*")] == ["step-00000002"]
    monkeypatch.delenv(ENV)
    assert run_main(monkeypatch, *args)[0] == 0
    from toss_core.store import read_manifest

    assert read_manifest(out).metrics["resumed_from_step"] == 2
    assert not (out / "_checkpoints").exists()
