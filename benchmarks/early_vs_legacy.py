"""Benchmark: image creation with imgprep's early operator script vs the classic late placement.

Run as root on a host set up by ./scripts/setup-host (see docs/benchmark.md)::

    .venv/bin/python -m benchmarks.early_vs_legacy --runs 3 --out benchmarks/results/

Each run makes a fresh prototype from the cached Debian test guest (tests/guestimage.py:
etcd, redis, nginx and demo-identity installed and enabled, none of them started by the
image's first boot), boots it once (its first boot: the daemons have never run), then
runs ``imgprep create --json`` on the running prototype, in one of two modes, alternating
early, legacy, early, legacy...:

* ``early``: imgprep's early-boot unit (before sysinit.target, RFD 109);
* ``legacy``: the hidden ``--mode legacy``: the same flow, but the unit is ordered after
  multi-user.target and network.target, the way Triton's guest tools run the operator
  script, so every daemon has started before it runs.

Both capture the prototype in place (``--capture in-place``, the default here): the
prepare boot then keeps the prototype's NIC and static network configuration, so
``network-online.target`` is reached as on the prototype. A clone has no NIC, and this
guest's ``systemd-networkd-wait-online`` then waits its full 120 s before
``multi-user.target``, where the legacy unit runs: the comparison would measure that
timeout. ``benchmarks.capture_modes`` compares the captures themselves.

Both modes run the same operator script: imgprep's default linux-prepare-image, wrapped
so that it ends its output with one line of systemd's start stamps of the daemons
(``WRAPPER`` below; the runner sends that output's tail to the host).

While a run goes on the benchmark records imgprep's JSON events, every line of the
prototype's serial console (stamped with the host time it was seen), libvirt's qemu log
(when each QEMU process started and stopped) and the host load. After the run it reads
the prototype's disk file with ``dd`` (the baseline for the export throughput) and
inspects the exported image with libguestfs for first-start state. ``benchmarks.metrics``
turns all that into numbers, ``benchmarks.chart`` into the chart.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import uuid as uuidlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import libvirt

from benchmarks import metrics
from imgprep import artifacts
from imgprep.run import run
from tests.guestimage import GuestImage, build, domain_xml, recipe_key

log = logging.getLogger("benchmarks.early_vs_legacy")
T = TypeVar("T")
# libvirt prints every error on stderr by default; the benchmark reports its own.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
REPO = Path(__file__).resolve().parents[1]
LIBVIRT_URI = "qemu:///system"
NAME_PREFIX = "imgprep-bench-"
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")
TIMEOUTS = ["--boot-timeout", "600", "--prepare-timeout", "300", "--shutdown-timeout", "300", "--stop-timeout", "300"]
BOOT_TIMEOUT = 600.0

# A static address on QEMU's user-mode network: network-online.target is reached as soon as
# the link is up. Without a NIC and a configuration, systemd-networkd-wait-online waits its
# full 120 s timeout, and nginx (After=network-online.target) and multi-user.target with it.
NETWORK_FILE = "/etc/systemd/network/80-imgprep-bench.network"
NETWORK_CONFIG = "[Match]\nName=eth0\n\n[Network]\nAddress=10.0.2.15/24\nGateway=10.0.2.2\nDNS=10.0.2.3\n"
NIC_XML = "<interface type='user'><model type='virtio'/></interface>"

WRAPPER = """#!/bin/sh
# imgprep benchmark: imgprep's default operator script, unchanged, then one line with
# systemd's start stamps (CLOCK_MONOTONIC, us) of the watched units. Same in both modes.
set -u
dir=/run/imgprep-bench
mkdir -p "$dir"
cat >"$dir/linux-prepare-image" <<'IMGPREP_BENCH_EOF'
@SCRIPT@
IMGPREP_BENCH_EOF
rc=0
sh "$dir/linux-prepare-image" || rc=$?
read -r t0 _ </proc/uptime
units=$(systemctl show -p Id -p InactiveExitTimestampMonotonic -p ActiveEnterTimestampMonotonic \\
    @UNITS@ 2>/dev/null | sed 's/^$/;/' | tr '\\n' ' ')
