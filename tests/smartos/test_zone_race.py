"""A process in the zone racing symlink swaps while imgprep writes under the zone root.

The zone root is the guest's filesystem; imgprep writes into it as global-zone root.
A zone process can swap a directory for a symlink (``renameat2(RENAME_EXCHANGE)``) or
plant a symlink where a file was just written, between a check and a use. The racer
here works only through descriptors of the zone's own directories, as a zone process
(which cannot name a path outside its root) would; its symlinks point outside the zone
root. Nothing outside the zone root may be created, changed or chmodded, over many tries.

The control: the same racer against the previous writer (checked-then-used by path,
kept in ``tests/data/zone-write-checked-then-used.sh``) escapes.
"""

from __future__ import annotations

import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imgprep.backends.smartos.node import Node as SshNode
from imgprep.backends.smartos.node import ZoneFile
from imgprep.errors import CommandError
from imgprep.jobstore import JobStore
from imgprep.ssh import SshTarget
from tests.simulator.node import tree_digest
from tests.smartos.conftest import Node, summary

REPO = Path(__file__).resolve().parents[2]
NAIVE_WRITER = (REPO / "tests/data/zone-write-checked-then-used.sh").read_text()
TRIES = 200

# Runs as its own process: argv = zone root, outside dir. Swaps, in a loop:
# var/imgprep <-> var/.s1 (a symlink to OUTSIDE/d1), var/svc <-> var/.s2 (to OUTSIDE/d2),
# and plants var/imgprep/armed as a symlink to
# OUTSIDE/victim (rename over whatever is there). Every call is relative to a
# descriptor of a real zone directory: the racer itself never leaves the zone.
RACER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
renameat2 = libc.renameat2
renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
RENAME_EXCHANGE = 2
root, outside = sys.argv[1], sys.argv[2]
var = os.open(os.path.join(root, "var"), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
imgprep = os.open("imgprep", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=var)
swaps = 0
print("ready", flush=True)
while True:
    for a, b in ((b"imgprep", b".s1"), (b"svc", b".s2")):
        if renameat2(var, a, var, b, RENAME_EXCHANGE) == 0:
            swaps += 1
    for name in ("armed",):
        try:
            os.symlink(os.path.join(outside, "victim"), ".plant", dir_fd=imgprep)
        except FileExistsError:
            pass
        try:
            os.rename(".plant", name, src_dir_fd=imgprep, dst_dir_fd=imgprep)
        except OSError:
            pass
    if swaps % 5000 == 0:
        with open(os.path.join(outside, "..", "racer-swaps"), "w") as f:
            f.write(str(swaps))
"""

FILES = [
    ZoneFile("var/imgprep/operator-script", b"#!/bin/sh\necho prepare\n", "0700"),
    ZoneFile("var/svc/method/imgprep-operator-script", b"#!/bin/sh\nexit 0\n", "0755"),
    ZoneFile("var/svc/manifest/site/imgprep-operator-script.xml", b"<service_bundle/>\n", "0444"),
    ZoneFile("var/imgprep/armed", b"IMGPREP_SCRIPT_TIMEOUT=30\n", "0600"),
]


@pytest.fixture
def ssh_node(sim: Node) -> Iterator[SshNode]:
    """imgprep's own connection to the simulated node."""
    target = SshTarget(
        host="127.0.0.1",
        port=sim.server.port,
        user="root",
        key_file=str(sim.tmp / "client_key"),
        known_hosts=str(sim.known_hosts),
    )
    node = SshNode(target)
    try:
        yield node
    finally:
        node.close()


@pytest.fixture
def zone(sim: Node) -> tuple[Path, Path]:
    """A zone root, and a directory outside it holding a victim file."""
    uuid = sim.zone()
    root = sim.node.zone_root(uuid)
    outside = sim.tmp / "outside"
    for d in ("d1", "d2/method", "d2/manifest/site"):
        (outside / d).mkdir(parents=True)
    victim = outside / "victim"
    victim.write_bytes(b"global zone file\n")
    victim.chmod(0o644)
    for d in ("var/imgprep", "var/svc/method", "var/svc/manifest/site"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "var/.s1").symlink_to(outside / "d1")
    (root / "var/.s2").symlink_to(outside / "d2")
    return root, outside


@pytest.fixture
def racer(zone: tuple[Path, Path]) -> Iterator[Callable[[], None]]:
    """Starts the zone process racing swaps (once called), and stops it at the end."""
    procs: list[subprocess.Popen[str]] = []

    def start() -> None:
        root, outside = zone
        proc = subprocess.Popen(
            [sys.executable, "-c", RACER, str(root), str(outside)], stdout=subprocess.PIPE, text=True
        )
        procs.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"

    try:
        yield start
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def _inject(node: SshNode, root: Path, write: object = None) -> bool:
    """One injection of the file set; whether every write succeeded."""
    try:
        for f in FILES:
            if write is None:
                node.write_zone_file(str(root), f)
            else:
                args = [str(root), f.rel, f.mode, f.dirmode]
                node.run(["/bin/sh", "-c", str(write), "imgprep-write", *args], input=f.data)
    except CommandError:
        return False
    return True


def test_nothing_outside_the_zone_root_is_touched_while_a_zone_process_races(
    ssh_node: SshNode, zone: tuple[Path, Path], racer: Callable[[], None]
) -> None:
    root, outside = zone
    before = tree_digest(outside)
    modes = {p: p.lstat().st_mode for p in outside.rglob("*")}
    assert _inject(ssh_node, root)  # control: unraced, the injection completes, inside the zone
    assert (root / "var/imgprep/armed").read_bytes() == FILES[-1].data
    assert stat.S_IMODE((root / "var/imgprep/armed").lstat().st_mode) == 0o600
    racer()
    completed = refused = 0
    for _ in range(TRIES):
        if _inject(ssh_node, root):
            completed += 1
        else:
            refused += 1
        assert tree_digest(outside) == before, f"escaped the zone root after {completed + refused} tries"
    assert {p: p.lstat().st_mode for p in outside.rglob("*")} == modes
    assert completed + refused == TRIES
    print(f"{TRIES} injections raced: {completed} completed, {refused} refused")
    assert refused > 0  # the racer really raced: it swapped or planted under the writer


def test_control_the_checked_then_used_writer_escapes(
    ssh_node: SshNode, zone: tuple[Path, Path], racer: Callable[[], None]
) -> None:
    root, outside = zone
    before = tree_digest(outside)
    racer()
    for _ in range(TRIES):
        _inject(ssh_node, root, NAIVE_WRITER)
        if tree_digest(outside) != before:
            break
    assert tree_digest(outside) != before, f"the racer never made the old writer escape in {TRIES} tries"


# --- reading: symlinks resolve inside the zone root, never into the global zone --------


def test_present_resolves_an_absolute_symlink_inside_the_zone(ssh_node: SshNode, zone: tuple[Path, Path]) -> None:
    root, outside = zone
    (outside / "etc/systemd/system").mkdir(parents=True)
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc/alt").symlink_to(outside / "etc")  # absolute: the zone's own <outside>/etc
    (root / "etc/up").symlink_to("../../../../../../../../../../" + str(outside).lstrip("/") + "/etc")

    assert ssh_node.present(str(root), ["etc/alt/systemd/system", "etc/up/systemd/system"]) == []
    # control: the same absolute name, made inside the zone, is found there
    (root / str(outside).lstrip("/") / "etc/systemd/system").mkdir(parents=True)
    found = ssh_node.present(str(root), ["etc/alt/systemd/system", "etc/up/systemd/system", "etc/none"])
    assert found == [f"{root}/etc/alt/systemd/system", f"{root}/etc/up/systemd/system"]


def test_readlink_follows_directories_inside_the_zone_only(ssh_node: SshNode, zone: tuple[Path, Path]) -> None:
    root, outside = zone
    (outside / "sbin").mkdir()
    (outside / "sbin/init").symlink_to("/lib/systemd/systemd")
    (root / "sbin").symlink_to(outside / "sbin")  # absolute, to a directory of the global zone

    assert ssh_node.readlink(str(root), "sbin/init") == ""
    # control: merged /usr (sbin -> usr/sbin) and an absolute link, both inside the zone
    (root / "sbin").unlink()
    (root / "usr/sbin").mkdir(parents=True)
    (root / "usr/sbin/init").symlink_to("/lib/systemd/systemd")
    (root / "sbin").symlink_to("usr/sbin")
    assert ssh_node.readlink(str(root), "sbin/init") == "/lib/systemd/systemd"
    (root / "sbin").unlink()
    (root / "sbin").symlink_to("/usr/sbin")
    assert ssh_node.readlink(str(root), "sbin/init") == "/lib/systemd/systemd"
    assert ssh_node.readlink(str(root), "usr/sbin") == ""  # a directory, not a link


# --- the zone started while imgprep writes ---------------------------------------------


def test_a_zone_started_during_inject_is_halted_and_rolled_back(sim: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    uuid = sim.zone()
    before = tree_digest(sim.node.zonepath(uuid))
    real = SshNode.write_zone_file

    def ignore(_data: bytes) -> None:
        pass

    def write_then_start(self: SshNode, root: str, f: ZoneFile) -> None:
        real(self, root, f)
        if f.rel.endswith("/armed"):  # the owner starts the zone through the cloud API
            assert sim.node.execute(["vmadm", "start", uuid], lambda: b"", ignore, ignore, lambda: None) == 0

    monkeypatch.setattr(SshNode, "write_zone_file", write_then_start)

    code, out, _err = sim.create(uuid)

    assert code == 1
    job = JobStore(sim.state_dir).get(summary(out)["job_uuid"])
    assert job["error"]["code"] == "VmRunning"
    assert "started while imgprep wrote" in job["error"]["message"]
    assert job["vm_restored"] is True
    assert ["vmadm", "stop", "-F", uuid] in sim.node.commands
    assert tree_digest(sim.node.zonepath(uuid)) == before
    assert sim.node.state(uuid) == "stopped"


def test_control_a_zone_left_alone_during_inject_is_prepared(sim: Node) -> None:
    uuid = sim.zone()

    code, _out, err = sim.create(uuid)

    assert code == 0, err
    assert ["vmadm", "stop", "-F", uuid] not in sim.node.commands
