"""Probing the prototype's guest agent, with a fake domain, clock and ping."""

from __future__ import annotations

from typing import Any

import libvirt

from imgprep.guestagent import AgentProbe, channel_state, probe

WITH_CHANNEL = """<domain><devices>
  <channel type='unix'><source mode='bind' path='/run/x.sock'/>
    <target type='virtio' name='org.qemu.guest_agent.0' state='{state}'/></channel>
  <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>
</devices></domain>"""
WITHOUT = (
    "<domain><devices><channel type='spicevmc'>"
    "<target type='virtio' name='com.redhat.spice.0'/></channel></devices></domain>"
)


class Dom:
    def __init__(self, *xmls: str) -> None:
        self.xmls = list(xmls)

    def XMLDesc(self, _flags: int) -> str:
        return self.xmls.pop(0) if len(self.xmls) > 1 else self.xmls[0]


class Clock:
    """A fake monotonic clock: sleeping and pinging advance it."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def pinger(clock: Clock, answers_at: float | None, calls: list[int]) -> Any:
    """A ping that times out (costing its whole bound) until ``answers_at``."""

    def ping(_dom: Any, timeout: int) -> bool:
        calls.append(timeout)
        if answers_at is not None and clock.now >= answers_at:
            clock.now += 0.05
            return True
        clock.now += timeout
        return False

    return ping


def test_the_channel_state_is_read_from_the_live_xml() -> None:
    assert channel_state(WITH_CHANNEL.format(state="connected")) == "connected"
    assert channel_state(WITH_CHANNEL.format(state="disconnected")) == "disconnected"
    assert channel_state(WITH_CHANNEL.replace(" state='{state}'", "")) == ""
    assert channel_state(WITHOUT) is None


def test_no_channel_is_absent_without_a_ping() -> None:
    clock, calls = Clock(), list[int]()
    result = probe(Dom(WITHOUT), 10, ping=pinger(clock, 0, calls), clock=clock, sleep=clock.sleep)
    assert result == AgentProbe("absent", None, 0.0)
    assert calls == []


def test_an_answering_agent_answers_at_the_first_ping() -> None:
    clock, calls = Clock(), list[int]()
    dom = Dom(WITH_CHANNEL.format(state="connected"))
    result = probe(dom, 10, ping=pinger(clock, 0, calls), clock=clock, sleep=clock.sleep)
    assert result.answer == "answers"
    assert calls == [5]  # bounded by the wait and by what libvirt's sync allows
    assert clock.sleeps == []


def test_an_agent_still_starting_is_waited_for() -> None:
    clock, calls = Clock(), list[int]()
    dom = Dom(WITH_CHANNEL.format(state="disconnected"))  # (a not yet started agent pings fail at once)

    def ping(_dom: Any, timeout: int) -> bool:
        calls.append(timeout)
        return clock.now >= 104

    result = probe(dom, 30, ping=ping, clock=clock, sleep=clock.sleep)
    assert result.answer == "answers"
    assert len(calls) == 5
    assert clock.sleeps == [1.0] * 4


def test_a_hung_agent_costs_at_most_the_wait() -> None:
    clock, calls = Clock(), list[int]()
    dom = Dom(WITH_CHANNEL.format(state="connected"))
    result = probe(dom, 14, ping=pinger(clock, None, calls), clock=clock, sleep=clock.sleep)
    assert result.answer == "silent"
    assert result.channel_state == "connected"
    assert calls == [5, 5, 2]  # each ping bounded by what is left of the wait
    assert clock.now - 100 == 14
    assert "did not answer within 14s" in result.describe()
    assert "hung or busy" in result.describe()


def test_a_stopped_agent_is_named_as_not_running() -> None:
    clock, calls = Clock(), list[int]()
    dom = Dom(WITH_CHANNEL.format(state="connected"), WITH_CHANNEL.format(state="disconnected"))
    result = probe(dom, 3, ping=pinger(clock, None, calls), clock=clock, sleep=clock.sleep)
    assert result.answer == "silent"
    assert result.channel_state == "disconnected"  # read again at the end
    assert "not running in the guest" in result.describe()


def test_a_failing_reread_keeps_the_first_state() -> None:
    class Flaky(Dom):
        def __init__(self) -> None:
            super().__init__(WITH_CHANNEL.format(state="connected"))
            self.reads = 0

        def XMLDesc(self, _flags: int) -> str:
            self.reads += 1
            if self.reads > 1:
                raise libvirt.libvirtError("connection lost")
            return super().XMLDesc(0)

    clock, calls = Clock(), list[int]()
    result = probe(Flaky(), 2, ping=pinger(clock, None, calls), clock=clock, sleep=clock.sleep)
    assert (result.answer, result.channel_state) == ("silent", "connected")
