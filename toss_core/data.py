"""Load chat data from files or datasets into one form: a list of `Conversation`s.

    conversations = load_conversations("data/custom.jsonl")
    conversations = load_conversations("s3://bucket/sets/", storage_options={"anon": False}, limit=1000)
    conversations = load_conversations("hf://org/name", split="train")

Sources:
- a `.jsonl`, `.json` or `.parquet` file at any fsspec URL (local path, file://, s3://, ...);
  a `.json` file holds a list of records or an object with a single list field ({"data": [...]});
- a folder: every `.jsonl`/`.json`/`.parquet` file directly inside it, in name order;
- a folder written by `datasets`' `save_to_disk` (it holds `state.json` or `dataset_dict.json`);
- `hf://<name>` or `datasets:<name>`: `datasets.load_dataset(name, split=split)`, which needs the
  network or a copy already in the Hugging Face cache.

Record layouts, detected per record (so one file may mix them), tried in this order:

    messages     {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
                 also under "conversations", and ShareGPT turns {"from": "human"|"gpt"|"system", "value": ...}
    preference   {"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}  -> user "Hi", assistant "Hello"
                 a `chosen` message list that contains a user turn is the whole conversation
    alpaca       {"instruction": "Sum up", "input": "Some text", "output": "A summary"}
                 -> user "Sum up\\n\\nSome text" (just the instruction when `input` is empty or absent)
    prompt       {"prompt": "Hi", "response": "Hello"}  ("completion", "output" or "answer" for "response")
    question     {"question": "Hi?", "answer": "Hello"}

Any layout may add "system": "Be brief" (prepended as a system message; an empty one is ignored).
The prompt/answer fields of the preference, prompt and question layouts may also be message lists
(TRL's conversational format). Other top-level scalar fields (an "id", a ground-truth "is_harmful")
go to `Conversation.meta` for reports; the method never reads them. Null fields count as absent,
since parquet and `datasets` fill every column of every row.

Every problem raises `DataError` naming the source, the record and the field, e.g.

    data/custom.jsonl line 7: messages[2].role: unknown role 'bot' (expected one of: system, user, assistant)

Records are pointed at by 1-based line number in `.jsonl` files and by 0-based record index ("row")
everywhere else; `Conversation.row` holds the same number. Nothing is skipped: a loaded list has
one conversation per record. Loading only reads; `.jsonl` streams line by line and parquet by
record batches, so `limit` stops reading early.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, NamedTuple, NoReturn

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
RESPONSE_FIELDS = ("response", "completion", "output", "answer")
HUB_PREFIXES = ("hf://", "datasets:")

# (name, example, note) of each layout, in detection order: the text of `describe_layouts`.
_LAYOUTS = (
    ("messages", '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}',
     'or "conversations"; ShareGPT turns {"from": "human"|"gpt"|"system", "value": "..."} too'),
    ("preference", '{"prompt": "...", "chosen": "...", "rejected": "..."}', "trains on the chosen answer"),
    ("alpaca", '{"instruction": "...", "input": "...", "output": "..."}', "input optional"),
    ("prompt", '{"prompt": "...", "response": "..."}', '"completion", "output" or "answer" also accepted'),
    ("question", '{"question": "...", "answer": "..."}', ""),
)
_PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    source: str  # the file URL, or the dataset as named in `load_conversations`
    row: int  # 1-based line number in .jsonl files, 0-based record index otherwise
    meta: dict = field(default_factory=dict)  # the record's other scalar fields; for reports only


class DataError(ValueError):
    """Data that cannot be used; the message names the source, the line or row, and the field."""


class _Record(NamedTuple):
    source: str
    row: int
    where: str  # how messages point at the record: "data/custom.jsonl line 7"
    value: Any


class _Turn(NamedTuple):
    role: str
    content: Any  # checked to be a string only when the conversation is assembled
    at: str  # the message's place in the record: "messages[2]", or "response" for a plain field
    field: str  # the field holding the content: "messages[2].content", "response"


def describe_layouts() -> str:
    """The accepted record layouts, one per line with an example: for error messages and docs."""
    lines = [f"  {name:<11}{example}" + (f"  ({note})" if note else "") for name, example, note in _LAYOUTS]
    lines.append('  any layout may add "system": "..." (prepended as a system message)')
    return "\n".join(lines)


def load_conversations(
    source: str, *, storage_options: dict | None = None, split: str = "train", limit: int | None = None
) -> list[Conversation]:
    """Every record of `source` as a `Conversation`, or the first `limit` ones; see the module docstring."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be None or at least 1, got {limit}")
    conversations = []
    # closing(): a file left open by an early stop (limit, or a bad record) is closed now, not at GC.
    with closing(_records(source, storage_options or {}, split)) as records:
        for record in records:
            conversations.append(_conversation(record))
            if len(conversations) == limit:
                break
    if not conversations:
        raise DataError(f"{source}: no records found")
    return conversations


