"""A seeded generator of labelled worlds, built the way the public sample world is built.

A *world* is a few AWS accounts (home accounts with and without network inventory, a trusted hub, another
affiliated account, an unaffiliated partner, accounts nobody listed), instances in the home accounts, and
a few hours of CloudTrail around them: the instances' own calls, AWS services calling on their behalf,
other identities, EC2's credential issuance, and attackers using stolen instance credentials from every
kind of place SPEC §4-§5 distinguishes. The records come in the three input shapes of SPEC §2.

The generator labels every record it makes *when it makes it* (``None`` for expected use, the finding it
must raise for an attack) and computes the expected finding groups from those labels alone: it never
calls the engine, so a disagreement between the two is a bug in one of them.

API::

    world = make_world(seed=7, n_accounts=3, instances_per_account=4)
    world.inputs            # [(file name, bytes)] in arrival order (names sort in that order)
    world.messages()        # the same inputs as one JSON value per Kafka message
    world.records_in_order  # every CloudTrail record the inputs carry, in arrival order
    world.record_kinds      # what each of those records is (an ATTACK_KINDS member is a finding)
    world.registry          # the affiliation registry (SPEC §7) as a dict
    world.expected          # expected finding groups: type, accountId, instanceId, remoteAccountId,
                            # severity, count (the shape of the sample world's expected.json)
    write_world(world, directory)  # files + files.txt + registry.json + expected.json
    summarize(findings)     # rendered findings -> the shape of ``world.expected``

Part two (SPEC §10-§13, on unless ``make_world(..., part2=False)``): the registry gains `instances` and
endpoint VPCs; every home has an instance with an `aws:ec2-instance` session; instances stop, terminate,
restart (CloudTrail calls, spot evictions, EventBridge state-change notifications, which also split
CloudTrail log files into parts named ``NN.MM-…``); trust-on-first-use baselines are reset; records of
other `aws:` roles and bare records (no eventVersion) appear; sessions delivered by IMDSv1 raise Low
findings. Expected groups of type OtherInstance also carry ``otherInstanceId``; ``world.groups[i].evidence``
holds the additionalInfo entries an AfterInstanceStopped finding must carry; ``world.kinds`` counts every
part-two kind (``PART2_KINDS``).
"""

from __future__ import annotations

import copy
import gzip
import ipaddress
import json
import random
import uuid
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

INSIDE = "UnauthorizedAccess:IAMUser/InstanceCredentialExfiltration.InsideAWS"
OUTSIDE = "UnauthorizedAccess:IAMUser/InstanceCredentialExfiltration.OutsideAWS"
AFTER_STOPPED = "UnauthorizedAccess:IAMUser/InstanceCredentialExfiltration.AfterInstanceStopped"  # SPEC §11
OTHER_INSTANCE = "UnauthorizedAccess:IAMUser/InstanceCredentialExfiltration.OtherInstance"  # SPEC §12
IMDSV1 = "Policy:EC2/InstanceCredentialsDeliveredByIMDSv1"  # SPEC §13
HIGH = 8
MEDIUM = 5
LOW = 2
IDENTITY_ROLE = "aws:ec2-instance"  # SPEC §10: an instance session like any other
STATE_CHANGE = "EC2 Instance State-change Notification"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# --- event kinds -------------------------------------------------------------------------------------
# Expected use (never a finding).
LEGIT_KINDS = (
    "service_host",  # sourceIPAddress is an AWS service host name
    "service_internal",  # sourceIPAddress "AWS Internal"
    "service_invoked_by",  # userIdentity.invokedBy set (source: an outside address, still a service call)
    "endpoint_home_field",  # VPC endpoint owned by the home account, per vpcEndpointAccountId
    "endpoint_home_registry",  # ... owner known from the registry only
    "endpoint_hub_field",  # VPC endpoint of the trusted hub
    "endpoint_hub_registry",
    "endpoint_unknown_owner",  # VPC endpoint nobody lists: nothing (a blind spot the registry closes)
    "cidr_home_v4",  # the home account's own registry CIDRs (inventory homes only)
    "cidr_home_v6",
    "cidr_home_mapped",  # ... written as an IPv4-mapped IPv6 address
    "cidr_hub_v4",  # the trusted hub's CIDRs
    "cidr_hub_v6",
    "expected_all_v4",  # an expected network without `accounts` (applies to every home)
    "expected_home_v4",  # an expected network listing this home (home 0)
    "expected_home_v6",  # an expected IPv6 network listing this home (home 1)
    "tofu_repeat_v4",  # the address learnt on first use, again (homes without inventory)
    "tofu_repeat_v6",
    "tofu_repeat_mapped",
)
# Attacks (always a finding).
ATTACK_KINDS = (
    "endpoint_affiliated_field",  # VPC endpoint of another affiliated account: InsideAWS, 5
    "endpoint_affiliated_registry",
    "endpoint_unaffiliated_field",  # VPC endpoint of a listed, unaffiliated account: InsideAWS, 8
    "endpoint_unaffiliated_registry",
    "endpoint_unlisted_field",  # VPC endpoint of an account the registry does not list: InsideAWS, 8
    "cidr_affiliated_v4",  # address of another affiliated account: InsideAWS, 5
    "cidr_affiliated_v6",
    "cidr_unaffiliated_v4",  # address of the unaffiliated partner: InsideAWS, 8
    "cidr_unaffiliated_v6",
    "aws_inventory_v4",  # AWS address, owner unknown, home inventory known: InsideAWS unknown, 8
    "aws_inventory_v6",
    "aws_tofu_other_v4",  # AWS address, owner unknown, not the one learnt first: InsideAWS unknown, 8
    "aws_tofu_other_v6",
    "private_v4",  # private address without VPC endpoint: OutsideAWS
    "private_v6",
    "outside_v4",  # outside AWS: OutsideAWS
    "outside_v6",
    "outside_mapped",
    "expected_other_v4",  # an expected network listing another home only: OutsideAWS
    "expected_other_v6",
)
# SPEC §12, assigned by coverage like the kinds above (part-two worlds only). J is another instance of
# the registry's `instances`; "egress" instances are NAT instances or proxies.
OTHER_LEGIT_KINDS = (
    "own_secondary_endpoint",  # the instance's own second private address, through an endpoint of its VPC
    "own_public",  # the instance's own public address (homes with inventory)
    "own_ipv6",  # ... its own IPv6 address
    "egress_public",  # the home's egress instance's public address (homes with inventory)
    "egress_endpoint",  # ... its private address through an endpoint of its VPC
    "egress_hub_public",  # the trusted hub's NAT instance
    "other_vpc_endpoint",  # J's private address through an endpoint of another VPC of the home
    "unknown_vpc_endpoint",  # J's private address through an endpoint whose VPC the registry does not know
    "unlisted_address_endpoint",  # a private address listed for no instance, through an endpoint of a known VPC
)
OTHER_ATTACK_KINDS = (
    "other_instance_endpoint",  # J's private address through an endpoint of J's VPC: OtherInstance
    "other_instance_endpoint_v6",  # J's IPv6 address through an endpoint of J's VPC: OtherInstance
    "other_instance_public",  # J's public address: OtherInstance
    "other_instance_ipv6",  # J's IPv6 address: OtherInstance
    "other_instance_hub_public",  # an instance of the trusted hub, by its public address: OtherInstance
    "other_instance_hub_endpoint",  # ... by its private address through a hub endpoint: OtherInstance
    "other_instance_other_account",  # an instance of another affiliated account: InsideAWS 5, no OtherInstance
)
# SPEC §11: the signals (records or EventBridge events; never findings themselves) ...
STOP_SIGNAL_KINDS = (
    "stop_api",  # StopInstances, instances in responseElements
    "terminate_api",  # TerminateInstances
    "stop_api_request_only",  # StopInstances with responseElements null: instances in requestParameters
    "spot_eviction",  # BidEvictedEvent (AwsServiceEvent)
    "statechange_stop",  # EventBridge state-change stopping, then stopped
    "statechange_terminate",  # ... shutting-down, then terminated
    "stop_self",  # the instance's own credentials stop it (an instance-credential record too)
)
START_SIGNAL_KINDS = ("start_api", "statechange_start")
IGNORED_SIGNAL_KINDS = (
    "stop_dryrun",  # StopInstances with errorCode Client.DryRunOperation: no stop
    "stop_failed",  # StopInstances with another errorCode: no stop
    "start_failed",  # StartInstances with an errorCode: no start
    "stop_unknown_instance",  # a stop naming an instance nobody saw (extra item of a stop call)
    "statechange_unknown_instance",  # a state-change event of an instance nobody saw
)
# ... and the instance-credential records judged against them.
AFTER_STOP_ATTACK_KINDS = (
    "after_stop_a",  # after stop + grace, no restart (clause a): AfterInstanceStopped
    "after_stop_b_seen",  # after a restart, with a key seen in the instance's records before the stop (clause b)
    "after_stop_b_issued",  # ... with a key issued to the instance before the stop (clause b)
    "after_failed_start",  # after stop + grace and a StartInstances that failed (clause a)
)
AFTER_STOP_LEGIT_KINDS = (
    "before_stop",
    "after_stop_within_grace",  # stop time < eventTime <= stop time + grace
    "after_restart_new_key",  # after a restart, with the key issued after it
    "after_stop_service",  # origin AWS service, after stop + grace
    "after_dryrun_stop",  # after a DryRun stop + grace
    "after_failed_stop",  # after a failed stop + grace
)
# SPEC §13: trust-on-first-use resets (homes without inventory).
RESET_KINDS = (
    "reset_associate",  # AssociateAddress naming the instance
    "reset_start_api",  # StartInstances
    "reset_statechange",  # state-change pending / running
    "reset_self_old",  # the instance associates its own address, calling from its old address: nothing
    "reset_self_new",  # ... calling from a new AWS address: judged against the old baseline, InsideAWS
)
NO_RESET_KINDS = (
    "no_reset_eni",  # AssociateAddress naming only a network interface
    "no_reset_error",  # AssociateAddress with an errorCode
    "no_reset_start_error",  # StartInstances with an errorCode
    "no_reset_other_instance",  # AssociateAddress naming another (unknown) instance
)
TOFU_RESET_RECORD_KINDS = (
    "tofu_before_reset",  # the first-use address again, before the reset
    "tofu_after_reset",  # a new AWS address after the reset: learnt anew
    "tofu_old_after_reset",  # the old address after the new one was learnt: InsideAWS
    "tofu_no_reset",  # a new AWS address after an ineffective reset: InsideAWS (the control)
    "tofu_old_no_reset",  # the old address after an ineffective reset: nothing
)
# SPEC §10 and §13, counted over records of every kind.
PART2_FLAG_KINDS = (
    "bare_record",  # a record without eventVersion
    "ec2_instance_role",  # a record of an `aws:ec2-instance` session
    "other_aws_role",  # a record of another `aws:` role (e.g. aws:ec2-infrastructure): ignored
    "imdsv1",  # a record delivered by IMDSv1 (counts in its session's Low finding)
)
PART2_KINDS = (
    *OTHER_LEGIT_KINDS,
    *OTHER_ATTACK_KINDS,
    *STOP_SIGNAL_KINDS,
    *START_SIGNAL_KINDS,
    *IGNORED_SIGNAL_KINDS,
    *AFTER_STOP_ATTACK_KINDS,
    *AFTER_STOP_LEGIT_KINDS,
    *RESET_KINDS,
    *NO_RESET_KINDS,
    *TOFU_RESET_RECORD_KINDS,
    *PART2_FLAG_KINDS,
)
# Structural kinds the generator always makes (not assigned by coverage).
STRUCTURAL_KINDS = ("issuance", "tofu_first_v4", "tofu_first_v6", "noise", "duplicate", "malformed", "skipped")

