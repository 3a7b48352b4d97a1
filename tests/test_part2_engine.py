"""SPEC part two in the pure core, one hand-built record at a time: §10 (input refinements), §11 (use after
the instance stopped), §12 (use from another instance), §13 (IMDSv1, first-use resets, apiCalls/errorCodes).

Every scenario runs through the three ways a record reaches ``Engine.apply`` — the fast decoder's struct
(replay), the reference decoder's dict converted once (inputs the fast decoder refuses), and a routed
record read back from its sessions-topic value (the service's detect stage) — and all must give the same
finding groups.
"""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
from test_engine_decisions import AWS, HOME, HUB, REGISTRY, issuance, rec

from detector.core import DetectorState, Engine, registry_from_mapping, render
from detector.core.engine import AFTER_STOP, IMDSV1, INSIDE_AWS, OTHER_INSTANCE, OUTSIDE_AWS, finding_id, record_instances
from detector.core.records import FastDecoder, classify, decode, decode_fast, decode_routed, encode_routed
from detector.core.registry import RegistryError

I = "i-0123456789abcdef0"
J = "i-0fedcba9876543210"
K = "i-0aaaaaaaaaaaaaaaa"
EGRESS = "i-0eeeeeeeeeeeeeeee"
VPC = "vpc-0123456789abcdef0"
VPCE = "vpce-0aaaaaaaaaaaaaaa0"
OLD_KEY = "ASIAOLDKEY0000000001"
NEW_KEY = "ASIANEWKEY0000000002"

_ids = itertools.count(1)


def t(minute: float, hour: int = 8) -> str:
    seconds = int(minute * 60)
    return f"2026-11-09T{hour + seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}Z"


def ec2_call(name: str, instances: list[str], time: str, *, error: str | None = None, in_response: bool = True,
             **extra: Any) -> dict[str, Any]:  # fmt: skip
    """An IAM user's EC2 call naming ``instances`` (StopInstances, TerminateInstances, StartInstances)."""
    items = {"items": [{"instanceId": i} for i in instances]}
    record: dict[str, Any] = {
        "eventVersion": "1.08",
        "userIdentity": {"type": "IAMUser", "arn": f"arn:aws:iam::{HOME}:user/ops", "accountId": HOME},
        "eventTime": time,
        "eventSource": "ec2.amazonaws.com",
        "eventName": name,
        "awsRegion": "us-east-1",
        "sourceIPAddress": "198.51.100.7",
        "requestParameters": {"instancesSet": items},
        "responseElements": {"requestId": "r", "instancesSet": items} if in_response and not error else None,
        "eventID": f"10000000-0000-4000-8000-{next(_ids):012d}",
    }
    if error:
        record["errorCode"] = error
    record.update(extra)
    return record


def state_change(instance: str, state: str, time: str) -> dict[str, Any]:
    return {
        "version": "0",
        "id": f"sc-{next(_ids)}",
        "detail-type": "EC2 Instance State-change Notification",
        "source": "aws.ec2",
        "account": HOME,
        "time": time,
        "region": "us-east-1",
        "resources": [f"arn:aws:ec2:us-east-1:{HOME}:instance/{instance}"],
        "detail": {"instance-id": instance, "state": state},
    }


def bid_evicted(instance: str, time: str) -> dict[str, Any]:
    return {
        "eventVersion": "1.05",
        "userIdentity": {"accountId": HOME, "invokedBy": "ec2.amazonaws.com"},
        "eventTime": time,
        "eventSource": "ec2.amazonaws.com",
        "eventName": "BidEvictedEvent",
        "eventType": "AwsServiceEvent",
        "awsRegion": "us-east-1",
        "sourceIPAddress": "ec2.amazonaws.com",
        "serviceEventDetails": {"instanceIdSet": [instance]},
        "eventID": f"20000000-0000-4000-8000-{next(_ids):012d}",
    }


def associate(instance: str | None, time: str, **extra: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"allocationId": "eipalloc-0123456789abcdef0"}
    if instance is not None:
        params["instanceId"] = instance
    else:
        params["networkInterfaceId"] = "eni-0123456789abcdef0"
    record = ec2_call("AssociateAddress", [], time, **extra)
    record["requestParameters"] = params
    record["responseElements"] = {"associationId": "eipassoc-1"}
    return record


