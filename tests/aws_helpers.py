"""A real moto server in a subprocess, and an AWS Organization built in it for registry-sync tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import boto3

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


@dataclass
class Org:
    management: str
    members: dict[str, Member]  # by name


def build_network(server: MotoServer, keys: dict[str, str], member: Member, *, nat: bool = False) -> None:
    """One VPC with an Amazon-provided IPv6 block, an S3 gateway endpoint and an Elastic IP (plus a NAT gateway)."""
    ec2 = server.client("ec2", **keys)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16", AmazonProvidedIpv6CidrBlock=True)["Vpc"]
    member.ipv6 += [a["Ipv6CidrBlock"] for a in vpc["Ipv6CidrBlockAssociationSet"]]
    endpoint = ec2.create_vpc_endpoint(
        VpcId=vpc["VpcId"], ServiceName=f"com.amazonaws.{REGION}.s3", VpcEndpointType="Gateway"
    )["VpcEndpoint"]
    member.vpc_endpoints.append(endpoint["VpcEndpointId"])
    member.eips.append(ec2.allocate_address(Domain="vpc")["PublicIp"])
    if nat:
        subnet = ec2.create_subnet(VpcId=vpc["VpcId"], CidrBlock="10.0.1.0/24")["Subnet"]
        nat_eip = ec2.allocate_address(Domain="vpc")
        ec2.create_nat_gateway(SubnetId=subnet["SubnetId"], AllocationId=nat_eip["AllocationId"])
        member.eips.append(nat_eip["PublicIp"])


def build_org(server: MotoServer, names: tuple[str, ...] = ("member-a", "member-b")) -> Org:
    """An organization of the management account and one member per name, each member with a network.

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
        build_network(server, keys, member, nat=member is next(iter(members.values())))
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
class Fault:
    """Answer the next ``times`` requests that ``match`` with ``status`` and ``body`` instead of moto's."""

    match: Any  # (method, path, body) -> bool
    status: int
    body: bytes
    times: int
    content_type: str = "application/json"
    served: int = 0


def throttle_json(service_call: str, times: int) -> Fault:
    """Security Hub (REST-JSON) answering HTTP 429 TooManyRequestsException to ``POST <path>``."""
    body = json.dumps({"__type": "TooManyRequestsException", "message": "Rate exceeded"}).encode()
    return Fault(lambda m, p, b: m == "POST" and p.startswith(service_call), 429, body, times)


def query_error(action: str, code: str, status: int, times: int, message: str = "injected by the test proxy") -> Fault:
    """A query-protocol service (IAM, STS) answering ``Action=<action>`` with an ``ErrorResponse``."""
    body = (
        f"<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error>"
        f"<RequestId>00000000-0000-0000-0000-000000000000</RequestId></ErrorResponse>"
    ).encode()
    return Fault(lambda m, p, b: m == "POST" and f"Action={action}".encode() in b, status, body, times, "text/xml")


class FaultProxy:
    """A real HTTP proxy in front of the moto server: forwards every request, except that it answers the
    ones matched by its faults (throttling, IAM LimitExceeded ...) itself, a given number of times."""

    def __init__(self, target: str) -> None:
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        self.faults: list[Fault] = []
        self.lock = threading.Lock()
        upstream = urlsplit(target)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = proxy._take(self.command, self.path, body)
                if fault is not None:
                    self._answer(fault.status, {"Content-Type": fault.content_type}, fault.body)
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

    def _take(self, method: str, path: str, body: bytes) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.served < fault.times and fault.match(method, path, body):
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
