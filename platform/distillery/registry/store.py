"""The registry's store: run records, the content-hash index that joins them into a lineage, model
versions, aliases and an append-only event log, in one SQLite database, `<root>/registry.db`.

Several processes may write at once (stages of parallel jobs, Ray workers, a serving deployment
logging a rollback): the database runs in WAL mode, so readers never block the writer, and every
write is one `BEGIN IMMEDIATE` transaction, which takes the write lock up front and waits for it
(busy timeout) instead of failing half way. Each call opens its own connection, so a `Registry`
can be shared by threads and survives `fork`. SQLite's locking needs a local file system: keep
`root` off NFS.

Tables:

    meta            key PK, value                          schema version
    runs            run_id PK, stage, created, output_dir, record (the whole record, JSON)
    outputs         hash, kind, run_id                     what each run produced: kind `model`,
                                                           `data_fingerprint` or `artifact` (sha256)
    model_versions  name, version, run_id, path, model_hash, created, note     PK (name, version)
    aliases         name, alias, version, updated          PK (name, alias); moving one is an upsert
    events          id, time, kind, name, detail (JSON)    append-only (triggers refuse UPDATE/DELETE)

`runs.created` is the record's `created` normalised to UTC with microseconds, so that text order is
time order; the record itself keeps what the stage wrote.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

SCHEMA_VERSION = 1
DB_NAME = "registry.db"
BUSY_TIMEOUT_S = 60.0
MIN_PREFIX = 6
# Inputs that name content hashes, in the order a lineage lists them; `teachers` and `models` are lists.
HASH_INPUTS = ("data_fingerprint", "model", "teachers", "models")
FILE_INPUTS = ("corpus_files", "source_prompts")
ROLE = {"teachers": "teacher", "models": "model"}
_LOOKS_LIKE_HASH = re.compile(r"^[0-9a-fA-F]{16,128}$")
_RESERVED_ALIAS = re.compile(r"^(latest|v?\d+)$", re.IGNORECASE)  # would read as a version (MLflow refuses the same)

# Connections inherited through fork: kept referenced, never closed, in the child.
_FORKED: list[sqlite3.Connection] = []

_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS runs (
        run_id TEXT PRIMARY KEY,
        stage TEXT NOT NULL,
        created TEXT NOT NULL,
        output_dir TEXT,
        record TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS runs_created ON runs (created)",
    "CREATE INDEX IF NOT EXISTS runs_stage_created ON runs (stage, created)",
    """CREATE TABLE IF NOT EXISTS outputs (
        hash TEXT NOT NULL,
        kind TEXT NOT NULL,
        run_id TEXT NOT NULL,
        PRIMARY KEY (hash, kind, run_id))""",
    "CREATE INDEX IF NOT EXISTS outputs_run ON outputs (run_id)",
    """CREATE TABLE IF NOT EXISTS model_versions (
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        run_id TEXT,
        path TEXT NOT NULL,
        model_hash TEXT,
        created TEXT NOT NULL,
        note TEXT,
        PRIMARY KEY (name, version))""",
    """CREATE TABLE IF NOT EXISTS aliases (
        name TEXT NOT NULL,
        alias TEXT NOT NULL,
        version INTEGER NOT NULL,
        updated TEXT NOT NULL,
        PRIMARY KEY (name, alias))""",
    """CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        time TEXT NOT NULL,
        kind TEXT NOT NULL,
        name TEXT,
        detail TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS events_name ON events (name, id)",
    """CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
        BEGIN SELECT RAISE(ABORT, 'the events table is append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
        BEGIN SELECT RAISE(ABORT, 'the events table is append-only'); END""",
]


