"""Atomic writes and installs on real files: readers see the old or the new, never a mixture."""

from __future__ import annotations

import pytest

from distillery.files import install_dir, removed_on_failure, write_text_atomic


def test_write_text_atomic_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "best.yaml"
    target.write_text("old")
    write_text_atomic(target, "new: 1\n")
    assert target.read_text() == "new: 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["best.yaml"]


def test_install_dir_swaps_directories(tmp_path):
    final, tmp = tmp_path / "out", tmp_path / "out.tmp-1"
    (final / "a").mkdir(parents=True)
    (tmp / "b").mkdir(parents=True)
    install_dir(tmp, final)
    assert [p.name for p in final.iterdir()] == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(FileNotFoundError):
        install_dir(tmp_path / "nothing", tmp_path / "new")


def test_temporary_directory_is_removed_when_the_work_fails(tmp_path):
    tmp = tmp_path / "x.tmp-1"
    with pytest.raises(KeyboardInterrupt):
        with removed_on_failure(tmp):
            (tmp / "half").mkdir(parents=True)
            raise KeyboardInterrupt
    assert not tmp.exists()
    with removed_on_failure(tmp):
        tmp.mkdir()
    assert tmp.exists()  # kept when the work succeeds


def test_reprepare_keeps_the_default_teacher_cache(tmp_path):
    """Re-running prepare replaces the prepared directory but moves a teacher cache in its default
    place into the new one (its fingerprint check then decides whether it still fits)."""
    from distillery.data.prepare import TEACHER_CACHE, _install

    final, tmp = tmp_path / "data", tmp_path / "data.tmp-7"
    (final / TEACHER_CACHE / "train").mkdir(parents=True)
    (final / TEACHER_CACHE / "cache_manifest.json").write_text("{}")
    (final / "train").mkdir()
    (final / "train" / "old.parquet").write_text("old")
    (tmp / "train").mkdir(parents=True)
    (tmp / "train" / "new.parquet").write_text("new")
    _install(str(tmp), str(final))
    assert (final / TEACHER_CACHE / "cache_manifest.json").read_text() == "{}"
    assert [p.name for p in (final / "train").iterdir()] == ["new.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
