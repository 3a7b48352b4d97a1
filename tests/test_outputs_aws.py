"""`detector export securityhub` and `detector respond` against a real moto server (Security Hub, IAM,
STS) and the real test broker: a labelled world's findings — earlier and later states of the same ids —
on a findings topic, consumed by the real consumers; faults from a real HTTP proxy in front of moto."""

from __future__ import annotations

import asyncio
import copy
import io
import json
import os
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aws_helpers import FaultProxy, MotoServer, query_error, throttle_json
from kafka_support import broker, create_topics, unique, wait_until  # noqa: F401 - fixture

from detector.core.engine import Engine
from detector.core.registry import registry_from_mapping
from detector.embedded import EmbeddedBroker
from detector.outputs.consumer import FindingConsumer
from detector.outputs.containment import POLICY_NAME, ROLE_POLICY_LIMIT, policy_size, sid
from detector.outputs.export import ExportMetrics, SecurityHubExporter
from detector.outputs.respond import Responder, RespondMetrics
from detector.outputs.settings import ExportSettings, RespondSettings
from detector.replay import Replayer
from detector.service.app import eventbridge_envelope
from detector.service.logging import configure_logging
from worldgen import INSIDE, World, make_world

pytestmark = [pytest.mark.kafka, pytest.mark.aws]

REGION = "us-east-1"
KEYS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
EXPORT_ROLE = "arn:aws:iam::{account}:role/DetectorSecurityHub"
RESPOND_ROLE = "arn:aws:iam::{account}:role/DetectorRespond"


@dataclass
class States:
    world: World
    early: dict[str, dict[str, Any]]  # id -> the state after the first half of the inputs
    final: dict[str, dict[str, Any]]  # id -> the final state

    def messages(self) -> list[tuple[bytes, bytes]]:
        """(key, value): every early state, then every final state (some enveloped), then one stale repeat."""
        out = [(f["id"].encode(), orjson.dumps(f)) for f in self.early.values()]
        for i, f in enumerate(self.final.values()):
            out.append((f["id"].encode(), orjson.dumps(eventbridge_envelope(f) if i % 3 == 0 else f)))
        changed = [f for f in self.early.values() if f["updatedAt"] != self.final[f["id"]]["updatedAt"]]
        out.append((changed[0]["id"].encode(), orjson.dumps(changed[0])))  # an older state after a newer one
        out.append((b"junk", b"{not json"))
        out.append((b"other", orjson.dumps({"type": "Recon:EC2/PortProbeUnprotectedPort", "id": "x"})))
        return out


def world_states(aws_ranges: Any, seed: int = 11, n_accounts: int = 2) -> States:
    # Part-one worlds (the finding types these outputs were written for); part-two types: see tests/worldgen.py.
    world = make_world(seed, n_accounts=n_accounts, instances_per_account=3, part2=False)
    replayer = Replayer(Engine(registry_from_mapping(world.registry, "world"), aws_ranges, imdsv1_findings=False))
    messages = world.messages()
    half = len(messages) // 2
    for raw in messages[:half]:
        replayer.feed_raw(raw)
    early = {f["id"]: f for f in replayer.findings()}
    for raw in messages[half:]:
        replayer.feed_raw(raw)
    final = {f["id"]: f for f in replayer.findings()}
    assert len(final) == len(world.expected) and early and set(early) < set(final)
    assert any(early[i]["updatedAt"] != final[i]["updatedAt"] for i in early), "later states of the same ids"
    return States(world, early, final)


@pytest.fixture
def moto(monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoServer]:
    server = MotoServer()
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEYS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", KEYS["aws_secret_access_key"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    yield server
    server.stop()


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    yield stream
    configure_logging("warning", "json")


def log_events(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]


