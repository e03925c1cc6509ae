"""The SmartOS backend through the real CLI, against the compute-node SIMULATOR.

Every test drives ``imgprep.cli.main`` (or ``python -m imgprep`` in a subprocess) over a
real SSH connection to tests/simulator: what is verified here is imgprep's side of the
protocol and the simulated node's answers, not a real SmartOS (docs/smartos-backend.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import paramiko
import pytest

from imgprep.jobstore import JobStore
from imgprep.ssh import SshTarget
from tests.simulator import open_stream, read_send_stream, tree_digest
from tests.smartos.conftest import ORIGIN_IMAGE, PROTOTYPE_FILES, Node, events, summary

REPO = Path(__file__).resolve().parents[2]
OP = "svc:/site/imgprep/operator-script:default"
FS_MINIMAL = "svc:/system/filesystem/minimal:default"
# What must never start during the prepare boot (and does start in a normal boot).
HELD = (
    "svc:/pkgsrc/consul:default",
    "svc:/pkgsrc/redis:default",
    "svc:/site/localfs-only:default",
    "svc:/network/ssh:default",
    "svc:/system/system-log:default",
    "svc:/system/filesystem/local:default",
    "svc:/milestone/multi-user:default",
    "svc:/milestone/multi-user-server:default",
)


def record(sim: Node, out: str) -> dict[str, Any]:
    return JobStore(sim.state_dir).get(summary(out)["job_uuid"])


def sends(sim: Node) -> list[list[str]]:
    return [c for c in sim.node.commands if c[:2] == ["zfs", "send"] and "-nP" not in c]


def assert_restored(sim: Node, uuid: str, digest: str, *, running: bool) -> None:
    """The zone is exactly as before the job: content, snapshots, state."""
    assert tree_digest(sim.node.zonepath(uuid)) == digest
    assert sim.node.snapshot_names(f"zones/{uuid}") == []
    assert sim.node.state(uuid) == ("running" if running else "stopped")


def write_script(sim: Node, text: str) -> str:
    path = sim.tmp / "operator-script"
    path.write_text(text)
    return str(path)


# --- success ---------------------------------------------------------------------------


def test_success_image_order_state_and_rollback_of_a_running_zone(sim: Node) -> None:
    uuid = sim.zone(running=True)
    before = tree_digest(sim.node.zonepath(uuid))

    code, out, err = sim.create(uuid, "--name", "myimage", "--version", "1.0.0")

    assert code == 0, err
    result = summary(out)
    assert result["execution"] == "succeeded"
    # the state the guest reported, in order
    assert [e["state"] for e in events(out) if e["event"] == "guest"] == ["running", "success"]
    assert record(sim, out)["prepare"]["state"] == "success"

    # the image file and its manifest agree
    image = Path(result["file"])
    assert image.name == f"{result['image_uuid']}.zfs.gz"
    manifest = json.loads(Path(result["manifest"]).read_text())
    data = image.read_bytes()
    assert manifest["files"][0]["sha1"] == hashlib.sha1(data).hexdigest()
    assert manifest["files"][0]["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["files"][0]["size"] == len(data)
    assert manifest["files"][0]["compression"] == "gzip"
    assert manifest["name"] == "myimage"
    assert manifest["version"] == "1.0.0"
    assert manifest["type"] == "zone-dataset"
    # inherited from the origin image as imgadm does; description is not inherited
    assert manifest["os"] == "smartos"
    assert manifest["users"] == ORIGIN_IMAGE["users"]
    assert manifest["generate_passwords"] is True
    assert "billing_tags" not in manifest  # an empty list is dropped
    assert manifest.get("description") != ORIGIN_IMAGE["description"]
    assert manifest["requirements"] == {"min_ram": 256, "min_platform": {"7.0": "20250101T000000Z"}}

    # the image is the prepared zone: cleaned, imgprep gone, content kept
    with open_stream(image) as f:
        header, tar = read_send_stream(f.read())
    assert header["snapshot"] == f"zones/{uuid}@final"
    names = set(tar.getnames())
    assert "root/etc/motd" in names
    extracted = tar.extractfile("root/opt/local/lib/app/data.bin")
    assert extracted is not None
    assert extracted.read() == PROTOTYPE_FILES["opt/local/lib/app/data.bin"]
    for gone in (
        "root/var/ssh/ssh_host_ed25519_key",
        "root/root/.ssh/authorized_keys",
        "root/root/.bash_history",
        "root/tmp/session-leftover",
        "root/var/imgprep",
        "root/var/svc/method/imgprep-operator-script",
        "root/var/svc/manifest/site/imgprep-operator-script.xml",
    ):
        assert gone not in names
    messages = tar.extractfile("root/var/log/messages")
    assert messages is not None
    assert messages.read() == b""  # truncated, kept

    # the simulated boots: the prototype's, the prepare boot, the restart
    boots = sim.node.boots(uuid)
    assert len(boots) == 3
    normal, prepare, restart = boots
    assert prepare.halted
    assert prepare.methods == [{"fmri": OP, "exit_status": -signal.SIGKILL, "halted": True}]
    assert prepare.started.index(FS_MINIMAL) < prepare.started.index(OP)
    for service in HELD:
        assert service not in prepare.started  # never started: the zone halted first
        assert service in prepare.held
        assert service in normal.started
        assert service in restart.started
    assert OP not in normal.started
    assert OP not in restart.started
    calls = [" ".join([c["cmd"], *c["args"]]) for c in sim.node.smf_calls(uuid)]
    assert "svccfg delete -f svc:/site/imgprep/operator-script" in calls
    assert calls[-1] == "halt -l"

    # rolled back to exactly what it was, restarted, snapshots gone
    assert_restored(sim, uuid, before, running=True)
    assert "prepare-image:state" not in sim.node.metadata(uuid)["customer_metadata"]


def test_stopped_zone_with_delegated_dataset_xz_and_no_origin(sim: Node) -> None:
    uuid = sim.zone(image_uuid="00000000-1111-4222-8333-444444444444", delegated=True)
    before = tree_digest(sim.node.zonepath(uuid))
    sim.node.faults.send_drops = 0

    code, out, err = sim.create(uuid, compression="xz")

    assert code == 0, err
    result = summary(out)
    assert result["file"].endswith(".zfs.xz")
    manifest = json.loads(Path(result["manifest"]).read_text())
    assert manifest["files"][0]["compression"] == "xz"
    assert "users" not in manifest  # origin image not installed: nothing inherited
    snapshots = [c[-1] for c in sim.node.commands if c[:2] == ["zfs", "snapshot"]]
    assert sorted(s.split("@")[0] for s in snapshots) == sorted(
        [f"zones/{uuid}", f"zones/{uuid}/data", f"zones/{uuid}"]
    )
    assert sends(sim) == [["zfs", "send", f"zones/{uuid}@final"]]
    assert_restored(sim, uuid, before, running=False)
    assert sim.node.snapshot_names(f"zones/{uuid}/data") == []
    assert len(sim.node.boots(uuid)) == 1  # the prepare boot only: not restarted


# --- failures: the zone is restored ---------------------------------------------------


def test_script_error_is_reported_and_the_zone_restored(sim: Node) -> None:
    uuid = sim.zone(running=True)
    before = tree_digest(sim.node.zonepath(uuid))
    script = write_script(sim, "#!/bin/sh\necho cleaning up\necho 'cannot remove /opt/thing' >&2\nexit 3\n")

    code, out, _err = sim.create(uuid, "--script", script)

    assert code == 1
    job = record(sim, out)
    assert job["execution"] == "failed"
    assert job["error"]["code"] == "PrepareImageError"
    assert "exit status 3" in job["error"]["message"]
    assert "cannot remove /opt/thing" in job["error"]["message"]
    assert job["prepare"]["state"] == "error"
    assert "cannot remove /opt/thing" in job["prepare"]["log"]
    assert job["vm_restored"] is True
    assert sends(sim) == []
    assert list(sim.output.iterdir()) == []
    assert_restored(sim, uuid, before, running=True)


def test_no_state_within_the_timeout_is_did_not_run(sim: Node) -> None:
    # Without filesystem/minimal the service's require_all dependency can never be
    # satisfied: the zone boots, the method never runs, no state is ever reported.
    uuid = sim.zone()
    (sim.node.zone_root(uuid) / "lib/svc/manifest/system-filesystem-minimal.xml").unlink()
    before = tree_digest(sim.node.zonepath(uuid))
    sim.write_config(timeouts={"boot": 1})

    code, out, _err = sim.create(uuid)

    assert code == 1
    job = record(sim, out)
    assert job["error"]["code"] == "PrepareImageDidNotRun"
    assert sim.node.boots(uuid)[-1].methods == []
    assert ["vmadm", "stop", "-F", uuid] in sim.node.commands  # the prepare boot halted
    assert_restored(sim, uuid, before, running=False)


def test_a_connection_dropped_during_zfs_send_is_retried(sim: Node) -> None:
    uuid = sim.zone(running=True)
    before = tree_digest(sim.node.zonepath(uuid))
    sim.node.faults.send_drops = 1

    code, out, err = sim.create(uuid)

    assert code == 0, err
    assert len(sends(sim)) == 2
    result = summary(out)
    data = Path(result["file"]).read_bytes()
    manifest = json.loads(Path(result["manifest"]).read_text())
    assert manifest["files"][0]["sha1"] == hashlib.sha1(data).hexdigest()
    with open_stream(Path(result["file"])) as f:
        _, tar = read_send_stream(f.read())  # complete: the tar reads to its end
    assert "root/opt/local/lib/app/data.bin" in tar.getnames()
    assert_restored(sim, uuid, before, running=True)


def test_a_connection_that_keeps_dropping_fails_with_the_zone_restored(sim: Node) -> None:
    uuid = sim.zone(running=True)
    before = tree_digest(sim.node.zonepath(uuid))
    sim.node.faults.send_drops = 1000
    sim.write_config(retry_attempts=2)

    code, out, _err = sim.create(uuid)

    assert code == 1
    job = record(sim, out)
    assert job["error"]["code"] == "TransientError"
    assert "zfs send" in job["error"]["message"]
    assert len(sends(sim)) == 2
    assert job["vm_restored"] is True
    assert list(sim.output.iterdir()) == []  # the partial file is gone
    assert_restored(sim, uuid, before, running=True)


def test_an_unsafe_zone_root_is_refused_and_the_zone_restored(sim: Node) -> None:
    # The zone root is the guest's: a symlink planted where imgprep writes must not
    # redirect a write of the global zone's root to the host.
    outside = sim.tmp / "host-dir"
    outside.mkdir()
    uuid = sim.zone()
    (sim.node.zone_root(uuid) / "var/svc").mkdir(parents=True, exist_ok=True)
    (sim.node.zone_root(uuid) / "var/svc/method").symlink_to(outside)
    before = tree_digest(sim.node.zonepath(uuid))

    code, out, _err = sim.create(uuid)

    assert code == 1
    assert "symlink" in record(sim, out)["error"]["message"]
    assert list(outside.iterdir()) == []
    assert_restored(sim, uuid, before, running=False)


# --- refused before anything is touched --------------------------------------------------


@pytest.mark.parametrize("accept", [False, True])
def test_a_changed_host_key_is_refused_before_any_command(sim: Node, accept: bool) -> None:
    uuid = sim.zone(running=True)
    before = tree_digest(sim.node.zonepath(uuid))
    sim.node.commands.clear()
    sim.server.set_host_key(paramiko.ECDSAKey.generate())

    code, _, err = sim.create(uuid, *(["--accept-new-host-key"] if accept else []))

    assert code == 2
    assert "HOST KEY CHANGED" in err
    assert sim.node.commands == []  # nothing ran on the node, let alone a mutation
    assert sim.known_hosts.read_text().count("\n") == 1
    assert_restored(sim, uuid, before, running=True)


def test_an_unknown_host_key_is_refused_unless_accepted(sim: Node) -> None:
    uuid = sim.zone()
    sim.known_hosts.write_text("")
    sim.node.commands.clear()

    code, _, err = sim.create(uuid)
    assert code == 2
    assert "unknown host key" in err
    assert "--accept-new-host-key" in err
    assert sim.node.commands == []

    code, _, err = sim.create(uuid, "--accept-new-host-key")
    assert code == 0, err
    saved = sim.known_hosts.read_text()
    assert saved == f"[127.0.0.1]:{sim.server.port} {sim.host_key.get_name()} {sim.host_key.get_base64()}\n"

    code, _, err = sim.create(uuid)  # now known
    assert code == 0, err


def test_an_unknown_brand_is_refused(sim: Node) -> None:
    uuid = sim.zone(brand="docker")

    code, _, err = sim.create(uuid)

    assert code == 2
    assert "brand 'docker'" in err
    assert "bhyve" in err  # the message names what is prepared
    assert sim.node.mutating_commands() == []


@pytest.mark.parametrize("brand", ["bhyve", "kvm"])
def test_an_hvm_vm_with_zstd_or_without_disks_is_refused_before_anything_is_touched(
    sim: Node, brand: str, tmp_path: Path
) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\0" * 4096)
    uuid = sim.node.create_hvm(alias="hvm", brand=brand, disk_image=disk, kernel=disk, initrd=disk)

    code, _, err = sim.create(uuid, compression="zstd")
    assert code == 2
    assert "compression zstd" in err
    sim.node.zones[uuid].disks = []
    code, _, err = sim.create(uuid)
    assert code == 2
    assert "reports no disks" in err
    assert sim.node.mutating_commands() == []


@pytest.mark.parametrize(
    "files",
    [
        {},  # the simulator's default zone root is a SmartOS tree: no /sbin/init at all
        {"sbin/init": b"\x7fELF upstart", "etc/systemd/system/.keep": b""},  # systemd installed, not the init
    ],
    ids=["no-init", "upstart-init"],
)
def test_an_lx_zone_without_systemd_is_refused_before_anything_is_touched(sim: Node, files: dict[str, bytes]) -> None:
    uuid = sim.zone(brand="lx", files=files)

    code, _, err = sim.create(uuid)

    assert code == 2
    assert err.count("\n") == 1
    assert "lx zone proto does not boot systemd" in err
    assert sim.node.mutating_commands() == []


def test_late_placement_is_refused_for_smf_zones(sim: Node) -> None:
    uuid = sim.zone()
    code, _, err = sim.create(uuid, "--mode", "legacy")
    assert code == 2
    assert "--mode legacy (the classic late placement) exists for Linux guests (lx, bhyve, kvm); proto is joyent" in err
    assert sim.node.mutating_commands() == []


def test_zstd_is_refused_for_zone_images(sim: Node) -> None:
    uuid = sim.zone()
    code, _, err = sim.create(uuid, compression="zstd")
    assert code == 2
    assert "compression zstd is not available for SmartOS images" in err
    assert sim.node.mutating_commands() == []


def test_remote_arguments_are_quoted(sim: Node) -> None:
    sim.zone()
    hostile = "proto'; touch /tmp/imgprep-pwned; echo '"

    code, _, err = sim.create(hostile)

    assert code == 2
    assert "no VM with alias" in err
    assert ["vmadm", "lookup", "-1", f"alias={hostile}"] in sim.node.commands
    assert not Path("/tmp/imgprep-pwned").exists()


def test_a_vm_is_found_by_alias(sim: Node) -> None:
    uuid = sim.zone(alias="web-proto")
    code, out, err = sim.create("web-proto")
    assert code == 0, err
    assert record(sim, out)["params"]["vm_uuid"] == uuid


# --- crash and recovery ---------------------------------------------------------------------


def test_jobs_recover_after_the_cli_was_killed_mid_job(sim: Node) -> None:
    uuid = sim.zone(running=True)
    before = tree_digest(sim.node.zonepath(uuid))
    script = write_script(sim, "#!/bin/sh\necho preparing\nexec sleep 600\n")
    sim.write_config(timeouts={"prepare": 900})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("SSH_AUTH_SOCK", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgprep", "create", "--config", str(sim.config), "--backend", "smartos",
         "--host", "node1", "--vm", uuid, "--compression", "gzip", "--output-dir", str(sim.output),
         "--script", script],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while sim.node.metadata(uuid)["customer_metadata"].get("prepare-image:state") != "running":
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            if time.monotonic() > deadline:  # a bound on the wait, not a speed check
                pytest.fail("the prepare boot never reported running")
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)  # no cleanup: the zone is left in its prepare boot
    finally:
        proc.kill()
        proc.wait()
    assert sim.node.state(uuid) == "running"
    assert sim.node.snapshot_names(f"zones/{uuid}") != []

    code, out, _ = sim.cli("jobs", "--config", str(sim.config), "list", "--json")
    assert code == 0
    (row,) = json.loads(out)
    assert row["needs_recovery"] is True
    assert row["execution"] == "running"

    code, out, err = sim.cli("jobs", "--config", str(sim.config), "recover", row["uuid"])
    assert code == 0, err
    assert "restored" in out
    job = JobStore(sim.state_dir).get(row["uuid"])
    assert job["vm_restored"] is True
    assert job["error"]["code"] == "Interrupted"
    assert_restored(sim, uuid, before, running=True)
    assert not sim.node.boots(uuid)[1].halted  # the prepare boot was stopped from outside

    code, out, _ = sim.cli("jobs", "--config", str(sim.config), "recover", row["uuid"])
    assert code == 0
    assert "nothing to do" in out


# --- the SSH target ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cn1", SshTarget("cn1")),
        ("admin@cn1", SshTarget("cn1", user="admin")),
        ("cn1.example.com:2222", SshTarget("cn1.example.com", port=2222)),
        ("root@10.0.0.5:22", SshTarget("10.0.0.5")),
        ("root@[fd00::5]:2200", SshTarget("fd00::5", port=2200)),
    ],
)
def test_ssh_target_parse(text: str, expected: SshTarget) -> None:
    assert SshTarget.parse(text) == expected


@pytest.mark.parametrize("text", ["", "a@b@c", "cn1:port", "cn1:70000", "cn 1", "[::1"])
def test_ssh_target_parse_rejects(text: str) -> None:
    from imgprep.errors import InvalidInput

    with pytest.raises(InvalidInput):
        SshTarget.parse(text)


# --- a job record of imgprep 0.1.0 ------------------------------------------------------

RECORDS = REPO / "tests" / "data" / "records"


def node_command(sim: Node, *argv: str) -> None:
    err = bytearray()
    status = sim.node.execute(list(argv), lambda: b"", lambda _out: None, err.extend, lambda: None)
    assert status == 0, err.decode()


@pytest.mark.parametrize("port_matches", [False, True], ids=["stored-target-differs", "stored-target-matches"])
def test_a_v1_record_is_recovered_on_the_configured_node_only(sim: Node, port_matches: bool) -> None:
    uuid = sim.zone(running=True)
    before = tree_digest(sim.node.zonepath(uuid))
    job = "bb9c39fe-0000-4000-8000-000000000001"
    text = (RECORDS / "v1-smartos-interrupted-after-checkpoint.json").read_text()
    port = sim.server.port if port_matches else sim.server.port + 1
    for key, value in {
        '"@PORT@"': str(port),
        "@JOB_UUID@": job,
        "@JOB8@": job[:8],
        "@VM_UUID@": uuid,
        "@IMAGE_UUID@": "01ab63e7-fea6-494e-8a45-cd084ff318d1",
        "@OUTPUT_DIR@": str(sim.output),
        "@KEY_FILE@": str(sim.tmp / "client_key"),
        "@KNOWN_HOSTS@": str(sim.known_hosts),
        "@ZONEPATH@": str(sim.node.zonepath(uuid)),
    }.items():
        text = text.replace(key, value)
    raw = json.loads(text)
    assert raw["v"] == 1
    # what the job had done when it died: stopped the zone, taken its checkpoint
    node_command(sim, "vmadm", "stop", uuid)
    node_command(sim, "zfs", "snapshot", "-o", f"imgprep:job={job}", f"zones/{uuid}@imgprep-pre-prepare-{job[:8]}")
    store = JobStore(sim.state_dir)
    store.save(dict(raw))
    db = sqlite3.connect(store.path)
    with db:
        db.execute("UPDATE jobs SET record = ? WHERE uuid = ?", (json.dumps(raw), job))
    db.close()

    code, out, err = sim.cli("jobs", "--config", str(sim.config), "recover", job)
    if not port_matches:  # the record names another SSH target than the configuration: refused
        assert code == 2, err
        assert "recovery connects only as configured" in err
        assert sim.node.state(uuid) == "stopped"
        assert sim.node.snapshot_names(f"zones/{uuid}") == [f"zones/{uuid}@imgprep-pre-prepare-{job[:8]}"]
        return
    assert code == 0, err
    assert "restored" in out
    recovered = store.get(job)
    assert recovered["v"] == 2
    assert recovered["vm_restored"] is True
    assert recovered["error"]["code"] == "Interrupted"
    assert [r["name"] for r in recovered["always_results"]] == ["restore_disks", "delete_checkpoint", "restart_vm"]
    assert_restored(sim, uuid, before, running=True)


def test_validation_runs_once_over_one_connection(sim: Node) -> None:
    """Validation runs once, under the lock (the chain's validate step no longer repeats it):
    one vmadm lookup, one imgadm get, one sysinfo."""
    sim.zone(running=True)
    code, _, err = sim.create("proto")  # by alias: a vmadm lookup
    assert code == 0, err
    commands = sim.node.commands
    assert sum(c[:2] == ["imgadm", "get"] for c in commands) == 1
    assert sum(c[:1] == ["sysinfo"] for c in commands) == 1
    assert sum(c[:2] == ["vmadm", "lookup"] for c in commands) == 1
