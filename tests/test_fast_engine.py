"""``Engine.apply`` decides the same on the fast decoder's ``FastRecord`` of an input as on the reference
decoder's full dict record (converted once by ``records.as_record``) and on the record read back from
its sessions-topic value (``records.encode_routed``/``decode_routed``): a model test over random record
sequences.

The sequences hit what the decision memoizes or shortcuts: the origin memo (plain addresses, VPC
endpoints with and without an owner account, services, an address that is not one), a registry or AWS
ranges replaced mid-stream, the newest access key again and rotations, ``ec2RoleDelivery`` values,
first-use addresses, the inlined touch of a live session (with sessions idle past the TTL, evicted by
the LRU cap, sweeps, change tracking), issuance records and duplicate eventIDs.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.core.addresses import AddressIndex
from detector.core.engine import Engine, MalformedRecord
from detector.core.findings import render
from detector.core.records import SKIPPED, FastDecoder, FastRecord, StateChange, _project, as_record, decode_routed, encode_routed
from detector.core.registry import registry_from_mapping
from detector.core.state import DetectorState, EngineConfig

HOME1, HOME2, OTHER = "111111111111", "222222222222", "333333333333"
VPCE_HOME1, VPCE_OTHER, VPCE_UNKNOWN = "vpce-0a1b2c3d4e5f60718", "vpce-1234567890abcdef0", "vpce-99999999"

REGISTRY_A = registry_from_mapping(
    {
        "accounts": {
            HOME1: {"name": "prod", "cidrs": ["203.0.113.0/28"], "vpc_endpoints": [VPCE_HOME1]},
            HOME2: {"name": "ci", "trusted": True},
            OTHER: {"name": "partner", "affiliated": False, "cidrs": ["198.18.0.0/24"], "vpc_endpoints": [VPCE_OTHER]},
        },
        "expected_networks": [{"cidr": "198.51.100.0/24", "accounts": [HOME1]}, {"cidr": "192.0.2.0/28"}],
    }
)
# The same accounts, judged differently: the origin memo must follow the swap.
REGISTRY_B = registry_from_mapping(
    {
        "accounts": {
            HOME1: {"name": "prod", "trusted": True, "vpc_endpoints": [VPCE_OTHER]},
            OTHER: {"name": "partner", "cidrs": ["203.0.113.0/28"]},
        },
        "expected_networks": [{"cidr": "52.94.76.0/24"}],
    }
)
RANGES_SMALL = AddressIndex([("52.94.0.0/16", "AMAZON"), ("2600:1f18::/32", "EC2")])

SOURCES = [
    "52.94.76.1", "52.94.76.2", "54.198.90.68", "::ffff:52.94.76.1", "52.94.76.1", "52.94.76.2", "2600:1f18::1", "2600:1f18::2",
    "185.220.101.4", "10.0.0.7", "203.0.113.5", "198.51.100.7", "192.0.2.3", "198.18.0.9",
    "s3.amazonaws.com", "AWS Internal", "not-an-address", None, 7, "",
]  # fmt: skip
VPCES = [None, None, None, None, None, None, VPCE_HOME1, VPCE_OTHER, VPCE_UNKNOWN, "not-a-vpce", 3]
VPCE_ACCOUNTS = [None, None, HOME1, OTHER, "12345", 5, ["x"]]
INVOKED = [None, None, None, None, None, "", "lambda.amazonaws.com"]
ACCESS_KEYS = [None, "ASIAAAAAAAAAAAAAAAA1", "ASIAAAAAAAAAAAAAAAA1", "ASIABBBBBBBBBBBBBBB2", "ASIAshort", 9, "ASIAÉÉÉÉÉÉÉÉÉÉÉÉÉÉÉ"]
DELIVERIES = [None, "1.0", "2.0", "2.0", "3.0", 4]
EVENT_IDS = [None, "e-1", "e-2", "e-3", 12]
ROLES = [(HOME1, "web"), (HOME2, "ci-runner"), ("444444444444", "batch"), ("444444444444", "batch"), (OTHER, "web")]
INSTANCES = ["i-0123456789abcdef0", "i-89abcdef", "i-0123456789abcdef0", "i-00000000000000001"]

STEP = st.tuples(
    st.integers(0, 9),  # kind: mostly instance records, some issuance, some others, a registry/ranges swap
    st.integers(0, len(ROLES) - 1),
    st.integers(0, len(INSTANCES) - 1),
    st.integers(0, len(SOURCES) - 1),
    st.integers(0, len(VPCES) - 1),
    st.integers(0, len(VPCE_ACCOUNTS) - 1),
    st.integers(0, len(INVOKED) - 1),
    st.integers(0, len(ACCESS_KEYS) - 1),
    st.integers(0, len(DELIVERIES) - 1),
    st.integers(0, len(EVENT_IDS) - 1),
    st.sampled_from([0, 0, 1, 30, -20, 700, 5000]),  # seconds since the previous record
)


def make_record(step: tuple[int, ...], now: float) -> dict[str, Any]:
    kind, role_i, inst_i, src_i, vpce_i, vacct_i, inv_i, ak_i, dl_i, eid_i, _ = step
    account, role = ROLES[role_i]
    instance = INSTANCES[inst_i]
    event_time = f"2026-05-04T{int(now) // 3600 % 24:02d}:{int(now) // 60 % 60:02d}:{int(now) % 60:02d}Z"
    if kind == 8:  # EC2 issuing credentials
        return {
            "eventVersion": "1.08",
            "userIdentity": {"type": "AWSService", "invokedBy": "ec2.amazonaws.com"},
            "eventTime": event_time,
            "eventName": "AssumeRole",
            "sourceIPAddress": "ec2.amazonaws.com",
            "requestParameters": {"roleArn": f"arn:aws:iam::{account}:role/{role}", "roleSessionName": instance},
            "responseElements": {"credentials": {"accessKeyId": ACCESS_KEYS[ak_i], "sessionToken": "IQoJ"}},
        }
    identity: dict[str, Any] = {
        "type": "AssumedRole" if kind != 7 else "IAMUser",
        "principalId": f"AROAEXAMPLE:{instance}",
        "arn": f"arn:aws:sts::{account}:assumed-role/{role}/{instance}",
    }
    for name, value in (("invokedBy", INVOKED[inv_i]), ("accessKeyId", ACCESS_KEYS[ak_i])):
        if value is not None:
            identity[name] = value
    if DELIVERIES[dl_i] is not None:
        identity["sessionContext"] = {"ec2RoleDelivery": DELIVERIES[dl_i]}
    record: dict[str, Any] = {
        "eventVersion": "1.10",
        "userIdentity": identity,
        "eventTime": event_time,
        "eventSource": "s3.amazonaws.com",
        "eventName": "GetObject",
        "awsRegion": "eu-west-1",
        "sourceIPAddress": SOURCES[src_i],
    }
    for name, value in (
        ("vpcEndpointId", VPCES[vpce_i]),
        ("vpcEndpointAccountId", VPCE_ACCOUNTS[vacct_i]),
        ("eventID", EVENT_IDS[eid_i]),
    ):
        if value is not None:
            record[name] = value
    return record


def fast_record(record: dict[str, Any]) -> FastRecord:
    raw = json.dumps({"detail-type": "AWS API Call via CloudTrail", "detail": record}).encode()  # ASCII
    result = FastDecoder().decode_line(raw)
    assert result is not None and result is not SKIPPED
    return result  # type: ignore[return-value]


def snapshot(engine: Engine, state: DetectorState) -> Any:
    return (
        [(key, session.to_data()) for key, session in state.sessions.items()],
        {gid: group.to_data() for gid, group in state.groups.items()},
        (engine.counters.records, engine.counters.instance_records, engine.counters.issuance_records),
        dict(engine.counters.origin or {}),
        (state.stream_time, state.expired, state.evicted, state.created),
        (sorted(state.changed), sorted(state.removed)),
    )


def apply(engine: Engine, state: DetectorState, record: Any, fast: bool) -> Any:
    try:
        changes = engine.apply(state, record)
    except MalformedRecord as exc:
        return ("malformed", exc.reason)
    return [(render(c.group), c.new) for c in changes]


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(STEP, min_size=5, max_size=80), track=st.booleans(), aws_ranges_small=st.booleans())
def test_fast_decoder_records_decide_as_reference_records(steps: list[tuple[int, ...]], track: bool, aws_ranges_small: bool, aws_ranges: Any) -> None:
    config = EngineConfig(session_ttl_seconds=3600.0, max_sessions=3, finding_ttl_seconds=7200.0, max_findings=4)
    ranges = RANGES_SMALL if aws_ranges_small else aws_ranges
    reference, fast = Engine(REGISTRY_A, ranges), Engine(REGISTRY_A, ranges)
    ref_state, fast_state = DetectorState(config, track_changes=track), DetectorState(config, track_changes=track)
    now = 8 * 3600.0
    for step in steps:
        now = max(0.0, now + step[-1])
        if step[0] == 9:  # replace the registry (and the ranges object): memoized origins must not survive
            registry = REGISTRY_B if reference.registry is REGISTRY_A else REGISTRY_A
            other_ranges = aws_ranges if reference.aws_ranges is RANGES_SMALL else RANGES_SMALL
            for engine in (reference, fast):
                engine.registry = registry
                if step[1] == 0:
                    engine.aws_ranges = other_ranges
            continue
        record = make_record(step, now)
        assert apply(fast, fast_state, fast_record(record), True) == apply(reference, ref_state, record, False)
        assert snapshot(fast, fast_state) == snapshot(reference, ref_state)


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(STEP, min_size=1, max_size=30))
def test_routed_records_round_trip(steps: list[tuple[int, ...]]) -> None:
    """``decode_routed(encode_routed(r))`` is the record itself, for the route stage's dicts and for the
    fast decoder's structs; and an older JSON value is still read."""
    now = 8 * 3600.0
    for step in steps:
        now = max(0.0, now + step[-1])
        record = make_record(step, now)
        struct = fast_record(record)
        expected = as_record(record)
        assert decode_routed(encode_routed(record)) == expected
        assert decode_routed(encode_routed(struct)) == as_record(_project(struct))
        assert decode_routed(json.dumps(record).encode()) == expected


