"""Triton's metadata protocol V2: the simulator's host service (tests/simulator/mdata_v2.py)
checked against the protocol document's own examples, and imgprep's guest client
(units/imgprep-mdata-v2) run for real under /bin/sh against that service through a pty
(a real tty: stty, raw mode and read timeouts behave as on a guest's serial port)."""

from __future__ import annotations

import base64
import os
import pty
import shlex
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgprep.artifacts import PREFIX
from imgprep.channel import parse_report
from tests.host.test_runner import assert_cleaned_up, make_tree, namespaces, run_runner
from tests.simulator.mdata_v2 import MetadataV2, crc32_hex, frame, parse_frame

__all__ = ["namespaces"]  # the capability probe fixture of test_runner.py

CLIENT = Path(__file__).resolve().parents[2] / "units" / "imgprep-mdata-v2"

# The "Diagrammatic Example" of the specification (section 4.4): a response to a GET
# whose payload is "[]".
SPEC_EXAMPLE = b"V2 21 265ae1d8 dc4fae17 SUCCESS W10="


def test_framing_matches_the_specification_example() -> None:
    assert frame("dc4fae17", "SUCCESS", b"[]") == SPEC_EXAMPLE + b"\n"
    assert crc32_hex(b"dc4fae17 SUCCESS W10=") == "265ae1d8"
    assert parse_frame(SPEC_EXAMPLE) == ("dc4fae17", "SUCCESS", b"[]")


def test_a_frame_with_a_wrong_checksum_or_length_is_not_a_frame() -> None:
    assert parse_frame(SPEC_EXAMPLE.replace(b"265ae1d8", b"265ae1d9")) is None
    assert parse_frame(SPEC_EXAMPLE.replace(b"V2 21", b"V2 22")) is None
    assert parse_frame(SPEC_EXAMPLE + b"=") is None
    assert parse_frame(SPEC_EXAMPLE) is not None  # the control


def test_negotiation_and_v1_lines_as_the_specification_describes() -> None:
    service = MetadataV2({})
    assert service.answer(b"", False) == (b"invalid command\n", False)
    assert service.answer(b"NEGOTIATE V2", False) == (b"V2_OK\n", True)
    assert service.answer(b"GET user-script", False) == (b"invalid command\n", False)


def _request(service: MetadataV2, code: str, payload: bytes | None) -> tuple[str, str, bytes | None]:
    response, _ = service.answer(frame("0badf00d", code, payload).rstrip(b"\n"), True)
    assert response is not None
    parsed = parse_frame(response.rstrip(b"\n"))
    assert parsed is not None
    return parsed


def test_operations_get_keys_put_delete() -> None:
    customer = {"user-script": "echo hi"}
    changes: list[int] = []
    service = MetadataV2(
        customer, {"operator-script": "#!/bin/sh\n"}, fields={"uuid": "u-1"}, on_change=lambda: changes.append(1)
    )
    assert _request(service, "GET", b"user-script") == ("0badf00d", "SUCCESS", b"echo hi")
    assert _request(service, "GET", b"sdc:operator-script") == ("0badf00d", "SUCCESS", b"#!/bin/sh\n")
    assert _request(service, "GET", b"sdc:uuid") == ("0badf00d", "SUCCESS", b"u-1")
    assert _request(service, "GET", b"missing") == ("0badf00d", "NOTFOUND", None)
    put = base64.b64encode(b"prepare-image:state") + b" " + base64.b64encode(b"running")
    assert _request(service, "PUT", put) == ("0badf00d", "SUCCESS", None)
    assert customer["prepare-image:state"] == "running"
    assert _request(service, "KEYS", None) == ("0badf00d", "SUCCESS", b"prepare-image:state\nuser-script\n")
    assert _request(service, "DELETE", b"user-script") == ("0badf00d", "SUCCESS", None)
    assert "user-script" not in customer
    assert len(changes) == 2


def test_the_guest_cannot_write_sdc_keys_or_send_garbage() -> None:
    customer: dict[str, str] = {}
    service = MetadataV2(customer, {"operator-script": "x"})
    sdc = base64.b64encode(b"sdc:operator-script") + b" " + base64.b64encode(b"evil")
    assert _request(service, "PUT", sdc)[1] == "FAILURE"
    assert _request(service, "PUT", b"not-two-fields")[1] == "FAILURE"
    assert _request(service, "DELETE", b"sdc:operator-script")[1] == "FAILURE"
    assert _request(service, "REBOOT", None)[1] == "FAILURE"
    assert service.internal == {"operator-script": "x"}
    assert customer == {}


