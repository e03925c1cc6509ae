"""Unit-test guard: a unit test that runs an unplanned subprocess fails (as in cloud-init).

Every test in tests/unit runs with ``subprocess.Popen``, ``os.system`` and
``os.posix_spawn[p]`` replaced by checks. A test that *means* to run a tool (the real
``systemd-analyze``, ``sh``, ``qemu-img``...) names it::

    @pytest.mark.allow_subprocess("systemd-analyze")

Anything else raises ``UnplannedSubprocess``, and the test fails at teardown even if the
code under test swallowed that exception.

A module that plans its own subprocesses sets ``pytestmark = pytest.mark.unguarded_subprocess``.
Tests that need root, namespaces or a particular shell are not unit tests: they live in
tests/host and tests/integration.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest


class UnplannedSubprocess(AssertionError):
    """A unit test tried to run a program it did not declare."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "allow_subprocess(*programs): the test runs these programs (basename of argv[0]) for real",
    )
    config.addinivalue_line(
        "markers",
        "unguarded_subprocess: the whole module plans its own subprocesses (no guard)",
    )


def _program(args: Any, executable: Any = None) -> str:
    if executable:
        return os.path.basename(os.fsdecode(executable))
    if isinstance(args, str | bytes | os.PathLike):
        text = os.fsdecode(args)
        argv0 = shlex.split(text)[0] if text.strip() else text
    else:
        argv = list(args)
        argv0 = os.fsdecode(argv[0]) if argv else ""
    return os.path.basename(argv0)


class SubprocessGuard:
    """What the guard allows and what it refused, for one test."""

    def __init__(self, allowed: set[str]) -> None:
        self.allowed = allowed
        self.violations: list[str] = []

    def check(self, what: str, program: str) -> None:
        if program not in self.allowed:
            self.violations.append(what)
            raise UnplannedSubprocess(
                f"unit test ran an unplanned subprocess: {what} "
                f"(planned here: {sorted(self.allowed) or 'none'}; "
                f"declare it with @pytest.mark.allow_subprocess({program!r}))"
            )

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        guard = self
        real_popen = subprocess.Popen

        class GuardedPopen(real_popen):  # type: ignore[valid-type,misc]
            def __init__(self, args: Any, *rest: Any, **kwargs: Any) -> None:
                shown = args if isinstance(args, str | bytes) else [os.fsdecode(a) for a in args]
                guard.check(f"subprocess.Popen({shown!r})", _program(args, kwargs.get("executable")))
                super().__init__(args, *rest, **kwargs)

        def guarded_system(command: str) -> int:
            # A shell string is never a planned command (STYLE 3: argument lists only).
            guard.violations.append(f"os.system({command!r})")
            raise UnplannedSubprocess(f"unit test ran os.system({command!r}): shell strings are never planned")

        real_spawn = os.posix_spawn
        real_spawnp = os.posix_spawnp

        def guarded_spawn(path: Any, argv: Any, *rest: Any, **kwargs: Any) -> int:
            guard.check(f"os.posix_spawn({path!r}, {argv!r})", _program([path]))
            return real_spawn(path, argv, *rest, **kwargs)

        def guarded_spawnp(path: Any, argv: Any, *rest: Any, **kwargs: Any) -> int:
            guard.check(f"os.posix_spawnp({path!r}, {argv!r})", _program([path]))
            return real_spawnp(path, argv, *rest, **kwargs)

        monkeypatch.setattr(subprocess, "Popen", GuardedPopen)
        monkeypatch.setattr(os, "system", guarded_system)
        monkeypatch.setattr(os, "posix_spawn", guarded_spawn)
        monkeypatch.setattr(os, "posix_spawnp", guarded_spawnp)


@pytest.fixture(autouse=True)
def subprocess_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[SubprocessGuard]:
    allowed = {str(name) for mark in request.node.iter_markers("allow_subprocess") for name in mark.args}
    guard = SubprocessGuard(allowed)
    if request.node.get_closest_marker("unguarded_subprocess"):
        yield guard
        return
    guard.install(monkeypatch)
    yield guard
    if guard.violations:
        pytest.fail("unplanned subprocess(es): " + "; ".join(guard.violations), pytrace=False)
