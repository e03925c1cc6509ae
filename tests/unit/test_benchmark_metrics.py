"""The benchmark's arithmetic (benchmarks/metrics.py) on a recorded-shape sample run.

No timing assertions about imgprep here: the numbers below are made up, and the tests
only check that each metric is computed from the right clocks and events.
"""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from benchmarks import metrics
from benchmarks.early_vs_legacy import render_wrapper
from imgprep import artifacts

T0 = 1_800_000_000.0  # host clock of the sample run

QEMU_LOG = """\
2027-01-15 08:00:00.000+0000: starting up libvirt version: 9.0.0, qemu version: 7.2.0
-machine pc \\
2027-01-15 08:00:50.000+0000: shutting down, reason=shutdown
2027-01-15 08:01:10.000+0000: starting up libvirt version: 9.0.0
2027-01-15 08:01:30.500+0000: shutting down, reason=shutdown
2027-01-15 08:01:40.000+0000: starting up libvirt version: 9.0.0
"""

UNITS_LINE = (
    "imgprep-bench: query=23.02-23.40 units: "
    "Id=demo-identity.service InactiveExitTimestampMonotonic=11534265 ActiveEnterTimestampMonotonic=11534265 ; "
    "Id=etcd.service InactiveExitTimestampMonotonic=14399306 ActiveEnterTimestampMonotonic=17881068 ; "
    "Id=nginx.service InactiveExitTimestampMonotonic=0 ActiveEnterTimestampMonotonic=0 ; "
)


def step(name: str, start: float, end: float) -> list[dict[str, Any]]:
    return [
        {"event": "step", "chain": "chain_results", "step": name, "status": "started", "at": start},
        {
            "event": "step",
            "chain": "chain_results",
            "step": name,
            "status": "finished",
            "at": end,
            "elapsed": end - start,
        },
    ]


def sample_run(mode: str = "legacy") -> dict[str, Any]:
    """A run: first boot at T0, stop at T0+50, inject 52..64, prepare boot 70..90.5, export 92..95."""
    events = [
        *step("validate", T0 + 49.5, T0 + 49.6),
        *step("stop_vm", T0 + 49.6, T0 + 51.0),
        *step("checkpoint", T0 + 51.0, T0 + 52.0),
        *step("inject", T0 + 52.0, T0 + 64.0),
        *step("boot_prepare", T0 + 64.0, T0 + 70.2),
        {"event": "guest", "state": "running", "at": T0 + 80.0},
        *step("wait_shutoff", T0 + 85.0, T0 + 91.0),
        {"event": "progress", "step": "export", "percent": 0.0, "at": T0 + 92.1},
        {"event": "progress", "step": "export", "percent": 100.0, "at": T0 + 94.0},
        *step("export", T0 + 92.0, T0 + 95.0),
        *step("restart_vm", T0 + 95.0, T0 + 96.0),
    ]
    lifecycle = [(T0, "start", ""), (T0 + 50.0, "stop", "shutdown"), (T0 + 70.0, "start", "")]
    lifecycle += [(T0 + 90.5, "stop", "shutdown"), (T0 + 96.0, "start", "")]
    console = [
        (T0 + 1.0, "[    0.000000] Linux version 6.1.0"),
        (T0 + 30.0, "imgprep-proto login: "),
        (T0 + 71.0, "[    0.100000] Linux version 6.1.0"),  # offset 70.9
        (T0 + 75.0, "[    4.000000] systemd[1]: Started journald"),  # offset 71.0: seen late
        (T0 + 81.0, "demo-identity: created node-id 1234"),
        (T0 + 120.0, "imgprep-proto login: "),
    ]
    report = {
        "userspace_us": 4_000_000,
        "unit_start_us": 19_000_000,
        "script_start_us": 20_000_000,
        "script_end_us": 23_500_000,
        "finish_us": 24_000_000,
        "services": ["systemd-journald.service", "etcd.service"],
        "late_services": ["etcd.service"],
    }
    return {
        "mode": mode,
        "index": 1,
        "ok": True,
        "process": {"start": T0 + 49.0, "end": T0 + 97.0},
        "events": events,
        "qemu_log": lifecycle,
        "console": console,
        "first_boot": {"start": T0 - 0.5, "login": T0 + 30.0},
        "usable_again": T0 + 120.0,
        "record": {"boot_report": report, "prepare": {"log": "done\n" + UNITS_LINE}, "elapsed": 47.0},
        "disk": {"virtual_size": 2_000_000_000, "allocated": 380_000_000},
        "read_baseline": {"bytes": 400_000_000, "buffered_s": 0.1, "direct_s": 0.4},
        "image": {"size": 150_000_000},
        "inspection": {
            "demo_node_id": "1234",
            "etcd_files": ["/var/lib/etcd/default/member/wal/0.wal"],
            "redis_files": [],
            "nginx_lib": [],
            "written_during_prepare": ["/etc/machine-id", "/var/lib/demo-identity/node-id"],
            "imgprep_traces": [],
        },
    }


def test_qemu_log_lifecycle() -> None:
    lifecycle = metrics.qemu_lifecycle(QEMU_LOG)
    assert [(kind, reason) for _, kind, reason in lifecycle] == [
        ("start", ""),
        ("stop", "shutdown"),
        ("start", ""),
        ("stop", "shutdown"),
        ("start", ""),
    ]
    assert lifecycle[3][0] - lifecycle[2][0] == pytest.approx(20.5)


