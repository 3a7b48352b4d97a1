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
HIGH = 8
MEDIUM = 5

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
_OTHER_DETAIL_TYPES = ("EC2 Instance State-change Notification", "GuardDuty Finding", "Scheduled Event")


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
        """A fresh address inside ``net`` (outside AWS and global when ``must_be_global``)."""
        while True:
            host = int(net.network_address) + self.rng.randrange(1, net.num_addresses - 1)
            addr = ipaddress.ip_address(host)
            if str(addr) in self.used:
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

    @property
    def inventory(self) -> bool:
        return bool(self.v4 or self.v6)


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

    def summary(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "accountId": self.account_id,
            "instanceId": self.instance_id,
            "remoteAccountId": self.remote_account_id,
            "severity": self.severity,
            "count": self.count,
        }


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
    """Rendered findings -> the six fields of ``World.expected`` / expected.json, sorted."""
    out = []
    for f in findings:
        remote = f["service"]["action"]["awsApiCallAction"].get("remoteAccountDetails") or {}
        out.append(
            {
                "type": f["type"],
                "accountId": f["accountId"],
                "instanceId": f["resource"]["instanceDetails"]["instanceId"],
                "remoteAccountId": remote.get("accountId"),
                "severity": f["severity"],
                "count": f["service"]["count"],
            }
        )
    return sort_expected(out)


def sort_expected(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(items, key=lambda e: (e["accountId"], e["instanceId"], e["type"], e["remoteAccountId"] or ""))


# --- generation ----------------------------------------------------------------------------------


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
            entry["vpc_endpoints"] = list(acct.endpoints)
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
        return True

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
        raise ValueError(f"unknown kind {kind}")

    def add(self, event: Event) -> Event:
        event.seq = self.seq
        self.seq += 1
        self.events.append(event)
        return event

    def instance_event(self, sess: Session, kind: str, at: float) -> Event:
        rng = self.rng
        key = sess.keys[0] if at < sess.start + self.span / 2 else sess.keys[1]
        identity = self.identity(sess, key)
        fields, label = self.origin_fields(kind, sess)
        invoked_by = fields.pop("_invokedBy", None)
        if invoked_by is not None:
            identity["invokedBy"] = invoked_by
        when = at - rng.randint(1, 300) if rng.random() < 0.1 else at  # late arrival: out of time order
        record = self.base_record(when, identity, sess.home.account_id, sess.region)
        record.update(fields)
        if label is not None:
            record["userAgent"] = _ATTACKER_UA
        if rng.random() < (0.3 if label is not None else 0.05):  # failed calls count as well
            code, message = rng.choice(_ERRORS)
            record["errorCode"] = code
            record["errorMessage"] = message
        return self.add(Event(at=at, seq=0, kind=kind, record=record, label=label, session=sess))

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
        for kind in (*LEGIT_KINDS, *ATTACK_KINDS):
            candidates = [i for i, s in enumerate(self.sessions) if self.eligible(kind, s)]
            for _ in range(self.min_per_kind):
                assignments[rng.choice(candidates)].append(kind)
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
                identity: dict[str, Any] = {
                    "type": "IAMUser",
                    "principalId": "AIDA" + self.upper(17),
                    "arn": f"arn:aws:iam::{account}:user/alice",
                    "accountId": account,
                    "accessKeyId": "AKIA" + self.upper(16),
                    "userName": "alice",
                }
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
                self.add(Event(at=at, seq=0, kind="skipped", record=detail, wrap=rng.choice(_OTHER_DETAIL_TYPES)))

    def plan_duplicates(self) -> None:
        """CloudTrail may deliver an event twice: later copies with the same eventID count once."""
        rng = self.rng
        attacks = [e for e in self.events if e.label is not None]
        legit = [e for e in self.events if e.kind in LEGIT_KINDS]
        picks = rng.sample(attacks, min(len(attacks), self.n_duplicates))
        picks += rng.sample(legit, min(len(legit), max(1, self.n_duplicates // 2)))
        for original in picks:
            copy_ = Event(
                at=original.at + rng.uniform(60, 1800),
                seq=0,
                kind="duplicate",
                record=copy.deepcopy(original.record),
                label=original.label,
                session=original.session,
                counted=False,
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
            if shape == "cloudtrail":
                items: list[Any] = [event.record for event in chunk]
                records.extend((event.record, event.kind) for event in chunk)  # type: ignore[misc]
                if self.malformed_lines:
                    items.insert(rng.randrange(len(items) + 1), 42)  # a Records element that is no record
                    malformed += 1
                body = gzip.compress(json.dumps({"Records": items}).encode(), mtime=0)
                inputs.append((f"{f:0{width}d}-cloudtrail.json.gz", body))
                continue
            # (line, the CloudTrail record it carries or None, kind), in arrival order.
            lines: list[tuple[bytes, dict[str, Any] | None, str]] = []
            for event in chunk:
                record = event.record
                assert record is not None
                if shape == "eventbridge":
                    value: Any = {
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
                else:
                    value = record
                carried = None if event.kind == "skipped" else record
                skipped += event.kind == "skipped"
                lines.append((json.dumps(value, separators=(",", ":")).encode(), carried, event.kind))
            for _ in range(bad_per_file.get(f, 0)):
                raw, decoded = self.malformed_raw(bad_made)
                bad_made += 1
                malformed += 1
                lines.insert(rng.randrange(len(lines) + 1), (raw, decoded, "malformed"))
            records.extend((record, kind) for _, record, kind in lines if record is not None)
            inputs.append((f"{f:0{width}d}-{shape}.jsonl", b"".join(line + b"\n" for line, _, _ in lines)))
        return inputs, records, malformed, skipped

    def expected(self) -> list[ExpectedGroup]:
        groups: dict[tuple[str, str, str | None], ExpectedGroup] = {}
        for event in sorted(self.events, key=lambda e: (e.at, e.seq)):
            if event.label is None or not event.counted:
                continue
            finding_type, remote, severity = event.label
            sess = event.session
            assert sess is not None and event.record is not None
            key = (finding_type, sess.arn, remote if finding_type == INSIDE else None)
            group = groups.get(key)
            if group is None:
                group = groups[key] = ExpectedGroup(
                    finding_type, sess.arn, sess.home.account_id, sess.instance_id, remote, severity
                )
            group.count += 1
            when = event.record["eventTime"]
            group.first_seen = min(group.first_seen or when, when)
            group.last_seen = max(group.last_seen or when, when)
            group.kinds[event.kind] += 1
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
) -> World:
    """Generate the labelled world of ``seed`` (same seed, same bytes).

    ``n_accounts`` home accounts (the first has network inventory, the second has none, the others
    either), each with ``instances_per_account`` instances; plus a trusted hub, an affiliated
    ``analytics`` account, an unaffiliated ``partner`` and two accounts the registry does not list.
    Every legit and attack kind appears at least ``min_per_kind`` times. ``malformed_lines`` > 0 also
    puts one bad element in each CloudTrail log file. Keep ``hours`` under the 12 h session TTL.
    """
    gen = _Gen(seed, n_accounts, instances_per_account, min_per_kind, n_files, malformed_lines, duplicates, noise, hours)
    gen.build_accounts()
    gen.build_sessions()
    gen.plan_sessions()
    gen.plan_noise()
    gen.plan_duplicates()
    inputs, records, malformed, skipped = gen.serialize()
    groups = gen.expected()
    kinds = Counter(e.kind for e in gen.events)
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
