"""The SmartOS guest side, statically: the early-boot SMF manifest against illumos's DTD,
the SMF dependency model (tests/smf_model.py) that proves its ordering, and static
checks of the method and cleanup scripts (they run for real in
tests/host/test_smf_scripts.py).

Nothing here touches the host or runs a program: files are read from the repository.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.smf_model import (
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
DTD_PATH = REPO / "tests" / "data" / "smf" / "dtd" / "service_bundle.dtd.1"
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


# --- static checks of the shell scripts ------------------------------------


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