def run(records: list[dict[str, Any]], registry: Any = REGISTRY, **options: Any) -> dict[str, Any]:
    """Apply ``records`` (as input values) by the three ways in; the final groups by id (equal on all)."""
    results = []
    for way in ("dict", "fast", "routed"):
        engine, state = Engine(registry, AWS, **options), DetectorState()
        groups: dict[str, Any] = {}
        decoder = FastDecoder()
        for value in records:
            raw = orjson.dumps(value)
            decoded: list[Any]
            if way == "fast":
                one = decoder.decode_line(raw)
                decoded = [one] if one is not None and not isinstance(one, str) else decode(raw).records
            elif way == "routed":  # the route stage's projected dicts, through the sessions topic
                decoded = [decode_routed(encode_routed(r)) for r in decode_fast(raw).records]
            else:
                decoded = decode(raw).records  # the reference decoder's dicts, converted by apply
            for record in decoded:
                for change in engine.apply(state, record):
                    groups[change.group.id] = change.group
        results.append({gid: render(g) for gid, g in groups.items()})
    plain, fast_, routed = results
    strip = lambda fs: {k: {**f, "createdAt": None, "updatedAt": None} for k, f in fs.items()}  # noqa: E731
    assert strip(plain) == strip(fast_), "the reference decoder's records and the fast decoder's disagree"
    assert strip(plain) == strip(routed), "a routed record decides otherwise than the record it came from"
    return plain


def of_type(findings: dict[str, Any], finding_type: str) -> list[dict[str, Any]]:
    return [f for f in findings.values() if f["type"] == finding_type]


# --- §10 ---------------------------------------------------------------------------------------------


def test_bare_record_without_event_version_is_a_record() -> None:
    bare = rec("8.8.8.8")
    del bare["eventVersion"]
    assert classify(bare).records == [bare]
    assert classify({"Records": [bare]}).records == [bare]
    assert FastDecoder().decode_line(orjson.dumps(bare)) is not None
    (outside,) = of_type(run([bare]), OUTSIDE_AWS)
    assert outside["service"]["count"] == 1
    # neither eventVersion nor eventTime: not a record (malformed), on both decoders
    neither = {"userIdentity": {"type": "AssumedRole"}, "sourceIPAddress": "8.8.8.8"}
    assert decode(orjson.dumps(neither)).malformed and decode_fast(orjson.dumps(neither)).malformed


def test_instance_identity_role_is_in_scope_other_aws_roles_are_not() -> None:
    ec2_instance = rec("8.8.8.8", role="aws:ec2-instance", access_key="ASIAIDENTITYROLE0001")
    infra = rec("8.8.4.4", role="aws:ec2-infrastructure", access_key="ASIAINFRAROLEKEY0001")
    findings = run([ec2_instance, infra])
    (outside,) = of_type(findings, OUTSIDE_AWS)
    assert outside["resource"]["accessKeyDetails"]["userName"] == "aws:ec2-instance"
    assert outside["service"]["additionalInfo"]["sessionArn"].endswith("assumed-role/aws:ec2-instance/" + I)


def test_state_change_notification_is_input_and_malformed_one_is_counted() -> None:
    event = state_change(I, "stopped", t(0))
    decoded = classify(event)
    assert decoded.records == [
        {
            "detail-type": "EC2 Instance State-change Notification", "eventTime": t(0),
            "detail": {"instance-id": I, "state": "stopped"}, "id": event["id"],
        }
    ]  # fmt: skip
    assert not decoded.skipped and not decoded.malformed
    broken = state_change(I, "stopped", t(0))
    del broken["detail"]["instance-id"]
    assert classify(broken).malformed == ["bad_detail"]
    assert decode_fast(orjson.dumps(state_change(I, "running", t(0)))).records  # kept by the service's filter


def test_record_instances_are_the_partitioning_keys() -> None:
    assert record_instances(rec()) == [I]
    assert record_instances(issuance(J)) == [J]
    assert record_instances(ec2_call("StopInstances", [I, J, K], t(0))) == [I, J, K]
    assert record_instances(classify(state_change(J, "terminated", t(0))).records[0]) == [J]
    # an instance stopping another: its own session and the other instance
    assert record_instances(rec(eventSource="ec2.amazonaws.com", eventName="StopInstances",
                                responseElements={"instancesSet": {"items": [{"instanceId": J}]}})) == [I, J]  # fmt: skip
    assert record_instances(ec2_call("StopInstances", [I], t(0), error="Client.DryRunOperation")) == []


