"""IMGAPI v2 image manifests: validate what the user gives, build what we publish.

Field reference: IMGAPI's "Image Manifests" documentation. The user may supply any
subset of the user-settable fields; imgprep fills in ``v``, ``uuid``, ``state``,
``files``, ``published_at`` and what it learns from the VM (``type``, ``os``, drivers,
``image_size``).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from imgprep.errors import InvalidInput
from imgprep.uuids import is_canonical

TYPES = ("zone-dataset", "lx-dataset", "zvol", "docker", "other")
OSES = ("smartos", "linux", "windows", "bsd", "illumos", "other")
NAME_RE = re.compile(r"^[A-Za-z0-9._/-]{1,512}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")

# user-settable field -> checker returning an error string or None
_STRING_FIELDS = ("description", "homepage", "eula", "nic_driver", "disk_driver", "cpu_type")


def _check_uuid(value: Any) -> str | None:
    if not isinstance(value, str):
        return "must be a UUID string"
    if not is_canonical(value):
        return f"must be a UUID in canonical lowercase form (8-4-4-4-12 hex digits), got {value!r}"
    return None


def _check_requirements(value: Any, path: str, errors: list[str]) -> None:
    if not isinstance(value, dict):
        errors.append(f"{path}: must be an object")
        return
    for key, item in value.items():
        sub = f"{path}.{key}"
        if key in ("min_ram", "max_ram", "min_memory", "max_memory"):
            if isinstance(item, bool) or not isinstance(item, int) or item <= 0:
                errors.append(f"{sub}: must be a positive integer (MiB), got {item!r}")
        elif key in ("brand", "min_platform", "max_platform", "bootrom"):
            if key in ("min_platform", "max_platform"):
                if not isinstance(item, dict):
                    errors.append(f"{sub}: must be an object")
            elif not isinstance(item, str):
                errors.append(f"{sub}: must be a string, got {item!r}")
        elif key == "networks":
            if not isinstance(item, list):
                errors.append(f"{sub}: must be an array")
        elif key == "ssh_key":
            if not isinstance(item, bool):
                errors.append(f"{sub}: must be true or false")
        else:
            errors.append(f"{sub}: unknown requirement")


def validate_user_manifest(data: Any) -> dict[str, Any]:
    """Check a user-supplied manifest; raise InvalidInput naming every bad field."""
    if not isinstance(data, dict):
        raise InvalidInput("manifest: must be a JSON object")
    errors: list[str] = []
    for key, value in data.items():
        path = f".{key}"
        if key == "name":
            if not isinstance(value, str) or not NAME_RE.match(value):
                errors.append(f"{path}: must be 1-512 characters of [A-Za-z0-9._/-], got {value!r}")
        elif key == "version":
            if not isinstance(value, str) or not VERSION_RE.match(value):
                errors.append(f"{path}: must be 1-128 characters of [A-Za-z0-9._-], got {value!r}")
        elif key in ("uuid", "owner", "origin"):
            problem = _check_uuid(value)
            if problem:
                errors.append(f"{path}: {problem}")
        elif key == "type":
            if value not in TYPES:
                errors.append(f"{path}: must be one of {', '.join(TYPES)}, got {value!r}")
        elif key == "os":
            if value not in OSES:
                errors.append(f"{path}: must be one of {', '.join(OSES)}, got {value!r}")
        elif key in _STRING_FIELDS:
            if not isinstance(value, str):
                errors.append(f"{path}: must be a string, got {value!r}")
        elif key in ("public", "disabled", "generate_passwords"):
            if not isinstance(value, bool):
                errors.append(f"{path}: must be true or false, got {value!r}")
        elif key == "image_size":
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                errors.append(f"{path}: must be a positive integer (MiB), got {value!r}")
        elif key == "requirements":
            _check_requirements(value, path, errors)
        elif key in ("tags", "billing_tags", "traits", "acl", "users", "inherited_directories"):
            if not isinstance(value, dict | list):
                errors.append(f"{path}: must be an object or array")
        elif key in ("v", "state", "files", "published_at", "error"):
            errors.append(f"{path}: is set by imgprep and may not be given")
        else:
            errors.append(f"{path}: unknown manifest field")
    if errors:
        raise InvalidInput([f"manifest {e}" for e in errors])
    return dict(data)


def load_user_manifest(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidInput(f"manifest {path}: cannot read: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"manifest {path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    return validate_user_manifest(data)


def default_version(now: dt.datetime | None = None) -> str:
    return (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%SZ")


def rfc3339(moment: dt.datetime | None = None) -> str:
    moment = moment or dt.datetime.now(dt.UTC)
    return moment.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def build_manifest(
    *,
    image_uuid: str,
    user: Mapping[str, Any],
    learned: Mapping[str, Any],
    file_info: Mapping[str, Any],
    published_at: str,
) -> dict[str, Any]:
    """The final IMGAPI v2 manifest: learned < user-given < fixed fields."""
    manifest: dict[str, Any] = {"v": 2, "uuid": image_uuid}
    manifest.update(learned)
    manifest.update({k: v for k, v in user.items() if k != "uuid"})
    manifest.setdefault("owner", "00000000-0000-0000-0000-000000000000")
    manifest.setdefault("public", False)
    manifest.setdefault("disabled", False)
    manifest["state"] = "active"
    manifest["files"] = [dict(file_info)]
    manifest["published_at"] = published_at
    return manifest
