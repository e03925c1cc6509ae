"""The verification's host side: the guest's report parsed (hostile), compared, decided."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import pytest

from imgprep import artifacts, identities
from imgprep.channel import MAX_FIELD, ChannelParser
from imgprep.clonexml import clone_xml
from imgprep.config import Config, load_config
from imgprep.errors import InvalidInput
from imgprep.jobs import build_request
from imgprep.verify import Report, decide, failure_message, parse_report

OLD_ID = "0123456789abcdef0123456789abcdef"
NEW_ID = "fedcba9876543210fedcba9876543210"
OLD_KEY = hashlib.sha256(b"old host key").hexdigest()
NEW_KEY = hashlib.sha256(b"new host key").hexdigest()
PROTOTYPE = {
    "machine-id": [hashlib.sha256(f"{OLD_ID}\n".encode()).hexdigest()],
    "ssh-host-keys": [OLD_KEY],
    "hostid": [hashlib.sha256(b"\x01\x02\x03\x04").hexdigest()],
}
FINGERPRINT = "SHA256:" + "A" * 43 + " (ED25519)"


def good_lines(machine_id: str = NEW_ID) -> list[str]:
    """A report as the runner writes it for a good first boot."""
    id_hash = hashlib.sha256(f"{machine_id}\n".encode()).hexdigest()
    return [
        "system_state=running",
        "settle_s=4",
        f"machine_id={machine_id}",
        "machine_id_mounted=no",
        "commit_state=active",
        "commit_result=success",
        "commit_start_us=31000000",
        f"ssh_host_key={FINGERPRINT}",
        "services=ssh.service imgprep-test-writer.service systemd-journald.service imgprep-verify.service",
        "selinux=disabled",
        f"identity=machine-id {id_hash} /etc/machine-id",
        f"identity=ssh-host-keys {NEW_KEY} /etc/ssh/ssh_host_ed25519_key",
        "end=1",
    ]


def verdict(lines: list[str], prototype: dict[str, list[str]] | None = None) -> tuple[Report, dict[str, Any]]:
    report = parse_report("\n".join(lines))
    checks = decide(report, PROTOTYPE if prototype is None else prototype)
    return report, {c.name: c for c in checks}


def test_a_good_first_boot_passes_every_check() -> None:
    report, checks = verdict(good_lines())
    assert report.rejected == 0
    assert all(c.passed for c in checks.values()), [c.detail for c in checks.values() if not c.passed]
    assert set(checks) == {"report", "boot", "failed-units", "machine-id", "ssh-host-keys", "identities", "filesystems"}
    assert "committed on this boot" in checks["machine-id"].detail
    assert "imgprep-test-writer.service" in report.services
    assert report.as_json()["identities"]["ssh-host-keys"] == [
        {"sha256": NEW_KEY, "path": "/etc/ssh/ssh_host_ed25519_key"}
    ]


def test_the_prototypes_machine_id_fails_it() -> None:
    _, checks = verdict(good_lines(OLD_ID))
    assert not checks["machine-id"].passed
    assert checks["machine-id"].detail == "machine-id equals the prototype's"
    # control: the same report with a new id passes (above); and the message names it
    assert "machine-id equals the prototype's" in failure_message(list(checks.values()))


def test_a_transient_machine_id_fails_it() -> None:
    lines = [line.replace("machine_id_mounted=no", "machine_id_mounted=yes") for line in good_lines()]
    _, checks = verdict(lines)
    assert checks["machine-id"].detail == "machine-id was not committed (still a transient mount)"


def test_failed_units_are_named() -> None:
    _, checks = verdict([*good_lines()[:-1], "failed=broken.service", "failed=imgprep-verify.service", "end=1"])
    assert checks["failed-units"].detail == "failed units: broken.service"  # (our own unit is not the image's)


def test_reused_host_keys_and_identities_fail_it() -> None:
    lines = [
        *good_lines()[:-1],
        f"identity=ssh-host-keys {OLD_KEY} /etc/ssh/ssh_host_rsa_key",
        f"identity=hostid {PROTOTYPE['hostid'][0]} /etc/hostid",
        "end=1",
    ]
    _, checks = verdict(lines)
    assert checks["ssh-host-keys"].detail == "SSH host keys equal the prototype's: /etc/ssh/ssh_host_rsa_key"
    assert checks["identities"].detail == "equal to the prototype's: hostid (/etc/hostid)"


def test_no_host_keys_when_the_prototype_had_some() -> None:
    lines = [line for line in good_lines() if not line.startswith(("ssh_host_key=", "identity=ssh"))]
    _, checks = verdict(lines)
    assert checks["ssh-host-keys"].detail == "no SSH host keys after the first boot (the prototype had some)"
    _, control = verdict(lines, {k: v for k, v in PROTOTYPE.items() if k != "ssh-host-keys"})
    assert control["ssh-host-keys"].passed


def test_placeholders_are_not_identities() -> None:
    """``uninitialized`` and ``GenerateName=yes`` are the same everywhere by design."""
    placeholder = hashlib.sha256(b"GenerateName=yes\n").hexdigest()
    lines = [*good_lines()[:-1], f"identity=iscsi-initiatorname {placeholder} /etc/iscsi/initiatorname.iscsi", "end=1"]
    _, checks = verdict(lines, {**PROTOTYPE, "iscsi-initiatorname": [placeholder]})
    assert checks["identities"].passed


@pytest.mark.parametrize(
    ("evidence", "expected"),
    [
        ("kernel_fs=EXT4-fs (vda): recovery complete", "root filesystem needed journal recovery"),
        ("kernel_fs=XFS (vda1): Starting recovery (logdev: internal)", "root filesystem needed journal recovery"),
        ("fsck=systemd-fsck-root.service exit-code 1", "fsck: systemd-fsck-root.service exit-code status 1"),
        ("fsck_log=/dev/vda1: recovering journal", "fsck repaired the filesystem"),
    ],
)
def test_filesystem_recovery_fails_it(evidence: str, expected: str) -> None:
    _, checks = verdict([*good_lines()[:-1], evidence, "end=1"])
    assert not checks["filesystems"].passed
    assert expected in checks["filesystems"].detail


def test_a_clean_fsck_passes() -> None:
    _, checks = verdict([*good_lines()[:-1], "fsck=systemd-fsck-root.service success 0", "end=1"])
    assert checks["filesystems"].passed
    assert "systemd-fsck-root.service" in checks["filesystems"].detail


def test_an_incomplete_or_unsettled_report_fails() -> None:
    _, checks = verdict(good_lines()[:-1])
    assert checks["report"].detail == "the verification report was incomplete"
    _, checks = verdict(["system_state=starting", *good_lines()[1:]])
    assert checks["boot"].detail == "the boot did not settle (system state starting)"
    _, checks = verdict([])
    assert not any(c.passed for c in checks.values() if c.name in ("report", "boot", "machine-id"))


def test_hostile_values_are_dropped_or_escaped() -> None:
    hostile = [
        "machine_id=../../etc/shadow",
        "system_state=running; rm -rf /",
        "ssh_host_key=SHA256:short (ED25519)",
        "failed=\x1b[2Jx.service",
        "services=ok.service $(reboot) also.service",
        "identity=machine-id " + "0" * 64 + " /etc/shadow",  # not a path of the list
        "identity=machine-id " + "0" * 64 + " /etc/../etc/machine-id",
        "identity=unknown " + "0" * 64 + " /etc/machine-id",
        "identity=ssh-host-keys " + "0" * 64 + " /etc/ssh/sub/ssh_host_x",  # the glob is one component
        "verdict=passed",  # the guest does not decide
        "kernel_fs=\x1b]0;pwned\x07EXT4-fs (vda): orphan cleanup",
        "end=1",
    ]
    report = parse_report("\n".join(hostile))
    assert report.machine_id is None
    assert report.system_state is None
    assert report.ssh_host_keys == []
    assert report.failed == []
    assert report.services == ["ok.service", "also.service"]
    assert report.identities == {}
    assert report.rejected == 10
    assert report.kernel_fs == ["\\x1b]0;pwned\\x07EXT4-fs (vda): orphan cleanup"]
    checks = {c.name: c for c in decide(report, PROTOTYPE)}
    assert not checks["machine-id"].passed
    assert not checks["boot"].passed
    assert not checks["filesystems"].passed


def test_a_flood_is_bounded() -> None:
    flood = [f"failed=x{i}.service" for i in range(5000)] + ["kernel_fs=orphan"] * 5000
    flood += [f"identity=puppet-ssl {'a' * 64} /etc/puppetlabs/puppet/ssl/f{i}" for i in range(5000)]
    report = parse_report("\n".join(flood))
    assert len(report.failed) == 512
    assert len(report.kernel_fs) == 16
    assert sum(len(v) for v in report.identities.values()) == 256
    assert len(failure_message(decide(report, PROTOTYPE))) < 64 * 1024


def test_the_channel_takes_one_capped_verify_message() -> None:
    parser = ChannelParser()
    text = "\n".join(good_lines())
    big = "services=" + "x.service " * 4000
    for payload in (text, big):
        parser.feed(f"IMGPREP1 verify {base64.b64encode(payload.encode()).decode()}\n".encode())
    assert parser.status.verify == text  # the first report counts
    flooded = ChannelParser()
    flooded.feed(f"IMGPREP1 verify {base64.b64encode(big.encode()).decode()}\n".encode())
    assert flooded.status.verify is not None
    assert len(flooded.status.verify) <= MAX_FIELD + 64
    assert parse_report(flooded.status.verify).complete is False


# --- the identity list: one place, both ends ------------------------------------------------


def test_every_listed_pattern_is_judged_by_its_own_pattern() -> None:
    lines = identities.render_list().splitlines()
    assert len(lines) == sum(len(i.patterns) for i in identities.IDENTITIES)
    for line in lines:
        name, pattern = line.split(" ")
        path = pattern.replace("*", "x")
        assert identities.pattern_of(name, path) == pattern


def test_every_listed_identity_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs/cleanup-operations.md").read_text()
    for identity in identities.IDENTITIES:
        for pattern in identity.patterns:
            stem = pattern.rsplit("/", 1)[-1].split("*")[0].split(".")[0] or pattern.rsplit("/", 2)[-2]
            assert stem in doc, (identity.name, pattern)


class FakeGuest:
    """A libguestfs handle's file calls over a dict (a symlink is not a regular file)."""

    def __init__(self, files: dict[str, bytes], links: tuple[str, ...] = ()) -> None:
        self.files = files
        self.links = links

    def glob_expand(self, pattern: str) -> list[str]:
        prefix = pattern.split("*", maxsplit=1)[0]
        return sorted(p for p in [*self.files, *self.links] if p.startswith(prefix))

    def is_file(self, path: str) -> bool:
        return path in self.files

    def filesize(self, path: str) -> int:
        return len(self.files[path])

    def read_file(self, path: str) -> bytes:
        return self.files[path]


