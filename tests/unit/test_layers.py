"""The package's imports point one way (docs/architecture.md, "Layers"): no module imports a layer
above its own, and no set of modules imports each other in a circle. Function-level imports count."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "platform" / "distillery"

# Lower number = lower layer; a module may import its own layer and those below.
LAYERS = {
    "config": 0, "files": 0, "ray_compat": 0, "runtime": 0, "engine_settings": 0,
    "data": 1, "models": 1, "registry": 1,
    "train": 2,
    "distill": 3,
    "tune": 4, "evaluation": 4, "serving": 4, "export": 4,
    "cli": 5, "demo": 5, "__main__": 5, "__init__": 5,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distillery"):
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("distillery")]
            deps.update(t for t in targets if t in modules and t != name)
        graph[name] = deps
    return graph


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS["__init__"] if len(parts) == 1 else LAYERS[parts[1]]


def test_every_module_has_a_layer():
    unknown = {m for m in _graph() if len(m.split(".")) > 1 and m.split(".")[1] not in LAYERS}
    assert not unknown, f"add these to LAYERS (and docs/architecture.md): {sorted(unknown)}"


def test_no_import_goes_up_a_layer():
    upward = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
              for m, deps in _graph().items() for d in sorted(deps)
              if _layer(d) > _layer(m) and d != "distillery"]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if dep == "distillery":
                continue
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)
