"""`distillery deploy status|promote|rollback CONFIG [NAME]`: a served name's traffic, from a shell.

The running ingress replicas read the deploy log once a second, so a promotion or rollback written
here takes effect without a restart; the log (and the registry's events) keep who did what.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from distillery.config import Config, ConfigError, load_config
from distillery.serving.versions import DeployLog


def versions_of(cfg: Config, name: str) -> dict[str, str]:
    """label -> role of the versions `serve.models` gives `name`; a ConfigError when it has none."""
    for m in cfg.serve.models:
        if m.name == name and m.versions:
            return {f"v{j + 1}": v.role for j, v in enumerate(m.versions)}
    known = [m.name for m in cfg.serve.models if m.versions]
    raise ConfigError(f"deploy: '{name}' is not served with `versions` in this config (versioned names: {known or 'none'})")


def add_deploy_parser(sub) -> None:
    p = sub.add_parser("deploy", help="a versioned model's traffic: status, promote the canary, roll it back")
    p.add_argument("action", choices=["status", "promote", "rollback"])
    p.add_argument("config", help="the serve config (it names the versions and the deploy log)")
    p.add_argument("name", nargs="?", help="the versioned model name (status: all when omitted)")
    p.add_argument("--reason", default="", help="why, recorded in the deploy log")


def run_deploy(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    log = DeployLog(cfg.deploy_log)
    if args.action == "status":
        events = [e for e in log.read_all() if args.name in (None, e.get("name"))]
        if not events:
            print(f"deploy: no traffic changes recorded in {cfg.deploy_log}; every version has its configured weight")
        for e in events[-20:]:
            print(f"{e['time']}  {e['name']:<16} {e['event']:<9} {e.get('weights', '')}  {e.get('reason', '')}")
        return 0
    if not args.name:
        raise ConfigError(f"deploy {args.action}: name the versioned model")
    roles = versions_of(cfg, args.name)
    canary = next((label for label, role in roles.items() if role == "canary"), None)
    stable = next(label for label, role in roles.items() if role == "stable")
    if canary is None:
        raise ConfigError(f"deploy {args.action}: '{args.name}' has no canary version")
    weights = {stable: 0.0, canary: 1.0} if args.action == "promote" else {stable: 1.0, canary: 0.0}
    log.append(args.action, args.name, weights, reason=args.reason or f"by {getpass.getuser()} from the command line", automatic=False)
    if cfg.registry.record:
        try:
            from distillery.registry.store import Registry

            Registry(cfg.registry.path).log_event(args.action, args.name, {"weights": weights, "reason": args.reason, "automatic": False})
        except Exception as e:  # noqa: BLE001 - the deploy log holds the event
            print(f"deploy: warning: not recorded in the registry: {e}", file=sys.stderr)
    print(f"deploy: {args.action} '{args.name}': traffic {weights}, written to {cfg.deploy_log} "
          f"(running replicas apply it within a second)")
    return 0
