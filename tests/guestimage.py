"""Build (and cache) the Debian test guest used by the end-to-end tests and the demo.

The guest is a debootstrapped Debian 12 with systemd, openssh-server and a few
application daemons that create state on their first start:

* ``demo-identity.service`` writes ``/var/lib/demo-identity/node-id`` (like Consul's
  node-id) the first time it starts;
* ``etcd-server`` writes its member directory under ``/var/lib/etcd``;
* ``redis-server`` writes ``/var/lib/redis/dump.rdb`` when it stops;
* ``nginx`` (used by the benchmark) writes its pid and logs.

Every one of them is enabled but carries ``ConditionFirstBoot=no``: the image is
shipped with ``/etc/machine-id`` set to ``uninitialized``, so the prototype's first
boot does not start them. That gives the tests a *running* prototype whose daemons
have never started, exactly the situation of an operator who installed and enabled
them but has not run them yet. Every later normal boot starts them (the control).

The root filesystem is packed partition-less into a qcow2 (``mkfs.ext4 -d``) and
booted with direct kernel boot; kernel and initrd are kept beside the disk. The
result is cached under a directory keyed by a hash of this recipe, so a second run
does not rebuild it.

Usage: ``python -m tests.guestimage build`` prints the cache directory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = (
    "systemd-sysv",
    "udev",
    "dbus",
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "openssh-server",
    "etcd-server",
    "redis-server",
    "nginx",
    "qemu-guest-agent",
)
APP_SERVICES = ("demo-identity.service", "etcd.service", "redis-server.service", "nginx.service")
DISK_SIZE = "2G"

DEMO_DAEMON = """#!/bin/sh
# demo-identity: like Consul, create a node identity on the first start, then serve.
set -eu
dir=/var/lib/demo-identity
if [ ! -s "$dir/node-id" ]; then
    mkdir -p "$dir"
    cat /proc/sys/kernel/random/uuid > "$dir/node-id"
    echo "demo-identity: created node-id $(cat "$dir/node-id")" > /dev/console
fi
exec sleep infinity
"""

DEMO_UNIT = """[Unit]
Description=Demo daemon that creates a node identity on its first start

[Service]
ExecStart=/usr/local/bin/demo-identity

[Install]
WantedBy=multi-user.target
"""

NOT_ON_FIRST_BOOT = """[Unit]
# Test fixture: not started on the image's first boot, so the prototype has never
# run this daemon; every later boot starts it.
ConditionFirstBoot=no
"""

WRITER = """#!/bin/sh
# imgprep-test-writer: append a counter and a timestamp to a file, fsync'ed, several
# times a second, continuing from the last entry, so a capture of a running guest can
# be checked for a point in time (the last entry) and for gaps (none, in the guest).
set -eu
log=/var/lib/imgprep-test-writer/counter.log
mkdir -p "${log%/*}"
n=$(tail -n 1 "$log" 2>/dev/null | cut -d' ' -f1)
n=${n:-0}
while :; do
    n=$((n + 1))
    printf '%s %s\\n' "$n" "$(date +%s.%N)" >> "$log"
    sync "$log"
    sleep 0.2
done
"""

# the test guest's own units whose names say imgprep: not imgprep's traces
FIXTURE_UNITS = ("imgprep-test-writer.service",)

WRITER_UNIT = """[Unit]
Description=Test writer: a counter appended and fsync'ed several times a second

[Service]
ExecStart=/usr/local/bin/imgprep-test-writer

