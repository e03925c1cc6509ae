"""What ``imgadm create`` would write into a zone image's manifest, learned from the node."""

from __future__ import annotations

import logging
from typing import Any

from imgprep.backends.smartos.node import Node
from imgprep.errors import CommandError

log = logging.getLogger(__name__)

# What imgadm copies from the origin image's manifest (imgadm.js createImage).
INHERITED_FIELDS = (
    "type",
    "os",
    "requirements",
    "users",
    "billing_tags",
    "traits",
    "generate_passwords",
    "inherited_directories",
    "nic_driver",
    "disk_driver",
    "cpu_type",
    "image_size",
)


def learn(node: Node, vm: dict[str, Any], brand: str) -> dict[str, Any]:
    """Manifest fields: the origin image's inherited ones (as imgadm), type, min_platform."""
    learned: dict[str, Any] = {"type": "zone-dataset", "os": "smartos"}
    origin = vm.get("image_uuid")
    if origin:
        try:
            info = node.json(["imgadm", "get", str(origin)])
        except CommandError as exc:
            log.warning("origin image %s is not installed on the node (%s): nothing inherited", origin, exc)
        else:
            manifest = info.get("manifest", {}) if isinstance(info, dict) else {}
            for field in INHERITED_FIELDS:
                value = manifest.get(field)
                if value is not None and value != []:
                    learned[field] = value
    requirements = dict(learned.get("requirements") or {})
    if brand == "lx":  # imgadm: an lx image says so, and needs the lx brand
        learned["type"] = "lx-dataset"
        if learned["os"] == "smartos":
            learned["os"] = "linux"
        requirements["brand"] = "lx"
    # imgadm: a SmartOS image's binaries need at least the platform they were built on
    try:
        sysinfo = node.json(["sysinfo"])
    except CommandError as exc:
        log.warning("sysinfo failed (%s): no requirements.min_platform", exc)
    else:
        if isinstance(sysinfo, dict) and sysinfo.get("SDC Version") and sysinfo.get("Live Image"):
            requirements["min_platform"] = {str(sysinfo["SDC Version"]): str(sysinfo["Live Image"])}
    if requirements:
        learned["requirements"] = requirements
    return learned