# ---------------------------------------------------------------- reading records


def _records(source: str, storage_options: dict, split: str) -> Iterator[_Record]:
    for prefix in HUB_PREFIXES:
        if source.startswith(prefix):
            yield from _read_hub_dataset(source, source[len(prefix):], split)
            return
    fs, path = fsspec.core.url_to_fs(source, **storage_options)
    if not fs.exists(path):
        raise DataError(f"{source}: no such file or folder")
    if not fs.isdir(path):
        yield from _read_file(fs, path, source)
    elif _is_saved_dataset(fs, path):
        yield from _read_saved_dataset(source, storage_options, split)
    else:
        for name in _data_files(fs, path, source):
            # Keep the user's spelling of the folder (relative path, s3://...) in `Conversation.source`.
            yield from _read_file(fs, posixpath.join(path, name), posixpath.join(source.rstrip("/"), name))


def _suffix(path: str) -> str:
    return posixpath.splitext(path)[1].lower()


def _read_file(fs, path: str, source: str) -> Iterator[_Record]:
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
    reader = readers.get(_suffix(path))
    if reader is None:
        raise DataError(
            f"{source}: unsupported file type {_suffix(path)!r} (expected .jsonl, .json or .parquet, a folder "
            "of them, a save_to_disk folder, or hf://<dataset name>)"
        )
    yield from reader(fs, path, source)


def _data_files(fs, path: str, source: str) -> list[str]:
    """Names of the data files directly inside a folder, sorted; not recursive, so nothing unexpected joins."""
    names = sorted(
        posixpath.basename(entry["name"].rstrip("/"))
        for entry in fs.ls(path, detail=True)
        if entry["type"] == "file" and _suffix(entry["name"]) in (".jsonl", ".json", ".parquet")
    )
    if not names:
        raise DataError(f"{source}: folder has no .jsonl, .json or .parquet files")
    return names


def _read_jsonl(fs, path: str, source: str) -> Iterator[_Record]:
    with fs.open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{source} line {line_no}"
            try:
                # Bytes, not text: json detects UTF-8 (with or without BOM), and a bad byte gets its line.
                value = json.loads(line)
            except ValueError as e:
                raise DataError(f"{where}: not valid JSON: {e}") from None
            yield _Record(source, line_no, where, value)


def _read_json(fs, path: str, source: str) -> Iterator[_Record]:
    with fs.open(path, "rb") as f:
        try:
            document = json.load(f)
        except ValueError as e:
            raise DataError(f"{source}: not valid JSON: {e}") from None
    for row, value in enumerate(_json_record_list(document, source)):
        yield _Record(source, row, f"{source} row {row}", value)


def _json_record_list(document: Any, source: str) -> list:
    if isinstance(document, list):
        return document
    if isinstance(document, dict):
        lists = [key for key, value in document.items() if isinstance(value, list)]
        if len(lists) == 1:
            return document[lists[0]]
        found = f"an object with list fields {', '.join(lists)}" if lists else "an object with no list field"
    else:
        found = type(document).__name__
    raise DataError(
        f'{source}: expected a list of records or an object with one list field like {{"data": [...]}}, found {found}'
    )


