"""The SmartOS guest side: the early-boot SMF service, its method, the default cleanup
script and the SMF dependency model that proves the ordering.

Nothing here touches the host: manifests are read from the repository, the shell
scripts run under ``IMGPREP_ROOT`` (a prefix for every path they touch) in a temporary
directory, with fake ``mdata-put``, ``svccfg``, ``svcadm``, ``halt``... first on ``PATH``
(checked before every run). The scripts run under dash and, when installed, ksh93
(illumos's ``/bin/sh``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from imgprep.channel import parse_report
from imgprep.smf_model import (
    Grouping,
    ManifestError,
    ServiceGraph,
    SmfModelError,
    UnknownFmriError,
    graph_from_xml,
    load_manifests,
    normalize_fmri,
)

REPO = Path(__file__).resolve().parents[2]
DTD_PATH = REPO / "smf" / "dtd" / "service_bundle.dtd.1"
MANIFEST_PATH = REPO / "smf" / "imgprep-operator-script.xml"
METHOD_PATH = REPO / "smf" / "imgprep-operator-script"
PREPARE_PATH = REPO / "operator_scripts" / "smartos-prepare-image"
ZONE_DATA = REPO / "tests" / "data" / "smf"

OP = "svc:/site/imgprep/operator-script"
OP_INST = OP + ":default"
FS_LOCAL = "svc:/system/filesystem/local:default"
CONSUL = "svc:/pkgsrc/consul:default"
REDIS = "svc:/pkgsrc/redis:default"
LOCALFS_ONLY = "svc:/site/localfs-only:default"
NETWORK_ONLY = "svc:/site/network-only:default"
MDATA_EXECUTE = "svc:/smartdc/mdata:execute"
ZONEINIT = "svc:/system/zoneinit:default"

# Everything that must wait for the operator script: the applications, and the
# services that run user code (zoneinit, mdata:execute) or start applications.
HELD = (
    CONSUL,
    REDIS,
    LOCALFS_ONLY,
    "svc:/network/ssh:default",
    "svc:/system/system-log:default",
    FS_LOCAL,
    "svc:/milestone/multi-user:default",
    "svc:/milestone/multi-user-server:default",
    ZONEINIT,
    MDATA_EXECUTE,
)

# What may come online while the operator script runs: the boot up to single-user,
# plus the one application the design cannot hold (depends on the network only).
EARLY = frozenset(
    {
        "svc:/system/filesystem/root:default",
        "svc:/system/filesystem/usr:default",
        "svc:/system/device/local:default",
        "svc:/milestone/devices:default",
        "svc:/system/filesystem/minimal:default",
        "svc:/system/manifest-import:default",
        "svc:/network/loopback:default",
        "svc:/network/physical:default",
        "svc:/milestone/network:default",
        "svc:/system/identity:node",
        "svc:/milestone/single-user:default",
        "svc:/milestone/sysconfig:default",
        "svc:/milestone/name-services:default",
        "svc:/system/filesystem/smartdc:default",
        "svc:/smartdc/mdata:fetch",
        NETWORK_ONLY,
    }
)


# --- DTD validation ---------------------------------------------------------


def _dtd() -> etree.DTD:
    return etree.DTD(str(DTD_PATH))


def _parse_no_dtd(path_or_text: Path | str) -> Any:
    # Never load the DTD the DOCTYPE names (/usr/share/lib/xml/dtd/...): validate
    # against the repository's copy.
    parser = etree.XMLParser(load_dtd=False, no_network=True, resolve_entities=False)
    if isinstance(path_or_text, Path):
        return etree.parse(str(path_or_text), parser)
    return etree.fromstring(path_or_text.encode(), parser).getroottree()


def test_dtd_copy_keeps_its_cddl_header() -> None:
    head = DTD_PATH.read_text()[:2000]
    assert "CDDL HEADER START" in head
    assert "CDDL HEADER END" in head
    assert "<!ELEMENT service_bundle" in DTD_PATH.read_text()


def test_operator_script_manifest_validates_against_the_dtd() -> None:
    dtd = _dtd()
    valid = dtd.validate(_parse_no_dtd(MANIFEST_PATH))
    assert valid, str(dtd.error_log)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('grouping="require_all"', 'grouping="require_some"'),
        (' restart_on="none" type="service"', ' type="service"'),
        ('<stability value="Unstable"/>', '<stability value="Shaky"/>'),
        (
            '<create_default_instance enabled="true"/>\n    <single_instance/>',
            '<single_instance/>\n    <create_default_instance enabled="true"/>',
        ),
    ],
    ids=["bad-grouping", "missing-restart_on", "bad-stability", "wrong-order"],
)
def test_a_broken_manifest_fails_dtd_validation(old: str, new: str) -> None:
    """Control for the test above: the validator does reject invalid manifests."""
    text = MANIFEST_PATH.read_text()
    assert old in text
    assert not _dtd().validate(_parse_no_dtd(text.replace(old, new, 1)))


def test_test_data_manifests_validate_against_the_dtd() -> None:
    dtd = _dtd()
    paths = sorted(ZONE_DATA.glob("*.xml"))
    assert len(paths) >= 20
    invalid = [p.name for p in paths if not dtd.validate(_parse_no_dtd(p))]
    assert invalid == []


# --- the manifest itself ----------------------------------------------------


def _manifest_root() -> ET.Element:
    return ET.fromstring(MANIFEST_PATH.read_bytes())


def _script_constant(path: Path, name: str) -> str:
    match = re.search(rf"^{name}=(.*)$", path.read_text(), re.MULTILINE)
    assert match, f"{name} not set in {path.name}"
    return match.group(1)


def test_manifest_declares_the_service_and_its_ordering() -> None:
    service = _manifest_root().find("service")
    assert service is not None
    assert service.get("name") == "site/imgprep/operator-script"
    cdi = service.find("create_default_instance")
    assert cdi is not None
    assert cdi.get("enabled") == "true"

    deps = service.findall("dependency")
    assert [(d.get("grouping"), d.get("restart_on"), d.get("type")) for d in deps] == [
        ("require_all", "none", "service")
    ]
    assert [f.get("value") for f in deps[0].findall("service_fmri")] == ["svc:/system/filesystem/minimal"]

    dependents = service.findall("dependent")
    assert {(d.get("grouping"), d.get("restart_on")) for d in dependents} == {("optional_all", "none")}
    targets = {f.get("value") for d in dependents for f in d.findall("service_fmri")}
    assert targets == {
        "svc:/system/filesystem/local",
        "svc:/milestone/multi-user",
        "svc:/milestone/multi-user-server",
        "svc:/system/zoneinit",
        "svc:/smartdc/mdata:execute",
    }
    # property names in our "dependents" group: must be unique
    assert len({d.get("name") for d in dependents}) == len(dependents)


def test_manifest_start_method_is_transient_with_a_timeout_above_the_scripts() -> None:
    service = _manifest_root().find("service")
    assert service is not None
    start = [m for m in service.findall("exec_method") if m.get("name") == "start"]
    assert len(start) == 1
    assert start[0].get("exec") == "/var/svc/method/imgprep-operator-script %m"
    smf_timeout = int(start[0].get("timeout_seconds") or "0")
    max_script = int(_script_constant(METHOD_PATH, "MAX_SCRIPT_TIMEOUT"))
    # the method's own steps after the script get at least an hour
    assert smf_timeout >= max_script + 3600
    startd = {
        p.get("name"): p.get("value")
        for pg in service.findall("property_group")
        if pg.get("name") == "startd"
        for p in pg.findall("propval")
    }
    assert startd == {"duration": "transient", "timeout_retry": "false"}


def test_method_holds_exactly_the_manifests_dependents() -> None:
    """The method disables each dependent before deleting the service: same list."""
    match = re.search(r'^DEPENDENT_INSTANCES="([^"]*)"', METHOD_PATH.read_text(), re.MULTILINE)
    assert match
    held = set(match.group(1).split())
    graph = load_manifests([*_zone_manifests(), MANIFEST_PATH])
    assert held == set(graph.dependents_of(OP))
    assert len(held) == 5


# --- the model on a SmartOS zone --------------------------------------------


def _zone_manifests() -> list[Path]:
    return sorted(ZONE_DATA.glob("*.xml"))


def _zone(*extra: Path) -> ServiceGraph:
    # In a provisioned zone mdata:fetch, mdata:execute and zoneinit are enabled
    # (the reference manifests ship them disabled).
    return load_manifests([*_zone_manifests(), *extra]).with_enabled(
        "svc:/smartdc/mdata:fetch", MDATA_EXECUTE, "svc:/system/zoneinit"
    )


@pytest.fixture(scope="module")
def zone() -> ServiceGraph:
    return _zone(MANIFEST_PATH)


def _variant(tmp_path: Path, name: str, edit: Any) -> Path:
    """A copy of the operator-script manifest with ``edit(service_element)`` applied."""
    root = ET.fromstring(MANIFEST_PATH.read_bytes())
    service = root.find("service")
    assert service is not None
    edit(service)
    path = tmp_path / name
    path.write_bytes(ET.tostring(root))
    return path


def _set_dependency(service: ET.Element, fmri: str) -> None:
    dep = service.find("dependency")
    assert dep is not None
    fmri_elem = dep.find("service_fmri")
    assert fmri_elem is not None
    fmri_elem.set("value", fmri)


def _drop_dependents(service: ET.Element, keep: Sequence[str] = ()) -> None:
    for dependent in service.findall("dependent"):
        fmri = dependent.find("service_fmri")
        assert fmri is not None
        if fmri.get("value") not in keep:
            service.remove(dependent)


def _add_dependent(service: ET.Element, fmri: str) -> None:
    dependent = ET.SubElement(service, "dependent", name="x-" + fmri, grouping="optional_all", restart_on="none")
    ET.SubElement(dependent, "service_fmri", value=fmri)


def test_a_normal_zone_boot_starts_everything(zone: ServiceGraph) -> None:
    """Control for the ordering tests: every application does come online."""
    result = zone.boot()
    assert result.in_cycle == frozenset()
    assert result.unsatisfiable == frozenset()
    assert result.waiting == frozenset()
    assert set(HELD) <= result.online
    assert OP_INST in result.online
    assert zone.cycles() == []


@pytest.mark.parametrize("service", HELD)
def test_operator_script_is_online_before(zone: ServiceGraph, service: str) -> None:
    assert zone.online_before(OP, service)


def test_only_the_early_boot_runs_while_the_operator_script_runs(zone: ServiceGraph) -> None:
    result = zone.boot(pending=[OP])
    assert result.online == EARLY
    assert set(HELD) <= result.waiting


def test_operator_script_starts_right_after_filesystem_minimal(zone: ServiceGraph) -> None:
    assert zone.online_before("svc:/system/filesystem/minimal", OP)
    order = zone.startup_order()
    assert order.index(OP_INST) < order.index(FS_LOCAL)
    # and it waits for nothing that comes later: it can run with single-user held
    assert OP_INST in zone.boot(pending=["svc:/milestone/single-user"]).online


def test_control_without_the_dependents_applications_are_not_ordered(tmp_path: Path) -> None:
    """The ordering comes from the <dependent> elements, not from luck."""
    bare = _zone(_variant(tmp_path, "bare.xml", _drop_dependents))
    for service in HELD:
        assert not bare.online_before(OP, service), service
    assert set(HELD) <= bare.boot(pending=[OP]).online


def test_filesystem_local_dependent_alone_holds_every_application(tmp_path: Path) -> None:
    only_fs_local = _zone(
        _variant(
            tmp_path,
            "fs-local.xml",
            lambda s: _drop_dependents(s, keep=["svc:/system/filesystem/local"]),
        )
    )
    for service in HELD:
        assert only_fs_local.online_before(OP, service), service


def test_depending_on_filesystem_local_would_leave_pkgsrc_daemons_unordered(
    tmp_path: Path,
) -> None:
    """Why the service depends on filesystem/minimal: depending on filesystem/local
    (the obvious choice) it cannot hold what only needs network + local filesystems."""

    def edit(service: ET.Element) -> None:
        _set_dependency(service, "svc:/system/filesystem/local")
        _drop_dependents(service, keep=["svc:/milestone/multi-user", "svc:/smartdc/mdata:execute"])

    late = _zone(_variant(tmp_path, "late.xml", edit))
    assert late.cycles() == []
    assert late.online_before(OP, REDIS)  # multi-user is still held...
    for service in (CONSUL, LOCALFS_ONLY, "svc:/network/ssh:default"):
        assert not late.online_before(OP, service), service  # ...these are not
        assert service in late.boot(pending=[OP]).online


def test_making_milestone_network_a_dependent_is_a_dependency_cycle(tmp_path: Path) -> None:
    """single-user has optional_all on milestone/network and filesystem/local requires
    single-user: network cannot wait for anything that needs filesystem/local."""

    def edit(service: ET.Element) -> None:
        _set_dependency(service, "svc:/system/filesystem/local")
        _drop_dependents(service)
        _add_dependent(service, "svc:/milestone/network")

    cyclic = _zone(_variant(tmp_path, "cyclic.xml", edit))
    cycles = cyclic.cycles()
    assert len(cycles) == 1
    assert {
        OP_INST,
        "svc:/milestone/network:default",
        "svc:/milestone/single-user:default",
        FS_LOCAL,
    } <= set(cycles[0])
    result = cyclic.boot()
    assert OP_INST in result.in_cycle
    assert CONSUL in result.unsatisfiable  # svc.startd puts the cycle in maintenance


def test_limitation_a_daemon_needing_only_the_network_is_not_held(zone: ServiceGraph) -> None:
    assert NETWORK_ONLY in zone.boot().online  # control: it does start
    assert not zone.online_before(OP, NETWORK_ONLY)
    assert NETWORK_ONLY in zone.boot(pending=[OP]).online


def test_deleting_the_service_releases_the_dependents_unless_held(zone: ServiceGraph) -> None:
    """What the method's teardown does: svccfg delete, after a temporary disable."""
    deleted = zone.without_service(OP)
    assert OP_INST not in deleted.instances
    assert all(dep.declared_by != OP for inst in deleted.instances.values() for dep in inst.dependencies)
    # released: everything starts (the race the hold closes)
    assert set(HELD) <= deleted.boot().online
    # held: the method's DEPENDENT_INSTANCES temporarily disabled
    held = deleted.with_disabled(
        FS_LOCAL,
        "svc:/milestone/multi-user:default",
        "svc:/milestone/multi-user-server:default",
        ZONEINIT,
        MDATA_EXECUTE,
    )
    online = held.boot().online
    assert not (set(HELD) & online)
    assert NETWORK_ONLY in online


