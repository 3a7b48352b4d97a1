"""A real moto server in a subprocess, and an AWS Organization built in it for registry-sync tests."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import pytest

from detector.embedded import free_port

REGION = "us-east-1"
ROLE_NAME = "OrganizationAccountAccessRole"
ROOT_KEYS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


class MotoServer:
    """``python -m moto.server`` on a free port; one process per world so state and IAM enforcement stay apart."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/data.json", timeout=1):
                    return
            except (urllib.error.URLError, OSError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not start on port {self.port}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def enforce_iam(self) -> None:
        """From now on every request is authenticated and authorised against moto's IAM."""
        request = urllib.request.Request(
            f"{self.url}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
        )
        with urllib.request.urlopen(request, timeout=5) as answer:
            json.load(answer)

    def client(self, service: str, **keys: str) -> Any:
        return boto3.client(service, endpoint_url=self.url, region_name=REGION, **(keys or ROOT_KEYS))

    def assume(self, account_id: str, role_name: str = ROLE_NAME) -> dict[str, str]:
        creds = self.client("sts").assume_role(
            RoleArn=f"arn:aws:iam::{account_id}:role/{role_name}", RoleSessionName="test-setup"
        )["Credentials"]
        return {
            "aws_access_key_id": creds["AccessKeyId"],
            "aws_secret_access_key": creds["SecretAccessKey"],
            "aws_session_token": creds["SessionToken"],
        }


@dataclass
class Member:
    account_id: str
    name: str
    eips: list[str] = field(default_factory=list)
    ipv6: list[str] = field(default_factory=list)
    vpc_endpoints: list[str] = field(default_factory=list)
    endpoint_vpcs: dict[str, str] = field(default_factory=dict)  # endpoint ID -> VPC ID
    public_ips: list[str] = field(default_factory=list)  # instances' automatic public IPv4 (not EIPs)
    instances: dict[str, dict[str, Any]] = field(default_factory=dict)  # what the registry should say (SPEC §12)


@dataclass
class Org:
    management: str
    members: dict[str, Member]  # by name


def build_network(server: MotoServer, keys: dict[str, str], member: Member, *, nat: bool = False) -> None:
    """One VPC with an Amazon-provided IPv6 block, an S3 gateway endpoint and an Elastic IP (plus a NAT gateway)."""
    ec2 = server.client("ec2", **keys)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16", AmazonProvidedIpv6CidrBlock=True)["Vpc"]
    member.ipv6 += [a["Ipv6CidrBlock"] for a in vpc["Ipv6CidrBlockAssociationSet"]]
    _endpoint(ec2, member, vpc["VpcId"])
    member.eips.append(ec2.allocate_address(Domain="vpc")["PublicIp"])
    if nat:
        subnet = ec2.create_subnet(VpcId=vpc["VpcId"], CidrBlock="10.0.1.0/24")["Subnet"]
        nat_eip = ec2.allocate_address(Domain="vpc")
        ec2.create_nat_gateway(SubnetId=subnet["SubnetId"], AllocationId=nat_eip["AllocationId"])
        member.eips.append(nat_eip["PublicIp"])


def _endpoint(ec2: Any, member: Member, vpc_id: str) -> None:
    endpoint = ec2.create_vpc_endpoint(VpcId=vpc_id, ServiceName=f"com.amazonaws.{REGION}.s3", VpcEndpointType="Gateway")
    vpce = endpoint["VpcEndpoint"]["VpcEndpointId"]
    member.vpc_endpoints.append(vpce)
    member.endpoint_vpcs[vpce] = vpc_id


def _eip(ec2: Any, member: Member, **target: str) -> str:
    """An Elastic IP associated with ``target`` (InstanceId=, or NetworkInterfaceId= [and PrivateIpAddress=])."""
    eip = ec2.allocate_address(Domain="vpc")
    ec2.associate_address(AllocationId=eip["AllocationId"], **target)
    member.eips.append(eip["PublicIp"])
    return eip["PublicIp"]


def build_instances(server: MotoServer, keys: dict[str, str], member: Member, *, full: bool) -> None:
    """Instances for the SPEC §12 inventory, recording in ``member`` what the synced registry must say.

    Always: a VPC 10.20.0.0/16 with an S3 endpoint and an instance ``10.20.1.10`` with an automatic
    public IPv4. With ``full``, also: an Amazon IPv6 block and a subnet in it; on that instance an IPv6
    address, a secondary private IPv4, and a second interface (``10.20.1.5`` + ``10.20.1.100``, an
    Elastic IP on the secondary one, another IPv6 address); a NAT instance (source/destination check off
    with ModifyInstanceAttribute, an Elastic IP on the instance); a detached interface holding an Elastic
    IP (an account address, no instance); a terminated instance (gone); and a second VPC 10.30.0.0/16
    with its own endpoint.
    """
    ec2 = server.client("ec2", **keys)
    vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16", AmazonProvidedIpv6CidrBlock=full)["Vpc"]
    vpc_id = vpc["VpcId"]
    _endpoint(ec2, member, vpc_id)
    subnet_args = {"VpcId": vpc_id, "CidrBlock": "10.20.1.0/24"}
    if full:
        block = vpc["Ipv6CidrBlockAssociationSet"][0]["Ipv6CidrBlock"]
        member.ipv6.append(block)
        subnet_args["Ipv6CidrBlock"] = str(next(ipaddress.ip_network(block).subnets(new_prefix=64)))
    subnet = ec2.create_subnet(**subnet_args)["Subnet"]["SubnetId"]

    def launch(**network: Any) -> dict[str, Any]:
        return ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, **network)["Instances"][0]

    web = launch(NetworkInterfaces=[
        {"DeviceIndex": 0, "SubnetId": subnet, "PrivateIpAddress": "10.20.1.10", "AssociatePublicIpAddress": True},
    ])
    member.public_ips.append(web["PublicIpAddress"])
    entry = {"vpc": vpc_id, "private": ["10.20.1.10"], "public": [web["PublicIpAddress"]], "ipv6": [], "egress": False}
    member.instances[web["InstanceId"]] = entry
    if not full:
        return

    primary = web["NetworkInterfaces"][0]["NetworkInterfaceId"]
    ec2.assign_private_ip_addresses(NetworkInterfaceId=primary, PrivateIpAddresses=["10.20.1.11"])
    entry["ipv6"] += ec2.assign_ipv6_addresses(NetworkInterfaceId=primary, Ipv6AddressCount=1)["AssignedIpv6Addresses"]
    second = ec2.create_network_interface(SubnetId=subnet, PrivateIpAddresses=[
        {"PrivateIpAddress": "10.20.1.5", "Primary": True}, {"PrivateIpAddress": "10.20.1.100", "Primary": False},
    ])["NetworkInterface"]["NetworkInterfaceId"]
    ec2.attach_network_interface(NetworkInterfaceId=second, InstanceId=web["InstanceId"], DeviceIndex=1)
    entry["ipv6"] += ec2.assign_ipv6_addresses(NetworkInterfaceId=second, Ipv6AddressCount=1)["AssignedIpv6Addresses"]
    entry["public"].append(_eip(ec2, member, NetworkInterfaceId=second, PrivateIpAddress="10.20.1.100"))
    entry["private"] = ["10.20.1.5", "10.20.1.10", "10.20.1.11", "10.20.1.100"]  # numeric order

    nat = launch(SubnetId=subnet, PrivateIpAddress="10.20.1.30")
    ec2.modify_instance_attribute(InstanceId=nat["InstanceId"], SourceDestCheck={"Value": False})
    member.instances[nat["InstanceId"]] = {
        "vpc": vpc_id, "private": ["10.20.1.30"], "public": [_eip(ec2, member, InstanceId=nat["InstanceId"])],
        "ipv6": [], "egress": True,
    }
    detached = ec2.create_network_interface(SubnetId=subnet, PrivateIpAddress="10.20.1.40")["NetworkInterface"]
    _eip(ec2, member, NetworkInterfaceId=detached["NetworkInterfaceId"])
    gone = launch(SubnetId=subnet, PrivateIpAddress="10.20.1.50")
    ec2.terminate_instances(InstanceIds=[gone["InstanceId"]])

    other = ec2.create_vpc(CidrBlock="10.30.0.0/16")["Vpc"]["VpcId"]
    _endpoint(ec2, member, other)
    for recorded in member.instances.values():
        for key in ("private", "public", "ipv6"):
            recorded[key] = sorted({str(ipaddress.ip_address(a)) for a in recorded[key]}, key=lambda a: int(ipaddress.ip_address(a)))


