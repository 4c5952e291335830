"""The artifact store: where every pipeline stage publishes what it computed, once, under a content key.

    store = ArtifactStore("./store")                      # or "s3://bucket/prefix", any fsspec URL
    with store.writer("tokens", key, config=cfg, inputs={"model": model.key}) as w:
        with w.open("tokens.parquet") as f:
            pq.write_table(table, f)
        w.metrics["rows"] = table.num_rows
    ref = w.ref                                          # small, JSON-serializable: what orchestration passes
    files = store.files(ref, ".parquet")

Layout under the root URL:

    <stage>/<key>/MANIFEST.json               published <=> this exists; written last
    <stage>/<key>/<writer_id>/...             the files of one writer (w-<utc time>-<8 hex>)
    _checkpoints/<stage>/<key>/step-<%08d>/   resumable training state; COMPLETE written last

Every writer writes into its own sub-folder, so two writers of the same key never touch each other's
files; each manifest lists its own writer's files (path relative to the artifact folder, size, sha256),
so whichever manifest lands last is self-consistent and the other writer's folder is garbage for `gc`.

Remote stores: credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...) or from
`storage_options`; neither is ever written to a manifest. For an S3-compatible endpoint pass
`{"client_kwargs": {"endpoint_url": ...}}` or set AWS_ENDPOINT_URL (read by botocore itself).
Remote artifacts are read through a local cache (`cache_dir`, default $TOSS_CACHE_DIR or
~/.cache/toss/artifacts), downloaded once and checked against the manifest's digests.

A store is shared, so what it holds is untrusted (docs/security.md): a manifest is validated (plain
stage/key/writer names, file paths inside the writer folder) and trusted only at its own <stage>/<key>
folder; every local path made from it must stay inside its root; local files are checked against their
digests before `local_dir`/`local_files`/`open` hand them out, remote ones when downloaded.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import platform
import re
import secrets
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MANIFEST = "MANIFEST.json"
COMPLETE = "COMPLETE"
CHECKPOINTS = "_checkpoints"
_CACHE_MARKER = ".toss-digest"  # in a cached copy: digest of the manifest it was downloaded for
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=-]*")
_STEP = re.compile(r"step-(\d{8})")
_BLOCK = 8 << 20
log = logging.getLogger("toss.store")


class ArtifactError(RuntimeError):
    """An artifact is missing, corrupt or misused; the message names the path and what to do."""


# A manifest comes from a store that others can write to: every name in it that becomes a path is checked
# before use. Stage, key and writer id are single names; file paths are names joined by "/".
_FILE_PART = re.compile(r"[A-Za-z0-9._=+-]{1,255}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _valid_name(value: str, kind: str) -> str:
    if not isinstance(value, str) or len(value) > 200 or not _NAME.fullmatch(value):
        raise ValueError(f"{kind} {value!r} is not a plain name (letters, digits, '.', '_', '=', '-'; no path "
                         "separators or '..')")
    return value


class FileEntry(BaseModel):
    path: str  # relative to the artifact folder: "<writer_id>/<name>"
    size: int = Field(ge=0)
    sha256: str

    @field_validator("path")
    @classmethod
    def _relative_inside(cls, value: str) -> str:
        parts = value.split("/")
        if len(parts) < 2 or any(p in (".", "..") or not _FILE_PART.fullmatch(p) for p in parts):
            raise ValueError(f"file path {value!r} must be '<writer_id>/<name>' made of plain names (no '..', "
                             "no absolute path, no backslash)")
        return value

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not _HEX64.fullmatch(value):
            raise ValueError(f"sha256 {value[:80]!r} is not 64 lowercase hex digits")
        return value


class Manifest(BaseModel):
    stage: str
    key: str
    config: dict[str, Any] = Field(default_factory=dict)
    inputs: dict[str, str] = Field(default_factory=dict)  # input name -> artifact key
    files: list[FileEntry] = Field(default_factory=list)
    metrics: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    created_at: str
    writer_id: str

    @field_validator("stage", "key", "writer_id")
    @classmethod
    def _plain_name(cls, value: str, info) -> str:
        return _valid_name(value, info.field_name)

    @field_validator("created_at")
    @classmethod
    def _timestamp(cls, value: str) -> str:
        datetime.fromisoformat(value)  # gc compares it with the clock
        return value

    @model_validator(mode="after")
    def _files_of_the_writer(self) -> "Manifest":
        paths = [e.path for e in self.files]
        if bad := [p for p in paths if p.split("/", 1)[0] != self.writer_id]:
            raise ValueError(f"file {bad[0]!r} is outside the writer folder {self.writer_id!r}")
        if len(set(paths)) != len(paths):
            raise ValueError("a file is listed twice")
        return self

    def digest(self) -> str:
        # Through pydantic's JSON first, so a manifest and its re-read copy hash the same (NaN -> null).
        return hashlib.sha256(canonical_json(json.loads(self.model_dump_json())).encode()).hexdigest()


class ArtifactRef(BaseModel):
    """A published artifact: what tasks return and pass on."""

    model_config = ConfigDict(frozen=True)

    uri: str  # the artifact folder
    stage: str
    key: str
    digest: str  # sha256 of the manifest's canonical JSON

    @field_validator("stage", "key")
    @classmethod
    def _plain_name(cls, value: str, info) -> str:
        return _valid_name(value, info.field_name)


# ---- helpers ------------------------------------------------------------------------------------

def _json_default(obj: Any) -> Any:
    # numpy / torch scalars and arrays, paths: the values stage metrics and configs tend to carry.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serializable")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def _plain_json(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=_json_default))


def artifact_key(stage: str, version: int | str, config: dict, inputs: dict[str, str]) -> str:
    """Content key of a stage's output: the same stage, version, config and inputs give the same key."""
    payload = {"stage": stage, "version": version, "config": config, "inputs": inputs}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:24]


