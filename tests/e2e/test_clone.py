"""`imgprep create` in clone mode (the default), end to end: real libvirtd, QEMU (TCG),
libguestfs and the Debian test guest. Nothing mocked.

The test guest runs ``imgprep-test-writer`` (a counter appended with fsync five times
a second). A job on a running prototype must leave it running the whole time (its
libvirt domain ID never changes), its counter file without a gap, and produce an image
holding the counter file as of the point in time, cleaned.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from imgprep import pointintime as pit
from imgprep.config import Config
from imgprep.libguestfs import open_guest
from tests.e2e.conftest import LIBVIRT_URI, Prototype
from tests.e2e.test_create import TIMEOUTS, inspect_disk, sha1_of
from tests.e2e.test_pointintime import (
    COUNTER,
    counter_lines,
    counters,
    wait_for,
)
from tests.e2e.test_pointintime import agent_read as agent_read_file

pytestmark = pytest.mark.e2e


def leftovers(conn: Any, job_uuid: str, proto: Prototype) -> list[str]:
    """Anything a clone job may leave: its clone or verification domain, a backup job on
    the prototype, the view or verification directory, or a process using them."""
    found = [d.name() for d in conn.listAllDomains() if d.name().startswith(f"imgprep-{job_uuid[:8]}")]
    if proto.is_running():
        with contextlib.suppress(libvirt.libvirtError):  # no job: "no domain backup job"
            found.append(f"backup job {proto.dom.backupGetXMLDesc(0)[:80]}")
    views = Config().view_dir / job_uuid
    for path in (views, pit.SOCKET_ROOT / job_uuid):
        for where in (path, path.with_name(f"{job_uuid}.verify")):  # the clone's, the verification's
            if where.exists():
                found.append(str(where))
    for proc in Path("/proc").iterdir():  # (a qemu-nbd serving the view)
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and str(views).encode() in (proc / "cmdline").read_bytes():  # (.verify too)
                found.append(f"process {proc.name}")
    return found


def image_counter(image: Path) -> bytes:
    with open_guest([(image, "qcow2")], readonly=True, force_tcg=True) as g:
        return g.read(COUNTER)


def test_clone_of_running_prototype_with_agent(prototype: Prototype, imgprep: Any, output_dir: Path) -> None:
    """The default: freeze through the agent; the prototype never stops; the image is
    verified by booting it once (the default for users; here explicitly)."""
    prototype.start()
    wait_for("the agent", lambda: pit.agent_answers(prototype.dom))
    wait_for("the writer", lambda: counter_lines(prototype.dom) >= 10)
    dom_id = prototype.dom.ID()
    definition_before = prototype.persistent_xml()
    proto_machine_id = agent_read_file(prototype.dom, "/etc/machine-id").decode().strip()
    proto_host_key = hashlib.sha256(agent_read_file(prototype.dom, "/etc/ssh/ssh_host_ed25519_key.pub")).hexdigest()

    result = imgprep(
        "create", "--vm", prototype.name, "--output-dir", str(output_dir), "--json", *TIMEOUTS, verify=True
    )
    job_end = time.time()
    print("verification", json.dumps(result.summary.get("verification"), indent=1))

    assert result.returncode == 0, result.stderr
    summary = result.summary
    assert summary["execution"] == "succeeded"
    capture = summary["capture"]
    assert capture["capture"] == "clone"
    assert capture["consistency"] == "freeze"
    assert capture["freeze_window_ms"] > 0
    assert capture["thaw_attempts"] == 1
    # the clone has none of the prototype's channels: its agent stays the prototype's
    assert any("guest_agent" in r for r in capture["removed"]), capture["removed"]
    print(f"freeze window {capture['freeze_window_ms']} ms")

    # The prototype: never stopped, its writer without a gap, its definition unchanged.
    assert prototype.is_running()
    assert prototype.dom.ID() == dom_id
    assert prototype.persistent_xml() == definition_before
    assert prototype.snapshots() == []
    live = counters(agent_read_file(prototype.dom, COUNTER))
    assert live == list(range(live[0], live[0] + len(live))), "the prototype's writer has a gap"

    # The image: the counter file as of the point in time (a prefix of the prototype's,
    # its last entry older than the job's end), and cleaned.
    image = Path(summary["file"])
    taken = image_counter(image)
    in_image = counters(taken)
    assert in_image
    assert in_image == live[: len(in_image)]
    assert len(in_image) < len(live), "the prototype wrote on after the point in time"
    last_stamp = float(taken.decode().splitlines()[-1].split()[1])
    assert last_stamp < job_end
    assert last_stamp <= capture["point_in_time"] + 1  # (the guest clock may lead by a little)
    facts = inspect_disk(image)
    assert facts["ssh_host_keys"] == []
    assert facts["machine_id"] == "uninitialized\n"
    assert facts["demo_identity"] is False
    assert facts["redis_files"] == []
    assert facts["traces"] == []

    # The verification boot of the image: a first boot with new identities, nothing
    # failed, clean filesystems. Its application daemon (the counter writer) started
    # there -- the control for "no daemon state in the image": the image's counter file
    # is the point-in-time prefix above, not what the verification boot wrote on.
    verification = summary["verification"]
    assert verification["status"] == "passed", verification
    assert {c["name"]: c["status"] for c in verification["checks"]} == dict.fromkeys(
        ("report", "boot", "failed-units", "machine-id", "ssh-host-keys", "identities", "filesystems"), "passed"
    )
    report = verification["report"]
    assert report["machine_id"]
    assert report["machine_id"] != proto_machine_id
    assert report["machine_id_mounted"] is False
    assert report["ssh_host_keys"], "the first boot made SSH host keys"
    new_keys = [f["sha256"] for f in report["identities"]["ssh-host-keys"]]
    assert new_keys
    assert proto_host_key not in new_keys
    assert report["failed"] == []
    assert report["kernel_fs"] == []
    assert report["fsck_log"] == []
    assert "imgprep-test-writer.service" in report["services"]
    assert "ssh.service" in report["services"]
    assert verification["domain"] == f"imgprep-{summary['job_uuid'][:8]}-verify"

    # Nothing of the job remains; the record names the clone's steps.
    assert leftovers(prototype.conn, summary["job_uuid"], prototype) == []
    record = json.loads(imgprep("jobs", "get", summary["job_uuid"]).stdout)
    assert [c["name"] for c in record["chain"]][1:3] == ["capture", "overlays"]
    assert [s["name"] for s in record["always"]] == ["discard_verify", "discard_clone"]
    assert record["verification"] == verification
    assert all(r["error"] is None for r in record["chain_results"] + record["always_results"])
    assert record["state"]["clone"]["root_target"] == "vda"
    assert record["needs_recovery"] is False


_EVENT_LOOP_LOCK = threading.Lock()
_EVENT_LOOP: list[threading.Thread] = []  # the one loop thread of this process, once started


def _run_event_loop() -> None:
    """Register libvirt's default event loop once per process and run it for the
    process's whole life.

    Once an event implementation is registered, every connection this process opens
    afterwards has libvirt keepalive on: the server drops a connection whose keepalive
    probes go unanswered for 30 s ("Cannot write data: Broken pipe"). So the loop must
    never stop while the process can still open connections; it cannot be unregistered.
    """
    with _EVENT_LOOP_LOCK:
        if _EVENT_LOOP:
            return
        libvirt.virEventRegisterDefaultImpl()

        def loop() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        _EVENT_LOOP.append(threading.Thread(target=loop, name="libvirt-events", daemon=True))
        _EVENT_LOOP[0].start()


class LifecycleEvents:
    """libvirt lifecycle events of one domain, collected by the process's event loop."""

    def __init__(self, uuid: str) -> None:
        _run_event_loop()
        self.events: list[int] = []
        self.conn = libvirt.open(LIBVIRT_URI)
        dom = self.conn.lookupByUUIDString(uuid)
        self._id = self.conn.domainEventRegisterAny(
            dom,
            libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
            lambda _c, _d, event, _detail, _o: self.events.append(event),
            None,
        )

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self.conn.domainEventDeregisterAny(self._id)
        with contextlib.suppress(libvirt.libvirtError):
            self.conn.close()

    def count(self, event: int) -> int:
        return self.events.count(event)


