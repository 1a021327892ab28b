"""Archives in: a Parquet or JSONL source read with Ray Data, every row validated exactly like a Kafka message.

Sources: a Parquet file, a JSONL file (``.jsonl``, ``.json``, ``.ndjson``, optionally ``.gz``), or a directory of
either (read recursively; names starting with ``.`` or ``_`` are skipped, like Spark's ``_SUCCESS``). A local path,
or any URI pyarrow's filesystems resolve (``s3://``, ``gs://``, ``hdfs://``, ``file://``). Files are read in sorted
path order, rows in file order, so "the last row of a document" is well defined.

Rows: a Parquet row is one document, its columns the :class:`~pipeline.schemas.Document` fields (plus an optional
``op`` column: ``upsert`` or ``delete``); nulls are absent fields. A JSONL line is one message value, exactly as on the
topic. Each row is turned into the JSON the topic would carry and handed to :func:`workers.messages.parse`, so a bad
row gets the same reason kinds as on the topic (``invalid_json``, ``wrong_type``, ``missing_id``, ``missing_text``,
``invalid_document``, ``unknown_op``, ``oversize``). Nothing is dropped: :class:`DeadLetters` writes each bad row,
raw, with its reason, to a Parquet file.

:func:`dataset` gives one row per source row with the columns of :data:`PARSED`: ``id``, ``op``, ``hash`` (content
hash of an upsert), ``doc`` (the validated document as JSON), or ``kind``/``reason``/``value`` for a bad row, and
where it came from (``path``, ``line``: 1-based line of a JSONL file; null for Parquet).
"""

from __future__ import annotations

import io
import json
import logging
import os
from datetime import UTC, date, datetime, time
from pathlib import Path

import pyarrow as pa

from workers.messages import DEFAULT_MAX_MESSAGE_BYTES, Delete, PoisonMessage, parse

log = logging.getLogger(__name__)
PARQUET_EXT = (".parquet", ".pq")
JSONL_EXT = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
PARSED = pa.schema([("id", pa.string()), ("op", pa.string()), ("hash", pa.string()), ("doc", pa.string()),
                    ("kind", pa.string()), ("reason", pa.string()), ("value", pa.binary()), ("path", pa.string()),
                    ("line", pa.int64())])
ROWS_PER_BLOCK = 1024
DEAD_LETTER = pa.schema([("source", pa.string()), ("line", pa.int64()), ("id", pa.string()), ("kind", pa.string()),
                         ("reason", pa.string()), ("stage", pa.string()), ("value", pa.binary())],
                        metadata={"macstream.dead_letter": "1"})


def filesystem(uri: str):
    """(pyarrow filesystem, path in it) of a local path or a URI."""
    from pyarrow import fs

    if "://" in uri:
        return fs.FileSystem.from_uri(uri)
    return fs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def resolve(source: str, fmt: str = "auto") -> tuple[str, list[str], object]:
    """(format, sorted file paths, filesystem) of ``source``. Raises FileNotFoundError (no such source) or ValueError
    (no readable file in it, mixed formats, an unknown extension), each naming what was found."""
    from pyarrow import fs as pafs

    fs, path = filesystem(source)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"backfill source {source}: no such file or directory")
    if info.type == pafs.FileType.Directory:
        found = [f.path for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                 if f.type == pafs.FileType.File and not any(p.startswith((".", "_")) for p in
                                                             Path(f.path).relative_to(path).parts)]
    else:
        found = [path]
    found.sort()
    kinds = {f: "parquet" if f.lower().endswith(PARQUET_EXT) else "jsonl" if f.lower().endswith(JSONL_EXT) else None
             for f in found}
    if fmt == "auto":
        formats = {k for k in kinds.values() if k}
        if len(formats) > 1:
            raise ValueError(f"backfill source {source} holds both Parquet and JSONL files: pass one directory of "
                             f"each, or --format")
        if not formats:
            names = ": " + ", ".join(Path(f).name for f in found[:3]) if found else ""
            raise ValueError(f"backfill source {source}: no .parquet or .jsonl file in it (found {len(found)} other "
                             f"file(s){names}); pass --format to read other names")
        fmt = formats.pop()
        files = [f for f, k in kinds.items() if k == fmt]
    else:
        files = found
    if not files:
        raise ValueError(f"backfill source {source}: no file in it")
    return fmt, files, fs


def _jsonable(value):
    """Parquet values JSON does not carry: timestamps and dates as ISO-8601 (what the topic carries)."""
    if isinstance(value, (datetime, date, time)) or hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"a {type(value).__name__} value")


def _row_value(row: dict) -> tuple[bytes, PoisonMessage | None]:
    """A Parquet row → the message value the topic would carry for it (nulls are absent fields), or why it has
    none."""
    fields = {k: v for k, v in row.items() if v is not None}
    try:
        return json.dumps(fields, ensure_ascii=False, default=_jsonable).encode(), None
    except (TypeError, ValueError) as err:
        raw = json.dumps(fields, ensure_ascii=False, default=repr).encode()
        return raw, PoisonMessage("invalid_document", f"a column holds what no document field takes ({err})")


