"""Loading chat data: every layout and source gives the same Conversation form; bad data names where it is."""

import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from toss_core.data import Conversation, DataError, Message, describe_layouts, load_conversations

U, A, S = "user", "assistant", "system"


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def load_one(tmp_path, record):
    return load_conversations(str(write_jsonl(tmp_path / "d.jsonl", [record])))[0]


def msgs(*pairs):
    return tuple(Message(role, content) for role, content in pairs)


@pytest.mark.parametrize(
    "record, expected",
    [
        pytest.param(
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            msgs((U, "q"), (A, "a")), id="messages",
        ),
        pytest.param(
            {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            msgs((U, "q"), (A, "a")), id="conversations",
        ),
        pytest.param(
            {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                               {"from": "gpt", "value": "a"}]},
            msgs((S, "s"), (U, "q"), (A, "a")), id="sharegpt",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                          {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
            msgs((U, "q1"), (A, "a1"), (U, "q2"), (A, "a2")), id="multi-turn",
        ),
        pytest.param(
            {"system": "s", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            msgs((S, "s"), (U, "q"), (A, "a")), id="system-field",
        ),
        pytest.param({"system": "", "prompt": "q", "response": "a"}, msgs((U, "q"), (A, "a")), id="empty-system"),
        pytest.param({"prompt": "q", "response": "a"}, msgs((U, "q"), (A, "a")), id="prompt-response"),
        pytest.param({"prompt": "q", "completion": "a"}, msgs((U, "q"), (A, "a")), id="prompt-completion"),
        pytest.param({"prompt": "q", "output": "a"}, msgs((U, "q"), (A, "a")), id="prompt-output"),
        pytest.param({"prompt": "q", "answer": "a"}, msgs((U, "q"), (A, "a")), id="prompt-answer"),
        pytest.param(
            {"instruction": "do", "input": "this", "output": "a"}, msgs((U, "do\n\nthis"), (A, "a")), id="alpaca",
        ),
        pytest.param(
            {"instruction": "do", "input": "", "output": "a"}, msgs((U, "do"), (A, "a")), id="alpaca-no-input",
        ),
        pytest.param({"instruction": "do", "output": "a"}, msgs((U, "do"), (A, "a")), id="alpaca-input-absent"),
        pytest.param(
            {"prompt": "q", "chosen": "good", "rejected": "bad"}, msgs((U, "q"), (A, "good")), id="preference",
        ),
        pytest.param(
            {"prompt": "q", "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
             "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]},
            msgs((U, "q"), (A, "good")), id="preference-chosen-conversation",
        ),
        pytest.param(
            {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "good"}]},
            msgs((U, "q"), (A, "good")), id="preference-conversational-trl",
        ),
        pytest.param({"question": "q", "answer": "a"}, msgs((U, "q"), (A, "a")), id="question-answer"),
    ],
)
def test_layouts(tmp_path, record, expected):
    assert load_one(tmp_path, record).messages == expected


def test_meta_keeps_extra_scalar_fields_only(tmp_path):
    record = {"id": "x1", "is_harmful": True, "score": 0.5, "n": 3, "tags": ["t"], "info": {"k": 1},
              "note": None, "prompt": "q", "chosen": "good", "rejected": "bad", "system": "s"}
    assert load_one(tmp_path, record).meta == {"id": "x1", "is_harmful": True, "score": 0.5, "n": 3}


def test_jsonl_rows_are_line_numbers_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"prompt": "q1", "response": "a1"}), "", json.dumps({"prompt": "q2", "response": "a2"})]
    path.write_text("\n".join(lines) + "\n")
    conversations = load_conversations(str(path))
    assert [(c.source, c.row) for c in conversations] == [(str(path), 1), (str(path), 3)]
    assert conversations[1] == Conversation(msgs((U, "q2"), (A, "a2")), str(path), 3, {})


def test_file_url(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "response": "a"}])
    (c,) = load_conversations(f"file://{path}")
    assert c.source == f"file://{path}" and c.messages == msgs((U, "q"), (A, "a"))


@pytest.mark.parametrize("wrap", [lambda records: records, lambda records: {"version": 1, "data": records}])
def test_json_list_or_object_with_one_list(tmp_path, wrap):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(wrap([{"prompt": "q0", "response": "a0"}, {"question": "q1", "answer": "a1"}])))
    conversations = load_conversations(str(path))
    assert [c.messages for c in conversations] == [msgs((U, "q0"), (A, "a0")), msgs((U, "q1"), (A, "a1"))]
    assert [c.row for c in conversations] == [0, 1]