@pytest.fixture
def lifecycle() -> Iterator[Callable[[str], LifecycleEvents]]:
    made: list[LifecycleEvents] = []

    def make(uuid: str) -> LifecycleEvents:
        made.append(LifecycleEvents(uuid))
        return made[-1]

    yield make
    for events in made:
        events.close()


def test_clone_stop_consistency_without_agent(
    make_prototype: Callable[..., Prototype],
    imgprep: Any,
    output_dir: Path,
    lifecycle: Callable[[str], LifecycleEvents],
) -> None:
    """No agent: ``--consistency stop`` shuts the prototype down once and starts it once."""
    proto = make_prototype(agent=False)
    proto.start()
    definition_before = proto.persistent_xml()
    events = lifecycle(proto.uuid)
    # control: without an agent, a freeze is refused up front (exit 2, nothing touched)
    refused = imgprep("create", "--vm", proto.uuid, "--consistency", "freeze", "--output-dir", str(output_dir))
    assert refused.returncode == 2, refused.stderr
    assert "guest agent" in refused.stderr

    result = imgprep(
        "create", "--vm", proto.uuid, "--consistency", "stop", "--output-dir", str(output_dir), "--json", *TIMEOUTS
    )

    assert result.returncode == 0, result.stderr
    capture = result.summary["capture"]
    assert capture["consistency"] == "stop"
    assert capture["downtime_s"] > 0
    print(f"stop downtime {capture['downtime_s']} s")
    time.sleep(2)  # let the event thread take the last events
    assert events.count(libvirt.VIR_DOMAIN_EVENT_STOPPED) == 1, events.events
    assert events.count(libvirt.VIR_DOMAIN_EVENT_STARTED) == 1, events.events
    assert proto.is_running()
    assert proto.persistent_xml() == definition_before
    facts = inspect_disk(Path(result.summary["file"]))
    assert facts["ssh_host_keys"] == []
    assert facts["machine_id"] == "uninitialized\n"
    assert facts["traces"] == []
    assert leftovers(proto.conn, result.summary["job_uuid"], proto) == []