def build_org(server: MotoServer, names: tuple[str, ...] = ("member-a", "member-b"), *, instances: bool = False) -> Org:
    """An organization of the management account and one member per name, each member with a network
    (and, with ``instances``, the instances of :func:`build_instances`: the full set in the first member).

    Checks on the way that moto scopes resources by the account of the assumed-role credentials.
    """
    org = server.client("organizations")
    management = org.create_organization(FeatureSet="ALL")["Organization"]["MasterAccountId"]
    members: dict[str, Member] = {}
    for name in names:
        status = org.create_account(Email=f"{name}@example.com", AccountName=name)["CreateAccountStatus"]
        members[name] = Member(status["AccountId"], name)
    for member in members.values():
        keys = server.assume(member.account_id)
        assert server.client("sts", **keys).get_caller_identity()["Account"] == member.account_id
        first = member is next(iter(members.values()))
        build_network(server, keys, member, nat=first)
        if instances:
            build_instances(server, keys, member, full=first)
        seen = {a["PublicIp"] for a in server.client("ec2", **keys).describe_addresses()["Addresses"]}
        assert seen == set(member.eips), "moto must scope Elastic IPs to the assumed-role account"
    outside = {a["PublicIp"] for a in server.client("ec2").describe_addresses()["Addresses"]}
    assert not outside & {ip for m in members.values() for ip in m.eips}, "member EIPs leaked into the management account"
    return Org(management, members)


