"""Seeded generator of realistic CloudTrail traffic for the benchmarks (EventBridge JSON Lines).

Every event is what EventBridge delivers for a CloudTrail API call (``detail-type: AWS API Call via
CloudTrail``), about 1.4 KB on average, with the fields real records carry: varied services and event
names with their ``requestParameters``/``responseElements``, SDK ``userAgent`` strings, ``tlsDetails``,
``additionalEventData``, ``resources``, session contexts. The identities are a realistic mix:

- ~40% EC2 instance-role sessions (``assumed-role/<role>/i-...``) over many instances in many accounts,
  calling from their public address (inside AWS's published EC2 ranges), through VPC endpoints, or via
  AWS services acting for them (``invokedBy``);
- EC2's own ``AssumeRole`` issuing instance credentials (``invokedBy: ec2.amazonaws.com``);
- other role sessions (Lambda, SSO users, CI roles), IAM users, AWS services, the odd root login;
- some attacks (stolen instance credentials used from outside AWS or from another AWS address), some
  events whose strings carry JSON escapes (IAM policy documents), a few malformed lines.

``SHAPES`` names the kinds of stream the benchmarks run (``--shape``): ``default`` (the stream above,
events/100 instances, 2% issuance) and the fleets of issue 11 — 5,000 or 500 instances, ~7% credential
issuance, ~5% decoys (records a byte-level or half-done check takes for instance sessions: session names
``i-`` of the wrong length or case or with a suffix, ``aws:ec2-infrastructure`` sessions (SPEC §10), IAM
users, federated users and ``Role``-typed identities named after real instances, IAM role ARNs, AssumeRole
not by EC2 or not for an instance), ~1% lifecycle records (Stop/Start/TerminateInstances with their
``EC2 Instance State-change Notification`` events, ``AssociateAddress``; a stopped instance makes no calls
until started), and 5% of instance calls made with the ``aws:ec2-instance`` identity role (in scope, §10).

Nothing here calls the detector. ``python -m benchmarks.eventgen --events 1000 [--shape fleet-5000] > out.jsonl`` writes
a stream; the benchmark scripts import :func:`write_stream` / :func:`iter_events`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gzip
import ipaddress
import random
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any

import orjson

RANGES_SNAPSHOT = Path(__file__).resolve().parents[1] / "detector" / "data" / "aws-ip-ranges.json.gz"

REGIONS = ("us-east-1", "us-east-1", "us-east-1", "us-west-2", "eu-west-1", "eu-central-1", "ap-southeast-2")
ROLE_NAMES = (
    "web-node-role", "etl-instance-role", "batch-worker", "eks-nodes-NodeInstanceRole",
    "AmazonSSMRoleForInstancesQuickSetup", "jenkins-agent-role", "kafka-broker-role", "bastion-role",
    "ecs-instance-role", "gitlab-runner", "analytics-emr-ec2", "cassandra-node",
)
OTHER_ROLES = (
    ("thumbnailer-role", "thumbnailer"), ("AWSReservedSSO_AdministratorAccess_3f1c0e1b7a6e9d42", "alice@example.com"),
    ("AWSReservedSSO_ReadOnly_0b8f1e2d3c4a5b6c", "bob@example.com"), ("github-actions-deploy", "GitHubActions"),
    ("terraform-ci", "atlantis-8f2c"), ("lambda-orders-processor", "orders-processor"),
    ("OrganizationAccountAccessRole", "botocore-session-1700000000"),
)
USER_AGENTS = (
    "Boto3/1.34.101 md/Botocore#1.34.101 ua/2.0 os/linux#5.10.215-203.850.amzn2.x86_64 md/arch#x86_64 "
    "lang/python#3.11.9 md/pyimpl#CPython cfg/retry-mode#legacy Botocore/1.34.101",
    "aws-cli/2.15.40 Python/3.11.8 Linux/6.1.84-99.169.amzn2023.x86_64 exe/x86_64.amzn.2023 prompt/off "
    "command/s3.cp",
    "aws-sdk-java/1.12.700 Linux/5.10.214-202.855.amzn2.x86_64 OpenJDK_64-Bit_Server_VM/17.0.10+7-LTS "
    "java/17.0.10 vendor/Amazon.com_Inc. cfg/retry-mode/standard",
    "aws-sdk-go-v2/1.26.1 os/linux lang/go#1.22.2 md/GOOS#linux md/GOARCH#amd64 api/s3#1.53.1",
    "amazon-ssm-agent/3.3.380.0",
    "aws-sdk-js/3.556.0 ua/2.0 os/linux#5.10.214-202.855.amzn2.x86_64 lang/js md/nodejs#20.12.2 "
    "api/dynamodb#3.556.0",
    "[aws-sdk-java/2.25.40 Linux/5.15.0-1058-aws OpenJDK_64-Bit_Server_VM/21.0.3+9-LTS Java/21.0.3 "
    "vendor/Eclipse_Adoptium io/sync http/Apache cfg/retry-mode/adaptive]",
    "Amazon CloudWatch Agent/1.300037.1 (go1.22.2; linux; amd64) 1.300037.1",
)
CONSOLE_AGENT = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36"
)
CIPHERS = ("TLS_AES_128_GCM_SHA256", "ECDHE-RSA-AES128-GCM-SHA256", "TLS_AES_256_GCM_SHA384")
SERVICE_HOSTS = ("ssm.amazonaws.com", "autoscaling.amazonaws.com", "cloudformation.amazonaws.com", "AWS Internal")


def _hex(rng: random.Random, n: int) -> str:
    return f"{rng.getrandbits(4 * n):0{n}x}"


@functools.cache
def _byte_table(alphabet: str) -> bytes:
    """A 256-byte translation table mapping every byte value onto ``alphabet`` (nearly uniform)."""
    return bytes(ord(alphabet[b % len(alphabet)]) for b in range(256))


def _upper(rng: random.Random, n: int, alphabet: str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") -> str:
    # random bytes translated onto the alphabet: ~20x cheaper than a choice() per character, which made
    # the generator, not the detector, the slowest part of the million-session benchmarks
    return rng.randbytes(n).translate(_byte_table(alphabet)).decode()


def _uuid(rng: random.Random) -> str:
    h = _hex(rng, 32)
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def ec2_networks(region: str = "us-east-1") -> list[ipaddress.IPv4Network]:
    """EC2 IPv4 prefixes of ``region`` in the packaged AWS ranges (instance public addresses)."""
    doc = orjson.loads(gzip.decompress(RANGES_SNAPSHOT.read_bytes()))
    nets = [
        ipaddress.IPv4Network(p["ip_prefix"])
        for p in doc["prefixes"]
        if p["service"] == "EC2" and p["region"] == region and int(p["ip_prefix"].split("/")[1]) <= 20
    ]
    return sorted(nets, key=lambda n: int(n.network_address))


def _address_in(rng: random.Random, nets: list[ipaddress.IPv4Network]) -> str:
    net = rng.choice(nets)
    return str(net.network_address + rng.randrange(1, net.num_addresses - 1))


@functools.cache
def _aws_ranges() -> Any:
    from detector.ipranges import load

    return load(str(RANGES_SNAPSHOT))[0]


def _outside_address(rng: random.Random) -> str:
    """A residential / VPS address: drawn again while it falls in AWS's published ranges (a few of these
    /8s hold AWS prefixes), so every "outside" attack is one the detector must report."""
    while True:
        address = f"{rng.choice((185, 45, 91, 103, 176, 195))}.{rng.randrange(1, 255)}.{rng.randrange(0, 255)}.{rng.randrange(1, 255)}"
        if _aws_ranges().lookup(4, int(ipaddress.IPv4Address(address))) is None:
            return address


@dataclass(slots=True)
class Instance:
    instance_id: str
    account: str
    role: str
    role_id: str
    region: str
    address: str  # its public IPv4 (EC2 range): the address its own calls come from
    private: str  # its private IPv4: the source of its calls through a VPC endpoint
    vpce: str | None  # a VPC endpoint of its VPC (S3/DynamoDB gateway, interface endpoints)
    access_key: str
    delivery: str
    identity_key: str = ""  # the access key of its aws:ec2-instance identity-role credentials
    stopped: bool = False


class World:
    """Accounts, instances and the other identities of one seeded stream."""

    def __init__(self, seed: int = 7, instances: int = 2000, accounts: int = 24) -> None:
        self.rng = rng = random.Random(seed)
        self.ec2 = ec2_networks()
        self.accounts = [f"{rng.randrange(10**11, 10**12):012d}" for _ in range(accounts)]
        self.vpces = {a: [f"vpce-0{_hex(rng, 16)}" for _ in range(3)] for a in self.accounts}
        self.instances = [self._instance(i) for i in range(instances)]
        self.time = datetime(2026, 5, 4, 8, 0, 0, tzinfo=timezone.utc)
        self.users = [f"user-{_hex(rng, 4)}" for _ in range(40)]
        self.stopped: list[Instance] = []  # stopped instances, which make no calls until started again

    def _instance(self, i: int) -> Instance:
        rng = self.rng
        account = self.accounts[i % len(self.accounts)]
        long_id = rng.random() < 0.95
        return Instance(
            instance_id="i-" + (_hex(rng, 17) if long_id else _hex(rng, 8)),
            account=account,
            role=ROLE_NAMES[rng.randrange(len(ROLE_NAMES))],
            role_id="AROA" + _upper(rng, 17, "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"),
            region=rng.choice(REGIONS),
            address=_address_in(rng, self.ec2),
            private=f"10.{rng.randrange(0, 64)}.{rng.randrange(0, 255)}.{rng.randrange(1, 255)}",
            vpce=rng.choice(self.vpces[account]) if rng.random() < 0.6 else None,
            access_key="ASIA" + _upper(rng, 16),
            delivery="2.0" if rng.random() < 0.8 else "1.0",
            identity_key="ASIA" + _upper(rng, 16),
        )

    def tick(self) -> str:
        self.time += timedelta(milliseconds=self.rng.randrange(0, 40))
        return self.time.strftime("%Y-%m-%dT%H:%M:%SZ")


# --- API calls: service, event name, request parameters, response elements ---------------------------


def _call(rng: random.Random, account: str, region: str) -> tuple[str, str, dict[str, Any] | None, Any, list[dict[str, Any]], bool, str]:
    """(eventSource, eventName, requestParameters, responseElements, resources, readOnly, category)."""
    bucket = f"data-{account[-4:]}-{rng.choice(('raw', 'curated', 'logs', 'artifacts'))}"
    k = rng.randrange(3, 17)
    if k > 14:
        k = 13
    if k < 4:
        key = f"{rng.choice(('ingest', 'exports', 'tmp', 'models'))}/{_hex(rng, 8)}/part-{rng.randrange(10000):05d}.parquet"
        name = rng.choice(("GetObject", "PutObject", "HeadObject"))
        return (
            "s3.amazonaws.com", name,
            {"bucketName": bucket, "Host": f"{bucket}.s3.{region}.amazonaws.com", "key": key},
            None,
            [{"type": "AWS::S3::Object", "ARN": f"arn:aws:s3:::{bucket}/{key}"},
             {"accountId": account, "type": "AWS::S3::Bucket", "ARN": f"arn:aws:s3:::{bucket}"}],
            name != "PutObject", "Data",
        )
    if k == 4:
        return ("s3.amazonaws.com", "ListObjects",
                {"list-type": "2", "bucketName": bucket, "encoding-type": "url", "prefix": f"exports/{_hex(rng, 6)}/",
                 "Host": f"{bucket}.s3.{region}.amazonaws.com", "max-keys": "1000"},
                None, [{"accountId": account, "type": "AWS::S3::Bucket", "ARN": f"arn:aws:s3:::{bucket}"}], True, "Data")
    if k == 5:
        return ("ec2.amazonaws.com", rng.choice(("DescribeInstances", "DescribeTags", "DescribeVolumes")),
                {"instancesSet": {}, "filterSet": {"items": [{"name": "tag:aws:autoscaling:groupName",
                                                              "valueSet": {"items": [{"value": f"asg-{_hex(rng, 6)}"}]}}]}},
                None, [], True, "Management")
    if k == 6:
        return ("sts.amazonaws.com", "GetCallerIdentity", None, None, [], True, "Management")
    if k == 7:
        return ("kms.amazonaws.com", "Decrypt",
                {"encryptionAlgorithm": "SYMMETRIC_DEFAULT", "encryptionContext": {"aws:s3:arn": f"arn:aws:s3:::{bucket}"}},
                None, [{"accountId": account, "type": "AWS::KMS::Key",
                        "ARN": f"arn:aws:kms:{region}:{account}:key/{_uuid(rng)}"}], True, "Management")
    if k == 8:
        name = f"/prod/{rng.choice(('db', 'api', 'cache'))}/{rng.choice(('password', 'endpoint', 'token'))}"
        return ("ssm.amazonaws.com", "GetParameter", {"name": name, "withDecryption": True}, None,
                [{"accountId": account, "type": "AWS::SSM::Parameter",
                  "ARN": f"arn:aws:ssm:{region}:{account}:parameter{name}"}], True, "Management")
    if k == 9:
        table = rng.choice(("orders", "sessions", "inventory"))
        return ("dynamodb.amazonaws.com", rng.choice(("GetItem", "PutItem", "Query")),
                {"tableName": table, "key": {"pk": f"ORDER#{_hex(rng, 10)}"}, "consistentRead": False},
                None, [{"accountId": account, "type": "AWS::DynamoDB::Table",
                        "ARN": f"arn:aws:dynamodb:{region}:{account}:table/{table}"}], True, "Data")
    if k == 10:
        queue = f"https://sqs.{region}.amazonaws.com/{account}/{rng.choice(('jobs', 'events', 'dlq'))}"
        return ("sqs.amazonaws.com", rng.choice(("ReceiveMessage", "DeleteMessage", "SendMessage")),
                {"queueUrl": queue, "maxNumberOfMessages": 10, "waitTimeSeconds": 20}, None, [], False, "Data")
    if k == 11:
        return ("logs.amazonaws.com", "CreateLogStream",
                {"logGroupName": f"/aws/ec2/{rng.choice(('app', 'nginx', 'syslog'))}", "logStreamName": _hex(rng, 16)},
                None, [], False, "Management")
    if k == 12:
        return ("secretsmanager.amazonaws.com", "GetSecretValue",
                {"secretId": f"arn:aws:secretsmanager:{region}:{account}:secret:prod/db-{_upper(rng, 6)}"},
                None, [], True, "Management")
    return ("ecr.amazonaws.com", "GetAuthorizationToken", None, None, [], True, "Management")


def _policy_call(rng: random.Random, account: str) -> tuple[str, str, dict[str, Any], Any, list[dict[str, Any]], bool, str]:
    """An IAM call whose policy document is a JSON string: escaped quotes in the raw bytes."""
    doc = orjson.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"],
                       "Resource": [f"arn:aws:s3:::data-{account[-4:]}-raw/*"]}],
    }).decode()
    name = f"inline-{_hex(rng, 6)}"
    return ("iam.amazonaws.com", "PutRolePolicy",
            {"roleName": "terraform-ci", "policyName": name, "policyDocument": doc}, None, [], False, "Management")


def _tls(rng: random.Random, source: str, region: str) -> dict[str, str]:
    service = source.split(".")[0]
    return {"tlsVersion": "TLSv1.3" if rng.random() < 0.7 else "TLSv1.2", "cipherSuite": rng.choice(CIPHERS),
            "clientProvidedHostHeader": f"{service}.{region}.amazonaws.com"}


def _envelope(rng: random.Random, detail: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": "0",
        "id": _uuid(rng),
        "detail-type": "AWS API Call via CloudTrail",
        "source": "aws." + detail["eventSource"].split(".")[0],
        "account": detail["recipientAccountId"],
        "time": detail["eventTime"],
        "region": detail["awsRegion"],
        "resources": [],
        "detail": detail,
    }


def _record(rng: random.Random, world: World, identity: dict[str, Any], account: str, region: str, source_ip: str,
            agent: str, call: tuple[str, str, Any, Any, list[dict[str, Any]], bool, str],
            vpce: tuple[str, str] | None = None) -> dict[str, Any]:
    source, name, params, response, resources, read_only, category = call
    record: dict[str, Any] = {
        "eventVersion": "1.09" if category == "Data" else "1.10",
        "userIdentity": identity,
        "eventTime": world.tick(),
        "eventSource": source,
        "eventName": name,
        "awsRegion": region,
        "sourceIPAddress": source_ip,
        "userAgent": agent,
        "requestParameters": params,
        "responseElements": response,
        "requestID": _upper(rng, 16, "ABCDEF0123456789") if source == "s3.amazonaws.com" else _uuid(rng),
        "eventID": _uuid(rng),
        "readOnly": read_only,
        "resources": resources,
        "eventType": "AwsApiCall",
        "managementEvent": category == "Management",
        "recipientAccountId": account,
        "eventCategory": category,
    }
    if source == "s3.amazonaws.com":
        record["additionalEventData"] = {
            "SignatureVersion": "SigV4", "CipherSuite": rng.choice(CIPHERS), "bytesTransferredIn": 0,
            "AuthenticationMethod": "AuthHeader", "x-amz-id-2": _upper(rng, 31, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnop0123456789+/") + "=",
            "bytesTransferredOut": rng.randrange(200, 5_000_000),
        }
    if vpce is not None:
        record["vpcEndpointId"], record["vpcEndpointAccountId"] = vpce
    if not source_ip.endswith(".amazonaws.com") and source_ip != "AWS Internal":
        record["tlsDetails"] = _tls(rng, source, region)
    return record


IDENTITY_ROLE = "aws:ec2-instance"  # SPEC §10: the instance identity role, an instance session like any other


def _instance_identity(inst: Instance, partition: str = "aws", identity_role: bool = False) -> dict[str, Any]:
    role, role_id = (IDENTITY_ROLE, "AROAEC2INSTANCEIDENTITY") if identity_role else (inst.role, inst.role_id)
    return {
        "type": "AssumedRole",
        "principalId": f"{role_id}:{inst.instance_id}",
        "arn": f"arn:{partition}:sts::{inst.account}:assumed-role/{role}/{inst.instance_id}",
        "accountId": inst.account,
        "accessKeyId": inst.identity_key if identity_role else inst.access_key,
        "sessionContext": {
            "sessionIssuer": {"type": "Role", "principalId": role_id,
                              "arn": f"arn:{partition}:iam::{inst.account}:role/{role}",
                              "accountId": inst.account, "userName": role},
            "attributes": {"creationDate": "2026-05-04T06:12:40Z", "mfaAuthenticated": "false"},
            "ec2RoleDelivery": inst.delivery,
        },
    }


def instance_event(world: World, inst: Instance, attack: str | None = None, identity_role: bool = False) -> dict[str, Any]:
    """One API call made with ``inst``'s role credentials (``attack``: ``outside`` or ``inside``), or with
    its ``aws:ec2-instance`` identity-role credentials when ``identity_role``."""
    rng = world.rng
    call = _call(rng, inst.account, inst.region)
    vpce = None
    agent = rng.choice(USER_AGENTS)
    if attack == "outside":
        source_ip = _outside_address(rng)
        agent = "aws-cli/2.15.40 Python/3.11.8 Darwin/23.4.0 exe/x86_64 prompt/off command/s3.ls"
    elif attack == "inside":
        source_ip = _address_in(rng, world.ec2)  # another EC2 address: not the instance's own
    else:
        r = rng.random()
        if r < 0.15:
            source_ip = rng.choice(SERVICE_HOSTS)
        elif r < 0.45 and inst.vpce is not None:
            source_ip = inst.private
            vpce = (inst.vpce, inst.account)
        else:
            source_ip = inst.address
    identity = _instance_identity(inst, identity_role=identity_role)
    if source_ip.endswith(".amazonaws.com") and rng.random() < 0.5:
        identity["invokedBy"] = source_ip
    return _record(rng, world, identity, inst.account, inst.region, source_ip, agent, call, vpce)


def issuance_event(world: World, inst: Instance) -> dict[str, Any]:
    """EC2 issuing (rotating) ``inst``'s role credentials: AssumeRole invoked by ec2.amazonaws.com."""
    rng = world.rng
    inst.access_key = "ASIA" + _upper(rng, 16)
    role_arn = f"arn:aws:iam::{inst.account}:role/{inst.role}"
    call = ("sts.amazonaws.com", "AssumeRole", {"roleArn": role_arn, "roleSessionName": inst.instance_id},
            {"credentials": {"accessKeyId": inst.access_key, "sessionToken": "IQoJb3JpZ2luX2VjE" + _hex(rng, 40),
                             "expiration": "May 4, 2026, 6:30:22 PM"}},
            [{"accountId": inst.account, "type": "AWS::IAM::Role", "ARN": role_arn}], True, "Management")
    identity = {"type": "AWSService", "invokedBy": "ec2.amazonaws.com"}
    return _record(rng, world, identity, inst.account, inst.region, "ec2.amazonaws.com", "ec2.amazonaws.com", call)


