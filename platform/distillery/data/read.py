"""Find a source's files and read them in chunks that remember the file and line of every row.

A source `path` is a file, a glob or a directory, local or any fsspec URI. Each file is indexed
once (size, sha256 and chunk boundaries, in one pass over its bytes); the chunks are the unit of
parallel work, so one huge JSONL file still spreads over every core. Reading never raises on a bad
row: undecodable bytes and bad JSON come back as rows with a quarantine `reason`, with the line.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

from distillery.config import ConfigError, SourceConfig

EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".csv": "csv"}
CHUNK_BYTES = 8 << 20  # JSONL chunk size: big enough that per-task overhead is small, small enough to spread
READ_BLOCK = 1 << 20


def file_kind(path: str) -> str | None:
    return EXTENSIONS.get(os.path.splitext(path.rstrip("/"))[1].lower())


def _fs(path: str):
    import fsspec.core

    return fsspec.core.url_to_fs(path)


def discover_files(source: SourceConfig, index: int) -> list[str]:
    """The source's data files in sorted order (sorted so row order, hence dedupe winners, are stable)."""
    fs, root = _fs(source.path)
    protocol = source.path.split("://", 1)[0] + "://" if "://" in source.path else ""
    if any(c in root for c in "*?["):
        found = [p for p in fs.glob(root) if not fs.isdir(p)]
    elif fs.isdir(root):
        found = [p for p in fs.find(root) if not os.path.basename(p).startswith((".", "_"))]
    elif fs.exists(root):
        found = [root]
    else:
        raise ConfigError(f"data.sources.{index}.path: '{source.path}' does not exist")
    files = sorted(protocol + p if protocol and "://" not in p else p for p in found)
    if len(files) == 1 and file_kind(files[0]) is None:
        raise ConfigError(
            f"data.sources.{index}.path: cannot read '{files[0]}': file types are .jsonl/.json/.ndjson, .parquet and .csv"
        )
    # In a directory or glob, other files (READMEs, _SUCCESS markers) are skipped.
    files = [p for p in files if file_kind(p) is not None]
    if not files:
        raise ConfigError(f"data.sources.{index}.path: no .jsonl, .parquet or .csv file under '{source.path}'")
    return files


@dataclass
class FileIndex:
    path: str
    size: int
    sha256: str
    chunks: list[tuple[int, int, int]]  # (start byte or row group, end, first line number, 1-based)


def index_file(path: str, chunk_bytes: int = CHUNK_BYTES) -> FileIndex:
    """Size, sha256 and work chunks of one file, in a single streaming pass over its bytes.

    JSONL chunks are byte ranges that end on a newline, with the line number they start at;
    Parquet chunks are row groups (the "line" is the 1-based row); CSV is one chunk (quoted
    fields may span lines, so it cannot be cut safely by bytes).
    """
    fs, p = _fs(path)
    kind = file_kind(path)
    digest = hashlib.sha256()
    size = 0
    chunks: list[tuple[int, int, int]] = []
    start, line_at_start, lines = 0, 1, 0
    try:
        with fs.open(p, "rb") as f:
            while True:
                block = f.read(READ_BLOCK)
                if not block:
                    break
                digest.update(block)
                if kind == "jsonl":
                    pos = 0
                    while start + chunk_bytes - size < len(block):
                        # Cut after the first newline at or past start + chunk_bytes (maybe in a later block).
                        cut = block.find(b"\n", max(start + chunk_bytes - size, pos))
                        if cut < 0:
                            break
                        lines += block.count(b"\n", pos, cut + 1)
                        chunks.append((start, size + cut + 1, line_at_start))
                        start, line_at_start, pos = size + cut + 1, lines + 1, cut + 1
                    lines += block.count(b"\n", pos)
                size += len(block)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read source file '{path}': {e}") from None
    if kind == "jsonl":
        if size > start:
            chunks.append((start, size, line_at_start))
    elif kind == "parquet":
        import pyarrow.parquet as pq

        try:
            with fs.open(p, "rb") as f:
                meta = pq.ParquetFile(f).metadata
        except Exception as e:  # noqa: BLE001 - any pyarrow failure means the file is unusable
            raise ConfigError(f"cannot read source file '{path}' as Parquet: {e}") from None
        row = 1
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            chunks.append((g, g + 1, row))
            row += n
    else:
        chunks.append((0, size, 2))  # CSV data starts on line 2, after the header
    return FileIndex(path, size, digest.hexdigest(), chunks)


# A read record: (line, parsed object or None, raw text, reason or "").
Record = tuple[int, Any, str, str]


def read_chunk(path: str, start: int, end: int, first_line: int) -> Iterator[Record]:
    """Rows of one chunk; bad bytes or JSON become records with a reason instead of raising."""
    kind = file_kind(path)
    fs, p = _fs(path)
    if kind == "jsonl":
        with fs.open(p, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        for i, raw in enumerate(data.split(b"\n")):
            line = first_line + i
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield line, None, raw.decode("utf-8", errors="replace"), f"undecodable: {e.reason} at byte {e.start}"
                continue
            try:
                yield line, json.loads(text), text, ""
            except json.JSONDecodeError as e:
                yield line, None, text, f"bad_json: {e.msg} at column {e.colno}"
    elif kind == "parquet":
        import pyarrow.parquet as pq

        with fs.open(p, "rb") as f:
            table = pq.ParquetFile(f).read_row_group(start)
        for i, row in enumerate(table.to_pylist()):
            yield first_line + i, row, "", ""
    else:
        yield from _read_csv(fs, p, first_line)


def _read_csv(fs, p: str, first_line: int) -> Iterator[Record]:
    """CSV rows with the line each starts on (quoted fields may span lines). Every column is a
    string (a `label` of "007" or an `input` of "1,2" keeps its text). A bad row (wrong number of
    fields, bytes that are not UTF-8) is one quarantined record; the rows after it are read on."""
    import csv
    import io

    with fs.open(p, "rb") as raw:
        # surrogateescape: undecodable bytes reach the row that holds them instead of ending the file.
        reader = csv.reader(io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline=""))
        try:
            names = next(reader)
        except (StopIteration, csv.Error):
            return
        line = reader.line_num
        while True:
            start = line + 1
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                line = reader.line_num
                yield start, None, "", f"bad_csv: {e}"
                continue
            line = reader.line_num
            if not fields:
                continue  # a blank line
            text = ",".join(fields)
            bad = next((i for i, ch in enumerate(text) if "\udc80" <= ch <= "\udcff"), None)
            if bad is not None:
                shown = text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")
                yield start, None, shown, f"undecodable: invalid UTF-8 at character {bad}"
            elif len(fields) != len(names):
                yield start, None, text, (f"bad_csv: {len(fields)} fields where the header has {len(names)} "
                                          f"({', '.join(names)}){'; an unclosed quote runs to line ' + str(line) if line > start else ''}")
            else:
                yield start, dict(zip(names, fields)), "", ""