def create_user(server: MotoServer, name: str, policy: dict[str, Any] | None) -> dict[str, str]:
    """An IAM user of the management account with an access key and, if given, one inline policy."""
    iam = server.client("iam")
    iam.create_user(UserName=name)
    if policy is not None:
        iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return {"aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}


def grant_inventory_read(server: MotoServer, account_id: str, role_name: str = ROLE_NAME) -> None:
    """Let the role Organizations created in ``account_id`` (trusting the management account) read EC2."""
    iam = server.client("iam", **server.assume(account_id, role_name))
    assert iam.get_role(RoleName=role_name)["Role"]["AssumeRolePolicyDocument"], "CreateAccount makes the role"
    read = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "ec2:Describe*", "Resource": "*"}]}
    iam.put_role_policy(RoleName=role_name, PolicyName="inventory-read", PolicyDocument=json.dumps(read))


def cli_env(keys: dict[str, str]) -> dict[str, str]:
    """An environment whose only AWS credentials are ``keys`` (no profiles, no instance metadata)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID=keys["aws_access_key_id"],
        AWS_SECRET_ACCESS_KEY=keys["aws_secret_access_key"],
        AWS_DEFAULT_REGION=REGION,
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


@dataclass
class Request:
    """A request the proxy received."""

    method: str
    path: str  # with the query string
    headers: dict[str, str]
    body: bytes

    @property
    def action(self) -> str:
        """The API action: the X-Amz-Target of the JSON protocols (SQS, ...), else ``Action=`` of the query
        protocol (IAM, STS, ...); "" for REST APIs (S3, Security Hub: match ``method`` and ``path``)."""
        from urllib.parse import parse_qs

        headers = {k.lower(): v for k, v in self.headers.items()}
        if "x-amz-target" in headers:
            return headers["x-amz-target"].rsplit(".", 1)[-1]
        if headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            return parse_qs(self.body.decode()).get("Action", [""])[0]
        return ""


@dataclass
class Fault:
    """Answer the next ``times`` requests that ``match`` with ``status``, ``body`` (and ``headers``) instead of
    the server's."""

    match: Callable[[Request], bool]
    status: int
    body: bytes
    times: int
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    served: int = 0