def test_a_failed_operator_script_service_fails_open(zone: ServiceGraph) -> None:
    """optional_all ignores an instance in maintenance: if the method exited instead
    of halting, the applications would start. Hence: it always halts."""
    failed = zone.with_disabled(OP)  # maintenance and disabled count alike
    assert set(HELD) <= failed.boot().online


def test_a_clone_without_the_service_boots_like_the_prototype(zone: ServiceGraph) -> None:
    clone = _zone()
    assert clone.boot().online == zone.without_service(OP).boot().online
    assert set(HELD) <= clone.boot().online


def test_path_dependency_of_mdata_fetch(zone: ServiceGraph) -> None:
    """mdata:fetch excludes /tmp/.FIRST_REBOOT_NOT_YET_COMPLETE."""
    assert "svc:/smartdc/mdata:fetch" in zone.boot().online
    blocked = zone.boot(files=["/tmp/.FIRST_REBOOT_NOT_YET_COMPLETE"])
    assert "svc:/smartdc/mdata:fetch" in blocked.unsatisfiable
    assert MDATA_EXECUTE in blocked.unsatisfiable


# --- the model: grouping semantics on small graphs --------------------------


@dataclass
class Svc:
    name: str
    deps: Sequence[tuple[str, Sequence[str]]] = ()
    enabled: bool = True
    dependents: Sequence[tuple[str, str]] = ()
    instances: Sequence[str] | None = None