# --- §11 ---------------------------------------------------------------------------------------------


def stolen_after(stop_records: list[dict[str, Any]], minutes_after: float, **kwargs: Any) -> list[dict[str, Any]]:
    records = [rec("52.1.2.3", time=t(0), access_key=OLD_KEY), *stop_records, rec("8.8.8.8", time=t(10 + minutes_after), access_key=OLD_KEY, **kwargs)]
    return of_type(run(records), AFTER_STOP)


@pytest.mark.parametrize(
    "stop,state",
    [
        (ec2_call("StopInstances", [J, I], t(10)), "stopped"),
        (ec2_call("StopInstances", [I], t(10), in_response=False), "stopped"),  # responseElements null
        (ec2_call("TerminateInstances", [I], t(10)), "terminated"),
        (bid_evicted(I, t(10)), "terminated"),
        (state_change(I, "stopping", t(10)), "stopped"),
        (state_change(I, "shutting-down", t(10)), "terminated"),
    ],
)
def test_use_after_stop_is_a_finding_after_the_grace(stop: dict[str, Any], state: str) -> None:
    (finding,) = stolen_after([stop], 10.5)
    assert finding["severity"] == 8
    info = finding["service"]["additionalInfo"]
    assert info["instanceState"] == state
    assert info["stoppedAt"] == t(10)
    assert info["accessKeyFirstSeen"] == t(0)
    assert info["originKind"] == "OUTSIDE_AWS" and info["remoteAddresses"] == ["8.8.8.8"]
    assert finding["id"] == finding_id(AFTER_STOP, f"arn:aws:sts::{HOME}:assumed-role/web-role/{I}", None)


def test_use_within_the_grace_or_of_a_failed_or_dry_run_stop_is_not() -> None:
    assert stolen_after([ec2_call("StopInstances", [I], t(10))], 9.9) == []
    assert stolen_after([ec2_call("StopInstances", [I], t(10), error="Client.DryRunOperation")], 60) == []
    assert stolen_after([ec2_call("StopInstances", [I], t(10), error="Client.UnauthorizedOperation")], 60) == []
    dry = ec2_call("StopInstances", [I], t(10), in_response=False)
    dry["requestParameters"]["dryRun"] = True
    assert stolen_after([dry], 60) == []
    assert stolen_after([ec2_call("StopInstances", [J], t(10))], 60) == []  # another instance stopped
    # the setting
    records = [rec("52.1.2.3", time=t(0)), ec2_call("StopInstances", [I], t(10)), rec("8.8.8.8", time=t(15))]
    assert of_type(run(records, stop_grace_seconds=60), AFTER_STOP)
    assert not of_type(run(records), AFTER_STOP)


def test_aws_service_origin_after_stop_is_not_a_finding() -> None:
    assert stolen_after([ec2_call("StopInstances", [I], t(10))], 60, sourceIPAddress="s3.amazonaws.com") == []


def test_the_stop_time_is_the_earliest_stop_since_the_latest_start() -> None:
    stops = [state_change(I, "stopped", t(12)), ec2_call("StopInstances", [I], t(10)), state_change(I, "terminated", t(30))]
    (finding,) = stolen_after(stops, 40)
    info = finding["service"]["additionalInfo"]
    assert (info["stoppedAt"], info["instanceState"]) == (t(10), "terminated")