def throttle_json(service_call: str, times: int) -> Fault:
    """Security Hub (REST-JSON) answering HTTP 429 TooManyRequestsException to ``POST <path>``."""
    body = json.dumps({"__type": "TooManyRequestsException", "message": "Rate exceeded"}).encode()
    return Fault(lambda r: r.method == "POST" and r.path.startswith(service_call), 429, body, times)


def query_error(action: str, code: str, status: int, times: int, message: str = "injected by the test proxy") -> Fault:
    """A query-protocol service (IAM, STS) answering ``Action=<action>`` with an ``ErrorResponse``."""
    body = (
        f"<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error>"
        f"<RequestId>00000000-0000-0000-0000-000000000000</RequestId></ErrorResponse>"
    ).encode()
    return Fault(lambda r: r.method == "POST" and r.action == action, status, body, times, "text/xml")


def sqs_error(code: str, match: Callable[[Request], bool], times: int, status: int = 400) -> Fault:
    """SQS (AWS JSON protocol, query-compatible) answering an error ``code``."""
    body = json.dumps({"__type": f"com.amazonaws.sqs#{code}", "message": f"injected {code}"}).encode()
    return Fault(match, status, body, times, "application/x-amz-json-1.0", {"x-amzn-query-error": f"{code};Sender"})


def s3_error(code: str, status: int, match: Callable[[Request], bool], times: int) -> Fault:
    """S3 (REST-XML) answering an error ``code``."""
    body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>injected {code}</Message></Error>".encode()
    return Fault(match, status, body, times, "application/xml")


class FaultProxy:
    """A real HTTP proxy in front of the moto server, in threads of its own (so that it serves clients that
    block the event loop as well as asynchronous ones): forwards every request, except that it answers the
    ones matched by its faults (throttling, IAM LimitExceeded, expired tokens ...) itself, a given number of
    times. ``delay`` (request -> seconds) holds requests back first; ``seen`` lists every request."""

    def __init__(self, target: str) -> None:
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        self.faults: list[Fault] = []
        self.delay: Callable[[Request], float] | None = None
        self.seen: list[Request] = []
        self.lock = threading.Lock()
        upstream = urlsplit(target)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                request = Request(self.command, self.path, dict(self.headers.items()), body)
                fault = proxy._take(request)
                if fault is not None:
                    self._answer(fault.status, {"Content-Type": fault.content_type, **fault.headers}, fault.body)
                    return
                conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    answer = conn.getresponse()
                    data = answer.read()
                    kept = {k: v for k, v in answer.getheaders()
                            if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length")}  # fmt: skip
                    self._answer(answer.status, kept, data)
                finally:
                    conn.close()

            def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _take(self, request: Request) -> Fault | None:
        with self.lock:
            self.seen.append(request)
            delay = self.delay
        if delay is not None:
            time.sleep(delay(request))
        with self.lock:
            for fault in self.faults:
                if fault.served < fault.times and fault.match(request):
                    fault.served += 1
                    return fault
        return None

    def add(self, fault: Fault) -> Fault:
        with self.lock:
            self.faults.append(fault)
        return fault

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    """One moto server for a test module (import the fixture into the module)."""
    server = MotoServer()
    try:
        yield server
    finally:
        server.stop()
