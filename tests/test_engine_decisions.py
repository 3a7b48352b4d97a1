"""The pure core, one hand-built record at a time: SPEC §3 (sessions), §4 (origins), §5 (decisions),
§6 (session index) and §8 (finding groups and their rendering)."""

from __future__ import annotations

import itertools
import re
from datetime import datetime
from typing import Any

import orjson
import pytest

from detector.core import (
    INSIDE_AWS,
    OUTSIDE_AWS,
    DetectorState,
    Engine,
    EngineConfig,
    MalformedRecord,
    registry_from_mapping,
    render,
)
from detector.core.addresses import AddressIndex

HOME = "111122223333"  # affiliated, with inventory
NOINV = "555566667777"  # affiliated, no inventory (trust on first use)
HUB = "222233334444"  # trusted hub
AFFIL = "444455556666"  # another affiliated account
PARTNER = "777788889999"  # listed, not affiliated
UNLISTED = "999900001111"  # not in the registry

HOME_VPCE = "vpce-0123456789abcdef0"
NOINV_VPCE = "vpce-11111111"
HUB_VPCE = "vpce-22222222"
AFFIL_VPCE = "vpce-44444444"
PARTNER_VPCE = "vpce-77777777"
UNKNOWN_VPCE = "vpce-0fedcba9876543210"

REGISTRY = registry_from_mapping(
    {
        "accounts": {
            HOME: {"name": "prod", "cidrs": ["52.1.2.3/32", "2600:1f18:abc::/56"], "vpc_endpoints": [HOME_VPCE]},
            NOINV: {"name": "dev", "vpc_endpoints": [NOINV_VPCE]},
            HUB: {"name": "hub", "trusted": True, "cidrs": ["52.9.9.9/32", "2600:1f18:999::/56"], "vpc_endpoints": [HUB_VPCE]},
            AFFIL: {"name": "analytics", "cidrs": ["52.4.4.4/32", "2600:1f18:444::/56"], "vpc_endpoints": [AFFIL_VPCE]},
            PARTNER: {
                "name": "partner",
                "affiliated": False,
                "cidrs": ["52.7.7.7/32", "2600:1f18:777::/56"],
                "vpc_endpoints": [PARTNER_VPCE],
            },
        },
        "expected_networks": [
            {"cidr": "81.2.69.0/24", "accounts": [HOME], "name": "on-prem egress"},
            {"cidr": "2a00:1450:4000::/40", "accounts": [HOME, NOINV], "name": "office v6"},
            {"cidr": "52.200.0.0/16", "name": "shared NAT inside AWS, every account"},
        ],
    },
    "test-registry",
)
# A small stand-in for AWS's published ranges.
AWS = AddressIndex([("52.0.0.0/8", True), ("3.0.0.0/9", True), ("2600:1f00::/24", True)])

OUT_V4 = "8.8.8.8"
OUT_V6 = "2001:4860:4860::8888"

_ids = itertools.count(1)


def rec(
    source: Any = OUT_V4,
    *,
    account: str = HOME,
    role: str = "web-role",
    instance: str = "i-0123456789abcdef0",
    time: str = "2026-11-09T08:00:00Z",
    event_id: str | None = None,
    partition: str = "aws",
    delivery: str | None = "2.0",
    access_key: str | None = "ASIAEXAMPLEKEY000001",
    **extra: Any,
) -> dict[str, Any]:
    """A CloudTrail record made with the instance credentials of ``instance``."""
    identity: dict[str, Any] = {
        "type": "AssumedRole",
        "principalId": f"AROAEXAMPLEROLEID:{instance}",
        "arn": f"arn:{partition}:sts::{account}:assumed-role/{role}/{instance}",
        "accountId": account,
        "sessionContext": {
            "sessionIssuer": {"type": "Role", "arn": f"arn:{partition}:iam::{account}:role/{role}", "userName": role},
            "attributes": {"creationDate": "2026-11-09T07:00:00Z", "mfaAuthenticated": "false"},
        },
    }
    if access_key is not None:
        identity["accessKeyId"] = access_key
    if delivery is not None:
        identity["sessionContext"]["ec2RoleDelivery"] = delivery
    if "invokedBy" in extra:
        identity["invokedBy"] = extra.pop("invokedBy")
    record = {
        "eventVersion": "1.08",
        "userIdentity": identity,
        "eventTime": time,
        "eventSource": "s3.amazonaws.com",
        "eventName": "ListBuckets",
        "awsRegion": "us-east-1",
        "sourceIPAddress": source,
        "eventID": event_id or f"00000000-0000-4000-8000-{next(_ids):012d}",
    }
    record.update(extra)
    return record


def issuance(
    instance: str = "i-0123456789abcdef0",
    *,
    account: str = HOME,
    role: str = "web-role",
    key: str = "ASIAISSUEDKEY0000001",
    token: str = "IQoJb3JpZ2luX2VjEXAMPLESESSIONTOKEN",
    time: str = "2026-11-09T07:00:00Z",
    invoked_by: str = "ec2.amazonaws.com",
) -> dict[str, Any]:
    """EC2's own AssumeRole that issues an instance its credentials."""
    return {
        "eventVersion": "1.08",
        "userIdentity": {"type": "AWSService", "invokedBy": invoked_by},
        "eventTime": time,
        "eventSource": "sts.amazonaws.com",
        "eventName": "AssumeRole",
        "awsRegion": "us-east-1",
        "sourceIPAddress": invoked_by,
        "requestParameters": {"roleArn": f"arn:aws:iam::{account}:role/{role}", "roleSessionName": instance},
        "responseElements": {"credentials": {"accessKeyId": key, "sessionToken": token, "expiration": "x"}},
        "eventID": f"00000000-0000-4000-9000-{next(_ids):012d}",
    }