def account_client(moto: MotoServer, service: str, account: str, region: str = REGION) -> Any:
    creds = moto.client("sts").assume_role(RoleArn=f"arn:aws:iam::{account}:role/test-setup", RoleSessionName="test")["Credentials"]
    return boto3.client(
        service, endpoint_url=moto.url, region_name=region, aws_access_key_id=creds["AccessKeyId"],
        aws_secret_access_key=creds["SecretAccessKey"], aws_session_token=creds["SessionToken"],
    )  # fmt: skip


async def produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]], partitions: int = 2) -> None:
    await create_topics(bootstrap, {topic: partitions})
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await asyncio.gather(*[await producer.send(topic, value=v, key=k) for k, v in messages])
    finally:
        await producer.stop()


async def drain(consumer: FindingConsumer, total: int, timeout: float = 60.0) -> None:
    """Run ``consumer`` until it has committed ``total`` messages, then stop it (SIGTERM's path)."""
    task = asyncio.create_task(consumer.run())
    try:
        await wait_until(lambda: task.done() or sum(consumer.committed.values()) >= total, timeout=timeout)
        assert consumer.http is not None
        async with aiohttp.ClientSession() as http:
            for path in ("/healthz", "/readyz", "/metrics"):
                async with http.get(f"http://127.0.0.1:{consumer.http.port}{path}") as resp:
                    assert resp.status == 200, path
    finally:
        consumer.stop()
        assert await asyncio.wait_for(task, timeout=30) == 0
    assert sum(consumer.committed.values()) == total


def consumer_settings(cls: type[Any], bootstrap: str, topic: str, role: str, **overrides: Any) -> Any:
    """Settings of a consumer under test: its own group, any free HTTP port, fast AWS retries."""
    values: dict[str, Any] = dict(
        kafka_bootstrap=bootstrap, findings_topic=topic, group_id=unique(cls.__name__.lower()), http_port=0,
        log_level="warning", assume_role_arn=role, aws_retry_base_seconds=0.01, aws_retry_max_seconds=0.05, batch_size=40,
    )  # fmt: skip
    return cls(**(values | overrides))


def export_settings(bootstrap: str, topic: str, **overrides: Any) -> ExportSettings:
    return consumer_settings(ExportSettings, bootstrap, topic, EXPORT_ROLE, **overrides)


def respond_settings(bootstrap: str, topic: str, **overrides: Any) -> RespondSettings:
    return consumer_settings(RespondSettings, bootstrap, topic, RESPOND_ROLE, **overrides)


def enable_hubs(moto: MotoServer, states: States, skip: set[str] = frozenset()) -> set[tuple[str, str]]:  # type: ignore[assignment]
    places = {(f["accountId"], f["region"]) for f in states.final.values()}
    for account, region in places:
        if account not in skip:
            account_client(moto, "securityhub", account, region).enable_security_hub()
    return places


def hub_findings(moto: MotoServer, account: str, region: str) -> dict[str, dict[str, Any]]:
    hub = account_client(moto, "securityhub", account, region)
    found: dict[str, dict[str, Any]] = {}
    for page in hub.get_paginator("get_findings").paginate():
        for doc in page["Findings"]:
            found[doc["Id"]] = doc
    return found


# ======================================================================================================
# export securityhub
# ======================================================================================================


