"""Is the prototype's QEMU guest agent there, and does it answer? (docs/capture.md,
*The guest agent*.)

Three answers, because they call for different captures:

* ``absent``: the domain's live definition has no agent channel
  (``org.qemu.guest_agent.0``): no agent can ever answer; ``auto`` stops the prototype.
* ``answers``: a ``guest-ping`` came back; ``auto`` freezes.
* ``silent``: the channel is there but no ping came back within the wait (the agent is
  not started yet, stopped, or hung). ``auto`` refuses rather than stop a prototype its
  operator expects to be frozen for milliseconds.

The wait pings again until the deadline, each ping bounded by what is left of it, so
an agent still starting gets the whole wait and a hung one costs at most the wait.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any, Literal

import libvirt

from imgprep import pointintime as pit

AGENT_CHANNEL = "org.qemu.guest_agent.0"
PING_INTERVAL = 1.0  # seconds between pings of a silent agent
MAX_PING = 5  # seconds one ping may take (libvirt's own guest-sync waits at most 5 s)

AgentAnswer = Literal["answers", "silent", "absent"]


@dataclasses.dataclass(frozen=True)
class AgentProbe:
    answer: AgentAnswer
    channel_state: str | None  # the live XML's view of the guest side: connected, disconnected, None
    waited_s: float

    def describe(self) -> str:
        """Why a silent agent is silent, as far as the host can tell."""
        if self.answer != "silent":
            return f"the guest agent {'answers' if self.answer == 'answers' else 'has no channel'}"
        if self.channel_state == "disconnected":
            why = "its channel is disconnected: the agent is not running in the guest"
        elif self.channel_state == "connected":
            why = "its channel is connected: the agent is hung or busy"
        else:
            why = "libvirt does not say whether the guest opened its channel"
        return f"the guest agent did not answer within {self.waited_s:.0f}s ({why})"


def channel_state(live_xml: str) -> str | None:
    """``None`` when the domain has no agent channel; otherwise libvirt's ``state`` of
    it (``connected``/``disconnected``; ``""`` when libvirt does not report one)."""
    for target in ET.fromstring(live_xml).findall("./devices/channel/target"):
        if target.get("type") == "virtio" and target.get("name") == AGENT_CHANNEL:
            return target.get("state", "")
    return None


def probe(
    dom: Any,
    wait: float,
    *,
    ping: Callable[[Any, int], bool] = pit.agent_answers,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> AgentProbe:
    """Wait up to ``wait`` seconds for the running prototype's agent to answer a ping."""
    start = clock()
    state = channel_state(dom.XMLDesc(0))
    if state is None:
        return AgentProbe("absent", None, 0.0)
    deadline = start + wait
    while True:
        left = deadline - clock()
        if ping(dom, max(1, min(MAX_PING, int(left)))):
            return AgentProbe("answers", "connected", round(clock() - start, 1))
        if clock() + PING_INTERVAL >= deadline:
            break
        sleep(PING_INTERVAL)
    with contextlib.suppress(libvirt.libvirtError):  # the agent may have closed its port meanwhile
        state = channel_state(dom.XMLDesc(0))
    return AgentProbe("silent", state, round(clock() - start, 1))