def new_engine(registry: Any = REGISTRY) -> tuple[Engine, DetectorState]:
    return Engine(registry, AWS), DetectorState()


def apply_all(records: list[dict[str, Any]], engine: Engine | None = None, state: DetectorState | None = None) -> list[Any]:
    """Apply records in order; return the final state of every finding group touched, in opening order."""
    if engine is None:
        engine, state = new_engine()
    assert state is not None
    groups: dict[str, Any] = {}
    for record in records:
        for change in engine.apply(state, record):
            groups[change.group.id] = change.group
    return list(groups.values())


def one(records: list[dict[str, Any]]) -> Any:
    groups = apply_all(records)
    assert len(groups) == 1, [(g.type, g.remote_account) for g in groups]
    return groups[0]


def origin_of(record: dict[str, Any], home: str = HOME) -> Any:
    return Engine(REGISTRY, AWS).origin(record, record["userIdentity"], home)


# --- SPEC §4: origin of a call, each kind, IPv4 and IPv6 ---------------------------------------------


@pytest.mark.parametrize(
    ("record", "kind", "owner"),
    [
        (rec("s3.amazonaws.com"), "AWS_SERVICE", None),
        (rec("athena.amazonaws.com"), "AWS_SERVICE", None),
        (rec("AWS Internal"), "AWS_SERVICE", None),
        (rec("AWS Internal/3"), "AWS_SERVICE", None),
        (rec(OUT_V4, invokedBy="cloudformation.amazonaws.com"), "AWS_SERVICE", None),
        (rec(OUT_V6, invokedBy="cloudformation.amazonaws.com"), "AWS_SERVICE", None),
        # rule 1 comes before the VPC endpoint
        (rec("10.0.0.1", invokedBy="ssm.amazonaws.com", vpcEndpointId=PARTNER_VPCE), "AWS_SERVICE", None),
        # rule 2: owner from vpcEndpointAccountId, else the registry, else unknown
        (rec("10.0.0.1", vpcEndpointId=UNKNOWN_VPCE, vpcEndpointAccountId=AFFIL), "VPC_ENDPOINT", AFFIL),
        (rec("fd00::1", vpcEndpointId=UNKNOWN_VPCE, vpcEndpointAccountId=UNLISTED), "VPC_ENDPOINT", UNLISTED),
        (rec("10.0.0.1", vpcEndpointId=PARTNER_VPCE), "VPC_ENDPOINT", PARTNER),
        (rec("10.0.0.1", vpcEndpointId=PARTNER_VPCE, vpcEndpointAccountId="not-an-account"), "VPC_ENDPOINT", PARTNER),
        (rec("10.0.0.1", vpcEndpointId=PARTNER_VPCE, vpcEndpointAccountId=12345678901), "VPC_ENDPOINT", PARTNER),
        (rec("10.0.0.1", vpcEndpointId=UNKNOWN_VPCE), "VPC_ENDPOINT", None),
        # the endpoint comes before the address, whatever the address is
        (rec(OUT_V4, vpcEndpointId=HOME_VPCE), "VPC_ENDPOINT", HOME),
        (rec("garbage", vpcEndpointId=HOME_VPCE), "VPC_ENDPOINT", HOME),
        # not an endpoint ID: the address decides
        (rec(OUT_V4, vpcEndpointId="endpoint-123"), "OUTSIDE_AWS", None),
        # 3a registry CIDRs (before AWS's ranges, which hold them)
        (rec("52.4.4.4"), "REGISTRY_ADDRESS", AFFIL),
        (rec("2600:1f18:444::17"), "REGISTRY_ADDRESS", AFFIL),
        (rec("::ffff:52.4.4.4"), "REGISTRY_ADDRESS", AFFIL),
        # 3b expected networks (before AWS's ranges too)
        (rec("81.2.69.7"), "EXPECTED_NETWORK", None),
        (rec("2a00:1450:4001::5"), "EXPECTED_NETWORK", None),
        (rec("52.200.1.1"), "EXPECTED_NETWORK", None),
        # 3c AWS's ranges
        (rec("52.33.44.55"), "AWS_ADDRESS", None),
        (rec("3.5.6.7"), "AWS_ADDRESS", None),
        (rec("2600:1f14::1"), "AWS_ADDRESS", None),
        # 3d private, loopback, link-local, shared, other non-global
        (rec("10.1.2.3"), "PRIVATE_ADDRESS", None),
        (rec("192.168.10.20"), "PRIVATE_ADDRESS", None),
        (rec("172.16.0.1"), "PRIVATE_ADDRESS", None),
        (rec("127.0.0.1"), "PRIVATE_ADDRESS", None),
        (rec("169.254.169.254"), "PRIVATE_ADDRESS", None),
        (rec("100.64.0.1"), "PRIVATE_ADDRESS", None),
        (rec("fd12:3456::1"), "PRIVATE_ADDRESS", None),
        (rec("fe80::1"), "PRIVATE_ADDRESS", None),
        (rec("::1"), "PRIVATE_ADDRESS", None),
        (rec("::ffff:10.0.0.1"), "PRIVATE_ADDRESS", None),
        # 3e everything else
        (rec(OUT_V4), "OUTSIDE_AWS", None),
        (rec("3.200.1.1"), "OUTSIDE_AWS", None),  # 3.128.0.0/9 is not in this stand-in's ranges
        (rec(OUT_V6), "OUTSIDE_AWS", None),
        (rec("::ffff:8.8.8.8"), "OUTSIDE_AWS", None),
    ],
)
def test_origin_kinds(record: dict[str, Any], kind: str, owner: str | None) -> None:
    origin = origin_of(record)
    assert (origin.kind, origin.owner) == (kind, owner)


