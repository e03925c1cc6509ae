"""Pure functions of the early-vs-legacy benchmark: parse what a run recorded, derive its numbers.

Nothing here touches the host, so the arithmetic is unit-tested on recorded samples
(tests/unit/test_benchmark_metrics.py). Two clocks appear:

* host time: the host's wall clock, ``time.time()``. imgprep's ``--json`` events carry
  it (``at``), libvirt stamps its per-domain qemu log with it, and the benchmark stamps
  every console line with the moment it saw the line;
* guest time: seconds since the guest kernel started (CLOCK_MONOTONIC). The kernel's
  printk stamps and the runner's boot report use it.

A console line that carries a printk stamp gives one (host, guest) pair; the smallest
``host - guest`` over a boot is the offset between the clocks (the benchmark sees a line
a little after the guest wrote it, never before), which places the unstamped systemd
status lines ("Started etcd.service") and the power-off on the guest clock.
"""

from __future__ import annotations

import datetime as dt
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tests.guestimage import APP_SERVICES

# Units whose start times the benchmark's operator-script wrapper reports (drawn on the timeline).
WATCHED_UNITS = (
    *APP_SERVICES,
    "ssh.service",
    "systemd-networkd-wait-online.service",
    "network-online.target",
    "multi-user.target",
)
MODES = ("early", "legacy")
MB = 1_000_000

ConsoleLines = Sequence[tuple[float, str]]

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_PRINTK = re.compile(r"^\[\s*(\d+\.\d+)\]\s")
# The benchmark's operator-script wrapper ends its output with this line (see early_vs_legacy.py).
_UNITS_LINE = re.compile(r"^imgprep-bench: query=(\d+\.\d+)-(\d+\.\d+) units: (.*)$")
DEMO_MESSAGE = "demo-identity: created node-id"
_QEMU_LOG = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})([+-]\d{4}): (starting up|shutting down)(?:, reason=(\w+))?"
)


# --- the console ------------------------------------------------------------------------


def clean(text: str) -> str:
    """A console line without colour escapes and carriage returns."""
    return _ANSI.sub("", text).replace("\r", "")


def printk_stamp(text: str) -> float | None:
    match = _PRINTK.match(text)
    return float(match.group(1)) if match else None


def between(lines: ConsoleLines, start: float | None, end: float | None = None) -> list[tuple[float, str]]:
    """The lines seen in the host-time window [start, end] (open-ended when None)."""
    return [(host, text) for host, text in lines if (start is None or host >= start) and (end is None or host <= end)]


def clock_offset(lines: ConsoleLines) -> float | None:
    """host time - guest time for one boot, from its printk-stamped lines (None without any)."""
    offsets = [host - stamp for host, text in lines if (stamp := printk_stamp(clean(text))) is not None]
    return min(offsets) if offsets else None


def first_seen(lines: ConsoleLines, needle: str, after: float | None = None) -> float | None:
    for host, text in lines:
        if (after is None or host >= after) and needle in text:
            return host
    return None


# --- libvirt's qemu log and imgprep's events ---------------------------------------------


def qemu_lifecycle(log_text: str) -> list[tuple[float, str, str]]:
    """(host time, "start" | "stop", reason) for every QEMU process libvirt ran for a domain."""
    out = []
    for line in log_text.splitlines():
        match = _QEMU_LOG.match(line)
        if match is None:
            continue
        when = dt.datetime.strptime(match.group(1) + match.group(2), "%Y-%m-%d %H:%M:%S.%f%z").timestamp()
        kind = "start" if match.group(3) == "starting up" else "stop"
        out.append((when, kind, match.group(4) or ""))
    return out


def first_after(lifecycle: Sequence[Sequence[Any]], kind: str, after: float | None) -> float | None:
    if after is None:
        return None
    for when, what, *_ in lifecycle:
        if what == kind and float(when) >= after:
            return float(when)
    return None


