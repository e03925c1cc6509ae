"""Real guest layouts for the end-to-end matrix, each booting through its own bootloader.

Every layout is the Debian 12 test guest of tests/guestimage.py (same daemons, same
``ConditionFirstBoot=no`` drop-ins, same customisation) debootstrapped with the extra
packages real fleets have (GRUB for BIOS and UEFI, LVM, XFS, btrfs, SELinux, cloud-init),
then laid out on a qcow2 disk entirely inside libguestfs' appliance: partitioned, LVM
and filesystems created, the tree unpacked with its xattrs, ``grub-install`` and
``update-grub`` (and ``setfiles``) run in the guest via the appliance. Nothing is
mounted on the host. Layouts:

``bios-lvm-xfs``
    BIOS + GRUB from the disk, GPT (a ``bios_grub`` partition), ``/boot`` ext4, root and
    ``/var`` on their own logical volumes, both XFS (the RHEL family's default layout).
``uefi-btrfs``
    UEFI (OVMF) + GRUB on a vfat ESP (removable path, so no NVRAM entry is needed), root
    on btrfs subvolume ``@`` with ``/var`` on subvolume ``@var``.
``selinux``
    BIOS + GRUB, GPT, root ext4, SELinux enforcing (``selinux=1 security=selinux
    enforcing=1``), the filesystem labelled with the guest's own ``file_contexts``.
``cloud``
    A cloud image as Debian's own image builder (debian-cloud-images, FAI) lays it out:
    GPT with partition 14 BIOS boot (3 MiB at 1 MiB), 15 the ESP (124 MiB, vfat), 1 the
    root filesystem (ext4, the rest); GRUB for BIOS (core image in partition 14) and for
    UEFI (also on the removable path, no NVRAM entry); cloud-init with the NoCloud and
    ConfigDrive datasources; never booted: an empty ``/etc/machine-id`` and
    ``/etc/hostname``, no SSH host keys, no D-Bus machine-id. It boots with either
    firmware.

Each is cached under ``<cache>/layouts/<name>-<recipe hash>``; the debootstrapped tree is
cached once for all of them. ``python -m tests.layouts build NAME`` prints the directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape as xml_escape

from imgprep.libguestfs import Guest, selinux_label
from tests import guestimage
from tests.guestimage import _customize, _run, cache_root

EXTRA_PACKAGES = (
    "grub2-common",
    "grub-pc-bin",
    "grub-efi-amd64-bin",
    "lvm2",
    "xfsprogs",
    "btrfs-progs",
    "dosfstools",
    "selinux-basics",
    "selinux-policy-default",
    "auditd",
)
# Installed with apt in a second stage: debootstrap's own resolver fails on its Python
# dependencies (python3-cryptography does not configure).
APT_PACKAGES = ("cloud-init",)
# apt-get in the tree, with a private /proc that vanishes with the mount namespace.
APT_IN_TREE = """
set -e
root=$1
shift
mount -t proc proc "$root/proc"
chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    sh -c 'apt-get update -q && apt-get install -y -q --no-install-recommends "$@" && apt-get clean' apt "$@"
"""
LAYOUTS = ("bios-lvm-xfs", "uefi-btrfs", "selinux", "cloud")
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
DISK_SIZE = 3 * 1024**3
CMDLINE = "console=ttyS0,115200 net.ifnames=0"
SELINUX_CMDLINE = "selinux=1 security=selinux enforcing=1"
BIOS_GRUB_GUID = "21686148-6449-6E6F-744E-656564454649"
ESP_GUID = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_ROOT_X86_64_GUID = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"

GRUB_DEFAULT = """GRUB_DEFAULT=0
GRUB_TIMEOUT=1
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="{cmdline}"
GRUB_TERMINAL="serial console"
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
GRUB_DISABLE_OS_PROBER=true
"""
SELINUX_CONFIG = "SELINUX=enforcing\nSELINUXTYPE=default\n"
CLOUD_DATASOURCES = "datasource_list: [ NoCloud, ConfigDrive, None ]\n"


@dataclasses.dataclass(frozen=True)
class Layout:
    """A built layout: a never-booted qcow2 and the firmware it boots with."""

    name: str
    directory: Path

    @property
    def disk(self) -> Path:
        return self.directory / "disk.qcow2"

    @property
    def info(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.directory / "done.json").read_text())
        return data

    @property
    def firmwares(self) -> tuple[str, ...]:
        """What it boots with: ``bios``, ``efi`` or both (the first is the default)."""
        return tuple(str(self.info["firmware"]).split(","))

    @property
    def firmware(self) -> str:
        return self.firmwares[0]


def tree_key() -> str:
    recipe = {
        "base": guestimage.recipe_key(),
        "extra": EXTRA_PACKAGES,
        "apt": [APT_PACKAGES, APT_IN_TREE],
        "code": inspect.getsource(build_tree),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def layout_key(name: str) -> str:
    code: list[Callable[..., Any]] = [BUILDERS[name], _install_tree, _grub, _launch, *HELPERS.get(name, ())]
    recipe = {
        "tree": tree_key(),
        "name": name,
        "size": DISK_SIZE,
        "files": [GRUB_DEFAULT, CMDLINE, SELINUX_CMDLINE, SELINUX_CONFIG]
        + ([CLOUD_DATASOURCES, LINUX_ROOT_X86_64_GUID] if name == "cloud" else []),
        "code": [inspect.getsource(f) for f in code],
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _root() -> Path:
    return cache_root() / "layouts"


def build_tree() -> Path:
    """The debootstrapped tree with the extra packages, customised like the test guest,
    packed as a tarball with xattrs (cached; parallel builders wait for the first)."""
    target = _root() / f"tree-{tree_key()}.tar"
    if target.exists():
        return target
    with guestimage.cache_lock("layouts-tree"):
        return _build_tree(target)


def _build_tree(target: Path) -> Path:
    if target.exists():
        return target  # built meanwhile by another process
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tree-", dir=target.parent))
    try:
        rootfs = work / "rootfs"
        packages = guestimage.PACKAGES + EXTRA_PACKAGES
        include = "--include=" + ",".join(packages)
        _run(["debootstrap", "--variant=minbase", include, guestimage.SUITE, str(rootfs), guestimage.MIRROR])
        _run(["unshare", "--mount", "--fork", "--", "sh", "-c", APT_IN_TREE, "apt", str(rootfs), *APT_PACKAGES])
        _customize(rootfs)
        # Generated at install time by openssh-server: the prototype's host keys stay
        # (a real prototype has them).
        tarball = work / "tree.tar"
        _run(["tar", "-C", str(rootfs), "--xattrs", "--xattrs-include=*", "--acls", "-cf", str(tarball), "."])
        tarball.chmod(0o644)
        tarball.rename(target)
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    return target


def _launch(disk: Path) -> Any:
    import guestfs

    g = guestfs.GuestFS(python_return_dict=True)
    g.set_backend_settings(["force_tcg"])
    g.disk_create(str(disk), "qcow2", DISK_SIZE)
    g.add_drive_opts(str(disk), format="qcow2")
    g.launch()
    return g


def _install_tree(g: Any, tree: Path, fstab: str, cmdline: str) -> None:
    """Unpack the tree into the mounted /sysroot and write fstab and GRUB's defaults."""
    g.tar_in(str(tree), "/", xattrs=True, selinux=True, acls=True)
    g.write("/etc/fstab", fstab.encode())
    g.write("/etc/default/grub", GRUB_DEFAULT.format(cmdline=cmdline).encode())