def test_the_prototype_is_hashed_never_copied() -> None:
    guest = FakeGuest(
        {
            "/etc/machine-id": f"{OLD_ID}\n".encode(),
            "/etc/ssh/ssh_host_ed25519_key": b"PRIVATE KEY MATERIAL",
            "/etc/ssh/ssh_host_ed25519_key.pub": b"ssh-ed25519 AAAA",
            "/etc/iscsi/initiatorname.iscsi": b"GenerateName=yes\n",  # a placeholder
            "/etc/hostid": b"x" * (identities.MAX_FILE + 1),  # too big to be one
        },
        links=("/var/lib/dbus/machine-id",),
    )
    hashes = identities.hash_guest(guest)
    assert set(hashes) == {"machine-id", "ssh-host-keys"}
    assert hashes["ssh-host-keys"] == sorted(
        hashlib.sha256(d).hexdigest() for d in (b"PRIVATE KEY MATERIAL", b"ssh-ed25519 AAAA")
    )
    assert "PRIVATE" not in repr(hashes)


# --- inputs, the domain, the guest files ----------------------------------------------------


def test_verification_is_on_by_default_for_libvirt_only(tmp_path: Path) -> None:
    assert build_request(Config(), vm="x", output_dir=tmp_path).verify is True
    assert build_request(Config(), vm="x", output_dir=tmp_path, verify=False).verify is False
    smartos = build_request(Config(), vm="x", output_dir=tmp_path, backend="smartos", host="h")
    assert smartos.verify is False  # not available there: recorded, not an error
    with pytest.raises(InvalidInput, match="applies to the libvirt backend"):
        build_request(Config(), vm="x", output_dir=tmp_path, backend="smartos", host="h", verify=True)
    config_file = tmp_path / "c.yaml"
    config_file.write_text("verify: false\nkeep_unverified: true\ntimeouts:\n  verify: 90\n")
    config = load_config(config_file)
    request = build_request(config, vm="x", output_dir=tmp_path)
    assert (request.verify, request.keep_unverified, config.timeouts.verify) == (False, True, 90.0)
    assert build_request(config, vm="x", output_dir=tmp_path, verify=True).verify is True


