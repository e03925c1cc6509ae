"""Test-only launcher: the real ``imgprep`` CLI with the FAKE backend (tests/api/fakebackend.py).

``python -m tests.api.fakeserve serve --listen ...`` runs the production server code
unchanged; only ``imgprep.jobs.backend_class`` is replaced, in this process alone, so
that jobs run without a VM. Nothing in the ``imgprep`` package knows about it.
"""

from __future__ import annotations

import sys
from typing import Any

import imgprep.jobs
from imgprep.backends.base import Backend
from imgprep.cli import main
from tests.api.fakebackend import FakeBackend


def fake_backend_class(name: str) -> type[Backend[Any]]:
    return FakeBackend


imgprep.jobs.backend_class = fake_backend_class
raise SystemExit(main(sys.argv[1:]))