def test_routed_state_changes_and_values_that_are_not_records() -> None:
    change = {"detail-type": "EC2 Instance State-change Notification", "eventTime": "2026-05-04T10:00:00Z",
              "detail": {"instance-id": "i-0123456789abcdef0", "state": "stopped"}, "id": "ev-1"}  # fmt: skip
    assert decode_routed(encode_routed(change)) == StateChange("2026-05-04T10:00:00Z", "i-0123456789abcdef0", "stopped", "ev-1")
    assert decode_routed(json.dumps(change).encode()) == decode_routed(encode_routed(change))
    big = make_record((0, 0, 0, 0, 0, 0, 0, 1, 2, 1, 0), 8 * 3600.0) | {"eventID": 1 << 70}  # beyond msgpack
    assert encode_routed(big).startswith(b"{") and decode_routed(encode_routed(big)) == as_record(big)
    for value in (None, b"", b"not json", b"[1, 2]", b'{"a": 1}', b"\x01\xc1", b"\x02\x93"):
        assert decode_routed(value) is None


def test_a_repeated_session_and_address_is_decided_again_after_eviction(aws_ranges: Any) -> None:
    """The first-use address of an evicted session is forgotten: the same address becomes the new first use,
    a different one after it is a finding — on both paths."""
    config = EngineConfig(max_sessions=1)
    for fast in (False, True):
        engine, state = Engine(REGISTRY_A, aws_ranges), DetectorState(config)
        steps = [(0, 3, 0, 0), (0, 3, 0, 0), (0, 3, 1, 0), (0, 3, 0, 1), (0, 3, 0, 1), (0, 3, 0, 0)]
        seen = []
        for i, (kind, role_i, inst_i, src_i) in enumerate(steps):
            record = make_record((kind, role_i, inst_i, src_i, 0, 0, 0, 1, 2, 0, 0), 8 * 3600.0 + i)
            seen.append(apply(engine, state, fast_record(record) if fast else record, fast))
        assert [bool(r) for r in seen] == [False, False, False, False, False, True]
        assert state.evicted == 2


