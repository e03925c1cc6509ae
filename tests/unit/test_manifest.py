"""IMGAPI v2 manifests: every bad field named by its path; the published manifest's precedence."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from imgprep.errors import InvalidInput
from imgprep.manifest import (
    build_manifest,
    default_version,
    load_user_manifest,
    rfc3339,
    validate_user_manifest,
)

OWNER = "930896af-bf8c-48d4-885c-6573a94b1853"
GOOD: dict[str, Any] = {
    "name": "debian-12/consul",
    "version": "1.0.0-rc_1",
    "uuid": "2b683a82-a066-11e3-97ab-2faa44701c5a",
    "owner": OWNER,
    "origin": "f70ff7a4-8b0b-11e4-8d7b-b34a2a0f1b4c",
    "type": "zvol",
    "os": "linux",
    "description": "a consul server",
    "homepage": "https://example.com",
    "nic_driver": "virtio",
    "disk_driver": "virtio",
    "cpu_type": "host",
    "public": False,
    "disabled": False,
    "generate_passwords": True,
    "image_size": 10240,
    "requirements": {
        "min_ram": 512,
        "max_ram": 4096,
        "brand": "kvm",
        "min_platform": {"7.0": "20141030T081701Z"},
        "networks": [{"name": "net0"}],
        "ssh_key": True,
    },
    "tags": {"role": "consul"},
    "users": [{"name": "root"}],
}


def test_a_good_manifest_passes_and_is_copied() -> None:
    result = validate_user_manifest(GOOD)
    assert result == GOOD
    assert result is not GOOD


@pytest.mark.parametrize(
    ("field", "value", "path"),
    [
        ("name", "has space", ".name"),
        ("name", "", ".name"),
        ("name", 5, ".name"),
        ("version", "1.0+build", ".version"),
        ("uuid", "not-a-uuid", ".uuid"),
        ("uuid", "urn:uuid:{2B683A82-A066-11E3-97AB-2FAA44701C5A}", ".uuid"),
        ("uuid", "2B683A82-A066-11E3-97AB-2FAA44701C5A", ".uuid"),
        ("uuid", "{2b683a82-a066-11e3-97ab-2faa44701c5a}", ".uuid"),
        ("uuid", "2b683a82a06611e397ab2faa44701c5a", ".uuid"),
        ("owner", 42, ".owner"),
        ("origin", "zzz", ".origin"),
        ("type", "vm", ".type"),
        ("os", "plan9", ".os"),
        ("description", ["x"], ".description"),
        ("public", "yes", ".public"),
        ("image_size", 0, ".image_size"),
        ("image_size", True, ".image_size"),
        ("requirements", [], ".requirements"),
        ("requirements", {"min_ram": -1}, ".requirements.min_ram"),
        ("requirements", {"min_ram": "512"}, ".requirements.min_ram"),
        ("requirements", {"max_memory": True}, ".requirements.max_memory"),
        ("requirements", {"brand": 1}, ".requirements.brand"),
        ("requirements", {"min_platform": "7.0"}, ".requirements.min_platform"),
        ("requirements", {"networks": {}}, ".requirements.networks"),
        ("requirements", {"ssh_key": "true"}, ".requirements.ssh_key"),
        ("requirements", {"gpu": 1}, ".requirements.gpu"),
        ("tags", "role=consul", ".tags"),
        ("state", "active", ".state"),
        ("files", [], ".files"),
        ("v", 2, ".v"),
        ("published_at", "now", ".published_at"),
        ("colour", "blue", ".colour"),
    ],
)
def test_each_bad_field_is_named_by_its_path(field: str, value: Any, path: str) -> None:
    with pytest.raises(InvalidInput) as info:
        validate_user_manifest({**GOOD, field: value})
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"manifest {path}: ")
    assert info.value.code == "ValidationFailed"


def test_every_bad_field_is_reported_at_once() -> None:
    bad = {"name": "bad name", "os": "dos", "requirements": {"min_ram": 0, "max_ram": "lots"}, "files": []}
    with pytest.raises(InvalidInput) as info:
        validate_user_manifest(bad)
    assert [p.split(":")[0] for p in info.value.problems] == [
        "manifest .name",
        "manifest .os",
        "manifest .requirements.min_ram",
        "manifest .requirements.max_ram",
        "manifest .files",
    ]
    assert "got 'dos'" in info.value.message


@pytest.mark.parametrize("data", [[], "name", None, 3])
def test_manifest_must_be_an_object(data: Any) -> None:
    with pytest.raises(InvalidInput, match="manifest: must be a JSON object"):
        validate_user_manifest(data)


def test_load_user_manifest(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"name": "x", "requirements": {"min_ram": 1024}}))
    assert load_user_manifest(path) == {"name": "x", "requirements": {"min_ram": 1024}}


def test_load_user_manifest_invalid_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text('{\n  "name": "x",\n  "version": 1.0.0\n}\n')
    with pytest.raises(InvalidInput) as info:
        load_user_manifest(path)
    assert info.value.message.startswith(f"manifest {path}:3: invalid JSON: ")


def test_load_user_manifest_unreadable(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="cannot read: No such file or directory"):
        load_user_manifest(tmp_path / "missing.json")


def test_build_manifest_precedence_learned_then_user_then_fixed() -> None:
    image = "0f3d3f3a-0000-4000-8000-000000000001"
    learned = {"type": "zvol", "os": "linux", "nic_driver": "e1000", "image_size": 10240, "state": "bogus"}
    user = {
        "name": "web",
        "version": "2",
        "nic_driver": "virtio",  # user beats learned
        "uuid": "ffffffff-ffff-4fff-8fff-ffffffffffff",  # ignored: the image uuid is fixed
        "public": True,
    }
    file_info = {"sha1": "a" * 40, "size": 123, "compression": "gzip"}
    manifest = build_manifest(
        image_uuid=image, user=user, learned=learned, file_info=file_info, published_at="2024-05-01T00:00:00.000Z"
    )
    assert manifest == {
        "v": 2,
        "uuid": image,
        "name": "web",
        "version": "2",
        "type": "zvol",
        "os": "linux",
        "nic_driver": "virtio",
        "image_size": 10240,
        "owner": "00000000-0000-0000-0000-000000000000",
        "public": True,
        "disabled": False,
        "state": "active",  # fixed: beats what was learned
        "files": [file_info],
        "published_at": "2024-05-01T00:00:00.000Z",
    }
    assert manifest["files"][0] is not file_info


def test_build_manifest_keeps_a_given_owner() -> None:
    manifest = build_manifest(image_uuid="u", user={"owner": OWNER}, learned={}, file_info={}, published_at="t")
    assert manifest["owner"] == OWNER


def test_default_version_and_rfc3339() -> None:
    moment = dt.datetime(2024, 5, 1, 12, 30, 45, 123456, tzinfo=dt.UTC)
    assert default_version(moment) == "20240501T123045Z"
    assert rfc3339(moment) == "2024-05-01T12:30:45.123Z"
    plus_two = dt.datetime(2024, 5, 1, 14, 30, 45, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert rfc3339(plus_two) == "2024-05-01T12:30:45.000Z"