def _xml(*services: Svc) -> str:
    parts = ['<service_bundle type="manifest" name="test">']
    for svc in services:
        parts.append(f'<service name="{svc.name}" type="service" version="1">')
        if svc.instances is None:
            parts.append(f'<create_default_instance enabled="{str(svc.enabled).lower()}"/>')
        for i, (grouping, fmris) in enumerate(svc.deps):
            parts.append(f'<dependency name="d{i}" grouping="{grouping}" restart_on="none" type="service">')
            parts.extend(f'<service_fmri value="{f}"/>' for f in fmris)
            parts.append("</dependency>")
        for i, (grouping, fmri) in enumerate(svc.dependents):
            parts.append(f'<dependent name="x{i}" grouping="{grouping}" restart_on="none">')
            parts.append(f'<service_fmri value="{fmri}"/></dependent>')
        for inst in svc.instances or ():
            parts.append(f'<instance name="{inst}" enabled="{str(svc.enabled).lower()}"/>')
        parts.append("</service>")
    parts.append("</service_bundle>")
    return "\n".join(parts)


def _graph(*services: Svc) -> ServiceGraph:
    return graph_from_xml([("test.xml", _xml(*services))])


def _d(name: str) -> str:
    return f"svc:/{name}:default"


def test_startup_order_is_waves_in_c_order() -> None:
    graph = _graph(
        Svc("c", [("require_all", ["svc:/a"])]),
        Svc("b"),
        Svc("a"),
        Svc("d", [("require_all", ["svc:/b", "svc:/c"])]),
    )
    assert graph.startup_order() == [_d("a"), _d("b"), _d("c"), _d("d")]
    assert graph.boot().waves == ((_d("a"), _d("b")), (_d("c"),), (_d("d"),))


def test_online_before_is_a_guarantee_not_a_position() -> None:
    graph = _graph(Svc("a"), Svc("b"), Svc("c", [("require_all", ["svc:/a"])]))
    order = graph.startup_order()
    assert order.index(_d("a")) < order.index(_d("b"))  # same wave, C order...
    assert not graph.online_before("svc:/a", "svc:/b")  # ...but parallel
    assert graph.online_before("svc:/a", "svc:/c")
    assert not graph.online_before("svc:/c", "svc:/a")


def test_require_all() -> None:
    graph = _graph(Svc("a"), Svc("b"), Svc("x", [("require_all", ["svc:/a", "svc:/b"])]))
    assert graph.online_before("svc:/a", "svc:/x")
    assert graph.online_before("svc:/b", "svc:/x")
    assert _d("x") in graph.with_disabled("svc:/a").boot().unsatisfiable
    missing = _graph(Svc("a"), Svc("x", [("require_all", ["svc:/a", "svc:/nowhere"])]))
    assert _d("x") in missing.boot().unsatisfiable


def test_require_any() -> None:
    graph = _graph(Svc("a"), Svc("b"), Svc("x", [("require_any", ["svc:/a", "svc:/b"])]))
    assert _d("x") in graph.boot().online
    one = graph.with_disabled("svc:/a")
    assert _d("x") in one.boot().online
    assert one.online_before("svc:/b", "svc:/x")
    assert _d("x") in graph.with_disabled("svc:/a", "svc:/b").boot().unsatisfiable


def test_optional_all_ignores_missing_disabled_and_unsatisfiable_members() -> None:
    graph = _graph(
        Svc("disabled", enabled=False),
        Svc("stuck", [("require_all", ["svc:/disabled"])]),
        Svc("slow"),
        Svc(
            "x",
            [
                (
                    "optional_all",
                    [
                        "svc:/disabled",
                        "svc:/missing",
                        "svc:/gone:default",
                        "svc:/stuck",
                        "svc:/slow",
                    ],
                )
            ],
        ),
    )
    result = graph.boot()
    assert _d("x") in result.online
    assert _d("stuck") in result.unsatisfiable
    # a member that can still come online is waited for
    assert graph.online_before("svc:/slow", "svc:/x")
    held = graph.boot(pending=["svc:/slow"])
    assert _d("x") in held.waiting
    assert _d("x") not in held.unsatisfiable


def test_exclude_all() -> None:
    graph = _graph(Svc("a"), Svc("x", [("exclude_all", ["svc:/a"])]))
    result = graph.boot()
    assert _d("a") in result.online
    assert _d("x") not in result.online
    assert _d("x") in result.unsatisfiable
    assert _d("x") in graph.with_disabled("svc:/a").boot().online
    absent = _graph(Svc("x", [("exclude_all", ["svc:/a"])]))
    assert absent.startup_order() == [_d("x")]
    # an excluded service that is offline (starting) makes it wait
    assert _d("x") in graph.boot(pending=["svc:/a"]).waiting


def test_exclude_all_of_an_enabled_service_never_starts() -> None:
    """svc.startd: an excluded member that is offline (may still start) leaves the
    dependency unsatisfied, one that is online makes it unsatisfiable."""
    graph = _graph(Svc("a", [("exclude_all", ["svc:/b"])]), Svc("b"))
    result = graph.boot()
    assert result.waves == ((_d("b"),),)
    assert _d("a") in result.unsatisfiable
    mutual = _graph(Svc("a", [("exclude_all", ["svc:/b"])]), Svc("b", [("exclude_all", ["svc:/a"])]))
    assert mutual.boot().waiting == {_d("a"), _d("b")}