_SERVICES = (
    ("s3.amazonaws.com", "GetObject"),
    ("s3.amazonaws.com", "ListBuckets"),
    ("ec2.amazonaws.com", "DescribeInstances"),
    ("sts.amazonaws.com", "GetCallerIdentity"),
    ("secretsmanager.amazonaws.com", "GetSecretValue"),
    ("iam.amazonaws.com", "ListRoles"),
    ("dynamodb.amazonaws.com", "GetItem"),
    ("ssm.amazonaws.com", "GetParameter"),
    ("kms.amazonaws.com", "Decrypt"),
    ("sqs.amazonaws.com", "ReceiveMessage"),
)
_SERVICE_HOSTS = (
    "athena.amazonaws.com",
    "cloudformation.amazonaws.com",
    "ssm.amazonaws.com",
    "autoscaling.amazonaws.com",
    "elasticmapreduce.amazonaws.com",
)
_REGIONS = ("us-east-1", "us-west-2", "eu-west-1", "ap-southeast-2")
_ERRORS = (
    ("AccessDenied", "User is not authorized to perform this operation"),
    ("Client.UnauthorizedOperation", "You are not authorized to perform this operation."),
    ("NoSuchBucket", "The specified bucket does not exist"),
)
_INSTANCE_UA = "aws-sdk-java/2.25.6 Linux/5.10.219-208.866.amzn2.x86_64 OpenJDK_64-Bit_Server_VM/17.0.11+9-LTS"
_ATTACKER_UA = "aws-cli/2.15.30 Python/3.11.8 Linux/6.6.9-amd64 exe/x86_64.kali.2024 prompt/off command/s3.ls"
_OTHER_DETAIL_TYPES = ("GuardDuty Finding", "Scheduled Event")  # (state-change notifications are input, §10)


# --- AWS ranges (read directly from the packaged snapshot, not through the detector) --------------------


class AwsRanges:
    """The packaged ``ip-ranges.json`` snapshot as merged integer intervals, for membership checks."""

    def __init__(self) -> None:
        raw = (resources.files("detector") / "data" / "aws-ip-ranges.json.gz").read_bytes()
        doc = json.loads(gzip.decompress(raw))
        self.v4: list[ipaddress.IPv4Network] = sorted({ipaddress.IPv4Network(p["ip_prefix"]) for p in doc["prefixes"]})
        self.v6: list[ipaddress.IPv6Network] = sorted(
            {ipaddress.IPv6Network(p["ipv6_prefix"]) for p in doc["ipv6_prefixes"]}
        )
        self.v6_wide = [n for n in self.v6 if n.prefixlen <= 56]
        self._intervals = {4: self._merge(self.v4), 6: self._merge(self.v6)}

    @staticmethod
    def _merge(nets: list[Any]) -> tuple[list[int], list[int]]:
        starts: list[int] = []
        ends: list[int] = []
        for net in sorted(nets, key=lambda n: int(n.network_address)):
            first, last = int(net.network_address), int(net.broadcast_address)
            if ends and first <= ends[-1] + 1:
                ends[-1] = max(ends[-1], last)
            else:
                starts.append(first)
                ends.append(last)
        return starts, ends

    def overlaps(self, version: int, first: int, last: int) -> bool:
        starts, ends = self._intervals[version]
        i = bisect_right(starts, last) - 1
        return i >= 0 and ends[i] >= first

    def contains(self, addr: IPAddress) -> bool:
        return self.overlaps(addr.version, int(addr), int(addr))

    def contains_network(self, net: IPNetwork) -> bool:
        return self.overlaps(net.version, int(net.network_address), int(net.broadcast_address))


@lru_cache(maxsize=1)
def aws_ranges() -> AwsRanges:
    return AwsRanges()


class _Addresses:
    """Draws addresses of each kind, verified, and never the same one twice."""

    def __init__(self, rng: random.Random, ranges: AwsRanges) -> None:
        self.rng = rng
        self.ranges = ranges
        self.used: set[str] = set()
        self.claimed: list[IPNetwork] = []  # registry CIDRs and expected networks

    def _free(self, addr: IPAddress) -> bool:
        return str(addr) not in self.used and not any(addr in net for net in self.claimed)

    def _take(self, addr: IPAddress) -> str:
        self.used.add(str(addr))
        return str(addr)

    def aws_v4(self) -> str:
        while True:
            net = self.rng.choice(self.ranges.v4)
            addr = net[self.rng.randrange(net.num_addresses)]
            if addr.is_global and self._free(addr):
                assert self.ranges.contains(addr)
                return self._take(addr)

    def aws_v6(self) -> str:
        while True:
            net = self.rng.choice(self.ranges.v6)
            addr = ipaddress.IPv6Address(int(net.network_address) + self.rng.getrandbits(128 - net.prefixlen))
            if addr.is_global and self._free(addr):
                assert self.ranges.contains(addr)
                return self._take(addr)

    def aws_v6_block(self, prefixlen: int = 56) -> ipaddress.IPv6Network:
        while True:
            outer = self.rng.choice(self.ranges.v6_wide)
            bits = self.rng.getrandbits(prefixlen - outer.prefixlen) << (128 - prefixlen)
            net = ipaddress.IPv6Network((int(outer.network_address) + bits, prefixlen))
            if not any(net.overlaps(c) for c in self.claimed):
                self.claimed.append(net)
                return net

    def aws_v4_host(self) -> ipaddress.IPv4Network:
        """An elastic IP: a /32 inside AWS's ranges, claimed for the registry."""
        net = ipaddress.IPv4Network(self.aws_v4() + "/32")
        self.claimed.append(net)
        return net

    def outside_v4(self) -> str:
        while True:
            addr = ipaddress.IPv4Address(self.rng.getrandbits(32))
            if addr.is_global and not self.ranges.contains(addr) and self._free(addr):
                return self._take(addr)

    def outside_v6(self) -> str:
        while True:
            addr = ipaddress.IPv6Address((1 << 125) | self.rng.getrandbits(125))  # 2000::/3
            if addr.is_global and not self.ranges.contains(addr) and self._free(addr):
                return self._take(addr)

    def private_v4(self) -> str:
        while True:
            base, bits = self.rng.choice(((0x0A000000, 24), (0xAC100000, 20), (0xC0A80000, 16), (0x64400000, 22)))
            addr = ipaddress.IPv4Address(base + self.rng.getrandbits(bits))
            if not addr.is_global and not self.ranges.contains(addr) and self._free(addr):
                return self._take(addr)

    def private_v6(self) -> str:
        while True:
            if self.rng.random() < 0.7:
                addr = ipaddress.IPv6Address((0xFD << 120) | self.rng.getrandbits(120))  # unique local
            else:
                addr = ipaddress.IPv6Address((0xFE80 << 112) | self.rng.getrandbits(64))  # link-local
            if not addr.is_global and not self.ranges.contains(addr) and self._free(addr):
                return self._take(addr)

    def outside_network(self, version: int) -> IPNetwork:
        """A network for `expected_networks`: global, outside AWS's ranges and every claimed network."""
        while True:
            if version == 4:
                net: IPNetwork = ipaddress.IPv4Network((self.rng.getrandbits(24) << 8, 24))
            else:
                net = ipaddress.IPv6Network((((1 << 45) | self.rng.getrandbits(45)) << 80, 48))
            if (
                net.network_address.is_global
                and net.broadcast_address.is_global
                and not self.ranges.contains_network(net)
                and not any(net.overlaps(c) for c in self.claimed)
            ):
                self.claimed.append(net)
                return net

    def inside(self, net: IPNetwork, must_be_global: bool = False) -> str:
        """A fresh address inside ``net`` (outside AWS and global when ``must_be_global``); once a small
        network is nearly used up (large worlds), one it gave before (never one drawn for another use)."""
        tries = 0
        while True:
            tries += 1
            host = int(net.network_address) + self.rng.randrange(1, net.num_addresses - 1)
            addr = ipaddress.ip_address(host)
            if str(addr) in self.used and tries < 200:
                continue
            if must_be_global and (not addr.is_global or self.ranges.contains(addr)):
                continue
            return self._take(addr)


# --- the world's parts -----------------------------------------------------------------------------


@dataclass
class Account:
    account_id: str
    name: str
    affiliated: bool = True
    trusted: bool = False
    v4: list[str] = field(default_factory=list)  # elastic IPs (/32 each)
    v6: list[str] = field(default_factory=list)  # VPC IPv6 blocks (/56)
    endpoints: list[str] = field(default_factory=list)
    listed: bool = True
    roles: list[str] = field(default_factory=list)
    # SPEC §12 (part-two worlds): VPCs, the VPC of each endpoint, the instance inventory.
    vpcs: list[str] = field(default_factory=list)
    endpoint_vpc: dict[str, str] = field(default_factory=dict)
    endpoint_map: bool = False  # the registry writes `vpc_endpoints` as the id -> {vpc} mapping
    instances: dict[str, Instance] = field(default_factory=dict)

    @property
    def inventory(self) -> bool:
        return bool(self.v4 or self.v6)

    def endpoints_of(self, vpc: str) -> list[str]:
        return [e for e in self.endpoints if self.endpoint_vpc.get(e) == vpc]


@dataclass
class Instance:
    """An entry of a registry account's `instances` (SPEC §12)."""

    instance_id: str
    vpc: str
    private: list[str]
    public: list[str] = field(default_factory=list)
    ipv6: list[str] = field(default_factory=list)
    egress: bool = False

    def entry(self) -> dict[str, Any]:
        return {"vpc": self.vpc, "private": self.private, "public": self.public, "ipv6": self.ipv6, "egress": self.egress}


@dataclass
class Session:
    home: Account
    index: int  # index of the home among the home accounts
    instance_id: str
    role: str
    role_id: str
    region: str
    delivery: str | None
    keys: list[str]
    start: float
    tofu_v4: str | None = None
    tofu_v6: str | None = None
    stopped_at: int | None = None  # SPEC §11: the stop time its AfterInstanceStopped finding names
    stop_state: str | None = None  # ... and the state of the latest stop signal (None: not checked)

    @property
    def arn(self) -> str:
        return f"arn:aws:sts::{self.home.account_id}:assumed-role/{self.role}/{self.instance_id}"


@dataclass
class Event:
    """One planned input item: a CloudTrail record (with its label) or a raw line."""

    at: float  # arrival position (seconds); the inputs are ordered by it
    seq: int
    kind: str
    record: dict[str, Any] | None = None
    label: tuple[str, str | None, int] | None = None  # (type, remote account, severity) for attacks
    session: Session | None = None
    counted: bool = True  # False for a second delivery of the same eventID
    wrap: str | None = None  # force an EventBridge detail-type (for skipped events)
    raw: bytes | None = None  # a malformed line, verbatim
    extra: list[tuple[str, str | None, int]] = field(default_factory=list)  # further findings it counts in
    envelope: dict[str, Any] | None = None  # an EventBridge event that carries no CloudTrail record

    @property
    def labels(self) -> list[tuple[str, str | None, int]]:
        return ([self.label] if self.label is not None else []) + self.extra


@dataclass
class ExpectedGroup:
    type: str
    session_arn: str
    account_id: str
    instance_id: str
    remote_account_id: str | None
    severity: int
    count: int = 0
    first_seen: str = ""
    last_seen: str = ""
    kinds: Counter = field(default_factory=Counter)
    other_instance_id: str | None = None  # OtherInstance: the instance J whose address was used
    evidence: dict[str, Any] = field(default_factory=dict)  # service.additionalInfo entries it must carry
    api_calls: Counter = field(default_factory=Counter)  # (eventSource, eventName) -> records (SPEC §13)
    error_codes: Counter = field(default_factory=Counter)  # errorCode -> records (SPEC §13)

    def summary(self) -> dict[str, Any]:
        out = {
            "type": self.type,
            "accountId": self.account_id,
            "instanceId": self.instance_id,
            "remoteAccountId": self.remote_account_id,
            "severity": self.severity,
            "count": self.count,
        }
        if self.type == OTHER_INSTANCE:
            out["otherInstanceId"] = self.other_instance_id
        return out


