"""Search spaces over dotted config keys, validated against the schema before any trial runs.

    tune:
      search_space:
        method.lora.r: {choice: [4, 8, 16, 32]}
        distill.temperature: {uniform: [1.0, 6.0]}
        train.lr: {loguniform: [1.0e-5, 1.0e-3]}
        train.warmup_steps: {randint: [0, 50]}

A domain is a one-key mapping: `choice` (a list of values), `uniform` / `loguniform` ([low, high],
floats), `randint` ([low, high], integers, high inclusive). Every choice and both ends of every
range are applied to the base config and validated, so a search naming an unknown key or a value
the schema refuses fails at once, naming the key.
"""

from __future__ import annotations

import json
from typing import Any

from distillery.config import Config, ConfigError, apply_override, validate_tree

DOMAINS = ("choice", "uniform", "loguniform", "randint")


def _check_domain(key: str, spec: Any) -> tuple[str, list]:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"tune.search_space.{key}: expected one of {{{', '.join(DOMAINS)}}}: [...], got {spec!r}")
    (kind, args), = spec.items()
    if kind not in DOMAINS:
        raise ConfigError(f"tune.search_space.{key}: unknown domain '{kind}' (one of {', '.join(DOMAINS)})")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"tune.search_space.{key}.{kind}: expected a non-empty list, got {args!r}")
    if kind != "choice":
        if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise ConfigError(f"tune.search_space.{key}.{kind}: expected [low, high] numbers, got {args!r}")
        low, high = args
        if not low < high:
            raise ConfigError(f"tune.search_space.{key}.{kind}: low ({low}) must be below high ({high})")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"tune.search_space.{key}.loguniform: bounds must be positive, got {args!r}")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise ConfigError(f"tune.search_space.{key}.randint: bounds must be integers, got {args!r}")
    return kind, args


def with_values(base: Config, values: dict[str, Any]) -> Config:
    """`base` with dotted `values` applied, validated like command-line overrides."""
    tree = base.model_dump(mode="json", by_alias=True)
    for key, value in values.items():
        apply_override(tree, key.split("."), value)
    return validate_tree(tree, f"with {json.dumps(values)}")


def validate_search_space(base: Config, space: dict[str, Any]) -> dict[str, tuple[str, list]]:
    """Check every domain and every edge value against the schema; returns key -> (kind, args)."""
    if not space:
        raise ConfigError("tune.search_space: empty; name at least one dotted config key to search")
    checked = {}
    for key in space:
        # The engines a trial starts are counted from the base config (tune/search.py: trial_cpus).
        if key.startswith("distill.on_policy.") and base.distill.on_policy is None:
            raise ConfigError(f"tune.search_space.{key}: set distill.on_policy in the config (e.g. distill.on_policy.lmbda=0.5); the search varies it")
    for key, spec in space.items():
        kind, args = _check_domain(key, spec)
        probes = args if kind == "choice" else [args[0], args[1]]
        for value in probes:
            try:
                with_values(base, {key: value})
            except ConfigError as e:
                raise ConfigError(f"tune.search_space.{key}: value {value!r} does not fit the config: {e}") from None
        checked[key] = (kind, args)
    return checked


def to_tune_space(checked: dict[str, tuple[str, list]]) -> dict[str, Any]:
    """Ray Tune domains for a validated space (keys stay dotted)."""
    from ray import tune

    out = {}
    for key, (kind, args) in checked.items():
        if kind == "choice":
            out[key] = tune.choice(args)
        elif kind == "uniform":
            out[key] = tune.uniform(float(args[0]), float(args[1]))
        elif kind == "loguniform":
            out[key] = tune.loguniform(float(args[0]), float(args[1]))
        else:
            out[key] = tune.randint(args[0], args[1] + 1)  # Tune's upper bound is exclusive
    return out
