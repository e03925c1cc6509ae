"""The benchmark's chart: the prepare boot on the guest clock, and the whole job on the host clock.

Every bar segment is the median of that segment over the runs of one mode, so a bar's
length is close to, not exactly, the median total (which is printed at its end).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

# matplotlib comes with the `bench` extra; scripts/test installs only `test`, and mypy
# must pass there too (typed here when matplotlib is installed, Any when it is not)
import matplotlib  # type: ignore[import-not-found, unused-ignore]

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
from matplotlib.axes import Axes  # type: ignore[import-not-found, unused-ignore]

from benchmarks.metrics import MODES
from tests.guestimage import APP_SERVICES

# (label, from, to) on the guest clock; keys of metrics.timeline()
BOOT_SEGMENTS = (
    ("kernel + initrd", None, "userspace"),
    ("systemd until the operator-script unit starts", "userspace", "unit_start"),
    ("runner: report 'running', list services", "unit_start", "script_start"),
    ("operator script", "script_start", "script_end"),
    ("runner: remove itself, sync, report", "script_end", "finish"),
    ("power-off", "finish", "poweroff"),
)
BOOT_COLORS = ("#c7c7c7", "#9ecae1", "#6baed6", "#e6550d", "#fdae6b", "#636363")

# (label, key of metrics.timings(), colour); imgprep's own work in greys
JOB_SEGMENTS = (
    ("imgprep start, validate", "part_start_validate_s", "#d9d9d9"),
    ("guest: prototype shuts down", "part_stop_s", "#74c476"),
    ("notice the stop (1 s poll), checkpoint", "part_checkpoint_s", "#bdbdbd"),
    ("libguestfs: inject unit + script", "part_inject_s", "#9e9ac8"),
    ("start the prepare boot", "part_boot_call_s", "#d9d9d9"),
    ("guest: prepare boot", "part_prepare_boot_s", "#31a354"),
    ("imgprep notices the power-off", "part_notice_poweroff_s", "#bdbdbd"),
    ("libguestfs: check no imgprep file is left", "part_export_checks_s", "#bcbddc"),
    ("qemu-img convert (zstd)", "part_convert_s", "#fd8d3c"),
    ("hash, manifest, restore, restart, exit", "part_finish_s", "#969696"),
)
MARKER_LABELS = {
    "demo-identity.service": "demo-identity",
    "etcd.service": "etcd",
    "redis-server.service": "redis",
    "nginx.service": "nginx",
    "ssh.service": "sshd",
    "systemd-networkd-wait-online.service": "wait-online",
    "network-online.target": "network-online",
    "multi-user.target": "multi-user",
}


def _boot_panel(ax: Axes, timelines: Mapping[str, Mapping[str, float | None]], runs: Mapping[str, int]) -> None:
    extent = max((t.get("poweroff") or 0.0 for t in timelines.values()), default=0.0)
    ax.set_xlim(0, max(extent, 1.0) * 1.15)  # room for the labels at the bars' ends
    for row, mode in enumerate(reversed(MODES)):
        points = timelines.get(mode, {})
        for (label, start, end), color in zip(BOOT_SEGMENTS, BOOT_COLORS, strict=True):
            left = 0.0 if start is None else points.get(start)
            right = points.get(end)
            if left is None or right is None or right <= left:
                continue
            ax.barh(row, right - left, left=left, color=color, edgecolor="white", height=0.5, label=label)
        markers = []  # (x, unit, became active)
        for unit in MARKER_LABELS:
            active, activating = points.get(f"active:{unit}"), points.get(f"activating:{unit}")
            if active is not None:
                markers.append((active, unit, True))
            elif activating is not None:
                markers.append((activating, unit, False))
        markers.sort()
        for i, (x, unit, active) in enumerate(markers):
            color = "#a50f15" if unit in APP_SERVICES else "#08519c"
            ax.plot(x, row + 0.3, marker="v", markersize=7, color=color, markerfacecolor=color if active else "white")
            ax.annotate(
                MARKER_LABELS[unit] + ("" if active else " (activating)"),
                (x, row + 0.3),
                xytext=(0, 6 + 10 * (i % 4)),
                textcoords="offset points",
                ha="center",
                fontsize=7,
                color=color,
            )
        poweroff = points.get("poweroff")
        if poweroff is not None:
            started = any(unit in APP_SERVICES for _, unit, _ in markers)
            ax.annotate(
                f"{poweroff:.1f} s" + ("" if started else "\nno application daemon started"),
                (poweroff, row),
                xytext=(6, -3),
                textcoords="offset points",
                fontsize=8,
                va="center",
            )
    ax.set_yticks(range(len(MODES)), [f"{m}\n({runs.get(m, 0)} runs)" for m in reversed(MODES)])
    ax.set_ylim(-0.45, len(MODES) + 0.05)
    ax.set_xlabel("guest clock: seconds since the kernel started (median)")
    ax.set_title(
        "Prepare boot: when the operator script runs, and what had started before it ended "
        "(▼ red: application daemon, blue: system unit; hollow: still activating)",
        fontsize=9,
    )
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)


def _job_panel(ax: Axes, medians: Mapping[str, Mapping[str, float | None]], runs: Mapping[str, int]) -> None:
    extent = 1.0
    for row, mode in enumerate(reversed(MODES)):
        values = medians.get(mode, {})
        left = 0.0
        for label, key, color in JOB_SEGMENTS:
            width = values.get(key)
            if not width or width <= 0:
                continue
            ax.barh(row, width, left=left, color=color, edgecolor="white", height=0.5, label=label)
            left += width
        restart = values.get("part_restart_to_login_s")
        if restart:
            ax.barh(
                row,
                restart,
                left=left,
                color="white",
                edgecolor="#31a354",
                hatch="///",
                height=0.5,
                label="after the job: prototype boots to its login prompt",
            )
        extent = max(extent, left + (restart or 0.0))
        total = values.get("total_s")
        if total:
            ax.annotate(
                f"job {total:.0f} s\nimgprep's own {values.get('overhead_s') or 0.0:.1f} s",
                (left + (restart or 0.0), row),
                xytext=(6, 0),
                textcoords="offset points",
                fontsize=8,
                va="center",
            )
    ax.set_xlim(0, extent * 1.15)
    ax.set_yticks(range(len(MODES)), [f"{m}\n({runs.get(m, 0)} runs)" for m in reversed(MODES)])
    ax.set_xlabel("host clock: seconds since `imgprep create` started (median of each part)")
    ax.set_title("The whole job: time in the guest, libguestfs, qemu-img and imgprep itself (greys)", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=3)


def draw(summary: Mapping[str, Any], meta: Mapping[str, Any], path: Path) -> None:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 10), gridspec_kw={"height_ratios": [1.2, 1]})
    _boot_panel(top, summary["timelines"], summary["runs_ok"])
    _job_panel(bottom, summary["medians"], summary["runs_ok"])
    fig.suptitle(
        f"imgprep create, early vs legacy operator script - {meta.get('cpus')} CPUs, "
        f"{meta.get('acceleration', '').split(':')[0]}, {meta.get('date', '')[:10]}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
