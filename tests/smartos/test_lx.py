"""lx zones through the real CLI, against the compute-node SIMULATOR.

The simulated lx zone holds the Debian tree of the end-to-end test guest (systemd,
demo-identity, etcd, redis, nginx; daemons enabled with ``ConditionFirstBoot=no``, so
a zone's first boot does not start them) and boots its real systemd in
``systemd-nspawn``. What is real here: the unit imgprep injects, the order systemd
gives it, the runner, the Linux cleanup script, the report through ``mdata-put``.
What is simulated: everything of the compute node (vmadm, zfs, the lx brand, the
metadata agent); see tests/simulator/node.py.

Needs root, systemd-nspawn and the cached test guest (``lx_tree`` in conftest.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from imgprep.jobstore import JobStore
from tests.api.conftest import wait_for
from tests.simulator import open_stream, read_send_stream, tree_digest
from tests.smartos.conftest import LX_ORIGIN, Node, events, summary

# What a normal boot of the prototype creates once its daemons run (the control).
NODE_ID = "var/lib/demo-identity/node-id"
PROTOTYPE_FILES = {
    "etc/ssh/ssh_host_ed25519_key": b"PROTOTYPE PRIVATE HOST KEY\n",
    "root/.ssh/authorized_keys": b"ssh-ed25519 AAAA operator@laptop\n",
    "root/.bash_history": b"psql 'password=secret'\n",
    "srv/app/config.yml": b"keep: me\n",
}
IMGPREP_PATHS = (
    "root/etc/systemd/system/imgprep-prepare.service",
    "root/etc/systemd/system/sysinit.target.wants/imgprep-prepare.service",
    "root/var/lib/imgprep-prepare",
)


@pytest.fixture
def lx(sim: Node, lx_tree: Path) -> Node:
    sim.node.add_image(LX_ORIGIN)
    sim.write_config(timeouts={"stop": 60, "boot": 60, "prepare": 60, "shutdown": 60})
    return sim


def lx_zone(sim: Node, tree: Path, *, running: bool) -> str:
    return sim.node.create_zone(
        alias="lxproto", brand="lx", image_uuid=LX_ORIGIN["uuid"], files=PROTOTYPE_FILES, tree=tree, running=running
    )


def test_lx_zone_early_unit_image_report_and_rollback_with_a_control_boot(lx: Node, lx_tree: Path) -> None:
    uuid = lx_zone(lx, lx_tree, running=True)
    root = lx.node.zone_root(uuid)
    # the prototype ran its first boot: identity committed, the daemons not started yet
    assert (root / "etc/machine-id").read_text().strip() not in ("", "uninitialized")
    assert not (root / NODE_ID).exists()

    code, out, err = lx.create(uuid, "--name", "lximage", "--version", "1.0.0")

    assert code == 0, err
    result = summary(out)
    assert result["execution"] == "succeeded"
    assert [e["state"] for e in events(out) if e["event"] == "guest"] == ["running", "success"]

    # the manifest: an lx image, as imgadm makes one from an lx zone
    image = Path(result["file"])
    manifest = json.loads(Path(result["manifest"]).read_text())
    data = image.read_bytes()
    assert manifest["files"][0]["sha1"] == hashlib.sha1(data).hexdigest()
    assert manifest["files"][0]["size"] == len(data)
    assert manifest["type"] == "lx-dataset"
    assert manifest["os"] == "linux"
    assert manifest["requirements"]["brand"] == "lx"

    # the boot report came through mdata-put: the script ran before sysinit.target and
    # before every unit with default dependencies
    report = result["boot_report"]
    assert report["script_exit"] == 0
    assert report["late_services"] == []
    assert report["targets"]["sysinit.target"] == "inactive"
    assert report["targets"]["multi-user.target"] == "inactive"
    assert report["targets"]["local-fs.target"] == "active"
    # no --script: the Linux cleanup ran, not the SmartOS one, and the record says so
    job = JobStore(lx.state_dir).get(result["job_uuid"])
    assert job["params"]["script_name"] == "linux-prepare-image"

    # the image: Linux cleanup done, no daemon state, no imgprep trace, content kept
    with open_stream(image) as f:
        header, tar = read_send_stream(f.read())
    assert header["snapshot"] == f"zones/{uuid}@final"
    names = set(tar.getnames())
    assert "root/srv/app/config.yml" in names
    machine_id = tar.extractfile("root/etc/machine-id")
    assert machine_id is not None
    assert machine_id.read() == b"uninitialized\n"
    for gone in (
        "root/etc/ssh/ssh_host_ed25519_key",
        "root/root/.ssh/authorized_keys",
        "root/root/.bash_history",
        f"root/{NODE_ID}",
        *IMGPREP_PATHS,
    ):
        assert gone not in names
    assert not [n for n in names if n.startswith("root/var/lib/etcd/") and "member" in n]
    assert not [n for n in names if n.startswith("root/var/lib/redis/") and n.endswith(".rdb")]

    # the zone: rolled back (imgprep files gone, its own host key back), running again
    assert lx.node.snapshot_names(f"zones/{uuid}") == []
    assert lx.node.state(uuid) == "running"
    assert (root / "etc/ssh/ssh_host_ed25519_key").read_bytes() == PROTOTYPE_FILES["etc/ssh/ssh_host_ed25519_key"]
    for path in IMGPREP_PATHS:
        assert not os.path.lexists(lx.node.zonepath(uuid) / path)
    assert "prepare-image:state" not in lx.node.metadata(uuid)["customer_metadata"]
    boots = lx.node.boots(uuid)
    assert len(boots) == 3  # the prototype's, the prepare boot (halted itself), the restart
    assert boots[1].halted

    # CONTROL: the same zone booted normally does start the daemons, which write state
    wait_for("demo-identity's node-id in the restarted zone", (root / NODE_ID).exists, timeout=120)
    assert lx.node.lx_systemctl(uuid, "is-active", "demo-identity.service").stdout.strip() == "active"


def test_lx_script_error_is_reported_and_the_stopped_zone_restored_exactly(lx: Node, lx_tree: Path) -> None:
    uuid = lx_zone(lx, lx_tree, running=False)
    before = tree_digest(lx.node.zonepath(uuid))
    script = lx.tmp / "failing-script"
    script.write_text("#!/bin/sh\necho 'cleaning up'\necho 'boom: /srv/app is busy' >&2\nexit 3\n")

    code, out, err = lx.create(uuid, "--script", str(script))

    assert code == 1
    assert "operator script exited with status 3" in err
    assert "boom: /srv/app is busy" in err
    result = summary(out)
    assert result["execution"] == "failed"
    assert result["boot_report"]["script_exit"] == 3
    assert list(lx.output.iterdir()) == []  # no image file, no partial
    assert tree_digest(lx.node.zonepath(uuid)) == before
    assert lx.node.snapshot_names(f"zones/{uuid}") == []
    assert lx.node.state(uuid) == "stopped"
    assert len(lx.node.boots(uuid)) == 1  # only the prepare boot; the zone was stopped before


def test_lx_late_placement_would_bake_daemon_identity_into_the_image(lx: Node, lx_tree: Path) -> None:
    """Why the unit runs early: the classic late placement (``--mode legacy``, after
    multi-user.target) lets the daemons start first, and their identity ends up in the
    image. Same zone, same script; only the ordering differs."""
    uuid = lx_zone(lx, lx_tree, running=True)
    assert not (lx.node.zone_root(uuid) / NODE_ID).exists()

    code, out, err = lx.create(uuid, "--mode", "legacy", compression="none")

    assert code == 0, err
    result = summary(out)
    assert "demo-identity.service" in result["boot_report"]["late_services"]
    with open_stream(Path(result["file"])) as f:
        _, tar = read_send_stream(f.read())
    assert f"root/{NODE_ID}" in tar.getnames()
