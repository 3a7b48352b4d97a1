"""The binary changelog values (issue 11): drain -> apply_record rebuilds every kind of entry exactly, and
values written by the previous version (JSON) still restore, alone or mixed with new ones."""

from __future__ import annotations

import gc
from collections import namedtuple
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detector.core import changelog
from detector.core.state import (
    LIFECYCLE_PREFIX,
    DetectorState,
    EngineConfig,
    FindingGroup,
    _pack_any,
    instance_bits,
    instance_text,
    parse_session_key,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ROLES = ("web", "aws:ec2-instance", "batch.worker")
INSTANCE_IDS = ("i-0123456789abcdef0", "i-0fedcba9876543210", "i-1234abcd", "i-00000000000000001")
KEYS = [f"arn:aws:sts::111122223333:assumed-role/{r}/{i}" for r in ROLES for i in INSTANCE_IDS] + [
    "arn:aws-cn:sts::444455556666:assumed-role/web/i-0123456789abcdef0",
    "not-an-instance-session",  # kept as its string by the index
]
ACCESS_KEYS = ("ASIAAAAAAAAAAAAAAAAA", "ASIABBBBBBBBBBBBBBBB", "ASIACCCCCCCCCCCCCCCC", "AKIAshort", "x" * 21)
TIMES = st.one_of(st.none(), st.floats(0, 1e9, allow_nan=False))

OPS = st.one_of(
    st.tuples(st.just("time"), st.floats(0, 1e6, allow_nan=False)),
    st.tuples(st.just("touch"), st.sampled_from(KEYS)),
    st.tuples(st.just("access_key"), st.sampled_from(KEYS), st.sampled_from(ACCESS_KEYS), TIMES),
    st.tuples(st.just("delivery"), st.sampled_from(KEYS), st.sampled_from(["1.0", "2.0", "9", ""])),
    st.tuples(
        st.just("endpoint"), st.sampled_from(KEYS), st.sampled_from(["vpce-1", "vpce-2", "vpce-3"]),
        st.sampled_from([None, "111122223333"]),
    ),  # fmt: skip
    st.tuples(st.just("address"), st.sampled_from(KEYS), st.sampled_from(["52.1.2.3", "10.0.0.1", "2600:1f18::1", ""])),
    st.tuples(
        st.just("tofu"), st.sampled_from(KEYS), st.sampled_from([None, "52.94.76.1", "1.2.3.04", "0.0.0.0"]),
        st.sampled_from([None, "2600:1f18::1"]),
    ),  # fmt: skip
    st.tuples(st.just("groups"), st.sampled_from(KEYS), st.lists(st.sampled_from(["g1", "g2", "g3"]), max_size=3)),
    st.tuples(st.just("parts"), st.sampled_from(KEYS), st.sampled_from(["renamed", "web"])),
    st.tuples(st.just("pop"), st.sampled_from(KEYS)),
    st.tuples(st.just("finding"), st.sampled_from(["g1", "g2", "g3"]), st.integers(1, 9), st.booleans()),
    st.tuples(st.just("drop_finding"), st.sampled_from(["g1", "g2", "g3"])),
    st.tuples(st.just("stop"), st.sampled_from(INSTANCE_IDS), st.floats(0, 1e6), st.sampled_from(["stopped", "terminated"])),
    st.tuples(st.just("start"), st.sampled_from(INSTANCE_IDS), st.floats(0, 1e6)),
    st.tuples(st.just("reset"), st.sampled_from(INSTANCE_IDS), st.floats(0, 1e6), st.sampled_from(["e1", "e2", None])),
    st.tuples(st.just("drain"),),
)


def _group(gid: str, count: int, part_two: bool) -> FindingGroup:
    group = FindingGroup(
        id=gid, type="UnauthorizedAccess:IAMUser/InstanceCredentialExfiltration.OutsideAWS",
        session_key=KEYS[0], remote_account=None, affiliated=False, severity=8, count=count, first_ts=1.5,
        last_ts=2.5 + count, account="111122223333", region="us-east-1", partition="aws", role="web",
        instance_id=INSTANCE_IDS[0], access_key_id=ACCESS_KEYS[0], principal_id="AROA:i-0123", api="GetObject",
        service_name="s3.amazonaws.com", ip="198.51.100.7", origin="outside", vpce=None,
        remote_addresses=["198.51.100.7"], baseline={"addresses": ["52.1.2.3"], "firstUseIpv4": None},
        deliveries=["2.0"], created_at="2026-11-30T00:00:00Z", updated_at="2026-11-30T00:00:01Z",
        event_ids=[f"e{i}" for i in range(count)], version=count, api_calls={"s3\x1fGetObject": count},
    )  # fmt: skip
    if part_two:
        group.other_instance = INSTANCE_IDS[1]
        group.evidence = {"stoppedAt": 1.0, "nested": {"x": [1, 2.5, None, "y"]}}
        group.error_codes = {"AccessDenied": 1}
    return group


def _run(state: DetectorState, ops: list[tuple[Any, ...]], log: list[tuple[bytes, bytes | None]]) -> None:
    ix = state.sessions
    for op, *args in ops:
        if op == "time":
            state.advance(args[0])
        elif op == "touch":
            (key,) = args
            parsed = parse_session_key(key)
            parts = ("i-00000000", "000000000000", "odd", "aws") if parsed is None else (parsed[4], parsed[2], parsed[3], parsed[1])
            state.session(key, *parts)
        elif op == "drain":
            log.extend(changelog.drain(state))
        elif op == "finding":
            state.groups[args[0]] = group = _group(*args)
            state.note_group(group)
        elif op == "drop_finding":
            if state.groups.pop(args[0], None) is not None:
                state.removed.add("g:" + args[0])
                state.changed.discard("g:" + args[0])
        elif op == "stop":
            state.stop_signal(instance_bits(args[0]), args[1], args[2])  # type: ignore[arg-type]
        elif op == "start":
            state.start_signal(instance_bits(args[0]), args[1])  # type: ignore[arg-type]
        elif op == "reset":
            state.reset_signal(instance_bits(args[0]), args[1], args[2])  # type: ignore[arg-type]
        else:
            key = args[0]
            s = ix.slot(key)
            if s is None:
                continue
            state.changed.add(key)
            if op == "access_key":
                ix.add_access_key(s, args[1], args[2])
            elif op == "delivery":
                ix.add_delivery(s, args[1])
            elif op == "endpoint":
                ix.add_endpoint(s, args[1], args[2])
            elif op == "address":
                ix.add_address(s, args[1])
            elif op == "tofu":
                ix.set_tofu_v4(s, args[1])
                ix.set_tofu_v6(s, args[2])
            elif op == "groups":
                ix.set_groups(s, tuple(args[1]))
            elif op == "parts":
                instance, account, _, partition = ix.parts(s)
                ix.set_parts(s, (instance, account, args[1], partition))
            elif op == "pop":
                del ix[key]
                state.changed.discard(key)
                state.removed.add(key)
    log.extend(changelog.drain(state))


def _snapshot(state: DetectorState) -> tuple[Any, ...]:
    ix = state.sessions
    return (
        {k: v.to_data() for k, v in ix.items()},
        {k: v.to_data() for k, v in state.groups.items()},
        dict(state.lifecycle),
        state.stream_time,
    )


def _first_seen(state: DetectorState) -> dict[str, tuple[Any, ...]]:
    ix = state.sessions
    return {k: tuple(ix.key_first_seen(ix.slot(k), a) for a in ACCESS_KEYS) for k in ix}  # type: ignore[arg-type]


def _json_value(state: DetectorState, key: bytes) -> bytes | None:
    """The value the previous version wrote for ``key``: JSON of the entry's plain data."""
    name = key.decode()
    if name.startswith("g:"):
        group = state.groups.get(name[2:])
        return None if group is None else orjson.dumps(group.to_data())
    if name.startswith(LIFECYCLE_PREFIX):
        entry = state.lifecycle.get(instance_bits(name[2:]))  # type: ignore[arg-type]
        return None if entry is None else orjson.dumps(entry)
    session = state.sessions.get(name[2:])
    return None if session is None else orjson.dumps(session.to_data())


@SETTINGS
@given(st.lists(OPS, max_size=50))
def test_drain_then_apply_rebuilds_every_entry_exactly(ops: list[tuple[Any, ...]]) -> None:
    config = EngineConfig(session_ttl_seconds=1e7, max_sessions=6)
    live = DetectorState(config, track_changes=True)
    log: list[tuple[bytes, bytes | None]] = []
    _run(live, ops, log)
    restored = DetectorState(config)
    for key, value in log:
        changelog.apply_record(restored, key, value)
    assert _snapshot(restored)[:3] == _snapshot(live)[:3]
    assert _first_seen(restored) == _first_seen(live)
    if restored.sessions:
        assert restored.stream_time == max(s.last_seen for s in live.sessions.values()) or live.lifecycle
    # the batch path gives the same state, and restores LRU order too when each key is written once
    Message = namedtuple("Message", "key value headers")
    batched = DetectorState(config)
    applied, skipped = changelog.apply_records(
        batched, [Message(k, v, [(changelog.OFFSET_HEADER, b"3")]) for k, v in log], committed=4
    )
    assert (applied, skipped) == (len(log), 0)
    assert _snapshot(batched) == _snapshot(restored)
    assert list(batched.sessions) == list(restored.sessions)


@SETTINGS
@given(st.lists(OPS, max_size=50), st.integers(0, 3))
def test_values_of_the_previous_version_still_restore(ops: list[tuple[Any, ...]], mix: int) -> None:
    """A changelog written as JSON (before issue 11) restores to the same state; so does one where new
    binary values follow old ones for the same keys (an upgrade mid-log)."""
    config = EngineConfig(session_ttl_seconds=1e7, max_sessions=6)
    live = DetectorState(config, track_changes=True)
    log: list[tuple[bytes, bytes | None]] = []
    _run(live, ops, log)
    old = [(k, None if v is None else _json_value(live, k)) for k, v in log]
    restored = DetectorState(config)
    for key, value in old[: len(old) * mix // 3]:
        changelog.apply_record(restored, key, value)
    for key, value in log[len(log) * mix // 3 :]:
        changelog.apply_record(restored, key, value)
    assert _snapshot(restored)[:3] == _snapshot(live)[:3]
    assert _first_seen(restored) == _first_seen(live)


def test_json_values_of_every_kind_restore() -> None:
    state = DetectorState(track_changes=True)
    state.advance(100.0)
    s = state.touch(KEYS[0], _pack_any(KEYS[0]))
    state.sessions.add_access_key(s, ACCESS_KEYS[0], 50.0)
    state.sessions.add_access_key(s, ACCESS_KEYS[1], 60.0)
    state.sessions.set_groups(s, ("g1",))
    state.groups["g1"] = _group("g1", 2, True)
    state.note_group(state.groups["g1"])
    state.stop_signal(instance_bits(INSTANCE_IDS[0]), 90.0, "stopped")  # type: ignore[arg-type]
    state.reset_signal(instance_bits(INSTANCE_IDS[0]), 95.0, "e1")  # type: ignore[arg-type]
    keys = [k for k, _ in changelog.drain(state)]
    old = [(k, _json_value(state, k)) for k in keys]
    assert {v[:1] for _, v in old} <= {b"{", b"["}
    restored = DetectorState()
    for k, v in old:
        changelog.apply_record(restored, k, v)
    assert _snapshot(restored) == _snapshot(state)
    assert restored.sessions.key_times(restored.sessions.slot(KEYS[0])) == (50.0, 60.0)  # type: ignore[arg-type]


def test_values_are_binary_and_small() -> None:
    state = DetectorState(track_changes=True)
    state.advance(10.0)
    s = state.touch(KEYS[0], _pack_any(KEYS[0]))
    state.sessions.add_access_key(s, ACCESS_KEYS[0], 10.0)
    state.sessions.set_tofu_v4(s, "52.94.76.1")
    ((key, value),) = changelog.drain(state)
    assert value is not None and value[0] == changelog.COLUMNS and len(value) == 50
    assert key == b"s:" + KEYS[0].encode()


def test_a_value_of_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown format"):
        changelog.apply_record(DetectorState(), b"g:x", b"\x7fjunk")
    with pytest.raises(ValueError, match="not an instance session"):
        changelog.apply_record(DetectorState(), b"s:not-an-instance-session", b"\x01" + bytes(49))


def test_offsets_are_read_from_the_header_and_filter() -> None:
    Message = namedtuple("Message", "key value headers")
    state = DetectorState()
    value = orjson.dumps(_group("g1", 1, False).to_data())
    msgs = [
        Message(b"g:g1", value, [(changelog.OFFSET_HEADER, b"5")]),  # uncommitted: skipped
        Message(b"g:g2", value, [("other", b"x"), (changelog.OFFSET_HEADER, b"2")]),
        Message(b"g:g3", value, [(changelog.OFFSET_HEADER, b" 7")]),  # int() reads it: 7, skipped
        Message(b"g:g4", value, None),  # no offset: applied
        Message(b"g:g5", value, [(changelog.OFFSET_HEADER, None)]),  # a null header value: no offset
    ]
    assert changelog.apply_records(state, msgs, committed=5) == (3, 2)
    assert sorted(state.groups) == ["g2", "g4", "g5"]
    assert gc.isenabled()  # paused during the batch only
    with pytest.raises(ValueError):
        changelog.apply_records(state, [Message(b"x:", b"{}", None)], committed=5)
    assert gc.isenabled()
    assert instance_text(instance_bits(INSTANCE_IDS[2])) == INSTANCE_IDS[2]  # type: ignore[arg-type]
