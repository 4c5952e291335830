"""The artifact store: publish-by-manifest, racing writers, gc, checkpoints, parquet resolution, S3 (moto)."""

import hashlib
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from toss_core.store import (
    MANIFEST,
    ArtifactError,
    ArtifactRef,
    ArtifactStore,
    artifact_key,
    file_digest,
    open_artifact_dir,
    read_manifest,
    resolve_parquet_files,
)


def table(n: int, start: int = 0) -> pa.Table:
    return pa.table({"sample": list(range(start, start + n))})


def write_parquet(writer, name: str, t: pa.Table) -> None:
    with writer.open(name) as f:
        pq.write_table(t, f)


def adapter_folder(tmp_path):
    """A stand-in for a saved PEFT adapter: files at the top and in a sub-folder."""
    folder = tmp_path / "adapter"
    (folder / "sub").mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 4}')
    (folder / "sub" / "weights.bin").write_bytes(os.urandom(1000))
    return folder


def assert_files_match_manifest(store: ArtifactStore, ref: ArtifactRef) -> None:
    m = store.manifest(ref.stage, ref.key)
    urls = store.files(ref)
    assert len(urls) == len(m.files)
    for url, entry in zip(urls, m.files):
        assert url.endswith(entry.path)
        data = store.fs.cat_file(url)
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry.size, entry.sha256)


def round_trip(store: ArtifactStore, tmp_path) -> ArtifactRef:
    key = artifact_key("tokens", 1, {"max_len": 8}, {"model": "m0"})
    assert not store.exists("tokens", key) and store.ref("tokens", key) is None
    with store.writer("tokens", key, config={"max_len": 8}, inputs={"model": "m0"}) as w:
        write_parquet(w, "tokens-00000.parquet", table(3))
        write_parquet(w, "tokens-00001.parquet", table(2, start=3))
        w.write_json("stats.json", {"rows": 5})
        w.put_dir(adapter_folder(tmp_path), prefix="adapter")
        w.metrics["rows"] = 5
        assert not store.exists("tokens", key)  # nothing is published before the manifest
    ref = w.ref
    assert ref == store.ref("tokens", key) and store.exists("tokens", key)
    assert ref.uri == store.uri("tokens", key)
    assert ArtifactRef.model_validate_json(ref.model_dump_json()) == ref

    m = store.manifest("tokens", key)
    assert m.inputs == {"model": "m0"} and m.metrics == {"rows": 5} and m.config == {"max_len": 8}
    assert {"python", "pyarrow", "torch"} <= set(m.versions)
    assert all(e.path.startswith(m.writer_id + "/") for e in m.files)
    assert [mm.key for mm in store.list("tokens")] == [key] and [mm.key for mm in store.list()] == [key]
    assert_files_match_manifest(store, ref)

    parquet = store.files(ref, ".parquet")
    assert [u.rsplit("/", 1)[-1] for u in parquet] == ["tokens-00000.parquet", "tokens-00001.parquet"]
    with store.open(ref, "stats.json") as f:
        assert json.load(f) == {"rows": 5}
    with pytest.raises(FileNotFoundError, match="nope.json"):
        store.open(ref, "nope.json")

    local = store.local_dir(ref)
    assert json.loads((local / "adapter" / "adapter_config.json").read_text()) == {"r": 4}
    assert (local / "adapter" / "sub" / "weights.bin").stat().st_size == 1000
    assert pq.read_table(local / "tokens-00001.parquet").column("sample").to_pylist() == [3, 4]
    return ref


# ---- local store --------------------------------------------------------------------------------

@pytest.fixture
def store(tmp_path):
    return ArtifactStore(str(tmp_path / "store"), cache_dir=tmp_path / "cache")


def test_round_trip_on_a_local_folder(store, tmp_path):
    ref = round_trip(store, tmp_path)
    m = store.manifest(ref.stage, ref.key)
    assert store.local_dir(ref) == tmp_path / "store" / "tokens" / ref.key / m.writer_id  # the real folder
    assert not (tmp_path / "cache").exists()  # a local store needs no cache
    assert file_digest(store.files(ref)[0]) == m.files[0].sha256