def test_after_a_restart_only_a_key_known_before_the_stop_is_a_finding() -> None:
    base = [
        rec("52.1.2.3", time=t(0), access_key=OLD_KEY),
        ec2_call("StopInstances", [I], t(10)),
        ec2_call("StartInstances", [I], t(30)),
        rec("52.1.2.3", time=t(31), access_key=NEW_KEY),
    ]
    # the new key after the restart: the instance itself (clause b does not hold)
    assert not of_type(run([*base, rec("52.1.2.3", time=t(50), access_key=NEW_KEY)]), AFTER_STOP)
    # the old key, from elsewhere, after the restart: clause b
    (finding,) = of_type(run([*base, rec("8.8.8.8", time=t(50), access_key=OLD_KEY)]), AFTER_STOP)
    info = finding["service"]["additionalInfo"]
    assert (info["stoppedAt"], info["startedAt"], info["accessKeyFirstSeen"], info["clause"]) == (t(10), t(30), t(0), "b")
    # a record between the stop (+ grace) and the start arriving late: clause a
    (late,) = of_type(run([*base, rec("8.8.8.8", time=t(25), access_key=OLD_KEY)]), AFTER_STOP)
    assert late["service"]["additionalInfo"]["clause"] == "a"


def test_a_key_issued_before_the_stop_counts_as_known() -> None:
    records = [
        issuance(I, key=OLD_KEY, time=t(0)),
        ec2_call("StopInstances", [I], t(10)),
        state_change(I, "running", t(30)),
        rec("8.8.8.8", time=t(50), access_key=OLD_KEY),
    ]
    (finding,) = of_type(run(records), AFTER_STOP)
    assert finding["service"]["additionalInfo"]["accessKeyFirstSeen"] == t(0)


def test_after_stop_is_decided_independently_of_the_origin_decision() -> None:
    findings = run([rec("52.1.2.3", time=t(0)), ec2_call("StopInstances", [I], t(10)), rec("8.8.8.8", time=t(30))])
    assert len(of_type(findings, AFTER_STOP)) == 1 and len(of_type(findings, OUTSIDE_AWS)) == 1
    # the instance's own address after the stop: only AfterInstanceStopped
    findings = run([rec("52.1.2.3", time=t(0)), ec2_call("StopInstances", [I], t(10)), rec("52.1.2.3", time=t(30))])
    assert [f["type"] for f in findings.values()] == [AFTER_STOP]


def test_lifecycle_entries_expire_with_the_session_ttl() -> None:
    engine, state = Engine(REGISTRY, AWS), DetectorState()
    engine.apply(state, ec2_call("StopInstances", [I], t(0)))
    assert len(state.lifecycle) == 1
    engine.apply(state, rec("52.1.2.3", instance=J, time=t(0, hour=21)))  # 13 h later: swept
    assert state.lifecycle == {}


# --- §12 ---------------------------------------------------------------------------------------------

INVENTORY = registry_from_mapping(
    {
        "accounts": {
            HOME: {
                "cidrs": ["52.1.2.3/32"],
                "vpc_endpoints": {VPCE: {"vpc": VPC}, "vpce-0bbbbbbbbbbbbbbb0": {}},
                "instances": {
                    I: {"vpc": VPC, "private": ["10.0.1.5", "10.0.1.6"], "public": ["54.0.0.5"]},
                    J: {"vpc": VPC, "private": ["10.0.1.77"], "public": ["54.0.0.77"], "ipv6": ["2600:1f18:abc::77"]},
                    EGRESS: {"vpc": VPC, "private": ["10.0.1.99"], "public": ["54.0.0.99"], "egress": True},
                },
            },
            HUB: {"trusted": True, "instances": {K: {"public": ["54.9.9.9"]}}},
            "444455556666": {"instances": {"i-04444444444444444": {"public": ["54.4.4.4"]}}},
        }
    },
    "inventory.json",
)


def other_instance(*records: dict[str, Any]) -> list[dict[str, Any]]:
    return of_type(run(list(records), INVENTORY), OTHER_INSTANCE)


def test_use_from_another_instances_public_address() -> None:
    (finding,) = other_instance(rec("54.0.0.77", time=t(0)), rec("54.0.0.77", time=t(1)))
    info = finding["service"]["additionalInfo"]
    assert (info["otherInstanceId"], info["otherInstanceAccountId"], info["address"]) == (J, HOME, "54.0.0.77")
    assert finding["severity"] == 8 and finding["service"]["count"] == 2
    assert finding["id"] == finding_id(OTHER_INSTANCE, f"arn:aws:sts::{HOME}:assumed-role/web-role/{I}", None, J)
    (v6,) = other_instance(rec("2600:1f18:abc::77", time=t(0)))
    assert v6["service"]["additionalInfo"]["otherInstanceId"] == J
    (hub,) = other_instance(rec("54.9.9.9", time=t(0)))  # an instance of a trusted hub
    assert hub["service"]["additionalInfo"]["otherInstanceAccountId"] == HUB