def _grub(g: Any, *targets: list[str]) -> None:
    """grub-install (each argument list) and update-grub, run in the guest."""
    # Without a device map grub-install in the appliance's chroot takes /dev/sda's
    # partitions for another disk ("cross-disk install").
    g.mkdir_p("/boot/grub")
    g.write("/boot/grub/device.map", b"(hd0) /dev/sda\n")
    for args in targets:
        print("+ guest: grub-install " + " ".join(args), file=sys.stderr, flush=True)
        # Under load the appliance's udev may not have settled the partitions yet, and
        # grub-install then takes them for another disk: retry a few times.
        for attempt in range(1, 4):
            try:
                g.command(["grub-install", *args])
                break
            except RuntimeError as exc:
                if attempt == 3 or "cross-disk" not in str(exc):
                    raise
                print(f"+ guest: grub-install failed ({attempt}), retrying", file=sys.stderr, flush=True)
                time.sleep(10)
    print("+ guest: update-grub", file=sys.stderr, flush=True)
    g.command(["update-grub"])
    g.command(["update-initramfs", "-u", "-k", "all"])


def _bios_lvm_xfs(g: Any, tree: Path) -> str:
    dev = "/dev/sda"
    g.part_init(dev, "gpt")
    g.part_add(dev, "p", 2048, 4095)  # 1 MiB bios_grub: GRUB's core image on GPT
    g.part_add(dev, "p", 4096, 4096 + 600 * 2048 - 1)  # /boot
    g.part_add(dev, "p", 4096 + 600 * 2048, -2048)  # LVM PV
    g.part_set_gpt_type(dev, 1, BIOS_GRUB_GUID)
    g.part_set_name(dev, 2, "boot")
    g.part_set_name(dev, 3, "lvm")
    g.pvcreate("/dev/sda3")
    g.vgcreate("vgroot", ["/dev/sda3"])
    g.lvcreate("root", "vgroot", 1400)
    g.lvcreate_free("var", "vgroot", 100)
    g.mkfs("ext4", "/dev/sda2", label="boot")
    g.mkfs("xfs", "/dev/vgroot/root", label="root")
    g.mkfs("xfs", "/dev/vgroot/var", label="var")
    g.mount("/dev/vgroot/root", "/")
    g.mkdir_p("/boot")
    g.mount("/dev/sda2", "/boot")
    g.mkdir_p("/var")
    g.mount("/dev/vgroot/var", "/var")
    boot_uuid = g.vfs_uuid("/dev/sda2")
    fstab = (
        "/dev/mapper/vgroot-root / xfs defaults 0 0\n"
        f"UUID={boot_uuid} /boot ext4 defaults 0 2\n"
        "/dev/mapper/vgroot-var /var xfs defaults 0 0\n"
    )
    _install_tree(g, tree, fstab, CMDLINE)
    _grub(g, ["--target=i386-pc", dev])
    return "bios"