def _role_session(rng: random.Random, account: str, role: str, session: str, role_id: str | None = None,
                  identity_type: str = "AssumedRole") -> dict[str, Any]:
    """The ``userIdentity`` of a role session ``role``/``session`` (not an instance's)."""
    role_id = role_id or "AROA" + _upper(rng, 17, "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    return {
        "type": identity_type, "principalId": f"{role_id}:{session}",
        "arn": f"arn:aws:sts::{account}:assumed-role/{role}/{session}", "accountId": account,
        "accessKeyId": "ASIA" + _upper(rng, 16),
        "sessionContext": {"sessionIssuer": {"type": "Role", "principalId": role_id,
                                             "arn": f"arn:aws:iam::{account}:role/{role}",
                                             "accountId": account, "userName": role},
                           "attributes": {"creationDate": "2026-05-04T07:01:12Z", "mfaAuthenticated": "false"}},
    }  # fmt: skip


def other_event(world: World) -> dict[str, Any]:
    """A record of any other identity: role sessions, IAM users, AWS services, root."""
    rng = world.rng
    account = rng.choice(world.accounts)
    region = rng.choice(REGIONS)
    k = rng.random()
    source_ip = _outside_address(rng) if rng.random() < 0.5 else _address_in(rng, world.ec2)
    agent = rng.choice(USER_AGENTS)
    if k < 0.5:
        role, session = rng.choice(OTHER_ROLES)
        identity: dict[str, Any] = _role_session(rng, account, role, session)
        if role.startswith("AWSReserved"):
            agent = CONSOLE_AGENT
    elif k < 0.75:
        user = rng.choice(world.users)
        identity = {"type": "IAMUser", "principalId": "AIDA" + _upper(rng, 17, "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"),
                    "arn": f"arn:aws:iam::{account}:user/{user}", "accountId": account,
                    "accessKeyId": "AKIA" + _upper(rng, 16), "userName": user}
    elif k < 0.99:
        host = rng.choice(("lambda.amazonaws.com", "cloudtrail.amazonaws.com", "config.amazonaws.com",
                           "elasticloadbalancing.amazonaws.com"))
        identity = {"type": "AWSService", "invokedBy": host}
        source_ip = agent = host
    else:
        identity = {"type": "Root", "principalId": account, "arn": f"arn:aws:iam::{account}:root",
                    "accountId": account, "accessKeyId": "ASIA" + _upper(rng, 16)}
        agent = CONSOLE_AGENT
    call = _policy_call(rng, account) if rng.random() < 0.04 else _call(rng, account, region)
    return _record(rng, world, identity, account, region, source_ip, agent, call)