[Install]
WantedBy=multi-user.target
"""

FSTAB = "/dev/vda / ext4 rw,errors=remount-ro 0 1\n"
HOSTS = "127.0.0.1 localhost\n127.0.1.1 imgprep-proto\n::1 localhost ip6-localhost ip6-loopback\n"


@dataclasses.dataclass(frozen=True)
class GuestImage:
    """A built test guest: a pristine qcow2, its kernel and initrd, and its rootfs tree."""

    directory: Path

    @property
    def disk(self) -> Path:
        return self.directory / "disk.qcow2"

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def rootfs(self) -> Path:
        return self.directory / "rootfs"


def recipe_key() -> str:
    """Hash of everything that determines the guest's content (not of this whole file)."""
    recipe = {
        "suite": SUITE,
        "mirror": MIRROR,
        "packages": PACKAGES,
        "app_services": APP_SERVICES,
        "disk_size": DISK_SIZE,
        "files": [DEMO_DAEMON, DEMO_UNIT, NOT_ON_FIRST_BOOT, FSTAB, HOSTS, WRITER, WRITER_UNIT],
        "code": [inspect.getsource(f) for f in (_customize, _write, _symlink, build)],
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("IMGPREP_TEST_CACHE", "/var/cache/imgprep-test"))


def _run(cmd: list[str], **kwargs: object) -> None:
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    # stdout too goes to stderr: callers capture stdout for results (the demo's VM UUID)
    if "stdin" not in kwargs and "input" not in kwargs:
        kwargs["stdin"] = subprocess.DEVNULL
    subprocess.run(cmd, check=True, stdout=sys.stderr, **kwargs)  # type: ignore[call-overload]


def _write(root: Path, rel: str, text: str, mode: int = 0o644) -> None:
    path = root / rel.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink()
    path.write_text(text)
    path.chmod(mode)


def _symlink(root: Path, rel: str, target: str) -> None:
    path = root / rel.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink()
    path.symlink_to(target)


def _customize(root: Path) -> None:
    _write(root, "/etc/hostname", "imgprep-proto\n")
    _write(root, "/etc/hosts", HOSTS)  # debootstrap writes none; etcd resolves localhost
    _write(root, "/etc/fstab", FSTAB)
    _write(root, "/usr/local/bin/demo-identity", DEMO_DAEMON, 0o755)
    _write(root, "/etc/systemd/system/demo-identity.service", DEMO_UNIT)
    _symlink(
        root,
        "/etc/systemd/system/multi-user.target.wants/demo-identity.service",
        "/etc/systemd/system/demo-identity.service",
    )
    _write(root, "/usr/local/bin/imgprep-test-writer", WRITER, 0o755)
    _write(root, "/etc/systemd/system/imgprep-test-writer.service", WRITER_UNIT)
    _symlink(
        root,
        "/etc/systemd/system/multi-user.target.wants/imgprep-test-writer.service",
        "/etc/systemd/system/imgprep-test-writer.service",
    )
    for service in APP_SERVICES:
        _write(root, f"/etc/systemd/system/{service}.d/10-not-on-first-boot.conf", NOT_ON_FIRST_BOOT)
    for service in ("etcd.service", "redis-server.service", "nginx.service"):
        wants = root / "etc/systemd/system/multi-user.target.wants" / service
        if not wants.is_symlink():
            raise RuntimeError(f"package did not enable {service}; recipe is stale")
    # Root may log in on the serial console without a password (test guest only).
    _run(["chroot", str(root), "passwd", "-d", "root"])
    # A cloud image ships without an identity: the first boot commits a machine-id.
    _write(root, "/etc/machine-id", "uninitialized\n", 0o444)
    dbus_id = root / "var/lib/dbus/machine-id"
    if dbus_id.is_symlink() or dbus_id.exists():
        dbus_id.unlink()
    shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True)


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Hold the cache's lock NAME (an flock on ``<cache>/.NAME.lock``): builders of one
    cache entry in parallel test processes wait for each other and reuse what the first built."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build(force: bool = False) -> GuestImage:
    """Return the cached guest for the current recipe, building it if needed."""
    image = GuestImage(cache_root() / recipe_key())
    if (image.directory / "done.json").exists() and not force:
        return image
    with cache_lock("guest"):
        if (image.directory / "done.json").exists() and not force:
            return image  # built meanwhile by another process
        return _build(image)


