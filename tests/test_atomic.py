"""`mistral_fn.atomic`: deterministic partial names, sweeping of leftovers, nothing half-written."""

import logging

import pytest

from mistral_fn.atomic import atomic_dir, atomic_file, partial_path, sweep
from mistral_fn.errors import CheckpointError


def test_atomic_dir_publishes_only_on_success(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            assert tmp == tmp_path / ".out.partial"
            (tmp / "a").write_text("half")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("whole")
    assert (target / "a").read_text() == "whole" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_refuses_then_replaces_existing(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("x")
    with pytest.raises(CheckpointError, match="already exists"):
        with atomic_dir(target):
            pass
    assert (target / "old").exists()
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new").write_text("y")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leftovers_of_a_killed_write_are_swept_with_a_log_line(tmp_path, caplog):
    target = tmp_path / "data.bin"
    partial_path(target).write_bytes(b"left by kill -9")
    (tmp_path / ".data.bin.old").mkdir()
    with caplog.at_level(logging.WARNING, logger="mistral_fn.atomic"):
        with atomic_file(target) as f:
            f.write(b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]
    assert sum("interrupted write" in r.getMessage() for r in caplog.records) == 2
    assert sweep(target) == []


def test_atomic_file_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(ValueError):
        with atomic_file(target, "w") as f:
            f.write("new, half")
            raise ValueError("boom")
    assert target.read_text() == "old" and not partial_path(target).exists()


def test_atomic_file_refuses_a_directory_target(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        with atomic_file(tmp_path):
            pass
