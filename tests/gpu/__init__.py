"""GPU checks (see conftest.py). A package, so its conftest imports as `gpu.conftest` and never
replaces tests/conftest.py as the module `conftest` that other test files import REPO from."""