@dataclass
class World:
    seed: int
    inputs: list[tuple[str, bytes]]
    records_in_order: list[dict[str, Any]]
    record_kinds: list[str]  # the kind of each of records_in_order (LEGIT_KINDS, ATTACK_KINDS, structural)
    registry: dict[str, Any]
    expected: list[dict[str, Any]]
    groups: list[ExpectedGroup]
    kinds: Counter  # records made of each kind (attack, legit and structural kinds)
    malformed: int  # malformed items the inputs hold (lines, Records elements, undecidable records)
    skipped: int  # EventBridge events of another detail-type
    instance_records: int  # decidable instance-credential records (duplicates included)
    session_tokens: list[str]
    accounts: dict[str, Account]
    state_changes: int = 0  # EventBridge state-change notifications (input, but no CloudTrail record)
    stop_grace_seconds: int = 600

    def group_key(self, group: ExpectedGroup) -> tuple[str, str, str | None]:
        return (group.type, group.session_arn, group.remote_account_id or group.other_instance_id)

    def messages(self) -> list[bytes]:
        """The inputs as Kafka message values: one per JSON Lines line, one per CloudTrail log file."""
        out: list[bytes] = []
        for name, data in self.inputs:
            if name.endswith(".gz"):
                data = gzip.decompress(data)
            if name.endswith((".jsonl", ".jsonl.gz")):
                out.extend(line for line in data.split(b"\n") if line.strip())
            else:
                out.append(data)
        return out