def test_the_verification_domain_has_only_the_image() -> None:
    proto = """<domain type='qemu'><name>p</name><uuid>1b4e28ba-2fa1-11d2-883f-0016d3cca427</uuid>
      <os><type>hvm</type><nvram template='/usr/share/OVMF/OVMF_VARS.fd'>/var/lib/nv.fd</nvram></os>
      <devices>
        <disk type='file' device='disk'><driver type='qcow2'/><source file='/a'/><target dev='vda'/></disk>
        <disk type='file' device='disk'><driver type='raw'/><source file='/b'/><target dev='vdb'/></disk>
        <interface type='network'><mac address='52:54:00:00:00:01'/><source network='default'/></interface>
      </devices></domain>"""
    from xml.etree import ElementTree as ET

    channel = ET.fromstring("<serial type='unix'><source mode='bind' path='/run/x.sock'/><target port='1'/></serial>")
    result = clone_xml(
        proto,
        name="imgprep-12345678-verify",
        uuid="9f1c2d3e-0000-4000-8000-000000000001",
        overlays={"vdb": Path("/v/image.overlay.qcow2")},
        job_dir=Path("/v"),
        channel=channel,
        nvram=Path("/v/nvram-fresh.fd"),
        only_overlays=True,
    )
    root = ET.fromstring(result.xml)
    disks = root.findall("./devices/disk")
    assert [d.find("source").get("file") for d in disks] == ["/v/image.overlay.qcow2"]  # type: ignore[union-attr]
    assert root.find("./devices/interface") is None
    nvram = root.find("./os/nvram")
    assert nvram is not None
    assert nvram.text == "/v/nvram-fresh.fd"
    assert nvram.get("template") == "/usr/share/OVMF/OVMF_VARS.fd"  # libvirt fills the absent file from it
    assert any("vda (not in the image)" in r for r in result.removed)


