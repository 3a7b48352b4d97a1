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

Nothing here calls the detector. ``python -m benchmarks.eventgen --events 1000 > out.jsonl`` writes a
stream; the benchmark scripts import :func:`write_stream` / :func:`iter_events`.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import ipaddress
import random
import sys
import uuid
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


def _upper(rng: random.Random, n: int, alphabet: str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


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


def _instance_identity(inst: Instance, partition: str = "aws") -> dict[str, Any]:
    return {
        "type": "AssumedRole",
        "principalId": f"{inst.role_id}:{inst.instance_id}",
        "arn": f"arn:{partition}:sts::{inst.account}:assumed-role/{inst.role}/{inst.instance_id}",
        "accountId": inst.account,
        "accessKeyId": inst.access_key,
        "sessionContext": {
            "sessionIssuer": {"type": "Role", "principalId": inst.role_id,
                              "arn": f"arn:{partition}:iam::{inst.account}:role/{inst.role}",
                              "accountId": inst.account, "userName": inst.role},
            "attributes": {"creationDate": "2026-05-04T06:12:40Z", "mfaAuthenticated": "false"},
            "ec2RoleDelivery": inst.delivery,
        },
    }


def instance_event(world: World, inst: Instance, attack: str | None = None) -> dict[str, Any]:
    """One API call made with ``inst``'s role credentials (``attack``: ``outside`` or ``inside``)."""
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
    identity = _instance_identity(inst)
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
        role_id = "AROA" + _upper(rng, 17, "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
        identity: dict[str, Any] = {
            "type": "AssumedRole", "principalId": f"{role_id}:{session}",
            "arn": f"arn:aws:sts::{account}:assumed-role/{role}/{session}", "accountId": account,
            "accessKeyId": "ASIA" + _upper(rng, 16),
            "sessionContext": {"sessionIssuer": {"type": "Role", "principalId": role_id,
                                                 "arn": f"arn:aws:iam::{account}:role/{role}",
                                                 "accountId": account, "userName": role},
                               "attributes": {"creationDate": "2026-05-04T07:01:12Z", "mfaAuthenticated": "false"}},
        }
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


def iter_events(n: int, seed: int = 7, instances: int | None = None, instance_share: float = 0.40,
                attack_rate: float = 0.002, malformed_rate: float = 0.0005) -> Iterator[bytes]:
    """``n`` EventBridge events as JSON lines (bytes, no newline), deterministic for a seed."""
    world = World(seed, instances if instances is not None else max(50, n // 100))
    rng = world.rng
    dumps = orjson.dumps
    insts = world.instances
    for _ in range(n):
        r = rng.random()
        if r < malformed_rate:
            yield rng.choice(MALFORMED)
            continue
        r = rng.random()
        if r < instance_share:
            inst = insts[rng.randrange(len(insts))]
            attack = None
            if rng.random() < attack_rate:
                attack = "outside" if rng.random() < 0.6 else "inside"
            detail = instance_event(world, inst, attack)
        elif r < instance_share + 0.02:
            detail = issuance_event(world, insts[rng.randrange(len(insts))])
        else:
            detail = other_event(world)
        yield dumps(_envelope(rng, detail))


def session_events(sessions: int, seed: int = 11) -> Iterator[bytes]:
    """One or two events for each of ``sessions`` distinct instance sessions (the memory benchmark).

    Every session gets its own instance and access key, calls from its own public address (learnt on
    first use) and, for about a third, also through a VPC endpoint of its account.
    """
    world = World(seed, instances=0)
    rng = world.rng
    dumps = orjson.dumps
    for i in range(sessions):
        inst = world._instance(i)
        yield dumps(_envelope(rng, instance_event_via(world, inst, via_endpoint=False)))
        if inst.vpce is not None and rng.random() < 0.5:
            yield dumps(_envelope(rng, instance_event_via(world, inst, via_endpoint=True)))


def instance_event_via(world: World, inst: Instance, via_endpoint: bool) -> dict[str, Any]:
    rng = world.rng
    call = _call(rng, inst.account, inst.region)
    if via_endpoint:
        source_ip, vpce = inst.private, (inst.vpce, inst.account)
    else:
        source_ip, vpce = inst.address, None
    return _record(rng, world, _instance_identity(inst), inst.account, inst.region, source_ip,
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    out: IO[bytes] = sys.stdout.buffer
    for line in iter_events(args.events, args.seed):
        out.write(line + b"\n")


if __name__ == "__main__":
    main()
