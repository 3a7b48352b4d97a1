"""The compact session index (detector.core.state): same behaviour as a mapping of plain sessions.

A reference model — an ``OrderedDict`` of detached ``Session`` objects driven by the same operations —
must agree with the index after every step: keys in LRU order, every field (``to_data``), TTL expiry and
LRU eviction counts, and the changes tracked for the changelog.
"""

from __future__ import annotations

import gc
from collections import OrderedDict
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.core.state import (
    MAX_ACCESS_KEYS,
    DetectorState,
    EngineConfig,
    Session,
    SessionIndex,
    key_string,
    pack_key,
    parse_session_key,
)

PARTITIONS = st.sampled_from(["aws", "aws-cn", "aws-us-gov", "aws-iso-b"])
ACCOUNTS = st.from_regex(r"[0-9]{12}", fullmatch=True)
ROLES = st.from_regex(r"[\w+=,.@-]{1,40}", fullmatch=True)
INSTANCES = st.one_of(st.from_regex(r"i-[0-9a-f]{17}", fullmatch=True), st.from_regex(r"i-[0-9a-f]{8}", fullmatch=True))


def arn(partition: str, account: str, role: str, instance: str) -> str:
    return f"arn:{partition}:sts::{account}:assumed-role/{role}/{instance}"


@given(PARTITIONS, ACCOUNTS, ROLES, INSTANCES)
def test_packed_keys_round_trip(partition: str, account: str, role: str, instance: str) -> None:
    key = arn(partition, account, role, instance)
    parsed = parse_session_key(key)
    assert parsed is not None
    packed, *parts = parsed
    assert parts == [partition, account, role, instance]
    assert packed == pack_key(partition, account, role, instance)
    assert key_string(packed) == key


@pytest.mark.parametrize(
    "key",
    [
        "arn:aws:sts::123456789012:assumed-role/web/i-0123456789ABCDEF0",  # upper-case hex: not an instance
        "arn:aws:sts::123456789012:assumed-role/web/i-0123456",
        "arn:aws:iam::123456789012:role/web",
        "arn:aws:sts::123456789012:assumed-role/web/i-0123456789abcdef0/extra",
    ],
)
def test_non_instance_arns_do_not_pack(key: str) -> None:
    assert parse_session_key(key) is None


def test_leading_zero_instance_ids_keep_their_digits() -> None:
    for instance in ("i-00000000", "i-00000000000000000", "i-0000000000000000f", "i-fffffffffffffffff"):
        key = arn("aws", "000000000000", "r", instance)
        s = DetectorState()
        s.session(key, instance, "000000000000", "r", "aws")
        assert list(s.sessions) == [key]
        assert s.sessions[key].instance_id == instance


# --- the index against a model of plain sessions --------------------------------------------------

KEYS = [arn("aws", "111122223333", "web", f"i-{n:017x}") for n in range(6)] + [
    arn("aws-cn", "444455556666", "batch+x", "i-0a0b0c0d"),
    "not-an-arn-but-a-key",  # kept as a string key
]
ACCESS_KEYS = st.sampled_from(
    ["ASIAAAAAAAAAAAAAAAAA", "ASIABBBBBBBBBBBBBBBB", "ASIACCCCCCCCCCCCCCCC", "AKIAshort", "ASIAé" + "D" * 15, ""]
)
DELIVERIES = st.sampled_from(["1.0", "2.0", "3.0"])
VPCES = st.sampled_from(["vpce-0123456789abcdef0", "vpce-11111111", "vpce-22222222"])
OWNERS = st.sampled_from([None, "111122223333", "999988887777"])
ADDRESSES = st.sampled_from(["52.1.2.3", "52.1.2.4", "2600:1f18:abc::1", "10.0.0.1"])
TOFU4 = st.sampled_from([None, "3.5.140.1", "52.94.76.1", "0.0.0.0", "255.255.255.255", "01.2.3.4"])
TOFU6 = st.sampled_from([None, "2600:1f18::1", "2a05:d018::1"])