def _parsed_row(value: bytes, poison: PoisonMessage | None, *, path: str, line: int | None, max_bytes: int) -> dict:
    """One row of :data:`PARSED`: the operation the value asks for, or why it has none (the raw value kept)."""
    row = {"id": None, "op": None, "hash": None, "doc": None, "kind": None, "reason": None, "value": None,
           "path": path, "line": line}
    try:
        if poison is not None:
            raise poison
        op = parse(None, value, max_bytes)
    except PoisonMessage as err:
        try:
            obj = json.loads(value)
            doc_id = obj.get("id") if isinstance(obj, dict) and isinstance(obj.get("id"), str) else None
        except (ValueError, RecursionError):
            doc_id = None
        return row | {"id": doc_id, "kind": err.kind, "reason": err.reason, "value": value}
    if isinstance(op, Delete):
        return row | {"id": op.doc_id, "op": "delete"}
    return row | {"id": op.doc_id, "op": "upsert", "hash": op.content_hash,
                  "doc": op.doc.model_dump_json(exclude_none=True)}


def _parquet_rows(fs, path: str, max_bytes: int):
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=ROWS_PER_BLOCK):
            yield [_parsed_row(*_row_value(row), path=path, line=None, max_bytes=max_bytes)
                   for row in batch.to_pylist()]


def _jsonl_rows(fs, path: str, max_bytes: int):
    """Line by line (streamed, never the whole file in memory; .gz and the like by extension), so a line that is not
    UTF-8 or not JSON is one bad row, not a failed file. Blank lines are not rows; ``line`` counts them."""
    rows = []
    with fs.open_input_stream(path, compression="detect") as f:
        for n, line in enumerate(io.BufferedReader(f), 1):
            if line.strip():
                rows.append(_parsed_row(line.strip(), None, path=path, line=n, max_bytes=max_bytes))
            if len(rows) >= ROWS_PER_BLOCK:
                yield rows
                rows = []
    if rows:
        yield rows


def read_files(batch: dict, fmt: str, fs, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
               columns: list[str] | None = None):
    """Ray Data UDF: the files named in ``batch["path"]`` → their rows, validated (:data:`PARSED`, or only
    ``columns`` of it), in file order, in blocks of at most :data:`ROWS_PER_BLOCK` rows."""
    for path in batch["path"]:
        for rows in (_jsonl_rows if fmt == "jsonl" else _parquet_rows)(fs, str(path), max_bytes):
            table = pa.Table.from_pylist(rows, schema=PARSED)
            yield table.select(columns) if columns else table


def dataset(fmt: str, files: list[str], fs, read_tasks: int = 2, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
            columns: list[str] | None = None):
    """The Ray Data dataset of the source's validated rows (:data:`PARSED`, or only ``columns`` of it), in source
    order: one task per file, at most ``read_tasks`` at once, each reserving no CPU (reading and validating are light
    next to encoding). Every operator of the plan must reserve no CPU, since the encoders may hold every core and a
    task that waits for one waits forever: so no Ray Data file reader (their listing step reserves a CPU per task)
    and no ``select_columns`` (a projection task of its own); the projection is done here. A local path is read on
    this process's node (the one machine known to have it); a URI on any node."""
    import warnings

    import ray
    import ray.data
    from pyarrow.fs import LocalFileSystem

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # "the last row of a document" must mean the same thing every pass
    ctx.enable_progress_bars = False  # the backfill draws its own
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # "progress bars disabled" and the like, on every run
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks")  # fewer files than tasks
    here = {}
    if isinstance(fs, LocalFileSystem):
        here = {"label_selector": {"ray.io/node-id": ray.get_runtime_context().get_node_id()}}
    listing = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    kwargs = {"fmt": fmt, "fs": fs, "max_bytes": max_bytes, "columns": columns}
    return listing.map_batches(read_files, fn_kwargs=kwargs, batch_size=1,
                               batch_format="numpy", num_cpus=0, compute=ray.data.TaskPoolStrategy(size=read_tasks),
                               **here)


def default_dead_letter_path() -> str:
    from pipeline.config import home

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return str(home() / "dead-letter" / f"backfill-{stamp}.parquet")


class DeadLetters:
    """The bad rows of one run, streamed to a Parquet file (:data:`DEAD_LETTER`: source file, line, id when known,
    reason kind, reason, stage — parse, encode or store — and the raw row). Written to ``<path>.partial`` and moved
    into place by :meth:`close`, so the file at ``path`` is always complete; a rerun rewrites it. With
    ``always=False`` (no path asked for) no file is made unless a row is bad."""

    FLUSH_ROWS = 1024

    def __init__(self, path: str | None):
        self.always = path is not None
        self.path = path or default_dead_letter_path()
        self.rows: list[dict] = []
        self.count = 0
        self.writer = None
        self.fs, self.target = filesystem(self.path)

    def add(self, source: str | None, line: int | None, doc_id: str | None, kind: str, reason: str, stage: str,
            value: bytes) -> None:
        self.rows.append({"source": source, "line": line, "id": doc_id, "kind": kind, "reason": reason,
                          "stage": stage, "value": value})
        self.count += 1
        log.debug("dead-lettered %s%s (%s): %s", source, f":{line}" if line else "", kind, reason)
        if len(self.rows) >= self.FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow.parquet as pq

        if self.writer is None:
            parent = os.path.dirname(self.target)
            if parent:
                self.fs.create_dir(parent, recursive=True)
            self.writer = pq.ParquetWriter(self.target + ".partial", DEAD_LETTER, filesystem=self.fs)
        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=DEAD_LETTER))
            self.rows = []

    def close(self) -> str | None:
        """Finish the file; return its path, or None when none was asked for and no row was bad."""
        if self.writer is None and not self.rows and not self.always:
            return None
        self._flush()
        self.writer.close()
        self.fs.move(self.target + ".partial", self.target)
        self.writer = None
        return self.path


def read_dead_letters(path: str) -> list[dict]:
    """The rows of a dead-letter file (for tests and tools)."""
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()