class NotFound(KeyError):
    """A run, model name, version or alias the registry does not hold. The message names what was
    asked and what exists (`str()` gives it without KeyError's quotes)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Ambiguous(ValueError):
    """A run id prefix that matches more than one run."""


def default_root() -> Path:
    """`$DISTILLERY_REGISTRY`, else `~/.distillery/registry`."""
    return Path(os.path.expanduser(os.environ.get("DISTILLERY_REGISTRY") or "~/.distillery/registry"))


def parse_ref(text: str) -> tuple[str, str | int | None]:
    """`NAME`, `NAME@ALIAS` or `NAME@VERSION` (an optional `registry:` prefix is dropped) as
    (name, alias | version | None). ValueError naming `text` when it is malformed."""
    body = text[len("registry:"):] if text.startswith("registry:") else text
    name, sep, ref = body.partition("@")
    if not name or (sep and not ref) or "@" in ref:
        raise ValueError(f"'{text}' is not a model reference: expected NAME, NAME@ALIAS or NAME@VERSION")
    validate_name(name)
    if not sep:
        return name, None
    return (name, int(ref)) if ref.isdigit() else (name, ref)


def validate_name(name: str) -> str:
    """`name` when it can be a model name: non-empty, no surrounding spaces, no '/', ':' or '@'
    (they separate names from aliases and paths in `registry:NAME@ALIAS`)."""
    if not isinstance(name, str) or not name or name != name.strip() or any(c in name for c in "/:@"):
        raise ValueError(f"model name {name!r} must be non-empty, without surrounding spaces, '/', ':' or '@'")
    return name


def validate_alias(alias: str) -> str:
    """`alias` when it can be an alias: a model name that cannot be read as a version (`3`, `v3`)
    and is not `latest` (which always means the newest version)."""
    if not isinstance(alias, str) or not alias or alias != alias.strip() or any(c in alias for c in "/:@"):
        raise ValueError(f"alias {alias!r} must be non-empty, without surrounding spaces, '/', ':' or '@'")
    if _RESERVED_ALIAS.match(alias):
        raise ValueError(f"alias {alias!r} would read as a version: 'latest', '3' and 'v3' are reserved")
    return alias


def now_iso() -> str:
    """The current UTC time, ISO 8601 with microseconds and `Z` (fixed width: text order is time order)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _sortable_time(value: Any, what: str) -> str:
    """An ISO 8601 time as fixed-width UTC text; naive times are taken as UTC."""
    try:
        t = datetime.fromisoformat(str(value))
    except ValueError:
        raise ValueError(f"{what}: {value!r} is not an ISO 8601 time") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _produced(record: dict[str, Any]) -> list[tuple[str, str]]:
    """(hash, kind) for every content hash a record's outputs name."""
    outputs = record.get("outputs") or {}
    out = [(outputs[k], k) for k in ("model", "data_fingerprint") if isinstance(outputs.get(k), str) and outputs[k]]
    artifacts = outputs.get("artifacts") or {}
    if isinstance(artifacts, dict):
        out += [(h, "artifact") for h in artifacts.values() if isinstance(h, str) and h]
    return sorted(set(out))


def _input_hashes(inputs: dict[str, Any]) -> list[tuple[str, str]]:
    """(role, hash) for every content hash a record's inputs name: the known keys first, then any
    other key whose value looks like a hash (a stage may add inputs this module does not know)."""
    keys = [k for k in HASH_INPUTS if k in inputs] + sorted(k for k in inputs if k not in HASH_INPUTS and k not in FILE_INPUTS)
    out: list[tuple[str, str]] = []
    for key in keys:
        value = inputs[key]
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and v and (key in HASH_INPUTS or _LOOKS_LIKE_HASH.match(v)):
                out.append((ROLE.get(key, key), v))
    return out