def test_the_verification_files() -> None:
    files = artifacts.verify_injection(channel="/dev/ttyS1", settle_timeout=120, identity_list="machine-id /x\n")
    assert [f.path for f in files][-1] == f"{artifacts.VERIFY_PREFIX}/armed"  # armed last
    armed = files[-1].data.decode()
    assert armed == "IMGPREP_CHANNEL=/dev/ttyS1\nIMGPREP_SETTLE_TIMEOUT=120\n"
    unit = next(f for f in files if f.path == artifacts.VERIFY_UNIT_PATH).data.decode()
    assert "After=multi-user.target" in unit
    assert "Type=simple" in unit
    assert next(f for f in files if f.path == artifacts.VERIFY_WANTS).link == artifacts.VERIFY_UNIT_PATH
    seed = artifacts.nocloud_seed("iid-imgprep-verify-1")
    assert seed[0].data.decode().startswith("instance-id: iid-imgprep-verify-1\n")


def test_the_human_lines_escape_guest_text() -> None:
    from imgprep.cli import format_verification

    text = format_verification(
        {
            "status": "failed",
            "duration_s": 95.2,
            "image": "discarded",
            "checks": [{"name": "failed-units", "status": "failed", "detail": "failed units: \x1b[2Jx.service"}],
        }
    )
    assert text.splitlines() == [
        "verification: failed (95 s); image discarded",
        "  failed  failed-units  failed units: \\x1b[2Jx.service",
    ]
    assert format_verification(None) == "verification: none"