async def test_export_every_finding_with_its_latest_state(broker: EmbeddedBroker, moto: MotoServer, aws_ranges: Any) -> None:  # noqa: F811
    states = world_states(aws_ranges)
    topic = unique("findings")
    messages = states.messages()
    await produce(broker.bootstrap, topic, messages)
    places = enable_hubs(moto, states)
    metrics = ExportMetrics()
    settings = export_settings(broker.bootstrap, topic)
    await drain(FindingConsumer(settings, metrics, SecurityHubExporter(settings, metrics)), len(messages))

    for account, region in places:
        found = hub_findings(moto, account, region)
        mine = {f["arn"]: f for f in states.final.values() if (f["accountId"], f["region"]) == (account, region)}
        assert set(found) == set(mine), f"{account} {region}"
        for asff_id, doc in found.items():
            f = mine[asff_id]
            assert doc["UpdatedAt"] == f["updatedAt"], "the latest state, never an older one"
            assert doc["ProductFields"]["ec2-credential-detector/count"] == str(f["service"]["count"])
            assert doc["ProductArn"] == f"arn:aws:securityhub:{region}:{account}:product/{account}/default"
            assert doc["AwsAccountId"] == account and doc["Severity"]["Original"] == str(f["severity"])
    # each id imported at least once, each message at most once (an early state and its final one in the same
    # batch: the early one is superseded)
    assert len(states.final) <= metrics.imported._value.get() <= len(states.early) + len(states.final)
    assert metrics.skipped.labels("stale")._value.get() >= 1
    assert metrics.skipped.labels("not_json")._value.get() == 1
    assert metrics.skipped.labels("unknown_type")._value.get() == 1
    assert sum(child._value.get() for child in metrics.failed._metrics.values()) == 0
    # the same states again from the start, by a fresh process (what a crash before the commit repeats)
    before = {place: hub_findings(moto, *place) for place in places}
    again = ExportMetrics()
    settings = export_settings(broker.bootstrap, topic)
    await drain(FindingConsumer(settings, again, SecurityHubExporter(settings, again)), len(messages))
    assert {place: hub_findings(moto, *place) for place in places} == before


