"""A model of SMF dependency resolution: which services svc.startd brings online, in what order.

Used to check, without an illumos machine, that imgprep's early-boot service
(``smf/imgprep-operator-script.xml``) comes online before every application of a
SmartOS zone, and by the compute-node simulator to boot a simulated zone.

The semantics follow svc.startd's graph engine (illumos ``usr/src/cmd/svc/startd/graph.c``,
``require_all_satisfied()`` and friends). A dependency evaluates to *satisfied*,
*unsatisfied* (may still be satisfied later) or *unsatisfiable* (not without an
administrator):

``require_all``
    satisfied when every member is online; unsatisfiable as soon as one member is
    (a disabled, missing or dependency-blocked instance).
``require_any``
    satisfied when one member is online; unsatisfiable when all members are.
``optional_all``
    only members that are present, enabled and not in maintenance count; a counted
    member that is offline but can never come online counts as satisfied. So a
    missing or disabled member is ignored, one still starting is waited for.
``exclude_all``
    unsatisfiable while a member is online, unsatisfied while a member is offline
    (enabled, not yet online), satisfied when every member is missing or disabled.

A dependency on a service FMRI (``svc:/milestone/network``) is a ``require_any`` over
that service's instances; on an instance FMRI (``svc:/milestone/network:default``)
it is on that instance only; a service without instances is unsatisfiable.
``file://`` members (``type="path"`` dependencies) are satisfied when the file is in
the ``files`` given to :meth:`ServiceGraph.boot`.

``<dependent>`` elements are resolved as ``svccfg import`` does: the named entity
gets a dependency (the dependent's name and grouping) on the declaring service or
instance. Dependency cycles (not through ``exclude_all``, as startd's cycle check)
put their instances in maintenance, as startd does.

The boot is simulated in waves: a wave is every instance whose dependencies are
satisfied by the instances online after the previous waves (in C order within a
wave). Only the ordering *guarantees* are meaningful (startd runs a wave in
parallel): use :meth:`ServiceGraph.online_before`, not positions in
:meth:`ServiceGraph.startup_order`, to claim that A starts before B.

Pure: no I/O except :func:`load_manifests` reading the files it is given.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType

log = logging.getLogger(__name__)

__all__ = [
    "BootResult",
    "Dependency",
    "Grouping",
    "Instance",
    "ManifestError",
    "ServiceGraph",
    "SmfModelError",
    "UnknownFmriError",
    "graph_from_xml",
    "load_manifests",
    "normalize_fmri",
]


class SmfModelError(Exception):
    """Base class of this module's errors."""