MALFORMED = (b'{"version":"0","detail-type":"AWS API Call via CloudTrail","detail":{"eventVersion":"1.08"',
             b'{"detail-type":"AWS API Call via CloudTrail","detail":"not a record"}',
             b'["not", "an", "object"]')


@dataclass(frozen=True)
class Shape:
    """The mix of one kind of stream; the benchmarks run several (``SHAPES``) and report the worst."""

    name: str
    description: str
    instances: int | None = None  # distinct EC2 instances; None: events / 100 (~40 calls per session)
    instance_share: float = 0.40  # API calls made with instance credentials
    issuance_share: float = 0.02  # EC2's AssumeRole issuing (rotating) instance credentials
    decoy_share: float = 0.0  # records that look like instance sessions but are not (SPEC §3, §10)
    lifecycle_share: float = 0.0  # events of Stop/Start/TerminateInstances, state changes, AssociateAddress
    identity_role_share: float = 0.0  # of instance calls, made with the aws:ec2-instance identity role (§10)
    attack_rate: float = 0.002  # of instance calls, stolen credentials used from elsewhere
    malformed_rate: float = 0.0005


SHAPES: dict[str, Shape] = {
    shape.name: shape
    for shape in (
        Shape("default", "the original stream: events/100 instances, 2% issuance, no decoys, no lifecycle records"),
        Shape("fleet-5000", "5,000 instances, ~7% credential issuance, ~5% decoy sessions named like instances, "
              "~1% lifecycle records, 5% of instance calls by the aws:ec2-instance role", instances=5000,
              issuance_share=0.07, decoy_share=0.05, lifecycle_share=0.01, identity_role_share=0.05),
        Shape("fleet-500", "as fleet-5000 with 500 instances (~160 calls per instance)", instances=500,
              issuance_share=0.07, decoy_share=0.05, lifecycle_share=0.01, identity_role_share=0.05),
    )
}  # fmt: skip


