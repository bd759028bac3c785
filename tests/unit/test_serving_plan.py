"""How `distillery serve` turns a config into engines, LLM configs and keys (no Ray, no engine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from distillery.config import Config, ConfigError
from distillery.serving.app import llm_config, plan_engines, plan_serving, read_api_key
from distillery.serving.server import ADAPTERS_KEY, MAX_LEN_KEY
from distillery.serving.ingress import ApiKeyGuard, key_digest


def fake_model(path: Path, max_pos: int = 1024) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": max_pos}))
    return path


def fake_lora_run(run: Path, base: Path, r: int = 8) -> Path:
    (run / "model").mkdir(parents=True)
    (run / "model" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base), "r": r}))
    (run / "config.yaml").write_text("method: {kind: lora}\n")
    return run


def cfg_for(models: list[dict], **serve) -> Config:
    return Config.model_validate({"serve": {"models": models, **serve}})


def test_adapters_join_their_base_and_full_models_get_their_own_engine(tmp_path):
    base = fake_model(tmp_path / "teacher")
    student_run = tmp_path / "distill-run"
    fake_model(student_run / "model")
    a = fake_lora_run(tmp_path / "run-a", base, r=8)
    b = fake_lora_run(tmp_path / "run-b", base, r=24)
    engines = plan_engines(cfg_for([{"path": str(a)}, {"path": str(student_run), "name": "student"},
                                    {"path": str(b), "name": "legal"}]))
    by_id = {e.model_id: e for e in engines}
    assert set(by_id) == {"teacher", "student"}
    assert by_id["teacher"].adapters == {"run-a": str((a / "model").resolve()), "legal": str((b / "model").resolve())}
    assert by_id["teacher"].max_lora_rank == 24
    assert by_id["student"].path == str((student_run / "model").resolve()) and not by_id["student"].adapters


def test_base_named_in_config_keeps_its_name(tmp_path):
    base = fake_model(tmp_path / "teacher")
    run = fake_lora_run(tmp_path / "run", base)
    engines = plan_engines(cfg_for([{"path": str(base), "name": "big"}, {"path": str(run), "name": "tuned"}]))
    assert [(e.model_id, list(e.adapters)) for e in engines] == [("big", ["tuned"])]


def test_versions_become_engines_and_adapters_with_routes(tmp_path):
    from distillery.serving.app import plan_serving

    base = fake_model(tmp_path / "teacher")
    v2 = fake_model(tmp_path / "v2")
    lora = fake_lora_run(tmp_path / "lora", base)
    engines, routes = plan_serving(cfg_for([
        {"name": "bot", "versions": [{"path": str(base), "weight": 0.9}, {"path": str(v2), "weight": 0.1, "role": "canary"}]},
        {"name": "tuned", "versions": [{"path": str(base)}, {"path": str(lora), "role": "shadow"}]},
    ]))
    assert {e.model_id for e in engines} == {"bot@v1", "bot@v2"}
    assert [(v.label, v.model_id, v.weight, v.role) for v in routes["bot"]] == [
        ("v1", "bot@v1", 0.9, "stable"), ("v2", "bot@v2", 0.1, "canary")]
    # The second name's stable version is the same directory: the same engine, under its first id.
    assert [(v.model_id, v.role) for v in routes["tuned"]] == [("bot@v1", "stable"), ("bot@v1:tuned@v2", "shadow")]
    with pytest.raises(ConfigError, match="serve.models.1.versions.0.path"):
        plan_serving(cfg_for([{"path": str(base)}, {"name": "x", "versions": [{"path": str(tmp_path / "nope")}]}]))


def test_bad_models_fail_naming_the_key(tmp_path):
    base = fake_model(tmp_path / "m")
    with pytest.raises(ConfigError, match=r"serve.models.1.*used twice"):
        plan_engines(cfg_for([{"path": str(base), "name": "x"}, {"path": str(fake_model(tmp_path / "n")), "name": "x"}]))
    with pytest.raises(ConfigError, match=r"serve.models.0.*':'"):
        plan_engines(cfg_for([{"path": str(base), "name": "a:b"}]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"serve.models.0.path"):
        plan_engines(cfg_for([{"path": str(tmp_path / "empty")}]))
    orphan = fake_lora_run(tmp_path / "orphan", tmp_path / "gone")
    with pytest.raises(ConfigError, match=r"serve.models.0.path: the adapter's base"):
        plan_engines(cfg_for([{"path": str(orphan)}]))


def test_llm_config_on_gpus(tmp_path):
    """GPU engines get tensor parallelism, their GPU share and the accelerator type; none of it on CPU."""
    base = fake_model(tmp_path / "m", max_pos=512)
    cfg = cfg_for([{"path": str(base)}], tensor_parallel_size=2, gpu_memory_utilization=0.7, accelerator_type="L4", device="gpu")
    (engine,) = plan_engines(cfg)
    lc = llm_config(cfg, engine, use_gpu=True)
    assert lc.engine_kwargs["tensor_parallel_size"] == 2 and lc.engine_kwargs["gpu_memory_utilization"] == 0.7
    assert lc.accelerator_type == "L4" and "enforce_eager" not in lc.engine_kwargs
    plain = llm_config(cfg_for([{"path": str(base)}]), engine, use_gpu=False)
    assert not {"tensor_parallel_size", "gpu_memory_utilization"} & set(plain.engine_kwargs) and plain.accelerator_type is None


def test_llm_config_carries_batching_limits_autoscaling_and_lora(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    base = fake_model(tmp_path / "teacher", max_pos=512)
    run = fake_lora_run(tmp_path / "run", base, r=24)
    cfg = cfg_for([{"path": str(run), "name": "tuned"}], max_num_seqs=8, max_num_batched_tokens=512,
                  max_ongoing_requests=5, max_queued_requests=7, overload_status=429, retry_after_s=3,
                  autoscaling={"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4})
    (engine,) = plan_engines(cfg)
    lc = llm_config(cfg, engine, use_gpu=False)
    assert lc.engine_kwargs["max_num_seqs"] == 8 and lc.engine_kwargs["max_num_batched_tokens"] == 512
    assert lc.engine_kwargs["enable_lora"] is True and lc.engine_kwargs["max_lora_rank"] == 32
    assert lc.engine_kwargs["dtype"] == "float32"
    assert lc.runtime_env["env_vars"]["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert lc.runtime_env["env_vars"]["VLLM_LOGGING_LEVEL"] == "WARNING"  # no engine-config wall on the terminal
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    assert llm_config(cfg, engine, use_gpu=False).runtime_env["env_vars"]["VLLM_LOGGING_LEVEL"] == "DEBUG"
    d = lc.deployment_config
    assert (d["max_ongoing_requests"], d["max_queued_requests"]) == (5, 7)
    assert d["backpressure_config"] == {"status_code": 429, "retry_after_s": 3}
    assert d["autoscaling_config"]["max_replicas"] == 3 and d["autoscaling_config"]["target_ongoing_requests"] == 4
    assert lc.experimental_configs[ADAPTERS_KEY] == {"tuned": str((run / "model").resolve())}
    assert lc.experimental_configs[MAX_LEN_KEY] == 512  # from the model when serve.max_model_len is unset


def test_latency_target_sets_admission_and_the_latency_autoscaling_policy(tmp_path):
    m = fake_model(tmp_path / "m")
    cfg = cfg_for([{"path": str(m)}], max_num_seqs=24, latency_target_ms=80, latency_metric="ttft",
                  autoscaling={"min_replicas": 1, "max_replicas": 4})
    (engine,) = plan_engines(cfg)
    d = llm_config(cfg, engine, use_gpu=False).deployment_config
    assert d["user_config"] == {"latency_target_ms": 80, "latency_metric": "ttft", "max_admitted": 24}
    assert d["autoscaling_config"]["policy"] == {"policy_function": "distillery.serving.autoscale:latency_policy"}
    plain = llm_config(cfg_for([{"path": str(m)}]), engine, use_gpu=False).deployment_config
    assert "user_config" not in plain and "policy" not in plain["autoscaling_config"]
    with pytest.raises(ValidationError, match="latency_metric is set but latency_target_ms is not"):
        cfg_for([{"path": str(m)}], latency_metric="ttft")
    with pytest.raises(ValidationError, match="target_ongoing_requests and latency_target_ms"):
        cfg_for([{"path": str(m)}], latency_target_ms=80, autoscaling={"target_ongoing_requests": 4})


def test_probe_needs_a_canary_and_a_readable_file(tmp_path):
    from distillery.serving.probe import load_probe, passes

    m = fake_model(tmp_path / "m")
    two = [{"path": str(m)}, {"path": str(m), "role": "canary"}]
    good = tmp_path / "probe.jsonl"
    good.write_text('{"prompt": "2+2?", "answer": "4"}\n\n{"prompt": "Capital of France?", "answer": "Paris"}\n')
    assert load_probe(good) == [("2+2?", "4"), ("Capital of France?", "Paris")]
    assert passes("The answer is  PARIS.", "paris") and not passes("Lyon", "Paris")
    with pytest.raises(ValidationError, match="give `versions` with a `role: canary`"):
        cfg_for([{"name": "bot", "versions": two[:1], "probe": {"file": str(good)}}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "2+2?", "answer": "4"}\n{"prompt": "no answer"}\n')
    with pytest.raises(ConfigError, match=r"serve.models.0.probe.file: .*bad.jsonl line 2: needs a string `prompt`"):
        plan_engines(cfg_for([{"name": "bot", "versions": two, "probe": {"file": str(bad)}}]))
    with pytest.raises(ConfigError, match=r"serve.models.0.probe.file: cannot read"):
        plan_engines(cfg_for([{"name": "bot", "versions": two, "probe": {"file": str(tmp_path / "none.jsonl")}}]))
    engines, routes = plan_serving(cfg_for([{"name": "bot", "versions": two, "probe": {"file": str(good)}}]))
    assert [v.role for v in routes["bot"]] == ["stable", "canary"]


def test_api_key_from_env_or_file_never_from_config(tmp_path, monkeypatch):
    m = fake_model(tmp_path / "m")
    assert read_api_key(cfg_for([{"path": str(m)}])) is None
    monkeypatch.setenv("DISTILLERY_TEST_KEY", "  abc  ")
    assert read_api_key(cfg_for([{"path": str(m)}], api_key_env="DISTILLERY_TEST_KEY")) == "abc"
    with pytest.raises(ConfigError, match="serve.api_key_env: environment variable UNSET_KEY_X"):
        read_api_key(cfg_for([{"path": str(m)}], api_key_env="UNSET_KEY_X"))
    (tmp_path / "key").write_text("from-file\nignored\n")
    assert read_api_key(cfg_for([{"path": str(m)}], api_key_file=str(tmp_path / "key"))) == "from-file"
    with pytest.raises(ConfigError, match="serve.api_key_file"):
        read_api_key(cfg_for([{"path": str(m)}], api_key_file=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="unknown key 'serve.api_key'"):
        from distillery.config import load_config

        cfg_file = tmp_path / "c.yaml"
        cfg_file.write_text("serve: {api_key: secret}\n")
        load_config(cfg_file)


def test_api_key_guard_compares_digests():
    import asyncio

    calls: list[int] = []

    async def app(scope, receive, send):
        calls.append(1)

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def run(headers):
        guard = ApiKeyGuard(app, key_digest("k1"))
        await guard({"type": "http", "headers": headers}, None, send)

    asyncio.run(run([(b"authorization", b"Bearer k1")]))
    assert calls == [1] and not sent
    asyncio.run(run([(b"authorization", b"Bearer k2")]))
    asyncio.run(run([]))
    assert calls == [1]
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [401, 401]


def test_reachable_host_needs_a_key_or_an_explicit_opt_out(tmp_path):
    m = str(fake_model(tmp_path / "m"))
    with pytest.raises(Exception, match="reachable from other machines"):
        Config.model_validate({"serve": {"models": [{"path": m}], "host": "0.0.0.0"}})
    Config.model_validate({"serve": {"models": [{"path": m}], "host": "0.0.0.0", "api_key_env": "K"}})
    Config.model_validate({"serve": {"models": [{"path": m}], "host": "0.0.0.0", "allow_unauthenticated": True}})
    Config.model_validate({"serve": {"models": [{"path": m}], "host": "127.0.0.2"}})


def test_body_limit_counts_declared_and_streamed_bytes():
    import asyncio

    from distillery.serving.ingress import BodyLimit

    seen: list[bytes] = []

    async def app(scope, receive, send):
        seen.append((await receive())["body"])

    def run(headers, chunks):
        sent: list[dict] = []
        queue = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

        async def receive():
            return queue.pop(0)

        async def send(message):
            sent.append(message)

        asyncio.run(BodyLimit(app, 100)({"type": "http", "headers": headers}, receive, send))
        return [m["status"] for m in sent if m["type"] == "http.response.start"]

    assert run([(b"content-length", b"101")], [b"x" * 101]) == [413]
    assert run([], [b"x" * 60, b"y" * 60]) == [413]  # chunked: refused once the bytes pass the limit
    assert run([], [b"x" * 60, b"y" * 40]) == [] and seen == [b"x" * 60 + b"y" * 40]  # handed on whole


def test_private_ingress_hooks_still_exist_in_ray():
    """The private Ray methods DistilleryIngress overrides (ray_compat.INGRESS_PRIVATE_HOOKS) exist
    on the Ray classes that define them, and the subclass overrides no other private Ray method:
    a Ray upgrade that renames one fails here, not in production."""
    import importlib

    from distillery import ray_compat as rc
    from distillery.serving.ingress import DistilleryIngress

    owners = {}
    for name, (module, cls) in rc.INGRESS_PRIVATE_HOOKS.items():
        owners[name] = getattr(importlib.import_module(module), cls)
        assert callable(getattr(owners[name], name, None)), f"{module}.{cls}.{name}"
    ray_classes = {c for c in owners.values()} | {rc.OpenAiIngress}
    overridden = {n for n in vars(DistilleryIngress) if n.startswith("_") and not n.startswith("__")
                  and any(callable(getattr(c, n, None)) for c in ray_classes)}
    assert overridden == set(rc.INGRESS_PRIVATE_HOOKS)