def _uefi_btrfs(g: Any, tree: Path) -> str:
    dev = "/dev/sda"
    g.part_init(dev, "gpt")
    g.part_add(dev, "p", 2048, 2048 + 200 * 2048 - 1)
    g.part_add(dev, "p", 2048 + 200 * 2048, -2048)
    g.part_set_gpt_type(dev, 1, ESP_GUID)
    g.part_set_name(dev, 1, "esp")
    g.mkfs("vfat", "/dev/sda1", label="ESP")
    g.mkfs("btrfs", "/dev/sda2", label="root")
    g.mount("/dev/sda2", "/")
    g.btrfs_subvolume_create("/@")
    g.btrfs_subvolume_create("/@var")
    g.umount("/")
    g.mount_options("subvol=@", "/dev/sda2", "/")
    g.mkdir_p("/var")
    g.mount_options("subvol=@var", "/dev/sda2", "/var")
    g.mkdir_p("/boot/efi")
    g.mount("/dev/sda1", "/boot/efi")
    root_uuid = g.vfs_uuid("/dev/sda2")
    esp_uuid = g.vfs_uuid("/dev/sda1")
    fstab = (
        f"UUID={root_uuid} / btrfs defaults,subvol=@ 0 0\n"
        f"UUID={root_uuid} /var btrfs defaults,subvol=@var 0 0\n"
        f"UUID={esp_uuid} /boot/efi vfat umask=0077 0 1\n"
    )
    _install_tree(g, tree, fstab, CMDLINE)
    # --removable: \EFI\BOOT\BOOTX64.EFI, found by the firmware without an NVRAM entry
    _grub(g, ["--target=x86_64-efi", "--efi-directory=/boot/efi", "--removable", "--no-nvram"])
    return "efi"


