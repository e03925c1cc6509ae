"""The verification boot (libvirt): the exported image booted once as a throwaway.

What is booted is what was exported: the published qcow2 (``zstd``, ``none``), or for
``gzip``/``xz`` the flattened raw file that the export compressed and hashed in the
same pass (kept for this in the verification directory instead of the export's
workdir). ``qemu-nbd`` serves it read-only (as root: QEMU's user need not reach the
output directory) and a throwaway qcow2 overlay goes over it; one libguestfs launch
writes the verification unit (``units/imgprep-verify.service``), its runner and the
identity list into the overlay, masks the units that only wait for the network (the
boot has none), plus a NoCloud seed with a fresh instance-id when the image has
cloud-init. The domain, ``imgprep-<job8>-verify``, is derived by the same
code as the clone (clonexml.py): transient, no NIC, no passthrough, the guest channel,
``on_poweroff`` destroy, its only disk the overlay at the root disk's target, and for
a UEFI guest a fresh variable store that libvirt makes from the firmware's template.

Everything lives in ``<view_dir>/<job>.verify/`` (and its sockets under
``/run/imgprep``); ``discard`` (the always step ``discard_verify``, also run by
``imgprep jobs recover``) destroys the domain, stops ``qemu-nbd`` and removes it all.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt

from imgprep import artifacts, identities
from imgprep import pointintime as pit
from imgprep.channel import ChannelParser, GuestStatus
from imgprep.clonexml import clone_name, clone_xml
from imgprep.guestchannel import SocketChannel, prepare_socket_dir, socket_path
from imgprep.libguestfs import open_guest, selinux_label
from imgprep.run import run
from imgprep.sanitize import clean
from imgprep.verify import VerificationFailed
from imgprep.workflow import CancelToken

log = logging.getLogger(__name__)

POWEROFF_WAIT = 120.0  # seconds the guest gets to power off after its report
CONSOLE_TAIL = 2048  # bytes of the verification boot's console kept on failure
CLOUD_INIT = ("/usr/bin/cloud-init", "/etc/cloud/cloud.cfg")
# The verification boot has no network by design: the units that only wait for it to
# come online would fail after their timeout (systemd-networkd-wait-online does, in the
# test guest), which says nothing about the image. They are masked in the overlay.
NETWORK_WAITS = (
    "systemd-networkd-wait-online.service",
    "NetworkManager-wait-online.service",
    "ifupdown-wait-online.service",
)


@dataclasses.dataclass
class VerifyState:
    """The verification boot's part of the job record (JSON-able)."""

    directory: str | None = None
    socket_dir: str | None = None
    domain: str | None = None
    domain_uuid: str | None = None
    booted: str | None = None  # what the overlay's backing file is
    cloud_init_seed: bool = False
    masked: list[str] = dataclasses.field(default_factory=list)  # units masked in the overlay (NETWORK_WAITS)
    cleaned: list[str] = dataclasses.field(default_factory=list)


