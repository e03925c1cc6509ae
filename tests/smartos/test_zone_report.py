"""The boot report of joyent zones: the SMF method reports (imgprep:report) which services
``svcs`` showed online when the operator script started and the times since the zone
booted; the backend stores it in the job record and ``imgprep jobs get`` shows it.

Against the simulator: its svc.startd brings instances online in SMF dependency order
and writes their states for the fake ``svcs`` before the method runs; ``kstat`` gives the
boot time the simulator recorded at ``vmadm start``. So this proves imgprep's plumbing
(method -> metadata -> record -> CLI) and that the report agrees with the simulated
boot; what a real svc.startd shows needs a real compute node."""

from __future__ import annotations

import json

from tests.smartos.conftest import Node, summary
from tests.smartos.test_backend import FS_MINIMAL, HELD, OP, record


def test_the_zone_boot_report_proves_the_ordering_and_jobs_get_shows_it(sim: Node) -> None:
    uuid = sim.zone(running=True)
    code, out, err = sim.create(uuid)
    assert code == 0, err

    report = record(sim, out)["boot_report"]
    prepare = sim.node.boots(uuid)[1]
    assert report["clock"] == "zone"
    assert report["unit"] == OP
    assert report["script_exit"] == 0
    # what svcs showed when the script started: what the simulated boot had started
    assert FS_MINIMAL in report["services"]  # the control: the report does list services
    assert set(report["services"]) <= set(prepare.started) - {OP}
    for service in HELD:
        assert service not in report["services"]
    assert report["late_services"] == []
    assert report["targets"]["svc:/system/filesystem/local:default"] == "offline"
    assert report["targets"]["svc:/milestone/multi-user:default"] == "offline"
    assert report["zone_boot_time"] == str(prepare.booted_at)
    timeline = report["timeline_ms"]
    assert None not in (timeline["unit_start"], timeline["script_start"], timeline["script_end"])
    assert timeline["unit_start"] <= timeline["script_start"] <= timeline["script_end"] <= timeline["finish"]

    job = summary(out)["job_uuid"]
    code, shown, shown_err = sim.cli("jobs", "--config", str(sim.config), "get", job)
    assert code == 0, shown_err
    assert json.loads(shown)["boot_report"] == report
    assert "boot report (time since the zone booted, 1 s resolution):" in shown_err
    assert "of those, regular services  none" in shown_err
    assert FS_MINIMAL in shown_err
