"""Properties of the core over arbitrary input (hypothesis): decoding never raises, the engine raises
nothing but MalformedRecord, and whatever it produces renders to JSON."""

from __future__ import annotations

import re
from datetime import timedelta, timezone
from typing import Any

import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from detector.core import DetectorState, Engine, EngineConfig, MalformedRecord, registry_from_mapping, render
from detector.core.addresses import AddressIndex
from detector.core.records import classify, decode

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text that JSON can carry (orjson refuses lone surrogates, as any UTF-8 input would).
text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False) | text
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4), max_leaves=20
)

DETAIL_TYPES = st.sampled_from(
    ["AWS API Call via CloudTrail", "AWS Console Sign In via CloudTrail", "AWS Service Event via CloudTrail", "Other"]
)
# Dicts shaped like each of the three inputs, with arbitrary values where the shape is decided.
shaped = (
    st.fixed_dictionaries({"detail-type": DETAIL_TYPES | json_values, "detail": json_values})
    | st.fixed_dictionaries({"Records": json_values | st.lists(json_values, max_size=4)})
    | st.fixed_dictionaries({"eventVersion": json_values, "userIdentity": json_values | st.dictionaries(text, json_values)})
)


@SETTINGS
@given(st.binary(max_size=300))
@example(b"")
@example(b"\xff\xfe")
@example(b"[" * 5000)
@example(b'{"detail-type": [1], "detail": {}}')
def test_decode_never_raises_on_bytes(raw: bytes) -> None:
    result = decode(raw)
    assert isinstance(result.records, list) and isinstance(result.malformed, list)


def _elements(value: Any) -> int:
    """How many inputs SPEC §2 sees in ``value``: each element of a log file's Records, else one."""
    if isinstance(value, dict) and not ("detail-type" in value and "detail" in value):
        if not ("eventVersion" in value and "userIdentity" in value) and isinstance(value.get("Records"), list):
            return len(value["Records"])
    return 1


@SETTINGS
@given(json_values | shaped)
@example({"detail-type": [], "detail": {}})
@example({"detail-type": {"a": 1}, "detail": {"eventVersion": "1", "userIdentity": {}}})
@example({"Records": "nope"})
def test_classify_and_decode_never_raise_on_json_values(value: Any) -> None:
    result = classify(value)
    # Every element is accounted for, once: a record, a malformed reason or a skip.
    assert len(result.records) + len(result.malformed) + result.skipped == _elements(value)
    assert all(isinstance(r, dict) and "eventVersion" in r and isinstance(r["userIdentity"], dict) for r in result.records)
    again = decode(orjson.dumps(value))
    assert len(again.records) == len(result.records) and again.malformed == result.malformed


# --- the engine over record-shaped dicts ---------------------------------------------------------------

ACCOUNTS = ["111122223333", "444455556666", "777788889999", "999900001111"]
REGISTRY = registry_from_mapping(
    {
        "accounts": {
            "111122223333": {"cidrs": ["52.1.2.3/32", "2600:1f18:abc::/56"], "vpc_endpoints": ["vpce-0123456789abcdef0"]},
            "444455556666": {"trusted": True, "cidrs": ["52.9.0.0/16"], "vpc_endpoints": ["vpce-22222222"]},
            "777788889999": {"affiliated": False, "cidrs": ["52.7.7.7/32"], "vpc_endpoints": ["vpce-77777777"]},
        },
        "expected_networks": [{"cidr": "81.2.69.0/24", "accounts": ["111122223333"]}, {"cidr": "2a00:1450::/32"}],
    }
)
AWS = AddressIndex([("52.0.0.0/8", True), ("3.0.0.0/9", True), ("2600:1f00::/24", True)])