def _read_parquet(fs, path: str, source: str) -> Iterator[_Record]:
    with fs.open(path, "rb") as f:
        try:
            parquet = pq.ParquetFile(f)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{source}: not a readable parquet file: {e}") from None
        row = 0
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            for value in batch.to_pylist():
                yield _Record(source, row, f"{source} row {row}", value)
                row += 1


def _is_saved_dataset(fs, path: str) -> bool:
    # The files `datasets.load_from_disk` itself looks for, so both agree on what a saved dataset is.
    return fs.exists(posixpath.join(path, "state.json")) or fs.exists(posixpath.join(path, "dataset_dict.json"))


def _import_datasets(source: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source}: reading it needs the `datasets` package: pip install 'toss[datasets]'") from None
    return datasets


def _read_saved_dataset(source: str, storage_options: dict, split: str) -> Iterator[_Record]:
    datasets = _import_datasets(source)
    dataset = datasets.load_from_disk(source, storage_options=storage_options or None)
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(f"{source}: no split {split!r} (splits: {', '.join(dataset)})")
        dataset = dataset[split]
    yield from _dataset_records(dataset, source)


def _read_hub_dataset(source: str, name: str, split: str) -> Iterator[_Record]:
    datasets = _import_datasets(source)
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as e:  # the library raises many types (offline, not found, bad split); all mean "cannot load"
        hint = ""
        if datasets.config.HF_HUB_OFFLINE:
            hint = (" (offline mode is on: only datasets already in the Hugging Face cache load; download it once "
                    "with network access, or save it with save_to_disk and pass that folder)")
        raise DataError(f"{source}: cannot load dataset {name!r}, split {split!r}: {e}{hint}") from e
    yield from _dataset_records(dataset, source)


def _dataset_records(dataset, source: str) -> Iterator[_Record]:
    for row, value in enumerate(dataset):
        yield _Record(source, row, f"{source} row {row}", value)


# ---------------------------------------------------------------- records to conversations


def _fail(where: str, field_name: str, problem: str) -> NoReturn:
    raise DataError(f"{where}: {field_name}: {problem}")


def _present(mapping: dict) -> dict:
    return {key: value for key, value in mapping.items() if value is not None}


def _conversation(record: _Record) -> Conversation:
    if not isinstance(record.value, dict):
        _fail(record.where, "record", f"expected a JSON object, got {type(record.value).__name__}")
    fields = _present(record.value)
    turns, used = _layout_turns(fields, record.where)
    turns = _system_turn(fields, record.where) + turns
    messages = tuple(_message(turn, record.where) for turn in turns)
    _check_order(turns, record.where)
    meta = {
        key: value for key, value in fields.items()
        if key not in used and key != "system" and isinstance(value, (str, int, float, bool))
    }
    return Conversation(messages, record.source, record.row, meta)


def _layout_turns(fields: dict, where: str) -> tuple[list[_Turn], tuple[str, ...]]:
    """The turns of the first layout that matches, and the fields that layout reads."""
    for key in ("messages", "conversations"):
        if key in fields:
            return _message_list(fields[key], key, where), (key,)
    if "prompt" in fields and "chosen" in fields:
        return _preference_turns(fields, where), ("prompt", "chosen", "rejected")
    if "instruction" in fields and "output" in fields:
        return _alpaca_turns(fields, where), ("instruction", "input", "output")
    answer = next((key for key in RESPONSE_FIELDS if key in fields), None)
    if "prompt" in fields and answer:
        return _pair(fields, "prompt", answer, where), ("prompt", answer)
    if "question" in fields and "answer" in fields:
        return _pair(fields, "question", "answer", where), ("question", "answer")
    found = ", ".join(sorted(fields)) or "none"
    _fail(where, "fields", f"no recognised layout (found fields: {found}); accepted layouts:\n{describe_layouts()}")


