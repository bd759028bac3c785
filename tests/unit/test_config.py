"""Config schema: YAML loading, dotted overrides, and errors that name the key and the file."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from distillery.config import (
    Config,
    ConfigError,
    apply_override,
    check_paths,
    explain,
    load_config,
    parse_override,
    write_resolved,
)


def _write(tmp_path, text: str):
    p = tmp_path / "cfg.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_defaults_and_sections():
    cfg = load_config()
    assert cfg.method.kind == "full"
    assert cfg.distill.teacher_mode == "online"
    assert cfg.train.strategy == "fsdp"
    assert cfg.prepared_dir == "runs/default/data"
    assert cfg.teacher_cache_dir == "runs/default/data/teacher_cache"


def test_yaml_and_overrides_are_type_checked(tmp_path):
    p = _write(
        tmp_path,
        """
output_dir: out
data:
  sources:
    - {path: a.jsonl, format: instruction, weight: 7}
    - {path: b.jsonl, format: chat, weight: 2}
method: {kind: lora}
""",
    )
    cfg = load_config(p, ["train.lr=3e-5", "method.lora.r=16", "data.sources.0.weight=0.7", "method.lora.target_modules=[q_proj, k_proj]"])
    assert cfg.train.lr == pytest.approx(3e-5) and isinstance(cfg.train.lr, float)
    assert cfg.method.lora.r == 16
    assert cfg.data.sources[0].weight == pytest.approx(0.7)
    assert cfg.data.sources[1].format == "chat"
    assert cfg.method.lora.target_modules == ["q_proj", "k_proj"]
    assert cfg.prepared_dir == "out/data"


def test_unknown_key_names_key_and_file(tmp_path):
    p = _write(tmp_path, "train:\n  lr: 1e-4\n  learning_rate: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "train.learning_rate" in str(e.value) and str(p) in str(e.value)


def test_wrong_type_names_key_and_file(tmp_path):
    p = _write(tmp_path, "train:\n  batch_size: many\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "train.batch_size" in str(e.value) and str(p) in str(e.value)


def test_bad_literal_names_key(tmp_path):
    p = _write(tmp_path, "method: {kind: qlora}\n")
    with pytest.raises(ConfigError, match="method.kind"):
        load_config(p)


def test_bad_override_type_names_key(tmp_path):
    p = _write(tmp_path, "{}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["train.num_workers=two"])
    assert "train.num_workers" in str(e.value) and "overrides" in str(e.value)


def test_unknown_override_key(tmp_path):
    with pytest.raises(ConfigError, match="distill.temprature"):
        load_config(_write(tmp_path, "{}\n"), ["distill.temprature=2"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr", "key=value"),
        ("=3", "empty key"),
        ("train..lr=3", "empty key"),
        ("data.sources.3.weight=1", "index 3 is past the end"),
        ("data.sources.x.weight=1", "use a number"),
        ("data.sources.0.path.x=1", "is a value, not a section"),
        ("seed.value=1", "key .seed.: Input should be a valid integer"),
        ("train.lr=[1, 2", "not valid YAML"),
    ],
)
def test_malformed_overrides(tmp_path, override, message):
    p = _write(tmp_path, "data:\n  sources:\n    - {path: a.jsonl}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(p, [override])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "train: [\n"))


def test_fractions_must_leave_training_rows(tmp_path):
    with pytest.raises(ConfigError, match="val_fraction \\+ test_fraction"):
        load_config(_write(tmp_path, "data: {val_fraction: 0.6, test_fraction: 0.4}\n"))


def test_check_paths_names_missing_inputs(tmp_path):
    (tmp_path / "real.jsonl").write_text("{}\n")
    cfg = load_config(
        _write(
            tmp_path,
            f"""
data:
  sources:
    - {{path: {tmp_path}/real.jsonl}}
    - {{path: {tmp_path}/missing.jsonl}}
    - {{path: "{tmp_path}/*.parquet"}}
    - {{path: "s3://bucket/corpus/*.jsonl"}}
