"""Parquet tables that stages hand to each other, and the digest that ties them together.

Three tables, one row per sample, list columns aligned with `input_ids` position by position:

    tokens  sample_id int64 | input_ids list<int32> | response_mask list<bool> | ids_digest string | meta string (JSON)
    scores  sample_id int64 | ids_digest string | loss list<float32>        (NaN where not a response token)
    mask    sample_id int64 | ids_digest string | discard_pos list<int32>  (the discarded positions, sorted)

The mask holds only what is discarded (a tenth of the response tokens at the default d), not a flag and
a score per token: it is the cheapest table to write and read, and S lives in the score tables anyway.
Masks of the earlier layout ("v2": full-length `discard` list<bool> and `score` list<float32>) are still
read: `discard_flags` turns either layout into per-token flags.

`ids_digest` is a digest of the sample's `input_ids`. A score or mask row is only ever applied to a
token row with the same digest; a mismatch is an error, never a silent shift (SPEC section 1).
Rows are sorted by `sample_id` inside a file; a table may be split over several files (shards).
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

TOKENS_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("input_ids", pa.list_(pa.int32())),
        ("response_mask", pa.list_(pa.bool_())),
        ("ids_digest", pa.string()),
        ("meta", pa.string()),
    ]
)
SCORES_SCHEMA = pa.schema(
    [("sample_id", pa.int64()), ("ids_digest", pa.string()), ("loss", pa.list_(pa.float32()))]
)
MASK_SCHEMA = pa.schema(
    [("sample_id", pa.int64()), ("ids_digest", pa.string()), ("discard_pos", pa.list_(pa.int32()))]
)
# The earlier mask layout, read (never written) so stores made before the change keep working.
MASK_V2_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("ids_digest", pa.string()),
        ("discard", pa.list_(pa.bool_())),
        ("score", pa.list_(pa.float32())),
    ]
)

# Every documented column, by name: what a streamed column is checked against.
_KNOWN = {f.name: f for schema in (TOKENS_SCHEMA, SCORES_SCHEMA, MASK_SCHEMA, MASK_V2_SCHEMA) for f in schema}

# Columns that may never hold a null (the row's identity and the per-token lists).
_ROW_KEYS = {"sample_id", "ids_digest", "input_ids", "response_mask", "loss", "discard_pos", "discard"}

ROWS_PER_GROUP = 4096  # row groups of every table the stages write: bounded memory when streamed


class TableError(ValueError):
    """A table that does not have the documented columns, or does not line up with its token table."""


def ids_digest(input_ids: Sequence[int] | np.ndarray) -> str:
    """Digest of one sample's token ids (int32 little-endian bytes): 16 bytes of blake2b, hex."""
    data = np.asarray(input_ids, dtype="<i4").tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def list_array(values: np.ndarray, offsets: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    """A list column from flat values and int32/int64 offsets, without a Python loop."""
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), pa.array(values, type=value_type))


def flat_values(column: pa.ChunkedArray | pa.ListArray, dtype) -> np.ndarray:
    """Flat numpy values of a list column (all rows concatenated)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)


def list_offsets(column: pa.ChunkedArray | pa.ListArray) -> np.ndarray:
    """Offsets (n_rows + 1, starting at 0) of a list column."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])