# --- the guest client, for real --------------------------------------------------------------


class PtyPort:
    """A pty: the client opens the slave (its "serial port"), the service serves the master."""

    def __init__(self, service: MetadataV2) -> None:
        self.master, slave = pty.openpty()
        self.path = os.ttyname(slave)
        os.close(slave)  # the client opens it by name, as it opens /dev/ttyS1
        self._closed = threading.Event()
        self._thread = threading.Thread(target=service.serve, args=(self._read, self._write), daemon=True)
        self._thread.start()

    def _read(self, n: int) -> bytes:
        while not self._closed.is_set():
            try:
                return os.read(self.master, n)
            except OSError:  # EIO while no process has the slave open: wait for the next client
                self._closed.wait(0.05)
        return b""

    def _write(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        os.close(self.master)


@pytest.fixture
def port() -> Iterator[tuple[PtyPort, MetadataV2]]:
    service = MetadataV2({"user-script": "echo hi"}, {"operator-script": "#!/bin/sh\necho early\n"})
    p = PtyPort(service)
    yield p, service
    p.close()


def _client(path: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(CLIENT), path, *args], capture_output=True, text=True, timeout=120, check=False)


def test_the_sh_client_puts_and_gets_through_a_tty(port: tuple[PtyPort, MetadataV2]) -> None:
    p, service = port
    value = "error\nline two with spaces, quotes ' \" and UTF-8 é"
    put = _client(p.path, "put", "prepare-image:error", value)
    assert put.returncode == 0, put.stderr
    assert service.customer["prepare-image:error"] == value
    got = _client(p.path, "get", "sdc:operator-script")
    assert got.returncode == 0, got.stderr
    assert got.stdout == "#!/bin/sh\necho early\n"
    missing = _client(p.path, "get", "no-such-key")
    assert missing.returncode == 1
    assert ("GET", "no-such-key") in service.requests


def test_the_sh_client_is_refused_sdc_writes(port: tuple[PtyPort, MetadataV2]) -> None:
    p, service = port
    refused = _client(p.path, "put", "sdc:operator-script", "evil")
    assert refused.returncode == 1
    assert "FAILURE" in refused.stderr
    assert service.internal["operator-script"] == "#!/bin/sh\necho early\n"


def test_the_sh_client_refuses_a_path_that_is_no_tty(tmp_path: Path) -> None:
    result = _client(str(tmp_path / "file"), "put", "k", "v")
    assert result.returncode == 2
    assert "not a character device" in result.stderr


# --- the prepare runner's mdata-v2 channel ----------------------------------------------------


def test_the_runner_reports_through_the_v2_client(tmp_path: Path, namespaces: None) -> None:
    """units/imgprep-prepare-runner with IMGPREP_CHANNEL=mdata-v2:<tty>, in the private
    namespaces of tests/unit/test_runner.py, its client talking to the service over a pty."""
    service = MetadataV2({})
    port = PtyPort(service)
    try:
        run = make_tree(tmp_path, "#!/bin/sh\necho cleaned\n")
        armed = run.host(PREFIX) / "armed"
        armed.write_text(armed.read_text().replace(shlex.quote(str(run.channel)), shlex.quote(f"mdata-v2:{port.path}")))
        shutil.copy2(CLIENT, run.host(PREFIX) / "mdata-v2")
        run_runner(run)
    finally:
        port.close()
    assert run.returncode == 0, run.stderr
    assert service.customer["prepare-image:state"] == "success"
    assert service.customer["imgprep:log"] == "cleaned"
    report = parse_report(service.customer["imgprep:report"])
    assert report["script_exit"] == 0
    assert report["late_services"] == ["cron.service"]  # what the fake systemctl lists
    # the states in the order they were put: running first, success last
    puts = [key for code, key in service.requests if code == "PUT"]
    assert puts[0] == puts[-1] == base64.b64encode(b"prepare-image:state").decode()
    assert not run.host(PREFIX).exists()  # the client went with the runner's files
    assert_cleaned_up(run)