def test_dependency_on_a_service_needs_any_instance() -> None:
    graph = _graph(
        Svc("multi", instances=["one", "two"]),
        Svc("x", [("require_all", ["svc:/multi"])]),
        Svc("y", [("require_all", ["svc:/multi:two"])]),
    )
    one_left = graph.with_disabled("svc:/multi:two")
    assert _d("x") in one_left.boot().online
    assert _d("y") in one_left.boot().unsatisfiable
    assert graph.resolve("svc:/multi") == ("svc:/multi:one", "svc:/multi:two")
    empty = _graph(Svc("none", instances=[]), Svc("x", [("require_all", ["svc:/none"])]))
    assert _d("x") in empty.boot().unsatisfiable


def test_a_dependent_adds_a_dependency_to_the_named_service() -> None:
    graph = _graph(Svc("early", dependents=[("optional_all", "svc:/app")]), Svc("app"))
    (dep,) = graph.dependencies_of("svc:/app")
    assert dep.grouping is Grouping.OPTIONAL_ALL
    assert dep.targets == ("svc:/early",)
    assert dep.declared_by == "svc:/early"
    assert graph.online_before("svc:/early", "svc:/app")
    assert graph.dependents_of("svc:/early") == (_d("app"),)
    assert graph.without_service("svc:/early").dependencies_of("svc:/app") == ()


def test_cycles_are_reported_and_the_boot_terminates() -> None:
    graph = _graph(
        Svc("a", [("require_all", ["svc:/b"])]),
        Svc("b", [("optional_all", ["svc:/a"])]),
        Svc("self", [("require_all", ["svc:/self"])]),
        Svc("needs-a", [("require_all", ["svc:/a"])]),
        Svc("wants-a", [("optional_all", ["svc:/a"])]),
        Svc("free"),
    )
    assert graph.cycles() == [(_d("a"), _d("b")), (_d("self"),)]
    result = graph.boot()
    assert result.in_cycle == {_d("a"), _d("b"), _d("self")}
    assert _d("needs-a") in result.unsatisfiable
    assert result.online == {_d("wants-a"), _d("free")}


def test_exclude_all_edges_do_not_make_cycles() -> None:
    graph = _graph(
        Svc("a", [("exclude_all", ["svc:/b"])]),
        Svc("b", [("require_all", ["svc:/a"])]),
    )
    assert graph.cycles() == []


def test_a_long_chain_does_not_hit_the_recursion_limit() -> None:
    n = 1500
    services = [Svc("s0")] + [Svc(f"s{i}", [("require_all", [f"svc:/s{i - 1}"])]) for i in range(1, n)]
    services.append(Svc("s0-loop", [("require_all", [f"svc:/s{n - 1}", "svc:/s0-loop"])]))
    graph = _graph(*services)
    assert graph.cycles() == [(_d("s0-loop"),)]


@pytest.mark.parametrize(
    ("fmri", "expected"),
    [
        ("milestone/network", "svc:/milestone/network"),
        ("svc:milestone/network", "svc:/milestone/network"),
        ("svc:/milestone/network", "svc:/milestone/network"),
        ("svc://localhost/milestone/network", "svc:/milestone/network"),
        (" svc:/milestone/network:default ", "svc:/milestone/network:default"),
        ("svc:/smartdc/mdata:execute", "svc:/smartdc/mdata:execute"),
        ("file://localhost/tmp/x", "file:///tmp/x"),
        ("file:///tmp/x", "file:///tmp/x"),
    ],
)
def test_normalize_fmri(fmri: str, expected: str) -> None:
    assert normalize_fmri(fmri) == expected


@pytest.mark.parametrize(
    "fmri",
    ["svc://elsewhere/a", "svc:/a:", "svc:/", "svc:/a//b", "file://host/x", "lrc:/etc/rc2_d/S1"],
)
def test_normalize_fmri_rejects(fmri: str) -> None:
    with pytest.raises(ValueError, match="invalid FMRI"):
        normalize_fmri(fmri)


def test_instance_and_service_fmris_resolve_alike(zone: ServiceGraph) -> None:
    assert zone.resolve("svc:/milestone/network") == ("svc:/milestone/network:default",)
    assert zone.resolve("milestone/network:default") == ("svc:/milestone/network:default",)
    assert zone.online_before(OP, "svc:/pkgsrc/consul") == zone.online_before(OP_INST, "pkgsrc/consul:default")
    with pytest.raises(UnknownFmriError, match="svc:/no/such"):
        zone.resolve("svc:/no/such")


def test_invalid_manifests_report_every_problem_with_its_place() -> None:
    bad = """<service_bundle type="manifest" name="bad">
      <service name="a" type="service" version="1">
        <create_default_instance enabled="maybe"/>
        <dependency name="d" grouping="require_some" restart_on="none" type="service">
          <service_fmri value="svc://remote/x"/>
        </dependency>
      </service>
    </service_bundle>"""
    with pytest.raises(ManifestError) as info:
        graph_from_xml([("bad.xml", bad), ("broken.xml", "<service_bundle")])
    problems = info.value.problems
    assert len(problems) == 4
    assert all(p.startswith(("bad.xml: /service_bundle/service[0]", "broken.xml: /")) for p in problems)
    assert any("require_some" in p for p in problems)
    assert any("maybe" in p for p in problems)
    assert any("svc://remote/x" in p for p in problems)
    assert any("not well-formed" in p for p in problems)


def test_later_manifests_and_profiles_override_earlier_ones() -> None:
    profile = """<service_bundle type="profile" name="p">
      <service name="a" type="service" version="1">
        <instance name="default" enabled="false"/>
      </service>
    </service_bundle>"""
    graph = graph_from_xml(
        [
            ("a.xml", _xml(Svc("a"), Svc("b", [("require_all", ["svc:/a"])]))),
            ("b2.xml", _xml(Svc("b"))),  # re-import without dependencies
            ("profile.xml", profile),
        ]
    )
    assert not graph.instances[_d("a")].enabled
    # b's dependency group d0 from a.xml survives a re-import that does not name it
    assert [d.name for d in graph.dependencies_of("svc:/b")] == ["d0"]
    with pytest.raises(ManifestError, match="no instance svc:/zz:default"):
        graph_from_xml([("p.xml", profile.replace('name="a"', 'name="zz"'))])


def test_errors_are_typed() -> None:
    graph = _graph(Svc("multi", instances=["one", "two"]))
    with pytest.raises(SmfModelError, match="2 instances"):
        graph.dependencies_of("svc:/multi")
    with pytest.raises(SmfModelError, match="is an instance"):
        graph.without_service("svc:/multi:one")
    with pytest.raises(UnknownFmriError):
        graph.without_service("svc:/nope")
    assert isinstance(UnknownFmriError("x"), KeyError)


# --- the shell scripts: fakes and sandbox ------------------------------------

SHELLS = [s for s in ("dash", "ksh93") if shutil.which(s)]

