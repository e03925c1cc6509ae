"""The state directory: private whatever created it, refused if others could change it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imgprep.errors import InvalidInput
from imgprep.jobstore import JobStore


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


def test_a_new_state_directory_and_its_database_are_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    old = os.umask(0o022)  # a permissive umask must not leak into the files
    try:
        JobStore(state)
    finally:
        os.umask(old)
    assert mode(state) == 0o700
    assert mode(state / "imgprep.sqlite") == 0o600


def test_an_existing_readable_state_directory_is_tightened(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    db = state / "imgprep.sqlite"
    JobStore(state)
    db.chmod(0o644)  # as an earlier version left it
    JobStore(state)
    assert mode(state) == 0o700
    assert mode(db) == 0o600


@pytest.mark.parametrize("bad", [0o777, 0o775, 0o1777, 0o722])
def test_a_state_directory_others_can_write_is_refused(tmp_path: Path, bad: int) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(bad)
    with pytest.raises(InvalidInput, match="writable by its group or others"):
        JobStore(state)
    assert list(state.iterdir()) == []  # nothing created in it
    state.chmod(0o700)  # control
    JobStore(state)


def test_a_state_directory_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)
    with pytest.raises(InvalidInput, match="owned by uid 65534"):
        JobStore(state)


def test_a_planted_database_symlink_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("x")
    (state / "imgprep.sqlite").symlink_to(victim)
    with pytest.raises(InvalidInput, match="not a regular file"):
        JobStore(state)
    assert victim.read_text() == "x"
