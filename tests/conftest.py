"""Session-wide hooks: the reliability table of the fault-injection tests.

A fault test records its row with the ``reliability`` fixture (tests/e2e/conftest.py) as a
user property of its report; reports reach this process also from pytest-xdist workers, so
the table is complete however the suite is distributed. Only passed tests contribute: every
row is an assertion that passed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

RELIABILITY_PROPERTY = "imgprep_reliability"
RELIABILITY: list[dict[str, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.passed:
        RELIABILITY.extend(
            json.loads(str(value)) for name, value in report.user_properties if name == RELIABILITY_PROPERTY
        )


def reliability_table() -> str:
    lines = ["| case | fault injected | outcome |", "| --- | --- | --- |"]
    lines += [f"| {r['case']} | {r['injected']} | {r['outcome']} |" for r in sorted(RELIABILITY, key=_order)]
    return "\n".join(lines) + "\n"


def _order(row: dict[str, str]) -> str:
    return row["test"]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RELIABILITY:
        return
    terminalreporter.section("imgprep reliability (fault injection against the real test guest)")
    terminalreporter.write(reliability_table())
    out = os.environ.get("IMGPREP_RELIABILITY_OUT")
    if out:
        Path(out).write_text(
            "# Reliability: last fault-injection run\n\nWritten by the end-to-end suite "
            "(tests/e2e/test_faults*.py); every row is an assertion that passed.\n\n" + reliability_table()
        )