class ManifestError(SmfModelError):
    """One or more manifests are invalid. ``problems`` lists every problem found."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class UnknownFmriError(SmfModelError, KeyError):
    """An FMRI names no service or instance of the graph."""

    def __init__(self, fmri: str) -> None:
        self.fmri = fmri
        super().__init__(f"no such service or instance: {fmri}")

    def __str__(self) -> str:
        return str(self.args[0])


class Grouping(enum.StrEnum):
    REQUIRE_ALL = "require_all"
    REQUIRE_ANY = "require_any"
    OPTIONAL_ALL = "optional_all"
    EXCLUDE_ALL = "exclude_all"


@dataclasses.dataclass(frozen=True)
class Dependency:
    """A dependency property group of an instance, as svc.startd sees it.

    ``declared_by`` is the FMRI of the service or instance whose manifest declared it:
    the owner itself, or the entity whose ``<dependent>`` created it.
    """

    name: str
    grouping: Grouping
    targets: tuple[str, ...]
    restart_on: str
    declared_by: str


@dataclasses.dataclass(frozen=True)
class Instance:
    fmri: str
    enabled: bool
    dependencies: tuple[Dependency, ...]

    @property
    def service(self) -> str:
        return service_of(self.fmri)


@dataclasses.dataclass(frozen=True)
class BootResult:
    """Outcome of a simulated boot.

    ``waves[i]`` came online once everything in ``waves[:i]`` was online.
    ``waiting``: enabled, not online, could still come online (something it needs is
    held in ``pending`` or waits itself). ``unsatisfiable``: enabled but can never
    come online. ``in_cycle``: in a dependency cycle (maintenance).
    """

    waves: tuple[tuple[str, ...], ...]
    pending: frozenset[str]
    waiting: frozenset[str]
    unsatisfiable: frozenset[str]
    disabled: frozenset[str]
    in_cycle: frozenset[str]

    @property
    def order(self) -> tuple[str, ...]:
        return tuple(fmri for wave in self.waves for fmri in wave)

    @property
    def online(self) -> frozenset[str]:
        return frozenset(self.order)


# --- FMRIs ------------------------------------------------------------------

_SVC_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.,/+-]*")
_INST_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.,+-]*")


def normalize_fmri(fmri: str) -> str:
    """Canonical form of a service, instance or file FMRI.

    ``milestone/network``, ``svc:milestone/network``, ``svc:/milestone/network``,
    ``svc://localhost/milestone/network`` all give ``svc:/milestone/network``; an
    instance keeps its ``:name`` (``svc:/milestone/network:default`` is the instance,
    a different entity from the service). ``file://localhost/p`` and ``file:///p`` give
    ``file:///p``. Raises ValueError for anything else.
    """
    text = fmri.strip()
    if text.startswith("file:"):
        rest = text[len("file:") :]
        if rest.startswith("//localhost/"):
            rest = rest[len("//localhost") :]
        elif rest.startswith("///"):
            rest = rest[2:]
        elif rest.startswith("//"):
            raise ValueError(f"invalid FMRI {fmri!r}: only file://localhost/ is local")
        if not rest.startswith("/"):
            raise ValueError(f"invalid FMRI {fmri!r}: file path must be absolute")
        return "file://" + rest
    if text.startswith("svc:"):
        text = text[len("svc:") :]
        if text.startswith("//localhost/"):
            text = text[len("//localhost/") :]
        elif text.startswith("//"):
            raise ValueError(f"invalid FMRI {fmri!r}: only the localhost scope exists")
    text = text.lstrip("/")
    service, sep, instance = text.partition(":")
    if not _SVC_NAME.fullmatch(service) or service.endswith("/") or "//" in service:
        raise ValueError(f"invalid FMRI {fmri!r}: bad service name {service!r}")
    if sep and not _INST_NAME.fullmatch(instance):
        raise ValueError(f"invalid FMRI {fmri!r}: bad instance name {instance!r}")
    return f"svc:/{service}" + (f":{instance}" if sep else "")


def is_instance_fmri(fmri: str) -> bool:
    return fmri.startswith("svc:/") and ":" in fmri[len("svc:/") :]


def service_of(fmri: str) -> str:
    """``svc:/a/b:inst`` -> ``svc:/a/b`` (a service FMRI is returned unchanged)."""
    head, _, _ = fmri[len("svc:/") :].partition(":")
    return "svc:/" + head


# --- parsing ----------------------------------------------------------------


@dataclasses.dataclass
class _InstanceDef:
    enabled: bool
    dependencies: dict[str, Dependency]


@dataclasses.dataclass
class _ServiceDef:
    dependencies: dict[str, Dependency]
    instances: dict[str, _InstanceDef]
    sources: list[str]


@dataclasses.dataclass
class _Builder:
    """Accumulates manifests the way successive ``svccfg import``s fill the repository."""

    services: dict[str, _ServiceDef] = dataclasses.field(default_factory=dict)
    # dependency property groups created by <dependent> elements, by target entity
    injected: dict[str, dict[str, Dependency]] = dataclasses.field(default_factory=dict)
    profile_enables: list[tuple[str, bool, str]] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Reader:
    """Reads one XML document into the builder, recording problems with their location."""

    source: str
    builder: _Builder

    def problem(self, where: str, message: str) -> None:
        self.builder.problems.append(f"{self.source}: {where}: {message}")

    def parse(self, data: bytes | str) -> None:
        # The manifests come from the repository or from a guest image under test;
        # ElementTree never fetches the DTD or external entities, and expat (>= 2.4.1,
        # bundled with Python 3.11) refuses entity-expansion bombs.
        try:
            root = ET.fromstring(data)
        except ET.ParseError as exc:
            self.problem("/", f"not well-formed XML: {exc}")
            return
        self.bundle(root, "/service_bundle")

    def attr(self, elem: ET.Element, name: str, where: str) -> str | None:
        value = elem.get(name)
        if value is None:
            self.problem(where, f"missing attribute {name!r}")
        return value

    def enabled(self, elem: ET.Element, where: str) -> bool | None:
        value = elem.get("enabled")
        if value in ("true", "false"):
            return value == "true"
        self.problem(where, f"enabled must be 'true' or 'false', got {value!r}")
        return None

    def fmri(self, elem: ET.Element, where: str) -> str | None:
        value = elem.get("value")
        if value is None:
            self.problem(where, "service_fmri without value")
            return None
        try:
            return normalize_fmri(value)
        except ValueError as exc:
            self.problem(where, str(exc))
            return None

    def grouping(self, elem: ET.Element, where: str) -> Grouping | None:
        value = elem.get("grouping")
        try:
            return Grouping(value or "")
        except ValueError:
            choices = ", ".join(g.value for g in Grouping)
            self.problem(where, f"grouping must be one of {choices}, got {value!r}")
            return None

    def dependency(self, elem: ET.Element, owner: str, where: str) -> Dependency | None:
        name = self.attr(elem, "name", where)
        grouping = self.grouping(elem, where)
        restart_on = self.attr(elem, "restart_on", where)
        targets: list[str] = []
        for i, fmri_elem in enumerate(elem.findall("service_fmri")):
            target = self.fmri(fmri_elem, f"{where}/service_fmri[{i}]")
            if target is not None:
                targets.append(target)
        if name is None or grouping is None or restart_on is None:
            return None
        return Dependency(name, grouping, tuple(targets), restart_on, owner)

    def dependent(self, elem: ET.Element, owner: str, where: str) -> None:
        """A <dependent> of ``owner``: a dependency of the named entity on ``owner``."""
        name = self.attr(elem, "name", where)
        grouping = self.grouping(elem, where)
        restart_on = self.attr(elem, "restart_on", where)
        fmri_elems = elem.findall("service_fmri")
        if len(fmri_elems) != 1:
            self.problem(where, "a dependent names exactly one service_fmri")
            return
        target = self.fmri(fmri_elems[0], f"{where}/service_fmri")
        if name is None or grouping is None or restart_on is None or target is None:
            return
        if target.startswith("file://"):
            self.problem(where, f"a dependent must name a service, got {target}")
            return
        injected = self.builder.injected.setdefault(target, {})
        if elem.get("delete") == "true":
            injected.pop(name, None)
        else:
            injected[name] = Dependency(name, grouping, (owner,), restart_on, owner)

    def dependencies_into(self, parent: ET.Element, owner: str, deps: dict[str, Dependency], where: str) -> None:
        for i, elem in enumerate(parent.findall("dependency")):
            dep = self.dependency(elem, owner, f"{where}/dependency[{i}]")
            if dep is None:
                continue
            if elem.get("delete") == "true":
                deps.pop(dep.name, None)
            else:
                deps[dep.name] = dep
        for i, elem in enumerate(parent.findall("dependent")):
            self.dependent(elem, owner, f"{where}/dependent[{i}]")

    def service(self, elem: ET.Element, profile: bool, where: str) -> None:
        raw_name = self.attr(elem, "name", where)
        if raw_name is None:
            return
        try:
            fmri = normalize_fmri(raw_name)
        except ValueError as exc:
            self.problem(where, str(exc))
            return
        if is_instance_fmri(fmri):
            self.problem(where, f"service name {raw_name!r} names an instance")
            return
        where = f"{where}[@name={raw_name!r}]"
        if profile:
            # A profile only switches existing instances on or off.
            for i, inst in enumerate(elem.findall("instance")):
                iwhere = f"{where}/instance[{i}]"
                iname = self.attr(inst, "name", iwhere)
                enabled = self.enabled(inst, iwhere)
                if iname is not None and enabled is not None:
                    self.builder.profile_enables.append((f"{fmri}:{iname}", enabled, self.source))
            return
        svc = self.builder.services.setdefault(fmri, _ServiceDef({}, {}, []))
        svc.sources.append(self.source)
        self.dependencies_into(elem, fmri, svc.dependencies, where)
        for cdi in elem.findall("create_default_instance"):
            enabled = self.enabled(cdi, f"{where}/create_default_instance")
            if enabled is not None:
                svc.instances.setdefault("default", _InstanceDef(enabled, {})).enabled = enabled
        for i, inst in enumerate(elem.findall("instance")):
            iwhere = f"{where}/instance[{i}]"
            iname = self.attr(inst, "name", iwhere)
            enabled = self.enabled(inst, iwhere)
            if iname is None or enabled is None:
                continue
            if not _INST_NAME.fullmatch(iname):
                self.problem(iwhere, f"bad instance name {iname!r}")
                continue
            idef = svc.instances.setdefault(iname, _InstanceDef(enabled, {}))
            idef.enabled = enabled
            self.dependencies_into(inst, f"{fmri}:{iname}", idef.dependencies, iwhere)

    def bundle(self, elem: ET.Element, where: str) -> None:
        if elem.tag != "service_bundle":
            self.problem(where, f"expected <service_bundle>, got <{elem.tag}>")
            return
        kind = self.attr(elem, "type", where)
        if kind is None:
            return
        for i, child in enumerate(elem.findall("service_bundle")):
            self.bundle(child, f"{where}/service_bundle[{i}]")
        for i, child in enumerate(elem.findall("service")):
            self.service(child, kind == "profile", f"{where}/service[{i}]")


def graph_from_xml(documents: Iterable[tuple[str, bytes | str]]) -> ServiceGraph:
    """Build a graph from ``(source name, XML text)`` pairs, applied in order.

    Manifests merge as successive imports do: later property groups and instances
    with the same name replace earlier ones. Profiles (``type="profile"``) only set
    the enabled flag of instances. Raises :class:`ManifestError` listing every problem.
    """
    builder = _Builder()
    for source, data in documents:
        _Reader(source, builder).parse(data)
    for fmri, enabled, source in builder.profile_enables:
        svc = builder.services.get(service_of(fmri))
        inst = svc.instances.get(fmri.rpartition(":")[2]) if svc else None
        if inst is None:
            builder.problems.append(f"{source}: profile: no instance {fmri} to enable or disable")
        else:
            inst.enabled = enabled
    if builder.problems:
        raise ManifestError(builder.problems)
    return _assemble(builder)


def load_manifests(paths: Iterable[str | os.PathLike[str]]) -> ServiceGraph:
    """Read manifest files (in the order given) into a :class:`ServiceGraph`."""
    documents: list[tuple[str, bytes | str]] = []
    for path in paths:
        documents.append((str(path), Path(path).read_bytes()))
    return graph_from_xml(documents)


def _assemble(builder: _Builder) -> ServiceGraph:
    services: dict[str, tuple[str, ...]] = {}
    instances: dict[str, Instance] = {}
    for svc_fmri, svc in builder.services.items():
        names = []
        for iname, idef in svc.instances.items():
            inst_fmri = f"{svc_fmri}:{iname}"
            # The composed view svc.startd reads: service-level property groups,
            # overridden by instance-level ones of the same name.
            deps: dict[str, Dependency] = {}
            deps.update(svc.dependencies)
            deps.update(builder.injected.get(svc_fmri, {}))
            deps.update(idef.dependencies)
            deps.update(builder.injected.get(inst_fmri, {}))
            instances[inst_fmri] = Instance(inst_fmri, idef.enabled, tuple(deps.values()))
            names.append(inst_fmri)
        services[svc_fmri] = tuple(names)
    return ServiceGraph(MappingProxyType(services), MappingProxyType(instances))


# --- evaluation -------------------------------------------------------------

_SAT = 1
_UNSAT = 0
_NEVER = -1

_ONLINE = "online"
_OFFLINE = "offline"
_DISABLED = "disabled"
_MAINT = "maintenance"


@dataclasses.dataclass
class _Evaluator:
    graph: ServiceGraph
    state: dict[str, str]
    files: frozenset[str]
    memo: dict[str, int] = dataclasses.field(default_factory=dict)

    def instance_satisfied(self, fmri: str, satbility: bool) -> int:
        """require_all over the instance's dependency groups (startd's instance_satisfied)."""
        if satbility and fmri in self.memo:
            return self.memo[fmri]
        result = _SAT
        for dep in self.graph.instances[fmri].dependencies:
            i = self.group_satisfied(dep, satbility)
            if i == _SAT:
                continue
            if not satbility:
                return _UNSAT
            if i == _NEVER:
                result = _NEVER
                break
            result = _UNSAT
        if satbility:
            self.memo[fmri] = result
        return result

    def group_satisfied(self, dep: Dependency, satbility: bool) -> int:
        if dep.grouping is Grouping.REQUIRE_ALL:
            return self._require_all(dep.targets, satbility)
        if dep.grouping is Grouping.REQUIRE_ANY:
            return self._require_any(dep.targets, satbility)
        if dep.grouping is Grouping.OPTIONAL_ALL:
            return self._optional_all(dep.targets, satbility)
        return self._exclude_all(dep.targets)

    def dependency_satisfied(self, target: str, satbility: bool) -> int:
        if target.startswith("file://"):
            return _SAT if target in self.files else _NEVER
        if not is_instance_fmri(target):
            members = self.graph.services.get(target, ())
            if not members:
                return _NEVER
            return self._require_any(members, satbility)
        state = self.state.get(target)
        if state is None or state in (_DISABLED, _MAINT):
            return _NEVER
        if state == _ONLINE:
            return _SAT
        if not satbility:
            return _UNSAT
        return _NEVER if self.instance_satisfied(target, True) == _NEVER else _UNSAT

    def _require_all(self, targets: Iterable[str], satbility: bool) -> int:
        any_unsatisfied = False
        for target in targets:
            i = self.dependency_satisfied(target, satbility)
            if i == _SAT:
                continue
            if not satbility:
                return _UNSAT
            if i == _NEVER:
                return _NEVER
            any_unsatisfied = True
        return _UNSAT if any_unsatisfied else _SAT

    def _require_any(self, targets: tuple[str, ...], satbility: bool) -> int:
        if not targets:
            return _SAT
        satisfiable = False
        for target in targets:
            i = self.dependency_satisfied(target, satbility)
            if i == _SAT:
                return _SAT
            if satbility and i == _UNSAT:
                satisfiable = True
        return _UNSAT if (not satbility or satisfiable) else _NEVER

    def _optional_member(self, fmri: str, satbility: bool) -> int | None:
        """An instance's contribution to optional_all, None if it does not count."""
        state = self.state.get(fmri)
        if state is None or state in (_DISABLED, _MAINT):
            return None
        if state == _OFFLINE:
            # offline but unable to ever come online counts as satisfied
            i = self.dependency_satisfied(fmri, True)
            return _SAT if i == _NEVER else i
        return self.dependency_satisfied(fmri, satbility)

    def _optional_all(self, targets: tuple[str, ...], satbility: bool) -> int:
        any_unsatisfied = False
        for target in targets:
            i: int | None
            if target.startswith("file://"):
                i = self.dependency_satisfied(target, satbility)
            elif is_instance_fmri(target):
                i = self._optional_member(target, satbility)
            else:
                results = [
                    r
                    for r in (self._optional_member(m, satbility) for m in self.graph.services.get(target, ()))
                    if r is not None
                ]
                if not results:
                    i = None
                elif _SAT in results:
                    i = _SAT
                elif _UNSAT in results:
                    i = _UNSAT
                else:
                    i = _NEVER
            if i is None or i == _SAT:
                continue
            if not satbility:
                return _UNSAT
            if i == _NEVER:
                return _NEVER
            any_unsatisfied = True
        return _UNSAT if any_unsatisfied else _SAT

    def _exclude_all(self, targets: tuple[str, ...]) -> int:
        for target in targets:
            if target.startswith("file://"):
                if target in self.files:
                    return _NEVER
                continue
            members = (target,) if is_instance_fmri(target) else self.graph.services.get(target, ())
            for member in members:
                state = self.state.get(member)
                if state == _ONLINE:
                    return _NEVER
                if state == _OFFLINE:
                    return _UNSAT
        return _SAT


