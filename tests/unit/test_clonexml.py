"""The prototype's domain XML -> the clone's: pure, checked element by element."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from imgprep.clonexml import clone_name, clone_xml, disk_targets
from imgprep.errors import NotSupported

PROTO_UUID = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
CLONE_UUID = "9f1c2d3e-0000-4000-8000-000000000001"
JOB = Path("/var/lib/imgprep/views/job1")

PROTOTYPE = f"""<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web1</name>
  <uuid>{PROTO_UUID}</uuid>
  <genid>43dc0cf8-809b-4adb-9bea-a9abb5f3d90d</genid>
  <title>production web</title>
  <metadata><app:x xmlns:app='urn:app'>1</app:x></metadata>
  <memory unit='KiB'>1048576</memory>
  <sysinfo type='smbios'>
    <system><entry name='uuid'>{PROTO_UUID}</entry><entry name='serial'>S1</entry></system>
  </sysinfo>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <seclabel type='static' model='dac' relabel='yes'><label>+1000:+1000</label></seclabel>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/var/lib/libvirt/images/web1.qcow2'><seclabel model='dac' relabel='no'/></source>
      <backingStore type='file'><format type='qcow2'/><source file='/var/lib/libvirt/images/base.qcow2'/></backingStore>
      <target dev='vda' bus='virtio'/>
      <serial>ROOTDISK</serial>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg0/web1-var'/>
      <target dev='vdb' bus='virtio'/>
      <shareable/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/isos/tools.iso'/>
      <target dev='sda' bus='sata'/>
    </disk>
    <disk type='file' device='floppy'>
      <source file='/var/lib/libvirt/images/floppy.img'/>
      <target dev='fda' bus='fdc'/>
    </disk>
    <interface type='bridge'>
      <mac address='52:54:00:aa:bb:cc'/>
      <source bridge='br0'/>
      <model type='virtio'/>
    </interface>
    <interface type='network'><mac address='52:54:00:aa:bb:cd'/><source network='default'/></interface>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0x0000' bus='0x03' slot='0x00' function='0x0'/></source>
    </hostdev>
    <filesystem type='mount'><source dir='/srv/share'/><target dir='share'/></filesystem>
    <redirdev bus='usb' type='spicevmc'/>
    <smartcard mode='passthrough' type='spicevmc'/>
    <tpm model='tpm-crb'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>
    <shmem name='ivshmem0'><model type='ivshmem-plain'/><size unit='M'>4</size></shmem>
    <vsock model='virtio'><cid auto='no' address='42'/></vsock>
    <graphics type='vnc' port='5901' autoport='no' listen='0.0.0.0'/>
    <serial type='file'>
      <source path='/var/log/web1-console.log'/>
      <target port='0'/>
      <log file='/var/log/web1-serial-log.log' append='on'/>
    </serial>
    <console type='file'>
      <source path='/var/log/web1-console.log'/>
      <target type='serial' port='0'/>
    </console>
    <serial type='tcp'>
      <source mode='bind' host='0.0.0.0' service='4555'/>
      <protocol type='telnet'/>
      <target port='1'/>
    </serial>
    <serial type='pty'><target port='2'/></serial>
    <parallel type='dev'><source path='/dev/parport0'/><target port='0'/></parallel>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/web1.org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <rng model='virtio'>
      <backend model='egd' type='tcp'><source mode='connect' host='10.0.0.1' service='708'/></backend>
    </rng>
    <video><model type='virtio'/></video>
  </devices>
  <qemu:commandline><qemu:arg value='-netdev'/><qemu:arg value='tap,id=x'/></qemu:commandline>
