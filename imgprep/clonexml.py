"""The clone's domain XML, derived from the prototype's: a pure function, no libvirt.

The clone is a transient domain that boots the prototype's devices and firmware over
throwaway overlays. It must never collide with the prototype or reach what the
prototype reaches:

* its own name (``imgprep-<job8>-<vm name>``) and UUID; no ``<genid>`` or SMBIOS UUID
  of the prototype's;
* every ``device='disk'`` disk replaced by a qcow2 overlay file (all of them: ``/var``
  on a second disk is prepared too); read-only CD-ROMs kept, floppies and LUN
  passthrough dropped;
* no NIC at all (the clone never appears on the prototype's network with its MAC or
  address), no host device, filesystem share, USB redirection, smartcard, TPM, shared
  memory, vsock or graphics;
* file-backed serial/console/parallel ports and ``<log>`` files redirected into the
  job directory (a console and a serial port that shared one file still share one);
  listening or host-device character devices replaced by ``null``; every channel
  (guest agent, SPICE) dropped, then the caller's guest channel added;
* the UEFI variable store (``<nvram>``) pointed at the caller's private copy;
* ``on_poweroff``/``on_reboot``/``on_crash`` destroy; every ``<seclabel>`` removed so
  libvirt labels the clone dynamically.

What was dropped is returned for the job record, so nothing disappears silently.
"""

from __future__ import annotations

import copy
import dataclasses
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

from imgprep.errors import NotSupported

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
ET.register_namespace("qemu", QEMU_NS)
NAME_PREFIX = "imgprep-"
MAX_NAME = 200  # libvirt accepts longer, but keep file names derived from it sane

# devices that reach host resources or another VM's, and are never in a clone
_DROPPED_DEVICES = (
    "interface",
    "hostdev",
    "filesystem",
    "redirdev",
    "redirfilter",
    "smartcard",
    "tpm",
    "shmem",
    "vsock",
    "graphics",
    "channel",
)
_CHARDEVS = ("serial", "console", "parallel")
_CHARDEV_KEEP = ("pty", "null", "vc", "stdio")  # nothing on the host to collide with


@dataclasses.dataclass(frozen=True)
class CloneXml:
    xml: str
    removed: tuple[str, ...]  # one line per device or setting dropped or redirected


def clone_name(job_uuid: str, vm_name: str) -> str:
    return (NAME_PREFIX + job_uuid[:8] + "-" + vm_name)[:MAX_NAME]


def _describe(element: ET.Element) -> str:
    detail = element.get("type") or ""
    target = element.find("target")
    if target is not None and (target.get("dev") or target.get("name")):
        detail += " " + (target.get("dev") or target.get("name") or "")
    mac = element.find("mac")
    if mac is not None and mac.get("address"):
        detail += " " + (mac.get("address") or "")
    return f"<{element.tag}{' ' + detail.strip() if detail.strip() else ''}>"


def _redirect_chardev(
    dev: ET.Element, job_dir: Path, redirected: dict[str, Path], removed: list[str], index: int
) -> None:
    kind = dev.get("type", "pty")
    source = dev.find("source")
    if kind == "file" and source is not None and source.get("path"):
        old = source.get("path") or ""
        new = redirected.setdefault(old, job_dir / f"chardev{len(redirected)}.log")
        source.set("path", str(new))
        removed.append(f"<{dev.tag}> file {old} redirected to {new}")
    elif kind not in _CHARDEV_KEEP:
        for child in list(dev):
            if child.tag not in ("target", "alias", "address"):
                dev.remove(child)
        dev.set("type", "null")
        removed.append(f"<{dev.tag} type='{kind}'> {index} replaced by type='null'")
    log = dev.find("log")
    if log is not None and log.get("file"):
        old = log.get("file") or ""
        new = redirected.setdefault(old, job_dir / f"chardev{len(redirected)}.log")
        log.set("file", str(new))
        log.attrib.pop("append", None)


def _replace_disk(disk: ET.Element, overlay: Path) -> None:
    """Point a disk at its overlay: a local qcow2 file, no backing chain in the XML
    (libvirt reads it from the overlay's header), nothing shared or labelled."""
    disk.set("type", "file")
    driver = disk.find("driver")
    if driver is None:
        driver = ET.Element("driver")
        disk.insert(0, driver)
    driver.set("name", "qemu")
    driver.set("type", "qcow2")
    for child in list(disk):
        if child.tag in ("source", "backingStore", "shareable", "readonly", "transient", "mirror"):
            disk.remove(child)
    source = ET.Element("source", {"file": str(overlay)})
    disk.insert(list(disk).index(driver) + 1, source)


