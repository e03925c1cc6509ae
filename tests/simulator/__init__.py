"""A SmartOS compute-node SIMULATOR for the tests (no SmartOS machine is available here).

A real SSH server on 127.0.0.1 (:mod:`.server`) in front of a simulated global zone
(:mod:`.node`): ``vmadm``, ``zfs``, ``imgadm`` and ``sysinfo`` with the semantics of
their manual pages over directories standing in for ZFS datasets, and a zone "boot"
that orders the zone's SMF manifests with ``tests.smf_model`` and really runs the
start methods it finds (imgprep's), with fake in-zone commands (:mod:`.fakebin`).
It is a simulation: what it cannot show is listed in docs/smartos-backend.md.
"""

from tests.simulator.node import (
    BootRecord,
    ComputeNode,
    Faults,
    open_stream,
    read_send_stream,
    read_volume_stream,
    tree_digest,
)
from tests.simulator.server import SshSimulator, write_known_hosts

__all__ = [
    "BootRecord",
    "ComputeNode",
    "Faults",
    "SshSimulator",
    "open_stream",
    "read_send_stream",
    "read_volume_stream",
    "tree_digest",
    "write_known_hosts",
]