def shape_of(shape: Shape | str) -> Shape:
    if isinstance(shape, Shape):
        return shape
    try:
        return SHAPES[shape]
    except KeyError:
        raise SystemExit(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}") from None


def _decoy_identity(world: World, account: str) -> dict[str, Any]:
    """An identity that a cheap test would take for an instance session and SPEC §3/§10 does not."""
    rng = world.rng
    inst = world.instances[rng.randrange(len(world.instances))] if world.instances else world._instance(0)
    real = inst.instance_id  # a real instance's ID, used where no instance credential is
    role = rng.choice(("ops-automation", "ssm-session-runner", "patch-orchestrator", "inventory-collector"))
    role_id = "AROA" + _upper(rng, 17, "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    k = rng.randrange(9)
    arn_type = "AssumedRole"
    if k == 0:
        session = "i-" + _hex(rng, 16)  # wrong length
    elif k == 1:
        session = "i-" + _hex(rng, 17).upper()  # uppercase hex
    elif k == 2:
        session = f"{real}-{rng.randrange(10**9, 10**10)}"  # an automation naming its sessions after instances
    elif k == 3:
        role, role_id, session = "aws:ec2-infrastructure", "AROAEC2INFRASTRUCTURE", real  # AWS's own (§10)
    elif k == 4:
        user = real
        return {"type": "IAMUser", "principalId": "AIDA" + _upper(rng, 17, "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"),
                "arn": f"arn:aws:iam::{account}:user/{user}", "accountId": account,
                "accessKeyId": "AKIA" + _upper(rng, 16), "userName": user}
    elif k == 5:
        return {"type": "FederatedUser", "principalId": f"{account}:{real}",
                "arn": f"arn:aws:sts::{account}:federated-user/{real}", "accountId": account,
                "accessKeyId": "ASIA" + _upper(rng, 16),
                "sessionContext": {"sessionIssuer": {"type": "IAMUser", "principalId": "AIDA" + _upper(rng, 17),
                                                     "arn": f"arn:aws:iam::{account}:user/fleet-broker",
                                                     "accountId": account, "userName": "fleet-broker"}}}
    elif k == 6:
        session = real
        arn_type = "Role"  # an instance-like ARN under another identity type
    elif k == 7:
        session = f"{role}/{real}"  # one segment too many: not a role session ARN
    else:
        session = "i-" + _hex(rng, 17)
        return {"type": "AssumedRole", "principalId": f"{role_id}:{session}",
                "arn": f"arn:aws:iam::{account}:role/{role}", "accountId": account,  # an IAM role ARN, not sts
                "accessKeyId": "ASIA" + _upper(rng, 16)}
    return _role_session(rng, account, role, session, role_id, arn_type)


def decoy_event(world: World) -> dict[str, Any]:
    """A record named like an instance session (or an issuance) that is neither (SPEC §3, §10)."""
    rng = world.rng
    account = rng.choice(world.accounts)
    region = rng.choice(REGIONS)
    if rng.random() < 0.15:  # AssumeRole that is not EC2 issuing instance credentials
        session = "i-" + _hex(rng, 17)
        role = rng.choice(ROLE_NAMES)
        role_arn = f"arn:aws:iam::{account}:role/{role}"
        host = "lambda.amazonaws.com"
        if rng.random() < 0.5:  # EC2 itself, for a session that is not an instance's
            host, session = "ec2.amazonaws.com", f"ec2-fleet-{_hex(rng, 8)}"
        call = ("sts.amazonaws.com", "AssumeRole", {"roleArn": role_arn, "roleSessionName": session},
                {"credentials": {"accessKeyId": "ASIA" + _upper(rng, 16), "sessionToken": "IQoJb3JpZ2luX2VjE" + _hex(rng, 40),
                                 "expiration": "May 4, 2026, 6:30:22 PM"}},
                [{"accountId": account, "type": "AWS::IAM::Role", "ARN": role_arn}], True, "Management")
        return _record(rng, world, {"type": "AWSService", "invokedBy": host}, account, region, host, host, call)
    identity = _decoy_identity(world, account)
    source_ip = _address_in(rng, world.ec2) if rng.random() < 0.7 else _outside_address(rng)
    return _record(rng, world, identity, account, region, source_ip, rng.choice(USER_AGENTS), _call(rng, account, region))


def _instances_set(ids: list[str], state: str | None = None) -> dict[str, Any]:
    codes = {"pending": 0, "running": 16, "shutting-down": 32, "terminated": 48, "stopping": 64, "stopped": 80}
    items: list[dict[str, Any]] = []
    for i in ids:
        item: dict[str, Any] = {"instanceId": i}
        if state is not None:
            item["currentState"] = {"code": codes[state], "name": state}
        items.append(item)
    return {"items": items}


def _operator(world: World, account: str) -> dict[str, Any]:
    """Who stops, starts and re-addresses instances: an SSO admin, a CI role or Auto Scaling."""
    rng = world.rng
    if rng.random() < 0.3:
        return {"type": "AWSService", "invokedBy": "autoscaling.amazonaws.com"}
    role, session = rng.choice(OTHER_ROLES[1:5])
    return _role_session(rng, account, role, session)


def state_change_event(world: World, inst: Instance, state: str) -> dict[str, Any]:
    """EventBridge's ``EC2 Instance State-change Notification`` (SPEC §10, §11)."""
    return {
        "version": "0", "id": _uuid(world.rng), "detail-type": "EC2 Instance State-change Notification",
        "source": "aws.ec2", "account": inst.account, "time": world.tick(), "region": inst.region,
        "resources": [f"arn:aws:ec2:{inst.region}:{inst.account}:instance/{inst.instance_id}"],
        "detail": {"instance-id": inst.instance_id, "state": state},
    }  # fmt: skip


def lifecycle_events(world: World, inst: Instance | None = None) -> list[dict[str, Any]]:
    """One lifecycle operation as the events it produces, in order (SPEC §11, §13): a stop (the API call,
    then ``stopping`` and ``stopped`` notifications), a start of a stopped instance (call, ``pending``,
    ``running``, and EC2 issuing fresh credentials), a terminate (replaced by a new instance), or an
    Elastic IP moved onto the instance (``AssociateAddress``). Returns envelopes (state changes) and
    CloudTrail records (to be wrapped)."""
    rng = world.rng
    insts = world.instances
    r = rng.random()
    if inst is None:
        if r < 0.4 and world.stopped:
            inst = world.stopped.pop(rng.randrange(len(world.stopped)))
            r = -1.0  # start it
        else:
            inst = insts[rng.randrange(len(insts))]
            if inst.stopped:
                return []
            r = 0.0 if r < 0.75 else (0.5 if r < 0.9 else 0.9)
    account, region = inst.account, inst.region
    operator = _operator(world, account)
    source = "autoscaling.amazonaws.com" if operator["type"] == "AWSService" else _address_in(rng, world.ec2)

    def call(name: str, params: dict[str, Any], response: Any) -> dict[str, Any]:
        resources = [{"accountId": account, "type": "AWS::EC2::Instance",
                      "ARN": f"arn:aws:ec2:{region}:{account}:instance/{inst.instance_id}"}]
        return _record(rng, world, operator, account, region, source, rng.choice(USER_AGENTS),
                       ("ec2.amazonaws.com", name, params, response, resources, False, "Management"))

    ids = [inst.instance_id]
    if r < 0:  # start: a new automatic public address, fresh credentials
        inst.stopped = False
        inst.address = _address_in(rng, world.ec2)
        return [call("StartInstances", {"instancesSet": _instances_set(ids)}, {"instancesSet": _instances_set(ids, "pending")}),
                state_change_event(world, inst, "pending"), state_change_event(world, inst, "running"),
                issuance_event(world, inst)]  # fmt: skip
    if r < 0.5:  # stop
        inst.stopped = True
        world.stopped.append(inst)
        return [call("StopInstances", {"instancesSet": _instances_set(ids), "force": False},
                     {"instancesSet": _instances_set(ids, "stopping")}),
                state_change_event(world, inst, "stopping"), state_change_event(world, inst, "stopped")]  # fmt: skip
    if r < 0.9:  # an Elastic IP moved onto it
        inst.address = _address_in(rng, world.ec2)
        return [call("AssociateAddress", {"instanceId": inst.instance_id, "allowReassociation": True,
                                          "allocationId": f"eipalloc-0{_hex(rng, 16)}"},
                     {"requestId": _uuid(rng), "_return": True, "associationId": f"eipassoc-0{_hex(rng, 16)}"})]  # fmt: skip
    # terminate: gone for good, replaced by a new instance (as an Auto Scaling group does)
    inst.stopped = True
    events = [call("TerminateInstances", {"instancesSet": _instances_set(ids)},
                   {"instancesSet": _instances_set(ids, "shutting-down")}),
              state_change_event(world, inst, "shutting-down"), state_change_event(world, inst, "terminated")]  # fmt: skip
    fresh = world._instance(len(insts) + rng.randrange(10**6))
    insts[insts.index(inst)] = fresh
    return events


def _as_event(rng: random.Random, detail: dict[str, Any]) -> dict[str, Any]:
    """An EventBridge envelope around a CloudTrail record; a state-change notification is one already."""
    return detail if "detail-type" in detail else _envelope(rng, detail)


def iter_events(n: int, seed: int = 7, instances: int | None = None, shape: Shape | str = "default",
                **overrides: Any) -> Iterator[bytes]:
    """``n`` EventBridge events of ``shape`` as JSON lines (bytes, no newline), deterministic for a seed.

    ``instances`` and ``overrides`` (any :class:`Shape` field, e.g. ``attack_rate=0.0``) replace the shape's."""
    sh = dataclasses.replace(shape_of(shape), **overrides)
    count = instances if instances is not None else sh.instances
    world = World(seed, count if count is not None else max(50, n // 100))
    rng = world.rng
    dumps = orjson.dumps
    insts = world.instances
    queued: list[dict[str, Any]] = []
    issuance_end = sh.instance_share + sh.issuance_share
    decoy_end = issuance_end + sh.decoy_share
    lifecycle_end = decoy_end + sh.lifecycle_share / 3  # an operation is ~3 events
    produced = 0
    while produced < n:
        if queued:
            yield dumps(_as_event(rng, queued.pop(0)))
            produced += 1
            continue
        if rng.random() < sh.malformed_rate:
            yield rng.choice(MALFORMED)
            produced += 1
            continue
        r = rng.random()
        if r < sh.instance_share:
            inst = insts[rng.randrange(len(insts))]
            while inst.stopped:
                inst = insts[rng.randrange(len(insts))]
            attack = None
            if rng.random() < sh.attack_rate:
                attack = "outside" if rng.random() < 0.6 else "inside"
            detail = instance_event(world, inst, attack, identity_role=rng.random() < sh.identity_role_share)
        elif r < issuance_end:
            inst = insts[rng.randrange(len(insts))]
            if inst.stopped:
                continue
            detail = issuance_event(world, inst)
        elif r < decoy_end:
            detail = decoy_event(world)
        elif r < lifecycle_end:
            queued = lifecycle_events(world)
            continue
        else:
            detail = other_event(world)
        yield dumps(_envelope(rng, detail))
        produced += 1


def session_events(sessions: int, seed: int = 11, shape: Shape | str = "default") -> Iterator[bytes]:
    """Events for each of ``sessions`` distinct instance sessions (the memory and restore benchmarks).

    Every session gets its own instance and access key and calls from its own public address (learnt on
    first use); about a third also call through a VPC endpoint of their account. The shape adds its own
    mix in proportion: a share of the sessions are of the ``aws:ec2-instance`` identity role, some get
    their credentials rotated by an issuance record, some instances go through a lifecycle operation
    after their calls, and decoy records (no session) are interleaved.
    """
    sh = shape_of(shape)
    world = World(seed, instances=0)
    rng = world.rng
    dumps = orjson.dumps
    # per session, in proportion to its instance calls in a stream of this shape
    issuance = sh.issuance_share / sh.instance_share
    decoys = sh.decoy_share / sh.instance_share
    lifecycle = sh.lifecycle_share / sh.instance_share / 3  # an operation is ~3 events
    for i in range(sessions):
        inst = world._instance(i)
        identity_role = rng.random() < sh.identity_role_share
        yield dumps(_envelope(rng, instance_event_via(world, inst, via_endpoint=False, identity_role=identity_role)))
        if inst.vpce is not None and rng.random() < 0.5:
            yield dumps(_envelope(rng, instance_event_via(world, inst, via_endpoint=True, identity_role=identity_role)))
        if not identity_role and rng.random() < issuance:
            yield dumps(_envelope(rng, issuance_event(world, inst)))
            yield dumps(_envelope(rng, instance_event_via(world, inst, via_endpoint=False)))
        if rng.random() < lifecycle:
            world.instances = [inst]
            for event in lifecycle_events(world, inst):
                yield dumps(_as_event(rng, event))
            world.instances = []
            world.stopped.clear()
        if decoys and rng.random() < decoys:
            world.instances = [inst]
            yield dumps(_envelope(rng, decoy_event(world)))
            world.instances = []


def instance_event_via(world: World, inst: Instance, via_endpoint: bool, identity_role: bool = False) -> dict[str, Any]:
    rng = world.rng
    call = _call(rng, inst.account, inst.region)
    if via_endpoint:
        source_ip, vpce = inst.private, (inst.vpce, inst.account)
    else:
        source_ip, vpce = inst.address, None
    return _record(rng, world, _instance_identity(inst, identity_role=identity_role), inst.account, inst.region, source_ip,
                   rng.choice(USER_AGENTS), call, vpce)  # type: ignore[arg-type]


def write_stream(path: Path, lines: Iterator[bytes]) -> tuple[int, int]:
    """Write JSON Lines; return (lines, bytes)."""
    count = size = 0
    with open(path, "wb", buffering=1 << 20) as out:
        for line in lines:
            out.write(line)
            out.write(b"\n")
            count += 1
            size += len(line) + 1
    return count, size


_SPEC_SESSION = re.compile(r"arn:[a-z-]+:sts::[0-9]{12}:assumed-role/([^/]+)/i-(?:[0-9a-f]{17}|[0-9a-f]{8})")
_SPEC_INSTANCE_ID = re.compile(r"i-(?:[0-9a-f]{17}|[0-9a-f]{8})")
_NAMED_LIKE_INSTANCE = re.compile(r"[:/]i-[0-9a-fA-F]{8}")


def kind(line: bytes) -> str:
    """What one generated line is under SPEC §2/§3/§10/§11, decided here independently of the detector."""
    try:
        event = orjson.loads(line)
        detail = event["detail"]
        identity = detail.get("userIdentity", {})
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return "malformed"
    if event.get("detail-type") == "EC2 Instance State-change Notification":
        return "lifecycle: state-change notification"
    name = detail.get("eventName")
    if name in ("StopInstances", "StartInstances", "TerminateInstances", "AssociateAddress"):
        return "lifecycle: " + name
    if name == "AssumeRole" and identity.get("invokedBy") == "ec2.amazonaws.com" and _SPEC_INSTANCE_ID.fullmatch(
        str(detail["requestParameters"].get("roleSessionName"))
    ):
        return "credential issuance"
    match = _SPEC_SESSION.fullmatch(str(identity.get("arn")))
    if identity.get("type") == "AssumedRole" and match is not None:
        role = match.group(1)
        if role == IDENTITY_ROLE:
            return "instance session: aws:ec2-instance role"
        if not role.startswith("aws:"):
            return "instance session"
    if _NAMED_LIKE_INSTANCE.search(orjson.dumps(identity).decode()) or (
        name == "AssumeRole" and str(detail["requestParameters"].get("roleSessionName")).startswith(("i-", "ec2-"))
    ):
        return "decoy (named like an instance session or issuance, is neither)"
    return "other identity"


def stats(lines: Iterator[bytes]) -> None:
    """Print the share of every kind of line (``--stats``)."""
    counts: dict[str, int] = {}
    total = size = 0
    for line in lines:
        k = kind(line)
        counts[k] = counts.get(k, 0) + 1
        total += 1
        size += len(line) + 1
    print(f"{total:,} lines, {size / max(total, 1):.0f} bytes per line")
    for k, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"{n / total:8.2%}  {k}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--shape", default="default", choices=sorted(SHAPES))
    parser.add_argument("--sessions", type=int, default=None,
                        help="instead of --events: the session stream of the memory/restore benchmarks")  # fmt: skip
    parser.add_argument("--stats", action="store_true", help="print the mix of the stream instead of the stream")
    args = parser.parse_args(argv)
    out: IO[bytes] = sys.stdout.buffer
    lines = (session_events(args.sessions, args.seed, args.shape) if args.sessions is not None
             else iter_events(args.events, args.seed, shape=args.shape))  # fmt: skip
    if args.stats:
        stats(lines)
        return
    for line in lines:
        out.write(line + b"\n")


if __name__ == "__main__":
    main()