FAKE = """#!{python}
import json, os, signal, sys
name = os.path.basename(sys.argv[0])
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps({{"cmd": name, "args": sys.argv[1:]}}) + "\\n")
if name == "zonename":
    print(os.environ.get("FAKE_ZONENAME", "f00dfeed-0000-4000-8000-000000000001"))
elif name in ("halt", "uadmin"):
    if os.environ.get("FAKE_HALT", "kill") == "kill":
        # the zone dies: so does the method that called halt
        os.kill(os.getppid(), signal.SIGKILL)
    sys.exit(1)
elif name == "svcprop":
    sys.exit(int(os.environ.get("FAKE_SVCPROP_RC", "0")))
elif name == "svcs":  # -H -o state,fmri [FMRI...]: FAKE_SVCS is "state fmri" lines
    lines = [l.split() for l in os.environ.get("FAKE_SVCS", "").splitlines() if l.strip()]
    wanted = [a for a in sys.argv[1:] if a.startswith("svc:/")]
    for state, fmri in lines:
        if not wanted or fmri in wanted:
            print(state, fmri)
elif name == "kstat":  # -p -m zones -n ZONENAME -s boot_time
    if "FAKE_BOOT_TIME" in os.environ:
        print("zones:7:%s:boot_time\t%s" % (sys.argv[sys.argv.index("-n") + 1], os.environ["FAKE_BOOT_TIME"]))
"""

# Commands that would act on the host if the real one ran: all must be fakes.
FAKED = (
    "mdata-put",
    "svccfg",
    "svcadm",
    "svcprop",
    "zonename",
    "halt",
    "uadmin",
    "shutdown",
    "poweroff",
    "reboot",
    "init",
    "sync",
    "passwd",
    "svcs",
    "kstat",
)


@dataclass
class Sandbox:
    root: Path
    fakebin: Path
    calls_file: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            "PATH": f"{self.fakebin}:/usr/bin:/bin",
            "IMGPREP_ROOT": str(self.root),
            "FAKE_CALLS": str(self.calls_file),
            "LC_ALL": "C",
            "HOME": str(self.root / "root"),
        }
        env.update(extra)
        for cmd in FAKED:
            found = shutil.which(cmd, path=env["PATH"])
            assert found == str(self.fakebin / cmd), f"{cmd} would run {found}"
        return env

    def calls(self) -> list[dict[str, Any]]:
        if not self.calls_file.exists():
            return []
        return [json.loads(line) for line in self.calls_file.read_text().splitlines()]

    def put(self, rel: str, content: str = "", mode: int = 0o644) -> Path:
        path = self.root / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        path.chmod(mode)
        return path


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    root = tmp_path / "zone"
    root.mkdir()
    fakebin = tmp_path / "fakebin"
    fakebin.mkdir()
    fake = FAKE.format(python=sys.executable)
    for cmd in FAKED:
        path = fakebin / cmd
        path.write_text(fake)
        path.chmod(0o755)
    return Sandbox(root, fakebin, tmp_path / "calls.jsonl")


def _run(
    shell: str, script: Path, sandbox: Sandbox, *args: str, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [shell, str(script), *args],
        env=sandbox.env(**env),
        cwd=sandbox.root,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --- the method script ------------------------------------------------------

MANIFEST_IN_ZONE = "var/svc/manifest/site/imgprep-operator-script.xml"
METHOD_IN_ZONE = "var/svc/method/imgprep-operator-script"
SMF_LOG_IN_ZONE = "var/svc/log/site-imgprep-operator-script:default.log"


def _install(sandbox: Sandbox, script: str | None, armed: str | None = "IMGPREP_SCRIPT_TIMEOUT=30\n") -> Path:
    """Lay the service out in the zone as the host does; returns the method to run."""
    sandbox.put(MANIFEST_IN_ZONE, MANIFEST_PATH.read_text())
    sandbox.put("var/svc/manifest/site/other-app.xml", "<service_bundle/>")
    method = sandbox.put(METHOD_IN_ZONE, METHOD_PATH.read_text(), 0o755)
    sandbox.put(SMF_LOG_IN_ZONE, "[ Executing start method ]\n")
    sandbox.put(SMF_LOG_IN_ZONE + ".0", "old\n")
    (sandbox.root / "var/run").mkdir(parents=True, exist_ok=True)
    if script is not None:
        sandbox.put("var/imgprep/operator-script", script, 0o644)
    if armed is not None:
        sandbox.put("var/imgprep/armed", armed)
    return method


def _mdata(sandbox: Sandbox) -> list[tuple[str, str]]:
    return [(c["args"][0], c["args"][1]) for c in sandbox.calls() if c["cmd"] == "mdata-put"]


def _cmds(sandbox: Sandbox) -> list[str]:
    return [" ".join([c["cmd"], *c["args"]]) for c in sandbox.calls() if c["cmd"] != "mdata-put"]


def _error(sandbox: Sandbox) -> dict[str, Any]:
    errors = [v for k, v in _mdata(sandbox) if k == "prepare-image:error"]
    assert len(errors) == 1
    value: dict[str, Any] = json.loads(errors[0])
    return value


def _assert_traces_removed(sandbox: Sandbox) -> None:
    for rel in (
        MANIFEST_IN_ZONE,
        METHOD_IN_ZONE,
        SMF_LOG_IN_ZONE,
        SMF_LOG_IN_ZONE + ".0",
        "var/imgprep",
        "var/run/imgprep-operator-script",
    ):
        assert not (sandbox.root / rel).exists(), rel
    # control: the neighbours stay
    assert (sandbox.root / "var/svc/manifest/site/other-app.xml").exists()
    assert (sandbox.root / "var/run").is_dir()


def _assert_teardown_then_halt(sandbox: Sandbox) -> None:
    # zonename, and the boot report's reads (kstat, svcs), before the teardown
    cmds = [c for c in _cmds(sandbox) if not c.startswith(("zonename", "kstat ", "svcs "))]
    match = re.search(r'^DEPENDENT_INSTANCES="([^"]*)"', METHOD_PATH.read_text(), re.MULTILINE)
    assert match
    holds = [f"svcadm disable -s -t {fmri}" for fmri in match.group(1).split()]
    assert cmds == [
        *holds,
        f"svccfg delete -f {OP}",
        "svccfg -s svc:/smf/manifest delpg var_svc_manifest_site_imgprep-operator-script_xml",
        "sync",
        "halt -l",
    ]


@pytest.mark.parametrize("shell", SHELLS)
def test_method_unarmed_does_nothing(shell: str, sandbox: Sandbox) -> None:
    method = _install(sandbox, "#!/bin/sh\ntouch /should-not-run\n", armed=None)
    result = _run(shell, method, sandbox, "start")
    assert result.returncode == 0, result.stderr
    assert "not armed" in result.stdout
    assert sandbox.calls() == []
    assert (sandbox.root / MANIFEST_IN_ZONE).exists()
    assert (sandbox.root / METHOD_IN_ZONE).exists()
    assert (sandbox.root / "var/imgprep/operator-script").exists()


@pytest.mark.parametrize("shell", SHELLS)
def test_method_success_reports_cleans_up_and_halts(shell: str, sandbox: Sandbox) -> None:
    script = textwrap.dedent(
        """\
        #!/bin/sh
        echo "cwd=$(pwd)" > "$IMGPREP_ROOT/ran"
        echo cleaning
        """
    )
    method = _install(sandbox, script)
    result = _run(shell, method, sandbox, "start")
    # the fake halt kills the method, as the zone's death would
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr
    assert (sandbox.root / "ran").read_text() == "cwd=/\n"
    assert [(k, v) for k, v in _mdata(sandbox) if k != "imgprep:report"] == [
        ("prepare-image:state", "running"),
        ("prepare-image:state", "success"),
    ]
    assert [k for k, _ in _mdata(sandbox)][-2:] == ["imgprep:report", "prepare-image:state"]
    _assert_teardown_then_halt(sandbox)
    _assert_traces_removed(sandbox)
    assert "halting the zone" in result.stdout


@pytest.mark.parametrize("shell", SHELLS)
def test_method_failure_sets_the_error_before_the_state(shell: str, sandbox: Sandbox) -> None:
    script = textwrap.dedent(
        """\
        #!/bin/sh
        i=1
        while [ $i -le 100 ]; do echo "line $i"; i=$((i + 1)); done
        printf 'quote " backslash \\\\ tab \\t bell \\a end\\n' >&2
        exit 3
        """
    )
    method = _install(sandbox, script)
    result = _run(shell, method, sandbox, "start")
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr
    keys = _mdata(sandbox)
    assert [k for k, _ in keys] == [
        "prepare-image:state",
        "prepare-image:error",
        "imgprep:report",
        "prepare-image:state",
    ]
    assert keys[0][1] == "running"
    assert keys[3][1] == "error"
    error = _error(sandbox)
    assert error["exit_status"] == 3
    assert error["timed_out"] is False
    assert error["timeout_seconds"] == 30
    assert "exit status 3" in error["message"]
    tail = error["output_tail"].split("\n")
    assert len(tail) == 40
    assert tail[-1] == 'quote " backslash \\ tab \t bell  end'  # control char dropped
    assert tail[-2] == "line 100"
    assert "line 1" not in tail
    _assert_teardown_then_halt(sandbox)
    _assert_traces_removed(sandbox)


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie: a killed orphan stays one where PID 1 does
    not reap, as in containers)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.mark.parametrize("shell", SHELLS)