def test_parquet_reads_in_batches_with_mixed_layouts(tmp_path, monkeypatch):
    # Batches of 2 rows over 3 records check that rows keep counting across batches; nulls are absent fields.
    monkeypatch.setattr("toss_core.data._PARQUET_BATCH_ROWS", 2)
    path = tmp_path / "d.parquet"
    table = pa.Table.from_pylist([
        {"id": 0, "prompt": "q0", "response": "a0", "messages": None},
        {"id": 1, "prompt": None, "response": None,
         "messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]},
        {"id": 2, "prompt": "q2", "response": "a2", "messages": None},
    ])
    pq.write_table(table, path, row_group_size=1)
    conversations = load_conversations(str(path))
    assert [c.messages for c in conversations] == [
        msgs((U, "q0"), (A, "a0")), msgs((U, "q1"), (A, "a1")), msgs((U, "q2"), (A, "a2"))
    ]
    assert [(c.row, c.meta) for c in conversations] == [(0, {"id": 0}), (1, {"id": 1}), (2, {"id": 2})]


def test_folder_reads_data_files_in_name_order(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", [{"prompt": "q2", "response": "a2"}])
    write_jsonl(folder / "a.jsonl", [{"prompt": "q0", "response": "a0"}, {"prompt": "q1", "response": "a1"}])
    (folder / "notes.txt").write_text("not data")
    conversations = load_conversations(str(folder) + "/")
    assert [c.messages[0].content for c in conversations] == ["q0", "q1", "q2"]
    assert [(c.source, c.row) for c in conversations] == [
        (f"{folder}/a.jsonl", 1), (f"{folder}/a.jsonl", 2), (f"{folder}/b.jsonl", 1)
    ]


def test_saved_dataset_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    records = [{"prompt": "q0", "response": "a0", "id": "r0"}, {"prompt": "q1", "response": "a1", "id": "r1"}]
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "ds"))
    conversations = load_conversations(str(tmp_path / "ds"))
    assert [c.messages for c in conversations] == [msgs((U, "q0"), (A, "a0")), msgs((U, "q1"), (A, "a1"))]
    assert [(c.source, c.row, c.meta) for c in conversations] == [
        (str(tmp_path / "ds"), 0, {"id": "r0"}), (str(tmp_path / "ds"), 1, {"id": "r1"})
    ]


def test_saved_dataset_dict_picks_the_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"prompt": "q", "response": "train"}]),
        "test": datasets.Dataset.from_list([{"prompt": "q", "response": "test"}]),
    }).save_to_disk(str(tmp_path / "dd"))
    assert load_conversations(str(tmp_path / "dd"), split="test")[0].messages[1].content == "test"
    with pytest.raises(DataError, match=r"dd: no split 'dev' \(splits: train, test\)"):
        load_conversations(str(tmp_path / "dd"), split="dev")


def test_hub_dataset_offline_and_uncached_says_so(monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"hf://no-such-org/no-such-set: cannot load dataset .*offline mode is on"):
        load_conversations("hf://no-such-org/no-such-set")


def test_limit_stops_early(tmp_path):
    path = tmp_path / "d.jsonl"
    # The line after the limit is not JSON: reading stops before it.
    lines = [json.dumps({"prompt": "q", "response": "a"}), json.dumps({"prompt": "q", "response": "b"}), "{oops"]
    path.write_text("\n".join(lines) + "\n")
    assert [c.messages[1].content for c in load_conversations(str(path), limit=2)] == ["a", "b"]
    with pytest.raises(ValueError, match="limit"):
        load_conversations(str(path), limit=0)


def test_limit_spans_files_of_a_folder(tmp_path):
    for name in ("a", "b"):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"prompt": name, "response": "x"}] * 2)
    assert [c.messages[0].content for c in load_conversations(str(tmp_path), limit=3)] == ["a", "a", "b"]


def test_describe_layouts_lists_every_layout():
    text = describe_layouts()
    for name in ("messages", "preference", "alpaca", "prompt", "question", '"system"'):
        assert name in text


OK_MESSAGES = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


