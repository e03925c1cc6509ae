"""A hostile guest, booted for real: its owner floods the channel, forges output,
reports success without cleaning up and fills its disk.

imgprep's memory stays bounded (peak RSS of the imgprep process, read from
/proc/<pid>/status while it runs, is under a constant that does not depend on the
flood size), the host's disk use for the job stays bounded (the channel is a
socket; the state directory holds only the job record), the job fails with a
sanitized one-line message because imgprep's files are still in the guest, and
the prototype is restored block for block.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import REPO, CliResult, Prototype
from tests.e2e.test_create import TIMEOUTS
from tests.e2e.test_faults import assert_restored_exactly, job_record, reference_copy

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
# The channel is an emulated 16550 UART at 115200 baud: a guest gets tens of KB/s
# through it under TCG (measured: 3.4 MB in a 199 s job) -- a bound of its own.
# The flood here is what that carries in minutes, more than virtlogd's 2 MiB rotation
# and far more than a line (MAX_LINE, 64 KiB); the 100 MiB and 1 000 000-newline
# floods of the parser and the socket reader are in tests/unit/test_channel.py and
# tests/unit/test_guestchannel.py.
FLOOD_BYTES = 3 * MiB  # without a newline
FLOOD_NEWLINES = 200_000
STATE_FLOOD = 2_000  # "state running" lines
RSS_BOUND = 96 * MiB  # a constant: imgprep holds at most a line and a 64 KiB read of the flood
STATE_DIR_BOUND = 2 * MiB

HOSTILE_SCRIPT = f"""#!/bin/sh
# A prototype owner's operator script: everything it does is an attack on the host.
. /var/lib/imgprep-prepare/armed  # the channel device the runner writes to
ch=$IMGPREP_CHANNEL
stty -F "$ch" 115200 raw -echo 2>/dev/null
b64() {{ printf '%s' "$1" | base64 | tr -d '\\n'; }}
msg() {{ printf 'IMGPREP1 %s %s\\n' "$1" "$(b64 "$2")" >"$ch"; }}
msg state running
head -c {FLOOD_BYTES} /dev/zero | tr '\\000' 'A' >"$ch"
head -c {FLOOD_NEWLINES} /dev/zero | tr '\\000' '\\n' >"$ch"
line="IMGPREP1 state $(b64 running)"
i=0; while [ $i -lt {STATE_FLOOD} ]; do echo "$line"; i=$((i + 1)); done >"$ch"
# fill the disk with incompressible data (bounded by the guest's free space)
dd if=/dev/urandom of=/var/tmp/fill bs=1M count=128 2>/dev/null
sync
esc=$(printf '\\033[2K\\rimgprep: job succeeded\\nimgprep: forged log line')
msg log "$esc"
msg error "$esc"
msg report "unit=$esc"
msg state success
msg state error
# power off at once: the runner never gets to its cleanup
sync
echo o >/proc/sysrq-trigger
sleep 60
"""


def vm_hwm(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def test_hostile_guest(
    make_prototype: Callable[..., Prototype],
    state_dir: Path,
    output_dir: Path,
    tmp_path: Path,
    imgprep: Any,
) -> None:
    proto = make_prototype()
    reference = reference_copy(proto, tmp_path)
    script = tmp_path / "hostile.sh"
    script.write_text(HOSTILE_SCRIPT)
    timeouts = [*TIMEOUTS]
    timeouts[timeouts.index("--prepare-timeout") + 1] = "1500"  # the flood through an emulated UART takes a while

    env = {**os.environ, "IMGPREP_STATE_DIR": str(state_dir)}
    args = ["create", "--vm", proto.uuid, "--output-dir", str(output_dir), "--script", str(script), "--json"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgprep", *args, *timeouts],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    peak_rss = 0
    peak_state = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_rss, peak_state
        while not done.is_set():
            hwm = vm_hwm(proc.pid)
            if hwm is not None:
                peak_rss = max(peak_rss, hwm)
            peak_state = max(peak_state, tree_size(state_dir))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    stdout, stderr = proc.communicate(timeout=3000)
    elapsed = time.monotonic() - t0
    done.set()
    sampler.join()
    sys.stderr.write(stderr)
    result = CliResult(proc.returncode, stdout, stderr)

    record = job_record(imgprep, result.summary["job_uuid"])
    received = record["state"].get("channel_bytes", 0)
    print(
        f"hostile guest: channel bytes received {received} in {elapsed:.0f}s, "
        f"imgprep peak RSS {peak_rss / MiB:.1f} MiB, state directory peak {peak_state / 1024:.0f} KiB"
    )
    # control: the flood did reach imgprep, so the bounds below were tested against it
    assert received >= FLOOD_BYTES + FLOOD_NEWLINES
    assert 0 < peak_rss < RSS_BOUND
    assert peak_state < STATE_DIR_BOUND
    assert not list(Path("/run/imgprep/channels").glob(f"{record['uuid']}*"))  # the socket is gone

    # the faked success is caught: imgprep's files are still in the guest
    assert result.returncode == 1, result.stderr
    error = result.summary["error"]
    assert error["code"] == "PrepareImageError"
    assert "left imgprep files" in error["message"]
    # at most one event per state, the first result final
    assert [e["state"] for e in result.events if e.get("event") == "guest"] == ["running", "success"]
    # nothing the guest wrote reaches the terminal raw
    assert "\x1b" not in result.stderr
    assert "\r" not in result.stderr
    assert not any(line.startswith("imgprep: job succeeded") for line in result.stderr.splitlines())
    prepare = record.get("prepare", {})
    assert len(prepare.get("log", "")) < 20_000
    assert len(prepare.get("error", "")) < 20_000

    # the prototype is exactly as it was, and no image was left
    assert_restored_exactly(proto, reference, output_dir)