hexes = st.text("0123456789abcdef", min_size=8, max_size=8) | st.text("0123456789abcdef", min_size=17, max_size=17)
instance_ids = st.builds(lambda h: "i-" + h, hexes) | st.sampled_from(["i-0123456789abcdef0", "i-01234567"]) | text
accounts = st.sampled_from(ACCOUNTS) | st.text("0123456789", min_size=11, max_size=13)
roles = st.sampled_from(["web-role", "r", "a+b=c,d.e@f-g_h"]) | text
session_arns = st.builds(
    lambda p, a, r, i: f"arn:{p}:sts::{a}:assumed-role/{r}/{i}",
    st.sampled_from(["aws", "aws-cn", "aws-us-gov"]) | text,
    accounts,
    roles,
    instance_ids,
)
addresses = (
    st.ip_addresses().map(str)
    | st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}")
    | st.sampled_from(
        ["52.1.2.3", "52.9.1.1", "52.7.7.7", "52.33.44.55", "2600:1f14::1", "81.2.69.9", "2a00:1450::9", "10.0.0.1", "8.8.8.8"]
    )
)
sources = addresses | st.sampled_from(["s3.amazonaws.com", "AWS Internal", "", "example.com"]) | json_values
offsets = st.timedeltas(min_value=timedelta(hours=-23, minutes=-59), max_value=timedelta(hours=23, minutes=59))
event_times = (
    st.builds(lambda dt, off: dt.replace(tzinfo=timezone(off)).isoformat(), st.datetimes(), offsets)
    | st.datetimes().map(lambda dt: dt.isoformat() + "Z")
    | st.sampled_from(["2026-11-09T08:00:00Z", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-23:59", "nope"])
    | json_values
)
vpces = st.sampled_from(["vpce-0123456789abcdef0", "vpce-22222222", "vpce-77777777", "vpce-0fedcba987654321f"]) | json_values


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


valid_arns = st.builds(
    lambda a, r, i: f"arn:aws:sts::{a}:assumed-role/{r}/{i}",
    st.sampled_from(ACCOUNTS),
    st.sampled_from(["web-role", "batch"]),
    st.builds(lambda h: "i-" + h, hexes),
)
optional_identity = {
    "accessKeyId": text | json_values,
    "principalId": text | json_values,
    "invokedBy": st.sampled_from(["ec2.amazonaws.com", ""]) | json_values,
    "sessionContext": st.fixed_dictionaries({}, optional={"ec2RoleDelivery": st.sampled_from(["1.0", "2.0"]) | json_values})
    | json_values,
}
# Half the identities are instance sessions, so that most records reach the decision and the rendering.
instance_identities = st.fixed_dictionaries({"type": st.just("AssumedRole"), "arn": valid_arns}, optional=optional_identity)
identities = instance_identities | st.fixed_dictionaries(
    {"type": st.sampled_from(["AssumedRole", "AWSService", "IAMUser", "Root"]) | json_values},
    optional={
        "arn": session_arns | json_values,
        "accessKeyId": text | json_values,
        "principalId": text | json_values,
        "invokedBy": st.sampled_from(["ec2.amazonaws.com", ""]) | json_values,
        "sessionContext": st.fixed_dictionaries({}, optional={"ec2RoleDelivery": st.sampled_from(["1.0", "2.0"]) | json_values})
        | json_values,
    },
)
records = st.fixed_dictionaries(
    {"eventVersion": st.just("1.08"), "userIdentity": identities},
    optional={
        "eventTime": event_times,
        "sourceIPAddress": sources,
        "vpcEndpointId": vpces,
        "vpcEndpointAccountId": accounts | json_values,
        "eventID": st.sampled_from(["dup-1", "dup-2"]) | text | json_values,
        "eventName": st.just("AssumeRole") | text | json_values,
        "eventSource": text | json_values,
        "awsRegion": text | json_values,
        "errorCode": text | json_values,
        "requestParameters": st.fixed_dictionaries(
            {"roleArn": st.builds(lambda a, r: f"arn:aws:iam::{a}:role/{r}", accounts, roles) | json_values,
             "roleSessionName": instance_ids | json_values}
        )
        | json_values,
        "responseElements": json_values,
    },
)

ISO_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")


@SETTINGS
@given(st.lists(records, min_size=1, max_size=12))
@example([{"eventVersion": "1.08", "eventTime": "0001-01-01T00:00:00+01:00", "sourceIPAddress": "8.8.8.8",
           "userIdentity": {"type": "AssumedRole", "arn": "arn:aws:sts::111122223333:assumed-role/r/i-01234567"}}])
def test_engine_raises_only_malformed_record_and_renders_json(batch: list[dict[str, Any]]) -> None:
    engine = Engine(REGISTRY, AWS)
    state = DetectorState(EngineConfig(session_ttl_seconds=3600, max_sessions=3, max_findings=5))
    for record in batch:
        try:
            changes = engine.apply(state, record)
        except MalformedRecord as exc:
            assert exc.reason == "bad_field"
            continue
        for change in changes:
            finding = render(change.group)
            orjson.dumps(finding)
            assert re.fullmatch(r"[0-9a-f]{32}", finding["id"])
            assert finding["severity"] in (2, 5, 8)  # 2: SPEC §13's IMDSv1 finding
            assert finding["service"]["count"] >= 1
            assert ISO_Z.match(finding["service"]["eventFirstSeen"]), finding["service"]["eventFirstSeen"]
            assert ISO_Z.match(finding["service"]["eventLastSeen"])
            assert finding["service"]["eventFirstSeen"] <= finding["service"]["eventLastSeen"]
    assert len(state.sessions) <= 3
    for group in state.groups.values():
        orjson.dumps(render(group))