read -r t1 _ </proc/uptime
echo "imgprep-bench: query=$t0-$t1 units: $units"
rm -rf "$dir"
exit "$rc"
"""


def render_wrapper() -> str:
    script = artifacts.artifact("operator_scripts/linux-prepare-image").read_text()
    if "IMGPREP_BENCH_EOF" in script:
        raise RuntimeError("the operator script contains the wrapper's here-document delimiter")
    return WRAPPER.replace("@SCRIPT@", script.rstrip("\n")).replace("@UNITS@", " ".join(metrics.WATCHED_UNITS))


# --- the host ------------------------------------------------------------------------------


def _out(cmd: list[str]) -> str:
    """stdout of a command that may fail (then empty): version probes, git, fincore."""
    try:
        return run(cmd, check=False).stdout.strip()
    except OSError:
        return ""


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rpartition(")")[2].split()[1])


def foreign_qemu() -> list[str]:
    """QEMU processes on this host that are not this benchmark's (its VMs, its libguestfs)."""
    own = os.getpid()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or not os.path.basename(argv[0].decode(errors="replace")).startswith("qemu-system"):
            continue
        cmdline = b" ".join(argv).decode(errors="replace")
        if f"guest={NAME_PREFIX}" in cmdline:
            continue
        pid, ours = int(proc.name), False
        while pid > 1:
            pid = _ppid(pid)
            if pid == own:
                ours = True
                break
        if not ours:
            name = cmdline.split("guest=", 1)[1].split(",", 1)[0] if "guest=" in cmdline else "libguestfs appliance?"
            found.append(f"pid {proc.name}: {name}")
    return found


def libvirtd() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and (proc / "comm").read_text().strip() == "libvirtd":
                pids.append(int(proc.name))
    return pids


def wait_idle(budget: float, poll: float = 30.0) -> dict[str, Any]:
    """Wait (up to ``budget`` s) until no other QEMU runs here; say what was seen."""
    t0 = time.monotonic()
    first = foreign_qemu()
    seen = list(first)
    while seen and time.monotonic() - t0 < budget:
        log.warning("waiting for other QEMU processes to finish: %s", "; ".join(seen))
        time.sleep(poll)
        seen = foreign_qemu()
    return {
        "foreign_qemu_at_check": first,
        "waited_s": round(time.monotonic() - t0, 1),
        "foreign_qemu_at_start": seen,
        "loadavg_at_start": loadavg(),
    }