def test_file_url_and_relative_paths_name_the_same_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with ArtifactStore("./s").writer("mask", "k", config={}, inputs={}) as w:
        w.write_json("a.json", 1)
    assert ArtifactStore(f"file://{tmp_path}/s").ref("mask", "k") == w.ref
    assert w.ref.uri == str(tmp_path / "s" / "mask" / "k")


def test_a_failing_writer_publishes_nothing(store):
    with pytest.raises(RuntimeError, match="boom"):
        with store.writer("scores", "k", config={}, inputs={}) as w:
            write_parquet(w, "scores.parquet", table(4))
            raise RuntimeError("boom")
    assert not store.exists("scores", "k") and store.ref("scores", "k") is None and store.list() == []
    assert not os.path.exists(f"{store.uri('scores', 'k')}/{w.writer_id}")  # cleaned up
    with pytest.raises(ArtifactError, match="no published artifact .*scores/k"):
        store.local_dir(store.uri("scores", "k"))


@pytest.mark.parametrize("first_to_finish", ["a", "b"])
def test_racing_writers_of_one_key_leave_a_consistent_manifest(store, first_to_finish):
    a = store.writer("tokens", "k", config={}, inputs={})
    b = store.writer("tokens", "k", config={}, inputs={})
    wa, wb = a.__enter__(), b.__enter__()
    write_parquet(wa, "tokens.parquet", table(3))
    write_parquet(wb, "tokens.parquet", table(7))
    wa.write_json("who.json", "a")
    with open(wb.path("who.json"), "w") as f:  # a plain writer through path(): hashed when publishing
        json.dump("b", f)
    order = [(a, wa), (b, wb)] if first_to_finish == "a" else [(b, wb), (a, wa)]
    for cm, _ in order:
        cm.__exit__(None, None, None)
    last = order[-1][1]
    assert store.ref("tokens", "k") == last.ref  # the last manifest wins
    assert store.manifest("tokens", "k").writer_id == last.writer_id
    assert_files_match_manifest(store, last.ref)
    with store.open(last.ref, "who.json") as f:
        assert json.load(f) == ("a" if last is wa else "b")


def test_open_with_seek_is_still_digested_correctly(store):
    with store.writer("tokens", "k", config={}, inputs={}) as w:
        with w.open("x.bin") as f:
            f.write(b"aaaa")
            f.seek(0)
            f.write(b"b")
    assert_files_match_manifest(store, w.ref)


def test_gc_removes_orphan_writer_folders_but_never_the_published_one(store):
    for rows in (3, 4):  # the first writer's folder becomes an orphan
        with store.writer("tokens", "k", config={}, inputs={}) as w:
            write_parquet(w, "tokens.parquet", table(rows))
    published = store.manifest("tokens", "k").writer_id
    assert store.gc() == []  # younger than the default grace period
    removed = store.gc(grace_seconds=0)
    assert len(removed) == 1 and published not in removed[0] and "tokens/k/w-" in removed[0]
    assert sorted(os.listdir(store.uri("tokens", "k"))) == sorted([MANIFEST, published])
    assert_files_match_manifest(store, store.ref("tokens", "k"))
    assert store.gc(grace_seconds=0) == []


def test_gc_keeps_writes_in_progress_within_the_grace_period(store):
    with pytest.raises(ArtifactError, match="vanished .*grace period"):
        with store.writer("tokens", "k", config={}, inputs={}) as w:
            write_parquet(w, "tokens.parquet", table(3))
            assert store.gc() == []  # in progress, and recent: kept
            assert store.gc(grace_seconds=0) == [store.uri("tokens", "k")]  # a too-short grace period ...
    assert not store.exists("tokens", "k")  # ... is caught: the writer refuses to publish


def publish(store, stage, key, inputs=None):
    with store.writer(stage, key, config={}, inputs=inputs or {}) as w:
        w.write_json("x.json", key)
    return w.ref


