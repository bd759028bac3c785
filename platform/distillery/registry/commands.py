"""`distillery registry ...`: look at runs and their lineage, register model versions, move aliases.

    distillery registry list [--stage S] [--limit N] [--json]     runs, newest first
    distillery registry show RUN [--json]                         one run (id or unique 6+ char prefix)
    distillery registry lineage RUN [--json]                      the runs behind it, down to corpus files
    distillery registry add PATH [PATH ...]                       record run.json files (a run dir or the file)
    distillery registry register NAME PATH [--run RUN] [--alias A] [--note N]
    distillery registry alias NAME ALIAS VERSION                  create or move an alias
    distillery registry resolve NAME[@ALIAS|@VERSION] [--json]    the path a reference serves
    distillery registry models | versions NAME | events [NAME]

Every subcommand takes `--dir DIR` (default `$DISTILLERY_REGISTRY`, else `~/.distillery/registry`)
and `--mlflow-uri URI` (mirror writes to MLflow). Unknown runs, names, versions or aliases exit
with status 2 and one `error: ...` line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from distillery.registry.mlflow_mirror import MlflowNotInstalled
from distillery.registry.store import Registry, default_root, parse_ref

EXIT_ERROR = 2
SHORT = 12  # characters of a run id or hash shown in tables: unique in practice, and short enough to read
MAX_CELL = 60


# --------------------------------------------------------------------------- parser


def add_registry_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `registry` and its subcommands to the top-level CLI's subparsers; returns its parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", default=None, metavar="DIR",
                        help="registry directory (default: $DISTILLERY_REGISTRY, else ~/.distillery/registry)")
    common.add_argument("--mlflow-uri", default=None, metavar="URI", help="also mirror writes to this MLflow tracking URI")

    p = subparsers.add_parser("registry", help="runs, their lineage back to corpus files, model versions and aliases",
                              description="Runs, their lineage back to corpus files, model versions and aliases.")
    sub = p.add_subparsers(dest="registry_command", required=True, metavar="SUBCOMMAND")

    s = sub.add_parser("list", parents=[common], help="runs, newest first")
    s.add_argument("--stage", help="only this stage (prepare, generate, finetune, distill, ...)")
    s.add_argument("--limit", type=int, default=20, help="at most N runs (default 20; 0: all)")
    s.add_argument("--json", action="store_true", help="print the records as JSON")

    s = sub.add_parser("show", parents=[common], help="one run: inputs, outputs, metrics")
    s.add_argument("run", metavar="RUN", help="run id or a unique prefix of at least 6 characters")
    s.add_argument("--json", action="store_true", help="print the whole record as JSON")

    s = sub.add_parser("lineage", parents=[common], help="the tree of runs behind a run, down to corpus files")
    s.add_argument("run", metavar="RUN", help="run id or a unique prefix of at least 6 characters")
    s.add_argument("--json", action="store_true", help="print the tree as JSON")

    s = sub.add_parser("add", parents=[common], help="record run.json files (e.g. of runs made with registry.record off)")
    s.add_argument("paths", nargs="+", metavar="PATH", help="a run.json file or a directory holding one")

    s = sub.add_parser("register", parents=[common], help="add a model version (a run directory links its run)")
    s.add_argument("name", metavar="NAME")
    s.add_argument("path", metavar="PATH", help="model directory, run directory or export")
    s.add_argument("--run", help="the run that produced it (default: found from PATH's run.json or content hash)")
    s.add_argument("--alias", help="move this alias (e.g. champion, canary) to the new version")
    s.add_argument("--note", help="free text kept with the version")

    s = sub.add_parser("alias", parents=[common], help="create or move an alias")
    s.add_argument("name", metavar="NAME")
    s.add_argument("alias", metavar="ALIAS")
    s.add_argument("version", metavar="VERSION")

    s = sub.add_parser("resolve", parents=[common], help="the path NAME, NAME@ALIAS or NAME@VERSION stands for")
    s.add_argument("ref", metavar="NAME[@REF]")
    s.add_argument("--json", action="store_true", help="print name, version, path, run and hash as JSON")

    s = sub.add_parser("models", parents=[common], help="model names, latest version and aliases")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("versions", parents=[common], help="every version of a model")
    s.add_argument("name", metavar="NAME")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("events", parents=[common], help="registrations, alias moves and deploy events, newest first")
    s.add_argument("name", nargs="?", metavar="NAME", help="only events about this model")
    s.add_argument("--limit", type=int, default=20, help="at most N events (default 20; 0: all)")
    s.add_argument("--json", action="store_true")
    return p


def run_registry_command(args: argparse.Namespace) -> int:
    """Run the parsed `registry` subcommand; returns the exit status (2 with one `error:` line on
    stderr for unknown runs, names, versions, aliases or unreadable paths)."""
    handler = _HANDLERS[args.registry_command]
    try:
        registry = Registry(args.dir or default_root(), mlflow_uri=getattr(args, "mlflow_uri", None))
        return handler(registry, args)
    except (KeyError, ValueError, FileNotFoundError, NotADirectoryError, MlflowNotInstalled) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except sqlite3.Error as e:
        print(f"error: registry {args.dir or default_root()}: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_ERROR


# --------------------------------------------------------------------------- formatting


def _short(value: Any) -> str:
    return str(value)[:SHORT] if value else "-"


def _when(iso: Any, fmt: str = "%Y-%m-%d %H:%M") -> str:
    """An ISO time as `YYYY-MM-DD HH:MM` (UTC, as recorded)."""
    try:
        return datetime.fromisoformat(str(iso)).strftime(fmt)
    except ValueError:
        return str(iso or "-")


def _cell(value: Any, width: int = MAX_CELL, keep_end: bool = True) -> str:
    """One table cell; long text keeps its end (the informative part of a path) or its start."""
    text = "-" if value is None or value == "" else str(value)
    if len(text) <= width:
        return text
    return "..." + text[-(width - 3):] if keep_end else text[:width - 3] + "..."


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    # Cells are shown whole (paths are for copying); callers shorten free text and hashes.
    cells = [["-" if c is None or c == "" else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def _dump(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str, ensure_ascii=False))


def _produced(record: dict[str, Any]) -> str:
    outputs = record.get("outputs") or {}
    if outputs.get("model"):
        return f"model {_short(outputs['model'])}"
    if outputs.get("data_fingerprint"):
        return f"data {_short(outputs['data_fingerprint'])}"
    n = len(outputs.get("artifacts") or {})
    return f"{n} file{'s' * (n != 1)}" if n else "-"


def _inline(values: dict[str, Any], limit: int = 8) -> str:
    items = [f"{k}={_number(v)}" for k, v in list(values.items())[:limit]]
    return "  ".join(items) + (f"  (+{len(values) - limit} more)" if len(values) > limit else "")


def _number(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, str) and len(v) >= 32 and all(c in "0123456789abcdef" for c in v):
        return _short(v)  # a content hash or run id
    return _cell(v if not isinstance(v, (dict, list)) else json.dumps(v), 40)


# --------------------------------------------------------------------------- subcommands


def _cmd_list(reg: Registry, args: argparse.Namespace) -> int:
    limit = args.limit if args.limit and args.limit > 0 else None
    runs = reg.list_runs(stage=args.stage, limit=limit)
    if args.json:
        _dump(runs)
        return 0
    if not runs:
        print(f"no {args.stage + ' ' if args.stage else ''}runs in {reg.root}")
        return 0
    print(_table(["RUN", "STAGE", "CREATED", "PRODUCED", "OUTPUT"],
                 [[_short(r["run_id"]), r.get("stage"), _when(r.get("created")), _produced(r), r.get("output_dir")] for r in runs]))
    total = reg.count_runs(args.stage)
    if total > len(runs):
        print(f"({len(runs)} of {total} runs; --limit 0 for all)")
    return 0


def _producer_note(reg: Registry, content_hash: str, run_id: str) -> str:
    p = reg.producer_of(content_hash)
    if p is None:
        return "(no known run produced it)"
    return "(this run)" if p["run_id"] == run_id else f"<- {p.get('stage')} {_short(p['run_id'])}"


def _cmd_show(reg: Registry, args: argparse.Namespace) -> int:
    r = reg.get_run(args.run)
    if args.json:
        _dump(r)
        return 0
    rid = r["run_id"]
    lines = [("run", rid), ("stage", r.get("stage")), ("created", r.get("created")), ("output", r.get("output_dir")),
             ("config", f"sha256 {_short(r.get('config_sha256'))}  seed {r.get('seed', '-')}")]
    inputs, outputs = r.get("inputs") or {}, r.get("outputs") or {}
    for key, label in (("data_fingerprint", "data"), ("model", "model"), ("teachers", "teacher"), ("models", "model")):
        values = inputs.get(key)
        for h in values if isinstance(values, list) else [values]:
            if h:
                lines.append(("inputs", f"{label} {_short(h)} {_producer_note(reg, h, rid)}"))
    files = inputs.get("corpus_files") or []
    if files:
        lines.append(("inputs", f"{len(files)} corpus file{'s' * (len(files) != 1)} (lineage lists them)"))
    for key, label in (("model", "model"), ("data_fingerprint", "data")):
        if outputs.get(key):
            lines.append(("outputs", f"{label} {outputs[key]}"))
    if outputs.get("artifacts"):
        lines.append(("outputs", f"{len(outputs['artifacts'])} artifact file(s): {', '.join(list(outputs['artifacts'])[:4])}"))
    if r.get("metrics"):
        lines.append(("metrics", _inline(r["metrics"])))
    if r.get("packages"):
        lines.append(("packages", ", ".join(f"{k} {v}" for k, v in r["packages"].items())))
    registered = [f"{m['name']} v{v['version']}" + (f" ({', '.join(v['aliases'])})" if v["aliases"] else "")
                  for m in reg.models() for v in reg.versions(m["name"]) if v["run_id"] == rid]
    if registered:
        lines.append(("registered", ", ".join(registered)))
    label_width = max(len(k) for k, _ in lines)
    previous = None
    for key, value in lines:
        print(f"{(key if key != previous else ''):<{label_width}}  {value if value is not None else '-'}")
        previous = key
    return 0


def _lineage_lines(node: dict[str, Any], depth: int, label: str, shown: set[str], out: list[str]) -> None:
    """Indented lines for one lineage node and (once per run) everything behind it."""
    pad = "  " * depth
    head = f"{pad}{label}{node.get('stage')} {_short(node['run_id'])}"
    if node.get("cycle"):
        out.append(f"{head}  (cycle: already above)")
        return
    if node["run_id"] in shown:
        out.append(f"{head}  (see above)")
        return
    shown.add(node["run_id"])
    out.append(f"{head}  {node.get('output_dir') or '-'}")
    for i in node.get("inputs", []):
        role = "data" if i["role"] == "data_fingerprint" else i["role"]
        if i.get("run"):
            _lineage_lines(i["run"], depth + 1, f"{role} {_short(i['hash'])} <- ", shown, out)
        else:
            out.append(f"{pad}  {role} {_short(i['hash'])}  (no known run produced it)")
    for f in node.get("corpus_files", []):
        line = f"{pad}  corpus {f.get('path')}  sha256 {_short(f.get('sha256'))}"
        if f.get("run"):
            _lineage_lines(f["run"], depth + 1, line.strip() + " <- ", shown, out)
        else:
            out.append(line)


def _cmd_lineage(reg: Registry, args: argparse.Namespace) -> int:
    tree = reg.lineage(args.run)
    if args.json:
        _dump(tree)
        return 0
    lines: list[str] = []
    _lineage_lines(tree, 0, "", set(), lines)
    print("\n".join(lines))
    return 0


def _cmd_add(reg: Registry, args: argparse.Namespace) -> int:
    for p in map(Path, args.paths):
        path = p / "run.json" if p.is_dir() else p
        if not path.is_file():
            raise FileNotFoundError(f"{p}: no run.json there")
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
        run_id = reg.record_run(record)
        print(f"recorded {record.get('stage')} run {_short(run_id)} from {path}")
    return 0


def _linked_run(reg: Registry, path: Path, model_hash: str | None) -> tuple[str | None, str]:
    """The run behind a model path, and how it was found: the run.json beside the model (run
    directory or export), else the run whose output model has this content hash."""
    run_json = path / "run.json"
    if run_json.is_file():
        try:
            rid = json.loads(run_json.read_text(encoding="utf-8")).get("run_id")
        except (json.JSONDecodeError, AttributeError):
            rid = None
        if isinstance(rid, str) and rid:
            try:
                return reg.resolve_run_id(rid), "from its run.json"
            except KeyError:
                pass  # a run the registry never recorded: try the content hash
    if model_hash:
        producer = reg.producer_of(model_hash)
        if producer is not None:
            return producer["run_id"], "by content hash"
    return None, ""


def _cmd_register(reg: Registry, args: argparse.Namespace) -> int:
    from distillery.models.load import model_identity

    path = Path(args.path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"register: path not found: {args.path}")
    try:
        model_hash = model_identity(path)["hash"]
    except (FileNotFoundError, NotADirectoryError):
        model_hash = None  # not a Hugging Face directory (e.g. a single-file export): kept by path only
    if args.run:
        run_id, how = reg.resolve_run_id(args.run), "as given"
    else:
        run_id, how = _linked_run(reg, path, model_hash)
    version = reg.register(args.name, path, run_id=run_id, model_hash=model_hash, alias=args.alias, note=args.note)
    details = [f"run {_short(run_id)} ({how})" if run_id else "no run linked"]
    if model_hash:
        details.append(f"hash {_short(model_hash)}")
    if args.alias:
        details.append(f"alias {args.alias}")
    print(f"registered {args.name} version {version}: {os.path.abspath(path)} ({', '.join(details)})")
    return 0


def _cmd_alias(reg: Registry, args: argparse.Namespace) -> int:
    before = next((v["version"] for v in reg.versions(args.name) if args.alias in v["aliases"]), None)
    reg.set_alias(args.name, args.alias, args.version)
    moved = f" (was {before})" if before is not None else " (new)"
    print(f"{args.name}@{args.alias} -> version {int(args.version)}{moved}")
    return 0


def _cmd_resolve(reg: Registry, args: argparse.Namespace) -> int:
    name, ref = parse_ref(args.ref)
    found = reg.resolve(name, ref)
    if args.json:
        _dump(found)
    else:
        print(found["path"])
    return 0


def _cmd_models(reg: Registry, args: argparse.Namespace) -> int:
    models = reg.models()
    if args.json:
        _dump(models)
        return 0
    if not models:
        print(f"no models registered in {reg.root}")
        return 0
    print(_table(["NAME", "LATEST", "VERSIONS", "ALIASES", "UPDATED"],
                 [[m["name"], m["latest"], m["versions"], " ".join(f"{a}={v}" for a, v in m["aliases"].items()),
                   _when(m["updated"])] for m in models]))
    return 0


def _cmd_versions(reg: Registry, args: argparse.Namespace) -> int:
    versions = reg.versions(args.name)
    if args.json:
        _dump(versions)
        return 0
    print(_table(["VERSION", "CREATED", "RUN", "HASH", "ALIASES", "PATH", "NOTE"],
                 [[v["version"], _when(v["created"]), _short(v["run_id"]), _short(v["model_hash"]), " ".join(v["aliases"]),
                   v["path"], _cell(v["note"], 40)] for v in versions]))
    return 0


def _cmd_events(reg: Registry, args: argparse.Namespace) -> int:
    events = reg.events(args.name, limit=args.limit if args.limit and args.limit > 0 else None)
    if args.json:
        _dump(events)
        return 0
    if not events:
        print(f"no events{' about ' + args.name if args.name else ''} in {reg.root}")
        return 0
    print(_table(["TIME", "KIND", "NAME", "DETAIL"],
                 [[_when(e["time"], "%Y-%m-%d %H:%M:%S"), e["kind"], e["name"],
                   _cell(_inline({k: v for k, v in e["detail"].items() if v is not None}), 100, keep_end=False)]
                  for e in events]))
    return 0


_HANDLERS: dict[str, Callable[[Registry, argparse.Namespace], int]] = {
    "list": _cmd_list, "show": _cmd_show, "lineage": _cmd_lineage, "add": _cmd_add, "register": _cmd_register,
    "alias": _cmd_alias, "resolve": _cmd_resolve, "models": _cmd_models, "versions": _cmd_versions, "events": _cmd_events,
}