async def test_export_retries_throttling_and_names_a_disabled_hub(
    broker: EmbeddedBroker, moto: MotoServer, aws_ranges: Any, logs: io.StringIO, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    states = world_states(aws_ranges, seed=12)
    accounts = sorted({f["accountId"] for f in states.final.values()})
    disabled = accounts[0]
    enable_hubs(moto, states, skip={disabled})
    proxy = FaultProxy(moto.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    throttled = proxy.add(throttle_json("/findings/import", 3))
    topic = unique("findings")
    messages = [(f["id"].encode(), orjson.dumps(f)) for f in states.final.values()]
    await produce(broker.bootstrap, topic, messages)
    metrics = ExportMetrics()
    settings = export_settings(broker.bootstrap, topic, aws_max_attempts=2)
    try:
        await drain(FindingConsumer(settings, metrics, SecurityHubExporter(settings, metrics)), len(messages))
    finally:
        proxy.stop()
    assert throttled.served == 3
    assert metrics.throttled._value.get() == 3
    assert metrics.batch_retries._value.get() >= 1, "2 attempts per call: a third 429 defers the batch"
    off = [f for f in states.final.values() if f["accountId"] == disabled]
    on = [f for f in states.final.values() if f["accountId"] != disabled]
    assert metrics.failed.labels("hub_disabled")._value.get() == len(off)
    assert metrics.imported._value.get() == len(on)
    for account, region in {(f["accountId"], f["region"]) for f in on}:
        assert {d["Id"] for d in hub_findings(moto, account, region).values()} == {
            f["arn"] for f in on if (f["accountId"], f["region"]) == (account, region)
        }
    errors = [e for e in log_events(logs) if e.get("event") == "export_failed"]
    assert errors and all(e["reason"] == "hub_disabled" and e["account"] == disabled for e in errors)
    assert disabled in errors[0]["error"]


async def test_export_invalid_access_from_batch_import_is_a_disabled_hub(
    broker: EmbeddedBroker, moto: MotoServer, aws_ranges: Any, logs: io.StringIO, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """Security Hub disabled between DescribeHub and the import: BatchImportFindings's own
    InvalidAccessException (as AWS sends it, HTTP 401) counts the findings as hub_disabled, no crash loop."""
    from aws_helpers import Fault

    states = world_states(aws_ranges, seed=13)
    account = sorted({f["accountId"] for f in states.final.values()})[0]
    mine = [f for f in states.final.values() if f["accountId"] == account]
    enable_hubs(moto, states)
    proxy = FaultProxy(moto.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    body = json.dumps({"__type": "InvalidAccessException", "Message": f"Account {account} is not subscribed to AWS Security Hub"})
    fault = proxy.add(Fault(lambda r: r.method == "POST" and r.path.startswith("/findings/import"), 401, body.encode(), 10_000))
    topic = unique("findings")
    messages = [(f["id"].encode(), orjson.dumps(f)) for f in mine]
    await produce(broker.bootstrap, topic, messages, partitions=1)
    metrics = ExportMetrics()
    settings = export_settings(broker.bootstrap, topic)
    try:
        await drain(FindingConsumer(settings, metrics, SecurityHubExporter(settings, metrics)), len(messages))
    finally:
        proxy.stop()
    assert fault.served >= 1 and metrics.batch_retries._value.get() == 0
    assert metrics.failed.labels("hub_disabled")._value.get() == len(mine) and metrics.imported._value.get() == 0
    errors = [e for e in log_events(logs) if e.get("event") == "export_failed"]
    assert errors and all(e["account"] == account and account in e["error"] for e in errors)


async def test_export_with_own_credentials_and_failed_findings_reported(
    broker: EmbeddedBroker, moto: MotoServer, aws_ranges: Any, logs: io.StringIO, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """No role template: every finding goes to the process's own account (the Security Hub administrator's
    way), under that account's product. A finding Security Hub lists in FailedFindings is logged and counted."""
    from aws_helpers import Fault

    states = world_states(aws_ranges, seed=14)
    own = moto.client("sts").get_caller_identity()["Account"]
    findings = [f for f in states.final.values() if f["region"] == REGION][:6]
    assert len(findings) >= 2
    moto.client("securityhub").enable_security_hub()
    topic = unique("findings")
    await produce(broker.bootstrap, topic, [(f["id"].encode(), orjson.dumps(f)) for f in findings], partitions=1)
    metrics = ExportMetrics()
    settings = export_settings(broker.bootstrap, topic, assume_role_arn=None)
    await drain(FindingConsumer(settings, metrics, SecurityHubExporter(settings, metrics)), len(findings))
    found = hub_findings(moto, own, REGION)
    assert set(found) == {f["arn"] for f in findings}
    assert all(d["ProductArn"] == f"arn:aws:securityhub:{REGION}:{own}:product/{own}/default" for d in found.values())
    assert {d["AwsAccountId"] for d in found.values()} == {f["accountId"] for f in findings} != {own}
    # Security Hub rejecting one finding of a call (a real HTTP answer from the proxy)
    later = copy.deepcopy(findings[0])
    later["updatedAt"] = "2030-01-01T00:00:00.000Z"
    answer = {"FailedCount": 1, "SuccessCount": 0, "FailedFindings": [
        {"Id": later["arn"], "ErrorCode": "InvalidInput", "ErrorMessage": "Finding does not adhere to ASFF"}]}  # fmt: skip
    proxy = FaultProxy(moto.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    proxy.add(Fault(lambda r: r.method == "POST" and r.path.startswith("/findings/import"), 200, json.dumps(answer).encode(), 1))
    await produce(broker.bootstrap, topic, [(later["id"].encode(), orjson.dumps(later))], partitions=1)
    settings = export_settings(broker.bootstrap, topic, assume_role_arn=None)  # a new group: no wait for the old one
    try:
        await drain(FindingConsumer(settings, metrics, SecurityHubExporter(settings, metrics)), len(findings) + 1)
    finally:
        proxy.stop()
    assert metrics.failed.labels("rejected")._value.get() == 1
    (error,) = [e for e in log_events(logs) if e.get("event") == "export_failed"]
    assert error["reason"] == "rejected" and "InvalidInput" in error["error"] and error["finding_ids"] == [later["id"]]


# ======================================================================================================
# respond
# ======================================================================================================


def create_roles(moto: MotoServer, world: World, missing: set[str] = frozenset()) -> dict[str, str]:  # type: ignore[assignment]
    """Every instance role of the world in its home account (but ``missing``); role -> account."""
    trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}
    roles = {}
    for account in world.accounts.values():
        for role in account.roles:
            roles[role] = account.account_id
            if role not in missing:
                account_client(moto, "iam", account.account_id).create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps(trust))
    return roles


def role_policies(moto: MotoServer, roles: dict[str, str]) -> dict[str, dict[str, Any]]:
    """role -> its containment policy document (roles without one left out)."""
    out = {}
    for role, account in roles.items():
        iam = account_client(moto, "iam", account)
        try:
            names = iam.list_role_policies(RoleName=role)["PolicyNames"]
        except iam.exceptions.NoSuchEntityException:
            continue
        if POLICY_NAME in names:
            out[role] = iam.get_role_policy(RoleName=role, PolicyName=POLICY_NAME)["PolicyDocument"]
    return out


def expected_containment(states: States) -> dict[str, dict[str, Any]]:
    """From the world's labels alone: role -> {Sid: (instance ARN, kinds of the group)} of its High groups."""
    by_session = {f["service"]["additionalInfo"]["sessionArn"]: [] for f in states.final.values()}
    for f in states.final.values():
        by_session[f["service"]["additionalInfo"]["sessionArn"]].append(f)
    out: dict[str, dict[str, Any]] = defaultdict(dict)
    for group in states.world.groups:
        if group.severity != 8:
            continue
        (finding,) = [
            f for f in by_session[group.session_arn] if f["type"] == group.type
            and (group.type != INSIDE or (f["service"]["action"]["awsApiCallAction"]["remoteAccountDetails"].get("accountId") == group.remote_account_id))
        ]  # fmt: skip
        role = group.session_arn.split("/")[1]
        out[role][sid(finding["id"])] = (f"arn:aws:ec2:*:{group.account_id}:instance/{group.instance_id}", group.kinds)
    return dict(out)


def check_statements(policies: dict[str, dict[str, Any]], expected: dict[str, dict[str, Any]]) -> None:
    assert set(policies) == set(expected), "exactly the roles of High findings"
    for role, document in policies.items():
        statements = {s["Sid"]: s for s in document["Statement"]}
        assert len(statements) == len(document["Statement"]), "no statement twice"
        assert set(statements) == set(expected[role]), role
        for sid_, stmt in statements.items():
            arn, kinds = expected[role][sid_]
            assert (stmt["Effect"], stmt["Action"], stmt["Resource"]) == ("Deny", "*", "*")
            condition = stmt["Condition"]
            assert condition["ArnLike"] == {"ec2:SourceInstanceARN": arn}
            if "StringEquals" in condition:
                assert condition["StringEquals"]["aws:SourceVpce"].startswith("vpce-")
                assert any(k.startswith("endpoint_") for k in kinds)
            else:
                assert condition["IpAddress"]["aws:SourceIp"]
                assert any(not k.startswith("endpoint_") for k in kinds)
        assert policy_size(document) <= ROLE_POLICY_LIMIT


async def test_respond_dry_run_changes_nothing(broker: EmbeddedBroker, moto: MotoServer, aws_ranges: Any) -> None:  # noqa: F811
    states = world_states(aws_ranges)
    roles = create_roles(moto, states.world)
    topic = unique("findings")
    messages = states.messages()
    await produce(broker.bootstrap, topic, messages)
    out = io.StringIO()
    metrics = RespondMetrics()
    settings = respond_settings(broker.bootstrap, topic)
    await drain(FindingConsumer(settings, metrics, Responder(settings, metrics, out=out)), len(messages))
    assert role_policies(moto, roles) == {}, "a dry run attaches nothing"
    printed: dict[str, dict[str, Any]] = {}
    for line in out.getvalue().splitlines():
        doc = json.loads(line)
        assert doc["dryRun"] is True and doc["policyName"] == POLICY_NAME and roles[doc["roleName"]] == doc["accountId"]
        printed.setdefault(doc["roleName"], {"Version": "2012-10-17", "Statement": []})["Statement"] += doc["policyDocument"]["Statement"]
    check_statements(printed, expected_containment(states))
    assert metrics.dry_run._value.get() == len(out.getvalue().splitlines())


async def test_respond_apply_attaches_exactly_the_expected_statements_twice_the_same(
    broker: EmbeddedBroker, moto: MotoServer, aws_ranges: Any  # noqa: F811
) -> None:
    states = world_states(aws_ranges)
    roles = create_roles(moto, states.world)
    expected = expected_containment(states)
    topic = unique("findings")
    messages = states.messages()
    await produce(broker.bootstrap, topic, messages)
    metrics = RespondMetrics()
    settings = respond_settings(broker.bootstrap, topic, apply=True)
    await drain(FindingConsumer(settings, metrics, Responder(settings, metrics)), len(messages))
    first = role_policies(moto, roles)
    check_statements(first, expected)
    assert metrics.statements_added._value.get() == sum(len(v) for v in expected.values())
    assert metrics.skipped.labels("severity")._value.get() == sum(1 for g in states.world.groups if g.severity != 8)
    # a second run from the start (a crash before any commit looks the same): nothing added, nothing twice
    again = RespondMetrics()
    settings = respond_settings(broker.bootstrap, topic, apply=True)
    await drain(FindingConsumer(settings, again, Responder(settings, again)), len(messages))
    assert role_policies(moto, roles) == first
    assert again.policies_attached._value.get() == 0
    assert again.statements_present._value.get() == metrics.statements_added._value.get()


async def test_respond_contains_part_two_findings_per_spec(broker: EmbeddedBroker, moto: MotoServer, aws_ranges: Any) -> None:  # noqa: F811
    """SPEC §14 on part two's High types, against IAM: AfterInstanceStopped is denied by token issue time
    before the stop, OtherInstance by the other instance's address (`aws:VpcSourceIp` through an endpoint,
    else `aws:SourceIp`); findings of AWS's reserved identity role are skipped, never attempted."""
    world = make_world(5, n_accounts=2, instances_per_account=3)  # every part-two case
    replayer = Replayer(Engine(registry_from_mapping(world.registry, "world"), aws_ranges))
    for raw in world.messages():
        replayer.feed_raw(raw)
    findings = {f["id"]: f for f in replayer.findings()}
    roles = create_roles(moto, world)
    topic = unique("findings")
    messages = [(i.encode(), orjson.dumps(f)) for i, f in findings.items()]
    await produce(broker.bootstrap, topic, messages)
    metrics = RespondMetrics()
    settings = respond_settings(broker.bootstrap, topic, apply=True)
    await drain(FindingConsumer(settings, metrics, Responder(settings, metrics)), len(messages))
    statements = {s["Sid"]: s for doc in role_policies(moto, roles).values() for s in doc["Statement"]}
    high = [f for f in findings.values() if f["severity"] == 8]
    reserved = [f for f in high if f["resource"]["accessKeyDetails"]["userName"].startswith("aws:")]
    checked = {"AfterInstanceStopped": 0, "OtherInstance": 0}
    rolled_off = 0  # a role's oldest statements roll off at IAM's inline policy size limit (counted)
    for f in high:
        kind = f["type"].rsplit(".", 1)[-1]
        if f in reserved or sid(f["id"]) not in statements:
            assert sid(f["id"]) not in statements
            rolled_off += f not in reserved
            continue
        condition = statements[sid(f["id"])]["Condition"]
        instance = f["resource"]["instanceDetails"]["instanceId"]
        assert condition["ArnLike"] == {"ec2:SourceInstanceARN": f"arn:aws:ec2:*:{f['accountId']}:instance/{instance}"}
        info = f["service"]["additionalInfo"]
        if kind == "AfterInstanceStopped":
            assert condition["DateLessThan"] == {"aws:TokenIssueTime": info["stoppedAt"]}
            checked[kind] += 1
        elif kind == "OtherInstance":
            key = "aws:VpcSourceIp" if info.get("vpcEndpointId") else "aws:SourceIp"
            assert list(condition["IpAddress"]) == [key]
            assert condition["IpAddress"][key].split("/")[0] == info["address"]
            checked[kind] += 1
    assert all(checked.values()), checked
    assert reserved and metrics.skipped.labels("reserved_role")._value.get() == len(reserved)
    assert metrics.rolled_off._value.get() == rolled_off


async def test_respond_faults_role_gone_limit_throttling_pattern_and_size(
    broker: EmbeddedBroker, moto: MotoServer, aws_ranges: Any, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    states = world_states(aws_ranges, seed=11, n_accounts=3)
    expected = expected_containment(states)
    by_size = sorted(expected, key=lambda r: len(expected[r]))
    assert len(by_size) >= 5
    gone, limited, excluded, crowded = by_size[0], by_size[1], by_size[2], by_size[-1]
    roles = create_roles(moto, states.world, missing={gone})
    # a big hand-written inline policy on one role leaves room for a few statements only
    big: dict[str, Any] = {"Version": "2012-10-17", "Statement": []}
    while policy_size(big) < ROLE_POLICY_LIMIT - 900:  # room for two or three statements
        i = len(big["Statement"])
        big["Statement"].append({"Sid": f"Other{i}", "Effect": "Allow", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::bucket-{i:04d}/*"})
    account_client(moto, "iam", roles[crowded]).put_role_policy(RoleName=crowded, PolicyName="app", PolicyDocument=json.dumps(big))
    proxy = FaultProxy(moto.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    proxy.add(query_error("ListRolePolicies", "Throttling", 400, 2, "Rate exceeded"))
    limit = proxy.add(query_error("PutRolePolicy", "LimitExceeded", 409, 1, "Cannot exceed quota for PoliciesPerRole"))
    limit.match = lambda r, role=limited: r.action == "PutRolePolicy" and f"RoleName={role}".encode() in r.body
    topic = unique("findings")
    messages = [(f["id"].encode(), orjson.dumps(f)) for f in states.final.values()]
    await produce(broker.bootstrap, topic, messages)
    metrics = RespondMetrics()
    pattern = "^(?!" + excluded + "$).*"
    settings = respond_settings(broker.bootstrap, topic, apply=True, role_name_pattern=pattern, aws_max_attempts=3)
    try:
        await drain(FindingConsumer(settings, metrics, Responder(settings, metrics)), len(messages))
    finally:
        proxy.stop()
    policies = role_policies(moto, roles)
    assert gone not in policies and metrics.skipped.labels("role_gone")._value.get() == len(expected[gone])
    assert limited not in policies and limit.served == 1
    assert metrics.failed.labels("limit_exceeded")._value.get() == len(expected[limited])
    assert excluded not in policies and metrics.skipped.labels("role_not_allowed")._value.get() == len(expected[excluded])
    assert metrics.throttled._value.get() == 2
    # the crowded role: within IAM's aggregate limit beside its other policy, the oldest rolled off
    other = policy_size(big)
    kept = policies[crowded]["Statement"]
    assert policy_size(policies[crowded]) + other <= ROLE_POLICY_LIMIT
    assert 0 < len(kept) < len(expected[crowded])
    assert metrics.rolled_off._value.get() + metrics.failed.labels("policy_too_large")._value.get() == len(expected[crowded]) - len(kept)
    assert {s["Sid"] for s in kept} <= set(expected[crowded])
    for role in set(expected) - {gone, limited, excluded, crowded}:
        assert {s["Sid"] for s in policies[role]["Statement"]} == set(expected[role])


async def test_respond_without_a_role_template_touches_only_its_own_account(
    broker: EmbeddedBroker, moto: MotoServer, aws_ranges: Any  # noqa: F811
) -> None:
    """The process's own credentials are one account's: a finding of another account is skipped, never
    applied to a role of the same name in the wrong account."""
    states = world_states(aws_ranges)
    own = moto.client("sts").get_caller_identity()["Account"]
    trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}
    roles = sorted({r for a in states.world.accounts.values() for r in a.roles})
    for role in roles:  # the same names in the process's own account
        moto.client("iam").create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps(trust))
    topic = unique("findings")
    messages = [(f["id"].encode(), orjson.dumps(f)) for f in states.final.values()]
    await produce(broker.bootstrap, topic, messages)
    metrics = RespondMetrics()
    settings = respond_settings(broker.bootstrap, topic, apply=True, assume_role_arn=None)
    await drain(FindingConsumer(settings, metrics, Responder(settings, metrics)), len(messages))
    assert own not in {f["accountId"] for f in states.final.values()}
    assert role_policies(moto, {role: own for role in roles}) == {}
    assert metrics.skipped.labels("other_account")._value.get() == sum(len(v) for v in expected_containment(states).values())


async def test_consumer_skips_a_batch_its_handler_fails_on_without_crashing(broker: EmbeddedBroker, aws_ranges: Any) -> None:  # noqa: F811
    """A handler bug (any exception but Transient) is logged and counted; the loop goes on and commits."""
    from detector.outputs.metrics import OutputMetrics

    class Broken:
        name = "broken"
        calls = 0

        async def handle(self, batch: list[Any]) -> list[Any]:
            Broken.calls += 1
            raise KeyError("an answer of an unexpected shape")

    states = world_states(aws_ranges)
    topic = unique("findings")
    messages = [(f["id"].encode(), orjson.dumps(f)) for f in states.final.values()]
    await produce(broker.bootstrap, topic, messages)
    metrics = OutputMetrics("detector_test")
    await drain(FindingConsumer(respond_settings(broker.bootstrap, topic), metrics, Broken()), len(messages))
    assert Broken.calls >= 1 and metrics.failed.labels("internal_error")._value.get() == len(messages)


# ======================================================================================================
# the command line
# ======================================================================================================


def test_cli_rejects_bad_settings_naming_them(run_detector: Any) -> None:
    result = run_detector("respond", "--role-name-pattern", "^(unclosed")
    assert result.returncode == 2 and b"role_name_pattern" in result.stderr and b"flag --role-name-pattern" in result.stderr
    result = run_detector("export", "securityhub", "--assume-role-arn", "arn:aws:iam::{acct}:role/X")
    assert result.returncode == 2 and b"{acct}" in result.stderr


async def test_cli_respond_dry_run_prints_policies_and_stops_on_sigterm(broker: EmbeddedBroker, aws_ranges: Any) -> None:  # noqa: F811
    """A dry run calls nothing in AWS: no endpoint, no credentials needed."""
    import signal
    import subprocess

    states = world_states(aws_ranges)
    topic = unique("findings")
    await produce(broker.bootstrap, topic, states.messages())
    expected = expected_containment(states)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DETECTOR_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "detector", "respond", "--kafka-bootstrap", broker.bootstrap, "--findings-topic", topic,
         "--group-id", unique("cli"), "--http-port", "0", "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[dict[str, Any]] = []
    try:
        loop = asyncio.get_running_loop()
        wanted = len(expected)  # at least one line per role (one per role and batch)
        while len({line["roleName"] for line in lines}) < wanted:
            raw = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), timeout=60)
            assert raw, proc.stderr.read().decode() if proc.stderr else "respond exited"
            lines.append(json.loads(raw))
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    lines += [json.loads(line) for line in out.splitlines()]
    sids = {s["Sid"] for line in lines for s in line["policyDocument"]["Statement"]}
    assert sids == {s for role in expected.values() for s in role}
    events = [json.loads(line) for line in err.splitlines()]
    assert {"starting", "containment_dry_run", "stopped"} <= {e["event"] for e in events}, "JSON logs on standard error"