def _selinux(g: Any, tree: Path) -> str:
    dev = "/dev/sda"
    g.part_init(dev, "gpt")
    g.part_add(dev, "p", 2048, 4095)
    g.part_add(dev, "p", 4096, -2048)
    g.part_set_gpt_type(dev, 1, BIOS_GRUB_GUID)
    g.mkfs("ext4", "/dev/sda2", label="root")
    g.mount("/dev/sda2", "/")
    fstab = f"UUID={g.vfs_uuid('/dev/sda2')} / ext4 rw,errors=remount-ro 0 1\n"
    _install_tree(g, tree, fstab, f"{CMDLINE} {SELINUX_CMDLINE}")
    g.write("/etc/selinux/config", SELINUX_CONFIG.encode())
    _grub(g, ["--target=i386-pc", dev])
    # Label everything with the guest's own policy, last (after every write).
    if selinux_label(Guest(g, "/dev/sda2"), ["/"]) is None:
        raise RuntimeError("the SELinux layout has no SELinux policy enabled")
    return "bios"


def _gpt_partition(g: Any, dev: str, number: int, start: int, end: int) -> None:
    """Partition ``number`` from ``start`` to ``end`` (sectors): parted numbers a new GPT
    partition with the lowest free number, so the numbers below it are held by
    placeholders at the end of the disk while it is added, then freed."""
    taken = {int(p["part_num"]) for p in g.part_list(dev)}
    holders = [n for n in range(1, number) if n not in taken]
    last = DISK_SIZE // 512 - 2048 - 1  # the placeholders sit in the last MiB before the GPT backup
    for i in range(len(holders)):
        g.part_add(dev, "p", last - 8 * (len(holders) - i), last - 8 * (len(holders) - i) + 7)
    g.part_add(dev, "p", start, end)
    for n in holders:
        g.part_del(dev, n)


def _cloud(g: Any, tree: Path) -> str:
    dev = "/dev/sda"
    g.part_init(dev, "gpt")
    # Debian's layout: root last on the disk but numbered 1, so that growpart and
    # x-systemd.growfs find it; 14 and 15 first.
    root_end = DISK_SIZE // 512 - 2048 - 1 - 8 * 13
    g.part_add(dev, "p", 262144, root_end)
    _gpt_partition(g, dev, 14, 2048, 8191)
    _gpt_partition(g, dev, 15, 8192, 262143)
    g.part_set_gpt_type(dev, 14, BIOS_GRUB_GUID)
    g.part_set_gpt_type(dev, 15, ESP_GUID)
    g.part_set_gpt_type(dev, 1, LINUX_ROOT_X86_64_GUID)
    numbers = sorted(int(p["part_num"]) for p in g.part_list(dev))
    if numbers != [1, 14, 15]:
        raise RuntimeError(f"the cloud layout has partitions {numbers}, not 1, 14, 15")
    g.mkfs("ext4", "/dev/sda1")
    g.mkfs("vfat", "/dev/sda15")
    g.mount("/dev/sda1", "/")
    g.mkdir_p("/boot/efi")
    g.mount("/dev/sda15", "/boot/efi")
    fstab = (
        f"UUID={g.vfs_uuid('/dev/sda1')} / ext4 rw,discard,errors=remount-ro,x-systemd.growfs 0 1\n"
        f"UUID={g.vfs_uuid('/dev/sda15')} /boot/efi vfat defaults 0 0\n"
    )
    _install_tree(g, tree, fstab, CMDLINE)
    g.write("/etc/cloud/cloud.cfg.d/90_datasources.cfg", CLOUD_DATASOURCES.encode())
    # Never booted, as the image builder leaves it: no host keys, no identity.
    for key in g.glob_expand("/etc/ssh/ssh_host_*"):
        g.rm(key)
    g.write("/etc/machine-id", b"")
    g.write("/etc/hostname", b"")
    g.rm_f("/var/lib/dbus/machine-id")
    # What GRUB sees of /boot/grub (with the device map _grub writes), for the build
    # log: a partition of the disk it installs to (hd0,gpt1), or another disk
    # ("cross-disk", which needs the core image embedded: here in partition 14).
    g.mkdir_p("/boot/grub")
    g.write("/boot/grub/device.map", b"(hd0) /dev/sda\n")
    for target in ("device", "disk", "drive"):
        try:
            out = str(g.command(["grub-probe", f"--target={target}", "/boot/grub"])).strip()
        except RuntimeError as exc:
            out = f"failed: {exc}"
        print(f"+ guest: grub-probe --target={target} /boot/grub: {out}", file=sys.stderr, flush=True)
    _grub(
        g,
        ["--target=i386-pc", dev],
        ["--target=x86_64-efi", "--efi-directory=/boot/efi", "--no-nvram", "--force-extra-removable"],
    )
    return "bios,efi"