class Registry:
    """The registry under `root` (created on first use). With `mlflow_uri`, every recorded run,
    registered version and alias move is mirrored to MLflow after the local commit; a mirror that
    fails is reported on stderr and the local write stands."""

    def __init__(self, root: str | os.PathLike[str], mlflow_uri: str | None = None) -> None:
        self.root = Path(root).expanduser()
        self.path = self.root / DB_NAME
        self.mlflow_uri = mlflow_uri
        self._mirror = None
        if mlflow_uri:
            from distillery.registry.mlflow_mirror import MlflowMirror

            self._mirror = MlflowMirror(mlflow_uri)
        self._local = threading.local()
        self.root.mkdir(parents=True, exist_ok=True)
        self._init_schema()

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    def __getstate__(self) -> dict[str, Any]:
        # Connections stay with the process and thread that opened them; a copy opens its own.
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    # ----------------------------------------------------------------------- connections

    def _open(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; each write says BEGIN IMMEDIATE itself.
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=True)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        # In WAL mode NORMAL syncs at checkpoints, not at every commit: a commit survives a crash of
        # the process, and a power cut can only roll back the newest commits, never corrupt the file
        # (each stage's run.json keeps its record either way; `registry add` re-records it).
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use. One per thread rather than per call:
        closing the last connection to a WAL database checkpoints and syncs it, which would make
        every call pay for a full sync. A process forked from this one opens its own (SQLite
        connections must not cross a fork)."""
        pid, conn = getattr(self._local, "conn", (None, None))
        if conn is None or pid != os.getpid():
            if conn is not None:
                _FORKED.append(conn)  # the parent's; closing it here could disturb the parent's locks
            conn = self._open()
            self._local.conn = (os.getpid(), conn)
        return conn

    def _discard(self) -> None:
        pid, conn = getattr(self._local, "conn", (None, None))
        self._local.conn = (None, None)
        if conn is not None and pid == os.getpid():
            try:
                conn.close()
            except sqlite3.Error:
                pass

    def close(self) -> None:
        """Close this thread's connection (others close when their threads' objects are freed)."""
        self._discard()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: the write lock is taken at BEGIN (waiting up to the busy timeout),
        so a transaction never fails half way for another writer."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            self._rollback(conn)
            raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: a consistent snapshot for queries that take several statements."""
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            self._rollback(conn)

    def _rollback(self, conn: sqlite3.Connection) -> None:
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            self._discard()  # a connection that cannot roll back is not reused

    def _init_schema(self) -> None:
        """Create the tables once; a registry already at this schema is only read here, so that
        resolving a model from a registry needs no write lock."""
        conn = self._conn()
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                # Switching to WAL needs a moment without other connections; several processes
                # opening a new registry at once can meet here. The mode is persistent once set.
                deadline = time.monotonic() + BUSY_TIMEOUT_S
                while True:
                    try:
                        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                        break
                    except sqlite3.OperationalError as e:
                        if "locked" not in str(e) or time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)
                if mode.lower() != "wal":
                    raise RuntimeError(f"registry {self.path}: SQLite could not switch to WAL mode (got {mode!r}); "
                                       "is it on a network file system?")
            try:
                row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            except sqlite3.OperationalError:  # no meta table: a new registry
                row = None
        except BaseException:
            self._discard()
            raise
        if row is not None and int(row[0]) == SCHEMA_VERSION:
            return
        with self._write() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise RuntimeError(f"registry {self.path} has schema version {row[0]}, newer than this Distillery's "
                                   f"{SCHEMA_VERSION}: upgrade Distillery to use it")

    def _mirror_call(self, what: str, fn, *args: Any, **kwargs: Any) -> None:
        """Run a mirror call after the local commit; a failure is a warning, never lost local data."""
        if self._mirror is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # the local registry is the source of truth; MLflow is a copy
            import logging

            logging.getLogger(__name__).warning("registry: could not mirror %s to MLflow (%s): %s: %s",
                                                what, self._mirror.tracking_uri, type(e).__name__, e)

    # ----------------------------------------------------------------------- runs

    def record_run(self, record: dict[str, Any]) -> str:
        """Store a run record (the whole dict, as JSON) and index the content hashes its outputs
        name. A record without `run_id` gets a new one, without `created` the current time; the
        caller's dict is not changed. Recording the same run_id again replaces the record.
        Returns the run_id."""
        if not isinstance(record, dict):
            raise TypeError(f"a run record is a dict, got {type(record).__name__}")
        stage = record.get("stage")
        if not isinstance(stage, str) or not stage:
            raise ValueError(f"run record {record.get('run_id', '(no run_id)')}: 'stage' must be a non-empty string, got {stage!r}")
        record = dict(record)
        run_id = record.setdefault("run_id", uuid.uuid4().hex)
        if not isinstance(run_id, str) or not run_id or run_id != run_id.strip():
            raise ValueError(f"run record: 'run_id' must be a non-empty string without spaces, got {run_id!r}")
        record.setdefault("created", now_iso())
        created = _sortable_time(record["created"], f"run {run_id}: 'created'")
        output_dir = record.get("output_dir")
        text = json.dumps(record, default=str, ensure_ascii=False)
        with self._write() as conn:
            conn.execute(
                """INSERT INTO runs (run_id, stage, created, output_dir, record) VALUES (?, ?, ?, ?, ?)
                   ON CONFLICT (run_id) DO UPDATE SET stage = excluded.stage, created = excluded.created,
                   output_dir = excluded.output_dir, record = excluded.record""",
                (run_id, stage, created, None if output_dir is None else str(output_dir), text),
            )
            conn.execute("DELETE FROM outputs WHERE run_id = ?", (run_id,))
            conn.executemany("INSERT INTO outputs (hash, kind, run_id) VALUES (?, ?, ?)",
                             [(h, kind, run_id) for h, kind in _produced(record)])
        self._mirror_call(f"run {run_id}", lambda: self._mirror.record_run(json.loads(text)))
        return run_id

    def _find_run_id(self, conn: sqlite3.Connection, run_id_or_prefix: str) -> str:
        asked = str(run_id_or_prefix).strip()
        if not asked:
            raise ValueError("no run id given")
        if conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (asked,)).fetchone():
            return asked
        if len(asked) < MIN_PREFIX:
            raise NotFound(f"no run '{asked}' in the registry at {self.root} (a prefix needs at least {MIN_PREFIX} characters)")
        # A range scan on the primary key: every id that starts with `asked` sorts between these two.
        rows = conn.execute("SELECT run_id, stage FROM runs WHERE run_id >= ? AND run_id < ? ORDER BY run_id LIMIT 6",
                            (asked, asked + "\U0010ffff")).fetchall()
        if not rows:
            raise NotFound(f"no run '{asked}' in the registry at {self.root}")
        if len(rows) > 1:
            shown = ", ".join(f"{r['run_id'][:12]} ({r['stage']})" for r in rows[:5])
            raise Ambiguous(f"run id prefix '{asked}' matches several runs: {shown}{', ...' if len(rows) > 5 else ''}; give more characters")
        return rows[0]["run_id"]

    def resolve_run_id(self, run_id_or_prefix: str) -> str:
        """The full run id of a run id or unique prefix (at least 6 characters)."""
        with self._read() as conn:
            return self._find_run_id(conn, run_id_or_prefix)

    def get_run(self, run_id_or_prefix: str) -> dict[str, Any]:
        """The record of a run, by id or unique prefix of at least 6 characters. NotFound (a
        KeyError) when no run matches, Ambiguous (a ValueError) when several do."""
        with self._read() as conn:
            run_id = self._find_run_id(conn, run_id_or_prefix)
            return json.loads(conn.execute("SELECT record FROM runs WHERE run_id = ?", (run_id,)).fetchone()[0])

    def list_runs(self, stage: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Run records, newest first (by `created`, then by recording order), optionally of one stage."""
        sql, args = "SELECT record FROM runs", []
        if stage:
            sql, args = sql + " WHERE stage = ?", [stage]
        sql += " ORDER BY created DESC, rowid DESC"
        if limit is not None and limit > 0:
            sql, args = sql + " LIMIT ?", args + [int(limit)]
        with self._read() as conn:
            return [json.loads(r[0]) for r in conn.execute(sql, args)]

    def count_runs(self, stage: str | None = None) -> int:
        """How many runs the registry holds (of one stage)."""
        with self._read() as conn:
            if stage:
                return conn.execute("SELECT count(*) FROM runs WHERE stage = ?", (stage,)).fetchone()[0]
            return conn.execute("SELECT count(*) FROM runs").fetchone()[0]

    @staticmethod
    def _producer(conn: sqlite3.Connection, content_hash: str, consumer: dict[str, str] | None = None) -> dict[str, Any] | None:
        """The newest run whose outputs include `content_hash`. For a consumer's input, the consumer
        itself is skipped and runs created before it are preferred (a later run can reproduce the
        same content, but did not make this input)."""
        if consumer is None:
            row = conn.execute(
                """SELECT r.record FROM outputs o JOIN runs r ON r.run_id = o.run_id WHERE o.hash = ?
                   ORDER BY r.created DESC, r.rowid DESC LIMIT 1""", (content_hash,)).fetchone()
        else:
            row = conn.execute(
                """SELECT r.record FROM outputs o JOIN runs r ON r.run_id = o.run_id WHERE o.hash = ? AND r.run_id != ?
                   ORDER BY r.created <= ? DESC, r.created DESC, r.rowid DESC LIMIT 1""",
                (content_hash, consumer["run_id"], consumer["created"])).fetchone()
        return json.loads(row[0]) if row else None

    def producer_of(self, content_hash: str) -> dict[str, Any] | None:
        """The record of the newest run whose outputs include `content_hash` (its model, data
        fingerprint or an artifact's sha256), or None."""
        with self._read() as conn:
            return self._producer(conn, content_hash)

    # ----------------------------------------------------------------------- lineage

    def lineage(self, run_id: str) -> dict[str, Any]:
        """The tree of runs behind `run_id` (id or unique prefix):

            {run_id, stage, created, output_dir, outputs: {model?, data_fingerprint?},
             inputs: [{role, hash, run: <node> | None}],      role: data_fingerprint, model, teacher, ...
             corpus_files: [{path, sha256, ..., run: <node> | None}],   when the run read files
             source_prompts: [...]}                             when the record names them

        Each input hash leads to the run that produced it (the newest one created before the
        consumer), recursively; an input no known run produced is a leaf (`run: None`). A corpus
        file produced by a run (say, `generate`'s rows, by sha256) leads to that run the same way.
        A run met again among its own ancestors is a `{run_id, stage, cycle: True}` leaf; a run
        reached by several paths is expanded once and shared."""
        with self._read() as conn:
            root = json.loads(conn.execute("SELECT record FROM runs WHERE run_id = ?",
                                           (self._find_run_id(conn, run_id),)).fetchone()[0])
            done: dict[str, dict[str, Any]] = {}

            def node(record: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
                rid = record["run_id"]
                if rid in path:
                    return {"run_id": rid, "stage": record.get("stage"), "cycle": True}
                if rid in done:
                    return done[rid]
                path = path + (rid,)
                me = {"run_id": rid, "created": _sortable_time(record.get("created") or "1970-01-01", rid)}
                outputs = record.get("outputs") or {}
                inputs = record.get("inputs") or {}
                out: dict[str, Any] = {
                    "run_id": rid, "stage": record.get("stage"), "created": record.get("created"),
                    "output_dir": record.get("output_dir"),
                    "outputs": {k: outputs[k] for k in ("model", "data_fingerprint") if outputs.get(k)},
                    "inputs": [],
                }
                for role, h in _input_hashes(inputs):
                    producer = self._producer(conn, h, me)
                    out["inputs"].append({"role": role, "hash": h, "run": node(producer, path) if producer else None})
                files = inputs.get("corpus_files")
                if isinstance(files, list) and files:
                    out["corpus_files"] = []
                    for f in files:
                        entry = dict(f) if isinstance(f, dict) else {"path": str(f)}
                        sha = entry.get("sha256")
                        producer = self._producer(conn, sha, me) if isinstance(sha, str) and sha else None
                        entry["run"] = node(producer, path) if producer else None
                        out["corpus_files"].append(entry)
                if inputs.get("source_prompts"):
                    out["source_prompts"] = inputs["source_prompts"]
                done[rid] = out
                return out

            return node(root, ())

    def corpus_files(self, run_id: str, roots_only: bool = False) -> list[dict[str, Any]]:
        """Every corpus file in the lineage of `run_id`, once per (path, sha256), in the order the
        walk meets them, as recorded ({path, sha256, ...}) plus `produced_by` (run id) when a
        known run wrote the file (e.g. `generate`'s rows). With `roots_only`, only the files no
        known run produced: the raw corpus the lineage starts from."""
        seen: set[tuple[Any, Any]] = set()
        found: list[dict[str, Any]] = []
        visited: set[int] = set()

        def walk(n: dict[str, Any] | None) -> None:
            if not n or id(n) in visited:
                return
            visited.add(id(n))
            for f in n.get("corpus_files", []):
                key = (f.get("path"), f.get("sha256"))
                if key not in seen:
                    seen.add(key)
                    entry = {k: v for k, v in f.items() if k != "run"}
                    if f.get("run"):
                        entry["produced_by"] = f["run"]["run_id"]
                    if not (roots_only and f.get("run")):
                        found.append(entry)
                walk(f.get("run"))
            for i in n.get("inputs", []):
                walk(i.get("run"))

        walk(self.lineage(run_id))
        return found

    # ----------------------------------------------------------------------- model versions

    def register(self, name: str, path: str | os.PathLike[str], run_id: str | None = None,
                 model_hash: str | None = None, alias: str | None = None, note: str | None = None) -> int:
        """Add a new version of model `name` (versions count 1, 2, ... per name, also under
        concurrent writers) for the model at `path` (stored as an absolute path), optionally linked
        to the run that produced it, and move `alias` to it. Returns the new version number."""
        validate_name(name)
        if alias is not None:
            validate_alias(alias)
        path = os.path.abspath(os.fspath(path))
        created = now_iso()
        with self._write() as conn:
            version = conn.execute("SELECT coalesce(max(version), 0) + 1 FROM model_versions WHERE name = ?", (name,)).fetchone()[0]
            conn.execute("INSERT INTO model_versions (name, version, run_id, path, model_hash, created, note) VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (name, version, run_id, path, model_hash, created, note))
            self._append_event(conn, "register", name, {"version": version, "path": path, "run_id": run_id,
                                                        "model_hash": model_hash, "note": note}, created)
            if alias is not None:
                self._move_alias(conn, name, alias, version, created)
        self._mirror_call(f"{name} version {version}", lambda: self._mirror.register(
            name, version, path, run_id=run_id, model_hash=model_hash, note=note))
        if alias is not None:
            self._mirror_call(f"alias {name}@{alias}", lambda: self._mirror.set_alias(name, alias, version))
        return version

    def _move_alias(self, conn: sqlite3.Connection, name: str, alias: str, version: int, when: str) -> None:
        row = conn.execute("SELECT version FROM aliases WHERE name = ? AND alias = ?", (name, alias)).fetchone()
        conn.execute("""INSERT INTO aliases (name, alias, version, updated) VALUES (?, ?, ?, ?)
                        ON CONFLICT (name, alias) DO UPDATE SET version = excluded.version, updated = excluded.updated""",
                     (name, alias, version, when))
        self._append_event(conn, "alias", name, {"alias": alias, "old": row[0] if row else None, "new": version}, when)

    def set_alias(self, name: str, alias: str, version: int) -> None:
        """Point `alias` of model `name` at `version` (creating or moving it); the move is an event
        with the old and new version."""
        validate_alias(alias)
        version = self._as_version(version)
        with self._write() as conn:
            self._check_version(conn, name, version)
            self._move_alias(conn, name, alias, version, now_iso())
        self._mirror_call(f"alias {name}@{alias}", lambda: self._mirror.set_alias(name, alias, version))

    @staticmethod
    def _as_version(version: Any) -> int:
        if isinstance(version, bool) or not (isinstance(version, int) or (isinstance(version, str) and version.isdigit())):
            raise ValueError(f"a version is a positive integer, got {version!r}")
        return int(version)

    def _known(self, conn: sqlite3.Connection, name: str) -> tuple[list[int], dict[str, int]]:
        versions = [r[0] for r in conn.execute("SELECT version FROM model_versions WHERE name = ? ORDER BY version", (name,))]
        if not versions:
            names = [r[0] for r in conn.execute("SELECT DISTINCT name FROM model_versions ORDER BY name")]
            known = f"known: {', '.join(names)}" if names else "it holds no models yet"
            raise NotFound(f"no model named '{name}' in the registry at {self.root}; {known}")
        aliases = dict(conn.execute("SELECT alias, version FROM aliases WHERE name = ? ORDER BY alias", (name,)).fetchall())
        return versions, aliases

    @staticmethod
    def _describe(versions: list[int], aliases: dict[str, int]) -> str:
        shown = f"{versions[0]}..{versions[-1]}" if len(versions) > 3 else ", ".join(map(str, versions))
        return f"versions {shown}; aliases " + (", ".join(f"{a}={v}" for a, v in aliases.items()) or "none")

    def _check_version(self, conn: sqlite3.Connection, name: str, version: int) -> None:
        versions, aliases = self._known(conn, name)
        if version not in versions:
            raise NotFound(f"model '{name}' has no version {version}: {self._describe(versions, aliases)}")

    def resolve(self, name: str, ref: str | int | None = None) -> dict[str, Any]:
        """The version `ref` of model `name` names: an alias, a version number (int or digits) or
        None / 'latest' for the newest version. Returns {name, version, path, run_id, model_hash}.
        NotFound (a KeyError) listing the known versions and aliases when nothing matches."""
        with self._read() as conn:
            versions, aliases = self._known(conn, name)
            if ref is None or ref == "latest":
                version = versions[-1]
            elif isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
                version = self._as_version(ref)
                if version not in versions:
                    raise NotFound(f"model '{name}' has no version {version}: {self._describe(versions, aliases)}")
            elif ref in aliases:
                version = aliases[ref]
            else:
                raise NotFound(f"model '{name}' has no alias '{ref}': {self._describe(versions, aliases)}")
            row = conn.execute("SELECT name, version, path, run_id, model_hash FROM model_versions WHERE name = ? AND version = ?",
                               (name, version)).fetchone()
            return dict(row)

    def versions(self, name: str) -> list[dict[str, Any]]:
        """Every version of model `name`, oldest first: {name, version, path, run_id, model_hash,
        created, note, aliases: [alias, ...]}. NotFound for an unknown name."""
        with self._read() as conn:
            _, aliases = self._known(conn, name)
            rows = [dict(r) for r in conn.execute(
                "SELECT name, version, path, run_id, model_hash, created, note FROM model_versions WHERE name = ? ORDER BY version", (name,))]
        for r in rows:
            r["aliases"] = [a for a, v in aliases.items() if v == r["version"]]
        return rows

    def models(self) -> list[dict[str, Any]]:
        """Every model name: {name, latest, versions (count), updated (newest version's time),
        aliases: {alias: version}}, by name."""
        with self._read() as conn:
            rows = [dict(r) for r in conn.execute(
                """SELECT name, max(version) AS latest, count(*) AS versions, max(created) AS updated
                   FROM model_versions GROUP BY name ORDER BY name""")]
            aliases: dict[str, dict[str, int]] = {}
            for name, alias, version in conn.execute("SELECT name, alias, version FROM aliases ORDER BY name, alias"):
                aliases.setdefault(name, {})[alias] = version
        for r in rows:
            r["aliases"] = aliases.get(r["name"], {})
        return rows

    # ----------------------------------------------------------------------- events

    @staticmethod
    def _append_event(conn: sqlite3.Connection, kind: str, name: str | None, detail: dict[str, Any] | None, when: str) -> int:
        cur = conn.execute("INSERT INTO events (time, kind, name, detail) VALUES (?, ?, ?, ?)",
                           (when, kind, name, json.dumps(detail or {}, default=str, ensure_ascii=False)))
        return int(cur.lastrowid)

    def log_event(self, kind: str, name: str | None, detail: dict[str, Any] | None = None) -> int:
        """Append an event (e.g. `canary`, `rollback` from a deployment) about model `name`;
        returns its id. Events are never changed or removed."""
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"event kind must be a non-empty string, got {kind!r}")
        with self._write() as conn:
            return self._append_event(conn, kind, name, detail, now_iso())

    def events(self, name: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Events newest first, all or about model `name`: {id, time, kind, name, detail}."""
        sql, args = "SELECT id, time, kind, name, detail FROM events", []
        if name is not None:
            sql, args = sql + " WHERE name = ?", [name]
        sql += " ORDER BY id DESC"
        if limit is not None and limit > 0:
            sql, args = sql + " LIMIT ?", args + [int(limit)]
        with self._read() as conn:
            rows = [dict(r) for r in conn.execute(sql, args)]
        for r in rows:
            r["detail"] = json.loads(r["detail"])
        return rows
