"""Malformed token/score/mask tables and manifests, made by a seeded generator: every reader either
accepts the input or raises the project's own one-line error (TableError / ArtifactError), never a raw
numpy/pyarrow/KeyError. Bounded: a fixed number of cases, each a few small tables."""

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.factories import score_table, token_table
from toss_core.config import SelectConfig
from toss_core.selection import select_tokens
from toss_core.store import MANIFEST, ArtifactError, ArtifactStore
from toss_core.tables import MASK_SCHEMA, TOKENS_SCHEMA, TableError, read_mask, read_table
from toss_core.train_data import with_mask

CASES = 60
NASTY = [None, "", "..", "../x", "/abs", "a/b", "a\\b", "x" * 300, 0, -1, 1.5, float("nan"), [], {}, True, "ok"]


def mutate(table: pa.Table, rng: random.Random) -> pa.Table:
    """One random fault in one column of a table."""
    name = rng.choice(table.column_names)
    i = table.schema.get_field_index(name)
    values = table.column(name).to_pylist()
    row = rng.randrange(len(values))
    fault = rng.choice(["drop", "type", "null", "short", "long", "inf", "negative", "duplicate", "shuffle"])
    if fault == "drop":
        return table.drop_columns([name])
    if fault == "type":
        return table.set_column(i, name, pa.array([json.dumps(v) for v in values], pa.string()))
    if fault == "null":
        values[row] = None
    elif isinstance(values[row], list) and fault in ("short", "long", "inf", "negative"):
        v = values[row]
        if fault == "short":
            values[row] = v[:-1]
        elif fault == "long":
            values[row] = v + v[-1:]
        elif v and fault == "inf" and isinstance(v[0], float):
            values[row] = [float("inf")] + v[1:]
        elif v and fault == "negative" and isinstance(v[0], int) and not isinstance(v[0], bool):
            values[row] = [-v[0] - 1] + v[1:]
    elif fault == "duplicate" and name == "sample_id" and len(values) > 1:
        values[row] = values[row - 1]
    elif fault == "shuffle":
        rng.shuffle(values)
    try:
        return table.set_column(i, name, pa.array(values, type=table.schema.field(name).type))
    except (pa.ArrowException, OverflowError):
        return table.set_column(i, name, pa.array([json.dumps(v) for v in values], pa.string()))


def write(table, path, rng):
    pq.write_table(table, path)
    if rng is not None and rng.random() < 0.1:  # a damaged file
        data = bytearray(path.read_bytes())
        cut = rng.randrange(len(data))
        path.write_bytes(bytes(data[:cut]) if rng.random() < 0.5 else bytes(data[:cut] + bytes([data[cut] ^ 0xFF])
                                                                            + data[cut + 1:]))
    return str(path)


def test_malformed_tables_give_only_the_projects_errors(tmp_path):
    rng = random.Random(13)
    accepted = refused = 0
    for case in range(CASES):
        tokens = token_table([rng.randrange(3, 15) for _ in range(rng.randrange(1, 6))], seed=case)
        util = score_table(tokens, lambda s, p: 1.0 + 0.1 * p)
        safe = score_table(tokens, lambda s, p: 0.5)
        n = tokens.num_rows
        mask = pa.table({"sample_id": tokens.column("sample_id"), "ids_digest": tokens.column("ids_digest"),
                         "discard_pos": [[int(np.flatnonzero(m)[-1])] for m in tokens.column("response_mask").to_pylist()]},
                        schema=MASK_SCHEMA)
        tables = {"tokens": tokens, "utility": util, "safety": safe, "mask": mask}
        victim = rng.choice(list(tables))
        tables[victim] = mutate(tables[victim], rng)
        folder = tmp_path / str(case)
        folder.mkdir()
        paths = {k: write(t, folder / f"{k}.parquet", rng if k == victim else None) for k, t in tables.items()}
        try:
            toks = read_table([paths["tokens"]], TOKENS_SCHEMA)
            select_tokens([paths["tokens"]], [paths["utility"]], [paths["safety"]], SelectConfig(ratio=0.3),
                          str(folder / "out.parquet"))
            examples = with_mask(toks, read_mask([paths["mask"]]), "keep")
            assert len(examples) == n
            accepted += 1
        except TableError:
            refused += 1
    assert refused > CASES // 3 and accepted > 0  # the generator really makes both kinds


def test_malformed_manifests_give_only_artifact_errors(tmp_path):
    rng = random.Random(14)
    store = ArtifactStore(tmp_path / "store", cache_dir=tmp_path / "cache")
    with store.writer("tokens", "k", config={}, inputs={}) as w:
        w.write_json("a.json", {"x": 1})
    path = tmp_path / "store" / "tokens" / "k" / MANIFEST
    good = json.loads(path.read_text())
    refused = 0
    for _ in range(CASES):
        m = json.loads(json.dumps(good))
        for _ in range(rng.randrange(1, 3)):
            target = m["files"][0] if rng.random() < 0.4 else m
            field = rng.choice(list(target))
            if rng.random() < 0.2:
                del target[field]
            else:
                target[field] = rng.choice(NASTY)
        path.write_text(json.dumps(m) if rng.random() < 0.9 else json.dumps(m)[: rng.randrange(1, 50)])
        try:
            store.local_files(store.ref("tokens", "k"))
        except (ArtifactError, FileNotFoundError):
            refused += 1
        except TypeError as e:  # store.ref returned None: the manifest was refused as absent
            pytest.fail(f"unexpected {e!r} for {m}")
    assert refused > CASES // 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # nothing written outside the store