def test_use_through_an_endpoint_from_another_instances_private_address() -> None:
    (finding,) = other_instance(rec("10.0.1.77", vpcEndpointId=VPCE, time=t(0)))
    info = finding["service"]["additionalInfo"]
    assert (info["otherInstanceId"], info["vpcEndpointId"], info["vpc"]) == (J, VPCE, VPC)
    # an endpoint whose VPC is not known: private addresses say nothing
    assert other_instance(rec("10.0.1.77", vpcEndpointId="vpce-0bbbbbbbbbbbbbbb0", time=t(0))) == []


def test_own_egress_unlisted_and_foreign_addresses_are_not_other_instance() -> None:
    assert other_instance(rec("54.0.0.5", time=t(0))) == []  # the instance's own address
    assert other_instance(rec("10.0.1.6", vpcEndpointId=VPCE, time=t(0))) == []  # its own secondary address
    assert other_instance(rec("54.0.0.99", time=t(0))) == []  # an egress instance (NAT)
    assert other_instance(rec("10.0.1.99", vpcEndpointId=VPCE, time=t(0))) == []
    assert other_instance(rec("52.1.2.3", time=t(0))) == []  # an account address of no instance
    # another, non-trusted account's instance: InsideAWS (§5), not this rule
    findings = run([rec("54.4.4.4", time=t(0))], INVENTORY)
    assert [f["type"] for f in findings.values()] == [INSIDE_AWS]
    assert list(findings.values())[0]["service"]["action"]["awsApiCallAction"]["remoteAccountDetails"]["accountId"] == "444455556666"


def test_registry_validates_the_new_keys_naming_file_key_and_problem() -> None:
    def error(account: dict[str, Any]) -> str:
        with pytest.raises(RegistryError) as caught:
            registry_from_mapping({"accounts": {HOME: account}}, "reg.json")
        return str(caught.value)

    assert error({"instances": {"i-xyz": {}}}).startswith(f"reg.json: accounts.{HOME}.instances.i-xyz: instance ID")
    assert error({"instances": {I: {"public": ["10.0.0.1", "nope"]}}}).startswith(f"reg.json: accounts.{HOME}.instances.{I}.public[1]:")
    assert "IPv4" in error({"instances": {I: {"public": ["2600::1"]}}})
    assert "IPv6" in error({"instances": {I: {"ipv6": ["10.0.0.1"]}}})
    assert error({"instances": {I: {"vpc": "vpc-x"}}}).startswith(f"reg.json: accounts.{HOME}.instances.{I}.vpc: VPC ID")
    assert "unknown field" in error({"instances": {I: {"subnet": "x"}}})
    assert "true or false" in error({"instances": {I: {"egress": "yes"}}})
    assert error({"vpc_endpoints": {VPCE: {"vpc": 3}}}).startswith(f"reg.json: accounts.{HOME}.vpc_endpoints.{VPCE}.vpc:")
    assert error({"vpc_endpoints": {"vpce-nope": {}}}).startswith(f"reg.json: accounts.{HOME}.vpc_endpoints.vpce-nope:")
    with pytest.raises(RegistryError, match="already listed"):
        registry_from_mapping({"accounts": {HOME: {"instances": {I: {}}}, HUB: {"instances": {I: {}}}}}, "reg.json")
    # the written form reads back the same
    again = registry_from_mapping(INVENTORY.to_mapping(), "again.json")
    assert again.to_mapping() == INVENTORY.to_mapping() and again.endpoint_vpc == {VPCE: VPC}


# --- §13 ---------------------------------------------------------------------------------------------


def test_imdsv1_is_a_low_finding_per_session_and_can_be_turned_off() -> None:
    records = [rec("s3.amazonaws.com", time=t(0), delivery="1.0"), rec("52.1.2.3", time=t(1), delivery="1.0"), rec("52.1.2.3", time=t(2))]
    (finding,) = of_type(run(records), IMDSV1)
    assert (finding["severity"], finding["service"]["count"]) == (2, 2)
    assert finding["service"]["additionalInfo"]["ec2RoleDelivery"] == ["1.0"]
    assert run(records, imdsv1_findings=False) == {}