def test_every_ordered_pair_of_origins_on_one_session(aws_ranges: Any) -> None:
    """Exhaustive over the origins the fast path shortcuts (first-use address, own endpoint, services):
    a session sees origin a, then b, then a again — both paths agree at every step."""
    sources = [0, 1, 3, 4, 6, 8, 12]  # AWS v4 twice, mapped v4, AWS v6, outside, registry, service
    vpces = [0, 6, 7, 8, 9]  # none, own endpoint, partner's, unknown, not an endpoint
    accounts = [0, 2, 3, 5]  # none, home, partner, not an account
    variants = [(src, vpce, acct) for src in sources for vpce in vpces for acct in accounts]
    for role_i in (0, 2):  # an inventoried home account, one without inventory (first use applies)
        reference, fast = Engine(REGISTRY_A, aws_ranges), Engine(REGISTRY_A, aws_ranges)
        for a in variants:
            for b in variants:
                ref_state, fast_state = DetectorState(), DetectorState()
                for i, (src, vpce, acct) in enumerate((a, b, a)):
                    record = make_record((0, role_i, 0, src, vpce, acct, 0, 1, 2, i % 2, 0), 8 * 3600.0 + i)
                    got = apply(fast, fast_state, fast_record(record), True)
                    assert got == apply(reference, ref_state, record, False), (a, b, i)
                assert snapshot(fast, fast_state) == snapshot(reference, ref_state), (a, b)