@pytest.mark.parametrize(
    "record, match",
    [
        pytest.param(
            {"messages": [OK_MESSAGES[0], OK_MESSAGES[1], {"role": "bot", "content": "x"}]},
            r"d\.jsonl line 2: messages\[2\]\.role: unknown role 'bot' \(expected one of: system, user, assistant\)",
            id="unknown-role",
        ),
        pytest.param(
            {"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]},
            r"d\.jsonl line 2: conversations\[1\]\.from: unknown role 'robot' \(expected one of: human, gpt, system",
            id="unknown-sharegpt-role",
        ),
        pytest.param(
            {"messages": [OK_MESSAGES[0], {"content": "a"}]},
            r"d\.jsonl line 2: messages\[1\]\.role: missing", id="role-missing",
        ),
        pytest.param(
            {"messages": [OK_MESSAGES[0], {"role": "assistant"}]},
            r"d\.jsonl line 2: messages\[1\]\.content: missing", id="content-missing",
        ),
        pytest.param(
            {"messages": [OK_MESSAGES[0], {"role": "assistant", "content": ["a"]}]},
            r"d\.jsonl line 2: messages\[1\]\.content: expected a string, got list", id="content-not-string",
        ),
        pytest.param(
            {"messages": [OK_MESSAGES[0], {"role": "assistant", "content": "  \n"}]},
            r"d\.jsonl line 2: messages\[1\]\.content: assistant content is empty", id="assistant-empty",
        ),
        pytest.param(
            {"prompt": "q", "response": ""}, r"d\.jsonl line 2: response: assistant content is empty",
            id="response-empty",
        ),
        pytest.param(
            {"prompt": "q", "response": 5}, r"d\.jsonl line 2: response: expected a string, got int",
            id="response-not-string",
        ),
        pytest.param(
            {"instruction": ["do"], "output": "a"}, r"d\.jsonl line 2: instruction: expected a string, got list",
            id="instruction-not-string",
        ),
        pytest.param(
            {"system": 1, "prompt": "q", "response": "a"}, r"d\.jsonl line 2: system: expected a string, got int",
            id="system-not-string",
        ),
        pytest.param(
            {"messages": [{"role": "system", "content": "s"}, OK_MESSAGES[0]]},
            r"d\.jsonl line 2: messages: no assistant turn \(roles: system, user\)", id="no-assistant",
        ),
        pytest.param(
            {"messages": [{"role": "system", "content": "s"}, OK_MESSAGES[1], OK_MESSAGES[0]]},
            r"d\.jsonl line 2: messages\[1\]: assistant turn before any user turn", id="assistant-first",
        ),
        pytest.param(
            {"messages": []}, r"d\.jsonl line 2: messages: expected a non-empty list of messages, got an empty list",
            id="messages-empty",
        ),
        pytest.param(
            {"messages": "q"}, r"d\.jsonl line 2: messages: expected a non-empty list of messages, got str",
            id="messages-not-list",
        ),
        pytest.param(
            {"messages": [OK_MESSAGES[0], "a"]}, r"d\.jsonl line 2: messages\[1\]: expected an object",
            id="message-not-object",
        ),
        pytest.param(
            {"text": "q", "label": 1},
            r"(?s)d\.jsonl line 2: fields: no recognised layout \(found fields: label, text\); "
            r"accepted layouts:.*alpaca",
            id="no-layout",
        ),
        pytest.param(["q", "a"], r"d\.jsonl line 2: record: expected a JSON object, got list", id="not-object"),
    ],
)
def test_bad_records_name_file_line_and_field(tmp_path, record, match):
    # Line 1 is valid, so the error must point at line 2, not at the first line.
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "response": "a"}, record])
    with pytest.raises(DataError, match=match):
        load_conversations(str(path))


def test_bad_json_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n\n{\"prompt\": \"q\",\n")
    with pytest.raises(DataError, match=r"d\.jsonl line 3: not valid JSON"):
        load_conversations(str(path))


def test_bad_record_in_json_and_parquet_names_the_row(tmp_path):
    records = [{"prompt": "q", "response": "a"}, {"prompt": "q", "response": " "}]
    (tmp_path / "d.json").write_text(json.dumps({"data": records}))
    with pytest.raises(DataError, match=r"d\.json row 1: response: assistant content is empty"):
        load_conversations(str(tmp_path / "d.json"))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d\.parquet row 1: response: assistant content is empty"):
        load_conversations(str(tmp_path / "d.parquet"))


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("d.json", "[1, 2", r"d\.json: not valid JSON"),
        ("d.json", json.dumps({"a": [], "b": []}), r"d\.json: expected a list of records .* list fields a, b"),
        ("d.json", json.dumps("text"), r"d\.json: expected a list of records .* found str"),
        ("d.parquet", "not parquet", r"d\.parquet: not a readable parquet file"),
        ("d.csv", "a,b", r"d\.csv: unsupported file type '\.csv'"),
        ("d.jsonl", "", r"d\.jsonl: no records found"),
    ],
)
def test_bad_files(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=match):
        load_conversations(str(tmp_path / name))


def test_missing_source_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file or folder"):
        load_conversations(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: folder has no \.jsonl, \.json or \.parquet files"):
        load_conversations(str(tmp_path / "empty"))


def test_remote_fsspec_folder():
    # memory:// stands in for s3:// and friends: the same fsspec calls, no server.
    fs = fsspec.filesystem("memory")
    fs.pipe("/toss-test-data/b.json", json.dumps([{"question": "q1", "answer": "a1"}]).encode())
    fs.pipe("/toss-test-data/a.jsonl", (json.dumps({"prompt": "q0", "response": "a0"}) + "\n").encode())
    try:
        conversations = load_conversations("memory://toss-test-data")
    finally:
        fs.rm("/toss-test-data", recursive=True)
    assert [(c.source, c.row, c.messages) for c in conversations] == [
        ("memory://toss-test-data/a.jsonl", 1, msgs((U, "q0"), (A, "a0"))),
        ("memory://toss-test-data/b.json", 0, msgs((U, "q1"), (A, "a1"))),
    ]