def step_times(events: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Host start/end and elapsed of every step of the create chain (not the rollback)."""
    steps: dict[str, dict[str, float]] = {}
    for event in events:
        if event.get("event") != "step" or event.get("chain") != "chain_results":
            continue
        step = steps.setdefault(str(event["step"]), {})
        if event["status"] == "started":
            step["start"] = float(event["at"])
        else:
            step["end"] = float(event["at"])
            step["elapsed"] = float(event.get("elapsed", 0.0))
    return steps


def convert_started(events: Iterable[Mapping[str, Any]]) -> float | None:
    """When the export's ``qemu-img convert`` reported its first progress: before it, the
    export step checks the powered-off disks (a read-only libguestfs look for imgprep's
    files, ``qemu-img measure`` for free space)."""
    for event in events:
        if event.get("event") == "progress" and event.get("step") == "export":
            return float(event["at"])
    return None


def convert_finished(events: Iterable[Mapping[str, Any]]) -> float | None:
    """When ``qemu-img convert`` reported 100 % (the export then fsyncs and hashes the file)."""
    for event in events:
        if event.get("event") == "progress" and event.get("step") == "export" and float(event["percent"]) >= 100:
            return float(event["at"])
    return None


def guest_state_at(events: Iterable[Mapping[str, Any]], state: str) -> float | None:
    for event in events:
        if event.get("event") == "guest" and event.get("state") == state:
            return float(event["at"])
    return None


# --- one run -----------------------------------------------------------------------------


def _sub(a: float | None, b: float | None) -> float | None:
    return round(a - b, 3) if a is not None and b is not None else None


def _div(a: float | None, b: float | None) -> float | None:
    return round(a / b, 1) if a is not None and b else None


def _us(report: Mapping[str, Any], key: str) -> float | None:
    value = report.get(key)
    return round(value / 1e6, 3) if isinstance(value, int) and value > 0 else None


def printk_seen(lines: ConsoleLines, needle: str) -> float | None:
    """The guest-clock stamp (s) of the last kernel-log line on the console containing ``needle``."""
    found = None
    for _when, text in lines:
        if needle in text:
            found = printk_stamp(text)
    return found


def _limit(report: Mapping[str, Any], script_run: float | None) -> float | None:
    """unit start + script run time + clean power-off (guest clock, s): the prepare boot's floor."""
    unit_start = _us(report, "unit_start_us")
    clean = _sub(_us(report, "clean_us"), _us(report, "sync_start_us"))
    if unit_start is None or script_run is None or clean is None:
        return None
    return round(unit_start + script_run + clean, 3)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def windows(raw: Mapping[str, Any]) -> dict[str, float | None]:
    """Host times that split a run into the prototype's first boot, the prepare boot and the restart."""
    steps = step_times(raw.get("events", []))
    lifecycle = raw.get("qemu_log", [])
    stop_start = steps.get("stop_vm", {}).get("start")
    prepare_on = first_after(lifecycle, "start", steps.get("boot_prepare", {}).get("start"))
    return {
        "first_boot_on": first_after(lifecycle, "start", raw.get("first_boot", {}).get("start")),
        "stop_start": stop_start,
        "prototype_off": first_after(lifecycle, "stop", stop_start),
        "prepare_on": prepare_on,
        "prepare_off": first_after(lifecycle, "stop", prepare_on),
        "restart_start": steps.get("restart_vm", {}).get("start"),
        "restart_end": steps.get("restart_vm", {}).get("end"),
    }


def timings(raw: Mapping[str, Any]) -> dict[str, float | None]:
    """Every duration of one run, in seconds (or MB/s, MB); None when the run did not get there."""
    events = raw.get("events", [])
    steps = step_times(events)
    w = windows(raw)
    process = raw.get("process", {})
    report = (raw.get("record") or {}).get("boot_report") or {}
    console = raw.get("console", [])
    prepare_lines = between(console, w["prepare_on"], w["prepare_off"])
    offset = clock_offset(prepare_lines)
    query = daemon_starts(raw)["query_s"] or 0.0
    # the operator script's run time, less the benchmark wrapper's own query
    script_run = _sub(_sub(_us(report, "script_end_us"), _us(report, "script_start_us")), query)

    def elapsed(step: str) -> float | None:
        return steps.get(step, {}).get("elapsed")

    total = _sub(process.get("end"), process.get("start"))
    stop_guest = _sub(w["prototype_off"], w["stop_start"])
    prepare_boot = _sub(w["prepare_off"], w["prepare_on"])
    libguestfs = elapsed("inject")
    export_checks = _sub(convert_started(events), steps.get("export", {}).get("start"))
    qemu_img = _sub(convert_finished(events), convert_started(events))
    guest = round(stop_guest + prepare_boot, 3) if stop_guest is not None and prepare_boot is not None else None
    overhead = None
    if (
        total is not None
        and guest is not None
        and libguestfs is not None
        and qemu_img is not None
        and export_checks is not None
    ):
        overhead = round(total - guest - libguestfs - export_checks - qemu_img, 3)
    disk = raw.get("disk", {})
    baseline = raw.get("read_baseline", {})
    image_size = raw.get("image", {}).get("size")
    return {
        "total_s": total,
        "job_elapsed_s": (raw.get("record") or {}).get("elapsed"),
        "stop_guest_s": stop_guest,
        "libguestfs_s": libguestfs,
        "prepare_boot_s": prepare_boot,
        "prepare_observed_s": _sub(
            steps.get("wait_shutoff", {}).get("end"), steps.get("boot_prepare", {}).get("start")
        ),
        "host_boot_to_running_s": _sub(guest_state_at(events, "running"), w["prepare_on"]),
        "guest_userspace_s": _us(report, "userspace_us"),
        "guest_unit_start_s": _us(report, "unit_start_us"),
        "guest_script_start_s": _us(report, "script_start_us"),
        "guest_script_end_s": _us(report, "script_end_us"),
        "guest_finish_s": _us(report, "finish_us"),
        "guest_poweroff_s": _sub(w["prepare_off"], offset),
        "script_run_s": script_run,
        "runner_before_script_s": _sub(_us(report, "script_start_us"), _us(report, "unit_start_us")),
        # of which systemd's own: unit start -> the runner's process forked
        "unit_to_exec_s": _sub(_us(report, "exec_start_us"), _us(report, "unit_start_us")),
        "runner_after_script_s": _sub(_us(report, "finish_us"), _us(report, "script_end_us")),
        # the physical limit: the unit's start + the script + a clean power-off (the
        # write-back and, with the fast power-off, the read-only remount), all guest clock
        "clean_poweroff_s": _sub(_us(report, "clean_us"), _us(report, "sync_start_us")),
        "limit_s": _limit(report, script_run),
        # measured: kernel start -> power down, less the wrapper's query, which the
        # limit's script run time leaves out too (instrumentation, on both sides or none)
        "limit_ratio": _ratio(
            _sub(printk_seen(prepare_lines, "reboot: Power down") or _sub(w["prepare_off"], offset), query),
            _limit(report, script_run),
        ),
        # guest clock, from the kernel's own lines on the console: its last line before
        # ACPI S5, and the runner's mark after its last report (fast power-off only)
        "guest_power_down_s": printk_seen(prepare_lines, "reboot: Power down"),
        "last_report_to_off_s": _sub(
            printk_seen(prepare_lines, "reboot: Power down"),
            printk_seen(prepare_lines, "imgprep-prepare: reported, powering off") or _us(report, "finish_us"),
        ),
        "downtime_s": _sub(w["restart_end"], w["stop_start"]),
        "usable_again_s": _sub(raw.get("usable_again"), w["stop_start"]),
        "export_s": elapsed("export"),
        "export_checks_s": export_checks,
        "qemu_img_s": qemu_img,
        "hash_s": _sub(_sub(elapsed("export"), qemu_img), export_checks),
        "guest_s": guest,
        "overhead_s": overhead,
        "export_mbps": _div(disk.get("allocated", 0) / MB if disk.get("allocated") else None, qemu_img),
        "export_virtual_mbps": _div(disk.get("virtual_size", 0) / MB if disk.get("virtual_size") else None, qemu_img),
        "read_buffered_mbps": _div(baseline.get("bytes", 0) / MB, baseline.get("buffered_s")),
        "read_direct_mbps": _div(baseline.get("bytes", 0) / MB, baseline.get("direct_s")),
        "image_mb": round(image_size / MB, 1) if image_size else None,
        "first_boot_login_s": _sub(raw.get("first_boot", {}).get("login"), w["first_boot_on"]),
        # the job, cut in consecutive parts (host clock), for the chart
        "part_start_validate_s": _sub(w["stop_start"], process.get("start")),
        "part_stop_s": stop_guest,
        "part_checkpoint_s": _sub(steps.get("inject", {}).get("start"), w["prototype_off"]),
        "part_inject_s": _sub(steps.get("inject", {}).get("end"), steps.get("inject", {}).get("start")),
        "part_boot_call_s": _sub(w["prepare_on"], steps.get("inject", {}).get("end")),
        "part_prepare_boot_s": prepare_boot,
        "part_notice_poweroff_s": _sub(steps.get("export", {}).get("start"), w["prepare_off"]),
        "part_export_checks_s": export_checks,
        "part_convert_s": qemu_img,
        "part_finish_s": _sub(process.get("end"), convert_finished(events)),
        "part_restart_to_login_s": _sub(raw.get("usable_again"), process.get("end")),
    }


def unit_stamps(log_text: str | None) -> tuple[float | None, dict[str, dict[str, float | None]]]:
    """Parse the benchmark wrapper's last line: how long its query took, and per unit the
    guest times (s) at which it began activating and became active (None: it never did)."""
    for line in reversed((log_text or "").splitlines()):
        match = _UNITS_LINE.match(line.strip())
        if match is None:
            continue
        query = round(float(match.group(2)) - float(match.group(1)), 2)
        units: dict[str, dict[str, float | None]] = {}
        for block in match.group(3).split(";"):
            props = dict(item.partition("=")[::2] for item in block.split())
            if "Id" not in props:
                continue

            def seconds(key: str, props: dict[str, str] = props) -> float | None:
                value = props.get(key, "")
                return round(int(value) / 1e6, 3) if value.isdigit() and int(value) > 0 else None

            units[props["Id"]] = {
                "activating": seconds("InactiveExitTimestampMonotonic"),
                "active": seconds("ActiveEnterTimestampMonotonic"),
            }
        return query, units
    return None, {}


def daemon_starts(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Which watched units had started by the end of the operator script, on the guest clock,
    and in which boot demo-identity announced a new node-id on the console."""
    query, units = unit_stamps(((raw.get("record") or {}).get("prepare") or {}).get("log"))
    w = windows(raw)
    console = raw.get("console", [])
    demo_seen = {
        "first_boot": first_seen(between(console, w["first_boot_on"], w["stop_start"]), DEMO_MESSAGE) is not None,
        "prepare_boot": first_seen(between(console, w["prepare_on"], w["prepare_off"]), DEMO_MESSAGE) is not None,
    }
    return {
        "query_s": query,
        "units": units,
        "app_started_in_prepare_boot": [u for u in APP_SERVICES if units.get(u, {}).get("activating") is not None],
        "demo_node_id_created_on_console": demo_seen,
    }


def image_state(inspection: Mapping[str, Any]) -> dict[str, bool]:
    """First-start state of the application daemons found in an exported image."""
    return {
        "demo_node_id": inspection.get("demo_node_id") is not None,
        "etcd_member": any("member" in f for f in inspection.get("etcd_files", [])),
        "redis_dump": any(f.endswith(".rdb") for f in inspection.get("redis_files", [])),
        "nginx_state": bool(inspection.get("nginx_lib")),
    }


def correctness(raw: Mapping[str, Any]) -> dict[str, Any]:
    """What the prepare boot started, and what first-start state the image holds."""
    report = (raw.get("record") or {}).get("boot_report") or {}
    inspection = raw.get("inspection") or {}
    starts = daemon_starts(raw)
    return {
        "regular_services_at_script": report.get("late_services"),
        "app_up_at_script": [s for s in report.get("services", []) if s in APP_SERVICES],
        "targets_at_script": report.get("targets"),
        "app_started_in_prepare_boot": starts["app_started_in_prepare_boot"],
        "demo_node_id_created_on_console": starts["demo_node_id_created_on_console"],
        "image_state": image_state(inspection) if inspection else None,
        "written_during_prepare": inspection.get("written_during_prepare"),
        "imgprep_traces": inspection.get("imgprep_traces"),
    }


def timeline(raw: Mapping[str, Any]) -> dict[str, float | None]:
    """Guest-clock milestones of the prepare boot (s since kernel start), for the chart."""
    t = timings(raw)
    points: dict[str, float | None] = {
        "userspace": t["guest_userspace_s"],
        "unit_start": t["guest_unit_start_s"],
        "script_start": t["guest_script_start_s"],
        "script_end": t["guest_script_end_s"],
        "finish": t["guest_finish_s"],
        "poweroff": t["guest_poweroff_s"],
    }
    for unit, stamps in daemon_starts(raw)["units"].items():
        points[f"active:{unit}"] = stamps["active"]
        points[f"activating:{unit}"] = stamps["activating"]
    return points


# --- across runs ---------------------------------------------------------------------------


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def spread(values: Iterable[float | None]) -> tuple[float, float] | None:
    present = [v for v in values if v is not None]
    return (min(present), max(present)) if present else None


def ratio(early: float | None, legacy: float | None) -> float | None:
    return round(early / legacy, 2) if early is not None and legacy else None


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Medians per mode and early/legacy ratios of every timing; counts of every correctness check."""
    ok = [r for r in runs if r.get("ok")]
    by_mode = {mode: [r for r in ok if r["mode"] == mode] for mode in MODES}
    keys = sorted({k for r in ok for k in r["timings"]})
    medians = {mode: {k: median(r["timings"].get(k) for r in rs) for k in keys} for mode, rs in by_mode.items()}
    spreads = {mode: {k: spread(r["timings"].get(k) for r in rs) for k in keys} for mode, rs in by_mode.items()}
    ratios = {k: ratio(medians["early"][k], medians["legacy"][k]) for k in keys}
    checks: dict[str, dict[str, Any]] = {}
    for mode, rs in by_mode.items():
        states = [r["correctness"]["image_state"] or {} for r in rs]
        written = [set(r["correctness"]["written_during_prepare"] or []) for r in rs]
        checks[mode] = {
            "runs": len(rs),
            "image_state": {
                k: sum(1 for s in states if s.get(k))
                for k in ("demo_node_id", "etcd_member", "redis_dump", "nginx_state")
            },
            "regular_services_at_script": sorted(
                {s for r in rs for s in r["correctness"]["regular_services_at_script"] or []}
            ),
            "app_started_in_prepare_boot": sorted(
                {s for r in rs for s in r["correctness"]["app_started_in_prepare_boot"]}
            ),
            "demo_created_in_first_boot": sum(
                1 for r in rs if r["correctness"]["demo_node_id_created_on_console"]["first_boot"]
            ),
            "demo_created_in_prepare_boot": sum(
                1 for r in rs if r["correctness"]["demo_node_id_created_on_console"]["prepare_boot"]
            ),
            "written_during_prepare_median": median(len(w) for w in written),
            "written_union": sorted(set().union(*written)) if written else [],
            "traces": sorted({t for r in rs for t in r["correctness"]["imgprep_traces"] or []}),
        }
    only_legacy = sorted(set(checks["legacy"]["written_union"]) - set(checks["early"]["written_union"]))
    timelines = {
        mode: {k: median(r["timeline"].get(k) for r in rs) for k in sorted({k for r in rs for k in r["timeline"]})}
        for mode, rs in by_mode.items()
    }
    return {
        "runs_ok": {mode: len(rs) for mode, rs in by_mode.items()},
        "runs_failed": [
            {"mode": r["mode"], "index": r["index"], "error": r.get("error")} for r in runs if not r.get("ok")
        ],
        "medians": medians,
        "spreads": spreads,
        "ratios": ratios,
        "correctness": checks,
        "written_only_in_legacy": only_legacy,
        "timelines": timelines,
    }


# --- the table -------------------------------------------------------------------------------

TIMING_ROWS: tuple[tuple[str, str, str], ...] = (
    ("Total job time (`imgprep create`, wall clock)", "total_s", "s"),
    ("Prepare boot: QEMU start → power-off", "prepare_boot_s", "s"),
    ("Guest clock: kernel start → operator-script unit starts", "guest_unit_start_s", "s"),
    ("Guest clock: kernel start → operator script starts", "guest_script_start_s", "s"),
    ("Guest clock: kernel start → power-off", "guest_poweroff_s", "s"),
    ("Guest clock: kernel start → kernel powers down (console)", "guest_power_down_s", "s"),
    ("Operator script run time", "script_run_s", "s"),
    ("Unit start → operator script starts", "runner_before_script_s", "s"),
    ("  of which systemd: unit start → runner process forked", "unit_to_exec_s", "s"),
    ("imgprep's runner after the script (remove itself, sync, report)", "runner_after_script_s", "s"),
    ("Clean power-off (sync, read-only remount; guest clock)", "clean_poweroff_s", "s"),
    ("Runner's last report → guest off (guest clock)", "last_report_to_off_s", "s"),
    ("Physical limit: unit start + script + clean power-off", "limit_s", "s"),
    ("Prepare boot (guest clock: kernel start → off) / physical limit", "limit_ratio", "x"),
    ("Prototype downtime: stop begins → running again", "downtime_s", "s"),
    ("Prototype usable again: stop begins → login prompt", "usable_again_s", "s"),
    ("Stop the prototype (graceful shutdown)", "stop_guest_s", "s"),
    ("Inject step (libguestfs appliance)", "libguestfs_s", "s"),
    ("Export step", "export_s", "s"),
    (
        "  of which checks of the powered-off disks (libguestfs: no imgprep file left; free space)",
        "export_checks_s",
        "s",
    ),
    ("  of which `qemu-img convert` (zstd qcow2)", "qemu_img_s", "s"),
    ("  of which fsync + sha1/sha256 by imgprep", "hash_s", "s"),
    ("Export throughput (allocated source bytes / convert time)", "export_mbps", "MB/s"),
    ("Reading the disk file with `dd` (page cache as found)", "read_buffered_mbps", "MB/s"),
    ("Reading the disk file with `dd iflag=direct` (no cache)", "read_direct_mbps", "MB/s"),
    ("Time in the guest (stop + prepare boot)", "guest_s", "s"),
    ("imgprep's own overhead (total - guest - libguestfs launches - qemu-img)", "overhead_s", "s"),
    ("Image file size", "image_mb", "MB"),
)


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "s":
        return f"{value:.1f} s"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:.0f} {unit}"


def _fmt_spread(pair: Sequence[float] | None, unit: str) -> str:
    if not pair:
        return ""
    low, high = pair
    if unit == "s":
        return f" ({low:.1f}-{high:.1f})"
    if unit == "x":
        return f" ({low:.2f}-{high:.2f})"
    return f" ({low:.0f}-{high:.0f})"


def _count(checks: Mapping[str, Any], key: str) -> str:
    return f"{checks['image_state'][key]}/{checks['runs']} runs"


def _names(names: Sequence[str]) -> str:
    return ", ".join(n.removesuffix(".service") for n in names) if names else "none"


def markdown_table(summary: Mapping[str, Any]) -> str:
    """The results table (medians, with min-max, and early/legacy ratios), as Markdown."""
    med, spr, rat = summary["medians"], summary["spreads"], summary["ratios"]
    n = summary["runs_ok"]
    lines = [
        f"| Median (min-max) | early ({n['early']} runs) | legacy ({n['legacy']} runs) | early / legacy |",
        "|---|---:|---:|---:|",
    ]
    for label, key, unit in TIMING_ROWS:
        cells = [_fmt(med[m].get(key), unit) + _fmt_spread(spr[m].get(key), unit) for m in MODES]
        r = rat.get(key)
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {'n/a' if r is None else f'{r:.2f}'} |")
    c = summary["correctness"]
    lines += [
        "",
        "| What the prepare boot left behind | early | legacy |",
        "|---|---|---|",
        "| Regular services already up when the script ran | "
        f"{_names(c['early']['regular_services_at_script'])} | {_names(c['legacy']['regular_services_at_script'])} |",
        "| Application daemons started during the prepare boot | "
        f"{_names(c['early']['app_started_in_prepare_boot'])} | {_names(c['legacy']['app_started_in_prepare_boot'])} |",
        "| demo-identity announced a new node-id on the console: prototype's first boot | "
        f"{c['early']['demo_created_in_first_boot']}/{c['early']['runs']} runs | "
        f"{c['legacy']['demo_created_in_first_boot']}/{c['legacy']['runs']} runs |",
        "| demo-identity announced a new node-id on the console: prepare boot | "
        f"{c['early']['demo_created_in_prepare_boot']}/{c['early']['runs']} runs | "
        f"{c['legacy']['demo_created_in_prepare_boot']}/{c['legacy']['runs']} runs |",
    ]
    for label, key in (
        ("demo-identity node-id (`/var/lib/demo-identity/node-id`) in the image", "demo_node_id"),
        ("etcd member directory (`/var/lib/etcd/default/member`) in the image", "etcd_member"),
        ("redis dump (`/var/lib/redis/*.rdb`) in the image", "redis_dump"),
        ("nginx runtime directories (`/var/lib/nginx/*`) in the image", "nginx_state"),
    ):
        lines.append(f"| {label} | {_count(c['early'], key)} | {_count(c['legacy'], key)} |")
    lines.append(
        "| Files written during the prepare boot, in the image (median) | "
        f"{_fmt(c['early']['written_during_prepare_median'], 'files')} | "
        f"{_fmt(c['legacy']['written_during_prepare_median'], 'files')} |"
    )
    return "\n".join(lines) + "\n"


# --- the physical limit of each prepare boot --------------------------------------------------

LIMIT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("unit start", "guest_unit_start_s"),
    ("script", "script_run_s"),
    ("clean power-off", "clean_poweroff_s"),
    ("limit", "limit_s"),
    ("measured (kernel start → power down)", "guest_power_down_s"),
    ("last report → off", "last_report_to_off_s"),
)


