"""Clone mode's guest-agent faults, injected for real into the running test guest: the
agent does not answer, the freeze fails, the thaw fails once. Real libvirtd, QEMU (TCG),
qemu-guest-agent and libguestfs; nothing mocked.

How the faults are made:

* *does not answer*: a transient unit in the guest (started through the agent's own
  ``guest-exec``) stops qemu-guest-agent (``hung``: SIGSTOP, its channel stays open;
  ``stopped``: ``systemctl stop``, its channel closes) and waits for a line on a second,
  test-only virtio port; the test sends it after the job, which brings the agent back.
* *the freeze fails* / *the thaw fails once*: an fsfreeze hook of qemu-ga (``fsfreeze-hook=``
  in /etc/qemu/qemu-ga.conf, written into the prototype's private disk with libguestfs
  before it boots). qemu-ga runs the hook with ``freeze`` before freezing (non-zero: the
  freeze fails, nothing frozen) and with ``thaw`` after thawing (non-zero: the thaw call
  fails although the filesystems are thawed). Debian's own /etc/qemu/fsfreeze-hook
  ignores its hook.d scripts' status, so the hook is a script of the test's.

After every case the prototype runs with the same domain ID and is not frozen (its
writer writes on; ``guest-fsfreeze-status`` says ``thawed``), its persistent definition
is byte-identical and nothing of the job is left.
"""

from __future__ import annotations

import base64
import json
import socket
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
import pytest

from imgprep import pointintime as pit
from imgprep.libguestfs import open_guest
from tests.e2e.conftest import Prototype
from tests.e2e.test_clone import leftovers
from tests.e2e.test_create import TIMEOUTS
from tests.e2e.test_faults import NAMES
from tests.e2e.test_pointintime import counter_lines, wait_for

pytestmark = pytest.mark.e2e

HOOK = "/usr/local/sbin/imgprep-test-fsfreeze-hook"
QGA_CONF = "/etc/qemu/qemu-ga.conf"
THAW_MARKER = "/run/imgprep-test-thaw-failed"
RESUME_PORT = "org.imgprep.test.resume"
FAULT_UNIT = "imgprep-test-agent-fault"

FREEZE_FAILS = """#!/bin/sh
# test fault: every freeze is refused (before anything is frozen)
[ "$1" = freeze ] && { echo "imgprep test: freeze refused" >&2; exit 1; }
exit 0
"""
THAW_FAILS_ONCE = f"""#!/bin/sh
# test fault: the first thaw fails (qemu-ga runs this after thawing the filesystems)
if [ "$1" = thaw ] && [ ! -e {THAW_MARKER} ]; then
    : > {THAW_MARKER}
    echo "imgprep test: first thaw refused" >&2
    exit 1
fi
exit 0
"""
# the guest side of "does not answer": stop the agent until the test's line arrives
SILENCE = {
    "hung": ("systemctl kill --signal=SIGSTOP qemu-guest-agent", "systemctl kill --signal=SIGCONT qemu-guest-agent"),
    "stopped": ("systemctl stop qemu-guest-agent", "systemctl start qemu-guest-agent"),
}


# --- talking to the guest through its agent ------------------------------------------


def agent_call(dom: Any, command: str, timeout: int = 10, **arguments: Any) -> Any:
    reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps({"execute": command, "arguments": arguments}), timeout, 0)
    return json.loads(reply)["return"]


def agent_read(dom: Any, path: str) -> bytes:
    handle = agent_call(dom, "guest-file-open", path=path, mode="r")
    data = b""
    try:
        while True:
            chunk = agent_call(dom, "guest-file-read", handle=handle, count=1 << 20)
            data += base64.b64decode(chunk["buf-b64"])
            if chunk["eof"]:
                return data
    finally:
        agent_call(dom, "guest-file-close", handle=handle)


def freeze_status(dom: Any) -> str:
    return str(agent_call(dom, "guest-fsfreeze-status"))


def writer_writes_on(dom: Any) -> None:
    """The guest's counter writer appends again (a frozen filesystem blocks it)."""
    seen = counter_lines(dom)
    wait_for("the writer to write on", lambda: counter_lines(dom) > seen, timeout=120)


def wait_agent(proto: Prototype) -> None:
    wait_for("the guest agent", lambda: pit.agent_answers(proto.dom))


# --- the prototypes --------------------------------------------------------------------


def with_fsfreeze_hook(proto: Prototype, hook: str) -> None:
    """qemu-ga of the (shut-off) prototype runs ``hook`` on every freeze and thaw."""
    with open_guest([(proto.disk, "qcow2")], readonly=False, force_tcg=True) as g:
        g.write(HOOK, hook.encode(), 0o755)
        g.write(QGA_CONF, f"[general]\nfsfreeze-hook={HOOK}\n".encode(), 0o644)


