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


# --- the state of SPEC part two: lifecycle entries, access-key first sightings, address resets ----------

from detector.core.changelog import apply_record, drain  # noqa: E402

AFTER_STOPPED = "UnauthorizedAccess:IAMUser/InstanceCredentialExfiltration.AfterInstanceStopped"
HOME = "111122223333"
INSTANCES = ["i-0123456789abcdef0", "i-01234567", "i-0aaaaaaaaaaaaaaaa"]
ROLES = ["web-role", "aws:ec2-instance"]
T0 = 1_794_211_200  # 2026-11-09T08:00:00Z
GRACE = 600


def _iso(offset: int) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(T0 + offset, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _session(i: int, r: int) -> str:
    return f"arn:aws:sts::{HOME}:assumed-role/{ROLES[r]}/{INSTANCES[i]}"


def _key(i: int, r: int, k: int) -> str:
    return f"ASIA{i}{r}{k}" + "X" * 13  # three keys per session, never shared between sessions


# An event: (what, instance index, role index, key index, variant); its time comes from the list order.
lifecycle_events = st.tuples(
    st.sampled_from(["use", "use", "use", "service", "issue", "stop", "terminate", "spot", "state", "start", "start", "associate", "failed"]),
    st.sampled_from([0, 0, 0, 1, 2]),  # mostly one instance, so that its lives and keys meet
    st.integers(0, 1),
    st.sampled_from([0, 0, 0, 1, 2]),
    st.integers(0, 5),
)
STATES = ["pending", "running", "stopping", "stopped", "shutting-down", "terminated"]


def _lifecycle_record(what: str, i: int, r: int, k: int, variant: int, offset: int) -> dict[str, Any]:
    instance = INSTANCES[i]
    when = _iso(offset)
    if what == "state":
        return {"version": "0", "detail-type": "EC2 Instance State-change Notification", "source": "aws.ec2", "account": HOME,
                "time": when, "detail": {"instance-id": instance, "state": STATES[variant]}}  # fmt: skip
    base: dict[str, Any] = {"eventTime": when, "eventSource": "ec2.amazonaws.com", "awsRegion": "us-east-1", "eventID": f"e{offset}"}
    if variant % 2:
        base["eventVersion"] = "1.08"  # else a bare record (SPEC §10)
    if what in ("use", "service"):
        identity: dict[str, Any] = {"type": "AssumedRole", "arn": _session(i, r), "accessKeyId": _key(i, r, k),
                                    "sessionContext": {"ec2RoleDelivery": "2.0"}}  # fmt: skip
        source = "s3.amazonaws.com" if what == "service" else ["8.8.8.8", "81.2.69.9", "10.0.0.1"][variant % 3]
        return {**base, "userIdentity": identity, "eventName": "ListBuckets", "sourceIPAddress": source}
    if what == "issue":
        return {**base, "userIdentity": {"type": "AWSService", "invokedBy": "ec2.amazonaws.com"}, "eventSource": "sts.amazonaws.com",
                "eventName": "AssumeRole", "sourceIPAddress": "ec2.amazonaws.com",
                "requestParameters": {"roleArn": f"arn:aws:iam::{HOME}:role/{ROLES[0]}", "roleSessionName": instance},
                "responseElements": {"credentials": {"accessKeyId": _key(i, 0, k)}}}  # fmt: skip
    user = {"type": "IAMUser", "arn": f"arn:aws:iam::{HOME}:user/ops", "accountId": HOME}
    items = {"items": [{"instanceId": instance}]}
    if what == "spot":
        return {**base, "userIdentity": {"accountId": HOME, "invokedBy": "ec2.amazonaws.com"}, "eventName": "BidEvictedEvent",
                "eventType": "AwsServiceEvent", "serviceEventDetails": {"instanceIdSet": [instance]}}  # fmt: skip
    if what == "associate":
        return {**base, "userIdentity": user, "eventName": "AssociateAddress", "sourceIPAddress": "8.8.4.4",
                "requestParameters": {"instanceId": instance, "allocationId": "eipalloc-1"}}  # fmt: skip
    name = {"stop": "StopInstances", "terminate": "TerminateInstances", "start": "StartInstances"}.get(what, "StopInstances")
    record = {**base, "userIdentity": user, "eventName": name, "sourceIPAddress": "8.8.4.4", "requestParameters": {"instancesSet": items},
              "responseElements": {"instancesSet": items} if variant < 3 else None}  # fmt: skip
    if what == "failed":
        record["errorCode"] = "Client.DryRunOperation" if variant < 3 else "Client.UnauthorizedOperation"
    return record


def _timeline(events: list[tuple[str, int, int, int, int]], gaps: list[int]) -> list[dict[str, Any]]:
    out, offset = [], 0
    for event, gap in zip(events, gaps, strict=False):
        offset += gap
        out.append(_lifecycle_record(*event, offset))
    return out


def _after_stop_model(records: list[dict[str, Any]]) -> dict[str, int]:
    """SPEC §11 straight from its text, for records in time order: session ARN -> AfterInstanceStopped
    count. A life: the earliest stop since the latest start is T; a start keeps T for clause b."""
    from datetime import datetime

    def ts(value: str) -> float:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()

    stop: dict[str, float | None] = {}  # instance -> T of the current life (None: running)
    previous: dict[str, float | None] = {}  # instance -> T of the life before the latest start
    known: dict[tuple[str, str], float] = {}  # (instance, key) -> first known
    counts: dict[str, int] = {}
    for record in records:
        if "detail-type" in record:
            state, instance, t = record["detail"]["state"], record["detail"]["instance-id"], ts(record["time"])
            kind = "start" if state in ("pending", "running") else "stop"
        else:
            t = ts(record["eventTime"])
            name, identity = record["eventName"], record["userIdentity"]
            arn = identity.get("arn", "")
            if ":assumed-role/" in arn and name == "ListBuckets":
                instance, key = arn.rsplit("/", 1)[1], identity["accessKeyId"]
                if record["sourceIPAddress"] != "s3.amazonaws.com":
                    now, before = stop.get(instance), previous.get(instance)
                    clause_a = now is not None and t > now + GRACE
                    clause_b = before is not None and t > before + GRACE and known.get((instance, key), float("inf")) <= before
                    if clause_a or clause_b:
                        counts[arn] = counts.get(arn, 0) + 1
                known.setdefault((instance, key), t)
                continue
            if name == "AssumeRole":
                known.setdefault((record["requestParameters"]["roleSessionName"], record["responseElements"]["credentials"]["accessKeyId"]), t)
                continue
            if record.get("errorCode") or name == "AssociateAddress":
                continue
            if name == "BidEvictedEvent":
                instance = record["serviceEventDetails"]["instanceIdSet"][0]
            else:
                instance = (record["responseElements"] or record["requestParameters"])["instancesSet"]["items"][0]["instanceId"]
            kind = "start" if name == "StartInstances" else "stop"
        if kind == "stop" and stop.get(instance) is None:
            stop[instance] = t
        elif kind == "start":
            if stop.get(instance) is not None:
                previous[instance] = stop[instance]
            stop[instance] = None
    return counts


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(lifecycle_events, min_size=1, max_size=40), st.lists(st.integers(1, 1500), min_size=40, max_size=40))
@example([("use", 0, 0, 0, 1), ("stop", 0, 0, 0, 0), ("start", 0, 0, 0, 1), ("use", 0, 0, 0, 0), ("use", 0, 0, 1, 0)], [100] * 3 + [900] * 37)
@example([("issue", 0, 0, 1, 1), ("state", 0, 0, 0, 2), ("state", 0, 0, 0, 1), ("use", 0, 0, 1, 0)], [100] * 3 + [900] * 37)
@example([("use", 1, 1, 2, 1), ("spot", 1, 0, 0, 1), ("start", 1, 0, 0, 4), ("use", 1, 1, 2, 2), ("stop", 1, 0, 0, 0)], [100] * 3 + [700] * 37)
def test_use_after_stop_follows_the_rule_and_survives_the_changelog(
    events: list[tuple[str, int, int, int, int]], gaps: list[int]
) -> None:
    """Signals and records in time order: the engine's AfterInstanceStopped groups are those of SPEC §11
    read literally; every finding renders with a severity SPEC names; and the changelog drained after each
    input rebuilds sessions, groups and lifecycle entries exactly."""
    records = _timeline(events, gaps)
    engine = Engine(REGISTRY, AWS, stop_grace_seconds=GRACE)
    live = DetectorState(EngineConfig(), track_changes=True)
    restored = DetectorState(EngineConfig())
    for value in records:
        (record,) = classify(value).records  # a state-change notification as the decoder hands it over
        for change in engine.apply(live, record):
            finding = render(change.group)
            orjson.dumps(finding)
            assert finding["severity"] in (2, 5, 8)
        for key, value in drain(live):
            apply_record(restored, key, value)
    got = {g.session_key: g.count for g in live.groups.values() if g.type == AFTER_STOPPED}
    assert got == _after_stop_model(records)
    assert {k: v.to_data() for k, v in restored.sessions.items()} == {k: v.to_data() for k, v in live.sessions.items()}
    assert {k: v.to_data() for k, v in restored.groups.items()} == {k: v.to_data() for k, v in live.groups.items()}
    assert restored.lifecycle == live.lifecycle