def first_use(*records: dict[str, Any]) -> list[dict[str, Any]]:
    return of_type(run([rec(s, account="555566667777", time=t(i)) if isinstance(s, str) else s for i, s in enumerate(records)]), INSIDE_AWS)


@pytest.mark.parametrize(
    "reset",
    [
        ec2_call("StartInstances", [I], t(5)),
        state_change(I, "pending", t(5)),
        state_change(I, "running", t(5)),
        associate(I, t(5)),
    ],
)
def test_a_start_or_address_move_resets_first_use(reset: dict[str, Any]) -> None:
    assert len(first_use("52.10.0.1", "52.10.0.2")) == 1  # without the reset: a new AWS address is a finding
    assert first_use("52.10.0.1", reset, "52.10.0.2", "52.10.0.2") == []
    (again,) = first_use("52.10.0.1", reset, "52.10.0.2", "52.10.0.1")  # learnt anew: the old one is foreign now
    assert again["service"]["count"] == 1


def test_resets_that_do_not_count() -> None:
    assert len(first_use("52.10.0.1", associate(None, t(5)), "52.10.0.2")) == 1  # only a network interface named
    assert len(first_use("52.10.0.1", associate(I, t(5), errorCode="Client.InvalidAllocationID.NotFound"), "52.10.0.2")) == 1
    assert len(first_use("52.10.0.1", ec2_call("StartInstances", [J], t(5)), "52.10.0.2")) == 1  # another instance


def test_the_resetting_record_itself_is_judged_against_the_old_baseline() -> None:
    own = rec("52.10.0.2", account="555566667777", time=t(5), eventSource="ec2.amazonaws.com", eventName="AssociateAddress",
              requestParameters={"instanceId": I, "allocationId": "eipalloc-1"})  # fmt: skip
    (finding,) = first_use("52.10.0.1", own, "52.10.0.3", "52.10.0.3")
    assert finding["service"]["count"] == 1 and finding["service"]["action"]["awsApiCallAction"]["api"] == "AssociateAddress"


def test_reset_applies_to_every_session_of_the_instance() -> None:
    engine, state = Engine(REGISTRY, AWS), DetectorState()
    for role in ("web-role", "aws:ec2-instance"):
        engine.apply(state, rec("52.10.0.1", account="555566667777", role=role, time=t(0)))
    engine.apply(state, state_change(I, "running", t(1)) and classify(state_change(I, "running", t(1))).records[0])
    assert [s.tofu_v4 for s in state.sessions.values()] == [None, None]


def test_api_calls_and_error_codes_on_every_finding() -> None:
    records = [rec("8.8.8.8", time=t(0), eventSource=f"svc{i % 40}.amazonaws.com", eventName=f"Call{i % 40}") for i in range(80)]
    records += [rec("8.8.8.8", time=t(1), eventName="GetObject", errorCode="AccessDenied") for _ in range(3)]
    records.append(rec("8.8.8.8", time=t(1), eventName="GetObject", errorCode="NoSuchKey"))
    (finding,) = run(records).values()
    info = finding["service"]["additionalInfo"]
    calls = info["apiCalls"]
    assert calls[0] == {"eventSource": "s3.amazonaws.com", "eventName": "GetObject", "count": 4}
    assert len(calls) == 33 and calls[-1]["other"] is True and calls[-1]["pairs"] == 41 - 32
    assert sum(c["count"] for c in calls) == finding["service"]["count"] == 84
    assert info["errorCodes"] == {"AccessDenied": 3, "NoSuchKey": 1}


def test_finding_ids_of_part_one_are_unchanged() -> None:
    # the id formula of part one (SPEC §8), computed by hand
    import hashlib

    key = f"arn:aws:sts::{HOME}:assumed-role/web-role/{I}"
    for remote in (None, "444455556666"):
        material = "\x1f".join((INSIDE_AWS, key, remote or ""))
        assert finding_id(INSIDE_AWS, key, remote) == hashlib.sha256(material.encode()).hexdigest()[:32]
    assert finding_id(OTHER_INSTANCE, key, None, J) != finding_id(OTHER_INSTANCE, key, None, K)