def test_first_use_address_no_longer_trusted_once_the_home_account_is_inventoried(aws_ranges: Any) -> None:
    for fast in (False, True):
        engine, state = Engine(REGISTRY_B, aws_ranges), DetectorState()  # REGISTRY_B: HOME1 has no inventory
        record = make_record((0, 0, 0, 2, 0, 0, 0, 1, 2, 0, 0), 8 * 3600.0)
        assert apply(engine, state, fast_record(record) if fast else record, fast) == []  # the first use
        engine.registry = REGISTRY_A  # now HOME1's addresses are known: any other AWS address is a finding
        outcome = apply(engine, state, fast_record(record) if fast else record, fast)
        assert [(f["type"], f["service"]["count"]) for f, _ in outcome] == [
            ("UnauthorizedAccess:IAMUser/InstanceCredentialExfiltration.InsideAWS", 1)
        ], fast


def test_memo_tables_stay_bounded_and_never_change_a_decision(aws_ranges: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Memo tables hold up to _CACHE_LARGE entries while the index is smaller than that, then go back to
    _CACHE_LIMIT at their next clear; decisions are those of an engine whose tables never fill."""
    import detector.core.engine as engine_module

    def records() -> list[dict[str, Any]]:
        out = []
        for round_ in range(3):
            for i in range(40):
                source = f"52.95.{i}.{7 + round_ % 2}"  # a second address on alternate rounds: TOFU findings
                out.append({
                    "eventVersion": "1.10",
                    "userIdentity": {"type": "AssumedRole", "arn": f"arn:aws:sts::111111111111:assumed-role/web/i-{i:017x}",
                                     "accessKeyId": f"ASIAEXAMPLE{i:09d}"},
                    "eventTime": f"2026-05-04T10:{round_:02d}:{i:02d}Z", "eventName": "GetObject",
                    "sourceIPAddress": source, "eventID": f"{round_}-{i}",
                })  # fmt: skip
        return out

    def run(engine: Engine, watch: bool) -> Any:
        state = DetectorState()
        results = []
        for record in records():
            results.append(apply(engine, state, fast_record(record), True))
            if watch:
                tables = (engine._arns, engine._origins, engine._addresses, engine._classes, engine._times)
                assert max(map(len, tables)) <= engine_module._CACHE_LARGE
                sizes.append((len(state.sessions), len(engine._arns)))
        return results, snapshot(engine, state)

    sizes: list[tuple[int, int]] = []
    expected = run(Engine(REGISTRY_A, aws_ranges), watch=False)  # 40 sessions: nothing is ever cleared
    monkeypatch.setattr(engine_module, "_CACHE_LIMIT", 4)
    monkeypatch.setattr(engine_module, "_CACHE_LARGE", 16)
    assert run(Engine(REGISTRY_A, aws_ranges), watch=True) == expected
    assert any(n_arns > 4 for n, n_arns in sizes if n < 16)  # while the index is small, tables grow past 4
    assert all(n_arns <= 5 for n, n_arns in sizes[-40:])  # with 40 sessions indexed: back to 4 (+ the new entry)
    assert any(s for s in expected[0])  # the stream has findings, so decisions are really compared


def test_a_dict_record_with_sub_objects_of_another_type_reads_them_as_absent() -> None:
    """``as_record`` is as lenient as the decisions: a sub-object of the wrong type is None, the rest kept."""
    record = make_record((0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0), 8 * 3600.0)
    record["userIdentity"]["sessionContext"] = "not an object"
    record["requestParameters"] = ["not", "an", "object"]
    record["responseElements"] = {"credentials": 7, "instancesSet": {"items": []}}
    converted = as_record(record)
    assert isinstance(converted, FastRecord)
    assert converted.userIdentity.sessionContext is None and converted.requestParameters is None
    assert converted.responseElements is not None and converted.responseElements.credentials is None
    assert converted.userIdentity.arn == record["userIdentity"]["arn"] and converted.eventTime == record["eventTime"]
    assert as_record({"eventTime": "2026-05-04T10:00:00Z", "userIdentity": "x"}) is None