def _build(image: GuestImage) -> GuestImage:
    if image.directory.exists():
        shutil.rmtree(image.directory)
    image.directory.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=image.directory.parent))
    try:
        rootfs = work / "rootfs"
        _run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=" + ",".join(PACKAGES),
                SUITE,
                str(rootfs),
                MIRROR,
            ]
        )
        _customize(rootfs)
        kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
        initrds = sorted((rootfs / "boot").glob("initrd.img-*"))
        if not kernels or not initrds:
            raise RuntimeError("no kernel/initrd in the debootstrapped tree")
        shutil.copy2(kernels[-1], work / "vmlinuz")
        shutil.copy2(initrds[-1], work / "initrd.img")
        raw = work / "disk.raw"
        _run(["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(rootfs), str(raw), DISK_SIZE])
        _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(work / "disk.qcow2")])
        raw.unlink()
        for name in ("vmlinuz", "initrd.img", "disk.qcow2"):
            (work / name).chmod(0o644)
        work.chmod(0o755)
        (work / "done.json").write_text(json.dumps({"recipe": recipe_key(), "packages": PACKAGES}))
        work.rename(image.directory)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return image


def domain_xml(
    name: str,
    disk: Path,
    *,
    image: GuestImage,
    console_log: Path,
    domain_uuid: str | None = None,
    memory_mib: int = 1024,
    extra_cmdline: str = "",
    extra_disks: tuple[Path, ...] = (),
    root: str = "/dev/vda",
    agent: bool = True,
) -> str:
    """libvirt XML for a software-emulated domain booting the test guest (``agent``: with
    the QEMU guest agent's virtio-serial channel)."""
    # the controller named, not left to libvirt to add: an added one moves in the XML
    # when an internal snapshot is reverted, and the definition would not compare equal
    agent_controller = "\n    <controller type='virtio-serial' index='0'/>" if agent else ""
    agent_channel = (
        """
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>"""
        if agent
        else ""
    )
    more = "".join(
        f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{path}'/>
      <target dev='vd{chr(ord("b") + i)}' bus='virtio'/>
    </disk>"""
        for i, path in enumerate(extra_disks)
    )
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <uuid>{domain_uuid or uuid.uuid4()}</uuid>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{image.kernel}</kernel>
    <initrd>{image.initrd}</initrd>
    <cmdline>root={root} rw console=ttyS0 net.ifnames=0 {extra_cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>{agent_controller}
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>{more}
    <serial type='file'>
      <source path='{console_log}'/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path='{console_log}'/>
      <target type='serial' port='0'/>
    </console>{agent_channel}
    <memballoon model='none'/>
  </devices>
</domain>
"""


SPLIT_FSTAB = "/dev/vda1 / ext4 rw,errors=remount-ro 0 1\n/dev/vdb /var ext4 rw 0 2\n"


@dataclasses.dataclass(frozen=True)
class SplitGuest:
    """The same guest laid out differently: root on partition 1 of an MBR disk, /var on
    a second, partition-less disk (so imgprep's runner lives on the second disk)."""

    directory: Path

    @property
    def root_disk(self) -> Path:
        return self.directory / "root.qcow2"

    @property
    def var_disk(self) -> Path:
        return self.directory / "var.qcow2"


def build_split(image: GuestImage) -> SplitGuest:
    """Derive (and cache beside the guest) the two-disk, partitioned layout."""
    split = SplitGuest(image.directory / "split")
    if (split.directory / "done").exists():
        return split
    with cache_lock("split"):
        if (split.directory / "done").exists():
            return split
        return _build_split(image, split)


def _build_split(image: GuestImage, split: SplitGuest) -> SplitGuest:
    work = Path(tempfile.mkdtemp(prefix="split-", dir=image.directory))
    try:
        root_tree, var_tree = work / "root", work / "var"
        root_tree.mkdir()
        # copy the tree without /var (tar keeps owners, modes, links, xattrs)
        tar = subprocess.Popen(
            ["tar", "-C", str(image.rootfs), "--exclude=./var", "--xattrs", "-cf", "-", "."], stdout=subprocess.PIPE
        )
        _run(["tar", "-C", str(root_tree), "--xattrs", "-xf", "-"], stdin=tar.stdout)
        if tar.wait() != 0:
            raise RuntimeError("tar of the root tree failed")
        (root_tree / "var").mkdir(mode=0o755)
        (root_tree / "etc/fstab").write_text(SPLIT_FSTAB)
        _run(["cp", "-a", str(image.rootfs / "var"), str(var_tree)])
        part = work / "part.raw"
        _run(["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(root_tree), str(part), "1800M"])
        disk = work / "root.raw"
        _run(["truncate", "-s", "1801M", str(disk)])
        _run(["sfdisk", "-q", str(disk)], input=b"start=2048, type=83\n")
        _run(["dd", "if=" + str(part), "of=" + str(disk), "bs=1M", "seek=1", "conv=notrunc,sparse", "status=none"])
        var_raw = work / "var.raw"
        _run(["mkfs.ext4", "-q", "-F", "-L", "var", "-d", str(var_tree), str(var_raw), "1G"])
        _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(disk), str(work / "root.qcow2")])
        _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(var_raw), str(work / "var.qcow2")])
        out = Path(tempfile.mkdtemp(prefix="split-out-", dir=image.directory))
        for name in ("root.qcow2", "var.qcow2"):
            (work / name).rename(out / name)
            (out / name).chmod(0o644)
        (out / "done").write_text("")
        out.chmod(0o755)
        out.rename(split.directory)
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    return split