def clone_xml(
    prototype_xml: str,
    *,
    name: str,
    uuid: str,
    overlays: Mapping[str, Path],
    job_dir: Path,
    channel: ET.Element,
    nvram: Path | None,
    only_overlays: bool = False,
) -> CloneXml:
    """The clone's definition. ``overlays`` maps every disk target (``vda``) to its
    overlay; ``channel`` is the guest channel element to add; ``nvram`` is the private
    copy of the prototype's UEFI variable store (required when it has one), or a path
    that does not exist yet, which libvirt fills from the firmware's template.
    ``only_overlays``: the disks without an overlay are dropped (the verification boot
    of an image that holds one disk) instead of refused."""
    root = ET.fromstring(prototype_xml)
    removed: list[str] = []
    devices = root.find("devices")
    if devices is None:
        raise NotSupported("domain XML has no <devices>")

    for tag, value in (("name", name), ("uuid", uuid)):
        element = root.find(tag)
        if element is None:
            element = ET.SubElement(root, tag)
        element.text = value
    for tag in ("genid", "title", "metadata"):
        for element in root.findall(tag):
            root.remove(element)
    for entry in root.findall("./sysinfo/system/entry"):
        if entry.get("name") == "uuid":  # must equal the domain's UUID
            parent = root.find("./sysinfo/system")
            assert parent is not None
            parent.remove(entry)
    for parent in list(root.iter()):
        for seclabel in parent.findall("seclabel"):
            parent.remove(seclabel)
    for commandline in root.findall(f"{{{QEMU_NS}}}commandline"):
        root.remove(commandline)
        removed.append("<qemu:commandline> (arbitrary QEMU arguments)")

    os_element = root.find("os")
    nv = os_element.find("nvram") if os_element is not None else None
    if nv is not None:
        if nvram is None:
            raise NotSupported("the VM has a UEFI variable store (<nvram>); the clone needs a private copy")
        nv.text = str(nvram)
        nv.attrib.pop("type", None)  # a network or block store becomes a plain file
        for child in list(nv):
            nv.remove(child)
        removed.append(f"<nvram> replaced by the copy {nvram}")

    seen: set[str] = set()
    for disk in devices.findall("disk"):
        device = disk.get("device", "disk")
        target = disk.find("target")
        dev = target.get("dev", "") if target is not None else ""
        if device == "disk":
            if dev not in overlays and only_overlays:
                devices.remove(disk)
                removed.append(f"<disk device='disk'> {dev} (not in the image)")
                continue
            if dev not in overlays:
                raise NotSupported(f"disk {dev or '?'} has no overlay; every disk of the VM must be in the clone")
            _replace_disk(disk, overlays[dev])
            seen.add(dev)
        elif device == "cdrom":
            if disk.find("readonly") is None:
                ET.SubElement(disk, "readonly")
        else:
            devices.remove(disk)
            removed.append(f"<disk device='{device}'> {dev}")
    missing = sorted(set(overlays) - seen)
    if missing:
        raise NotSupported(f"overlays for disks the VM does not have: {', '.join(missing)}")

    for tag in _DROPPED_DEVICES:
        for element in devices.findall(tag):
            devices.remove(element)
            removed.append(_describe(element))
    for rng in devices.findall("rng"):
        backend = rng.find("backend")
        if backend is None or backend.get("model", "random") != "random":
            devices.remove(rng)
            removed.append(_describe(rng))

    redirected: dict[str, Path] = {}
    for tag in _CHARDEVS:
        for index, chardev in enumerate(devices.findall(tag)):
            _redirect_chardev(chardev, job_dir, redirected, removed, index)

    devices.append(copy.deepcopy(channel))
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        element = root.find(event)
        if element is None:
            element = ET.SubElement(root, event)
        element.text = "destroy"
    return CloneXml(ET.tostring(root, encoding="unicode"), tuple(removed))


def disk_targets(prototype_xml: str) -> list[str]:
    """The targets of the prototype's ``device='disk'`` disks, in order."""
    root = ET.fromstring(prototype_xml)
    targets = []
    for disk in root.findall("./devices/disk"):
        if disk.get("device", "disk") == "disk":
            target = disk.find("target")
            targets.append(target.get("dev", "") if target is not None else "")
    return targets