def test_gc_with_roots_removes_unreachable_artifacts_and_keeps_inputs(store, tmp_path):
    publish(store, "model", "m")
    publish(store, "tokens", "t", {"model": "m", "data": "not-an-artifact"})
    publish(store, "scores", "s", {"model": "m", "tokens": "t"})
    publish(store, "mask", "k", {"tokens": "t", "utility0": "s"})
    publish(store, "train", "old", {"model": "m", "source0": "t"})  # uses kept inputs, is not kept itself
    publish(store, "tokens", "stale")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "state.pt").write_bytes(b"x")
    store.save_checkpoint("train", "old", 1, ckpt)  # abandoned: train/old is published

    with pytest.raises(ArtifactError, match="nope"):
        store.gc(["nope"], grace_seconds=0)
    assert store.gc(["k"]) == []  # everything is younger than the grace period
    planned = store.gc(["k"], grace_seconds=0, dry_run=True)
    assert len(store.list()) == 6  # a dry run removes nothing
    assert store.gc(["k"], grace_seconds=0) == planned
    assert sorted(planned) == sorted([store.uri("train", "old"), store.uri("tokens", "stale"),
                                      store.checkpoint_uri("train", "old", 1).rsplit("/", 1)[0]])
    assert {(m.stage, m.key) for m in store.list()} == {("model", "m"), ("tokens", "t"), ("scores", "s"),
                                                         ("mask", "k")}
    assert store.latest_checkpoint("train", "old") is None
    for m in store.list():
        assert_files_match_manifest(store, store.ref(m.stage, m.key))


def checkpoint_round_trip(store, tmp_path):
    src = tmp_path / "state"
    src.mkdir()
    for step in (1, 2):
        (src / "state.pt").write_bytes(f"step {step}".encode())
        store.save_checkpoint("train", "k", step, src)
    # a save that died halfway: files but no COMPLETE marker
    store.fs.pipe_file(f"{store._checkpoint_path('train', 'k', 3)}/state.pt", b"partial")
    step, folder = store.latest_checkpoint("train", "k")
    assert step == 2 and (folder / "state.pt").read_bytes() == b"step 2"

    pruned = store.prune_checkpoints("train", "k", keep_last=1)
    assert pruned == [store.checkpoint_uri("train", "k", 1)]  # the unfinished step 3 may still be in progress
    (src / "state.pt").write_bytes(b"step 3")
    store.save_checkpoint("train", "k", 3, src)  # replaces the partial files
    step, folder = store.latest_checkpoint("train", "k")
    assert step == 3 and (folder / "state.pt").read_bytes() == b"step 3"
    assert store.prune_checkpoints("train", "k") == [store.checkpoint_uri("train", "k", 2)]
    assert store.latest_checkpoint("other", "k") is None


def test_checkpoints_ignore_steps_without_complete_marker(store, tmp_path):
    checkpoint_round_trip(store, tmp_path)
    assert store.checkpoint_uri("train", "k", 3).endswith("_checkpoints/train/k/step-00000003")
    assert store.list() == []  # checkpoints are not artifacts


def test_artifact_key_is_canonical():
    a = artifact_key("scores", 1, {"b": 1, "a": [1, 2]}, {"x": "k1", "y": "k2"})
    assert a == artifact_key("scores", 1, {"a": [1, 2], "b": 1}, {"y": "k2", "x": "k1"})
    assert a != artifact_key("scores", 2, {"b": 1, "a": [1, 2]}, {"x": "k1", "y": "k2"})
    assert a != artifact_key("mask", 1, {"b": 1, "a": [1, 2]}, {"x": "k1", "y": "k2"})
    assert len(a) == 24 and int(a, 16) >= 0


def test_bad_names_are_refused(store):
    with pytest.raises(ValueError, match="invalid key"):
        store.exists("tokens", "../x")
    with pytest.raises(ValueError, match="invalid file name"):
        with store.writer("tokens", "k", config={}, inputs={}) as w:
            w.write_json("../escape.json", 1)


# ---- artifact folders outside a store, parquet resolution ------------------------------------------

def test_an_out_dir_is_an_artifact_folder(tmp_path):
    out = tmp_path / "out"
    art = open_artifact_dir(out)
    with art.writer("scores", "cli", config={"shard": 0}, inputs={"tokens": "t"}) as w:
        write_parquet(w, "scores-00001.parquet", table(2))
        write_parquet(w, "scores-00000.parquet", table(2))
    assert (out / MANIFEST).exists() and read_manifest(out).config == {"shard": 0}
    assert read_manifest(tmp_path) is None
    assert open_artifact_dir(out).ref() == w.ref
    # a store reads it by URI too
    store = ArtifactStore(str(tmp_path / "store"))
    assert len(store.files(w.ref, ".parquet")) == 2 and store.local_dir(w.ref).parent == out