def _hash_stream(f) -> tuple[int, str]:
    h, n = hashlib.sha256(), 0
    while block := f.read(_BLOCK):
        h.update(block)
        n += len(block)
    return n, h.hexdigest()


def file_digest(url_or_path: str | os.PathLike, storage_options: dict | None = None) -> str:
    """sha256 (hex) of one file, local or at any fsspec URL."""
    with fsspec.open(os.fspath(url_or_path), "rb", **(storage_options or {})) as f:
        return _hash_stream(f)[1]


@functools.lru_cache(maxsize=1)
def _library_versions() -> tuple[tuple[str, str], ...]:
    found = [("python", platform.python_version())]
    for dist in ("toss", "torch", "transformers", "peft", "pyarrow"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found.append((dist, importlib.metadata.version(dist)))  # metadata only: nothing is imported
    return tuple(found)


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _new_writer_id() -> str:
    return f"w-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


def _check_name(kind: str, value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(f"invalid {kind} {value!r}: use letters, digits, '.', '_', '=', '-', "
                         "starting with a letter or digit")
    return value


def _check_relpath(name: str) -> str:
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid file name {name!r}: use a relative path like 'shard-00000.parquet' or 'sub/x.json'")
    return name


def _filesystem(url: str, storage_options: dict | None) -> tuple[fsspec.AbstractFileSystem, str]:
    options = dict(storage_options or {})
    if fsspec.utils.get_protocol(url) in ("file", "local"):
        options.setdefault("auto_mkdir", True)  # writers and uploads create their folders
    return fsspec.core.url_to_fs(url, **options)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """What users see: a plain absolute path for local files, a protocol URL otherwise."""
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _ls(fs: fsspec.AbstractFileSystem, path: str) -> list[dict]:
    try:
        return fs.ls(path, detail=True)
    except FileNotFoundError:
        return []


def _subdirs(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    return sorted(e["name"].rstrip("/") for e in _ls(fs, path) if e["type"] == "directory")


def _mtime(info: dict) -> float | None:
    # Local files carry "mtime" (epoch seconds), S3 objects "LastModified" (a datetime).
    value = info.get("mtime", info.get("LastModified", info.get("last_modified")))
    if isinstance(value, datetime):
        return value.timestamp()
    return float(value) if value is not None else None


def _age_seconds(fs: fsspec.AbstractFileSystem, path: str, now: float) -> float:
    """Seconds since anything under `path` last changed; 0 if that cannot be told (then gc keeps it)."""
    infos = list(fs.find(path, withdirs=True, detail=True).values())
    with contextlib.suppress(FileNotFoundError):
        infos.append(fs.info(path))  # a local empty folder has only its own mtime
    times = [t for t in map(_mtime, infos) if t is not None]
    return now - max(times) if times else 0.0


def _remove(fs: fsspec.AbstractFileSystem, path: str) -> None:
    # Unpublish first: a crash halfway leaves garbage for the next gc, never a manifest without files.
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(f"{path}/{MANIFEST}")
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)


def _upload_dir(fs: fsspec.AbstractFileSystem, local_dir: str | os.PathLike, remote_dir: str) -> list[Path]:
    """Upload every file under a local folder, keeping relative paths; returns those relative paths."""
    root = Path(local_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder: nothing to upload")
    rel = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    if rel:  # explicit lists: fsspec's trailing-slash rules for folder copies do not apply
        fs.put([str(root / r) for r in rel], [f"{remote_dir}/{r.as_posix()}" for r in rel])
    return rel


def _inside(root: Path, rel: str) -> Path:
    """root/rel, refused unless it stays inside root (a name from a store is never trusted to)."""
    target = (root / rel).resolve()
    if not target.is_relative_to(root.resolve()) or target == root.resolve():
        raise ArtifactError(f"refusing the path {rel!r}: it leads outside {root}")
    return target


# Local files already checked against their manifest digest in this process, by stat signature: a file
# that is rewritten (even with its mtime put back) gets a new ctime, so it is hashed again.
_VERIFIED: dict[str, tuple] = {}
_VERIFIED_LOCK = threading.Lock()


def _verify_local(path: str, root: str, entry: FileEntry, shown: str) -> None:
    """Raise unless the local file `path` (inside `root`) is a plain file with the manifest's size and sha256."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ArtifactError(f"{shown} is listed in its manifest but missing: the artifact is damaged; remove it "
                            "and rerun its stage") from None
    real = os.path.realpath(path)
    if not stat.S_ISREG(st.st_mode) or not Path(real).is_relative_to(os.path.realpath(root)):
        raise ArtifactError(f"{shown} is not a plain file inside its artifact folder (a link?): refusing to read it")
    signature = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _VERIFIED_LOCK:
        if _VERIFIED.get(real) == (signature, entry.sha256):
            return
    with open(path, "rb") as f:
        found = _hash_stream(f)
    if found != (entry.size, entry.sha256):
        raise ArtifactError(f"{shown} does not match its manifest digest: the artifact is corrupt or was modified; "
                            "remove it (or rerun its stage with force)")
    with _VERIFIED_LOCK:
        _VERIFIED[real] = (signature, entry.sha256)


def _download_once(fs: fsspec.AbstractFileSystem, files: dict[str, str], dest: Path, marker: str,
                   verify=None) -> Path:
    """Download remote files (remote path -> relative local path) into `dest`, atomically, unless a copy
    with the same marker is already there. Concurrent downloaders are fine: one rename wins."""
    if _read_marker(dest) == marker:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        local = [_inside(tmp, rel) for rel in files.values()]
        for p in local:
            p.parent.mkdir(parents=True, exist_ok=True)
        if files:
            fs.get(list(files), [str(p) for p in local])
        if verify:
            verify(tmp)
        (tmp / _CACHE_MARKER).write_text(marker)
        if _read_marker(dest) != marker:  # else another process placed the same copy meanwhile
            if dest.exists():  # a stale copy (the key was republished): move it aside, then replace it
                with contextlib.suppress(OSError):
                    dest.rename(tmp.with_name(tmp.name + ".stale"))
            with contextlib.suppress(OSError):
                tmp.rename(dest)
        if _read_marker(dest) != marker:
            raise ArtifactError(f"could not place the download at {dest}: remove that folder and retry")
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(tmp.with_name(tmp.name + ".stale"), ignore_errors=True)


def _read_marker(folder: Path) -> str | None:
    with contextlib.suppress(OSError):
        return (folder / _CACHE_MARKER).read_text()
    return None


def _default_cache_dir() -> Path:
    return Path(os.environ.get("TOSS_CACHE_DIR", Path.home() / ".cache" / "toss" / "artifacts"))


# ---- writing ------------------------------------------------------------------------------------

class _HashingFile:
    """A file opened for writing that hashes what passes through, so publishing need not read it back."""

    def __init__(self, f, on_close):
        self._f, self._on_close = f, on_close
        self._hash, self._size, self._sequential = hashlib.sha256(), 0, True

    def write(self, data) -> int:
        n = self._f.write(data)
        view = memoryview(data)
        self._hash.update(view)
        self._size += view.nbytes
        return n

    def seek(self, *args):
        self._sequential = False  # the hash no longer describes the file: publishing re-reads it
        return self._f.seek(*args)

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
            self._on_close(self._size, self._hash.hexdigest() if self._sequential else None)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ArtifactWriter:
    """Writes one artifact's files into its own writer folder; `ArtifactDir.writer` publishes them.

    Write through `open`, `write_json` or `put_dir` (hashed on the way), or to `path(name)` with any
    fsspec-aware writer (hashed when publishing). Fill `metrics`; after the `with` block, `ref` is set.
    """

    def __init__(self, artifact: ArtifactDir, stage: str, key: str, config: dict, inputs: dict[str, str]):
        self._artifact, self._fs = artifact, artifact.fs
        self.stage, self.key = _check_name("stage", stage), _check_name("key", key)
        self.config, self.inputs = _plain_json(config), dict(inputs)
        self.writer_id = _new_writer_id()
        self.folder = f"{artifact.path}/{self.writer_id}"
        self.metrics: dict[str, Any] = {}
        self.ref: ArtifactRef | None = None
        self._known: dict[str, tuple[int, str | None]] = {}  # name -> (size, sha256) of what we wrote
        if _is_local(self._fs):
            os.makedirs(self.folder, exist_ok=True)  # (on S3 "makedirs" would even create a missing bucket)

    def path(self, name: str) -> str:
        """URL of a file in this writer's folder (open it with the store's storage_options)."""
        target = f"{self.folder}/{_check_relpath(name)}"
        if _is_local(self._fs):
            os.makedirs(os.path.dirname(target), exist_ok=True)  # so plain local writers can open it
        return _url(self._fs, target)

    def open(self, name: str, mode: str = "wb"):
        if "w" not in mode:
            raise ValueError(f"ArtifactWriter.open writes (mode {mode!r}); read published files with the store")
        f = self._fs.open(f"{self.folder}/{_check_relpath(name)}", mode)
        return _HashingFile(f, lambda size, sha: self._record(name, size, sha)) if "b" in mode else f

    def _record(self, name: str, size: int, sha256: str | None) -> None:
        self._known[name] = (size, sha256)

    def write_json(self, name: str, obj: Any) -> None:
        data = json.dumps(obj, indent=2, default=_json_default).encode()
        self._fs.pipe_file(f"{self.folder}/{_check_relpath(name)}", data)
        self._known[name] = (len(data), hashlib.sha256(data).hexdigest())

    def put_dir(self, local_dir: str | os.PathLike, prefix: str = "") -> None:
        """Upload a local folder (e.g. a saved PEFT adapter) into this writer's folder, under `prefix`."""
        prefix = prefix.strip("/")
        base = f"{self.folder}/{_check_relpath(prefix)}" if prefix else self.folder
        for rel in _upload_dir(self._fs, local_dir, base):
            name = f"{prefix}/{rel.as_posix()}" if prefix else rel.as_posix()
            with open(Path(local_dir) / rel, "rb") as f:
                self._known[name] = _hash_stream(f)

    def _entries(self) -> list[FileEntry]:
        found = self._fs.find(self.folder, detail=True)
        names = {p[len(self.folder) + 1:]: info["size"] for p, info in sorted(found.items())}
        if missing := sorted(set(self._known) - set(names)):
            raise ArtifactError(f"{missing} vanished from {_url(self._fs, self.folder)} before publishing: was gc run "
                                "with a grace period shorter than this write? Nothing was published; run it again")
        entries = []
        for name, size in names.items():
            known_size, sha = self._known.get(name, (None, None))
            if sha is None or known_size != size:
                with self._fs.open(f"{self.folder}/{name}", "rb") as f:
                    size, sha = _hash_stream(f)
            entries.append(FileEntry(path=f"{self.writer_id}/{name}", size=size, sha256=sha))
        return entries

    def _publish(self) -> ArtifactRef:
        self._fs.invalidate_cache()  # s3fs keeps listings; ours must see every file just written
        manifest = Manifest(stage=self.stage, key=self.key, config=self.config, inputs=self.inputs,
                            files=self._entries(), metrics=_plain_json(self.metrics),
                            versions=dict(_library_versions()), created_at=_utc_now(), writer_id=self.writer_id)
        self._artifact._write_manifest(manifest, self.writer_id)
        self.ref = self._artifact._ref_of(manifest)
        return self.ref

    def _abandon(self) -> None:
        with contextlib.suppress(Exception):  # best effort: gc removes what is left
            self._fs.rm(self.folder, recursive=True)


# ---- one artifact folder ------------------------------------------------------------------------

class ArtifactDir:
    """One artifact folder (MANIFEST.json + writer folders), inside a store or standalone (`--out DIR`)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, cache_dir: str | os.PathLike | None = None,
                 expect: tuple[str, str] | None = None):
        self.fs, self.path = fs, path.rstrip("/")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
        self.expect = expect  # (stage, key) of the folder's place in a store: its manifest must say the same

    @property
    def uri(self) -> str:
        return _url(self.fs, self.path)

    def manifest(self) -> Manifest | None:
        try:  # a direct GET: no listing cache can hide a manifest another process just wrote
            data = self.fs.cat_file(f"{self.path}/{MANIFEST}")
        except (FileNotFoundError, NotADirectoryError):  # a plain file is not an artifact folder
            return None
        try:
            manifest = Manifest.model_validate_json(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(map(str, first["loc"])) or "(top level)"
            raise ArtifactError(f"{self.uri}/{MANIFEST} is not a valid manifest ({e.error_count()} error(s); "
                                f"{where}: {first['msg']}): remove that artifact folder and rerun its stage") from None
        if self.expect is not None and (manifest.stage, manifest.key) != self.expect:
            raise ArtifactError(f"{self.uri}/{MANIFEST} claims to be {manifest.stage}/{manifest.key}: a manifest "
                                "is only trusted at its own stage/key folder (was it copied there?); remove it")
        return manifest

    def exists(self) -> bool:
        return self.manifest() is not None

    def ref(self) -> ArtifactRef | None:
        manifest = self.manifest()
        return self._ref_of(manifest) if manifest else None

    def require(self) -> Manifest:
        if (manifest := self.manifest()) is None:
            raise ArtifactError(f"no published artifact at {self.uri} ({MANIFEST} missing): run the stage that "
                                "writes it (a folder without a manifest is an interrupted write)")
        return manifest

    @contextlib.contextmanager
    def writer(self, stage: str, key: str, *, config: dict, inputs: dict[str, str]) -> Iterator[ArtifactWriter]:
        """Write files, then publish MANIFEST.json on normal exit; on an exception publish nothing."""
        w = ArtifactWriter(self, stage, key, config, inputs)
        try:
            yield w
        except BaseException:
            w._abandon()
            raise
        w._publish()

    def files(self, suffix: str | None = None) -> list[str]:
        """URLs of the manifest's files, in manifest order."""
        return [_url(self.fs, f"{self.path}/{e.path}") for e in self.require().files
                if suffix is None or e.path.endswith(suffix)]

    def open(self, relpath: str, mode: str = "rb"):
        """Open a published file by the name its writer gave it (or by its manifest path)."""
        if any(c in mode for c in "wax+"):
            raise ValueError(f"published artifacts are read-only (mode {mode!r}): write a new one with writer()")
        manifest = self.require()
        by_path = {e.path: e for e in manifest.files}
        for candidate in (f"{manifest.writer_id}/{relpath}", relpath):
            if (entry := by_path.get(candidate)) is not None:
                if _is_local(self.fs):  # checked, then opened: the memo ties the check to this very file
                    _verify_local(f"{self.path}/{candidate}", self.path, entry, f"{self.uri}/{candidate}")
                    return self.fs.open(f"{self.path}/{candidate}", mode)
                data = self.fs.cat_file(f"{self.path}/{candidate}")
                if (len(data), hashlib.sha256(data).hexdigest()) != (entry.size, entry.sha256):
                    raise ArtifactError(f"{self.uri}/{candidate} does not match its manifest digest: the artifact "
                                        "is corrupt or was modified; remove it (or rerun its stage with force)")
                return io.BytesIO(data) if "b" in mode else io.StringIO(data.decode())
        raise FileNotFoundError(f"{relpath!r} is not in the artifact at {self.uri}; it has {sorted(by_path)}")

    def local_dir(self) -> Path:
        """A local folder holding the files as their writer named them (downloaded once if remote), every
        file checked against the manifest's size and sha256, and nothing else in it."""
        manifest = self.require()
        if _is_local(self.fs):
            self._verify_in_place(manifest)
            return Path(self.path) / manifest.writer_id
        skip = len(manifest.writer_id) + 1
        remote = {f"{self.path}/{e.path}": e.path[skip:] for e in manifest.files}
        dest = _inside(self.cache_dir, f"{manifest.stage}/{manifest.key}")
        return _download_once(self.fs, remote, dest, manifest.digest(), lambda tmp: self._verify(manifest, tmp))

    def local_files(self, suffix: str | None = None) -> list[Path]:
        """Local paths of the manifest's files (verified, see local_dir), in manifest order."""
        manifest = self.require()
        folder, skip = self.local_dir(), len(manifest.writer_id) + 1
        return [folder / e.path[skip:] for e in manifest.files if suffix is None or e.path.endswith(suffix)]

    def _verify_in_place(self, manifest: Manifest) -> None:
        """Local store: the writer folder holds exactly the manifest's files, each with its digest. Unlisted
        files are refused too: model loaders read whatever a folder holds."""
        folder = f"{self.path}/{manifest.writer_id}"
        listed = {e.path[len(manifest.writer_id) + 1:] for e in manifest.files}
        found = {Path(d, n).relative_to(folder).as_posix() for d, _, names in os.walk(folder) for n in names}
        if extra := sorted(found - listed - {_CACHE_MARKER}):
            raise ArtifactError(f"{self.uri}/{manifest.writer_id}/{extra[0]} is not listed in the manifest: files "
                                "were added after publishing; remove them (or the artifact)")
        for e in manifest.files:
            _verify_local(f"{self.path}/{e.path}", self.path, e, f"{self.uri}/{e.path}")

    def _verify(self, manifest: Manifest, folder: Path) -> None:
        skip = len(manifest.writer_id) + 1
        for e in manifest.files:
            with open(_inside(folder, e.path[skip:]), "rb") as f:
                if _hash_stream(f) != (e.size, e.sha256):
                    raise ArtifactError(f"{self.uri}/{e.path} does not match its manifest digest: the artifact is "
                                        "corrupt or was modified; remove it (or rerun its stage with force)")

    def _ref_of(self, manifest: Manifest) -> ArtifactRef:
        return ArtifactRef(uri=self.uri, stage=manifest.stage, key=manifest.key, digest=manifest.digest())

    def _write_manifest(self, manifest: Manifest, writer_id: str) -> None:
        data = manifest.model_dump_json(indent=2).encode()
        final = f"{self.path}/{MANIFEST}"
        if not _is_local(self.fs):
            self.fs.pipe_file(final, data)  # an object PUT is atomic
            return
        tmp = f"{self.path}/.{MANIFEST}.{writer_id}.tmp"  # readers never see half a manifest
        self.fs.pipe_file(tmp, data)
        os.replace(tmp, final)


def open_artifact_dir(path: str | os.PathLike, storage_options: dict | None = None, *,
                      cache_dir: str | os.PathLike | None = None) -> ArtifactDir:
    """An artifact folder outside any store, e.g. a stage CLI's `--out DIR`: DIR itself holds the manifest."""
    fs, root = _filesystem(os.fspath(path), storage_options)
    return ArtifactDir(fs, root, cache_dir)


def read_manifest(path: str | os.PathLike, storage_options: dict | None = None) -> Manifest | None:
    return open_artifact_dir(path, storage_options).manifest()


def resolve_parquet_files(path_or_url: str | os.PathLike, storage_options: dict | None = None) -> list[str]:
    """Parquet files at a path: an artifact folder's (manifest order), one file, or a folder's (sorted)."""
    target = os.fspath(path_or_url)
    fs, path = _filesystem(target, storage_options)
    if fs.isfile(path):
        if path.endswith(".parquet"):
            return [_url(fs, path)]
        raise ValueError(f"{target} is not a .parquet file")
    if not fs.isdir(path):
        raise FileNotFoundError(f"{target} does not exist: give a .parquet file, a folder of them "
                                "or an artifact folder")
    artifact = ArtifactDir(fs, path)
    if artifact.exists():
        return [str(p) for p in artifact.local_files(".parquet")]
    found = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet"))
    if not found:
        raise FileNotFoundError(f"no .parquet files in {target} (and no {MANIFEST}: if it is an artifact folder, "
                                "its writer did not finish; run that stage again)")
    return [_url(fs, p) for p in found]


# ---- the store ----------------------------------------------------------------------------------

class ArtifactStore:
    """Artifacts at `<url>/<stage>/<key>/`, on a local folder (default), s3://bucket/prefix or any fsspec URL."""

    def __init__(self, url: str, storage_options: dict | None = None, *, cache_dir: str | os.PathLike | None = None):
        self.fs, self.root = _filesystem(os.fspath(url), storage_options)
        self.root = self.root.rstrip("/")
        self.storage_options = dict(storage_options or {})  # to open the same store in a child process
        self.cache_dir = Path(cache_dir) if cache_dir is not None else _default_cache_dir()

    def __repr__(self) -> str:  # never the storage options: they may hold secrets
        return f"ArtifactStore({self.root_uri!r})"

    @property
    def root_uri(self) -> str:
        return _url(self.fs, self.root)

    # -- artifacts

    def _dir(self, stage: str, key: str) -> ArtifactDir:
        return ArtifactDir(self.fs, f"{self.root}/{_check_name('stage', stage)}/{_check_name('key', key)}",
                           self.cache_dir, expect=(stage, key))

    def _dir_at(self, ref_or_uri: ArtifactRef | str) -> ArtifactDir:
        uri = ref_or_uri.uri if isinstance(ref_or_uri, ArtifactRef) else os.fspath(ref_or_uri)
        if uri.startswith(self.root_uri + "/"):
            rel = uri[len(self.root_uri) + 1:].rstrip("/").split("/")
            if len(rel) != 2 or not all(_NAME.fullmatch(p) for p in rel):
                raise ArtifactError(f"{uri} is not an artifact folder of {self.root_uri} (<stage>/<key>)")
            if isinstance(ref_or_uri, ArtifactRef) and tuple(rel) != (ref_or_uri.stage, ref_or_uri.key):
                raise ArtifactError(f"the reference to {ref_or_uri.stage}/{ref_or_uri.key} points at {uri}: refusing it")
            return self._dir(*rel)
        return open_artifact_dir(uri, cache_dir=self.cache_dir)  # outside this store, e.g. a `--out DIR`

    def uri(self, stage: str, key: str) -> str:
        return self._dir(stage, key).uri

    def exists(self, stage: str, key: str) -> bool:
        return self._dir(stage, key).exists()

    def manifest(self, stage: str, key: str) -> Manifest | None:
        return self._dir(stage, key).manifest()

    def ref(self, stage: str, key: str) -> ArtifactRef | None:
        return self._dir(stage, key).ref()

    def writer(self, stage: str, key: str, *, config: dict,
               inputs: dict[str, str]) -> contextlib.AbstractContextManager[ArtifactWriter]:
        return self._dir(stage, key).writer(stage, key, config=config, inputs=inputs)

    def open(self, ref_or_uri: ArtifactRef | str, relpath: str, mode: str = "rb"):
        return self._dir_at(ref_or_uri).open(relpath, mode)

    def files(self, ref: ArtifactRef | str, suffix: str | None = None) -> list[str]:
        return self._dir_at(ref).files(suffix)

    def local_dir(self, ref: ArtifactRef | str) -> Path:
        return self._dir_at(ref).local_dir()

    def local_files(self, ref: ArtifactRef | str, suffix: str | None = None) -> list[Path]:
        """Local, verified paths of an artifact's files (downloaded once if the store is remote)."""
        return self._dir_at(ref).local_files(suffix)

    def check_exists(self) -> None:
        """Raise unless the store's root exists (a mistyped bucket or folder lists as empty otherwise)."""
        try:
            found = self.fs.exists(self.root)
        except PermissionError as e:
            raise ArtifactError(f"cannot read the store {self.root_uri}: {e} (check credentials)") from None
        if not found:
            raise ArtifactError(f"no store at {self.root_uri}: the folder or bucket does not exist (check the URL "
                                "and credentials; a new store is created by its first run)")

    def list(self, stage: str | None = None) -> list[Manifest]:
        """Published manifests, sorted by stage then key. A manifest that is invalid or not at its own
        stage/key folder is skipped with a warning: it is nobody's artifact."""
        self.fs.invalidate_cache()
        stages = [f"{self.root}/{_check_name('stage', stage)}"] if stage else self._stage_dirs()
        found = []
        for stage_dir in stages:
            for key_dir in _subdirs(self.fs, stage_dir):
                state, manifest = self._trusted(key_dir)
                if manifest is not None:
                    found.append(manifest)
        return sorted(found, key=lambda m: (m.stage, m.key))

    def _trusted(self, key_dir: str) -> tuple[str, Manifest | None]:
        """("published", manifest), ("absent", None) or ("untrusted", None) for a <stage>/<key> folder."""
        stage, key = _basename(key_dir.rsplit("/", 1)[0]), _basename(key_dir)
        if not (_NAME.fullmatch(stage) and _NAME.fullmatch(key)):
            log.warning("skipping %s: not a <stage>/<key> folder name", _url(self.fs, key_dir))
            return "untrusted", None
        try:
            manifest = ArtifactDir(self.fs, key_dir, expect=(stage, key)).manifest()
        except ArtifactError as e:
            log.warning("skipping an untrusted manifest: %s", e)
            return "untrusted", None
        return ("published", manifest) if manifest else ("absent", None)

    def _stage_dirs(self) -> list[str]:
        return [d for d in _subdirs(self.fs, self.root) if not _basename(d).startswith("_")]

    # -- garbage collection

    def gc(self, roots: list[str] | None = None, *, dry_run: bool = False, grace_seconds: float = 3600) -> list[str]:
        """Remove garbage; returns the URLs removed (or that would be, with dry_run).

        Always: writer folders (and temp files) their key's manifest does not reference, and checkpoints
        of published keys. With `roots` (artifact keys): also every published artifact that is not
        reachable from them through manifests' `inputs`. Nothing that changed in the last
        `grace_seconds` is touched (a write in progress must survive; keep it above your longest stage).
        """
        now = time.time()
        self.fs.invalidate_cache()
        folders = {k: self._trusted(k) for s in self._stage_dirs() for k in _subdirs(self.fs, s)}
        manifests = [m for _, m in folders.values() if m is not None]
        published = {(m.stage, m.key): m for m in manifests}
        keep = {m.key for m in manifests} if roots is None else self._reachable(roots, manifests)
        doomed = []
        for key_dir, (state, manifest) in folders.items():
            if state != "untrusted":  # a folder whose manifest cannot be trusted is left alone: a person decides
                doomed += self._gc_key_dir(key_dir, manifest, keep, now, grace_seconds)
        for stage_dir in _subdirs(self.fs, f"{self.root}/{CHECKPOINTS}"):
            doomed += [d for d in _subdirs(self.fs, stage_dir) if (_basename(stage_dir), _basename(d)) in published
                       and _age_seconds(self.fs, d, now) > grace_seconds]
        if not dry_run:
            for path in doomed:
                _remove(self.fs, path)
        return [_url(self.fs, p) for p in doomed]

    def _gc_key_dir(self, key_dir: str, manifest: Manifest | None, keep: set[str], now: float,
                    grace: float) -> list[str]:
        if manifest is not None and manifest.key not in keep:
            created = datetime.fromisoformat(manifest.created_at).timestamp()
            return [key_dir] if now - created > grace else []
        wanted = {MANIFEST, manifest.writer_id} if manifest else set()
        entries = [e["name"].rstrip("/") for e in _ls(self.fs, key_dir)]
        stale = [e for e in entries if _basename(e) not in wanted and _age_seconds(self.fs, e, now) > grace]
        if manifest is None and stale and len(stale) == len(entries):
            return [key_dir]  # an unpublished key with nothing in progress: drop the folder itself
        return stale

    @staticmethod
    def _reachable(roots: list[str], manifests: list[Manifest]) -> set[str]:
        inputs: dict[str, list[str]] = {}
        for m in manifests:
            inputs.setdefault(m.key, []).extend(m.inputs.values())
        if unknown := [r for r in roots if r not in inputs]:
            raise ArtifactError(f"gc roots {unknown} are not published artifacts of this store: nothing was removed; "
                                "pass keys of existing artifacts (see ArtifactStore.list())")
        seen: set[str] = set()
        todo = list(roots)
        while todo:
            key = todo.pop()
            if key in inputs and key not in seen:  # inputs may also name non-artifacts (data digests)
                seen.add(key)
                todo += inputs[key]
        return seen

    # -- training checkpoints

    def _checkpoint_path(self, stage: str, key: str, step: int | None = None) -> str:
        base = f"{self.root}/{CHECKPOINTS}/{_check_name('stage', stage)}/{_check_name('key', key)}"
        return base if step is None else f"{base}/step-{step:08d}"

    def checkpoint_uri(self, stage: str, key: str, step: int) -> str:
        return _url(self.fs, self._checkpoint_path(stage, key, step))

    def save_checkpoint(self, stage: str, key: str, step: int, local_dir: str | os.PathLike) -> str:
        """Upload a local folder as the checkpoint of `step`; COMPLETE is written last."""
        target = self._checkpoint_path(stage, key, step)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(target, recursive=True)  # leftovers of an interrupted save of this step
        files = _upload_dir(self.fs, local_dir, target)
        digests = {}
        for rel in files:
            with open(Path(local_dir) / rel, "rb") as f:
                digests[rel.as_posix()] = _hash_stream(f)[1]
        self.fs.pipe_file(f"{target}/{COMPLETE}", json.dumps({"step": step, "files": digests}).encode())
        return _url(self.fs, target)

    def _steps(self, stage: str, key: str) -> dict[int, bool]:
        """step -> complete?"""
        base = self._checkpoint_path(stage, key)
        self.fs.invalidate_cache()
        steps = {}
        for d in _subdirs(self.fs, base):
            if m := _STEP.fullmatch(_basename(d)):
                steps[int(m.group(1))] = self.fs.exists(f"{d}/{COMPLETE}")
        return steps

    def latest_checkpoint(self, stage: str, key: str) -> tuple[int, Path] | None:
        """The newest complete checkpoint as (step, local folder), or None."""
        complete = [s for s, done in self._steps(stage, key).items() if done]
        if not complete:
            return None
        step = max(complete)
        path = self._checkpoint_path(stage, key, step)
        digests = self._checkpoint_digests(path)
        if _is_local(self.fs):
            folder = Path(path)
            for rel, sha in digests.items():
                entry = FileEntry(path=f"x/{rel}", size=os.path.getsize(_inside(folder, rel)), sha256=sha)
                _verify_local(str(folder / rel), path, entry, f"{_url(self.fs, path)}/{rel}")
            return step, folder
        # Only the files COMPLETE lists, each checked: a planted extra object never reaches the loader.
        remote = {f"{path}/{rel}": rel for rel in digests}
        marker = hashlib.sha256(canonical_json(digests).encode()).hexdigest()

        def verify(tmp: Path) -> None:
            for rel, sha in digests.items():
                with open(tmp / rel, "rb") as f:
                    if _hash_stream(f)[1] != sha:
                        raise ArtifactError(f"{_url(self.fs, path)}/{rel} does not match the digest in its "
                                            f"{COMPLETE}: the checkpoint is corrupt or was modified; remove it")

        cache = _inside(self.cache_dir, f"{CHECKPOINTS}/{stage}/{key}/step-{step:08d}")
        return step, _download_once(self.fs, remote, cache, marker, verify)

    def _checkpoint_digests(self, path: str) -> dict[str, str]:
        """The file -> sha256 list in a checkpoint's COMPLETE marker, every name checked."""
        shown = f"{_url(self.fs, path)}/{COMPLETE}"
        try:
            listed = json.loads(self.fs.cat_file(f"{path}/{COMPLETE}"))["files"]
            if not isinstance(listed, dict):
                raise TypeError("no file digests (written by an older version)")
            for rel, sha in listed.items():
                FileEntry(path=f"x/{rel}", size=0, sha256=sha)  # the same name and digest rules as manifests
        except (ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"{shown} is not a valid checkpoint marker ({str(e).splitlines()[0]}): remove that "
                                "checkpoint folder to restart the stage from scratch") from None
        return listed

    def _checkpoint_cache(self, stage: str, key: str, step: int) -> Path:
        return self.cache_dir / CHECKPOINTS / stage / key / f"step-{step:08d}"

    def prune_checkpoints(self, stage: str, key: str, keep_last: int = 1) -> list[str]:
        """Remove all but the newest `keep_last` complete steps, and unfinished saves older than those."""
        steps = self._steps(stage, key)
        complete = sorted(s for s, done in steps.items() if done)
        kept = complete[-keep_last:] if keep_last > 0 else []
        newest = complete[-1] if complete else -1  # an unfinished save past it may still be in progress
        doomed = [s for s, done in steps.items() if s not in kept and (done or s < newest)]
        for s in doomed:
            self.fs.rm(self._checkpoint_path(stage, key, s), recursive=True)
            shutil.rmtree(self._checkpoint_cache(stage, key, s), ignore_errors=True)
        return [self.checkpoint_uri(stage, key, s) for s in sorted(doomed)]