""",
        )
    )
    with pytest.raises(ConfigError) as e:
        check_paths(cfg, ["data.sources", "model.path"])
    text = str(e.value)
    assert "data.sources.1.path" in text and "missing.jsonl" in text
    assert "data.sources.2.path" in text and "no file matches" in text
    assert "data.sources.0" not in text and "data.sources.3" not in text  # exists / URI left to the reader
    assert "model.path: not set" in text


def test_every_field_is_documented():
    rows = explain()
    keys = [r[0] for r in rows]
    for required in [
        "output_dir", "seed", "data.sources.path", "data.sources.format", "data.sources.weight", "data.sources.name",
        "data.max_length", "data.val_fraction", "data.test_fraction", "data.dedupe", "data.augment", "data.prepared",
        "model.path", "model.teacher", "method.kind", "method.lora.r", "method.lora.alpha", "method.lora.dropout",
        "method.lora.target_modules", "method.freeze.trainable_layers", "distill.loss", "distill.temperature",
        "distill.alpha", "distill.teacher_mode", "distill.top_k", "train.num_workers", "train.use_gpu",
        "train.strategy", "train.epochs", "train.max_steps", "train.batch_size", "train.grad_accum", "train.lr",
        "train.scheduler", "train.warmup_steps", "train.max_grad_norm", "train.eval_every", "train.checkpoint_every",
        "train.max_failures", "tune.num_samples", "tune.metric", "tune.mode", "tune.search_space",
        "tune.max_concurrent_trials", "serve.models", "serve.host", "serve.port", "serve.api_key_env",
    ]:
        assert required in keys, required
    undocumented = [r[0] for r in rows if not r[3].strip()]
    assert undocumented == []


def test_ewc_lambda_alias(tmp_path):
    cfg = load_config(_write(tmp_path, "train:\n  ewc: {lambda: 0.5}\n"))
    assert cfg.train.ewc.lam == 0.5
    assert "lambda: 0.5" in cfg.to_yaml()


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(overrides=["output_dir=x", "distill.loss=jsd", "data.sources=[{path: a.jsonl, format: text}]"])
    path = write_resolved(cfg, tmp_path / "run")
    again = load_config(path)
    assert again == cfg
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_apply_override_creates_sections():
    tree: dict = {}
    apply_override(tree, *parse_override("train.ewc.lambda=0.1"))
    assert tree == {"train": {"ewc": {"lambda": 0.1}}}
    assert Config.model_validate(tree).train.ewc.lam == 0.1


@pytest.mark.parametrize("override, words", [
    ("distill.temperature_schedule={kind: linear, end: 0}", "temperature_schedule.end must be above 0"),
    ("distill.temperature_schedule={kind: linear, end: -1.5}", "temperature_schedule.end must be above 0"),
    ("distill.alpha_schedule={kind: linear, end: 1.2}", "alpha_schedule.end must be in [0, 1]"),
    ("distill.alpha_schedule={kind: cosine, end: -0.1}", "alpha_schedule.end must be in [0, 1]"),
    ("distill.alpha=1.5", "distill.alpha"),
    ("data.window={size: 64, stride: 65}", "stride (65) must be at most size (64)"),
    ("data.min_length=600", "min_length (600) is above max_length (512)"),
    ("serve.autoscaling={min_replicas: 3, max_replicas: 2}", "min_replicas (3) is above max_replicas (2)"),
    ("serve.api_key_file=/k", "api_key_env or api_key_file, not both"),
    ("distill.stages=[{steps: 5}]", "stages and alpha_schedule do not combine"),
    ("distill.stages=[{steps: 5, hidden_weight: 1}]", "stages set hidden_weight but distill.hidden is not set"),
])
def test_ranges_that_break_runs_later_fail_at_load(override, words):
    extra = ["serve.api_key_env=KEY"] if "api_key_file" in override else []
    extra += ["distill.alpha_schedule={kind: linear, end: 0.2}"] if "steps: 5}" in override else []
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override, *extra])
    assert words in str(e.value)


def test_edge_values_of_the_ranges_load():
    cfg = load_config(overrides=["distill.temperature_schedule={kind: linear, end: 0.5}", "distill.alpha_schedule={kind: linear, end: 0}",
                                 "data.window={size: 64, stride: 64}", "data.min_length=512",
                                 "serve.autoscaling={min_replicas: 2, max_replicas: 2}"])
    assert cfg.distill.alpha_schedule.end == 0 and cfg.data.window.stride == 64


def test_back_translation_gpu_share_is_bounded():
    base = {"data": {"augment": {"copies": 1, "back_translate": {"model": "m"}}}}
    assert Config.model_validate(base).data.augment.back_translate.num_gpus == 0
    base["data"]["augment"]["back_translate"]["num_gpus"] = 1
    assert Config.model_validate(base).data.augment.back_translate.num_gpus == 1
    base["data"]["augment"]["back_translate"]["num_gpus"] = 2
    with pytest.raises(ValidationError):
        Config.model_validate(base)
