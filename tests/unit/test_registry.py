"""The lineage registry on a real SQLite file: records, prefixes, the lineage walk back to corpus
files, versions and aliases, the append-only event log, several processes writing at once, and the
`distillery registry` commands."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sqlite3
import uuid

import pytest

from distillery.registry.commands import add_registry_parser, run_registry_command
from distillery.registry.store import Ambiguous, NotFound, Registry, parse_ref


def h(label: str) -> str:
    """A stable fake content hash."""
    import hashlib

    return hashlib.sha256(label.encode()).hexdigest()


def record(stage: str, created: str, inputs: dict | None = None, outputs: dict | None = None, **extra) -> dict:
    return {"run_id": uuid.uuid4().hex, "stage": stage, "created": created, "output_dir": f"/runs/{stage}",
            "config_sha256": h("cfg"), "seed": 0, "packages": {"distillery": "0.1.0"},
            "inputs": {"data_fingerprint": None, "model": None, "teachers": [], **(inputs or {})},
            "outputs": outputs or {}, "metrics": {"loss": 1.0}, **extra}


@pytest.fixture
def reg(tmp_path) -> Registry:
    return Registry(tmp_path / "registry")


# --------------------------------------------------------------------------- runs


def test_record_get_prefix_and_list(reg):
    a = record("prepare", "2026-01-01T00:00:00Z", outputs={"data_fingerprint": h("data")})
    b = record("finetune", "2026-01-02T00:00:00Z", inputs={"data_fingerprint": h("data")}, outputs={"model": h("m")})
    assert reg.record_run(a) == a["run_id"] and reg.record_run(b) == b["run_id"]
    assert reg.get_run(a["run_id"]) == a
    assert reg.get_run(b["run_id"][:8])["stage"] == "finetune"
    assert [r["run_id"] for r in reg.list_runs()] == [b["run_id"], a["run_id"]]
    assert [r["stage"] for r in reg.list_runs(stage="prepare")] == ["prepare"]
    assert len(reg.list_runs(limit=1)) == 1
    assert reg.producer_of(h("m"))["run_id"] == b["run_id"] and reg.producer_of(h("none")) is None

    # Same run_id again replaces the record and its output index.
    reg.record_run({**b, "outputs": {"model": h("m2")}})
    assert reg.producer_of(h("m")) is None and reg.producer_of(h("m2"))["run_id"] == b["run_id"]
    assert len(reg.list_runs()) == 2

    # A record without run_id or created gets both; the caller's dict is left alone.
    bare = {"stage": "eval", "inputs": {}, "outputs": {}}
    rid = reg.record_run(bare)
    assert "run_id" not in bare and reg.get_run(rid)["created"].endswith("Z")

    with pytest.raises(NotFound, match="no run 'ffffffffff'"):
        reg.get_run("ffffffffff")
    with pytest.raises(KeyError, match="at least 6"):
        reg.get_run("abc")
    with pytest.raises(ValueError, match="stage"):
        reg.record_run({"run_id": "x" * 32})


def test_ambiguous_prefix_names_the_candidates(reg):
    for suffix in ("1", "2"):
        reg.record_run(record("eval", "2026-01-01T00:00:00Z") | {"run_id": "abcdef" + suffix * 26})
    with pytest.raises(Ambiguous, match="'abcdef' matches several runs"):
        reg.get_run("abcdef")
    assert reg.get_run("abcdef1")["run_id"] == "abcdef" + "1" * 26


# --------------------------------------------------------------------------- lineage


def chain(reg: Registry) -> dict[str, dict]:
    """corpus A -> prepare0 -> finetune (the teacher); prompts P -> generate (teacher) -> rows G;
    G + corpus B -> prepare1 -> distill (student init has no run) -> export."""
    corpus_a = {"path": "/data/a.jsonl", "sha256": h("a"), "source": "a"}
    corpus_b = {"path": "/data/b.jsonl", "sha256": h("b"), "source": "b"}
    prompts = {"path": "/data/prompts.jsonl", "sha256": h("p"), "source": "p"}
    runs = {
        "prepare0": record("prepare", "2026-01-01T00:00:00Z", inputs={"corpus_files": [corpus_a]},
                           outputs={"data_fingerprint": h("fp0"), "artifacts": {"manifest.json": h("man0")}}),
        "finetune": record("finetune", "2026-01-02T00:00:00Z", inputs={"data_fingerprint": h("fp0"), "model": h("base")},
                           outputs={"model": h("teacher")}),
        "generate": record("generate", "2026-01-03T00:00:00Z", inputs={"teachers": [h("teacher")], "corpus_files": [prompts]},
                           outputs={"artifacts": {"generated.jsonl": h("rows")}}),
        "prepare1": record("prepare", "2026-01-04T00:00:00Z",
                           inputs={"corpus_files": [{"path": "/runs/gen/generated.jsonl", "sha256": h("rows"), "source": "gen"}, corpus_b]},
                           outputs={"data_fingerprint": h("fp1")}),
        "distill": record("distill", "2026-01-05T00:00:00Z",
                          inputs={"data_fingerprint": h("fp1"), "model": h("student-init"), "teachers": [h("teacher")]},
                          outputs={"model": h("student")}),
        "export": record("export", "2026-01-06T00:00:00Z", inputs={"model": h("student")}, outputs={"model": h("int8")}),
    }
    for r in runs.values():
        reg.record_run(r)
    return runs


def test_lineage_reaches_the_corpus_files_and_the_teachers_own_run(reg):
    runs = chain(reg)
    tree = reg.lineage(runs["export"]["run_id"][:10])
    assert tree["stage"] == "export" and tree["outputs"] == {"model": h("int8")}
    (model_in,) = tree["inputs"]
    distill = model_in["run"]
    assert model_in["role"] == "model" and distill["run_id"] == runs["distill"]["run_id"]
    roles = {(i["role"], i["hash"]): i["run"] for i in distill["inputs"]}
    assert roles[("model", h("student-init"))] is None  # no run produced the student's initial weights: a leaf
    teacher = roles[("teacher", h("teacher"))]
    assert teacher["stage"] == "finetune" and teacher["run_id"] == runs["finetune"]["run_id"]
    prepare1 = roles[("data_fingerprint", h("fp1"))]
    assert prepare1["run_id"] == runs["prepare1"]["run_id"]
    generated = prepare1["corpus_files"][0]
    assert generated["run"]["stage"] == "generate" and generated["run"]["inputs"][0]["run"] is teacher

    everything = reg.corpus_files(runs["export"]["run_id"])
    assert [(f["path"], f["sha256"]) for f in everything] == [
        ("/runs/gen/generated.jsonl", h("rows")), ("/data/prompts.jsonl", h("p")), ("/data/a.jsonl", h("a")), ("/data/b.jsonl", h("b"))]
    assert everything[0]["produced_by"] == runs["generate"]["run_id"]
    raw = reg.corpus_files(runs["export"]["run_id"], roots_only=True)
    assert {(f["path"], f["sha256"]) for f in raw} == {("/data/prompts.jsonl", h("p")), ("/data/a.jsonl", h("a")), ("/data/b.jsonl", h("b"))}
    assert reg.corpus_files(runs["finetune"]["run_id"]) == [{"path": "/data/a.jsonl", "sha256": h("a"), "source": "a"}]
    json.dumps(tree)  # the tree is plain JSON


def test_lineage_is_cycle_safe(reg):
    # Two runs that each claim the other's output as input (bad records, or a hash collision).
    a = record("finetune", "2026-01-01T00:00:00Z", inputs={"model": h("b-out")}, outputs={"model": h("a-out")})
    b = record("distill", "2026-01-02T00:00:00Z", inputs={"model": h("a-out")}, outputs={"model": h("b-out")})
    # A run whose input is its own output must not lead to itself.
    c = record("tune", "2026-01-03T00:00:00Z", inputs={"model": h("c")}, outputs={"model": h("c")})
    for r in (a, b, c):
        reg.record_run(r)
    tree = reg.lineage(b["run_id"])
    a_node = tree["inputs"][0]["run"]
    assert a_node["run_id"] == a["run_id"]
    assert a_node["inputs"][0]["run"] == {"run_id": b["run_id"], "stage": "distill", "cycle": True}
    assert reg.lineage(c["run_id"])["inputs"][0]["run"] is None


# --------------------------------------------------------------------------- versions, aliases, events


def test_register_alias_resolve_and_parse_ref(reg, tmp_path):
    run = record("export", "2026-01-01T00:00:00Z", outputs={"model": h("x")})
    reg.record_run(run)
    assert reg.register("support-bot", tmp_path / "v1", run_id=run["run_id"], model_hash=h("x"), alias="champion") == 1
    assert reg.register("support-bot", str(tmp_path / "v2"), note="retrained") == 2
    assert reg.resolve("support-bot", "champion") == {"name": "support-bot", "version": 1, "path": str(tmp_path / "v1"),
                                                      "run_id": run["run_id"], "model_hash": h("x")}
    assert reg.resolve("support-bot")["version"] == 2 and reg.resolve("support-bot", "latest")["version"] == 2
    assert reg.resolve("support-bot", 1)["path"] == reg.resolve("support-bot", "1")["path"]
    reg.set_alias("support-bot", "champion", 2)
    reg.set_alias("support-bot", "canary", 1)
    assert reg.resolve("support-bot", "champion")["version"] == 2
    assert [v["aliases"] for v in reg.versions("support-bot")] == [["canary"], ["champion"]]
    assert reg.models() == [{"name": "support-bot", "latest": 2, "versions": 2, "updated": reg.versions("support-bot")[1]["created"],
                             "aliases": {"canary": 1, "champion": 2}}]

    with pytest.raises(KeyError, match=r"no alias 'stable': versions 1, 2; aliases canary=1, champion=2"):
        reg.resolve("support-bot", "stable")
    with pytest.raises(KeyError, match="no version 9"):
        reg.resolve("support-bot", 9)
    with pytest.raises(KeyError, match="no model named 'nobody'.*known: support-bot"):
        reg.resolve("nobody")
    with pytest.raises(KeyError, match="no version 5"):
        reg.set_alias("support-bot", "canary", 5)
    for bad in ("", "a/b", "a:b", "a@b"):
        with pytest.raises(ValueError, match="model name"):
            reg.register(bad, tmp_path)
    for bad in ("3", "v3", "latest"):
        with pytest.raises(ValueError, match="would read as a version"):
            reg.set_alias("support-bot", bad, 1)

    assert parse_ref("support-bot@champion") == ("support-bot", "champion")
    assert parse_ref("support-bot@3") == ("support-bot", 3)
    assert parse_ref("registry:support-bot") == ("support-bot", None)
    for bad in ("@x", "a@", "a@b@c", "a/b@c"):
        with pytest.raises(ValueError):
            parse_ref(bad)


def test_events_are_append_only(reg, tmp_path):
    reg.register("bot", tmp_path, alias="canary")
    reg.register("bot", tmp_path)
    reg.set_alias("bot", "canary", 2)
    reg.log_event("rollback", "bot", {"from": 2, "to": 1})
    reg.log_event("note", None)
    events = reg.events()
    assert [e["kind"] for e in events] == ["note", "rollback", "alias", "register", "alias", "register"]
    assert events[2]["detail"] == {"alias": "canary", "old": 1, "new": 2}
    assert events[4]["detail"] == {"alias": "canary", "old": None, "new": 1}
    assert [e["kind"] for e in reg.events("bot", limit=2)] == ["rollback", "alias"]
    conn = sqlite3.connect(reg.path)
    for sql in ("UPDATE events SET kind = 'x'", "DELETE FROM events"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute(sql)
    conn.close()
    assert len(reg.events()) == 6


# --------------------------------------------------------------------------- concurrent writers


def _writer(root: str, worker: int, start, results) -> None:
    reg = Registry(root)
    start.wait()  # every process writes at the same time
    versions = []
    for i in range(50):
        reg.record_run({"run_id": f"{worker:02d}{i:030d}", "stage": "finetune", "created": "2026-01-01T00:00:00Z",
                        "outputs": {"model": f"{worker:02d}{i:062d}"}})
        if i % 5 == 0:
            versions.append(reg.register("shared", f"/models/{worker}/{i}", run_id=f"{worker:02d}{i:030d}"))
    results.put(versions)


def test_concurrent_writers_lose_nothing(tmp_path):
    root = str(tmp_path / "registry")
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(root, w, start, results)) for w in range(4)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    reg = Registry(root)
    assert reg.count_runs() == 200 and len({r["run_id"] for r in reg.list_runs()}) == 200
    assert sorted(v for vs in got for v in vs) == list(range(1, 41))
    assert all(vs == sorted(vs) for vs in got)
    assert [v["version"] for v in reg.versions("shared")] == list(range(1, 41))
    assert len(reg.events("shared")) == 40
    assert reg.producer_of(f"03{49:062d}")["run_id"] == f"03{49:030d}"


def test_threads_share_one_registry(reg):
    import threading

    def write(t: int) -> None:
        for i in range(20):
            reg.record_run({"run_id": f"t{t}-{i}", "stage": "eval"})
        reg.register("threads", f"/m/{t}")

    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reg.count_runs() == 80 and [v["version"] for v in reg.versions("threads")] == [1, 2, 3, 4]


# --------------------------------------------------------------------------- MLflow mapping (no mlflow needed)


def test_mirror_without_mlflow_is_a_clear_error(tmp_path, monkeypatch):
    import importlib.util

    from distillery.registry.mlflow_mirror import MlflowNotInstalled

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(MlflowNotInstalled, match=r"mlflow_uri is set \(sqlite:///x.db\).*pip install 'distillery\[mlflow\]'"):
        Registry(tmp_path, mlflow_uri="sqlite:///x.db")


def test_mlflow_params_metrics_and_tags_from_a_record():
    from distillery.registry.mlflow_mirror import mlflow_key, run_metrics, run_params, run_tags

    rec = {"run_id": "r" * 32, "stage": "tune", "seed": 1, "config_sha256": "c",
           "settings": {"train": {"lr": 0.001, "tags": ["a"]}, "seed": 1, "x": {"long": "y" * 7000, "none": None}},
           "metrics": {"loss": 2, "flag": False, "by": {"task": 0.5}, "text": "n/a"},
           "inputs": {"teachers": ["t1", "t2"], "models": []}, "outputs": {"model": "m"}}
    assert run_params(rec) == {"train.lr": "0.001", "train.tags": '["a"]', "seed": "1", "x.long": "y" * 6000,
                               "stage": "tune", "config_sha256": "c"}
    assert run_metrics(rec) == {"loss": 2.0, "by.task": 0.5}
    assert run_tags(rec) == {"distillery.run_id": "r" * 32, "distillery.stage": "tune", "input.teachers": "t1,t2", "output.model": "m"}
    assert mlflow_key("a#b//c") == "a_b__c" and len(mlflow_key("k" * 300)) == 250


# --------------------------------------------------------------------------- CLI


def cli(root, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="distillery")
    add_registry_parser(parser.add_subparsers(dest="command"))
    return run_registry_command(parser.parse_args(["registry", *argv, "--dir", str(root)]))


def test_cli_commands(tmp_path, capsys):
    root = tmp_path / "registry"
    runs = chain(Registry(root))
    export = runs["export"]

    assert cli(root, "list") == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["RUN", "STAGE", "CREATED", "PRODUCED", "OUTPUT"]
    assert export["run_id"][:12] in out.splitlines()[1] and len(out.splitlines()) == 7
    assert cli(root, "list", "--stage", "prepare", "--limit", "1") == 0
    assert "(1 of 2 runs; --limit 0 for all)" in capsys.readouterr().out
    assert cli(root, "list", "--json", "--limit", "0") == 0
    assert len(json.loads(capsys.readouterr().out)) == 6

    assert cli(root, "show", runs["distill"]["run_id"][:8]) == 0
    out = capsys.readouterr().out
    assert f"teacher {h('teacher')[:12]} <- finetune {runs['finetune']['run_id'][:12]}" in out
    assert "(no known run produced it)" in out and "loss=1" in out
    assert cli(root, "show", export["run_id"], "--json") == 0
    assert json.loads(capsys.readouterr().out) == export

    assert cli(root, "lineage", export["run_id"][:8]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"export {export['run_id'][:12]}  /runs/export"
    assert lines[1].startswith(f"  model {h('student')[:12]} <- distill {runs['distill']['run_id'][:12]}")
    assert f"      corpus /data/b.jsonl  sha256 {h('b')[:12]}" in lines  # under prepare1, under distill
    assert any(line.endswith("(see above)") for line in lines) and len(lines) < 20
    assert cli(root, "lineage", export["run_id"], "--json") == 0
    assert json.loads(capsys.readouterr().out)["run_id"] == export["run_id"]

    # A run directory with run.json links its run; the alias moves with an event.
    run_dir = tmp_path / "runs" / "export"
    (run_dir / "model").mkdir(parents=True)
    (run_dir / "model" / "config.json").write_text("{}")
    (run_dir / "run.json").write_text(json.dumps({"run_id": export["run_id"], "stage": "export"}))
    assert cli(root, "register", "bot", str(run_dir), "--alias", "canary", "--note", "first") == 0
    assert f"registered bot version 1: {run_dir} (run {export['run_id'][:12]} (from its run.json)" in capsys.readouterr().out
    assert cli(root, "register", "bot", str(run_dir / "model")) == 0  # no run.json here and no run made this hash
    assert "no run linked" in capsys.readouterr().out
    assert cli(root, "alias", "bot", "canary", "2") == 0
    assert capsys.readouterr().out.strip() == "bot@canary -> version 2 (was 1)"
    assert cli(root, "resolve", "bot@canary") == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "model")
    assert cli(root, "models") == 0 and "canary=2" in capsys.readouterr().out
    assert cli(root, "versions", "bot") == 0 and len(capsys.readouterr().out.splitlines()) == 3
    assert cli(root, "events", "bot") == 0
    assert [line.split()[2] for line in capsys.readouterr().out.splitlines()[1:]] == ["alias", "register", "alias", "register"]

    # `add` records a run.json written while the registry was off.
    late = record("eval", "2026-02-01T00:00:00Z", inputs={"models": [h("int8")]})
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "run.json").write_text(json.dumps(late))
    assert cli(root, "add", str(tmp_path / "eval")) == 0
    assert Registry(root).lineage(late["run_id"])["inputs"][0]["run"]["run_id"] == export["run_id"]
    capsys.readouterr()

    for argv, message in [(["resolve", "bot@stable"], "error: model 'bot' has no alias 'stable'"),
                          (["alias", "bot", "stable", "9"], "error: model 'bot' has no version 9"),
                          (["show", "0123456789"], "error: no run '0123456789'"),
                          (["versions", "nobody"], "error: no model named 'nobody'"),
                          (["register", "bot", str(tmp_path / "missing")], "error: register: path not found")]:
        assert cli(root, *argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(message) and len(err.strip().splitlines()) == 1, err


def test_finish_stage_records_unless_registry_record_is_off(tmp_path):
    from distillery.config import load_config
    from distillery.registry.record import finish_stage, new_record

    for record_on in (True, False):
        root = tmp_path / f"reg-{record_on}"
        cfg = load_config(overrides=[f"registry.dir={root}", f"registry.record={str(record_on).lower()}"])
        out = tmp_path / f"out-{record_on}"
        out.mkdir()
        rec = finish_stage(cfg, new_record(cfg, "prepare", out, inputs={}, outputs={"data_fingerprint": "ab" * 32}))
        assert json.loads((out / "run.json").read_text())["run_id"] == rec["run_id"]
        assert Registry(root).count_runs() == (1 if record_on else 0)