def with_resume_port(proto: Prototype) -> None:
    """A second virtio port (libvirt picks its host socket), the test's way to bring a
    silenced agent back."""
    root = ET.fromstring(proto.persistent_xml())
    devices = root.find("devices")
    assert devices is not None
    channel = ET.SubElement(devices, "channel", {"type": "unix"})
    ET.SubElement(channel, "target", {"type": "virtio", "name": RESUME_PORT})
    proto.conn.defineXML(ET.tostring(root, encoding="unicode"))


def resume_socket(proto: Prototype) -> socket.socket:
    """Connected to the guest's resume port: the guest's read of it blocks until a line
    comes (without a host connection it would read end-of-file at once)."""
    for target in ET.fromstring(proto.dom.XMLDesc(0)).findall("./devices/channel"):
        name = target.find("target")
        source = target.find("source")
        if name is not None and name.get("name") == RESUME_PORT and source is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(source.get("path")))
            return sock
    raise AssertionError("the prototype has no resume port")


def silence_agent(proto: Prototype, how: str) -> None:
    """Stop the guest's agent (it answers until here) until the resume line arrives."""
    stop, start = SILENCE[how]
    script = f"sleep 2; {stop}; read -r _ < /dev/virtio-ports/{RESUME_PORT}; {start}"
    agent_call(
        proto.dom,
        "guest-exec",
        path="/usr/bin/systemd-run",
        arg=[f"--unit={FAULT_UNIT}", "--collect", "/bin/sh", "-c", script],
    )
    # the injection, verified: the agent that answered does not any more
    wait_for("the agent to fall silent", lambda: not pit.agent_answers(proto.dom, 2), timeout=60)


@pytest.fixture
def running(make_prototype: Callable[..., Prototype]) -> Callable[..., Prototype]:
    """A started prototype whose agent answers and whose writer writes (``hook``: an
    fsfreeze hook configured before it boots; ``resume_port``: the test's second port)."""

    def start(hook: str | None = None, resume_port: bool = False) -> Prototype:
        proto = make_prototype()
        if hook is not None:
            with_fsfreeze_hook(proto, hook)
        if resume_port:
            with_resume_port(proto)
        proto.start()
        wait_agent(proto)
        wait_for("the writer", lambda: counter_lines(proto.dom) >= 10)
        return proto

    return start


def assert_unharmed(proto: Prototype, dom_id: int, definition: str) -> None:
    """Running all along, not frozen, its definition byte-identical."""
    assert proto.is_running()
    assert proto.dom.ID() == dom_id, "the prototype was restarted"
    assert proto.persistent_xml() == definition
    assert proto.snapshots() == []
    assert freeze_status(proto.dom) == "thawed"
    writer_writes_on(proto.dom)


def job_record(imgprep: Any, job_uuid: str) -> dict[str, Any]:
    result = imgprep("jobs", "get", job_uuid)
    assert result.returncode == 0, result.stderr
    record: dict[str, Any] = json.loads(result.stdout)
    return record


# --- the agent does not answer --------------------------------------------------------------


@pytest.mark.parametrize("how", ["hung", "stopped"])
def test_agent_that_does_not_answer_is_refused_before_anything_is_touched(
    how: str,
    running: Callable[..., Prototype],
    imgprep: Any,
    output_dir: Path,
    reliability: Callable[..., None],
) -> None:
    proto = running(resume_port=True)
    dom_id, definition = proto.dom.ID(), proto.persistent_xml()
    resume = resume_socket(proto)
    try:
        silence_agent(proto, how)
        why = "hung or busy" if how == "hung" else "not running in the guest"

        for consistency in ("auto", "freeze"):
            result = imgprep(
                "create",
                "--vm",
                proto.name,
                "--consistency",
                consistency,
                "--agent-timeout",
                "10",
                "--output-dir",
                str(output_dir),
                *TIMEOUTS,
            )
            assert result.returncode == 2, result.stderr
            (line,) = result.stderr.strip().splitlines()
            assert f"--consistency {consistency}" in line
            assert "did not answer within" in line
            assert why in line
            assert "--consistency stop" in line
            assert "crash" in line

        # nothing touched: no job recorded, no clone, no backup job, no output
        assert json.loads(imgprep("jobs", "list", "--json").stdout) == []
        assert [d.name() for d in proto.conn.listAllDomains() if d.name().endswith(f"-{proto.name}")] == []
        with pytest.raises(libvirt.libvirtError, match="backup"):
            proto.dom.backupGetXMLDesc(0)
        assert list(output_dir.iterdir()) == []
        assert proto.is_running()
        assert proto.dom.ID() == dom_id
    finally:
        resume.sendall(b"resume\n")
        resume.close()
    wait_agent(proto)  # back: the prototype's own state can be asked again
    assert_unharmed(proto, dom_id, definition)
    reliability(
        f"guest agent {how} (clone, running)",
        "qemu-ga "
        + ("SIGSTOPped in the guest" if how == "hung" else "stopped in the guest")
        + "; `--consistency auto` and `freeze`, `--agent-timeout 10`",
        f"refused after the 10 s wait, naming `--consistency stop|crash` and why ({why}); exit 2; "
        "no job, no clone, no backup job; prototype never stopped, not frozen, definition identical",
    )