@contextlib.contextmanager
def parquet_errors(source) -> Iterator[None]:
    """pyarrow's errors on a damaged or foreign file, as one TableError naming the file."""
    try:
        yield
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise TableError(f"{source}: not a readable Parquet table ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None


def _same_kind(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Types a reader can use as the documented one: any integer width, any float width, (large) string."""
    if pa.types.is_list(expected) or pa.types.is_large_list(expected):
        return (pa.types.is_list(actual) or pa.types.is_large_list(actual)) and _same_kind(actual.value_type,
                                                                                             expected.value_type)
    for kind in (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean):
        if kind(expected):
            return kind(actual)
    if pa.types.is_string(expected):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    return actual == expected


def check_columns(table_or_schema: pa.Table | pa.Schema, expected: pa.Schema, source: str) -> None:
    schema = table_or_schema.schema if isinstance(table_or_schema, pa.Table) else table_or_schema
    missing = [f.name for f in expected if f.name not in schema.names]
    if missing:
        raise TableError(
            f"{source}: missing column(s) {missing}; found {schema.names}. Expected the documented columns "
            f"{expected.names} (see toss_core/tables.py)."
        )
    for field in expected:
        actual = schema.field(field.name).type
        if not _same_kind(actual, field.type):
            raise TableError(f"{source}: column `{field.name}` is {actual}, expected {field.type} "
                             "(see toss_core/tables.py)")


def _sample_at(table: pa.Table, row: int) -> str:
    return f"sample {table.column('sample_id')[row].as_py()} (row {row})"


def _no_nulls(table: pa.Table, columns: Sequence[str], source: str) -> None:
    for name in columns:
        column = table.column(name)
        if column.null_count:
            row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise TableError(f"{source}: {_sample_at(table, row) if name != 'sample_id' else f'row {row}'}: "
                             f"`{name}` is null")
        if pa.types.is_list(column.type):
            values = pc.list_flatten(column)
            if values.null_count:
                lengths = np.diff(list_offsets(column))
                row = int(np.searchsorted(np.cumsum(lengths), np.flatnonzero(
                    values.is_null().to_numpy(zero_copy_only=False))[0], side="right"))
                raise TableError(f"{source}: {_sample_at(table, row)}: `{name}` holds a null value")


def check_lengths(table: pa.Table, column: str, token_lengths: np.ndarray, source: str, what: str = "tokens") -> None:
    """Raise unless every row's `column` list is exactly as long as its token row (a shifted or truncated
    row would otherwise be applied to the wrong positions)."""
    lengths = np.diff(list_offsets(table.column(column)))
    if len(lengths) != len(token_lengths):
        raise TableError(f"{source}: {len(lengths)} rows for {len(token_lengths)} token rows")
    if (bad := np.flatnonzero(lengths != token_lengths)).size:
        i = int(bad[0])
        raise TableError(f"{source}: {_sample_at(table, i)}: `{column}` has {int(lengths[i])} entries for "
                         f"{int(token_lengths[i])} {what} (a shifted, truncated or foreign row)")


def check_token_rows(table: pa.Table, source: str) -> None:
    """A token table's rows: no nulls, response_mask as long as input_ids, ids_digest matching input_ids."""
    _no_nulls(table, ["sample_id", "input_ids", "response_mask", "ids_digest"], source)
    check_lengths(table, "response_mask", np.diff(list_offsets(table.column("input_ids"))), source)
    ids = table.column("input_ids").combine_chunks() if isinstance(table.column("input_ids"), pa.ChunkedArray) \
        else table.column("input_ids")
    digests = table.column("ids_digest").to_pylist()
    offsets, flat = list_offsets(ids), flat_values(ids, np.int64)
    if len(flat) and (flat.min() < np.iinfo(np.int32).min or flat.max() > np.iinfo(np.int32).max):
        raise TableError(f"{source}: `input_ids` holds values outside int32")
    for row, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
        if ids_digest(flat[lo:hi]) != digests[row]:
            raise TableError(f"{source}: {_sample_at(table, row)}: `ids_digest` does not match its input_ids "
                             "(the table was changed after tokenizing)")


def mask_layout(files: Sequence[str], filesystem=None) -> str:
    """The column that holds a mask's discards: "discard_pos" (current layout) or "discard" (v2), the same
    in every file of the mask."""
    found = set()
    for f in files:
        with parquet_errors(f):
            schema = pq.read_schema(f, filesystem=filesystem)
        names = schema.names
        if "discard_pos" in names:
            check_columns(schema, MASK_SCHEMA, str(f))
            found.add("discard_pos")
        elif "discard" in names:
            check_columns(schema, MASK_V2_SCHEMA.remove(3), str(f))
            found.add("discard")
        else:
            raise TableError(f"{f}: not a mask table: no `discard_pos` column (nor the earlier `discard`); found "
                             f"{names}. Expected the columns {MASK_SCHEMA.names} (see toss_core/tables.py).")
    if len(found) > 1:
        raise TableError(f"the mask files {list(files)} mix two layouts (discard_pos and discard): write it again")
    if not found:
        raise TableError("no Parquet files to read")
    return found.pop()


def read_mask(files: Sequence[str], filesystem=None) -> pa.Table:
    """A mask table (either layout) sorted by sample_id, with only the columns readers need."""
    column = mask_layout(files, filesystem)
    expected = MASK_SCHEMA if column == "discard_pos" else MASK_V2_SCHEMA.remove(3)
    table = read_table(files, expected, ["sample_id", "ids_digest", column], filesystem)
    _no_nulls(table, ["sample_id", "ids_digest", column], f"mask {list(map(str, files))}")
    return table


def discard_flags(mask: pa.Table, token_offsets: np.ndarray, source: str = "mask") -> np.ndarray:
    """Per-token discard flags of mask rows, flat and aligned with their token rows' flattened lists.

    `token_offsets` are the list offsets of the token rows the mask rows belong to (checked by digest
    elsewhere). Positions outside a row, or a v2 row of another length, are errors: applied as they are
    they would drop tokens of the next sample."""
    n_rows, n_tokens = len(token_offsets) - 1, int(token_offsets[-1])
    out = np.zeros(n_tokens, bool)
    if "discard_pos" in mask.column_names:
        column = mask.column("discard_pos")
        pos = flat_values(column, np.int64)
        counts = np.diff(list_offsets(column))
        if len(counts) != n_rows:
            raise TableError(f"{source}: {len(counts)} rows for {n_rows} token rows")
        row = np.repeat(np.arange(n_rows), counts)
        lengths = np.diff(token_offsets)
        same_row = row[1:] == row[:-1]
        if len(pos) > 1 and (bad := np.flatnonzero(same_row & (pos[1:] <= pos[:-1]))).size:
            i = int(row[bad[0] + 1])
            raise TableError(f"{source}: {_sample_at(mask, i)}: `discard_pos` is not sorted and unique "
                             "(a corrupt or foreign mask)")
        if len(pos) and ((bad := (pos < 0) | (pos >= lengths[row])).any()):
            i = int(np.flatnonzero(bad)[0])
            raise TableError(f"{source}: {_sample_at(mask, int(row[i]))}: discard_pos "
                             f"{int(pos[i])} is outside its {int(lengths[row[i]])} tokens (a corrupt or foreign mask)")
        out[token_offsets[:-1][row] + pos] = True
        return out
    column = mask.column("discard")
    lengths = np.diff(list_offsets(column))
    if len(lengths) != n_rows or not np.array_equal(lengths, np.diff(token_offsets)):
        bad = int(np.flatnonzero(lengths != np.diff(token_offsets))[0]) if len(lengths) == n_rows else 0
        raise TableError(f"{source}: {_sample_at(mask, bad)}: its `discard` list has "
                         f"{int(lengths[bad]) if len(lengths) > bad else 0} entries for "
                         f"{int(np.diff(token_offsets)[bad])} tokens (a corrupt or foreign mask)")
    return flat_values(column, bool).copy()


def discard_positions(gone: np.ndarray, offsets: np.ndarray) -> pa.ListArray:
    """The `discard_pos` column (list<int32>) from the ascending flat indices of the discarded tokens
    (`np.flatnonzero` of per-token flags) and the rows' offsets."""
    row = np.searchsorted(offsets, gone, side="right") - 1
    per_row = np.bincount(row, minlength=len(offsets) - 1)
    pos_offsets = np.concatenate([[0], np.cumsum(per_row)])
    return list_array((gone - offsets[row]).astype(np.int32), pos_offsets, pa.int32())


def read_table(files: Sequence[str], expected: pa.Schema, columns: Sequence[str] | None = None,
               filesystem=None) -> pa.Table:
    """Read shards into one table sorted by sample_id, checking the columns."""
    if not files:
        raise TableError("no Parquet files to read")
    parts = []
    for f in files:
        with parquet_errors(f):
            schema = pq.read_schema(f, filesystem=filesystem)
            check_columns(schema, expected, f)
            part = pq.read_table(f, columns=list(columns) if columns else None, filesystem=filesystem)
            # One type per column across shards (an int64 shard next to an int32 one would not concatenate).
            part = part.cast(pa.schema([expected.field(n) if n in expected.names else part.schema.field(n)
                                        for n in part.column_names]))
        if expected is TOKENS_SCHEMA and {"input_ids", "response_mask", "ids_digest"} <= set(part.column_names):
            check_token_rows(part, str(f))
        else:
            _no_nulls(part, [n for n in part.column_names if n in expected.names and n in _ROW_KEYS], str(f))
        parts.append(part)
    table = pa.concat_tables(parts).combine_chunks()
    return sort_by_sample(table)


def sort_by_sample(table: pa.Table) -> pa.Table:
    ids = table.column("sample_id").to_numpy()
    if len(ids) > 1 and np.any(np.diff(ids) <= 0):
        order = np.argsort(ids, kind="stable")
        ids_sorted = ids[order]
        dup = np.flatnonzero(np.diff(ids_sorted) == 0)
        if len(dup):
            raise TableError(f"sample_id {int(ids_sorted[dup[0]])} appears more than once")
        table = table.take(pa.array(order))
    return table


def iter_batches(files: Sequence[str], columns: Sequence[str], batch_rows: int, filesystem=None) -> Iterator[pa.Table]:
    """Stream a (possibly sharded) table in sample_id order, `batch_rows` rows at a time.

    Shards must each be sorted and must not overlap (as every stage writes them); they are visited in
    the order of their first sample_id, so the split into files does not change what is streamed.
    """
    firsts = []
    for f in files:
        with parquet_errors(f):
            pf = pq.ParquetFile(f, filesystem=filesystem)
            if missing := [c for c in columns if c not in pf.schema_arrow.names]:
                raise TableError(f"{f}: missing column(s) {missing}; found {pf.schema_arrow.names} "
                                 "(see toss_core/tables.py)")
            check_columns(pf.schema_arrow, pa.schema([_KNOWN[c] for c in columns if c in _KNOWN]), str(f))
            if pf.metadata.num_rows == 0:
                continue
            first = pf.read_row_group(0, columns=["sample_id"]).column(0)[0].as_py()
        if first is None:
            raise TableError(f"{f}: row 0: `sample_id` is null")
        firsts.append((first, f))
    last_id = None
    for _, f in sorted(firsts):
        # pre_buffer=False: pyarrow's read cache keeps every pre-buffered column chunk until the file is
        # closed (apache/arrow#39808), so a streamed file would end up resident in full.
        with parquet_errors(f):
            pf = pq.ParquetFile(f, filesystem=filesystem, pre_buffer=False)
            batches = pf.iter_batches(batch_size=batch_rows, columns=list(columns))
        while True:
            with parquet_errors(f):
                batch = next(batches, None)
            if batch is None:
                break
            _no_nulls(pa.Table.from_batches([batch]), [c for c in columns if c in _ROW_KEYS], str(f))
            ids = batch.column("sample_id").to_numpy()
            if (last_id is not None and ids[0] <= last_id) or np.any(np.diff(ids) <= 0):
                raise TableError(f"{f}: sample_id not strictly increasing across shards (overlapping shards?)")
            last_id = ids[-1]
            yield pa.Table.from_batches([batch])


def prefetch(items: Iterable, depth: int = 2) -> Iterator:
    """Iterate `items` in a background thread, up to `depth` items ahead of the consumer.

    pyarrow decodes Parquet without holding the GIL, so tables zipped side by side (select reads three)
    decode on different cores while the caller computes. Errors reach the caller at the item where they
    happened; a consumer that stops early stops the thread.
    """
    slots: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as exc:  # handed to the consumer, raised there
            put((end, exc))

    thread = threading.Thread(target=produce, name="toss-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = slots.get()
            if exc is not None:
                raise exc
            if item is end:
                return
            yield item
    finally:
        stop.set()


class RowStream:
    """Hands out the next N rows of a sharded table, whatever its batch boundaries (to zip tables).

    With `background=True` the files are read and decoded in a thread, a couple of batches ahead."""

    def __init__(self, files: Sequence[str], columns: Sequence[str], batch_rows: int = ROWS_PER_GROUP, filesystem=None,
                 background: bool = False):
        self.files, self._filesystem = [str(f) for f in files], filesystem
        self._batches = iter_batches(files, columns, batch_rows, filesystem)
        if background:
            self._batches = prefetch(self._batches)
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def where(self, sample_id: int) -> str:
        """The file holding a sample (for error messages: read only when something is wrong)."""
        for f in self.files:
            with contextlib.suppress(Exception):
                ids = pq.read_table(f, columns=["sample_id"], filesystem=self._filesystem).column(0)
                if pc.any(pc.equal(ids, sample_id)).as_py():
                    return f
        return ", ".join(self.files)

    def take(self, n: int, exact: bool = True) -> pa.Table:
        """The next n rows; with exact=False, fewer when the table ends."""
        while self._pending_rows < n:
            batch = next(self._batches, None)
            if batch is None:
                break
            self._pending.append(batch)
            self._pending_rows += batch.num_rows
        table = pa.concat_tables(self._pending) if self._pending else None
        if table is not None and not exact:
            n = min(n, table.num_rows)
        if table is None or table.num_rows < n:
            have = 0 if table is None else table.num_rows
            raise TableError(f"table ended early: needed {n} more rows, found {have}")
        head, rest = table.slice(0, n), table.slice(n)
        self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        return head

    def exhausted(self) -> bool:
        if self._pending_rows:
            return False
        batch = next(self._batches, None)
        if batch is None:
            return True
        self._pending, self._pending_rows = [batch], batch.num_rows
        return False


def write_scores(table: pa.Table, sink) -> None:
    """A scores table as every stage writes it: bounded row groups, so readers can stream it; plain
    encoding and LZ4 (losses are continuous: a dictionary costs time for nothing, and on such floats
    snappy compresses no better than LZ4 but takes ~1.7x as long to read back; docs/benchmarks.md)."""
    pq.write_table(table, sink, use_dictionary=False, compression="lz4", row_group_size=ROWS_PER_GROUP)


def check_aligned(tokens: pa.Table, other: pa.Table, what: str) -> None:
    """Raise unless `other` has the same samples, in the same order, with the same ids digests."""
    a, b = tokens.column("sample_id"), other.column("sample_id")
    if len(a) != len(b) or not pc.all(pc.equal(a, b)).as_py():
        raise TableError(
            f"{what}: sample ids differ from the token table's (was it computed from another token table?)"
        )
    same = pc.equal(tokens.column("ids_digest"), other.column("ids_digest"))
    if not pc.all(same).as_py():
        bad = int(np.flatnonzero(~same.to_numpy(zero_copy_only=False))[0])
        raise TableError(
            f"{what}: ids_digest of sample {a[bad].as_py()} differs from the token table's: it was computed "
            f"from different tokens. Recompute it from this token table; masks are never shifted to fit."
        )