class VerifyBoot:
    """One verification boot of one job's exported image."""

    def __init__(
        self,
        *,
        conn: Callable[[], Any],
        job_uuid: str,
        vm_uuid: str,
        view_root: Path,
        state: VerifyState,
        persist: Callable[[], None],
        force_tcg: bool,
        cancel: CancelToken,
    ) -> None:
        self._conn = conn
        self.job_uuid = job_uuid
        self.vm_uuid = vm_uuid
        self.view_root = view_root
        self.state = state
        self._persist = persist
        self.force_tcg = force_tcg
        self.cancel = cancel
        self._channel: SocketChannel | None = None

    @property
    def files(self) -> pit.ViewFiles:
        directory = self.state.directory or str(self.view_root / f"{self.job_uuid}.verify")
        sockets = self.state.socket_dir or str(pit.SOCKET_ROOT / f"{self.job_uuid}.verify")
        return pit.ViewFiles(Path(directory), Path(sockets))

    @property
    def channel_path(self) -> Path:
        return socket_path(f"{self.job_uuid}.verify")

    def create_dirs(self) -> pit.ViewFiles:
        """The verification directory, owned by QEMU's user (saved before it exists)."""
        files = self.files
        self.state.directory, self.state.socket_dir = str(files.directory), str(files.socket_dir)
        self.state.domain = clone_name(self.job_uuid, "verify")
        self._persist()
        files.create(pit.qemu_owner(self._conn()))
        return files

    def kept_raw(self, image_uuid: str) -> Path:
        """Where a gzip/xz export keeps the raw file it compressed (the bytes booted)."""
        return self.create_dirs().directory / f"{image_uuid}.raw"

    # --- the boot -------------------------------------------------------------------

    def overlay(self, source: Path, fmt: str) -> Path:
        """Serve the exported bytes read-only, and a throwaway overlay over them."""
        files = self.create_dirs()
        owner = pit.qemu_owner(self._conn())
        disk = pit.SourceDisk("image", "file", fmt, str(source))  # type: ignore[arg-type]
        uri = pit.serve_readonly(files, disk, owner)
        overlay = files.overlay("image")
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", uri, str(overlay)])
        os.chown(overlay, *owner)
        self.state.booted = f"{source} ({fmt}, read-only through qemu-nbd, under the throwaway overlay {overlay})"
        self._persist()
        return overlay

    def inject(self, overlay: Path, port: int, settle_timeout: int) -> None:
        """The one libguestfs launch: the verification unit and, with cloud-init, a seed."""
        files = artifacts.verify_injection(
            channel=f"/dev/ttyS{port}", settle_timeout=settle_timeout, identity_list=identities.render_list()
        )
        with open_guest([(overlay, "qcow2")], readonly=False, force_tcg=self.force_tcg, partial=True) as guest:
            written = [artifacts.VERIFY_PREFIX, artifacts.VERIFY_UNIT_PATH, artifacts.VERIFY_WANTS]
            wants = str(Path(artifacts.VERIFY_WANTS).parent)
            if not guest.is_dir(wants):
                guest.mkdir_p(wants)
            guest.rm_rf(artifacts.VERIFY_PREFIX)
            guest.mkdir_p(artifacts.VERIFY_PREFIX, 0o700)
            guest.write_files(files)
            for unit in NETWORK_WAITS:  # masked: no network to wait for
                mask = f"/etc/systemd/system/{unit}"
                guest.rm_rf(mask)
                guest.symlink("/dev/null", mask)
                written.append(mask)
            self.state.masked = list(NETWORK_WAITS)
            if any(guest.exists(p) for p in CLOUD_INIT):
                seed = artifacts.nocloud_seed(f"iid-imgprep-verify-{uuidlib.uuid4().hex}")
                guest.rm_rf(artifacts.NOCLOUD_SEED)
                guest.mkdir_p(artifacts.NOCLOUD_SEED)
                guest.write_files(seed)
                written.append(artifacts.NOCLOUD_SEED)
                self.state.cloud_init_seed = True
            selinux_label(guest, written)
        self._persist()

    def domain_xml(
        self, persistent_xml: str, root_target: str, overlay: Path, channel: ET.Element
    ) -> tuple[str, list[str]]:
        """The verification domain: the clone's derivation, only the image's disk, fresh NVRAM."""
        files = self.files
        has_nvram = ET.fromstring(persistent_xml).find("./os/nvram") is not None
        self.state.domain_uuid = self.state.domain_uuid or str(uuidlib.uuid4())
        self._persist()
        result = clone_xml(
            persistent_xml,
            name=clone_name(self.job_uuid, "verify"),
            uuid=self.state.domain_uuid,
            overlays={root_target: overlay},
            job_dir=files.directory,
            channel=channel,
            nvram=files.directory / "nvram-fresh.fd" if has_nvram else None,  # absent: libvirt copies the template
            only_overlays=True,
        )
        return result.xml, list(result.removed)

    def boot(self, xml: str) -> None:
        prepare_socket_dir()
        self.channel_path.unlink(missing_ok=True)
        conn = self._conn()
        conn.createXML(xml, 0)
        self._channel = SocketChannel(self.channel_path, ChannelParser())
        self._channel.connect()  # at once: QEMU drops what is written before we connect

    def _active(self) -> bool:
        try:
            return bool(self._conn().lookupByName(self.state.domain).isActive())
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return False  # a transient domain that powered off is gone
            raise

    def wait_report(self, timeout: float) -> str:
        """The guest's report (raw text), then its power-off (bounded; else it is destroyed)."""
        assert self._channel is not None
        deadline = time.monotonic() + timeout
        status = GuestStatus()
        while True:
            self.cancel.check()
            status = self._channel.poll()
            if status.verify is not None:
                break
            if not self._active():
                self._channel.drain()
                status = self._channel.poll()
                if status.verify is not None:
                    break
                raise VerificationFailed("the verification boot powered off without a report" + self._console_hint())
            if time.monotonic() >= deadline:
                raise VerificationFailed(
                    f"no verification report within {timeout:.0f}s of the verification boot" + self._console_hint()
                )
            self.cancel.sleep(1.0)
        poweroff = time.monotonic() + POWEROFF_WAIT
        while self._active() and time.monotonic() < poweroff:
            self.cancel.sleep(1.0)
        if self._active():
            log.warning("the verification boot did not power off within %.0fs: destroying it", POWEROFF_WAIT)
            self._conn().lookupByName(self.state.domain).destroy()
        return status.verify

    def console_tail(self) -> str:
        """The end of the verification boot's console (guest text: escaped, bounded)."""
        logs = sorted(self.files.directory.glob("chardev*.log")) if self.files.directory.exists() else []
        if not logs:
            return ""
        with logs[0].open("rb") as f:
            f.seek(max(0, logs[0].stat().st_size - CONSOLE_TAIL))
            return clean(f.read().decode(errors="replace"), multiline=True)

    def _console_hint(self) -> str:
        tail = self.console_tail().strip().splitlines()[-3:]
        return f" (console: {' | '.join(tail)})" if tail else ""

    # --- cleanup --------------------------------------------------------------------

    def discard(self) -> None:
        """Destroy the domain, stop qemu-nbd, remove the directory and sockets. Idempotent."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        self.channel_path.unlink(missing_ok=True)
        files = self.files
        name = clone_name(self.job_uuid, "verify")
        if not (files.directory.exists() or (files.socket_dir and files.socket_dir.exists()) or self._exists(name)):
            return
        done = pit.cleanup(self._conn(), self.vm_uuid, files, name)
        self.state.cleaned += done
        self._persist()

    def _exists(self, name: str) -> bool:
        try:
            self._conn().lookupByName(name)
        except libvirt.libvirtError:
            return False
        return True