OPS = st.one_of(
    st.tuples(st.just("touch"), st.sampled_from(KEYS), st.integers(0, 7200)),
    st.tuples(st.just("access_key"), st.sampled_from(KEYS), ACCESS_KEYS),
    st.tuples(st.just("delivery"), st.sampled_from(KEYS), DELIVERIES),
    st.tuples(st.just("endpoint"), st.sampled_from(KEYS), st.tuples(VPCES, OWNERS)),
    st.tuples(st.just("address"), st.sampled_from(KEYS), ADDRESSES),
    st.tuples(st.just("tofu"), st.sampled_from(KEYS), st.tuples(TOFU4, TOFU6)),
    st.tuples(st.just("group"), st.sampled_from(KEYS), st.sampled_from(["g1", "g2", "g3"])),
    st.tuples(st.just("put"), st.sampled_from(KEYS), st.integers(0, 3)),
    st.tuples(st.just("pop"), st.sampled_from(KEYS), st.none()),
    st.tuples(st.just("move"), st.sampled_from(KEYS), st.booleans()),
    st.tuples(st.just("popitem"), st.none(), st.booleans()),
)


def parts_of(key: str) -> tuple[str, str, str, str]:
    parsed = parse_session_key(key)
    if parsed is None:
        return ("i-00000000", "000000000000", "odd", "aws")
    _, partition, account, role, instance = parsed
    return instance, account, role, partition