# --- the freeze fails ------------------------------------------------------------------------


def test_freeze_that_fails_fails_the_job_and_leaves_the_prototype_thawed(
    running: Callable[..., Prototype],
    imgprep: Any,
    output_dir: Path,
    reliability: Callable[..., None],
) -> None:
    proto = running(hook=FREEZE_FAILS)
    dom_id, definition = proto.dom.ID(), proto.persistent_xml()

    result = imgprep("create", "--vm", proto.name, "--output-dir", str(output_dir), "--json", *TIMEOUTS)

    assert result.returncode == 1, result.stderr
    summary = result.summary
    assert summary["execution"] == "failed"
    assert summary["error"]["code"] == "FreezeFailed"
    # the injected fault, named: qemu-ga's hook refused the freeze
    assert "fsfreeze hook has failed" in summary["error"]["message"]
    record = job_record(imgprep, summary["job_uuid"])
    assert record["state"]["clone"]["consistency"] == "freeze"
    assert record["state"]["clone"]["view"] is None
    assert [r["name"] for r in record["always_results"]] == NAMES["clone"]["always"]
    assert all(r["error"] is None for r in record["always_results"])
    assert record["needs_recovery"] is False
    assert list(output_dir.iterdir()) == []
    assert leftovers(proto.conn, summary["job_uuid"], proto) == []
    assert_unharmed(proto, dom_id, definition)
    reliability(
        "freeze fails (clone, running)",
        "qemu-ga fsfreeze hook exits 1 on `freeze`",
        "`FreezeFailed` naming the hook; exit 1; thawed, no clone, no backup job, no view; "
        "prototype never stopped, not frozen, definition identical",
    )


# --- the thaw fails once ---------------------------------------------------------------------


def test_thaw_that_fails_once_is_retried_and_reported(
    running: Callable[..., Prototype],
    imgprep: Any,
    output_dir: Path,
    reliability: Callable[..., None],
) -> None:
    proto = running(hook=THAW_FAILS_ONCE)
    dom_id, definition = proto.dom.ID(), proto.persistent_xml()
    with pytest.raises(libvirt.libvirtError):  # control: no thaw has failed yet
        agent_read(proto.dom, THAW_MARKER)

    result = imgprep("create", "--vm", proto.name, "--output-dir", str(output_dir), "--json", *TIMEOUTS)

    assert result.returncode == 0, result.stderr
    summary = result.summary
    assert summary["execution"] == "succeeded"
    capture = summary["capture"]
    assert capture["consistency"] == "freeze"
    assert capture["thaw_attempts"] == 2
    print(f"freeze window with one failed thaw {capture['freeze_window_ms']} ms")
    # loud: a warning event, in the job record, and the failed attempt on stderr
    warnings = [e for e in result.events if e.get("event") == "warning"]
    assert [w["step"] for w in warnings] == ["capture"]
    assert "thawed only at attempt 2" in warnings[0]["message"]
    record = job_record(imgprep, summary["job_uuid"])
    assert any("thawed only at attempt 2" in w for w in record["warnings"])
    assert "THAW FAILED (attempt 1/5)" in result.stderr
    assert "fsfreeze hook has failed" in result.stderr
    # the injected fault fired in the prototype, during this job
    assert agent_read(proto.dom, THAW_MARKER) == b""
    assert Path(summary["file"]).exists()
    assert record["needs_recovery"] is False
    assert leftovers(proto.conn, summary["job_uuid"], proto) == []
    assert_unharmed(proto, dom_id, definition)
    reliability(
        "thaw fails once (clone, running)",
        "qemu-ga fsfreeze hook exits 1 on the first `thaw` (after the filesystems thawed)",
        "thaw retried: job succeeds with `thaw_attempts: 2`, a `warning` event and `warnings` in the record, "
        "the failure logged; prototype never stopped, not frozen, definition identical, nothing left",
    )