# --- the graph --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ServiceGraph:
    """Services and instances with their composed dependencies. Immutable: the
    ``with_*``/``without_*`` methods return new graphs."""

    services: Mapping[str, tuple[str, ...]]
    """Service FMRI -> its instance FMRIs."""
    instances: Mapping[str, Instance]
    """Instance FMRI -> instance."""

    # -- lookup

    def resolve(self, fmri: str) -> tuple[str, ...]:
        """The instances an FMRI names: itself, or all instances of a service."""
        norm = normalize_fmri(fmri)
        if norm in self.instances:
            return (norm,)
        if norm in self.services:
            return self.services[norm]
        raise UnknownFmriError(fmri)

    def dependencies_of(self, fmri: str) -> tuple[Dependency, ...]:
        """Composed dependencies of an instance (service FMRI: its only instance)."""
        insts = self.resolve(fmri)
        if len(insts) != 1:
            raise SmfModelError(f"{fmri} has {len(insts)} instances; name one")
        return self.instances[insts[0]].dependencies

    def dependents_of(self, fmri: str) -> tuple[str, ...]:
        """Instances with a dependency naming ``fmri``, its service or its instances."""
        insts = set(self.resolve(fmri))
        names = insts | {service_of(i) for i in insts}
        norm = normalize_fmri(fmri)
        names.add(norm)
        return tuple(
            sorted(
                inst.fmri
                for inst in self.instances.values()
                if any(t in names for dep in inst.dependencies for t in dep.targets)
            )
        )

    # -- derived graphs

    def with_enabled(self, *fmris: str, enabled: bool = True) -> ServiceGraph:
        """A graph where the named instances (all instances of named services) are
        enabled (or disabled with ``enabled=False``)."""
        changed = dict(self.instances)
        for fmri in fmris:
            for inst in self.resolve(fmri):
                changed[inst] = dataclasses.replace(changed[inst], enabled=enabled)
        return ServiceGraph(self.services, MappingProxyType(changed))

    def with_disabled(self, *fmris: str) -> ServiceGraph:
        return self.with_enabled(*fmris, enabled=False)

    def without_service(self, fmri: str) -> ServiceGraph:
        """``svccfg delete`` of a service: its instances go, and so do the dependency
        groups its ``<dependent>`` elements created in other entities. Dependencies
        that other manifests declared on it stay (and now name a missing service)."""
        norm = normalize_fmri(fmri)
        if is_instance_fmri(norm):
            raise SmfModelError(f"{fmri} is an instance; delete its service")
        if norm not in self.services:
            raise UnknownFmriError(fmri)
        gone = set(self.services[norm]) | {norm}
        services = {s: i for s, i in self.services.items() if s != norm}
        instances = {
            f: dataclasses.replace(
                inst,
                dependencies=tuple(d for d in inst.dependencies if d.declared_by not in gone),
            )
            for f, inst in self.instances.items()
            if f not in gone
        }
        return ServiceGraph(MappingProxyType(services), MappingProxyType(instances))

    # -- analysis

    def cycles(self) -> list[tuple[str, ...]]:
        """Dependency cycles between instances (each sorted; the list sorted). Edges
        through ``exclude_all`` groups do not count, as in svc.startd."""
        edges = {fmri: sorted(self._edges(fmri)) for fmri in self.instances}
        return sorted(
            tuple(sorted(scc)) for scc in _strongly_connected(edges) if len(scc) > 1 or scc[0] in edges[scc[0]]
        )

    def _edges(self, fmri: str) -> Iterator[str]:
        for dep in self.instances[fmri].dependencies:
            if dep.grouping is Grouping.EXCLUDE_ALL:
                continue
            for target in dep.targets:
                if target in self.instances:
                    yield target
                else:
                    yield from self.services.get(target, ())

    def boot(self, *, pending: Iterable[str] = (), files: Iterable[str] = ()) -> BootResult:
        """Simulate svc.startd bringing the enabled instances online.

        ``pending``: instances (or services) whose start method is running and never
        returns: enabled, offline, never online. ``files``: paths (or ``file://`` FMRIs)
        that exist, for path dependencies.
        """
        held = frozenset(i for f in pending for i in self.resolve(f))
        present = frozenset(normalize_fmri(f if f.startswith("file:") else "file://" + f) for f in files)
        in_cycle = frozenset(i for cycle in self.cycles() for i in cycle)
        state: dict[str, str] = {}
        for fmri, inst in self.instances.items():
            if fmri in in_cycle:
                state[fmri] = _MAINT
            elif inst.enabled or fmri in held:
                state[fmri] = _OFFLINE
            else:
                state[fmri] = _DISABLED
        waves: list[tuple[str, ...]] = []
        while True:
            evaluator = _Evaluator(self, state, present)
            ready = sorted(
                fmri
                for fmri, st in state.items()
                if st == _OFFLINE and fmri not in held and evaluator.instance_satisfied(fmri, False) == _SAT
            )
            # No re-check needed within a wave: an instance is ready only if every
            # exclude_all member is missing, disabled or in maintenance, and those
            # do not come online in the same wave.
            if not ready:
                break
            for fmri in ready:
                state[fmri] = _ONLINE
            waves.append(tuple(ready))
        final = _Evaluator(self, state, present)
        left = [f for f, st in state.items() if st == _OFFLINE and f not in held]
        unsatisfiable = frozenset(f for f in left if final.instance_satisfied(f, True) == _NEVER)
        result = BootResult(
            waves=tuple(waves),
            pending=held,
            waiting=frozenset(left) - unsatisfiable,
            unsatisfiable=unsatisfiable,
            disabled=frozenset(f for f, st in state.items() if st == _DISABLED),
            in_cycle=in_cycle,
        )
        if in_cycle:
            log.debug("dependency cycles, instances in maintenance: %s", sorted(in_cycle))
        return result

    def startup_order(self, *, files: Iterable[str] = ()) -> list[str]:
        """Instances in the order they come online in a normal boot (see :meth:`boot`)."""
        return list(self.boot(files=files).order)

    def online_before(self, first: str, then: str, *, files: Iterable[str] = ()) -> bool:
        """Whether ``first`` is guaranteed to be online before ``then`` comes online.

        True when, in a normal boot, both come online, and ``then`` cannot come online
        while ``first`` is still starting (every instance of ``first`` held pending).
        A position in :meth:`startup_order` is no such guarantee: services in the same
        or unrelated waves start in parallel.
        """
        firsts = set(self.resolve(first))
        thens = set(self.resolve(then))
        normal = self.boot(files=files)
        if not (firsts & normal.online) or not (thens & normal.online):
            return False
        return not (thens & self.boot(pending=firsts, files=files).online)


def _strongly_connected(edges: Mapping[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit on long chains)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    result: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        while work:
            node, child_i = work.pop()
            if child_i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            children = edges.get(node, [])
            if child_i < len(children):
                work.append((node, child_i + 1))
                child = children[child_i]
                if child not in index:
                    work.append((child, 0))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            if low[node] == index[node]:
                scc = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    scc.append(member)
                    if member == node:
                        break
                result.append(scc)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return result