</domain>
"""

OVERLAYS = {"vda": JOB / "vda.overlay.qcow2", "vdb": JOB / "vdb.overlay.qcow2"}


def channel() -> ET.Element:
    serial = ET.Element("serial", {"type": "unix"})
    ET.SubElement(serial, "source", {"mode": "bind", "path": str(JOB / "channel.sock")})
    ET.SubElement(serial, "target", {"port": "3"})
    return serial


def make(xml: str = PROTOTYPE, nvram: Path | None = JOB / "nvram.fd") -> tuple[ET.Element, tuple[str, ...]]:
    result = clone_xml(
        xml,
        name="imgprep-1234abcd-web1",
        uuid=CLONE_UUID,
        overlays=OVERLAYS,
        job_dir=JOB,
        channel=channel(),
        nvram=nvram,
    )
    return ET.fromstring(result.xml), result.removed


def test_name_and_uuid_are_the_clones_and_nothing_else_identifies_the_prototype() -> None:
    root, _ = make()
    assert root.findtext("name") == "imgprep-1234abcd-web1"
    assert root.findtext("uuid") == CLONE_UUID
    assert root.find("genid") is None
    assert root.find("title") is None
    assert root.find("metadata") is None
    entries = {e.get("name"): e.text for e in root.findall("./sysinfo/system/entry")}
    assert entries == {"serial": "S1"}
    assert PROTO_UUID not in ET.tostring(root, encoding="unicode")


def test_clone_name() -> None:
    assert clone_name("1234abcd-0000-4000-8000-000000000000", "web1") == "imgprep-1234abcd-web1"
    assert len(clone_name("1234abcd", "x" * 500)) == 200


def test_every_disk_becomes_its_qcow2_overlay_file() -> None:
    root, _ = make()
    disks = {str(d.find("target").get("dev")): d for d in root.findall("./devices/disk")}  # type: ignore[union-attr]
    assert sorted(disks) == ["sda", "vda", "vdb"]
    for target in ("vda", "vdb"):
        disk = disks[target]
        assert disk.get("type") == "file"
        driver = disk.find("driver")
        assert driver is not None
        assert driver.get("type") == "qcow2"
        sources = disk.findall("source")
        assert [s.attrib for s in sources] == [{"file": str(OVERLAYS[target])}]
        assert disk.find("backingStore") is None
        assert disk.find("shareable") is None
    root_disk = disks["vda"]
    assert root_disk.findtext("serial") == "ROOTDISK"  # the guest may mount by serial
    driver = root_disk.find("driver")
    assert driver is not None
    assert driver.get("cache") == "none"
    # the read-only CD-ROM stays (and is made read-only); a floppy is writable: gone
    assert disks["sda"].find("readonly") is not None


def test_no_nic_passthrough_or_host_resource_remains() -> None:
    root, removed = make()
    devices = root.find("devices")
    assert devices is not None
    for tag in (
        "interface",
        "hostdev",
        "filesystem",
        "redirdev",
        "smartcard",
        "tpm",
        "shmem",
        "vsock",
        "graphics",
    ):
        assert devices.find(tag) is None, tag
    text = ET.tostring(root, encoding="unicode")
    for needle in ("52:54:00:aa:bb:cc", "br0", "/dev/tpm0", "5901", "4555", "/dev/parport0", "10.0.0.1", "floppy"):
        assert needle not in text, needle
    assert root.find("{http://libvirt.org/schemas/domain/qemu/1.0}commandline") is None
    rngs = devices.findall("rng")
    assert len(rngs) == 1
    assert rngs[0].findtext("backend") == "/dev/urandom"
    assert any("52:54:00:aa:bb:cc" in line for line in removed)
    assert any("commandline" in line for line in removed)
    assert devices.find("video") is not None  # harmless devices stay


def test_chardevs_redirected_into_the_job_dir_and_channels_replaced_by_ours() -> None:
    root, removed = make()
    devices = root.find("devices")
    assert devices is not None
    serials = devices.findall("serial")
    paths = [s.find("source").get("path") for s in serials if s.get("type") == "file"]  # type: ignore[union-attr]
    console = devices.find("console/source")
    assert console is not None
    # the console and serial 0 shared one file; they still share one, inside the job dir
    assert paths == [console.get("path")]
    assert Path(paths[0] or "").parent == JOB
    log = devices.find("serial/log")
    assert log is not None
    assert Path(log.get("file", "")).parent == JOB
    assert log.get("append") is None
    kinds = [(s.get("type"), s.find("target").get("port")) for s in serials]  # type: ignore[union-attr]
    assert kinds == [("file", "0"), ("null", "1"), ("pty", "2"), ("unix", "3")]
    parallel = devices.find("parallel")
    assert parallel is not None
    assert parallel.get("type") == "null"
    assert devices.findall("channel") == []
    assert any("web1-console.log" in line for line in removed)


def test_nvram_is_the_private_copy_and_power_events_destroy() -> None:
    root, _ = make()
    nvram = root.find("os/nvram")
    assert nvram is not None
    assert nvram.text == str(JOB / "nvram.fd")
    assert nvram.get("template") == "/usr/share/OVMF/OVMF_VARS_4M.fd"
    loader = root.find("os/loader")
    assert loader is not None
    assert loader.text == "/usr/share/OVMF/OVMF_CODE_4M.fd"
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        assert root.findtext(event) == "destroy"


def test_seclabels_left_to_libvirts_dynamic_labelling() -> None:
    root, _ = make()
    assert list(root.iter("seclabel")) == []


def test_nvram_without_a_copy_is_refused() -> None:
    with pytest.raises(NotSupported, match="nvram"):
        make(nvram=None)


def test_every_disk_needs_an_overlay_and_no_overlay_is_for_a_missing_disk() -> None:
    with pytest.raises(NotSupported, match="vdb"):
        clone_xml(
            PROTOTYPE,
            name="c",
            uuid=CLONE_UUID,
            overlays={"vda": OVERLAYS["vda"]},
            job_dir=JOB,
            channel=channel(),
            nvram=JOB / "nvram.fd",
        )
    with pytest.raises(NotSupported, match="vdz"):
        clone_xml(
            PROTOTYPE,
            name="c",
            uuid=CLONE_UUID,
            overlays={**OVERLAYS, "vdz": JOB / "vdz.qcow2"},
            job_dir=JOB,
            channel=channel(),
            nvram=JOB / "nvram.fd",
        )


def test_the_prototype_xml_string_is_not_modified_and_targets_listed() -> None:
    before = str(PROTOTYPE)
    make()
    assert before == PROTOTYPE
    assert disk_targets(PROTOTYPE) == ["vda", "vdb"]