class LoadSampler(threading.Thread):
    """Load average and foreign QEMU processes every few seconds while a run goes on."""

    def __init__(self, every: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.every = every
        self.samples: list[dict[str, Any]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append(
                {"at": time.time(), "loadavg": loadavg(), "foreign_qemu": len(foreign_qemu()), "libvirtd": libvirtd()}
            )
            self._stop_event.wait(self.every)

    def stop(self) -> dict[str, Any]:
        self._stop_event.set()
        self.join()
        pids = {pid for s in self.samples for pid in s["libvirtd"]}
        return {
            "max_loadavg_1m": max((s["loadavg"][0] for s in self.samples), default=None),
            "max_foreign_qemu": max((s["foreign_qemu"] for s in self.samples), default=0),
            "libvirtd_restarted": len(pids) > 1,  # someone restarted it: connections dropped, steps retried
            "samples": len(self.samples),
        }


def host_facts(conn: Any) -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        "?",
    )
    mem = next(
        line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    lib = conn.getLibVersion()
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "mem_gib": round(int(mem) / 2**20, 1),
        "kernel": platform.release(),
        "qemu": _out(["qemu-system-x86_64", "--version"]).splitlines()[0],
        "libvirt": f"{lib // 1_000_000}.{lib // 1000 % 1000}.{lib % 1000}",
        "acceleration": "software emulation (TCG): domain type='qemu', libguestfs force_tcg; KVM hangs here",
        "libguestfs_backend_settings": os.environ.get("LIBGUESTFS_BACKEND_SETTINGS", ""),
        "git_commit": _out(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "git_dirty": bool(_out(["git", "-C", str(REPO), "status", "--porcelain"])),
        "guest_recipe": recipe_key(),
        "guest": "Debian 12 (tests/guestimage.py), 1 vCPU, 1024 MiB, direct kernel boot",
        "python": platform.python_version(),
    }


class Libvirt:
    """Domains by name over a connection that reopens itself: other users of this host
    restart libvirtd now and then, which closes every client connection."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._conn: Any = None

    def conn(self) -> Any:
        if self._conn is not None:
            try:
                alive = self._conn.isAlive()
            except libvirt.libvirtError:
                alive = False
            if not alive:
                with contextlib.suppress(libvirt.libvirtError):
                    self._conn.close()
                self._conn = None
        if self._conn is None:
            self._conn = libvirt.open(self.uri)
        return self._conn

    def define(self, xml: str) -> None:
        self._retry(lambda: self.conn().defineXML(xml))

    def call(self, name: str, fn: Callable[[Any], T]) -> T:
        """``fn(domain)``, reconnecting and retrying when libvirt fails (a dropped connection)."""
        return self._retry(lambda: fn(self.conn().lookupByName(name)))

    def _retry(self, fn: Callable[[], T], attempts: int = 4) -> T:
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except libvirt.libvirtError as exc:
                if attempt == attempts:
                    raise
                log.warning("libvirt: %s; reconnecting (attempt %d)", exc, attempt)
                with contextlib.suppress(libvirt.libvirtError):
                    self._conn.close()
                self._conn = None
                time.sleep(2.0)
        raise AssertionError("unreachable")

    def active(self, name: str) -> bool:
        return self.call(name, lambda dom: bool(dom.isActive()))


# --- the serial console ----------------------------------------------------------------------


class ConsoleTail(threading.Thread):
    """Every line of a file-backed serial console, with the host time it was first seen.

    libvirt truncates (or replaces) the file whenever the domain starts; the tail follows.
    The login prompt has no newline, so the unfinished last line is searchable too.
    """

    def __init__(self, path: Path, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.interval = interval
        self.lines: list[tuple[float, str]] = []
        self._partial = b""
        self._partial_at = 0.0
        self._ino = -1
        self._offset = 0
        self._lock = threading.Lock()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self._poll()
            self._stop_event.wait(self.interval)
        self._poll()

    def _poll(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return
        with self._lock:
            if st.st_ino != self._ino or st.st_size < self._offset:
                if self._partial:
                    self.lines.append((self._partial_at, self._partial.decode(errors="replace")))
                self._ino, self._offset, self._partial = st.st_ino, 0, b""
            if st.st_size == self._offset:
                return
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
            now = time.time()
            self._offset += len(data)
            chunks = (self._partial + data).split(b"\n")
            self._partial = chunks.pop()
            if self._partial:
                self._partial_at = now
            self.lines.extend((now, chunk.decode(errors="replace")) for chunk in chunks)

    def seen(self, needle: str, after: float) -> float | None:
        with self._lock:
            when = metrics.first_seen(self.lines, needle, after)
            if when is None and self._partial_at >= after and needle in self._partial.decode(errors="replace"):
                when = self._partial_at
            return when

    def wait_for(self, needle: str, after: float, timeout: float, alive: Callable[[], bool]) -> float:
        deadline = time.monotonic() + timeout
        while (when := self.seen(needle, after)) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{needle!r} did not appear on {self.path} within {timeout:.0f}s")
            if not alive():
                raise RuntimeError(f"the VM stopped before {needle!r} appeared on {self.path}")
            time.sleep(0.2)
        return when

    def stop(self) -> list[tuple[float, str]]:
        self._stop_event.set()
        self.join()
        with self._lock:
            if self._partial:
                self.lines.append((self._partial_at, self._partial.decode(errors="replace")))
                self._partial = b""
            return list(self.lines)


# --- the prototype -----------------------------------------------------------------------------


def base_disk(image: GuestImage, vm_dir: Path, nic: bool) -> Path:
    """The disk every prototype copies: the cached guest, plus a network configuration with a NIC."""
    if not nic:
        return image.disk
    base = vm_dir / f"base-{image.directory.name}"
    disk = base / "disk.qcow2"
    if (base / "done").exists():
        return disk
    from imgprep.libguestfs import open_guest

    base.mkdir(parents=True, exist_ok=True)
    partial = base / "disk.qcow2.partial"
    shutil.copyfile(image.disk, partial)
    log.info("adding %s to a copy of the test guest (one libguestfs launch)", NETWORK_FILE)
    with open_guest([(partial, "qcow2")], readonly=False, force_tcg=False) as guest:
        guest.mkdir_p(str(Path(NETWORK_FILE).parent))
        guest.write(NETWORK_FILE, NETWORK_CONFIG.encode(), 0o644)
    partial.rename(disk)
    (base / "done").write_text(NETWORK_CONFIG)
    return disk


def prototype_xml(name: str, disk: Path, console: Path, image: GuestImage, nic: bool) -> str:
    xml = domain_xml(name, disk, image=image, console_log=console)
    return xml.replace("<devices>", f"<devices>\n    {NIC_XML}", 1) if nic else xml


def destroy(lv: Libvirt, name: str) -> None:
    if lv.active(name):
        lv.call(name, lambda dom: dom.destroy())


def _undefine(dom: Any) -> None:
    for snap in dom.snapshotListNames():
        dom.snapshotLookupByName(snap).delete(0)
    dom.undefine()


@contextlib.contextmanager
def prototype(lv: Libvirt, name: str, xml: str, workdir: Path, keep: bool) -> Iterator[None]:
    """A defined domain, removed (with its files unless ``keep``) whatever happens."""
    try:
        lv.define(xml)
        yield
    finally:
        try:
            destroy(lv, name)
            lv.call(name, _undefine)
        except libvirt.libvirtError as exc:
            log.error("could not remove the prototype %s: %s (remove it with virsh)", name, exc)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


# --- measurements around the job -----------------------------------------------------------------


def page_cache_bytes(path: Path) -> int | None:
    text = _out(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)])
    return int(text) if text.isdigit() else None


def read_baseline(path: Path) -> dict[str, Any]:
    """How fast this host simply reads the disk file: through the page cache as found, and with O_DIRECT."""
    size = path.stat().st_size

    def timed(extra: list[str]) -> float:
        t0 = time.monotonic()
        run(["dd", f"if={path}", "of=/dev/null", "bs=4M", *extra])
        return round(time.monotonic() - t0, 3)

    direct = timed(["iflag=direct"])  # first: O_DIRECT neither uses nor fills the page cache
    cached = page_cache_bytes(path)
    buffered = timed([])
    return {"bytes": size, "direct_s": direct, "cached_before_buffered": cached, "buffered_s": buffered}


def inspect_image(path: Path, since: float) -> dict[str, Any]:
    """First-start state in an exported image, from one read-only libguestfs launch."""
    from imgprep.libguestfs import open_guest

    traces = (artifacts.PREFIX, artifacts.UNIT_PATH, artifacts.wants_link("early"), artifacts.wants_link("legacy"))
    with open_guest([(path, "qcow2")], readonly=True, force_tcg=False) as g:

        def files_under(directory: str) -> list[str]:
            if not g.is_dir(directory):
                return []
            return sorted(directory + p for p in g.find(directory) if not g.is_dir(directory + p))

        # every non-directory under these trees whose mtime falls in the prepare boot
        by_dir: dict[str, list[str]] = defaultdict(list)
        for top in ("/etc", "/var", "/root", "/home", "/srv", "/opt", "/usr/local", "/tmp"):
            if g.is_dir(top):
                for rel in g.find(top):
                    full = top + rel
                    by_dir[os.path.dirname(full)].append(os.path.basename(full))
        written = []
        for directory, names in by_dir.items():
            for name, st in zip(names, g.g.lstatnslist(directory, names), strict=True):
                if st["st_mtime_sec"] >= since and (st["st_mode"] & 0o170000) != 0o040000:
                    written.append(f"{directory.rstrip('/')}/{name}")
        node_id = "/var/lib/demo-identity/node-id"
        return {
            "machine_id": g.read("/etc/machine-id").decode(errors="replace").strip(),
            "ssh_host_keys": sorted(p for p in g.ls("/etc/ssh") if p.startswith("ssh_host_")),
            "demo_node_id": g.read(node_id).decode(errors="replace").strip() if g.exists(node_id) else None,
            "etcd_files": files_under("/var/lib/etcd"),
            "redis_files": files_under("/var/lib/redis"),
            "nginx_lib": sorted(g.ls("/var/lib/nginx")) if g.is_dir("/var/lib/nginx") else [],
            "nginx_logs": {f: int(g.g.lstatns(f)["st_size"]) for f in files_under("/var/log/nginx")},
            "written_during_prepare": sorted(written),
            "imgprep_traces": [p for p in traces if g.exists(p)]
            + [f"/etc/systemd/system/{p}" for p in g.find("/etc/systemd/system") if "imgprep" in p],
        }


def qemu_size(path: Path) -> int:
    info = json.loads(run(["qemu-img", "info", "--force-share", "--output=json", str(path)]).stdout)
    return int(info["virtual-size"])


# --- one run ------------------------------------------------------------------------------------


def run_once(
    *,
    lv: Libvirt,
    image: GuestImage,
    base: Path,
    wrapper: Path,
    mode: str,
    index: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    name = f"{NAME_PREFIX}{mode}-{index}-{uuidlib.uuid4().hex[:6]}"
    workdir = Path(args.vm_dir) / name
    workdir.mkdir(parents=True)
    disk, console = workdir / "disk.qcow2", workdir / "console.log"
    shutil.copyfile(base, disk)
    raw: dict[str, Any] = {"mode": mode, "index": index, "vm": name, "nic": not args.no_nic}
    tail = ConsoleTail(console)
    load = LoadSampler()

    def alive() -> bool:
        return lv.active(name)

    with prototype(lv, name, prototype_xml(name, disk, console, image, not args.no_nic), workdir, args.keep):
        tail.start()
        load.start()
        try:
            # 1. the prototype's first boot: nothing has ever started its daemons
            raw["first_boot"] = {"start": time.time()}
            lv.call(name, lambda dom: dom.create())
            raw["first_boot"]["login"] = tail.wait_for("login:", raw["first_boot"]["start"], BOOT_TIMEOUT, alive)
            time.sleep(args.settle)
            # 2. imgprep create on the running prototype
            vm_uuid = lv.call(name, lambda dom: str(dom.UUIDString()))
            raw.update(run_imgprep(vm_uuid=vm_uuid, mode=mode, workdir=workdir, wrapper=wrapper, disk=disk, args=args))
            # 3. the prototype usable again: its login prompt after the restart
            restarted = metrics.step_times(raw.get("events", [])).get("restart_vm", {}).get("end")
            if restarted is not None and alive():
                raw["usable_again"] = tail.wait_for("login:", restarted, BOOT_TIMEOUT, alive)
        except Exception as exc:
            log.exception("run %s-%d failed", mode, index)
            raw["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                destroy(lv, name)
            raw["console"] = tail.stop()
            raw["load"] = load.stop()
            qemu_log = QEMU_LOG_DIR / f"{name}.log"
            raw["qemu_log"] = metrics.qemu_lifecycle(qemu_log.read_text(errors="replace")) if qemu_log.exists() else []
        # 4. after the job, nothing running: the read baseline and the image inspection
        raw["read_baseline"] = read_baseline(disk)
        image_file = (raw.get("summary") or {}).get("file")
        if image_file and Path(image_file).exists():
            raw["image"] = {"size": Path(image_file).stat().st_size}
            since = metrics.step_times(raw.get("events", [])).get("boot_prepare", {}).get("start", 0.0)
            try:
                raw["inspection"] = inspect_image(Path(image_file), since)
            except Exception as exc:
                log.exception("inspecting %s failed", image_file)
                raw.setdefault("error", f"inspection: {type(exc).__name__}: {exc}")
    raw["ok"] = "error" not in raw and raw.get("exit_code") == 0
    return raw


def run_imgprep(
    *, vm_uuid: str, mode: str, workdir: Path, wrapper: Path, disk: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """``imgprep create --json``, its events read as they come, then ``imgprep jobs get``."""
    out_dir = workdir / "out"
    out_dir.mkdir()
    env = {**os.environ, "IMGPREP_STATE_DIR": str(workdir / "state")}
    # --no-verify: the verification boot is not what this benchmark measures
    cmd = [sys.executable, "-m", "imgprep", "create", "--vm", vm_uuid, "--json", "--no-verify", "--mode", mode]
    cmd += ["--capture", args.capture]
    cmd += ["--output-dir", str(out_dir), "--script", str(wrapper), *TIMEOUTS]
    events: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    disk_info: dict[str, Any] = {"virtual_size": qemu_size(disk)}
    log.info("%s: %s", mode, " ".join(cmd))
    with (workdir / "imgprep.stderr").open("w") as stderr:
        start = time.time()
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
        assert proc.stdout is not None
        progress_kept = False
        for line in proc.stdout:
            if not line.startswith("{"):
                continue
            item = json.loads(line)
            if "event" not in item:
                summary = item
                continue
            if item["event"] == "progress":
                # keep the first and the last: they bracket qemu-img convert
                if progress_kept and float(item["percent"]) < 100:
                    continue
                progress_kept = True
            events.append(item)
            if item["event"] == "step" and item["step"] == "export" and item["status"] == "started":
                disk_info["allocated"] = disk.stat().st_blocks * 512
                disk_info["page_cache_at_export"] = page_cache_bytes(disk)
            elif item["event"] == "step" and item["status"] == "finished":
                log.info("  %s %s: %.1fs", mode, item["step"], item["elapsed"])
        code = proc.wait()
        end = time.time()
    record = None
    if summary.get("job_uuid"):
        got = run([sys.executable, "-m", "imgprep", "jobs", "get", summary["job_uuid"]], env=env, check=False)
        record = json.loads(got.stdout) if got.returncode == 0 else None
    result: dict[str, Any] = {
        "process": {"start": start, "end": end},
        "exit_code": code,
        "events": events,
        "summary": summary,
        "record": record,
        "disk": disk_info,
    }
    if code != 0:
        stderr_tail = (workdir / "imgprep.stderr").read_text(errors="replace").strip().splitlines()[-20:]
        message = (summary.get("error") or {}).get("message") or (stderr_tail[-1] if stderr_tail else "")
        result["error"] = f"imgprep create exited {code}: {message}"
        result["stderr_tail"] = stderr_tail
    return result


def derive(raw: dict[str, Any]) -> dict[str, Any]:
    """The per-run entry of the results file (the raw recording goes to raw/)."""
    record = raw.get("record") or {}
    return {
        "mode": raw["mode"],
        "index": raw["index"],
        "vm": raw["vm"],
        "ok": raw["ok"],
        "error": raw.get("error"),
        "timings": metrics.timings(raw),
        "timeline": metrics.timeline(raw),
        "correctness": metrics.correctness(raw),
        "unit_starts": metrics.daemon_starts(raw)["units"],
        "boot_report": record.get("boot_report"),
        "steps": {k: v.get("elapsed") for k, v in metrics.step_times(raw.get("events", [])).items()},
        "retries": [e for e in raw.get("events", []) if e.get("event") == "retry"],
        "disk": raw.get("disk"),
        "read_baseline": raw.get("read_baseline"),
        "inspection": raw.get("inspection"),
        "idle": raw.get("idle"),
        "load": raw.get("load"),
    }


# --- outputs ---------------------------------------------------------------------------------------


def write_outputs(out: Path, meta: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary = metrics.summarize(runs)
    results = {"meta": meta, "summary": summary, "runs": runs}
    (out / "early_vs_legacy.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    table = metrics.markdown_table(summary) + "\n" + metrics.limit_table(runs)
    compress = meta.get("compress_throughput")
    if compress:
        from benchmarks import compress_throughput

        table += "\nExport compression, imgprep against the bare compressor on the same raw bytes:\n\n"
        table += compress_throughput.markdown_table(compress)
    header = (
        f"Early vs legacy operator script, {summary['runs_ok']['early']}+{summary['runs_ok']['legacy']} runs "
        f"alternating, {meta['date']}, on {meta['cpus']} CPUs ({meta['cpu_model']}), "
        f"{meta['acceleration']}. Load average at the start of the runs: "
        f"{meta.get('load_summary', 'n/a')}.\n\n"
    )
    (out / "early_vs_legacy.md").write_text(header + table)
    if runs and any(r["ok"] for r in runs):
        from benchmarks import chart

        chart.draw(summary, meta, out / "early_vs_legacy.png")
    return summary


def measure_compression(base: Path, workdir: Path, sample_mb: int) -> dict[str, Any]:
    """imgprep's gzip/xz pipeline against the bare compressor, on a sample of the test
    disk flattened to raw (what the export compresses), with nothing else of ours running."""
    from benchmarks import compress_throughput

    raw = workdir / "compress-source.raw"
    try:
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(base), str(raw)], check=True, timeout=1800)
        sample = compress_throughput.slice_of(raw, sample_mb, workdir)
        raw.unlink()
        log.info("export compression: %d MB sample", sample.stat().st_size // 1_000_000)
        try:
            return compress_throughput.measure(sample)
        finally:
            sample.unlink(missing_ok=True)
    finally:
        raw.unlink(missing_ok=True)


def load_summary(runs: list[dict[str, Any]]) -> str:
    starts = [r["idle"]["loadavg_at_start"][0] for r in runs if r.get("idle")]
    foreign = sum(1 for r in runs if (r.get("load") or {}).get("max_foreign_qemu"))
    restarts = sum(1 for r in runs if (r.get("load") or {}).get("libvirtd_restarted"))
    text = f"1-min {min(starts):.2f}-{max(starts):.2f}" if starts else "n/a"
    text += f"; other QEMU processes seen during {foreign} of {len(runs)} runs"
    return text + (f"; libvirtd restarted by someone during {restarts} runs" if restarts else "")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.early_vs_legacy", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per mode (alternating early, legacy, ...)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="results directory")
    parser.add_argument("--vm-dir", type=Path, default=Path("/var/lib/imgprep-bench"), help="prototype disks")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds between login prompt and imgprep create")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=1200.0,
        help="before each run, wait up to this many seconds for other QEMU processes to finish (0: do not wait)",
    )
    parser.add_argument("--no-nic", action="store_true", help="no NIC and no network configuration in the guest")
    parser.add_argument(
        "--capture",
        choices=("in-place", "clone"),
        default="in-place",
        help="how imgprep captures the prototype (default in-place: the prepare boot keeps the prototype's NIC; "
        "a clone has none, so the legacy unit, after network.target, would wait for network-online's timeout)",
    )
    parser.add_argument(
        "--compress-sample-mb",
        type=int,
        default=256,
        help="export compression: MB of the flattened test disk's data to compress with imgprep and bare (0: skip)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the prototypes' disks and images")
    parser.add_argument("--render-only", action="store_true", help="redo table and chart from --out's JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        # derive again from the raw recordings, so that a change in metrics.py applies
        meta = json.loads((out / "early_vs_legacy.json").read_text())["meta"]
        raws = [json.loads(gzip.decompress(path.read_bytes())) for path in (out / "raw").glob("*.json.gz")]
        raws.sort(key=lambda r: (r["index"], metrics.MODES.index(r["mode"])))
        summary = write_outputs(out, meta, [derive(raw) for raw in raws])
        print(metrics.markdown_table(summary))
        return 0
    if os.geteuid() != 0:
        print("early_vs_legacy: run as root (it defines libvirt domains)", file=sys.stderr)
        return 2
    os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
    if os.environ.get("IMGPREP_USE_KVM") != "1":
        os.environ.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
    lv = Libvirt(LIBVIRT_URI)
    image = build()
    base = base_disk(image, args.vm_dir, not args.no_nic)
    wrapper = args.vm_dir / "operator-script-wrapper"
    wrapper.write_text(render_wrapper())
    wrapper.chmod(0o755)
    meta = host_facts(lv.conn())
    meta.update({"runs_per_mode": args.runs, "settle_s": args.settle, "nic": not args.no_nic, "capture": args.capture})
    (out / "raw").mkdir(exist_ok=True)
    runs: list[dict[str, Any]] = []
    for index in range(1, args.runs + 1):
        for mode in metrics.MODES:
            idle = wait_idle(args.wait_idle)
            log.info("run %d/%d, mode %s (load %s)", index, args.runs, mode, idle["loadavg_at_start"])
            try:
                raw = run_once(lv=lv, image=image, base=base, wrapper=wrapper, mode=mode, index=index, args=args)
            except Exception as exc:  # one broken run must not lose the others
                log.exception("run %s-%d failed", mode, index)
                raw = {"mode": mode, "index": index, "vm": "?", "ok": False, "error": f"{type(exc).__name__}: {exc}"}
            raw["idle"] = idle
            # everything recorded (console lines, events, inspection), for --render-only and for readers
            raw_file = out / "raw" / f"{mode}-{index}.json.gz"
            raw_file.write_bytes(gzip.compress(json.dumps(raw, indent=1, sort_keys=True).encode() + b"\n", mtime=0))
            runs.append(derive(raw))
            meta["load_summary"] = load_summary(runs)
            write_outputs(out, meta, runs)
    if args.compress_sample_mb:
        meta["compress_throughput"] = measure_compression(base, args.vm_dir, args.compress_sample_mb)
    summary = write_outputs(out, meta, runs)
    print(metrics.markdown_table(summary))
    failed = summary["runs_failed"]
    if failed:
        print(f"early_vs_legacy: {len(failed)} run(s) failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
