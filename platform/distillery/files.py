"""Writes a reader can never see half done: a file or a directory appears whole, or not at all.

Every stage writes its outputs under a temporary name next to the final one and renames it into
place (a rename within one filesystem is atomic). A stage that fails removes its temporary
directory, so nothing half-written is left to confuse the next run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` to `path` through `<path>.tmp-<pid>` and a rename."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def install_dir(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Replace the directory `final` by the finished `tmp` with renames: the old one moves aside
    first, so a reader sees the old or the new one, never a mixture."""
    final = str(final).rstrip("/")
    old = f"{final}.old-{os.getpid()}"
    moved = os.path.exists(final)
    if moved:
        os.replace(final, old)
    os.replace(tmp, final)
    if moved:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def removed_on_failure(tmp: str | os.PathLike[str]) -> Iterator[None]:
    """Delete the temporary directory `tmp` if the block raises (Ctrl-C included), then re-raise."""
    try:
        yield
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