def summarize(findings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rendered findings -> the six fields of ``World.expected`` / expected.json (plus ``otherInstanceId``
    for OtherInstance findings), sorted."""
    out = []
    for f in findings:
        remote = f["service"]["action"]["awsApiCallAction"].get("remoteAccountDetails") or {}
        item = {
            "type": f["type"],
            "accountId": f["accountId"],
            "instanceId": f["resource"]["instanceDetails"]["instanceId"],
            "remoteAccountId": remote.get("accountId"),
            "severity": f["severity"],
            "count": f["service"]["count"],
        }
        if f["type"] == OTHER_INSTANCE:
            item["otherInstanceId"] = (f["service"].get("additionalInfo") or {}).get("otherInstanceId")
        out.append(item)
    return sort_expected(out)


def finding_group_key(f: dict[str, Any]) -> tuple[str, str, str | None]:
    """A rendered finding's group (SPEC §8, §11-§13), as ``World.group_key`` gives it for expected groups."""
    info = f["service"].get("additionalInfo") or {}
    remote = f["service"]["action"]["awsApiCallAction"].get("remoteAccountDetails") or {}
    return (f["type"], info.get("sessionArn"), remote.get("accountId") or info.get("otherInstanceId"))


def sort_expected(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(
        items,
        key=lambda e: (
            e["accountId"], e["instanceId"], e["type"], e["remoteAccountId"] or "", e.get("otherInstanceId") or "", e["count"]
        ),
    )  # fmt: skip


# --- generation ----------------------------------------------------------------------------------


_SIGNAL_NAMES = frozenset({"StopInstances", "TerminateInstances", "StartInstances", "AssociateAddress", "BidEvictedEvent"})


def _is_signal(event: Event) -> bool:
    """Whether ``event`` is a CloudTrail record that may carry a lifecycle or address signal (§11, §13)."""
    return event.record is not None and event.record.get("eventName") in _SIGNAL_NAMES


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Gen:
    def __init__(
        self,
        seed: int,
        n_accounts: int,
        instances_per_account: int,
        min_per_kind: int,
        n_files: int,
        malformed_lines: int,
        duplicates: int,
        noise: int,
        hours: float,
        part2: bool = True,
        stop_grace_seconds: int = 600,
        imdsv1_findings: bool = True,
        settle_seconds: int = 600,
        duplicate_signals: bool = False,
    ) -> None:
        if n_accounts < 2:
            raise ValueError("n_accounts (home accounts) must be at least 2: one with inventory, one without")
        if n_files < 3:
            raise ValueError("n_files must be at least 3 (one per input shape)")
        self.seed = seed
        self.rng = random.Random(seed)
        self.addr = _Addresses(self.rng, aws_ranges())
        self.n_accounts = n_accounts
        self.instances_per_account = instances_per_account
        self.min_per_kind = min_per_kind
        self.n_files = n_files
        self.malformed_lines = malformed_lines
        self.n_duplicates = duplicates
        self.n_noise = noise
        self.span = hours * 3600.0
        base = datetime(2026, 11, 2, 8, 0, 0, tzinfo=timezone.utc) + timedelta(days=seed % 28)
        self.t0 = base.timestamp()
        self.events: list[Event] = []
        self.seq = 0
        self.account_ids: set[str] = set()
        self.tokens: list[str] = []
        self.extra_malformed = 0
        self.part2 = part2
        self.grace = int(stop_grace_seconds)
        self.settle = int(settle_seconds)
        self.duplicate_signals = duplicate_signals
        self.imdsv1 = imdsv1_findings and part2
        self.siblings: list[Session] = []  # `aws:ec2-instance` sessions (part two)
        self.flags: Counter = Counter()
        self.state_changes = 0  # kinds that are a property of a record or signal, not its kind

    # identifiers
    def hexs(self, n: int) -> str:
        return "".join(self.rng.choice("0123456789abcdef") for _ in range(n))

    def upper(self, n: int) -> str:
        return "".join(self.rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(n))

    def uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def account_id(self) -> str:
        while True:
            value = str(self.rng.randrange(10**11, 10**12))
            if value not in self.account_ids:
                self.account_ids.add(value)
                return value

    def vpce(self) -> str:
        return "vpce-" + self.hexs(17)

    # accounts
    def build_accounts(self) -> None:
        rng = self.rng
        self.homes: list[Account] = []
        for i in range(self.n_accounts):
            has_inventory = i == 0 or (i >= 2 and rng.random() < 0.5)
            acct = Account(self.account_id(), f"{'prod' if has_inventory else 'dev'}-{i}")
            acct.endpoints = [self.vpce() for _ in range(3)]
            if has_inventory:
                acct.v4 = [str(self.addr.aws_v4_host()) for _ in range(2)]
                acct.v6 = [str(self.addr.aws_v6_block())]
            acct.roles = [f"{rng.choice(('web', 'batch', 'etl', 'api'))}-node-role-{i}-{j}" for j in range(2)]
            self.homes.append(acct)
        self.hub = Account(self.account_id(), "network-hub", trusted=True)
        self.hub.v4 = [str(self.addr.aws_v4_host()) for _ in range(2)]
        self.hub.v6 = [str(self.addr.aws_v6_block())]
        self.hub.endpoints = [self.vpce() for _ in range(3)]
        self.analytics = Account(self.account_id(), "analytics")
        self.analytics.v4 = [str(self.addr.aws_v4_host()) for _ in range(2)]
        self.analytics.v6 = [str(self.addr.aws_v6_block())]
        self.analytics.endpoints = [self.vpce() for _ in range(3)]
        self.partner = Account(self.account_id(), "partner", affiliated=False)
        self.partner.v4 = [str(self.addr.aws_v4_host()) for _ in range(2)]
        self.partner.v6 = [str(self.addr.aws_v6_block())]
        self.partner.endpoints = [self.vpce() for _ in range(3)]
        self.unlisted = [Account(self.account_id(), f"unlisted-{i}", affiliated=False, listed=False) for i in range(2)]
        for acct in self.unlisted:
            acct.endpoints = [self.vpce() for _ in range(2)]
        self.unknown_endpoints = [self.vpce() for _ in range(4)]
        # Expected networks: one for every home, one for home 0 (IPv4), one for home 1 (IPv6).
        self.net_all = self.addr.outside_network(4)
        self.net_home0 = self.addr.outside_network(4)
        self.net_home1 = self.addr.outside_network(6)
        self.listed = [*self.homes, self.hub, self.analytics, self.partner]
        self.accounts = {a.account_id: a for a in [*self.listed, *self.unlisted]}
        if self.part2:
            self.build_networks()

    def vpc(self) -> str:
        return "vpc-" + self.hexs(17)

    def new_instance(self, acct: Account, vpc: str, egress: bool = False, instance_id: str | None = None) -> Instance:
        """An instance of ``acct``'s inventory: two private addresses; public and IPv6 ones when the
        account has network inventory (an account without keeps trust on first use, SPEC §5)."""
        inst = Instance(instance_id or "i-" + self.hexs(17), vpc, [self.addr.private_v4() for _ in range(2)], egress=egress)
        if acct.inventory:
            inst.public = [self.addr.aws_v4()]
            if acct.v6:
                inst.ipv6 = [self.addr.inside(ipaddress.IPv6Network(acct.v6[0]))]
        acct.instances[inst.instance_id] = inst
        return inst

    def build_networks(self) -> None:
        """SPEC §12: two VPCs per home (endpoints 0 and 2 in the first, 1 in the second), two peer
        instances without sessions and an egress (NAT) instance per home; the trusted hub's shared VPC
        with two instances and a NAT; one instance of the affiliated analytics account. Every third home
        (the second of two) keeps `vpc_endpoints` a list (VPCs unknown)."""
        for index, home in enumerate(self.homes):
            home.vpcs = [self.vpc(), self.vpc()]
            home.endpoint_vpc = {e: home.vpcs[k % 2] for k, e in enumerate(home.endpoints)}
            home.endpoint_map = index % 3 != 2 if len(self.homes) > 2 else index == 0
            for _ in range(2):
                self.new_instance(home, self.rng.choice(home.vpcs))
            self.new_instance(home, home.vpcs[0], egress=True)
        self.hub.vpcs = [self.vpc()]
        self.hub.endpoint_vpc = {e: self.hub.vpcs[0] for e in self.hub.endpoints}
        self.hub.endpoint_map = True
        for egress in (False, False, True):
            self.new_instance(self.hub, self.hub.vpcs[0], egress=egress)
        self.analytics.vpcs = [self.vpc()]
        self.new_instance(self.analytics, self.analytics.vpcs[0])

    def registry(self) -> dict[str, Any]:
        rng = random.Random(self.seed * 7919 + 1)  # layout choices only; independent of the events
        accounts: dict[str, Any] = {}
        for acct in self.listed:
            entry: dict[str, Any] = {"name": acct.name}
            if not acct.affiliated or rng.random() < 0.5:  # `affiliated` defaults to true
                entry["affiliated"] = acct.affiliated
            if acct.trusted or rng.random() < 0.5:  # `trusted` defaults to false
                entry["trusted"] = acct.trusted
            if acct.inventory:
                entry["cidrs"] = [*acct.v4, *acct.v6]
            elif rng.random() < 0.5:
                entry["cidrs"] = []
            if acct.endpoint_map:
                entry["vpc_endpoints"] = {e: {"vpc": acct.endpoint_vpc[e]} for e in acct.endpoints}
            else:
                entry["vpc_endpoints"] = list(acct.endpoints)
            if acct.instances:
                entry["instances"] = {i: inst.entry() for i, inst in acct.instances.items()}
            accounts[acct.account_id] = entry
        return {
            "accounts": accounts,
            "expected_networks": [
                {"cidr": str(self.net_all), "name": "corporate VPN (every account)"},
                {"cidr": str(self.net_home0), "accounts": [self.homes[0].account_id], "name": "on-prem egress"},
                {"cidr": str(self.net_home1), "accounts": [self.homes[1].account_id], "name": "lab IPv6"},
            ],
        }

    # sessions
    def build_sessions(self) -> None:
        rng = self.rng
        self.sessions: list[Session] = []
        for index, home in enumerate(self.homes):
            for j in range(self.instances_per_account):
                instance_id = "i-" + (self.hexs(8) if j == 1 else self.hexs(17))
                sess = Session(
                    home=home,
                    index=index,
                    instance_id=instance_id,
                    role=rng.choice(home.roles),
                    role_id="AROA" + self.upper(17),
                    region=rng.choice(_REGIONS),
                    delivery=("2.0", "1.0", None)[j % 3],
                    keys=["ASIA" + self.upper(16) for _ in range(2)],
                    start=self.t0 + rng.uniform(0, 1800),
                )
                if not home.inventory:
                    sess.tofu_v4 = self.addr.aws_v4()
                    sess.tofu_v6 = self.addr.aws_v6()
                self.sessions.append(sess)
                if self.part2:
                    self.new_instance(home, rng.choice(home.vpcs), instance_id=instance_id)
            if self.part2:
                # SPEC §10: the instance identity role's session of one instance, beside its role session.
                main = self.sessions[-1]
                sibling = self.sibling(main)
                self.sessions.append(sibling)

    def sibling(self, main: Session) -> Session:
        """The `aws:ec2-instance` session of ``main``'s instance (same instance, addresses and delivery)."""
        sib = copy.copy(main)
        sib.role = IDENTITY_ROLE
        sib.role_id = "AROA" + self.upper(17)
        sib.keys = ["ASIA" + self.upper(16) for _ in range(3)]
        self.siblings.append(sib)
        return sib

    def scenario_session(self, home: Account, delivery: str | None = None) -> Session:
        """A fresh instance (not in the registry's `instances`) with its role session, for §11 and §13."""
        rng = self.rng
        sess = Session(
            home=home,
            index=self.homes.index(home),
            instance_id="i-" + (self.hexs(8) if rng.random() < 0.2 else self.hexs(17)),
            role=rng.choice(home.roles),
            role_id="AROA" + self.upper(17),
            region=rng.choice(_REGIONS),
            delivery=delivery if delivery is not None else rng.choice(("2.0", "1.0", None)),
            keys=["ASIA" + self.upper(16) for _ in range(3)],
            start=float(int(self.t0 + rng.uniform(0, 1800))),
        )
        if not home.inventory:
            sess.tofu_v4 = self.addr.aws_v4()
            sess.tofu_v6 = self.addr.aws_v6()
        return sess

    def eligible(self, kind: str, sess: Session) -> bool:
        inv = sess.home.inventory
        if kind.startswith(("cidr_home", "aws_inventory")):
            return inv
        if kind.startswith(("tofu_", "aws_tofu")):
            return not inv
        if kind == "expected_home_v4":
            return sess.index == 0
        if kind == "expected_home_v6":
            return sess.index == 1
        if kind == "expected_other_v4":
            return sess.index != 0
        if kind == "expected_other_v6":
            return sess.index != 1
        if kind in OTHER_LEGIT_KINDS or kind in OTHER_ATTACK_KINDS:
            return self.other_instance_fields(kind, sess, dry_run=True) is not None
        return True

    def peers(self, sess: Session, acct: Account | None = None) -> list[Instance]:
        """Instances J != the session's own of ``acct`` (default: its home) that are not egress."""
        acct = acct or sess.home
        return [i for i in acct.instances.values() if i.instance_id != sess.instance_id and not i.egress]

    def other_instance_fields(
        self, kind: str, sess: Session, dry_run: bool = False
    ) -> tuple[dict[str, Any], tuple[str, str | None, int] | None] | None:
        """Origin fields and label of a SPEC §12 kind, or None when ``sess`` cannot have it."""
        rng, home = self.rng, sess.home
        own = home.instances.get(sess.instance_id)
        egress = next((i for i in home.instances.values() if i.egress), None)
        hub_egress = next(i for i in self.hub.instances.values() if i.egress)
        candidates: list[tuple[Instance, Account, str | None, str]] = []  # (J, J's account, endpoint, address)
        if kind == "own_secondary_endpoint" and own is not None and home.endpoint_map:
            candidates = [(own, home, e, own.private[1]) for e in home.endpoints_of(own.vpc)]
        elif kind == "own_public" and own is not None:
            candidates = [(own, home, None, a) for a in own.public]
        elif kind == "own_ipv6" and own is not None:
            candidates = [(own, home, None, a) for a in own.ipv6]
        elif kind == "egress_public" and egress is not None:
            candidates = [(egress, home, None, a) for a in egress.public]
        elif kind == "egress_endpoint" and egress is not None and home.endpoint_map:
            candidates = [(egress, home, e, egress.private[0]) for e in home.endpoints_of(egress.vpc)]
        elif kind == "egress_hub_public":
            candidates = [(hub_egress, self.hub, None, hub_egress.public[0])]
        elif kind == "other_vpc_endpoint" and home.endpoint_map:
            candidates = [
                (j, home, e, j.private[0]) for j in self.peers(sess) for v in home.vpcs if v != j.vpc for e in home.endpoints_of(v)
            ]
        elif kind == "unknown_vpc_endpoint" and not home.endpoint_map:
            candidates = [(j, home, e, j.private[0]) for j in self.peers(sess) for e in home.endpoints]
        elif kind == "unlisted_address_endpoint" and home.endpoint_map and own is not None:
            candidates = [(own, home, e, "") for e in home.endpoints]  # (the address is drawn below)
        elif kind == "other_instance_endpoint" and home.endpoint_map:
            candidates = [(j, home, e, j.private[1]) for j in self.peers(sess) for e in home.endpoints_of(j.vpc)]
        elif kind == "other_instance_endpoint_v6" and home.endpoint_map:
            candidates = [(j, home, e, a) for j in self.peers(sess) for e in home.endpoints_of(j.vpc) for a in j.ipv6]
        elif kind == "other_instance_public":
            candidates = [(j, home, None, a) for j in self.peers(sess) for a in j.public]
        elif kind == "other_instance_ipv6":
            candidates = [(j, home, None, a) for j in self.peers(sess) for a in j.ipv6]
        elif kind == "other_instance_hub_public":
            candidates = [(j, self.hub, None, j.public[0]) for j in self.peers(sess, self.hub)]
        elif kind == "other_instance_hub_endpoint":
            candidates = [(j, self.hub, e, j.private[0]) for j in self.peers(sess, self.hub) for e in self.hub.endpoints]
        elif kind == "other_instance_other_account":
            candidates = [(j, self.analytics, None, j.public[0]) for j in self.peers(sess, self.analytics)]
        if not candidates:
            return None
        if dry_run:
            return {}, None
        j, owner, endpoint, address = rng.choice(candidates)
        fields: dict[str, Any] = {"sourceIPAddress": address or self.addr.private_v4()}
        if endpoint is not None:
            fields["vpcEndpointId"] = endpoint
            if rng.random() < 0.5:
                fields["vpcEndpointAccountId"] = owner.account_id
        label: tuple[str, str | None, int] | None = None
        if kind == "other_instance_other_account":
            label = (INSIDE, owner.account_id, MEDIUM)
        elif kind in OTHER_ATTACK_KINDS:
            label = (OTHER_INSTANCE, j.instance_id, HIGH)
        return fields, label

    # record construction
    def identity(self, sess: Session, key: str) -> dict[str, Any]:
        context: dict[str, Any] = {
            "sessionIssuer": {
                "type": "Role",
                "principalId": sess.role_id,
                "arn": f"arn:aws:iam::{sess.home.account_id}:role/{sess.role}",
                "accountId": sess.home.account_id,
                "userName": sess.role,
            },
            "webIdFederationData": {},
            "attributes": {"creationDate": _iso(sess.start), "mfaAuthenticated": "false"},
        }
        if sess.delivery is not None:
            context["ec2RoleDelivery"] = sess.delivery
        return {
            "type": "AssumedRole",
            "principalId": f"{sess.role_id}:{sess.instance_id}",
            "arn": sess.arn,
            "accountId": sess.home.account_id,
            "accessKeyId": key,
            "sessionContext": context,
        }

    def base_record(self, when: float, identity: dict[str, Any], account: str, region: str) -> dict[str, Any]:
        source, name = self.rng.choice(_SERVICES)
        return {
            "eventVersion": self.rng.choice(("1.08", "1.09", "1.10")),
            "userIdentity": identity,
            "eventTime": _iso(when),
            "eventSource": source,
            "eventName": name,
            "awsRegion": region,
            "sourceIPAddress": None,
            "userAgent": _INSTANCE_UA,
            "requestParameters": {"maxResults": 100},
            "responseElements": None,
            "requestID": self.uuid(),
            "eventID": self.uuid(),
            "readOnly": True,
            "eventType": "AwsApiCall",
            "managementEvent": True,
            "recipientAccountId": account,
            "eventCategory": "Management",
            "tlsDetails": {"tlsVersion": "TLSv1.3", "clientProvidedHostHeader": f"{source[:-14]}.{region}.amazonaws.com"},
        }

    def origin_fields(self, kind: str, sess: Session) -> tuple[dict[str, Any], tuple[str, str | None, int] | None]:
        """Where a record of ``kind`` comes from, and its label (the finding it must raise, if any)."""
        rng, addr, home = self.rng, self.addr, sess.home
        others = [a for a in [*self.homes, self.analytics] if a is not home]
        others_with_cidrs = [a for a in others if a.inventory]
        if kind == "service_host":
            return {"sourceIPAddress": rng.choice(_SERVICE_HOSTS)}, None
        if kind == "service_internal":
            return {"sourceIPAddress": rng.choice(("AWS Internal", "AWS Internal/3"))}, None
        if kind == "service_invoked_by":
            return {"sourceIPAddress": addr.outside_v4(), "_invokedBy": rng.choice(_SERVICE_HOSTS)}, None
        if kind.startswith("endpoint_"):
            vpce_owner: Account | None
            if kind.startswith("endpoint_home"):
                vpce_owner, label = home, None
            elif kind.startswith("endpoint_hub"):
                vpce_owner, label = self.hub, None
            elif kind == "endpoint_unknown_owner":
                vpce_owner, label = None, None
            elif kind.startswith("endpoint_affiliated"):
                vpce_owner = rng.choice(others)
                label = (INSIDE, vpce_owner.account_id, MEDIUM)
            elif kind.startswith("endpoint_unaffiliated"):
                vpce_owner = self.partner
                label = (INSIDE, vpce_owner.account_id, HIGH)
            else:  # endpoint_unlisted_field
                vpce_owner = rng.choice(self.unlisted)
                label = (INSIDE, vpce_owner.account_id, HIGH)
            fields: dict[str, Any] = {
                "sourceIPAddress": addr.private_v4() if rng.random() < 0.8 else addr.private_v6(),
                "vpcEndpointId": rng.choice(vpce_owner.endpoints if vpce_owner else self.unknown_endpoints),
            }
            if kind.endswith("_field"):
                fields["vpcEndpointAccountId"] = vpce_owner.account_id  # type: ignore[union-attr]
            return fields, label
        if kind.startswith("cidr_"):
            if kind.startswith("cidr_home"):
                owner, label = home, None
            elif kind.startswith("cidr_hub"):
                owner, label = self.hub, None
            elif kind.startswith("cidr_affiliated"):
                owner = rng.choice(others_with_cidrs)
                label = (INSIDE, owner.account_id, MEDIUM)
            else:
                owner = self.partner
                label = (INSIDE, owner.account_id, HIGH)
            if kind.endswith("_v6"):
                source = addr.inside(ipaddress.IPv6Network(rng.choice(owner.v6)))
            else:
                source = rng.choice(owner.v4).split("/")[0]
                if kind.endswith("_mapped"):
                    source = "::ffff:" + source
            return {"sourceIPAddress": source}, label
        if kind == "expected_all_v4":
            return {"sourceIPAddress": addr.inside(self.net_all)}, None
        if kind == "expected_home_v4":
            return {"sourceIPAddress": addr.inside(self.net_home0)}, None
        if kind == "expected_home_v6":
            return {"sourceIPAddress": addr.inside(self.net_home1)}, None
        if kind == "expected_other_v4":
            return {"sourceIPAddress": addr.inside(self.net_home0, must_be_global=True)}, (OUTSIDE, None, HIGH)
        if kind == "expected_other_v6":
            return {"sourceIPAddress": addr.inside(self.net_home1, must_be_global=True)}, (OUTSIDE, None, HIGH)
        if kind in ("tofu_first_v4", "tofu_repeat_v4"):
            return {"sourceIPAddress": sess.tofu_v4}, None
        if kind in ("tofu_first_v6", "tofu_repeat_v6"):
            return {"sourceIPAddress": sess.tofu_v6}, None
        if kind == "tofu_repeat_mapped":
            return {"sourceIPAddress": "::ffff:" + str(sess.tofu_v4)}, None
        if kind in ("aws_inventory_v4", "aws_tofu_other_v4"):
            return {"sourceIPAddress": addr.aws_v4()}, (INSIDE, None, HIGH)
        if kind in ("aws_inventory_v6", "aws_tofu_other_v6"):
            return {"sourceIPAddress": addr.aws_v6()}, (INSIDE, None, HIGH)
        if kind == "private_v4":
            return {"sourceIPAddress": addr.private_v4()}, (OUTSIDE, None, HIGH)
        if kind == "private_v6":
            return {"sourceIPAddress": addr.private_v6()}, (OUTSIDE, None, HIGH)
        if kind == "outside_v4":
            return {"sourceIPAddress": addr.outside_v4()}, (OUTSIDE, None, HIGH)
        if kind == "outside_v6":
            return {"sourceIPAddress": addr.outside_v6()}, (OUTSIDE, None, HIGH)
        if kind == "outside_mapped":
            return {"sourceIPAddress": "::ffff:" + addr.outside_v4()}, (OUTSIDE, None, HIGH)
        if kind in OTHER_LEGIT_KINDS or kind in OTHER_ATTACK_KINDS:
            made = self.other_instance_fields(kind, sess)
            if made is None:
                raise ValueError(f"{kind} is not possible for {sess.arn}")
            return made
        raise ValueError(f"unknown kind {kind}")

    def add(self, event: Event) -> Event:
        event.seq = self.seq
        self.seq += 1
        self.events.append(event)
        return event

    def instance_event(
        self,
        sess: Session,
        kind: str,
        at: float,
        *,
        origin: str | None = None,
        key: str | None = None,
        when: float | None = None,
        extra: tuple[tuple[str, str | None, int], ...] = (),
        call: dict[str, Any] | None = None,
        place: tuple[dict[str, Any], tuple[str, str | None, int] | None] | None = None,
    ) -> Event:
        """A record of ``sess`` arriving at ``at``, from the place ``origin`` (default: ``kind``) names.

        ``when`` fixes its eventTime (default: ``at``, or up to 5 minutes earlier for one record in ten:
        a late arrival). ``extra`` are labels beyond the origin's (§11); ``call`` replaces the API call
        (and then no random errorCode is added); ``place`` gives the origin fields and label outright."""
        rng = self.rng
        if key is None:
            key = sess.keys[0] if at < sess.start + self.span / 2 else sess.keys[1]
        identity = self.identity(sess, key)
        fields, label = place if place is not None else self.origin_fields(origin or kind, sess)
        fields = dict(fields)
        invoked_by = fields.pop("_invokedBy", None)
        if invoked_by is not None:
            identity["invokedBy"] = invoked_by
        if when is None:
            when = at - rng.randint(1, 300) if rng.random() < 0.1 else at  # late arrival: out of time order
        record = self.base_record(when, identity, sess.home.account_id, sess.region)
        record.update(fields)
        labels = list(extra)
        if label is not None or labels:
            record["userAgent"] = _ATTACKER_UA
        if call is not None:
            record.update(call)
        elif rng.random() < (0.3 if label is not None or labels else 0.05):  # failed calls count as well
            code, message = rng.choice(_ERRORS)
            record["errorCode"] = code
            record["errorMessage"] = message
        if self.imdsv1 and sess.delivery == "1.0":  # SPEC §13: every record of it, whatever its origin
            labels.append((IMDSV1, None, LOW))
        return self.add(Event(at=at, seq=0, kind=kind, record=record, label=label, session=sess, extra=labels))

    def issuance(self, sess: Session, key: str, at: float) -> None:
        token = "IQoJb3JpZ2luX2VjE" + self.hexs(48)
        self.tokens.append(token)
        role_arn = f"arn:aws:iam::{sess.home.account_id}:role/{sess.role}"
        record = self.base_record(
            at, {"type": "AWSService", "invokedBy": "ec2.amazonaws.com"}, sess.home.account_id, sess.region
        )
        record.update(
            {
                "eventSource": "sts.amazonaws.com",
                "eventName": "AssumeRole",
                "sourceIPAddress": "ec2.amazonaws.com",
                "userAgent": "ec2.amazonaws.com",
                "requestParameters": {"roleArn": role_arn, "roleSessionName": sess.instance_id},
                "responseElements": {
                    "credentials": {"accessKeyId": key, "sessionToken": token, "expiration": _iso(at + 6 * 3600)}
                },
                "resources": [{"accountId": sess.home.account_id, "type": "AWS::IAM::Role", "ARN": role_arn}],
                "sharedEventID": self.uuid(),
            }
        )
        self.add(Event(at=at, seq=0, kind="issuance", record=record, session=sess))

    def plan_sessions(self) -> None:
        rng = self.rng
        # Coverage: every legit and attack kind at least `min_per_kind` times, on eligible sessions.
        assignments: dict[int, list[str]] = {i: [] for i in range(len(self.sessions))}
        kinds = (*LEGIT_KINDS, *ATTACK_KINDS, *((*OTHER_LEGIT_KINDS, *OTHER_ATTACK_KINDS) if self.part2 else ()))
        for kind in kinds:
            candidates = [i for i, s in enumerate(self.sessions) if self.eligible(kind, s)]
            for _ in range(self.min_per_kind if candidates else 0):
                assignments[rng.choice(candidates)].append(kind)
        for i, sess in enumerate(self.sessions):
            if sess.role == IDENTITY_ROLE:  # SPEC §10: found like any other instance session
                assignments[i] += ["outside_v4", "endpoint_home_field"]
        background = ("service_host", "endpoint_home_field", "endpoint_home_registry", "cidr_hub_v4", "expected_all_v4")
        for i, sess in enumerate(self.sessions):
            self.issuance(sess, sess.keys[0], sess.start)
            self.issuance(sess, sess.keys[1], sess.start + self.span / 2)
            if not sess.home.inventory:
                # Trust on first use: the instance's own public addresses come first, for each family.
                self.instance_event(sess, "tofu_first_v4", sess.start + 5)
                self.instance_event(sess, "tofu_first_v6", sess.start + 8)
                own = ("tofu_repeat_v4", "tofu_repeat_v6")
            else:
                own = ("cidr_home_v4", "cidr_home_v6")
            kinds = assignments[i] + [rng.choice(background + own) for _ in range(rng.randint(3, 8))]
            for kind in kinds:
                for _ in range(rng.randint(1, 3) if kind in ATTACK_KINDS else 1):
                    self.instance_event(sess, kind, sess.start + rng.uniform(20, self.span))

    # --- part two (SPEC §10-§13) ----------------------------------------------------------------------
    # Origins of the §11 scenarios' records: none raises a §5 finding except where the label says so.
    LEGIT_ORIGINS = ("endpoint_home_field", "endpoint_home_registry", "expected_all_v4", "cidr_hub_v4")
    THIEF_ORIGINS = (*LEGIT_ORIGINS, "outside_v4", "outside_v6", "private_v4")
    SERVICE_ORIGINS = ("service_host", "service_internal", "service_invoked_by")

    def place(self, lo: int, hi: int, after: float = float("-inf"), before: float = float("inf")) -> tuple[int, float]:
        """An eventTime in [lo, hi] (whole seconds) and an arrival after ``after`` and before ``before``:
        one record in ten arrives up to 5 minutes late (out of time order with its neighbours)."""
        rng = self.rng
        when = rng.randint(int(lo), int(max(lo, hi)))
        late = rng.uniform(1, 300) if rng.random() < 0.1 else 0.0
        at = min(max(when + late + 0.25, after + 0.5), before - 0.5)
        assert at >= when, (when, at, after, before)
        return when, at

    def user_identity(self, account: str, name: str) -> dict[str, Any]:
        return {
            "type": "IAMUser",
            "principalId": "AIDA" + self.upper(17),
            "arn": f"arn:aws:iam::{account}:user/{name}",
            "accountId": account,
            "accessKeyId": "AKIA" + self.upper(16),
            "userName": name,
        }

    def ec2_call(self, name: str, instance_ids: list[str], *, response: bool = True) -> dict[str, Any]:
        """The request and response of an EC2 instance-state call (or AssociateAddress) on ``instance_ids``."""
        states = {
            "StopInstances": ((16, "running"), (64, "stopping")),
            "TerminateInstances": ((16, "running"), (32, "shutting-down")),
            "StartInstances": ((80, "stopped"), (0, "pending")),
        }
        request: dict[str, Any] = {"instancesSet": {"items": [{"instanceId": i} for i in instance_ids]}}
        if name == "StopInstances":
            request["force"] = False
        out: dict[str, Any] = {"eventSource": "ec2.amazonaws.com", "eventName": name, "readOnly": False, "requestParameters": request}
        out["responseElements"] = None
        if response:
            before, after = states[name]
            items = [
                {"instanceId": i, "currentState": {"code": after[0], "name": after[1]}, "previousState": {"code": before[0], "name": before[1]}}
                for i in instance_ids
            ]
            out["responseElements"] = {"requestId": self.uuid(), "instancesSet": {"items": items}}
        return out

    def associate_call(self, instance_id: str | None, eni: str | None = None) -> dict[str, Any]:
        request: dict[str, Any] = {"allocationId": "eipalloc-" + self.hexs(17), "allowReassociation": True}
        if instance_id is not None:
            request["instanceId"] = instance_id
        if eni is not None:
            request["networkInterfaceId"] = eni
        response = {"requestId": self.uuid(), "_return": True, "associationId": "eipassoc-" + self.hexs(17)}
        return {"eventSource": "ec2.amazonaws.com", "eventName": "AssociateAddress", "readOnly": False,
                "requestParameters": request, "responseElements": response}  # fmt: skip

    def ops_event(self, kind: str, sess: Session, when: int, call: dict[str, Any], error: tuple[str, str] | None = None) -> float:
        """A lifecycle call by an administrator (not an instance session); returns its arrival."""
        at = when + self.rng.uniform(0, 60) + 0.25
        record = self.base_record(when, self.user_identity(sess.home.account_id, "ops-admin"), sess.home.account_id, sess.region)
        record.update({"sourceIPAddress": self.addr.outside_v4(), "userAgent": "console.ec2.amazonaws.com"})
        record.update(call)
        if error is not None:
            record.update({"errorCode": error[0], "errorMessage": error[1], "responseElements": None})
        self.add(Event(at=at, seq=0, kind=kind, record=record))
        return at

    def state_change(self, kind: str, instance_id: str, account: str, region: str, state: str, when: int) -> float:
        """An EventBridge `EC2 Instance State-change Notification` (SPEC §10, §11); returns its arrival."""
        at = when + self.rng.uniform(0, 60) + 0.25
        envelope = {
            "version": "0",
            "id": self.uuid(),
            "detail-type": STATE_CHANGE,
            "source": "aws.ec2",
            "account": account,
            "time": _iso(when),
            "region": region,
            "resources": [f"arn:aws:ec2:{region}:{account}:instance/{instance_id}"],
            "detail": {"instance-id": instance_id, "state": state},
        }
        self.add(Event(at=at, seq=0, kind=kind, envelope=envelope))
        return at

    def stop_signal(self, variant: str, sess: Session, when: int) -> float:
        """Stop ``sess``'s instance at ``when`` by ``variant`` (STOP_SIGNAL_KINDS); returns the arrival
        after which every signal of it has arrived, and records the stop on the session."""
        rng, iid = self.rng, sess.instance_id
        ids = [iid]
        if variant in ("stop_api", "terminate_api", "stop_api_request_only") and rng.random() < 0.4:
            ids.insert(rng.randrange(2), "i-" + self.hexs(17))  # an instance nobody saw, stopped alongside
            self.flags["stop_unknown_instance"] += 1
        sess.stopped_at = when
        sess.stop_state = {"terminate_api": "terminated", "statechange_terminate": "terminated", "spot_eviction": None}.get(
            variant, "stopped"
        )
        if variant in ("stop_api", "terminate_api", "stop_api_request_only"):
            name = "TerminateInstances" if variant == "terminate_api" else "StopInstances"
            call = self.ec2_call(name, ids, response=variant != "stop_api_request_only")
            return self.ops_event(variant, sess, when, call)
        if variant == "spot_eviction":
            account = sess.home.account_id
            record = self.base_record(when, {"accountId": account, "invokedBy": "ec2.amazonaws.com"}, account, sess.region)
            record.update(
                {
                    "eventSource": "ec2.amazonaws.com", "eventName": "BidEvictedEvent", "eventType": "AwsServiceEvent",
                    "sourceIPAddress": "ec2.amazonaws.com", "userAgent": "ec2.amazonaws.com", "requestParameters": None,
                    "readOnly": False, "serviceEventDetails": {"instanceIdSet": ids},
                }
            )  # fmt: skip
            record.pop("tlsDetails")
            at = when + rng.uniform(0, 60) + 0.25
            self.add(Event(at=at, seq=0, kind=variant, record=record, wrap="AWS Service Event via CloudTrail"))
            return at
        if variant in ("statechange_stop", "statechange_terminate"):
            first, second = ("stopping", "stopped") if variant == "statechange_stop" else ("shutting-down", "terminated")
            a1 = self.state_change(variant, iid, sess.home.account_id, sess.region, first, when)
            a2 = self.state_change(variant, iid, sess.home.account_id, sess.region, second, when + rng.randint(20, 90))
            return max(a1, a2)
        assert variant == "stop_self"  # the instance stops itself with its own credentials, from its endpoint
        event = self.instance_event(
            sess, variant, when + 0.25, origin="endpoint_home_field", key=sess.keys[0], when=when,
            call=self.ec2_call("StopInstances", ids),
        )  # fmt: skip
        return event.at

    def start_signal(self, variant: str, sess: Session, when: int) -> float:
        if variant == "start_api":
            return self.ops_event(variant, sess, when, self.ec2_call("StartInstances", [sess.instance_id]))
        a1 = self.state_change(variant, sess.instance_id, sess.home.account_id, sess.region, "pending", when)
        a2 = self.state_change(variant, sess.instance_id, sess.home.account_id, sess.region, "running", when + self.rng.randint(20, 60))
        return max(a1, a2)

    def records(
        self, sess: Session, kind: str, n: int, lo: int, hi: int, origins: tuple[str, ...], key: str, *,
        after: float = float("-inf"), before: float = float("inf"), extra: tuple[tuple[str, str | None, int], ...] = (),
        place: tuple[dict[str, Any], tuple[str, str | None, int] | None] | None = None,
    ) -> list[Event]:  # fmt: skip
        """``n`` records of ``sess`` of ``kind``, eventTime in [lo, hi], from one of ``origins`` (or ``place``)."""
        out = []
        for _ in range(n):
            when, at = self.place(lo, hi, after, before)
            origin = self.rng.choice(origins) if origins else None
            out.append(self.instance_event(sess, kind, at, origin=origin, key=key, when=when, extra=extra, place=place))
        return out

    def plan_lifecycle(self) -> None:
        """SPEC §11: instances that stop (every signal), some that restart, and calls that stop nothing."""
        for _ in range(self.min_per_kind):
            for variant in STOP_SIGNAL_KINDS:
                self.scenario_clause_a(variant)
            for restart in START_SIGNAL_KINDS:
                for known in ("seen", "issued"):
                    self.scenario_clause_b(restart, known)
            for variant in ("stop_dryrun", "stop_failed"):
                self.scenario_no_stop(variant)
            self.scenario_failed_start()

    def lifecycle_session(self) -> tuple[Session, int]:
        sess = self.scenario_session(self.rng.choice(self.homes))
        stop = int(sess.start) + self.rng.randint(1500, 3000)
        return sess, stop

    def scenario_clause_a(self, variant: str) -> None:
        """Active, stopped at T by ``variant``; in-flight calls within the grace; a thief after it (clause a),
        also through the instance's `aws:ec2-instance` session; AWS services calling after it (nothing)."""
        rng, grace = self.rng, self.grace
        sess, stop = self.lifecycle_session()
        s0 = int(sess.start)
        sessions = [sess]
        if variant != "stop_self" and rng.random() < 0.4:
            sessions.append(self.sibling(sess))
        self.issuance(sess, sess.keys[0], s0)
        for x in sessions:
            self.records(x, "before_stop", rng.randint(1, 3), s0 + 20, stop - 30, self.LEGIT_ORIGINS, x.keys[0], before=stop)
        arrived = self.stop_signal(variant, sess, stop)
        for x in sessions:
            x.stopped_at, x.stop_state = sess.stopped_at, sess.stop_state
            if grace >= 2:
                self.records(x, "after_stop_within_grace", rng.randint(1, 2), stop + 1, stop + grace, self.LEGIT_ORIGINS, x.keys[0], after=arrived)
            stolen = x.keys[0] if rng.random() < 0.7 else x.keys[2]  # a key the instance never used, clause a all the same
            after_stop = ((AFTER_STOPPED, None, HIGH),)
            lo = stop + max(grace + 1, self.settle)
            if variant.startswith("statechange") and grace + 1 >= self.settle:
                # Just past the grace after the first signal: T is the earliest stop signal since the start.
                self.records(x, "after_stop_a", 1, stop + grace + 1, stop + grace + 15, self.THIEF_ORIGINS, stolen, after=arrived, extra=after_stop)
            self.records(x, "after_stop_a", rng.randint(1, 2), lo, lo + 3000, self.THIEF_ORIGINS, stolen, after=arrived, extra=after_stop)
            self.records(x, "after_stop_service", 1, lo, lo + 3000, self.SERVICE_ORIGINS, stolen, after=arrived)

    def scenario_clause_b(self, restart: str, known: str) -> None:
        """Stopped at T, restarted at S: the key issued after S is nothing; the key known before T
        (``seen`` in a record, or ``issued`` by EC2) used after T + grace is clause b."""
        rng, grace = self.rng, self.grace
        sess, stop = self.lifecycle_session()
        s0 = int(sess.start)
        previous, stolen, fresh = sess.keys[2], sess.keys[0], sess.keys[1]
        if known == "seen":
            self.issuance(sess, stolen, s0)
            self.records(sess, "before_stop", rng.randint(1, 3), s0 + 20, stop - 30, self.LEGIT_ORIGINS, stolen, before=stop)
            variants = ("stop_api", "stop_api_request_only", "statechange_stop", "spot_eviction", "stop_self")
        else:  # the stolen key only ever appears in its issuance before the stop
            self.issuance(sess, previous, s0)
            self.records(sess, "before_stop", rng.randint(1, 2), s0 + 20, stop - 900, self.LEGIT_ORIGINS, previous, before=stop - 800)
            issued = rng.randint(stop - 600, stop - 60)
            self.issuance(sess, stolen, issued)
            variants = ("stop_api", "stop_api_request_only", "statechange_stop", "spot_eviction")
        arrived = self.stop_signal(rng.choice(variants), sess, stop)
        start = stop + rng.randint(120, 1800)
        started = self.start_signal(restart, sess, start)
        self.issuance(sess, fresh, start + 5)
        lo = start + max(30, self.settle)  # (before the start, the new key would be clause a)
        self.records(sess, "after_restart_new_key", 2, lo, lo + grace + 2400, self.THIEF_ORIGINS[:4], fresh, after=max(started, start + 6))
        kind = "after_stop_b_" + known
        lo = max(start + 30, stop + max(grace + 1, self.settle))  # (before the start, clause a: a finding all the same)
        self.records(sess, kind, 2, lo, lo + 2400, self.THIEF_ORIGINS, stolen, after=started, extra=((AFTER_STOPPED, None, HIGH),))

    def scenario_no_stop(self, variant: str) -> None:
        """A StopInstances that failed (DryRun, or another errorCode) stops nothing."""
        rng, grace = self.rng, self.grace
        sess, stop = self.lifecycle_session()
        s0 = int(sess.start)
        self.issuance(sess, sess.keys[0], s0)
        self.records(sess, "before_stop", rng.randint(1, 2), s0 + 20, stop - 30, self.LEGIT_ORIGINS, sess.keys[0], before=stop)
        error = (
            ("Client.DryRunOperation", "Request would have succeeded, but DryRun flag is set.")
            if variant == "stop_dryrun"
            else rng.choice((("Client.UnauthorizedOperation", "You are not authorized to perform this operation."),
                             ("Client.IncorrectInstanceState", "The instance is not in a state from which it can be stopped.")))
        )  # fmt: skip
        arrived = self.ops_event(variant, sess, stop, self.ec2_call("StopInstances", [sess.instance_id]), error=error)
        kind = "after_dryrun_stop" if variant == "stop_dryrun" else "after_failed_stop"
        lo = stop + max(grace + 1, self.settle)
        self.records(sess, kind, 2, lo, lo + 3000, self.LEGIT_ORIGINS, sess.keys[0], after=arrived)

    def scenario_failed_start(self) -> None:
        """Stopped at T; a StartInstances that failed does not restart it: a key it never used, after
        T + grace, is clause a."""
        rng, grace = self.rng, self.grace
        sess, stop = self.lifecycle_session()
        s0 = int(sess.start)
        self.issuance(sess, sess.keys[0], s0)
        self.records(sess, "before_stop", rng.randint(1, 2), s0 + 20, stop - 30, self.LEGIT_ORIGINS, sess.keys[0], before=stop)
        arrived = self.stop_signal(rng.choice(("stop_api", "statechange_stop", "stop_api_request_only")), sess, stop)
        start = stop + rng.randint(60, 600)
        error = ("Client.InsufficientInstanceCapacity", "There is no Spot capacity available that matches your request.")
        started = self.ops_event("start_failed", sess, start, self.ec2_call("StartInstances", [sess.instance_id]), error=error)
        lo = max(start + 1, stop + max(grace + 1, self.settle))
        self.records(sess, "after_failed_start", 2, lo, lo + 3000, self.THIEF_ORIGINS, sess.keys[1], after=max(arrived, started),
                     extra=((AFTER_STOPPED, None, HIGH),))  # fmt: skip

    def plan_resets(self) -> None:
        """SPEC §13: trust-on-first-use addresses reset by AssociateAddress, StartInstances and state
        changes to pending/running; and the controls, where the same pattern is a finding."""
        homes = [h for h in self.homes if not h.inventory]
        for _ in range(self.min_per_kind):
            for variant in (*RESET_KINDS, *NO_RESET_KINDS):
                self.scenario_reset(variant, self.rng.choice(homes))

    def scenario_reset(self, variant: str, home: Account) -> None:
        rng = self.rng
        sess = self.scenario_session(home)
        s0 = int(sess.start)
        sessions = [sess] + ([self.sibling(sess)] if rng.random() < 0.4 else [])
        reset = s0 + rng.randint(1200, 3600)
        old = sess.tofu_v4
        assert old is not None
        for n, x in enumerate(sessions):
            self.instance_event(x, "tofu_first_v4", s0 + 5 + n + 0.25, when=s0 + 5 + n, key=x.keys[0])
            hi = reset - max(30, self.settle)  # (after the reset, it would be learnt anew)
            self.records(x, "tofu_before_reset", rng.randint(1, 2), s0 + 30, hi, ("tofu_repeat_v4",), x.keys[0], before=hi + 1)
        iid, account = sess.instance_id, sess.home.account_id
        errors = (("Client.InvalidAllocationID.NotFound", "The allocation ID 'eipalloc-0' does not exist"),
                  ("Client.UnauthorizedOperation", "You are not authorized to perform this operation."))  # fmt: skip
        effective = variant in RESET_KINDS
        if variant == "reset_associate":
            arrived = self.ops_event(variant, sess, reset, self.associate_call(iid))
        elif variant == "reset_start_api":
            arrived = self.ops_event(variant, sess, reset, self.ec2_call("StartInstances", [iid]))
        elif variant == "reset_statechange":
            arrived = self.start_signal("statechange_start", sess, reset)
            self.flags[variant] += 1
        elif variant in ("reset_self_old", "reset_self_new"):
            # The instance moves an Elastic IP onto itself: judged against the baseline before the reset.
            if variant == "reset_self_old":
                place: tuple[dict[str, Any], Any] = ({"sourceIPAddress": old}, None)
            else:
                place = ({"sourceIPAddress": self.addr.aws_v4()}, (INSIDE, None, HIGH))
            event = self.instance_event(sess, variant, reset + 0.25, when=reset, key=sess.keys[0], call=self.associate_call(iid), place=place)
            arrived = event.at
        elif variant == "no_reset_eni":
            arrived = self.ops_event(variant, sess, reset, self.associate_call(None, eni="eni-" + self.hexs(17)))
        elif variant == "no_reset_error":
            arrived = self.ops_event(variant, sess, reset, self.associate_call(iid), error=rng.choice(errors))
        elif variant == "no_reset_start_error":
            error = ("Client.IncorrectInstanceState", "The instance is not in a state from which it can be started.")
            arrived = self.ops_event(variant, sess, reset, self.ec2_call("StartInstances", [iid]), error=error)
        else:
            assert variant == "no_reset_other_instance"
            arrived = self.ops_event(variant, sess, reset, self.associate_call("i-" + self.hexs(17)))
        last = max(reset + 60, int(arrived) + 1) + max(0, self.settle - 30)
        new = self.addr.aws_v4()
        for x in sessions:
            new_label = None if effective else (INSIDE, None, HIGH)
            first = self.records(x, "tofu_after_reset" if effective else "tofu_no_reset", 1, last + 30, last + 600,
                                 (), x.keys[0], after=arrived, place=({"sourceIPAddress": new}, new_label))  # fmt: skip
            w1, a1 = self.when_of(first[0]), first[0].at
            self.records(x, "tofu_after_reset" if effective else "tofu_no_reset", rng.randint(0, 1), w1 + 1, w1 + 600,
                         (), x.keys[0], after=a1, place=({"sourceIPAddress": new}, new_label))  # fmt: skip
            old_label = (INSIDE, None, HIGH) if effective else None
            self.records(x, "tofu_old_after_reset" if effective else "tofu_old_no_reset", 1, w1 + max(1, self.settle), w1 + self.settle + 900,
                         (), x.keys[0], after=a1 + self.settle, place=({"sourceIPAddress": old}, old_label))  # fmt: skip

    @staticmethod
    def when_of(event: Event) -> int:
        assert event.record is not None
        return int(datetime.strptime(event.record["eventTime"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp())

    def plan_aws_roles(self) -> None:
        """SPEC §10: records of `aws:` roles other than the identity role (EC2 acting for itself), named
        after real instances, some after their instance stopped, some from anywhere, some by IMDSv1: ignored."""
        rng = self.rng
        stopped = [e.session for e in self.events if e.session is not None and e.session.stopped_at is not None]
        for n in range(2 * self.min_per_kind):
            if n % 2 and stopped:
                sess = rng.choice(stopped)
                assert sess.stopped_at is not None
                when = sess.stopped_at + self.grace + rng.randint(1, 3000)
            else:
                sess = rng.choice(self.sessions)
                when = int(sess.start) + rng.randint(20, int(self.span))
            role = "aws:ec2-infrastructure"
            identity = self.identity(sess, "ASIA" + self.upper(16))
            identity["arn"] = f"arn:aws:sts::{sess.home.account_id}:assumed-role/{role}/{sess.instance_id}"
            identity["sessionContext"]["sessionIssuer"].update(
                {"arn": f"arn:aws:iam::{sess.home.account_id}:role/{role}", "userName": role}
            )
            identity["sessionContext"]["ec2RoleDelivery"] = rng.choice(("1.0", "2.0"))
            record = self.base_record(when, identity, sess.home.account_id, sess.region)
            record["sourceIPAddress"] = self.addr.outside_v4() if n % 3 else self.addr.aws_v4()
            self.add(Event(at=when + 0.25, seq=0, kind="other_aws_role", record=record))

    def plan_unknown_state_changes(self) -> None:
        for _ in range(self.min_per_kind):
            when = int(self.t0 + self.rng.uniform(0, self.span))
            home = self.rng.choice(self.homes)
            state = self.rng.choice(("pending", "running", "stopping", "stopped", "shutting-down", "terminated"))
            self.state_change("statechange_unknown_instance", "i-" + self.hexs(17), home.account_id, "us-east-1", state, when)

    def plan_bare(self) -> None:
        """SPEC §10: one record in seven loses its eventVersion (in every input shape)."""
        for event in self.events:
            if event.record is not None and event.kind != "skipped" and "eventVersion" in event.record and self.rng.random() < 1 / 7:
                del event.record["eventVersion"]
                self.flags["bare_record"] += 1

    def plan_noise(self) -> None:
        """Records of other identities (never findings) and credential issuance for other callers."""
        rng, addr = self.rng, self.addr
        home_ids = [h.account_id for h in self.homes]
        wrong_names = (
            lambda: "botocore-session-" + str(rng.randrange(10**9)),
            lambda: "i-" + self.hexs(17).upper(),  # uppercase hex
            lambda: "i-" + self.hexs(7),
            lambda: "i-" + self.hexs(9),
            lambda: "i-" + self.hexs(16),
            lambda: "i-" + self.hexs(18),
            lambda: "I-" + self.hexs(17),
            lambda: "i-" + self.hexs(8) + "-extra",
        )
        for n in range(self.n_noise):
            at = self.t0 + rng.uniform(0, self.span)
            account = rng.choice(home_ids)
            region = rng.choice(_REGIONS)
            variant = n % 7
            wrap = None
            if variant == 0:
                identity: dict[str, Any] = self.user_identity(account, "alice")
            elif variant == 1:
                identity = {"type": "Root", "principalId": account, "arn": f"arn:aws:iam::{account}:root", "accountId": account}
            elif variant == 2:
                identity = {"type": "AWSService", "invokedBy": rng.choice(_SERVICE_HOSTS)}
                wrap = "AWS Service Event via CloudTrail"
            elif variant in (3, 4, 5):
                name = rng.choice(wrong_names)()
                identity = {
                    "type": "AssumedRole",
                    "principalId": "AROA" + self.upper(17) + ":" + name,
                    "arn": f"arn:aws:sts::{account}:assumed-role/ops-role/{name}",
                    "accountId": account,
                    "accessKeyId": "ASIA" + self.upper(16),
                }
            else:
                # Looks like an instance session in every way but the identity type.
                sess = rng.choice(self.sessions)
                identity = self.identity(sess, sess.keys[0])
                identity["type"] = rng.choice(("IAMUser", "FederatedUser", "Role"))
            record = self.base_record(at, identity, account, region)
            record["sourceIPAddress"] = addr.outside_v4() if rng.random() < 0.7 else addr.outside_v6()
            if variant == 1 and n % 2:
                record.update({"eventSource": "signin.amazonaws.com", "eventName": "ConsoleLogin", "eventType": "AwsConsoleSignIn"})
                wrap = "AWS Console Sign In via CloudTrail"
            self.add(Event(at=at, seq=0, kind="noise", record=record, wrap=wrap))
        # AssumeRole issued by other principals (not EC2): neither a finding nor enrichment.
        for _ in range(max(1, self.n_noise // 10)):
            at = self.t0 + rng.uniform(0, self.span)
            account = rng.choice(home_ids)
            token = "IQoJb3JpZ2luX2VjE" + self.hexs(48)
            self.tokens.append(token)
            record = self.base_record(at, {"type": "AWSService", "invokedBy": "lambda.amazonaws.com"}, account, "us-east-1")
            record.update(
                {
                    "eventSource": "sts.amazonaws.com",
                    "eventName": "AssumeRole",
                    "sourceIPAddress": "lambda.amazonaws.com",
                    "requestParameters": {"roleArn": f"arn:aws:iam::{account}:role/fn-role", "roleSessionName": "fn"},
                    "responseElements": {"credentials": {"accessKeyId": "ASIA" + self.upper(16), "sessionToken": token}},
                }
            )
            self.add(Event(at=at, seq=0, kind="noise", record=record))
        # EventBridge events of other detail-types: skipped, even one whose detail is an attack record.
        for n in range(max(2, self.n_noise // 10)):
            at = self.t0 + rng.uniform(0, self.span)
            if n == 0:
                sess = rng.choice(self.sessions)
                record = self.base_record(at, self.identity(sess, sess.keys[0]), sess.home.account_id, sess.region)
                record["sourceIPAddress"] = addr.outside_v4()
                self.add(Event(at=at, seq=0, kind="skipped", record=record, wrap="Custom Replay Event"))
            else:
                detail = {"instance-id": "i-" + self.hexs(17), "state": rng.choice(("running", "stopped"))}
                types = _OTHER_DETAIL_TYPES if self.part2 else (STATE_CHANGE, *_OTHER_DETAIL_TYPES)
                self.add(Event(at=at, seq=0, kind="skipped", record=detail, wrap=rng.choice(types)))

    def plan_duplicates(self) -> None:
        """CloudTrail may deliver an event twice: later copies with the same eventID count once (and,
        being the same event, stop, start or reset nothing again). Records carrying a lifecycle or
        address signal are copied only when ``duplicate_signals`` (see make_world)."""
        rng = self.rng
        attacks = [e for e in self.events if e.label is not None and not _is_signal(e)]
        legit = [e for e in self.events if e.kind in LEGIT_KINDS]
        picks = rng.sample(attacks, min(len(attacks), self.n_duplicates))
        picks += rng.sample(legit, min(len(legit), max(1, self.n_duplicates // 2)))
        for original in picks:
            self.duplicate(original, original.at + rng.uniform(60, 1800), "duplicate")
        if self.duplicate_signals:
            for original in [e for e in self.events if _is_signal(e)]:
                self.duplicate(original, original.at + rng.uniform(self.settle + 60, self.settle + 1800), "duplicate_signal")

    def duplicate(self, original: Event, at: float, kind: str) -> None:
        copy_ = Event(
            at=at,
            seq=0,
            kind=kind,
            record=copy.deepcopy(original.record),
            label=original.label,
            session=original.session,
            counted=False,
            wrap=original.wrap,
        )
        self.add(copy_)

    def malformed_raw(self, n: int) -> tuple[bytes, dict[str, Any] | None]:
        """The n-th malformed line, and the CloudTrail record it decodes to (if it decodes to one)."""
        choices: list[bytes] = [
            b"not json at all",
            b'{"eventVersion": "1.08", "userIdentity": {"type": "IAMUser"',  # truncated
            b"[1, 2, 3]",
            b'"just a string"',
            b'{"Records": {"not": "a list"}}',
            b'{"detail-type": "AWS API Call via CloudTrail", "detail": "not an object"}',
            b'{"eventVersion": "1.08", "userIdentity": "not an object"}',
            b'{"hello": "world"}',
            b'{"userIdentity": {"type": "IAMUser"}, "eventName": "ListBuckets"}',  # bare, but no eventTime (§10)
        ]
        i = n % (len(choices) + 1)
        if i != 1:
            return choices[i if i < 1 else i - 1], None
        # An instance-credential record the engine cannot decide (no usable sourceIPAddress).
        sess = self.sessions[n % len(self.sessions)]
        record = self.base_record(sess.start + 60, self.identity(sess, sess.keys[0]), sess.home.account_id, sess.region)
        record["sourceIPAddress"] = "not-an-address"
        return json.dumps(record).encode(), record

    # output
    def serialize(self) -> tuple[list[tuple[str, bytes]], list[tuple[dict[str, Any], str]], int, int]:
        """Lay the events out in files, in arrival order; returns inputs, (record, kind)s, malformed, skipped."""
        rng = self.rng
        ordered = sorted(self.events, key=lambda e: (e.at, e.seq))
        shapes = ("eventbridge", "cloudtrail", "records")
        chunks: list[list[Event]] = [[] for _ in range(self.n_files)]
        for i, event in enumerate(ordered):
            f = min(self.n_files - 1, i * self.n_files // len(ordered))
            if event.kind == "skipped":
                f -= f % 3  # only EventBridge carries other detail-types: the file of this triple that does
            chunks[f].append(event)
        jsonl_files = [f for f in range(self.n_files) if shapes[f % 3] != "cloudtrail"]
        bad_per_file = {f: self.malformed_lines // len(jsonl_files) for f in jsonl_files}
        for f in jsonl_files[: self.malformed_lines % len(jsonl_files)]:
            bad_per_file[f] += 1
        inputs: list[tuple[str, bytes]] = []
        records: list[tuple[dict[str, Any], str]] = []
        malformed = skipped = bad_made = 0
        width = max(2, len(str(self.n_files - 1)))
        for f, chunk in enumerate(chunks):
            shape = shapes[f % 3]
            # State-change notifications are EventBridge events only: in a CloudTrail or records file they
            # split it in parts ("05.00-records.jsonl", "05.01-eventbridge.jsonl", ...: still sorted in
            # arrival order), so that every file holds one shape.
            segments: list[list[Event]] = []
            for event in chunk:
                if not segments or (shape != "eventbridge" and (event.envelope is None) != (segments[-1][0].envelope is None)):
                    segments.append([])
                segments[-1].append(event)
            first = True  # the first file of the chunk in its own shape gets the chunk's malformed input
            for n, segment in enumerate(segments):
                name = f"{f:0{width}d}" if len(segments) == 1 else f"{f:0{width}d}.{n:02d}"
                if shape == "cloudtrail" and segment[0].envelope is None:
                    items: list[Any] = [event.record for event in segment]
                    records.extend((event.record, event.kind) for event in segment)  # type: ignore[misc]
                    if self.malformed_lines and first:
                        items.insert(rng.randrange(len(items) + 1), 42)  # a Records element that is no record
                        malformed += 1
                    first = False
                    body = gzip.compress(json.dumps({"Records": items}).encode(), mtime=0)
                    inputs.append((f"{name}-cloudtrail.json.gz", body))
                    continue
                own = segment[0].envelope is None or shape == "eventbridge"
                lines = self.jsonl_lines(segment, "records" if shape == "records" and own else "eventbridge")
                skipped += sum(1 for e in segment if e.kind == "skipped")
                self.state_changes += sum(1 for e in segment if e.envelope is not None)
                for _ in range(bad_per_file.get(f, 0) if own and first else 0):
                    raw, decoded = self.malformed_raw(bad_made)
                    bad_made += 1
                    malformed += 1
                    lines.insert(rng.randrange(len(lines) + 1), (raw, decoded, "malformed"))
                first = first and not own
                records.extend((record, kind) for _, record, kind in lines if record is not None)
                file_shape = shape if own else "eventbridge"
                inputs.append((f"{name}-{file_shape}.jsonl", b"".join(line + b"\n" for line, _, _ in lines)))
        return inputs, records, malformed, skipped

    def jsonl_lines(self, events: list[Event], shape: str) -> list[tuple[bytes, dict[str, Any] | None, str]]:
        """(line, the CloudTrail record it carries or None, kind) of each event, as ``shape`` lines."""
        lines: list[tuple[bytes, dict[str, Any] | None, str]] = []
        for event in events:
            if event.envelope is not None:  # a state-change notification
                lines.append((json.dumps(event.envelope, separators=(",", ":")).encode(), None, event.kind))
                continue
            record = event.record
            assert record is not None
            value: Any = record
            if shape == "eventbridge":
                value = {
                    "version": "0",
                    "id": self.uuid(),
                    "detail-type": event.wrap or "AWS API Call via CloudTrail",
                    "source": "aws." + str(record.get("eventSource", "ec2.amazonaws.com")).split(".")[0],
                    "account": record.get("recipientAccountId", self.homes[0].account_id),
                    "time": record.get("eventTime", _iso(event.at)),
                    "region": record.get("awsRegion", "us-east-1"),
                    "resources": [],
                    "detail": record,
                }
            carried = None if event.kind == "skipped" else record
            lines.append((json.dumps(value, separators=(",", ":")).encode(), carried, event.kind))
        return lines

    def expected(self) -> list[ExpectedGroup]:
        """The finding groups the labels make (SPEC §8 groups; §11-§13 for the part-two types)."""
        groups: dict[tuple[str, str, str | None], ExpectedGroup] = {}
        for event in sorted(self.events, key=lambda e: (e.at, e.seq)):
            if not event.counted:
                continue
            for finding_type, remote, severity in event.labels:
                sess = event.session
                assert sess is not None and event.record is not None
                key = (finding_type, sess.arn, remote if finding_type in (INSIDE, OTHER_INSTANCE) else None)
                group = groups.get(key)
                if group is None:
                    group = groups[key] = ExpectedGroup(
                        finding_type, sess.arn, sess.home.account_id, sess.instance_id,
                        remote if finding_type == INSIDE else None, severity,
                    )  # fmt: skip
                    if finding_type == OTHER_INSTANCE:
                        group.other_instance_id = remote
                    if finding_type == AFTER_STOPPED:
                        assert sess.stopped_at is not None
                        group.evidence["stoppedAt"] = _iso(sess.stopped_at)
                        if sess.stop_state is not None:
                            group.evidence["instanceState"] = sess.stop_state
                group.count += 1
                when = event.record["eventTime"]
                group.first_seen = min(group.first_seen or when, when)
                group.last_seen = max(group.last_seen or when, when)
                group.kinds[event.kind] += 1
                group.api_calls[(event.record["eventSource"], event.record["eventName"])] += 1
                if event.record.get("errorCode"):
                    group.error_codes[event.record["errorCode"]] += 1
        return list(groups.values())


def make_world(
    seed: int,
    n_accounts: int = 3,
    instances_per_account: int = 4,
    *,
    min_per_kind: int = 3,
    n_files: int = 6,
    malformed_lines: int = 6,
    duplicates: int = 4,
    noise: int = 40,
    hours: float = 4.0,
    part2: bool = True,
    stop_grace_seconds: int = 600,
    imdsv1_findings: bool = True,
    settle_seconds: int = 600,
    duplicate_signals: bool = False,
) -> World:
    """Generate the labelled world of ``seed`` (same seed, same bytes).

    ``n_accounts`` home accounts (the first has network inventory, the second has none, the others
    either), each with ``instances_per_account`` instances; plus a trusted hub, an affiliated
    ``analytics`` account, an unaffiliated ``partner`` and two accounts the registry does not list.
    Every legit and attack kind appears at least ``min_per_kind`` times. ``malformed_lines`` > 0 also
    puts one bad element in each CloudTrail log file. Keep ``hours`` under the 12 h session TTL.

    ``part2`` (default on) adds every case of SPEC part two (§10-§13), each ``min_per_kind`` times:
    the registry's `instances` and endpoint VPCs and the §12 kinds on the sessions above, the
    `aws:ec2-instance` session of one instance per home, instances that stop and restart (§11, labelled
    for ``stop_grace_seconds``), trust-on-first-use resets and their controls (§13), records of other
    `aws:` roles, state-change notifications, bare records; IMDSv1 sessions' Low findings unless
    ``imdsv1_findings`` is false. A record whose label depends on the order in which it and a signal
    (stop, start, address reset) or a first-use address are applied is at least ``settle_seconds`` of
    eventTime (and arrival) away from them: a service reading several unkeyed partitions applies records
    in neither exact arrival nor exact time order (within its reorder window), while one replay can be
    held to the edge (``settle_seconds=0``: records just past stop + grace). ``duplicate_signals`` delivers
    every record carrying a lifecycle or address signal a second time, later (same eventID: it must change
    nothing). ``part2=False`` makes the worlds of part one (byte for byte, but for
    one more kind of malformed line), whose expected findings leave out IMDSv1.
    """
    gen = _Gen(
        seed, n_accounts, instances_per_account, min_per_kind, n_files, malformed_lines, duplicates, noise, hours,
        part2, stop_grace_seconds, imdsv1_findings, settle_seconds, duplicate_signals,
    )  # fmt: skip
    gen.build_accounts()
    gen.build_sessions()
    gen.plan_sessions()
    if part2:
        gen.plan_lifecycle()
        gen.plan_resets()
        gen.plan_aws_roles()
        gen.plan_unknown_state_changes()
    gen.plan_noise()
    gen.plan_duplicates()
    if part2:
        gen.plan_bare()
    inputs, records, malformed, skipped = gen.serialize()
    groups = gen.expected()
    kinds = Counter(e.kind for e in gen.events) + gen.flags
    for event in gen.events:
        if event.session is not None and event.session.role == IDENTITY_ROLE and event.kind != "issuance":
            kinds["ec2_instance_role"] += 1
        if event.counted and any(label[0] == IMDSV1 for label in event.labels):
            kinds["imdsv1"] += 1
    kinds["malformed"] = malformed
    instance_records = sum(1 for e in gen.events if e.session is not None and e.kind != "issuance")
    return World(
        seed=seed,
        inputs=inputs,
        records_in_order=[record for record, _ in records],
        record_kinds=[kind for _, kind in records],
        registry=gen.registry(),
        expected=sort_expected([g.summary() for g in groups]),
        groups=groups,
        kinds=kinds,
        malformed=malformed,
        skipped=skipped,
        instance_records=instance_records,
        session_tokens=list(gen.tokens),
        accounts=gen.accounts,
        state_changes=gen.state_changes,
        stop_grace_seconds=gen.grace,
    )


def write_world(world: World, directory: str | Path) -> list[Path]:
    """Write the inputs, ``files.txt``, ``registry.json`` and ``expected.json``; return the input paths."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in world.inputs:
        path = root / name
        path.write_bytes(data)
        paths.append(path)
    (root / "files.txt").write_text("".join(name + "\n" for name, _ in world.inputs))
    (root / "registry.json").write_text(json.dumps(world.registry, indent=1) + "\n")
    (root / "expected.json").write_text(json.dumps(world.expected, indent=1) + "\n")
    return paths
