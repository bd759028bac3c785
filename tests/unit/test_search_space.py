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
