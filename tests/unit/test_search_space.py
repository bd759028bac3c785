"""Search spaces are validated against the config schema before any trial starts."""

from __future__ import annotations

import pytest

from distillery.config import ConfigError, load_config
from distillery.tune.space import to_tune_space, validate_search_space, with_values


@pytest.fixture
def base():
    return load_config(overrides=["method.kind=lora"])


def test_valid_space_and_tune_domains(base):
    space = {
        "method.lora.r": {"choice": [4, 8, 16, 32]},
        "distill.temperature": {"uniform": [1.0, 6.0]},
        "distill.alpha": {"uniform": [0.2, 0.9]},
        "train.lr": {"loguniform": [1e-5, 1e-3]},
        "train.warmup_steps": {"randint": [0, 10]},
    }
    checked = validate_search_space(base, space)
    domains = to_tune_space(checked)
    assert set(domains) == set(space)
    assert sorted(domains["method.lora.r"].categories) == [4, 8, 16, 32]
    assert domains["train.warmup_steps"].upper == 11  # inclusive high
    cfg = with_values(base, {"method.lora.r": 16, "distill.temperature": 3.5})
    assert cfg.method.lora.r == 16 and cfg.distill.temperature == 3.5


@pytest.mark.parametrize(
    "space, message",
    [
        ({"distill.temprature": {"uniform": [1, 2]}}, "distill.temprature"),
        ({"method.lora.r": {"choice": [8, 0]}}, r"method.lora.r: value 0"),
        ({"distill.alpha": {"uniform": [0.5, 1.5]}}, r"distill.alpha: value 1.5"),
        ({"train.lr": {"loguniform": [0, 1e-3]}}, "bounds must be positive"),
        ({"train.lr": {"normal": [0, 1]}}, "unknown domain 'normal'"),
        ({"train.lr": {"uniform": [2, 1]}}, "must be below"),
        ({"train.warmup_steps": {"randint": [0, 2.5]}}, "integers"),
        ({"train.lr": [1, 2]}, "expected one of"),
        ({}, "empty"),
    ],
)
def test_bad_spaces_fail_naming_the_key(base, space, message):
    with pytest.raises(ConfigError, match=message):
        validate_search_space(base, space)


def test_shipped_tuning_space_validates(repo_root):
    cfg = load_config(repo_root / "tuning" / "kd_search.yaml", ["method.kind=lora"])
    assert validate_search_space(cfg, cfg.tune.search_space)


def test_trials_read_the_users_data_not_their_own_output_dir(tmp_path, monkeypatch):
    """A trial's own output_dir must not move the prepared data or the teacher cache it reads:
    both are fixed (absolute) from the config the user gave before the trials start."""
    from distillery.tune.search import trial_base

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "student").mkdir(parents=True)
    base = trial_base(load_config(overrides=["output_dir=runs/x", "model.path=models/student", "model.teacher=org/hub-id"]))
    trial = with_values(base, {"output_dir": str(tmp_path / "runs/x/tune/trials/t1")})
    assert trial.prepared_dir == str(tmp_path / "runs/x/data")
    assert trial.teacher_cache_dir == str(tmp_path / "runs/x/data/teacher_cache")
    assert trial.model.path == str(tmp_path / "models/student")
    assert trial.model.teacher == "org/hub-id"  # not a local path: left as given
    explicit = trial_base(load_config(overrides=["data.prepared=/data/p", "distill.cache=/data/c"]))
    assert (explicit.prepared_dir, explicit.teacher_cache_dir) == ("/data/p", "/data/c")