def test_expected_network_applies_only_to_its_accounts() -> None:
    assert origin_of(rec("81.2.69.7"), home=HOME).kind == "EXPECTED_NETWORK"
    assert origin_of(rec("81.2.69.7", account=NOINV), home=NOINV).kind == "OUTSIDE_AWS"
    assert origin_of(rec("2a00:1450:4001::5", account=NOINV), home=NOINV).kind == "EXPECTED_NETWORK"
    assert origin_of(rec("2a00:1450:4001::5", account=AFFIL), home=AFFIL).kind == "OUTSIDE_AWS"
    assert origin_of(rec("52.200.1.1", account=AFFIL), home=AFFIL).kind == "EXPECTED_NETWORK"


def test_ipv4_mapped_ipv6_is_folded_to_ipv4() -> None:
    origin = origin_of(rec("::ffff:8.8.8.8"))
    assert origin.address == "8.8.8.8"
    group = one([rec("::FFFF:8.8.8.8")])
    finding = render(group)
    assert finding["service"]["action"]["awsApiCallAction"]["remoteIpDetails"] == {"ipAddressV4": "8.8.8.8"}


@pytest.mark.parametrize("source", ["example.com", "", "1.2.3", "8.8.8.8 ", "fe80::1%eth0", None, 42, ["8.8.8.8"]])
def test_source_neither_address_nor_service_is_malformed(source: Any) -> None:
    engine, state = new_engine()
    record = rec(source)
    if source is None:
        del record["sourceIPAddress"]
    with pytest.raises(MalformedRecord) as info:
        engine.apply(state, record)
    assert info.value.reason == "bad_field"
    assert not state.groups


@pytest.mark.parametrize("time", [None, 1_700_000_000, "yesterday", "2026-11-09T08:00:00", "2026-13-01T00:00:00Z"])
def test_instance_record_without_usable_event_time_is_malformed(time: Any) -> None:
    engine, state = new_engine()
    with pytest.raises(MalformedRecord):
        engine.apply(state, rec(OUT_V4, time=time))