def test_method_kills_a_hung_script_and_still_halts(shell: str, sandbox: Sandbox) -> None:
    script = textwrap.dedent(
        """\
        #!/bin/sh
        echo "started"
        sleep 600 &
        echo $! > "$IMGPREP_ROOT/sleep.pid"
        wait
        """
    )
    method = _install(sandbox, script, armed="IMGPREP_SCRIPT_TIMEOUT=1\n")
    start = time.monotonic()
    result = _run(shell, method, sandbox, "start")
    # TERM at the deadline (1 s), not KILL after the 5 s grace
    assert time.monotonic() - start < 4.5
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr
    error = _error(sandbox)
    assert error["timed_out"] is True
    assert error["timeout_seconds"] == 1
    assert "timed out" in error["message"]
    assert error["output_tail"] == "started"
    assert [k for k, _ in _mdata(sandbox)][-3:] == ["prepare-image:error", "imgprep:report", "prepare-image:state"]
    sleep_pid = int((sandbox.root / "sleep.pid").read_text())
    assert not _alive(sleep_pid)  # the whole process tree was killed
    _assert_teardown_then_halt(sandbox)
    _assert_traces_removed(sandbox)


@pytest.mark.parametrize("shell", SHELLS)
def test_method_kills_a_script_that_ignores_sigterm(shell: str, sandbox: Sandbox) -> None:
    script = "#!/bin/sh\ntrap '' TERM\necho stubborn\nwhile :; do sleep 1; done\n"
    method = _install(sandbox, script, armed="IMGPREP_SCRIPT_TIMEOUT=1\n")
    result = _run(shell, method, sandbox, "start")
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr
    assert _error(sandbox)["timed_out"] is True
    assert _cmds(sandbox)[-1] == "halt -l"


@pytest.mark.parametrize("shell", SHELLS)
def test_method_reports_a_missing_operator_script(shell: str, sandbox: Sandbox) -> None:
    method = _install(sandbox, None)
    result = _run(shell, method, sandbox, "start")
    assert result.returncode == -signal.SIGKILL
    error = _error(sandbox)
    assert error["exit_status"] is None
    assert "missing" in error["message"]
    _assert_teardown_then_halt(sandbox)
    _assert_traces_removed(sandbox)


@pytest.mark.parametrize("shell", SHELLS)
def test_method_when_halt_returns_tries_uadmin_and_reports(shell: str, sandbox: Sandbox) -> None:
    method = _install(sandbox, "#!/bin/sh\nexit 0\n")
    result = _run(shell, method, sandbox, "start", FAKE_HALT="fail")
    assert result.returncode == 95  # SMF_EXIT_ERR_FATAL
    assert _cmds(sandbox)[-2:] == ["halt -l", "uadmin 2 0"]
    keys = _mdata(sandbox)
    assert [k for k, _ in keys[-3:]] == ["prepare-image:error", "imgprep:report", "prepare-image:state"]
    assert keys[-1] == ("prepare-image:state", "error")
    assert "could not halt" in _error(sandbox)["message"]


@pytest.mark.parametrize(
    ("armed", "expected"),
    [
        ("IMGPREP_SCRIPT_TIMEOUT=7\n", 7),
        ('IMGPREP_SCRIPT_TIMEOUT="8"\nOTHER=1\n', 8),
        ("# host\nexport IMGPREP_SCRIPT_TIMEOUT=0009\n", 9),
        ("IMGPREP_SCRIPT_TIMEOUT=$(reboot)\n", 300),
        ("IMGPREP_SCRIPT_TIMEOUT=0\n", 300),
        ("", 300),
        ("IMGPREP_SCRIPT_TIMEOUT=99999999999999999999\n", 82800),
    ],
)
def test_method_reads_the_timeout_without_sourcing_the_armed_file(armed: str, expected: int, sandbox: Sandbox) -> None:
    method = _install(sandbox, "#!/bin/sh\nexit 1\n", armed=armed)
    result = _run("dash", method, sandbox, "start")
    assert result.returncode == -signal.SIGKILL
    assert _error(sandbox)["timeout_seconds"] == expected
    assert "reboot" not in [c["cmd"] for c in sandbox.calls()]


@pytest.mark.parametrize("shell", SHELLS)
def test_method_refuses_to_run_in_the_global_zone(shell: str, sandbox: Sandbox) -> None:
    method = _install(sandbox, "#!/bin/sh\nexit 0\n")
    result = _run(shell, method, sandbox, "start", FAKE_ZONENAME="global")
    assert result.returncode == 96
    assert [c["cmd"] for c in sandbox.calls()] == ["zonename"]
    assert (sandbox.root / "var/imgprep/armed").exists()


def test_method_uses_commands_from_path_and_paths_under_the_root() -> None:
    """Static checks that keep the tests above meaningful and safe."""
    text = METHOD_PATH.read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    for cmd in ("halt", "uadmin", "shutdown", "svccfg", "svcadm", "mdata-put", "sync"):
        assert not re.search(rf"/(usr/)?s?bin/{cmd}\b", code), cmd
    # every rm/mkdir/redirect works on $(p ...) paths
    for line in code.splitlines():
        if re.search(r"\b(rm|mkdir|chmod)\b", line):
            assert '"$(p ' in line, line


# --- smartos-prepare-image --------------------------------------------------

PREPARE_OPS = [
    "prepare.d",
    "ssh-host-keys",
    "root-ssh",
    "shell-history",
    "tmp-files",
    "package-cache",
    "at-jobs",
    "mail-spool",
    "network-state",
    "provisioning-state",
    "zoneinit",
    "logfiles",
]


