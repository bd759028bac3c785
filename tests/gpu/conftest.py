"""GPU checks: every test under tests/gpu is skipped, with the reason, when torch sees no CUDA device.

A skip is reported as a skip (`s` and the `-ra` summary), never as a pass; `tests/gpu/run.sh`
goes further and fails a run in which anything here was skipped, so a GPU check cannot pass by
not running. The skip is decided at collection, before any fixture runs: on a CPU machine the
whole directory costs one `torch.cuda.is_available()` call, not the tiny models' build.

The fixtures (tiny teacher and student, prepared data) are the suite's own, from tests/conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def cuda_devices() -> int:
    """CUDA devices torch can use here (0 with a CPU-only torch or no driver)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pytest_collection_modifyitems(config, items):
    # This hook sees every collected item of the session, not only this directory's: mark ours only.
    ours = [item for item in items if HERE in item.path.parents]
    if not ours or cuda_devices() > 0:
        return
    import torch

    reason = (f"no CUDA device visible (torch {torch.__version__}, cuda build {torch.version.cuda}, "
              f"CUDA_VISIBLE_DEVICES={__import__('os').environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): GPU checks need one")
    for item in ours:
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _no_outside_ray(monkeypatch):
    """Each stage here starts its own local Ray sized for this machine (its GPUs included), never
    one a RAY_ADDRESS in the environment points at."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
