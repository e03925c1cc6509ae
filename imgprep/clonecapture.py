"""Clone mode as one capture strategy: the point-in-time view, the overlays and the
clone, and their cleanup, as steps the libvirt backend runs (docs/capture.md).

create: ``capture`` (the view: backup job or qemu-nbd; the UEFI variable store
copied) then ``overlays`` (one throwaway qcow2 per disk). always: ``discard_clone``
(destroy the clone, end the backup job or qemu-nbd, delete the view directory;
idempotent, so recovery runs it again). Everything the cleanup needs is in
:class:`CloneState`, saved before each action that creates something.

While a running prototype's view exists, a :class:`~imgprep.scratchguard.ScratchGuard`
ends it before its scratch files can fill the view directory, and
:meth:`CloneCapture.check_view` fails the job once the view has ended (the prototype
stopped, its backup job ended, or the guard ended it).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import libvirt

from imgprep import pointintime as pit
from imgprep.clonexml import clone_name, clone_xml
from imgprep.errors import InvalidInput
from imgprep.guestagent import AgentProbe, probe
from imgprep.scratchguard import ScratchGuard

log = logging.getLogger(__name__)


def choose_consistency(requested: pit.Consistency | None, running: bool, agent: AgentProbe | None) -> str:
    """``freeze`` when the agent answers, ``stop`` when the VM has no agent channel,
    unless asked otherwise; ``shutoff`` for a shut-off prototype (``agent``: the probe
    of a running one; ``None`` = not probed, as for ``crash``).

    Refused, before anything is touched (docs/capture.md, *The guest agent*):
    ``auto`` or ``freeze`` when the VM has an agent channel but its agent is silent (a
    silently weaker image, or a shutdown the operator did not ask for, is worse than
    none: Nova's os_require_quiesce); ``freeze`` without an agent channel; ``stop``
    while the agent answers (libvirt 9.0 would leave it disconnected, *Limits*)."""
    if not running:
        return "shutoff"
    if requested == "crash":
        return "crash"
    answer = agent.answer if agent is not None else "absent"
    why = agent.describe() if agent is not None else "the guest agent was not asked"
    if answer != "answers" and requested in (None, "freeze"):
        if answer == "absent":
            if requested is None:
                return "stop"
            why = "the VM has no guest agent channel"
        asked = "--consistency freeze" if requested else "--consistency auto (the VM has a guest agent channel)"
        raise InvalidInput(
            f"{asked} needs the QEMU guest agent to freeze the filesystems, but {why}; start the agent "
            "(or give it longer: timeouts.agent, --agent-timeout), or choose --consistency stop "
            "(a brief shutdown) or crash (no downtime, as after a power loss)",
            code="AgentUnavailable",
        )
    if requested == "stop" and answer == "answers":
        # libvirt 9.0 drops the agent's connect event while a backup job runs: a
        # prototype restarted under the job would keep its agent disconnected
        raise InvalidInput(
            "--consistency stop would leave the guest agent of the restarted VM disconnected from libvirt; "
            "the agent answers, so use --consistency freeze (no downtime)",
            code="AgentWouldDisconnect",
        )
    return requested or "freeze"


def nvram_of(domain_xml: str) -> tuple[Path | None, Path | None]:
    """The prototype's UEFI variable store (``<os><nvram>``) and the template libvirt
    creates it from, as the definition names them."""
    element = ET.fromstring(domain_xml).find("./os/nvram")
    if element is None or not (element.text or "").strip():
        return None, None
    template = element.get("template")
    return Path((element.text or "").strip()), Path(template) if template else None


@dataclasses.dataclass
class CloneState:
    """The clone capture's part of the job record (JSON-able)."""

    view_dir: str | None = None
    socket_dir: str | None = None  # the NBD sockets (a short path)
    clone_name: str | None = None
    clone_uuid: str | None = None
    consistency: str | None = None
    view: dict[str, Any] | None = None  # pointintime.View.as_json()
    nvram: str | None = None
    root_target: str | None = None  # the disk holding the root filesystem (inspection)
    removed: list[str] = dataclasses.field(default_factory=list)  # what the clone XML dropped
    cleaned: list[str] = dataclasses.field(default_factory=list)
    scratch_trip: dict[str, Any] | None = None  # the scratch guard ended the view (scratchguard.Trip)


class CloneCapture:
    name: ClassVar[str] = "clone"

    def __init__(
        self,
        *,
        conn: Callable[[], Any],
        vm_uuid: str,
        vm_name: str,
        job_uuid: str,
        view_root: Path,
        state: CloneState,
        persist: Callable[[], None],
        consistency: pit.Consistency | None = None,
        agent_timeout: int = 10,
        stop_timeout: float = 300.0,
        socket_root: Path | None = None,
        scratch_reserve: int = 0,
        guard_connect: Callable[[], Any] | None = None,
    ) -> None:
        """``scratch_reserve`` (bytes) and ``guard_connect`` (a libvirt connection of its
        own, for the guard's thread): the scratch guard of a running prototype's view."""
        self._conn = conn
        self.vm_uuid = vm_uuid
        self.vm_name = vm_name
        self.job_uuid = job_uuid
        self.view_root = view_root
        self.state = state
        self._persist = persist
        self.requested = consistency
        self.agent_timeout = agent_timeout
        self.stop_timeout = stop_timeout
        self.socket_root = socket_root
        self.scratch_reserve = scratch_reserve
        self._guard_connect = guard_connect
        self._view: pit.View | None = None
        self._guard: ScratchGuard | None = None

    # --- the steps ---------------------------------------------------------------

    def create_steps(self) -> list[tuple[str, Callable[[], None]]]:
        return [("capture", self.capture), ("overlays", self.overlays)]

    def always_steps(self) -> list[tuple[str, Callable[[], None]]]:
        return [("discard_clone", self.discard)]

    @property
    def files(self) -> pit.ViewFiles:
        socket_dir = self.state.socket_dir or (str(self.socket_root / self.job_uuid) if self.socket_root else None)
        return pit.ViewFiles(
            Path(self.state.view_dir or self.view_root / self.job_uuid), Path(socket_dir) if socket_dir else None
        )

    def _dom(self) -> Any:
        return self._conn().lookupByUUIDString(self.vm_uuid)

    def capture(self) -> None:
        if self.state.view is not None:
            return  # already taken (a retried step): never take a second one
        conn, dom = self._conn(), self._dom()
        files = self.files
        self.state.view_dir = str(files.directory)
        self.state.socket_dir = str(files.socket_dir) if files.socket_dir else None
        self.state.clone_name = clone_name(self.job_uuid, self.vm_name)
        self.state.clone_uuid = str(uuidlib.uuid4())
        self._persist()  # before anything exists: cleanup must know where to look
        running = bool(dom.isActive())
        # decided before anything exists: a silent agent fails the job here, untouched
        agent = probe(dom, self.agent_timeout) if running and self.requested != "crash" else None
        consistency = choose_consistency(self.requested, running, agent)
        self.state.consistency = consistency
        self._persist()
        owner = pit.qemu_owner(conn)
        files.create(owner)
        persistent = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        disks = pit.SourceDisk.from_xml(persistent)
        nvram, template = nvram_of(persistent)
        if nvram is not None:
            self.state.nvram = str(pit.copy_nvram(nvram, template, files, owner))
        if consistency == "shutoff":
            view = pit.capture_shutoff(dom, files, disks, owner)
        else:
            view = pit.capture_running(
                dom,
                files,
                disks,
                consistency,  # type: ignore[arg-type]
                agent_timeout=self.agent_timeout,
                stop_timeout=self.stop_timeout,
            )
        self._view = view
        self.state.view = view.as_json()
        pit.save(files, view)
        self._persist()
        if view.how == "backup":
            self._start_guard(files)

    def _start_guard(self, files: pit.ViewFiles) -> None:
        if self._guard is not None or not self.scratch_reserve or self._guard_connect is None:
            return
        self._guard = ScratchGuard(files.directory, self.scratch_reserve, self._end_view_now)
        self._guard.start()

    def _end_view_now(self) -> tuple[bool, bool]:
        """The guard's action (in its thread, on its own connection): end the backup
        job, then resume the prototype if a scratch write error paused it meanwhile."""
        assert self._guard_connect is not None
        conn = self._guard_connect()
        try:
            dom = conn.lookupByUUIDString(self.vm_uuid)
            ended = pit.end_backup(dom, self.files)
            return ended, pit.resume_after_write_error(dom)
        finally:
            conn.close()

    def stop_guard(self) -> None:
        if self._guard is not None:
            self._guard.stop()
            self._guard = None

    def overlays(self) -> None:
        view = self.view()
        if not all(d.overlay.exists() for d in view.disks):
            pit.make_overlays(view)
        owner = pit.qemu_owner(self._conn())
        for disk in view.disks:  # the clone's QEMU (and libvirt probing as its user) opens them
            os.chown(disk.overlay, *owner)

    def discard(self) -> None:
        self.stop_guard()
        files = self.files if self.state.view_dir else None
        if files is None:
            return  # nothing was created
        if self.state.consistency == "stop" and self.state.view is None:
            self._restart_after_stop()
        done = pit.cleanup(self._conn(), self.vm_uuid, files, self.state.clone_name)
        self.state.cleaned += done
        self._persist()

    def _restart_after_stop(self) -> None:
        """A stop-mode capture that did not finish (imgprep died or failed between the
        shutdown and the resume): the prototype was running, so it runs again."""
        try:
            dom = self._dom()
            state = dom.state()[0]
        except libvirt.libvirtError:
            return
        if state == libvirt.VIR_DOMAIN_PAUSED:
            dom.resume()
            self.state.cleaned.append("resumed the prototype")
        elif state == libvirt.VIR_DOMAIN_SHUTOFF:
            dom.create()
            self.state.cleaned.append("started the prototype again")
        self._persist()

    # --- what the rest of the chain uses ------------------------------------------

    def view(self) -> pit.View:
        if self._view is None:
            if self.state.view is None:
                raise RuntimeError("no view taken yet")
            self._view = _view_from_json(self.state.view)
        return self._view

    def disks(self) -> list[tuple[Path, str]]:
        """The overlays (what inject writes and export reads), the root disk first once
        inspection named it."""
        disks = list(self.view().disks)
        disks.sort(key=lambda d: d.target != self.state.root_target)
        return [(d.overlay, "qcow2") for d in disks]

    def set_root_index(self, index: int) -> None:
        """Inspection found the root filesystem on the ``index``-th disk (in view order)."""
        self.state.root_target = self.view().disks[index].target
        self._persist()

    def check_view(self) -> None:
        """Fail the job if the view stopped being a point in time: a shut-off prototype
        was started, a running one stopped or lost its backup job, or the scratch guard
        ended the view."""
        trip = self._guard.result() if self._guard is not None else None
        if trip is not None:
            if self.state.scratch_trip is None:
                self.state.scratch_trip = trip.as_json()
                self._persist()
            raise pit.ScratchSpaceLow(trip.message())
        dom, view = self._dom(), self.view()
        pit.check_unchanged(dom, view)
        pit.check_running(dom, view, self.files)

    def boot_xml(self, channel: ET.Element) -> str:
        """The clone's definition for the prepare boot (``channel``: the guest channel)."""
        if not (self.state.clone_name and self.state.clone_uuid and self.state.view_dir):
            raise RuntimeError("boot_xml before capture")
        persistent = self._dom().XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
        result = clone_xml(
            persistent,
            name=self.state.clone_name,
            uuid=self.state.clone_uuid,
            overlays={d.target: d.overlay for d in self.view().disks},
            job_dir=Path(self.state.view_dir),
            channel=channel,
            nvram=Path(self.state.nvram) if self.state.nvram else None,
        )
        self.state.removed = list(result.removed)
        self._persist()
        return result.xml

    def boot_domain(self) -> Any:
        """The clone's libvirt domain (the prepare boot polls it, not the prototype)."""
        return self._conn().lookupByName(self.state.clone_name)


def _view_from_json(data: dict[str, Any]) -> pit.View:
    disks = tuple(
        pit.ViewDisk(d["target"], d["uri"], Path(d["overlay"]), pit.SourceDisk(**d["source"])) for d in data["disks"]
    )
    freeze = pit.FreezeReport(**data["freeze"]) if data.get("freeze") else None
    return pit.View(
        data["how"],
        data["consistency"],
        disks,
        data["taken_at"],
        freeze,
        data.get("downtime_s"),
        data.get("fingerprint"),
        data.get("domain_id"),
    )