class Model:
    """The previous implementation's semantics: an OrderedDict of plain sessions."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.stream_time = 0.0
        self.expired = self.evicted = 0
        self.removed: set[str] = set()
        self.next_sweep = 0.0

    def touch(self, key: str) -> Session:
        now = self.stream_time
        entry = self.sessions.get(key)
        if entry is not None:
            if now - entry.last_seen > self.config.session_ttl_seconds:
                del self.sessions[key]
                self.expired += 1
                entry = None
            else:
                self.sessions.move_to_end(key)
        if entry is None:
            entry = Session(*parts_of(key), now)
            self.sessions[key] = entry
            if len(self.sessions) > self.config.max_sessions:
                old, _ = self.sessions.popitem(last=False)
                self.evicted += 1
                self.removed.add(old)
        entry.last_seen = now
        self.removed.discard(key)
        if now >= self.next_sweep:  # from the LRU end, stopping at the first entry still fresh
            horizon = now - self.config.session_ttl_seconds
            while self.sessions:
                k, v = next(iter(self.sessions.items()))
                if v.last_seen >= horizon:
                    break
                del self.sessions[k]
                self.expired += 1
                self.removed.add(k)
            self.next_sweep = now + 60.0
        return entry


def sample_data(key: str, variant: int) -> dict[str, Any]:
    instance, account, role, partition = parts_of(key)
    data: dict[str, Any] = {
        "instanceId": instance,
        "account": account,
        "role": role,
        "partition": partition,
        "firstSeen": 10.5,
        "lastSeen": 20.25,
        "accessKeys": [],
        "deliveries": [],
        "endpoints": {},
        "addresses": [],
        "tofuV4": None,
        "tofuV6": None,
        "groups": [],
    }
    if variant >= 1:
        data.update(accessKeys=["ASIAAAAAAAAAAAAAAAAA"], deliveries=["2.0"], tofuV4="52.94.76.1")
    if variant >= 2:
        data.update(
            accessKeys=["x", "ASIABBBBBBBBBBBBBBBB", "AKIAshort"],
            deliveries=["2.0", "1.0", "9"],
            endpoints={"vpce-11111111": None, "vpce-22222222": "111122223333"},
            addresses=["52.1.2.3", "2600:1f18:abc::1"],
            tofuV6="2600:1f18::1",
            groups=["g1", "g2"],
        )
    if variant >= 3:
        data.update(role="renamed", tofuV4="1.2.3.04")  # parts that differ from the key; odd text
    return data


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5), st.lists(OPS, max_size=60))
def test_index_behaves_like_an_ordered_dict_of_sessions(cap: int, ops: list[tuple[str, Any, Any]]) -> None:
    config = EngineConfig(session_ttl_seconds=3600, max_sessions=cap)
    state = DetectorState(config, track_changes=True)
    model = Model(config)
    for op, key, arg in ops:
        if op == "touch":
            now = float(arg)
            state.advance(now)
            model.stream_time = max(model.stream_time, now)
            state.session(key, *parts_of(key))
            model.touch(key)
            continue
        if op == "put":
            session = Session.from_data(sample_data(key, arg))
            state.sessions[key] = session
            model.sessions[key] = Session.from_data(sample_data(key, arg))
        elif op == "pop":
            a = state.sessions.pop(key, None)
            b = model.sessions.pop(key, None)
            assert (a is None) == (b is None)
            assert a is None or a.to_data() == b.to_data()  # type: ignore[union-attr]
        elif op == "move":
            if key in model.sessions:
                state.sessions.move_to_end(key, last=arg)
                model.sessions.move_to_end(key, last=arg)
            else:
                with pytest.raises(KeyError):
                    state.sessions.move_to_end(key, last=arg)
        elif op == "popitem":
            if model.sessions:
                ka, a = state.sessions.popitem(last=arg)
                kb, b = model.sessions.popitem(last=arg)
                assert ka == kb and a.to_data() == b.to_data()
            else:
                with pytest.raises(KeyError):
                    state.sessions.popitem(last=arg)
        elif key in model.sessions:
            view, plain = state.sessions[key], model.sessions[key]
            for target in (view, plain):
                if op == "access_key":
                    target.add_access_key(arg)
                elif op == "delivery":
                    target.add_delivery(arg)
                elif op == "endpoint":
                    target.add_endpoint(*arg)
                elif op == "address":
                    target.add_address(arg)
                elif op == "tofu":
                    target.tofu_v4, target.tofu_v6 = arg
                elif op == "group":
                    target.groups = target.groups + (arg,)
        assert list(state.sessions) == list(model.sessions)
    assert list(state.sessions) == list(model.sessions)
    assert len(state.sessions) == len(model.sessions)
    assert {k: v.to_data() for k, v in state.sessions.items()} == {k: v.to_data() for k, v in model.sessions.items()}
    assert (state.expired, state.evicted) == (model.expired, model.evicted)
    for key in model.sessions:
        assert key in state.sessions
        assert len(state.sessions[key].access_keys) <= MAX_ACCESS_KEYS
    assert state.removed == model.removed


@given(st.sampled_from(KEYS), st.integers(0, 3))
def test_to_data_from_data_round_trip(key: str, variant: int) -> None:
    data = sample_data(key, variant)
    index = SessionIndex()
    index[key] = Session.from_data(data)
    assert index[key].to_data() == data
    assert Session.from_data(index[key].to_data()).to_data() == data
    assert index.pop(key).to_data() == data and not index


def test_views_write_through_and_go_stale_when_evicted() -> None:
    state = DetectorState(EngineConfig(max_sessions=1))
    first, second = KEYS[0], KEYS[1]
    view = state.session(first, *parts_of(first))
    view.add_access_key("ASIAAAAAAAAAAAAAAAAA")
    view.endpoints = {"vpce-11111111": None}
    view.add_endpoint("vpce-11111111", "111122223333")  # an unknown owner is learnt later
    assert state.sessions[first].access_keys == ("ASIAAAAAAAAAAAAAAAAA",)
    assert state.sessions[first].endpoints == {"vpce-11111111": "111122223333"}
    state.session(second, *parts_of(second))  # evicts the first
    assert state.evicted == 1 and first not in state.sessions
    with pytest.raises(KeyError):
        _ = view.access_keys


def test_sweep_expires_from_the_least_recently_used_end() -> None:
    state = DetectorState(EngineConfig(session_ttl_seconds=100), track_changes=True)
    for i, key in enumerate(KEYS[:4]):
        state.advance(float(i * 10))
        state.session(key, *parts_of(key))
    state.advance(115.0)
    state.sweep()  # idle past 100 s: the two last seen at 0 and 10; those at 20 and 30 stay
    assert list(state.sessions) == KEYS[2:4]
    changed, removed = state.drain_changes()
    assert removed == set(KEYS[:2]) and changed == set(KEYS[2:4])


def test_no_python_object_per_session() -> None:
    """The point of the compact index: GC-tracked objects do not grow with the number of sessions."""
    state = DetectorState(EngineConfig(max_sessions=50_000))
    ix = state.sessions

    def fill(start: int, count: int) -> None:
        for n in range(start, start + count):
            key = arn("aws", "111122223333", "web", f"i-{n:017x}")
            parsed = parse_session_key(key)
            assert parsed is not None
            s = state.touch(key, parsed[0])
            ix.add_access_key(s, f"ASIA{n:016d}")
            ix.add_delivery(s, "2.0")
            ix.set_tofu_v4(s, "52.94.76.1")
            ix.add_endpoint(s, "vpce-0123456789abcdef0", "111122223333")

    fill(0, 1000)  # warm up: interned values, first column blocks
    gc.collect()
    before = len(gc.get_objects())
    fill(1000, 20_000)
    gc.collect()
    assert len(ix) == 21_000
    assert len(gc.get_objects()) - before < 100