def test_resolve_parquet_files(tmp_path):
    art = open_artifact_dir(tmp_path / "art")
    with art.writer("tokens", "k", config={}, inputs={}) as w:
        for i in (0, 1):
            write_parquet(w, f"tokens-{i:05d}.parquet", table(1))
        w.write_json("stats.json", {})
    files = resolve_parquet_files(tmp_path / "art")
    assert files == art.files(".parquet") and len(files) == 2

    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("b.parquet", "a.parquet"):
        pq.write_table(table(1), plain / name)
    (plain / "notes.txt").write_text("x")
    assert resolve_parquet_files(plain) == [str(plain / "a.parquet"), str(plain / "b.parquet")]
    assert resolve_parquet_files(str(plain / "b.parquet")) == [str(plain / "b.parquet")]
    assert resolve_parquet_files(f"file://{plain}/a.parquet") == [str(plain / "a.parquet")]

    with pytest.raises(FileNotFoundError, match=r"missing\.parquet does not exist"):
        resolve_parquet_files(tmp_path / "missing.parquet")
    with pytest.raises(ValueError, match=r"notes\.txt is not a \.parquet file"):
        resolve_parquet_files(plain / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \.parquet files in .*empty"):
        resolve_parquet_files(tmp_path / "empty")


# ---- S3 through a local moto server --------------------------------------------------------------

def test_s3_round_trip_and_cached_download(s3_store, tmp_path, monkeypatch):
    ref = round_trip(s3_store, tmp_path)
    assert ref.uri.startswith("s3://bucket/") and "testing" not in repr(s3_store)
    local = s3_store.local_dir(ref)
    assert local == tmp_path / "cache" / "tokens" / ref.key
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file() and p.name[0] != ".") \
        == ["adapter/adapter_config.json", "adapter/sub/weights.bin", "stats.json", "tokens-00000.parquet",
            "tokens-00001.parquet"]
    monkeypatch.setattr(s3_store.fs, "get", lambda *a, **k: pytest.fail("downloaded twice"))
    assert s3_store.local_dir(ref) == local
    manifest_text = s3_store.fs.cat_file(f"{ref.uri}/{MANIFEST}").decode()
    assert "endpoint" not in manifest_text and "testing" not in manifest_text


def test_s3_download_is_verified_against_digests(s3_store, tmp_path):
    with s3_store.writer("mask", "k", config={}, inputs={}) as w:
        w.write_json("stats.json", {"a": 1})
    s3_store.fs.pipe_file(s3_store.files(w.ref)[0], b'{"a": 2}')  # tampered after publishing
    with pytest.raises(ArtifactError, match="does not match its manifest digest"):
        s3_store.local_dir(w.ref)
    assert list((tmp_path / "cache" / "mask").iterdir()) == []  # no half-made copy is left


def test_s3_racing_writers_and_gc(s3_store):
    for rows in (3, 4):
        with s3_store.writer("tokens", "k", config={}, inputs={}) as w:
            write_parquet(w, "tokens.parquet", table(rows))
    assert len(s3_store.gc(grace_seconds=0)) == 1
    assert_files_match_manifest(s3_store, s3_store.ref("tokens", "k"))
    assert s3_store.gc(grace_seconds=0) == []


def test_s3_checkpoints(s3_store, tmp_path):
    checkpoint_round_trip(s3_store, tmp_path)
    assert str(s3_store.latest_checkpoint("train", "k")[1]).startswith(str(tmp_path / "cache"))


def test_s3_endpoint_from_the_environment(s3_endpoint, monkeypatch, tmp_path):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # read by botocore: no storage_options needed
    store = ArtifactStore("s3://bucket/env", cache_dir=tmp_path / "cache")
    ref = publish(store, "mask", "k")
    assert store.ref("mask", "k") == ref and (store.local_dir(ref) / "x.json").read_text() == '"k"'
    s3fs.S3FileSystem.clear_instance_cache()