def test_an_explicit_verify_on_smartos_is_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from imgprep.cli import EXIT_INVALID, main

    monkeypatch.setenv("IMGPREP_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("IMGPREP_CONFIG", raising=False)
    out, err = io.StringIO(), io.StringIO()
    argv = ["create", "--vm", "x", "--backend", "smartos", "--host", "cn1", "--verify", "--output-dir", str(tmp_path)]
    assert main(argv, out, err) == EXIT_INVALID
    assert err.getvalue().count("\n") == 1
    assert "applies to the libvirt backend" in err.getvalue()
    assert not (tmp_path / "state").exists()  # nothing touched, not even the job store


# --- the step: the job fails, the image goes (or stays, if asked) --------------------------


def run_fake_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, result: dict[str, Any] | None, *flags: str
) -> tuple[int, dict[str, Any], str]:
    import io
    import json

    import imgprep.jobs
    from imgprep.cli import main
    from imgprep.verify import VerificationFailed
    from tests.api.fakebackend import FakeBackend, add_vm, open_gate

    vm = "5d0f3a52-8a57-4a0e-9d8e-6c2f9b1e0a11"

    class Verifying(FakeBackend):
        verification_available = True

        def verify(self) -> dict[str, Any]:
            if result is None:
                raise VerificationFailed(
                    "verification of the image failed: failed units: x.service",
                    result={
                        "checks": [{"name": "failed-units", "status": "failed", "detail": "failed units: x.service"}]
                    },
                )
            return result

    root = tmp_path / "world"
    add_vm(root, vm, "proto")
    open_gate(root, vm)
    monkeypatch.setenv("IMGPREP_FAKE_WORLD", str(root))
    monkeypatch.setenv("IMGPREP_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("IMGPREP_CONFIG", raising=False)
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    monkeypatch.setattr(imgprep.jobs, "backend_class", lambda _name: Verifying)
    out, err = io.StringIO(), io.StringIO()
    code = main(["create", "--vm", vm, "--output-dir", str(out_dir), "--json", *flags], out=out, err=err)
    return code, json.loads(out.getvalue().splitlines()[-1]), err.getvalue()


def test_a_failed_verification_fails_the_job_and_discards_the_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, summary, err = run_fake_job(tmp_path, monkeypatch, None)
    assert code == 1, err
    assert summary["error"]["code"] == "VerificationFailed"
    assert "failed units: x.service" in err
    assert summary["verification"]["status"] == "failed"
    assert summary["verification"]["image"] == "discarded"
    assert summary["verification"]["checks"][0]["name"] == "failed-units"
    assert list((tmp_path / "out").iterdir()) == []


def test_keep_unverified_keeps_the_file_and_no_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, summary, err = run_fake_job(tmp_path, monkeypatch, None, "--keep-unverified")
    assert code == 1, err
    kept = summary["verification"]["image"]
    assert kept.startswith("kept unverified: ")
    assert [p.name for p in (tmp_path / "out").iterdir()] == [Path(kept.split(": ", 1)[1]).name]


def test_control_a_passed_verification_publishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, summary, err = run_fake_job(tmp_path, monkeypatch, {"status": "passed", "checks": []})
    assert code == 0, err
    assert summary["verification"]["status"] == "passed"
    assert summary["verification"]["duration_s"] is not None
    assert Path(summary["manifest"]).exists()
    code, summary, err = run_fake_job(tmp_path, monkeypatch, None, "--no-verify")
    assert code == 0, err
    assert summary["verification"]["status"] == "skipped"


def test_an_interrupted_verification_is_not_left_running() -> None:
    from imgprep.jobs import _mark_interrupted

    record: dict[str, Any] = {
        "execution": "running",
        "chain_results": [{"name": "verify"}],
        "verification": {"status": "running"},
    }
    _mark_interrupted(record)
    assert record["verification"]["status"] == "failed"
    assert record["verification"]["error"]["code"] == "Interrupted"
    done: dict[str, Any] = {"execution": "running", "chain_results": [], "verification": {"status": "passed"}}
    _mark_interrupted(done)
    assert done["verification"] == {"status": "passed"}  # control: a finished verification stays