def _prototype(sandbox: Sandbox, outside: Path) -> None:
    """A zone root with the prototype's leftovers (and things that must stay)."""
    put = sandbox.put
    put("var/ssh/ssh_host_rsa_key", "private")
    put("var/ssh/ssh_host_rsa_key.pub", "public")
    put("var/ssh/ssh_host_ed25519_key", "private")
    put("etc/ssh/ssh_host_dsa_key", "old sunssh key")
    put(
        "etc/ssh/sshd_config",
        "HostKey /var/ssh/ssh_host_rsa_key\nHostKey /var/ssh/ssh_host_ed25519_key\n",
    )
    put("root/.ssh/authorized_keys", "ssh-ed25519 AAAA operator")
    put("root/.ssh/known_hosts", "host key")
    put("root/.ssh/id_ed25519", "root's own key")
    put("root/.bash_history", "mysql -psecret")
    put("home/admin/.bash_history", "history")
    (sandbox.root / "home/admin/.lesshst").symlink_to("/dev/null")
    put("var/log/syslog", "prototype log\n")
    put("var/log/syslog.0", "rotated\n")
    put("var/log/app/app.log.1.gz", "compressed")
    put("var/adm/wtmpx", "logins")
    put("var/adm/utmpx", "logins")
    put("var/adm/lastlog", "lastlog")
    put("var/adm/messages", "kernel\n")
    put("var/adm/messages.1", "older\n")
    put("var/svc/log/pkgsrc-consul:default.log", "consul started\n")
    put("var/cron/log", "cron ran\n")
    (sandbox.root / "var/log/evil").symlink_to(outside)
    put("tmp/session", "x")
    put("tmp/.hidden", "x")
    put("var/tmp/build/deep/file", "x")
    put("opt/local/var/db/pkgin/cache/redis-7.0.tgz", "pkg")
    put("opt/local/var/db/pkgin/pkgin.db", "package db")
    put("var/spool/cron/crontabs/root", "0 * * * * logadm")
    put("var/spool/cron/atjobs/1700000000.a", "reboot")
    put("var/mail/root", "mail")
    put("var/spool/postfix/deferred/A/A1B2C3", "queued")
    put("etc/dhcp/net0.dhc", "lease")
    put("etc/hostname.net0", "10.0.0.5")
    put("etc/defaultrouter", "10.0.0.1")
    put("var/svc/provision_success", "")
    put("var/svc/mdata-user-script", "secret")
    put("var/db/consul/node-id", "the prototype's node id")
    put(
        "etc/imgprep/prepare.d/10-consul",
        '#!/bin/sh\nrm -f "$IMGPREP_ROOT/var/db/consul/node-id"\necho 10 >> "$IMGPREP_ROOT/hooks"\n',
        0o755,
    )
    put(
        "etc/imgprep/prepare.d/20-second",
        '#!/bin/sh\necho "20 $(pwd)" >> "$IMGPREP_ROOT/hooks"\n',
        0o755,
    )
    put("etc/imgprep/prepare.d/README", "not a hook", 0o644)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside-the-zone"
    path.write_text("must survive")
    return path


@pytest.mark.parametrize("shell", SHELLS)
def test_prepare_image_cleans_the_zone(shell: str, sandbox: Sandbox, outside: Path) -> None:
    _prototype(sandbox, outside)
    result = _run(shell, PREPARE_PATH, sandbox)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    # one line per operation, in order; prepare.d also names each hook it runs or skips
    hook_lines = [line for line in lines if line.startswith("prepare.d: ")]
    assert hook_lines == [
        "prepare.d: running hook 10-consul",
        "prepare.d: running hook 20-second",
        "prepare.d: ignoring README (not an executable regular file)",
        "prepare.d: ran 2 hook(s) from /etc/imgprep/prepare.d",
    ]
    ops = [line.split(":", 1)[0] for line in lines[len(hook_lines) - 1 :]]
    assert ops == [*PREPARE_OPS, "smartos-prepare-image"]
    root = sandbox.root

    gone = [
        "var/ssh/ssh_host_rsa_key",
        "var/ssh/ssh_host_rsa_key.pub",
        "var/ssh/ssh_host_ed25519_key",
        "etc/ssh/ssh_host_dsa_key",
        "root/.ssh/authorized_keys",
        "root/.ssh/known_hosts",
        "root/.bash_history",
        "home/admin/.bash_history",
        "var/log/syslog.0",
        "var/log/app/app.log.1.gz",
        "var/adm/messages.1",
        "tmp/session",
        "tmp/.hidden",
        "var/tmp/build",
        "opt/local/var/db/pkgin/cache/redis-7.0.tgz",
        "var/spool/cron/atjobs/1700000000.a",
        "var/mail/root",
        "var/spool/postfix/deferred/A/A1B2C3",
        "etc/dhcp/net0.dhc",
        "etc/hostname.net0",
        "etc/defaultrouter",
        "var/svc/provision_success",
        "var/svc/mdata-user-script",
        "var/db/consul/node-id",  # by the hook
    ]
    assert [rel for rel in gone if (root / rel).exists() or (root / rel).is_symlink()] == []
    truncated = [
        "var/log/syslog",
        "var/adm/wtmpx",
        "var/adm/utmpx",
        "var/adm/lastlog",
        "var/adm/messages",
        "var/svc/log/pkgsrc-consul:default.log",
        "var/cron/log",
    ]
    assert {rel: (root / rel).stat().st_size for rel in truncated} == dict.fromkeys(truncated, 0)
    kept = [
        "root/.ssh/id_ed25519",
        "etc/ssh/sshd_config",
        "opt/local/var/db/pkgin/pkgin.db",
        "var/spool/cron/crontabs/root",
        "etc/imgprep/prepare.d/10-consul",
        "tmp",
        "var/tmp",
        "var/spool/postfix/deferred/A",
        "var/ssh",
    ]
    assert [rel for rel in kept if not (root / rel).exists()] == []
    assert (root / "home/admin/.lesshst").is_symlink()
    assert outside.read_text() == "must survive"  # the symlink in /var/log was not followed
    assert (root / "hooks").read_text() == f"10\n20 {root}\n"
    assert any("svc:/network/ssh creates /var/ssh/ssh_host_rsa_key" in line for line in lines)
    assert [" ".join([c["cmd"], *c["args"]]) for c in sandbox.calls() if c["cmd"] != "zonename"] == [
        "svcprop -q -p application/done svc:/system/zoneinit",
        "svccfg -s svc:/system/zoneinit setprop application/done = false",
        "svcadm refresh svc:/system/zoneinit",
    ]
    assert "halt" not in [c["cmd"] for c in sandbox.calls()]

    again = _run(shell, PREPARE_PATH, sandbox)
    assert again.returncode == 0, again.stderr
    assert "ssh-host-keys: removed 0 file(s)" in again.stdout
    assert "logfiles: truncated 0 file(s), removed 0 rotated" in again.stdout


@pytest.mark.parametrize("shell", SHELLS)
def test_prepare_image_a_failing_hook_fails_the_script(shell: str, sandbox: Sandbox, outside: Path) -> None:
    _prototype(sandbox, outside)
    sandbox.put("etc/imgprep/prepare.d/15-broken", "#!/bin/sh\necho oops\nexit 4\n", 0o755)
    result = _run(shell, PREPARE_PATH, sandbox)
    assert result.returncode != 0
    assert "prepare.d hook 15-broken failed with exit status 4" in result.stderr
    assert (sandbox.root / "hooks").read_text() == "10\n"  # 20-second never ran
    assert (sandbox.root / "var/ssh/ssh_host_rsa_key").exists()  # nothing else ran