def test_a_reloaded_registry_brings_its_inventory_into_force() -> None:
    engine, state = Engine(REGISTRY, AWS), DetectorState()
    assert [c.group.type for c in engine.apply(state, rec("54.0.0.77", time=t(0)))] == [OUTSIDE_AWS]
    engine.registry = INVENTORY  # what the service's hot reload does
    assert [c.group.type for c in engine.apply(state, rec("54.0.0.77", time=t(1)))] == [OTHER_INSTANCE]


def test_log_files_of_bare_records_take_the_fast_decoder() -> None:
    bare = [rec("8.8.8.8", time=t(i)) for i in range(3)]
    for record in bare:
        del record["eventVersion"]
    raw = orjson.dumps({"Records": bare})
    fast = FastDecoder().decode_document(raw)
    assert fast is not None and len(fast) == 3
    # an element that is no record (neither eventVersion nor eventTime): the reference decoder decides
    raw = orjson.dumps({"Records": [*bare, {"userIdentity": {}}]})
    assert FastDecoder().decode_document(raw) is None
    assert decode(raw).malformed == ["bad_record"]


def test_registry_check_names_file_key_and_problem_of_the_new_keys(run_detector: Any, tmp_path: Any) -> None:
    good = tmp_path / "registry.json"
    good.write_bytes(orjson.dumps(INVENTORY.to_mapping()))
    proc = run_detector("registry", "check", good)
    assert proc.returncode == 0, proc.stderr
    summary = orjson.loads(proc.stdout)
    assert (summary["instances"], summary["vpc_endpoints"]) == (5, 2)
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[accounts.{HOME}.instances.{J}]\nvpc = "vpc-0123456789abcdef0"\nprivate = ["10.0.1.300"]\n')
    proc = run_detector("registry", "check", bad)
    assert proc.returncode != 0
    assert f"{bad}: accounts.{HOME}.instances.{J}.private[0]: must be an IP address" in proc.stderr.decode()


@pytest.mark.parametrize("handoff", ["records", "offsets"])
def test_split_replay_applies_lifecycle_records_as_one_process_does(handoff: str, tmp_path: Any, monkeypatch: Any) -> None:
    """The two-process replay (a scanner passes on what may matter) keeps lifecycle records of anyone."""
    import detector.replay
    from detector.replay import Replayer

    monkeypatch.setattr(detector.replay, "SPLIT_MIN_BYTES", 1)
    monkeypatch.setattr(detector.replay, "SPLIT_HANDOFF", handoff)
    records = [rec("52.1.2.3", time=t(0), access_key=OLD_KEY), {"detail-type": "Scheduled Event", "detail": {}},
               ec2_call("StopInstances", [I], t(10)), bid_evicted(J, t(10)), state_change(K, "stopped", t(10)),
               rec("8.8.8.8", time=t(30), access_key=OLD_KEY), rec("8.8.4.4", instance=J, time=t(30)),
               rec("8.8.4.4", instance=K, time=t(30), delivery="1.0")]  # fmt: skip
    path = tmp_path / "input.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(r) for r in records) + b"\n")
    results = []
    for jobs in (1, 2):
        replayer = Replayer(Engine(REGISTRY, AWS), DetectorState(), jobs=jobs)
        replayer.run([str(path)])
        results.append(sorted((f["type"], f["resource"]["instanceDetails"]["instanceId"]) for f in replayer.findings()))
    assert results[0] == results[1]
    assert [i for kind, i in results[0] if kind == AFTER_STOP] == sorted([I, J, K])


def test_over_the_findings_cap_low_groups_go_first() -> None:
    from detector.core import EngineConfig

    engine = Engine(REGISTRY, AWS)
    state = DetectorState(EngineConfig(max_findings=2))
    engine.apply(state, rec("8.8.8.8", time=t(0)))  # OutsideAWS, the oldest group
    for n, instance in enumerate((J, K)):  # two IMDSv1 groups, newer
        engine.apply(state, rec("s3.amazonaws.com", instance=instance, time=t(1 + n), delivery="1.0"))
    engine.apply(state, rec("s3.amazonaws.com", time=t(10, hour=9)))  # a sweep, an hour later
    assert sorted(g.type for g in state.groups.values()) == [IMDSV1, OUTSIDE_AWS]