BUILDERS: dict[str, Callable[[Any, Path], str]] = {
    "bios-lvm-xfs": _bios_lvm_xfs,
    "uefi-btrfs": _uefi_btrfs,
    "selinux": _selinux,
    "cloud": _cloud,
}
# Helpers a builder uses besides the shared ones (part of that layout's recipe).
HELPERS: dict[str, tuple[Callable[..., Any], ...]] = {"cloud": (_gpt_partition,)}


def build(name: str, force: bool = False) -> Layout:
    """Return the cached layout ``name``, building it (and the tree) if needed."""
    key = layout_key(name)
    layout = Layout(name, _root() / f"{name}-{key}")
    if (layout.directory / "done.json").exists() and not force:
        return layout
    with guestimage.cache_lock(f"layout-{name}"):
        if (layout.directory / "done.json").exists() and not force:
            return layout  # built meanwhile by another process
        return _build(name, layout)


def _build(name: str, layout: Layout) -> Layout:
    tree = build_tree()
    work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=_root()))
    try:
        disk = work / "disk.qcow2"
        g = _launch(disk)
        try:
            firmware = BUILDERS[name](g, tree)
            g.sync()
            g.umount_all()
            g.shutdown()
        finally:
            g.close()
        disk.chmod(0o644)
        work.chmod(0o755)
        (work / "done.json").write_text(json.dumps({"layout": name, "key": layout_key(name), "firmware": firmware}))
        if layout.directory.exists():
            shutil.rmtree(layout.directory)
        work.rename(layout.directory)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return layout


def domain_xml(
    name: str,
    disk: Path,
    *,
    firmware: str,
    console_log: Path,
    nvram: Path | None = None,
    domain_uuid: str | None = None,
    memory_mib: int = 1024,
    smbios_serial: str | None = None,
) -> str:
    """libvirt XML for a software-emulated domain that boots ``disk`` through its own
    bootloader: SeaBIOS (``firmware='bios'``) or OVMF (``'efi'``, with ``nvram``, a
    per-domain copy libvirt makes from the VARS template). ``smbios_serial``: the
    system serial number the guest reads from SMBIOS (cloud-init's NoCloud takes its
    meta-data from ``ds=nocloud;...`` there)."""
    if firmware == "efi":
        if nvram is None:
            raise ValueError("a UEFI domain needs an nvram path")
        loader = (
            f"\n    <loader readonly='yes' secure='no' type='pflash'>{OVMF_CODE}</loader>"
            f"\n    <nvram template='{OVMF_VARS}'>{nvram}</nvram>"
        )
        machine = "q35"
        features = "<acpi/><smm state='off'/>"
    elif firmware == "bios":
        loader, machine, features = "", "pc", "<acpi/>"
    else:
        raise ValueError(f"unknown firmware {firmware!r}")
    sysinfo = ""
    if smbios_serial is not None:
        loader += "\n    <smbios mode='sysinfo'/>"
        sysinfo = (
            f"\n  <sysinfo type='smbios'><system><entry name='serial'>{xml_escape(smbios_serial)}</entry></system>"
            "</sysinfo>"
        )
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <uuid>{domain_uuid or uuid.uuid4()}</uuid>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>{sysinfo}
  <os>
    <type arch='x86_64' machine='{machine}'>hvm</type>{loader}
    <boot dev='hd'/>
  </os>
  <features>{features}</features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path='{console_log}'/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path='{console_log}'/>
      <target type='serial' port='0'/>
    </console>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["build", "key", "tree"])
    parser.add_argument("name", nargs="?", choices=LAYOUTS)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
    if args.action == "tree":
        print(build_tree())
        return 0
    if args.name is None:
        parser.error("a layout name is needed")
    if args.action == "key":
        print(layout_key(args.name))
    else:
        print(build(args.name, force=args.force).directory)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