DEMO_NAME = "imgprep-demo"
DEMO_DIR = Path("/var/lib/imgprep-demo")


def remove_domain(dom: Any) -> None:
    """Power off, drop every snapshot, undefine: a test or demo domain leaves nothing."""
    if dom.isActive():
        dom.destroy()
    for snap in dom.snapshotListNames():
        dom.snapshotLookupByName(snap).delete(0)
    dom.undefine()


def demo_vm() -> str:
    """(Re)create the demo prototype from a fresh copy of the guest, boot it, return its UUID."""
    import libvirt

    image = build()
    conn = libvirt.open("qemu:///system")
    try:
        try:
            old = conn.lookupByName(DEMO_NAME)
        except libvirt.libvirtError:
            old = None
        if old is not None:
            remove_domain(old)
        DEMO_DIR.mkdir(parents=True, exist_ok=True)
        disk = DEMO_DIR / "disk.qcow2"
        shutil.copyfile(image.disk, disk)
        console = DEMO_DIR / "console.log"
        console.unlink(missing_ok=True)
        dom = conn.defineXML(domain_xml(DEMO_NAME, disk, image=image, console_log=console))
        dom.create()
        print(f"demo: booting {DEMO_NAME} ({dom.UUIDString()}), console log {console}", file=sys.stderr)
        deadline = time.monotonic() + 600
        while "login:" not in (console.read_text(errors="replace") if console.exists() else ""):
            if time.monotonic() > deadline or not dom.isActive():
                raise RuntimeError(f"the demo VM did not boot; see {console}")
            time.sleep(1)
        # clone mode freezes the running demo through its guest agent: wait until it answers
        from imgprep.pointintime import agent_answers

        while not agent_answers(dom, 5):
            if time.monotonic() > deadline or not dom.isActive():
                raise RuntimeError(f"the demo VM's guest agent never answered; see {console}")
            time.sleep(1)
        return str(dom.UUIDString())
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["build", "key", "demo"])
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    if args.action == "key":
        print(recipe_key())
    elif args.action == "demo":
        print(demo_vm())
    else:
        print(build(force=args.force).directory)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