def limit_table(runs: Sequence[Mapping[str, Any]], goal: float = 1.1) -> str:
    """Per prepare boot and as medians per mode: the physical limit (unit start + script
    run time + clean power-off, from the boot report) next to the measured prepare boot
    (guest clock) and their ratio, as Markdown."""
    header = " | ".join(label for label, _ in LIMIT_COLUMNS)
    lines = [f"| Prepare boot | {header} | measured / limit |", "|---|" + "---:|" * (len(LIMIT_COLUMNS) + 1)]
    # every run whose prepare boot was measured, also one that failed later (e.g. the
    # prototype's restart): the prepare boot's numbers stand on their own
    ok = [r for r in runs if (r.get("timings") or {}).get("limit_s") is not None]
    for run in ok:
        t = run["timings"]
        cells = " | ".join(_fmt(t.get(key), "s") for _, key in LIMIT_COLUMNS)
        note = "" if run.get("ok") else " (run failed later)"
        lines.append(f"| {run['mode']} {run['index']}{note} | {cells} | {_fmt(t.get('limit_ratio'), 'x')} |")
    for mode in MODES:
        rs = [r for r in ok if r["mode"] == mode]
        if not rs:
            continue
        cells = " | ".join(_fmt(median(r["timings"].get(key) for r in rs), "s") for _, key in LIMIT_COLUMNS)
        ratio_median = median(r["timings"].get("limit_ratio") for r in rs)
        lines.append(f"| **{mode}, median ({len(rs)})** | {cells} | **{_fmt(ratio_median, 'x')}** |")
    lines.append("")
    lines.append(f"Goal: the early prepare boot at most {goal:.1f}x its physical limit.")
    return "\n".join(lines) + "\n"
