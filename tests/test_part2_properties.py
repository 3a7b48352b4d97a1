"""Property tests of SPEC part two's state: lifecycle entries and access-key first-seen times survive the
changelog (restart, rebalance) exactly; a first-use reset (§13) behaves as a fresh baseline for the records
after it."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_engine_decisions import AWS, REGISTRY, issuance, rec
from test_part2_engine import I, J, associate, ec2_call, state_change

from detector.core import DetectorState, Engine, EngineConfig, changelog
from detector.core.engine import AFTER_STOP, INSIDE_AWS
from detector.core.records import classify

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INSTANCES = (I, J)
KEYS = ("ASIAKEYAAAAAAAAAAAA1", "ASIAKEYBBBBBBBBBBBB2", "ASIAKEYCCCCCCCCCCCC3", "SHORTKEY")
_ids = itertools.count(1)


def at(seconds: int) -> str:
    return f"2026-11-09T{8 + seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}Z"


def _event(kind: str, instance: str, seconds: int, key: str, address: str) -> dict[str, Any]:
    when = at(seconds)
    if kind == "use":
        return rec(address, instance=instance, time=when, access_key=key, account="555566667777")
    if kind == "issue":
        return issuance(instance, key=key, time=when, account="555566667777")
    if kind == "stop":
        return ec2_call("StopInstances", [instance], when)
    if kind == "terminate":
        return state_change(instance, "terminated", when)
    if kind == "start":
        return ec2_call("StartInstances", [instance], when)
    return associate(instance, when)


events = st.builds(
    _event,
    st.sampled_from(["use", "use", "use", "issue", "stop", "terminate", "start", "associate"]),
    st.sampled_from(INSTANCES),
    st.integers(0, 5 * 3600),  # out of order on purpose
    st.sampled_from(KEYS),
    st.sampled_from(["52.10.0.1", "52.10.0.2", "8.8.8.8", "2600:1f00::1"]),
)


def records_of(value: dict[str, Any]) -> list[dict[str, Any]]:
    return classify(value).records


@SETTINGS
@given(st.lists(events, min_size=1, max_size=40), st.integers(1, 40))
def test_lifecycle_and_key_times_survive_the_changelog(stream: list[dict[str, Any]], cut: int) -> None:
    """Restore from the changelog at any point: the replica continues exactly as the original."""
    config = EngineConfig(session_ttl_seconds=4 * 3600)
    engine = Engine(REGISTRY, AWS, stop_grace_seconds=300)
    original = DetectorState(config, track_changes=True)
    replica = DetectorState(config)
    for value in stream[:cut]:
        for record in records_of(value):
            engine.apply(original, record)
        for key, data in changelog.drain(original):
            changelog.apply_record(replica, key, data)
    assert replica.lifecycle == original.lifecycle
    assert {k: s.to_data() for k, s in replica.sessions.items()} == {k: s.to_data() for k, s in original.sessions.items()}
    # both continue alike (a fresh engine for the replica: memo tables are not state)
    other = Engine(REGISTRY, AWS, stop_grace_seconds=300)
    replica.groups = {gid: g.__class__.from_data(g.to_data()) for gid, g in original.groups.items()}
    for value in stream[cut:]:
        for record in records_of(value):
            a = [(c.group.id, c.group.count) for c in engine.apply(original, record)]
            b = [(c.group.id, c.group.count) for c in other.apply(replica, record)]
            assert a == b
    assert replica.lifecycle == original.lifecycle


@SETTINGS
@given(st.lists(st.one_of(st.sampled_from(["52.10.0.1", "52.10.0.2", "52.10.0.3"]), st.just("reset")), max_size=30))
def test_a_reset_starts_first_use_afresh(stream: list[str]) -> None:
    """Model: the first AWS address after the session's start or after a reset is trusted; any other is a
    finding until the next reset."""
    engine, state = Engine(REGISTRY, AWS), DetectorState()
    expected = 0
    baseline = None
    count = 0
    for i, item in enumerate(stream):
        if item == "reset":
            engine.apply(state, ec2_call("StartInstances", [I], at(i)))
            baseline = None
            continue
        changes = engine.apply(state, rec(item, account="555566667777", time=at(i)))
        count += sum(c.group.type == INSIDE_AWS for c in changes)
        if baseline is None:
            baseline = item
        elif item != baseline:
            expected += 1
    assert count == expected


@SETTINGS
@given(st.lists(events, min_size=1, max_size=40))
def test_after_stop_needs_a_stop_signal_and_a_non_service_origin(stream: list[dict[str, Any]]) -> None:
    """No AfterInstanceStopped finding ever opens for an instance without a stop signal before it."""
    engine, state = Engine(REGISTRY, AWS, stop_grace_seconds=300), DetectorState()
    stopped: set[str] = set()
    for value in stream:
        for record in records_of(value):
            if record.get("eventName") == "StopInstances" or record.get("detail", {}).get("state") == "terminated":
                stopped.update(i["instanceId"] for i in record.get("requestParameters", {}).get("instancesSet", {}).get("items", []))
                if "detail" in record:
                    stopped.add(record["detail"]["instance-id"])
            for change in engine.apply(state, record):
                if change.group.type == AFTER_STOP:
                    assert change.group.instance_id in stopped
                    evidence = change.group.evidence
                    assert evidence["instanceState"] in ("stopped", "terminated")