def _pair(fields: dict, ask: str, answer: str, where: str) -> list[_Turn]:
    return _side(fields, ask, "user", where) + _side(fields, answer, "assistant", where)


def _side(fields: dict, key: str, role: str, where: str) -> list[_Turn]:
    """One side of a prompt/answer pair: a plain string for `role`, or a list of messages."""
    value = fields[key]
    if isinstance(value, list):
        return _message_list(value, key, where)
    return [_Turn(role, value, key, key)]


def _preference_turns(fields: dict, where: str) -> list[_Turn]:
    chosen = _side(fields, "chosen", "assistant", where)
    # Some sets store the whole chosen conversation, prompt included; others only its answer turns.
    if any(turn.role == "user" for turn in chosen):
        return chosen
    return _side(fields, "prompt", "user", where) + chosen


def _alpaca_turns(fields: dict, where: str) -> list[_Turn]:
    instruction = _string(fields, "instruction", where)
    extra = _string(fields, "input", where) if "input" in fields else ""
    user = instruction + "\n\n" + extra if extra.strip() else instruction
    return [_Turn("user", user, "instruction", "instruction"), _Turn("assistant", fields["output"], "output", "output")]


def _string(fields: dict, key: str, where: str) -> str:
    value = fields[key]
    if not isinstance(value, str):
        _fail(where, key, f"expected a string, got {type(value).__name__}")
    return value


def _system_turn(fields: dict, where: str) -> list[_Turn]:
    # Many sets carry "system": "" on every record to mean "no system prompt".
    if "system" not in fields or not _string(fields, "system", where).strip():
        return []
    return [_Turn("system", fields["system"], "system", "system")]


def _message_list(value: Any, key: str, where: str) -> list[_Turn]:
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else type(value).__name__
        _fail(where, key, f"expected a non-empty list of messages, got {got}")
    return [_message_turn(item, f"{key}[{i}]", where) for i, item in enumerate(value)]


def _message_turn(item: Any, at: str, where: str) -> _Turn:
    if not isinstance(item, dict):
        _fail(where, at, f'expected an object like {{"role": ..., "content": ...}}, got {type(item).__name__}')
    item = _present(item)
    if "role" in item:
        role_key, content_key, roles = "role", "content", {role: role for role in ROLES}
    elif "from" in item:  # ShareGPT
        role_key, content_key, roles = "from", "value", SHAREGPT_ROLES
    else:
        _fail(where, f"{at}.role", f"missing (found fields: {', '.join(sorted(item)) or 'none'})")
    role = item[role_key]
    if not isinstance(role, str) or role not in roles:
        _fail(where, f"{at}.{role_key}", f"unknown role {role!r} (expected one of: {', '.join(roles)})")
    if content_key not in item:
        _fail(where, f"{at}.{content_key}", "missing")
    return _Turn(roles[role], item[content_key], at, f"{at}.{content_key}")


def _message(turn: _Turn, where: str) -> Message:
    if not isinstance(turn.content, str):
        _fail(where, turn.field, f"expected a string, got {type(turn.content).__name__}")
    # An empty answer has no tokens to score or train on, which would drop the sample later, unseen.
    if turn.role == "assistant" and not turn.content.strip():
        _fail(where, turn.field, "assistant content is empty")
    return Message(turn.role, turn.content)


def _check_order(turns: list[_Turn], where: str) -> None:
    roles = [turn.role for turn in turns]
    if "assistant" not in roles:
        # Only message lists can lack one; name the list ("messages[0]" -> "messages").
        _fail(where, turns[-1].at.partition("[")[0], f"no assistant turn (roles: {', '.join(roles)})")
    first = roles.index("assistant")
    if "user" not in roles[:first]:
        _fail(where, turns[first].at, "assistant turn before any user turn (a user turn must come first)")