@pytest.mark.parametrize("time", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_event_time_outside_the_utc_calendar_is_malformed_not_a_crash(time: str) -> None:
    engine, state = new_engine()
    with pytest.raises(MalformedRecord):
        for change in engine.apply(state, rec(OUT_V4, time=time)):
            render(change.group)


# --- SPEC §5: the decision table, row by row ----------------------------------------------------------


@pytest.mark.parametrize(
    "record",
    [
        rec("s3.amazonaws.com"),
        rec("AWS Internal"),
        rec(OUT_V4, invokedBy="athena.amazonaws.com"),
        rec(OUT_V6, invokedBy="athena.amazonaws.com"),
        rec("10.0.0.1", invokedBy="ssm.amazonaws.com", vpcEndpointId=PARTNER_VPCE, vpcEndpointAccountId=PARTNER),
    ],
)
def test_row_aws_service_is_nothing(record: dict[str, Any]) -> None:
    assert apply_all([record]) == []


@pytest.mark.parametrize(
    ("record", "vpce", "address"),
    [
        (rec("10.0.0.1", vpcEndpointId=HOME_VPCE, vpcEndpointAccountId=HOME), HOME_VPCE, None),
        (rec("10.0.0.1", vpcEndpointId=HOME_VPCE), HOME_VPCE, None),
        (rec("fd00::1", vpcEndpointId=HUB_VPCE, vpcEndpointAccountId=HUB), HUB_VPCE, None),
        (rec("10.0.0.1", vpcEndpointId=HUB_VPCE), HUB_VPCE, None),
        (rec("52.1.2.3"), None, "52.1.2.3"),
        (rec("2600:1f18:abc::10"), None, "2600:1f18:abc::10"),
        (rec("::ffff:52.1.2.3"), None, "52.1.2.3"),
        (rec("52.9.9.9"), None, "52.9.9.9"),
        (rec("2600:1f18:999:0:1::1"), None, "2600:1f18:999:0:1::1"),
    ],
)
def test_row_home_or_trusted_owner_is_nothing_and_joins_the_baseline(
    record: dict[str, Any], vpce: str | None, address: str | None
) -> None:
    engine, state = new_engine()
    assert engine.apply(state, record) == []
    (session,) = state.sessions.values()
    baseline = session.baseline()
    if vpce:
        assert baseline["vpcEndpoints"] == [{"vpcEndpointId": vpce, "ownerAccountId": REGISTRY.endpoint_owner[vpce]}]
    else:
        assert baseline["addresses"] == [address]


@pytest.mark.parametrize(
    ("record", "remote", "severity"),
    [
        (rec("10.0.0.1", vpcEndpointId=AFFIL_VPCE, vpcEndpointAccountId=AFFIL), AFFIL, 5),
        (rec("10.0.0.1", vpcEndpointId=AFFIL_VPCE), AFFIL, 5),
        (rec("10.0.0.1", vpcEndpointId=NOINV_VPCE), NOINV, 5),  # another of our own accounts
        (rec("52.4.4.4"), AFFIL, 5),
        (rec("2600:1f18:444::99"), AFFIL, 5),
        (rec("fd00::9", vpcEndpointId=PARTNER_VPCE, vpcEndpointAccountId=PARTNER), PARTNER, 8),
        (rec("10.0.0.1", vpcEndpointId=PARTNER_VPCE), PARTNER, 8),
        (rec("52.7.7.7"), PARTNER, 8),
        (rec("2600:1f18:777::1"), PARTNER, 8),
        (rec("10.0.0.1", vpcEndpointId=UNKNOWN_VPCE, vpcEndpointAccountId=UNLISTED), UNLISTED, 8),
    ],
)
def test_row_another_account_is_inside_aws(record: dict[str, Any], remote: str, severity: int) -> None:
    group = one([record])
    assert (group.type, group.remote_account, group.severity) == (INSIDE_AWS, remote, severity)
    details = render(group)["service"]["action"]["awsApiCallAction"]["remoteAccountDetails"]
    assert details == {"accountId": remote, "affiliated": severity == 5}


def test_row_vpc_endpoint_of_unknown_owner_is_nothing_but_recorded() -> None:
    engine, state = new_engine()
    assert engine.apply(state, rec("10.0.0.1", vpcEndpointId=UNKNOWN_VPCE)) == []
    assert engine.apply(state, rec("fd00::2", vpcEndpointId=UNKNOWN_VPCE)) == []
    (session,) = state.sessions.values()
    assert session.baseline()["vpcEndpoints"] == [{"vpcEndpointId": UNKNOWN_VPCE, "ownerAccountId": None}]
    # Once the registry knows its owner, the same endpoint decides.
    known = registry_from_mapping(
        {"accounts": {UNLISTED: {"affiliated": False, "vpc_endpoints": [UNKNOWN_VPCE]}}}, "reloaded"
    )
    group = one_with(known, [rec("10.0.0.1", vpcEndpointId=UNKNOWN_VPCE)])
    assert (group.type, group.remote_account, group.severity) == (INSIDE_AWS, UNLISTED, 8)


def one_with(registry: Any, records: list[dict[str, Any]]) -> Any:
    engine, state = Engine(registry, AWS), DetectorState()
    (group,) = apply_all(records, engine, state)
    return group


@pytest.mark.parametrize(
    "record",
    [rec("81.2.69.7"), rec("2a00:1450:4001::5"), rec("52.200.3.4"), rec("2a00:1450:4001::6", account=NOINV)],
)
def test_row_expected_network_is_nothing(record: dict[str, Any]) -> None:
    assert apply_all([record]) == []


@pytest.mark.parametrize("source", ["52.33.44.55", "2600:1f14::1"])
def test_row_aws_address_with_home_inventory_is_inside_aws_unknown_account(source: str) -> None:
    group = one([rec(source)])  # the very first one: no trust on first use with inventory known
    assert (group.type, group.remote_account, group.severity) == (INSIDE_AWS, None, 8)
    action = render(group)["service"]["action"]["awsApiCallAction"]
    assert action["remoteAccountDetails"] == {"affiliated": False}


def test_row_aws_address_without_inventory_trusts_first_ipv4_and_first_ipv6() -> None:
    engine, state = new_engine()
    first_v4, other_v4 = "52.33.44.55", "52.66.77.88"
    first_v6, other_v6 = "2600:1f14::1", "2600:1f14::2"

    def at(source: str, minute: int) -> list[Any]:
        return engine.apply(state, rec(source, account=NOINV, time=f"2026-11-09T08:{minute:02d}:00Z"))

    assert at(first_v4, 0) == []
    assert at(first_v4, 1) == []
    assert at("::ffff:" + first_v4, 2) == []  # the same address, IPv4-mapped
    assert at(first_v6, 3) == []  # the first IPv6 is learnt even after an IPv4
    assert at(first_v6, 4) == []
    (change,) = at(other_v4, 5)
    assert (change.group.type, change.group.remote_account, change.group.severity, change.new) == (INSIDE_AWS, None, 8, True)
    (change,) = at(other_v6, 6)
    assert (change.group.count, change.new) == (2, False)
    assert change.group.remote_addresses == [other_v4, other_v6]
    (session,) = state.sessions.values()
    assert (session.tofu_v4, session.tofu_v6) == (first_v4, first_v6)
    baseline = render(change.group)["service"]["additionalInfo"]["baseline"]
    assert (baseline["firstUseIpv4"], baseline["firstUseIpv6"]) == (first_v4, first_v6)


def test_trust_on_first_use_is_per_session_and_only_for_aws_unknown_addresses() -> None:
    engine, state = new_engine()
    # Other kinds of origin do not take the first-use place.
    for source in ("52.9.9.9", "81.2.69.7", "s3.amazonaws.com"):
        engine.apply(state, rec(source, account=NOINV))
    engine.apply(state, rec("10.0.0.1", account=NOINV, vpcEndpointId=NOINV_VPCE))
    assert engine.apply(state, rec("52.33.44.55", account=NOINV)) == []
    # Another instance of the same role has a baseline of its own.
    assert engine.apply(state, rec("52.66.77.88", account=NOINV, instance="i-0aaaaaaaaaaaaaaaa")) == []
    assert len(engine.apply(state, rec("52.66.77.88", account=NOINV))) == 1


def test_decisions_use_arrival_order_not_event_time() -> None:
    engine, state = new_engine()
    late = rec("52.33.44.55", account=NOINV, time="2026-11-09T09:00:00Z")
    early = rec("52.66.77.88", account=NOINV, time="2026-11-09T08:00:00Z")
    assert engine.apply(state, late) == []
    (change,) = engine.apply(state, early)
    assert change.group.ip == "52.66.77.88"


@pytest.mark.parametrize("source", ["10.1.2.3", "fd00::1234", "192.168.10.20", "fe80::1"])
def test_row_private_address_without_endpoint_is_outside_aws(source: str) -> None:
    group = one([rec(source)])
    assert (group.type, group.remote_account, group.severity, group.origin) == (OUTSIDE_AWS, None, 8, "PRIVATE_ADDRESS")
    assert "private address" in render(group)["description"]


@pytest.mark.parametrize(("source", "field"), [(OUT_V4, "ipAddressV4"), (OUT_V6, "ipAddressV6")])
def test_row_outside_aws_is_outside_aws(source: str, field: str) -> None:
    group = one([rec(source)])
    assert (group.type, group.remote_account, group.severity, group.origin) == (OUTSIDE_AWS, None, 8, "OUTSIDE_AWS")
    action = render(group)["service"]["action"]["awsApiCallAction"]
    assert action["remoteIpDetails"] == {field: source}
    assert "remoteAccountDetails" not in action


def test_failed_calls_count_like_successful_ones() -> None:
    group = one(
        [
            rec(OUT_V4, errorCode="AccessDenied", errorMessage="not authorized"),
            rec(OUT_V4, errorCode="Client.UnauthorizedOperation"),
            rec(OUT_V4),
        ]
    )
    assert group.count == 3


# --- SPEC §3: instance credential sessions ------------------------------------------------------------


@pytest.mark.parametrize("instance", ["i-0123456789abcdef0", "i-01234567", "i-abcdef12"])
def test_instance_ids_of_8_and_17_hex_digits_are_sessions(instance: str) -> None:
    group = one([rec(OUT_V4, instance=instance)])
    assert group.instance_id == instance
    assert group.session_key == f"arn:aws:sts::{HOME}:assumed-role/web-role/{instance}"


@pytest.mark.parametrize(
    "instance",
    [
        "i-0123456789ABCDEF0",
        "I-0123456789abcdef0",
        "i-1234567",
        "i-123456789",
        "i-0123456789abcdef",
        "i-0123456789abcdef01",
        "i-0123456789abcdeg0",
        "i-01234567-extra",
        "botocore-session-1700000000",
        "i_0123456789abcdef0",
    ],
)
def test_other_session_names_are_ignored(instance: str) -> None:
    engine, state = new_engine()
    assert engine.apply(state, rec(OUT_V4, instance=instance)) == []
    assert not state.sessions and engine.counters.instance_records == 0


@pytest.mark.parametrize(
    "identity",
    [
        {"type": "IAMUser", "arn": f"arn:aws:iam::{HOME}:user/alice", "accessKeyId": "AKIAEXAMPLE"},
        {"type": "Root", "arn": f"arn:aws:iam::{HOME}:root"},
        {"type": "AWSService", "invokedBy": "ec2.amazonaws.com"},
        {"type": "AssumedRole", "arn": f"arn:aws:sts::{HOME}:assumed-role/ops/alice@example.com"},
        {"type": "AssumedRole", "arn": f"arn:aws:iam::{HOME}:role/web-role"},
        {"type": "AssumedRole", "arn": f"arn:aws:sts::{HOME}:assumed-role/web-role/i-0123456789abcdef0/x"},
        {"type": "AssumedRole", "arn": f"arn:aws:sts::1234:assumed-role/web-role/i-0123456789abcdef0"},
        {"type": "AssumedRole"},
        {"type": "FederatedUser", "arn": f"arn:aws:sts::{HOME}:assumed-role/web-role/i-0123456789abcdef0"},
        {"type": "IAMUser", "arn": f"arn:aws:sts::{HOME}:assumed-role/web-role/i-0123456789abcdef0"},
    ],
)
def test_other_identities_are_ignored(identity: dict[str, Any]) -> None:
    engine, state = new_engine()
    record = rec(OUT_V4)
    record["userIdentity"] = identity
    assert engine.apply(state, record) == []
    assert not state.sessions and not state.groups


def test_partition_comes_from_the_arn() -> None:
    group = one([rec(OUT_V4, partition="aws-us-gov", account=HOME)])
    finding = render(group)
    assert finding["partition"] == "aws-us-gov"
    assert group.session_key.startswith("arn:aws-us-gov:sts::")


def test_ec2_role_delivery_is_recorded_when_present_and_not_required() -> None:
    engine, state = new_engine()
    groups = apply_all([rec(OUT_V4, delivery=None), rec(OUT_V4, delivery="1.0"), rec(OUT_V4, delivery="2.0")], engine, state)
    (session,) = state.sessions.values()
    assert session.deliveries == ("1.0", "2.0")
    assert render(groups[0])["service"]["additionalInfo"]["ec2RoleDelivery"] == ["1.0", "2.0"]
    assert render(one([rec(OUT_V4, delivery=None)]))["service"]["additionalInfo"]["ec2RoleDelivery"] == []


def test_credential_issuance_is_never_a_finding_and_enriches_the_session() -> None:
    engine, state = new_engine()
    record = issuance(key="ASIAISSUEDKEY0000001")
    record["sourceIPAddress"] = OUT_V4  # even an odd source does not make it a finding
    assert engine.apply(state, record) == []
    session = state.sessions[f"arn:aws:sts::{HOME}:assumed-role/web-role/i-0123456789abcdef0"]
    assert session.access_keys == ("ASIAISSUEDKEY0000001",)
    assert (session.instance_id, session.account, session.role) == ("i-0123456789abcdef0", HOME, "web-role")
    assert engine.counters.instance_records == 0
    # A later record without accessKeyId: the finding names the key EC2 issued.
    (change,) = engine.apply(state, rec(OUT_V4, access_key=None))
    assert render(change.group)["resource"]["accessKeyDetails"]["accessKeyId"] == "ASIAISSUEDKEY0000001"


@pytest.mark.parametrize(
    "record",
    [
        issuance(invoked_by="lambda.amazonaws.com"),
        issuance(instance="fn-session"),
        issuance(instance="i-0123456789ABCDEF0"),
        {**issuance(), "eventName": "AssumeRoleWithWebIdentity"},
        {**issuance(), "requestParameters": None},
    ],
)
def test_other_assume_role_records_do_not_enrich(record: dict[str, Any]) -> None:
    engine, state = new_engine()
    assert engine.apply(state, record) == []
    assert not state.sessions


def test_access_key_of_the_latest_record_is_reported() -> None:
    group = one([rec(OUT_V4, access_key="ASIAFIRST00000000001"), rec(OUT_V4, access_key="ASIASECOND0000000002")])
    assert render(group)["resource"]["accessKeyDetails"]["accessKeyId"] == "ASIASECOND0000000002"


def test_session_token_never_appears_in_any_output() -> None:
    token = "IQoJb3JpZ2luX2VjENEVERLEAVETHEBUILDING0123456789"
    engine, state = new_engine()
    groups = apply_all(
        [
            issuance(token=token),
            rec(OUT_V4, responseElements={"credentials": {"sessionToken": token + "X"}}),
            rec("52.4.4.4", requestParameters={"sessionToken": token}),
            rec("10.0.0.1", vpcEndpointId=PARTNER_VPCE),
        ],
        engine,
        state,
    )
    assert len(groups) == 3
    blobs = [orjson.dumps(render(g)) for g in groups]
    blobs += [orjson.dumps(g.to_data()) for g in groups]
    blobs += [orjson.dumps(s.to_data()) for s in state.sessions.values()]
    assert not any(token.encode() in blob for blob in blobs)


# --- SPEC §8: finding groups, ids, aggregation, rendering ---------------------------------------------


def test_finding_group_keys() -> None:
    engine, state = new_engine()
    groups = apply_all(
        [
            rec(OUT_V4),
            rec(OUT_V6),  # same OutsideAWS group: (type, session)
            rec("10.0.0.1"),  # private: OutsideAWS too, same group
            rec("52.4.4.4"),  # InsideAWS, AFFIL
            rec("10.0.0.1", vpcEndpointId=AFFIL_VPCE),  # same remote account: same group
            rec("52.7.7.7"),  # InsideAWS, PARTNER: another group
            rec("52.33.44.55"),  # InsideAWS, unknown account
            rec("2600:1f14::1"),  # unknown account again: same group
            rec(OUT_V4, instance="i-0bbbbbbbbbbbbbbbb"),  # another session
            rec(OUT_V4, role="other-role"),  # another session (role is part of the key)
        ],
        engine,
        state,
    )
    summary = sorted((g.type.rsplit(".", 1)[1], g.session_key.split("assumed-role/")[1], g.remote_account or "", g.count) for g in groups)
    assert summary == sorted(
        [
            ("OutsideAWS", "web-role/i-0123456789abcdef0", "", 3),
            ("InsideAWS", "web-role/i-0123456789abcdef0", AFFIL, 2),
            ("InsideAWS", "web-role/i-0123456789abcdef0", PARTNER, 1),
            ("InsideAWS", "web-role/i-0123456789abcdef0", "", 2),
            ("OutsideAWS", "web-role/i-0bbbbbbbbbbbbbbbb", "", 1),
            ("OutsideAWS", "other-role/i-0123456789abcdef0", "", 1),
        ]
    )
    assert len({g.id for g in groups}) == len(groups)


def test_finding_ids_are_deterministic_32_hex_and_independent_of_details() -> None:
    a = one([rec(OUT_V4, time="2026-11-09T08:00:00Z")])
    b = one([rec("1.1.1.1", time="2027-01-01T00:00:00Z", eventName="GetObject", awsRegion="eu-west-1")])
    c = one([rec(OUT_V4, instance="i-0bbbbbbbbbbbbbbbb")])
    inside = [one([rec("52.4.4.4")]), one([rec("52.7.7.7")]), one([rec("52.33.44.55")])]
    assert re.fullmatch(r"[0-9a-f]{32}", a.id)
    assert a.id == b.id != c.id
    assert len({a.id, *(g.id for g in inside)}) == 4
    assert render(a)["id"] == a.id


def test_count_and_first_last_seen_aggregate_out_of_order_records() -> None:
    engine, state = new_engine()
    changes = []
    for time in ("2026-11-09T08:05:00Z", "2026-11-09T08:01:30Z", "2026-11-09T08:09:59Z", "2026-11-09T08:07:00Z"):
        changes += engine.apply(state, rec(OUT_V4, time=time))
    assert [c.new for c in changes] == [True, False, False, False]
    group = changes[-1].group
    service = render(group)["service"]
    assert (service["count"], service["eventFirstSeen"], service["eventLastSeen"]) == (
        4,
        "2026-11-09T08:01:30Z",
        "2026-11-09T08:09:59Z",
    )
    finding = render(group)
    # createdAt / updatedAt are stream time (the latest eventTime seen) at opening and at the last change.
    assert (finding["createdAt"], finding["updatedAt"]) == ("2026-11-09T08:05:00.000Z", "2026-11-09T08:09:59.000Z")


def test_duplicate_event_ids_are_counted_once() -> None:
    engine, state = new_engine()
    first = rec(OUT_V4, event_id="11111111-2222-4333-8444-555555555555")
    changes = engine.apply(state, first)
    assert engine.apply(state, dict(first)) == []  # the same CloudTrail event, delivered again
    changes += engine.apply(state, rec(OUT_V4))
    assert changes[-1].group.count == 2


def test_remote_addresses_evidence_is_distinct_and_capped_at_16() -> None:
    records = [rec(f"8.8.{i}.{i}") for i in range(20)] + [rec("8.8.0.0")]
    group = one(records)
    evidence = render(group)["service"]["additionalInfo"]["remoteAddresses"]
    assert evidence == [f"8.8.{i}.{i}" for i in range(16)]
    assert group.count == 21


def test_render_inside_aws_known_account_through_endpoint() -> None:
    engine, state = new_engine()
    engine.imdsv1_findings = False  # SPEC §13's IMDSv1 finding of the first record is not this test's subject
    engine.apply(state, rec("10.9.9.9", vpcEndpointId=HOME_VPCE, time="2026-11-09T07:59:00Z"))
    engine.apply(state, rec("52.1.2.3", time="2026-11-09T07:59:30Z"))
    (group,) = apply_all(
        [
            rec("10.0.0.1", vpcEndpointId=AFFIL_VPCE, vpcEndpointAccountId=AFFIL, time="2026-11-09T08:00:00Z", delivery="1.0"),
            rec(
                "10.0.0.2",
                vpcEndpointId=AFFIL_VPCE,
                time="2026-11-09T08:03:00Z",
                awsRegion="eu-west-1",
                eventSource="secretsmanager.amazonaws.com",
                eventName="GetSecretValue",
                access_key="ASIALATESTKEY0000002",
            ),
        ],
        engine,
        state,
    )
    f = render(group)
    assert f["schemaVersion"] == "2.0"
    assert re.fullmatch(r"[0-9a-f]{32}", f["id"])
    assert f["type"] == INSIDE_AWS
    assert f["severity"] == 5 and isinstance(f["severity"], int)
    assert (f["accountId"], f["region"], f["partition"]) == (HOME, "eu-west-1", "aws")
    resource = f["resource"]
    assert resource["resourceType"] == "AccessKey"
    assert resource["accessKeyDetails"] == {
        "accessKeyId": "ASIALATESTKEY0000002",
        "principalId": "AROAEXAMPLEROLEID:i-0123456789abcdef0",
        "userName": "web-role",
        "userType": "AssumedRole",
    }
    assert resource["instanceDetails"]["instanceId"] == "i-0123456789abcdef0"
    action = f["service"]["action"]
    assert action["actionType"] == "AWS_API_CALL"
    call = action["awsApiCallAction"]
    assert (call["api"], call["serviceName"]) == ("GetSecretValue", "secretsmanager.amazonaws.com")
    assert call["remoteIpDetails"] == {"ipAddressV4": "10.0.0.2"}
    assert call["remoteAccountDetails"] == {"accountId": AFFIL, "affiliated": True}
    service = f["service"]
    assert service["count"] == 2
    assert (service["eventFirstSeen"], service["eventLastSeen"]) == ("2026-11-09T08:00:00Z", "2026-11-09T08:03:00Z")
    info = service["additionalInfo"]
    assert info["sessionArn"] == f"arn:aws:sts::{HOME}:assumed-role/web-role/i-0123456789abcdef0"
    assert info["originKind"] == "VPC_ENDPOINT"
    assert info["vpcEndpointId"] == AFFIL_VPCE
    assert info["remoteAddresses"] == ["10.0.0.1", "10.0.0.2"]
    assert info["baseline"]["vpcEndpoints"] == [{"vpcEndpointId": HOME_VPCE, "ownerAccountId": HOME}]
    assert info["baseline"]["addresses"] == ["52.1.2.3"]
    assert info["ec2RoleDelivery"] == ["1.0", "2.0"]
    assert (f["createdAt"], f["updatedAt"]) == ("2026-11-09T08:00:00.000Z", "2026-11-09T08:03:00.000Z")
    assert "different AWS account" in f["title"] and "web-role" in f["title"]
    for needle in ("i-0123456789abcdef0", "web-role", HOME, AFFIL, AFFIL_VPCE):
        assert needle in f["description"]
    orjson.dumps(f)  # JSON-ready


def test_render_inside_aws_unknown_account_and_outside_ipv6() -> None:
    inside = render(one([rec("2600:1f14::7")]))
    call = inside["service"]["action"]["awsApiCallAction"]
    assert call["remoteAccountDetails"] == {"affiliated": False}
    assert call["remoteIpDetails"] == {"ipAddressV6": "2600:1f14::7"}
    assert "2600:1f14::7" in inside["description"]
    assert inside["service"]["additionalInfo"]["originKind"] == "AWS_ADDRESS"
    assert "vpcEndpointId" not in inside["service"]["additionalInfo"]

    outside = render(one([rec(OUT_V6)]))
    call = outside["service"]["action"]["awsApiCallAction"]
    assert outside["type"] == OUTSIDE_AWS and outside["severity"] == 8
    assert call["remoteIpDetails"] == {"ipAddressV6": OUT_V6}
    assert "remoteAccountDetails" not in call
    assert "external IP address" in outside["title"]
    for needle in ("i-0123456789abcdef0", "web-role", HOME, OUT_V6):
        assert needle in outside["description"]


def test_render_without_a_source_address_has_no_remote_ip_details() -> None:
    call = render(one([rec("not-an-ip", vpcEndpointId=PARTNER_VPCE)]))["service"]["action"]["awsApiCallAction"]
    assert "remoteIpDetails" not in call
    assert call["remoteAccountDetails"] == {"accountId": PARTNER, "affiliated": False}


# --- SPEC §6: the session index (stream-time TTL, LRU cap) --------------------------------------------


def engine_with(**config: Any) -> tuple[Engine, DetectorState]:
    return Engine(REGISTRY, AWS), DetectorState(EngineConfig(**config))


def test_idle_session_expires_after_ttl_of_stream_time() -> None:
    engine, state = engine_with(session_ttl_seconds=3600)
    assert engine.apply(state, rec("52.33.44.55", account=NOINV, time="2026-11-09T08:00:00Z")) == []
    # Within the TTL the learnt address is remembered: another one is a finding.
    assert len(engine.apply(state, rec("52.66.77.88", account=NOINV, time="2026-11-09T08:59:00Z"))) == 1
    # Idle for more than the TTL: the entry is gone, the next address is learnt afresh.
    assert engine.apply(state, rec("52.99.99.99", account=NOINV, time="2026-11-09T10:00:00Z")) == []
    assert state.expired == 1


def test_sweep_drops_idle_sessions_as_stream_time_advances() -> None:
    engine, state = engine_with(session_ttl_seconds=3600)
    engine.apply(state, rec("s3.amazonaws.com", instance="i-0aaaaaaaaaaaaaaaa", time="2026-11-09T08:00:00Z"))
    engine.apply(state, rec("s3.amazonaws.com", instance="i-0bbbbbbbbbbbbbbbb", time="2026-11-09T08:30:00Z"))
    assert len(state.sessions) == 2
    engine.apply(state, rec("s3.amazonaws.com", instance="i-0cccccccccccccccc", time="2026-11-09T09:10:00Z"))
    assert [s.instance_id for s in state.sessions.values()] == ["i-0bbbbbbbbbbbbbbbb", "i-0cccccccccccccccc"]
    assert state.expired == 1
    # Records that arrive late do not move stream time back.
    engine.apply(state, rec("s3.amazonaws.com", instance="i-0dddddddddddddddd", time="2026-11-09T06:00:00Z"))
    assert state.stream_time == pytest.approx(engine_time("2026-11-09T09:10:00Z"))


def engine_time(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def test_lru_cap_evicts_the_least_recently_used_session() -> None:
    engine, state = engine_with(max_sessions=2)
    a, b, c = "i-0aaaaaaaaaaaaaaaa", "i-0bbbbbbbbbbbbbbbb", "i-0cccccccccccccccc"
    for instance, source in ((a, "52.33.0.1"), (b, "52.33.0.2"), (a, "52.33.0.1"), (c, "52.33.0.3")):
        assert engine.apply(state, rec(source, account=NOINV, instance=instance)) == []
    assert [s.instance_id for s in state.sessions.values()] == [a, c]
    assert state.evicted == 1
    # b was forgotten, so its next AWS address is learnt again rather than flagged.
    assert engine.apply(state, rec("52.33.9.9", account=NOINV, instance=b)) == []
    assert len(state.sessions) == 2 and state.evicted == 2


def test_finding_groups_outlive_evicted_sessions() -> None:
    engine, state = engine_with(max_sessions=1)
    (first,) = engine.apply(state, rec(OUT_V4, instance="i-0aaaaaaaaaaaaaaaa"))
    engine.apply(state, rec("s3.amazonaws.com", instance="i-0bbbbbbbbbbbbbbbb"))  # evicts the first session
    assert state.evicted == 1
    (again,) = engine.apply(state, rec(OUT_V4, instance="i-0aaaaaaaaaaaaaaaa"))
    assert again.group.id == first.group.id and not again.new and again.group.count == 2


def test_finding_groups_expire_after_the_finding_ttl() -> None:
    engine, state = engine_with(finding_ttl_seconds=24 * 3600)
    (first,) = engine.apply(state, rec(OUT_V4, time="2026-11-09T08:00:00Z"))
    engine.apply(state, rec("s3.amazonaws.com", instance="i-0bbbbbbbbbbbbbbbb", time="2026-11-11T08:00:00Z"))
    assert first.group.id not in state.groups
    (again,) = engine.apply(state, rec(OUT_V4, time="2026-11-11T08:00:01Z"))
    assert again.new and again.group.count == 1 and again.group.id == first.group.id


def test_times_render_as_iso_8601_with_four_digit_years() -> None:
    finding = render(one([rec(OUT_V4, time="0999-06-01T00:00:00.250Z")]))
    assert (finding["service"]["eventFirstSeen"], finding["service"]["eventLastSeen"]) == ("0999-06-01T00:00:00Z",) * 2
    finding = render(one([rec(OUT_V4, time="2026-11-09T08:00:00.250+02:00")]))
    assert (finding["createdAt"], finding["service"]["eventFirstSeen"]) == ("2026-11-09T06:00:00.250Z", "2026-11-09T06:00:00Z")