def test_clone_of_shut_off_prototype_raw_and_block_disks(
    block_and_raw_prototype: tuple[Prototype, str], imgprep: Any, output_dir: Path
) -> None:
    """vda a raw data disk, vdb a block device (a loop device) holding the root
    filesystem: both are in the clone; the root disk is found by inspection."""
    proto, device = block_and_raw_prototype
    definition_before = proto.persistent_xml()
    data_disk = Path(proto.persistent_xml().split("<source file='")[1].split("'")[0])
    before = {"data": sha1_of(data_disk), "root": sha1_of(Path(device))}
    control = inspect_disk(Path(device), "raw")
    assert control["ssh_host_keys"], "the prototype has SSH host keys to remove"

    result = imgprep("create", "--vm", proto.uuid, "--output-dir", str(output_dir), "--json", *TIMEOUTS)

    assert result.returncode == 0, result.stderr
    summary = result.summary
    assert summary["capture"]["consistency"] == "shutoff"
    record = json.loads(imgprep("jobs", "get", summary["job_uuid"]).stdout)
    assert record["state"]["clone"]["root_target"] == "vdb"  # not the first disk
    facts = inspect_disk(Path(summary["file"]))
    assert facts["ssh_host_keys"] == []
    assert facts["machine_id"] == "uninitialized\n"
    assert facts["traces"] == []
    assert not proto.is_running()
    assert proto.persistent_xml() == definition_before
    assert {"data": sha1_of(data_disk), "root": sha1_of(Path(device))} == before, "the prototype was written"
    assert leftovers(proto.conn, summary["job_uuid"], proto) == []
    subprocess.run(["qemu-img", "check", summary["file"]], check=True, capture_output=True)