@pytest.mark.parametrize("shell", SHELLS)
def test_prepare_image_warns_when_nothing_would_recreate_host_keys(shell: str, sandbox: Sandbox) -> None:
    sandbox.put("etc/ssh/sshd_config", "PermitRootLogin without-password\n")
    sandbox.put("var/ssh/ssh_host_rsa_key", "private")
    result = _run(shell, PREPARE_PATH, sandbox, FAKE_SVCPROP_RC="1")
    assert result.returncode == 0, result.stderr
    assert "ssh-host-keys: removed 1 file(s); WARNING: no HostKey" in result.stdout
    assert "zoneinit: not installed, nothing to reset" in result.stdout


@pytest.mark.parametrize("shell", SHELLS)
def test_prepare_image_refuses_the_global_zone(shell: str, sandbox: Sandbox, outside: Path) -> None:
    _prototype(sandbox, outside)
    result = _run(shell, PREPARE_PATH, sandbox, FAKE_ZONENAME="global")
    assert result.returncode != 0
    assert "global zone" in result.stderr
    assert (sandbox.root / "var/ssh/ssh_host_rsa_key").exists()


def _guard_only(tmp_path: Path) -> Path:
    """The script with its operations replaced by a marker: tests the guards without
    any chance of running the cleanup on this machine."""
    text = PREPARE_PATH.read_text()
    head, sep, _ = text.partition("\nop_hooks\n")
    assert sep
    path = tmp_path / "guard-only"
    path.write_text(head + "\nsay reached-operations\n")
    return path


@pytest.mark.parametrize("shell", SHELLS)
def test_prepare_image_refuses_to_run_outside_illumos_without_a_root(
    shell: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    guard = _guard_only(tmp_path)
    env = sandbox.env()
    del env["IMGPREP_ROOT"]
    refused = subprocess.run([shell, str(guard)], env=env, capture_output=True, text=True, timeout=30, check=False)
    assert refused.returncode != 0
    assert "refusing to run outside illumos" in refused.stderr
    assert "reached-operations" not in refused.stdout
    for bad_root in ("relative/dir", "/"):
        bad = subprocess.run(
            [shell, str(guard)],
            env={**env, "IMGPREP_ROOT": bad_root},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert bad.returncode != 0, bad_root
        assert "reached-operations" not in bad.stdout
    allowed = _run(shell, guard, sandbox)  # control
    assert allowed.returncode == 0, allowed.stderr
    assert "reached-operations" in allowed.stdout


@pytest.mark.parametrize("shell", SHELLS)
def test_prepare_image_helpers_refuse_paths_outside_the_root(
    shell: str, sandbox: Sandbox, outside: Path, tmp_path: Path
) -> None:
    text = PREPARE_PATH.read_text()
    helpers = text[text.index("# --- helpers") : text.index("# --- operations")]
    prelude = text[: text.index("# --- helpers")]
    probe = tmp_path / "probe"
    inside = sandbox.put("var/tmp/inside", "x")
    probe.write_text(
        prelude
        + helpers
        + f'n=0\nremove "{inside}"\nsay "inside removed: $n"\n'
        + f'remove "{outside}"\nsay "outside removed: $n"\n'
    )
    result = _run(shell, probe, sandbox)
    assert result.returncode != 0
    assert "inside removed: 1" in result.stdout
    assert "outside removed" not in result.stdout
    assert f"refusing to touch {outside}" in result.stderr
    assert not inside.exists()
    assert outside.read_text() == "must survive"
    dotdot = tmp_path / "probe2"
    dotdot.write_text(prelude + helpers + f'n=0\nremove "{sandbox.root}/../outside-the-zone"\n')
    refused = _run(shell, dotdot, sandbox)
    assert refused.returncode != 0
    assert "refusing path with '..'" in refused.stderr
    assert outside.exists()


def test_prepare_image_removes_only_through_guarded_helpers() -> None:
    """Every rm and truncation is in a helper that checks the path is under the root."""
    lines = PREPARE_PATH.read_text().splitlines()
    function = None
    offenders = []
    for line in lines:
        match = re.match(r"^([a-z_]+)\(\) \{$", line)
        if match:
            function = match.group(1)
        elif line == "}":
            function = None
        code = line.split("#", 1)[0]
        if re.search(r"\brm\b|: *>", code) and function not in (
            "remove",
            "remove_files",
            "truncate_logs",
            "remove_tree_files",
        ):
            offenders.append(line)
    assert offenders == []
    assert lines[0] == "#!/bin/sh"


def test_scripts_are_executable() -> None:
    for path in (METHOD_PATH, PREPARE_PATH):
        assert os.access(path, os.X_OK), path


@pytest.mark.parametrize("shell", SHELLS)
def test_method_boot_report_lists_what_svcs_showed_online(shell: str, sandbox: Sandbox) -> None:
    method = _install(sandbox, "#!/bin/sh\nexit 0\n")
    svcs = "\n".join(
        [
            "online svc:/system/filesystem/minimal:default",
            "offline* svc:/site/imgprep/operator-script:default",
            "online svc:/system/filesystem/local:default",  # a dependent: should have waited
            "offline svc:/milestone/multi-user:default",
            "online svc:/network/loopback:default",
        ]
    )
    boot = int(time.time()) - 100
    _run(shell, method, sandbox, "start", FAKE_SVCS=svcs, FAKE_BOOT_TIME=str(boot))
    reports = [v for k, v in _mdata(sandbox) if k == "imgprep:report"]
    assert len(reports) == 1
    report = parse_report(reports[0])
    assert report["clock"] == "zone"
    assert report["zone_boot_time"] == str(boot)
    assert report["services"] == [
        "svc:/system/filesystem/minimal:default",
        "svc:/system/filesystem/local:default",
        "svc:/network/loopback:default",
    ]
    assert report["late_services"] == ["svc:/system/filesystem/local:default"]
    assert report["targets"]["svc:/milestone/multi-user:default"] == "offline"
    assert report["targets"]["svc:/system/filesystem/minimal:default"] == "online"
    # seconds since the zone booted, in microseconds, in order
    starts = [report[k] for k in ("unit_start_us", "script_start_us", "script_end_us", "finish_us")]
    assert all(isinstance(v, int) and v >= 100_000_000 and v % 1_000_000 == 0 for v in starts)
    assert starts == sorted(starts)
    assert report["script_exit"] == 0


@pytest.mark.parametrize("shell", SHELLS)
def test_method_boot_report_without_kstat_has_no_times(shell: str, sandbox: Sandbox) -> None:
    method = _install(sandbox, "#!/bin/sh\nexit 0\n")
    _run(shell, method, sandbox, "start", FAKE_SVCS="online svc:/network/loopback:default")
    (raw,) = [v for k, v in _mdata(sandbox) if k == "imgprep:report"]
    report = parse_report(raw)
    assert report["services"] == ["svc:/network/loopback:default"]  # the control: svcs was read
    assert report["script_start_us"] is None
    assert report["timeline_ms"]["script_start"] is None