def test_clock_offset_is_the_smallest_host_minus_guest() -> None:
    lines = [(100.0, "[    1.000000] a"), (100.5, "[    1.800000] b"), (101.0, "no stamp"), (103.0, "[    2.0] c")]
    assert metrics.clock_offset(lines) == pytest.approx(98.7)
    assert metrics.clock_offset([(1.0, "plain")]) is None


def test_unit_stamps_from_the_wrapper_line() -> None:
    query, units = metrics.unit_stamps("linux-prepare-image: done\n" + UNITS_LINE)
    assert query == pytest.approx(0.38)
    assert units["etcd.service"] == {"activating": 14.399, "active": 17.881}
    assert units["nginx.service"] == {"activating": None, "active": None}
    assert metrics.unit_stamps("no wrapper line") == (None, {})


def test_timings_of_a_run() -> None:
    t = metrics.timings(sample_run())
    assert t["total_s"] == pytest.approx(48.0)
    assert t["stop_guest_s"] == pytest.approx(0.4)  # stop_vm began at +49.6, QEMU stopped at +50
    assert t["prepare_boot_s"] == pytest.approx(20.5)
    assert t["libguestfs_s"] == pytest.approx(12.0)
    assert t["export_checks_s"] == pytest.approx(0.1)  # step start to qemu-img's first progress
    assert t["qemu_img_s"] == pytest.approx(1.9)
    assert t["hash_s"] == pytest.approx(1.0)
    assert t["guest_script_start_s"] == pytest.approx(20.0)
    assert t["script_run_s"] == pytest.approx(3.5 - 0.38)  # the wrapper's own query is not the script
    assert t["guest_poweroff_s"] == pytest.approx(90.5 - 70.9)
    assert t["downtime_s"] == pytest.approx(96.0 - 49.6)
    assert t["usable_again_s"] == pytest.approx(120.0 - 49.6)
    assert t["export_mbps"] == pytest.approx(200.0)
    assert t["read_direct_mbps"] == pytest.approx(1000.0)
    # imgprep's own overhead is what is left of the job
    assert t["overhead_s"] == pytest.approx(48.0 - (0.4 + 20.5) - 12.0 - 2.0)
    parts = [v for k, v in t.items() if k.startswith("part_") and k != "part_restart_to_login_s"]
    assert sum(p for p in parts if p is not None) == pytest.approx(t["total_s"])


def test_limit_ratio_leaves_the_wrappers_query_out_of_both_sides() -> None:
    run = sample_run()
    run["record"]["boot_report"] |= {"sync_start_us": 23_600_000, "clean_us": 24_200_000}
    run["console"].append((T0 + 90.4, "[   25.000000] reboot: Power down"))
    t = metrics.timings(run)
    script = 3.5 - 0.38  # the wrapper's query (0.38 s) is not the script
    limit = 19.0 + script + 0.6  # unit start + script + clean power-off
    assert t["limit_s"] == pytest.approx(limit)
    assert t["limit_ratio"] == pytest.approx((25.0 - 0.38) / limit, abs=1e-3)


def test_correctness_of_a_run() -> None:
    c = metrics.correctness(sample_run())
    assert c["regular_services_at_script"] == ["etcd.service"]
    assert c["app_started_in_prepare_boot"] == ["demo-identity.service", "etcd.service"]
    assert c["demo_node_id_created_on_console"] == {"first_boot": False, "prepare_boot": True}
    assert c["image_state"] == {"demo_node_id": True, "etcd_member": True, "redis_dump": False, "nginx_state": False}


def test_summary_and_table() -> None:
    early = sample_run("early")
    early["process"]["end"] = T0 + 73.0  # a 24 s job
    early["inspection"] = {**early["inspection"], "demo_node_id": None, "etcd_files": []}
    early["inspection"]["written_during_prepare"] = ["/etc/machine-id"]
    runs = [
        {
            "mode": raw["mode"],
            "index": 1,
            "ok": True,
            "timings": metrics.timings(raw),
            "timeline": metrics.timeline(raw),
            "correctness": metrics.correctness(raw),
        }
        for raw in (early, sample_run("legacy"))
    ]
    summary = metrics.summarize(runs)
    assert summary["ratios"]["total_s"] == pytest.approx(0.5)
    assert summary["correctness"]["early"]["image_state"]["demo_node_id"] == 0
    assert summary["correctness"]["legacy"]["image_state"]["demo_node_id"] == 1
    assert summary["written_only_in_legacy"] == ["/var/lib/demo-identity/node-id"]
    table = metrics.markdown_table(summary)
    assert "| Total job time (`imgprep create`, wall clock) | 24.0 s (24.0-24.0) | 48.0 s (48.0-48.0) | 0.50 |" in table


@pytest.mark.allow_subprocess("sh")
def test_operator_script_wrapper_is_valid_sh() -> None:
    wrapper = render_wrapper()
    assert artifacts.artifact("operator_scripts/linux-prepare-image").read_text() in wrapper  # unchanged
    assert "etcd.service" in wrapper
    subprocess.run(["sh", "-n"], input=wrapper, text=True, check=True)
