"""Benchmark: what each capture costs the prototype and the host.

Run as root on a host set up by ./scripts/setup-host (docs/benchmark.md)::

    ./scripts/benchmark captures --runs 3 --out benchmarks/results/

Each run makes a fresh prototype from the cached Debian test guest, boots it (and, with
the guest agent, waits until the agent answers), then runs ``imgprep create --json`` on
the running prototype, in one of four modes, alternating:

* ``clone-freeze``: ``--capture clone --consistency freeze`` (the default with an agent);
* ``clone-stop``: ``--capture clone --consistency stop`` on a prototype without an agent;
* ``in-place``: ``--capture in-place`` (stop, checkpoint, prepare, revert, restart);
* ``legacy``: ``--capture in-place --mode legacy`` (the classic late operator script).

Per run: the prototype's downtime (freeze: the freeze window from the agent's answers,
as the job record gives it; stop and in place: shutdown requested -> running again, as
the job record gives it), the total job time (the ``imgprep create`` process), the
bytes written on the host's block device holding the VM and view directories during
the job (``/sys/dev/block/M:m/stat``: host-wide, so other users of the host add to it),
and the export throughput (the disk's virtual size over the export step's time).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

from benchmarks.early_vs_legacy import (
    BOOT_TIMEOUT,
    LIBVIRT_URI,
    NAME_PREFIX,
    NIC_XML,
    REPO,
    TIMEOUTS,
    ConsoleTail,
    Libvirt,
    base_disk,
    prototype,
    qemu_size,
)
from imgprep.config import Config
from imgprep.pointintime import agent_answers
from tests.guestimage import GuestImage, build, domain_xml

log = logging.getLogger("benchmarks.capture_modes")
MODES: dict[str, list[str]] = {
    "clone-freeze": ["--capture", "clone", "--consistency", "freeze"],
    "clone-stop": ["--capture", "clone", "--consistency", "stop"],
    "in-place": ["--capture", "in-place"],
    "legacy": ["--capture", "in-place", "--mode", "legacy"],
}


def sectors_written(path: Path) -> int:
    """Sectors written so far on the block device holding ``path`` (its whole disk's counter
    if ``path`` is on a partition: the partition's own counter is in the same file)."""
    dev = os.stat(path).st_dev
    fields = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat").read_text().split()
    return int(fields[6])


def run_once(
    *, lv: Libvirt, image: GuestImage, base: Path, mode: str, index: int, args: argparse.Namespace
) -> dict[str, Any]:
    name = f"{NAME_PREFIX}{mode}-{index}-{uuidlib.uuid4().hex[:6]}"
    workdir = Path(args.vm_dir) / name
    workdir.mkdir(parents=True)
    disk, console = workdir / "disk.qcow2", workdir / "console.log"
    shutil.copyfile(base, disk)
    agent = mode != "clone-stop"  # stop is for prototypes without an agent (docs/capture.md)
    xml = domain_xml(name, disk, image=image, console_log=console, agent=agent)
    xml = xml.replace("<devices>", f"<devices>\n    {NIC_XML}", 1)
    raw: dict[str, Any] = {"mode": mode, "index": index, "vm": name, "agent": agent}
    tail = ConsoleTail(console)
    with prototype(lv, name, xml, workdir, args.keep):
        tail.start()
        try:
            start = time.time()
            lv.call(name, lambda dom: dom.create())
            tail.wait_for("login:", start, BOOT_TIMEOUT, lambda: lv.active(name))
            deadline = time.monotonic() + BOOT_TIMEOUT
            while agent and not lv.call(name, lambda dom: agent_answers(dom, 5)):
                if time.monotonic() > deadline:
                    raise RuntimeError("the guest agent never answered")
                time.sleep(1)
            time.sleep(args.settle)
            raw.update(run_imgprep(lv.call(name, lambda dom: str(dom.UUIDString())), mode, workdir, disk))
        except Exception as exc:
            log.exception("run %s-%d failed", mode, index)
            raw["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            tail.stop()
    raw["ok"] = "error" not in raw
    return raw


def run_imgprep(vm_uuid: str, mode: str, workdir: Path, disk: Path) -> dict[str, Any]:
    out_dir = workdir / "out"
    out_dir.mkdir()
    env = {**os.environ, "IMGPREP_STATE_DIR": str(workdir / "state")}
    # --no-verify: the verification boot is not what this benchmark measures
    cmd = [sys.executable, "-m", "imgprep", "create", "--vm", vm_uuid, "--json", "--no-verify", *MODES[mode]]
    cmd += ["--output-dir", str(out_dir), *TIMEOUTS]
    watched = {str(p): p for p in (workdir, Config().view_dir.parent)}
    os.sync()  # the prototype's disk copy (and anything else pending) is written before the window opens
    before = {k: sectors_written(p) for k, p in watched.items()}
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    total = time.time() - t0
    os.sync()  # what the job left in the page cache counts too
    written = {k: (sectors_written(p) - before[k]) * 512 for k, p in watched.items()}
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    summary = lines[-1] if lines else {}
    if proc.returncode != 0:
        return {"error": f"imgprep exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    got = subprocess.run(
        [sys.executable, "-m", "imgprep", "jobs", "get", summary["job_uuid"]],
        cwd=REPO, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    record = json.loads(got.stdout)
    capture = record.get("capture") or {}
    freeze_ms = capture.get("freeze_window_ms")
    downtime = freeze_ms / 1000 if freeze_ms is not None else capture.get("downtime_s")
    export_s = record["state"].get("export_seconds")
    size = qemu_size(disk)
    return {
        "capture": capture,
        "downtime_s": downtime,
        "total_s": round(total, 1),
        "host_bytes_written": max(written.values()),  # one device, or the busier of two
        "export_s": export_s,
        "export_mb_s": round(size / export_s / 1e6, 1) if export_s else None,
        "virtual_size": size,
    }


def table(runs: list[dict[str, Any]]) -> str:
    def median(mode: str, key: str) -> str:
        values = [r[key] for r in runs if r["mode"] == mode and r["ok"] and r.get(key) is not None]
        return f"{statistics.median(values):.3g}" if values else "n/a"

    lines = [
        "| mode | runs ok | downtime (s) | total job (s) | host bytes written (MB) | export (MB/s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for mode in MODES:
        ok = sum(1 for r in runs if r["mode"] == mode and r["ok"])
        mb = [r["host_bytes_written"] / 1e6 for r in runs if r["mode"] == mode and r["ok"]]
        written = f"{statistics.median(mb):.0f}" if mb else "n/a"
        lines.append(
            f"| {mode} | {ok} | {median(mode, 'downtime_s')} | {median(mode, 'total_s')} | {written} "
            f"| {median(mode, 'export_mb_s')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.capture_modes", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per mode (alternating)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="results directory")
    parser.add_argument("--vm-dir", type=Path, default=Path("/var/lib/imgprep-bench"), help="prototype disks")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds between the prototype's boot and the job")
    parser.add_argument("--keep", action="store_true", help="keep the prototypes' disks and images")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes: {', '.join(unknown)}")
    if os.geteuid() != 0:
        print("capture_modes: run as root (it defines libvirt domains)", file=sys.stderr)
        return 2
    os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
    os.environ.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
    lv = Libvirt(LIBVIRT_URI)
    image = build()
    base = base_disk(image, args.vm_dir, True)
    runs = []
    for index in range(1, args.runs + 1):
        for mode in modes:
            log.info("run %d/%d, mode %s", index, args.runs, mode)
            runs.append(run_once(lv=lv, image=image, base=base, mode=mode, index=index, args=args))
            log.info("  %s", {k: v for k, v in runs[-1].items() if k != "capture"})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "capture_modes.json").write_text(json.dumps({"runs": runs}, indent=1, sort_keys=True) + "\n")
    text = table(runs)
    (args.out / "capture_modes.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
