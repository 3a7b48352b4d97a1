"""Build the affiliation registry from AWS (SPEC §7, ``detector registry sync``).

Which accounts are ours: every ACTIVE account of the AWS Organization (the management account included)
and every member of the caller's GuardDuty detectors. What each one owns, per region: Elastic IPs, NAT
gateway public addresses and instances' public IPv4 addresses (as /32), associated VPC IPv6 blocks, VPC
endpoints with their VPC, and the instance inventory of SPEC §12 (per instance: VPC, private IPv4,
public IPv4, IPv6 addresses of every attached network interface, and ``egress`` when source/destination
checking is off) — read through ``arn:<partition>:iam::<account>:role/<role-name>`` (the caller's own
account with the ambient credentials). Credentials come from the standard AWS chain of the aiobotocore
session.

Failures are contained: GuardDuty being absent or denied is a warning; an account whose role cannot be
assumed, or whose regions all fail, is reported and keeps no inventory (it stays affiliated — it is still
in the organization). :class:`SyncError` is raised only when the caller cannot be identified, the accounts
cannot be listed, the regions cannot be found, or no account could be read at all.

:func:`sync_registry` is the one call the long-running service needs for an in-process periodic sync.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import BotoCoreError, ClientError

from ..core.registry import ACCOUNT_RE, INSTANCE_RE, VPC_RE, VPCE_RE, Registry
from .merge import address_key, canonical_cidr, merge_registry, normalise_registry

DEFAULT_ROLE_NAME = "OrganizationAccountAccessRole"
DEFAULT_CONCURRENCY = 8
DEFAULT_MAX_ATTEMPTS = 8
SESSION_NAME = "detector-registry-sync"

# What one AWS call may fail with and still leave the rest of the sync worth finishing.
_AWS_ERRORS = (ClientError, BotoCoreError, OSError, TimeoutError)


@dataclass(frozen=True, slots=True)
class SyncOptions:
    """How to sync: the ``detector registry sync`` options, or the service's settings."""

    role_name: str = DEFAULT_ROLE_NAME
    regions: tuple[str, ...] = ()  # empty: every region EC2 DescribeRegions lists for the caller
    endpoint_url: str | None = None  # one endpoint for every service (a test double)
    concurrency: int = DEFAULT_CONCURRENCY  # AWS calls in flight at once
    region_name: str | None = None  # for STS/Organizations/DescribeRegions; default: session's, else us-east-1
    max_attempts: int = DEFAULT_MAX_ATTEMPTS  # botocore "standard" retries, throttling included

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        object.__setattr__(self, "regions", tuple(sorted({r.strip() for r in self.regions if r.strip()})))


class SyncError(RuntimeError):
    """Nothing usable could be read from AWS; no registry should be written."""


@dataclass(slots=True)
class InstanceInventory:
    """One EC2 instance's addresses, gathered from every network interface attached to it (SPEC §12)."""

    vpc: str = ""  # the VPC of its primary interface ("" when unknown)
    private: set[str] = field(default_factory=set)
    public: set[str] = field(default_factory=set)
    ipv6: set[str] = field(default_factory=set)
    egress: bool = False  # source/destination check off: a NAT instance or a router
    primary_device: int | None = None  # DeviceIndex of the interface the VPC was taken from

    def absorb(self, other: InstanceInventory) -> None:
        if other.primary_device is not None and (self.primary_device is None or other.primary_device < self.primary_device):
            self.vpc, self.primary_device = other.vpc, other.primary_device
        elif not self.vpc:
            self.vpc = other.vpc
        self.private |= other.private
        self.public |= other.public
        self.ipv6 |= other.ipv6
        self.egress = self.egress or other.egress

    def to_mapping(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"vpc": self.vpc} if self.vpc else {}
        for key in ("private", "public", "ipv6"):
            entry[key] = sorted(getattr(self, key), key=address_key)
        entry["egress"] = self.egress
        return entry


@dataclass(slots=True, kw_only=True)
class RegionInventory:
    """What one region of one account holds."""

    cidrs: set[str] = field(default_factory=set)
    vpc_endpoints: dict[str, str] = field(default_factory=dict)  # endpoint ID -> VPC ID ("" unknown)
    instances: dict[str, InstanceInventory] = field(default_factory=dict)

    def absorb(self, other: RegionInventory) -> None:
        self.cidrs |= other.cidrs
        for vpce, vpc in other.vpc_endpoints.items():
            self.vpc_endpoints[vpce] = self.vpc_endpoints.get(vpce) or vpc
        for instance_id, instance in other.instances.items():
            self.instances.setdefault(instance_id, InstanceInventory()).absorb(instance)


@dataclass(slots=True)
class AccountInventory(RegionInventory):
    account_id: str
    name: str = ""
    sources: set[str] = field(default_factory=set)  # "organizations", "guardduty", "caller"
    regions_read: list[str] = field(default_factory=list)
    region_errors: dict[str, str] = field(default_factory=dict)
    error: str | None = None  # set when nothing of this account could be read

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(slots=True)
class SyncReport:
    caller_account: str
    partition: str
    regions: list[str]
    accounts: dict[str, AccountInventory]
    warnings: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        return sorted(a for a, inv in self.accounts.items() if not inv.ok)

    def to_mapping(self) -> dict[str, Any]:
        """What AWS says, as a registry mapping: every account affiliated, none trusted."""
        return {
            "accounts": {
                account_id: {
                    "name": inv.name,
                    "affiliated": True,
                    "trusted": False,
                    "cidrs": sorted(inv.cidrs),
                    "vpc_endpoints": {
                        vpce: ({"vpc": vpc} if vpc else {}) for vpce, vpc in sorted(inv.vpc_endpoints.items())
                    },
                    "instances": {iid: instance.to_mapping() for iid, instance in sorted(inv.instances.items())},
                }
                for account_id, inv in sorted(self.accounts.items())
            },
            "expected_networks": [],
        }


def describe_error(exc: BaseException) -> str:
    """A one-line description of an AWS failure (error code and the first line of the message)."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = err.get("Code") or "Error"
        message = (err.get("Message") or str(exc)).strip()
        if message.startswith("<"):  # an HTML/XML body botocore could not parse (a proxy, a test double)
            found = {tag: re.search(rf"<{tag}>(.*?)</{tag}>", message, re.S | re.I) for tag in ("Code", "Message", "title")}
            code = found["Code"].group(1) if found["Code"] else f"HTTP {code}" if code.isdigit() else code
            hit = found["Message"] or found["title"]
            message = hit.group(1) if hit else ""
        lines = message.splitlines()
        text = f"{code}: {lines[0] if lines else ''}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


def _error_code(exc: BaseException) -> str:
    return exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""


class _Aws:
    """Client factory bound to one session, endpoint and retry policy."""

    def __init__(self, session: AioSession, endpoint_url: str | None, concurrency: int, max_attempts: int) -> None:
        self.session = session
        self.endpoint_url = endpoint_url
        self.config = AioConfig(
            retries={"mode": "standard", "max_attempts": max_attempts},
            max_pool_connections=max(10, concurrency),
        )

    def client(self, service: str, region: str, credentials: Mapping[str, str] | None = None) -> Any:
        return self.session.create_client(
            service, region_name=region, endpoint_url=self.endpoint_url, config=self.config, **(credentials or {})
        )


async def _caller(aws: _Aws, region: str) -> tuple[str, str]:
    try:
        async with aws.client("sts", region) as sts:
            ident = await sts.get_caller_identity()
    except _AWS_ERRORS as exc:
        raise SyncError(f"cannot identify the caller (STS GetCallerIdentity): {describe_error(exc)}") from None
    return ident["Account"], ident["Arn"].split(":")[1]


async def _organization_accounts(aws: _Aws, region: str, caller: str, warn: Callable[[str], None]) -> dict[str, str]:
    """ACTIVE accounts of the organization, ID -> name; none when the caller is in no organization."""
    try:
        async with aws.client("organizations", region) as org:
            description = await org.describe_organization()
            management = description["Organization"].get("MasterAccountId")
            accounts: dict[str, str] = {}
            async for page in org.get_paginator("list_accounts").paginate():
                for acct in page.get("Accounts", []):
                    if (acct.get("State") or acct.get("Status")) == "ACTIVE":
                        accounts[acct["Id"]] = acct.get("Name", "")
    except _AWS_ERRORS as exc:
        if _error_code(exc) == "AWSOrganizationsNotInUseException":
            warn(f"account {caller} is in no AWS Organization; syncing it alone")
            return {}
        raise SyncError(f"cannot list the organization's accounts: {describe_error(exc)}") from None
    if management:
        accounts.setdefault(management, "")
    return accounts


async def _regions(aws: _Aws, region: str) -> list[str]:
    try:
        async with aws.client("ec2", region) as ec2:
            answer = await ec2.describe_regions()
    except _AWS_ERRORS as exc:
        raise SyncError(f"cannot list regions (EC2 DescribeRegions); pass --regions: {describe_error(exc)}") from None
    return sorted(r["RegionName"] for r in answer.get("Regions", []))


async def _guardduty_members(aws: _Aws, region: str) -> set[str]:
    members: set[str] = set()
    async with aws.client("guardduty", region) as gd:
        async for page in gd.get_paginator("list_detectors").paginate():
            for detector_id in page.get("DetectorIds", []):
                async for mpage in gd.get_paginator("list_members").paginate(DetectorId=detector_id):
                    members.update(m["AccountId"] for m in mpage.get("Members", []))
    return members


async def _all_guardduty_members(
    aws: _Aws, regions: Sequence[str], sem: asyncio.Semaphore, warn: Callable[[str], None]
) -> set[str]:
    async def one(region: str) -> set[str] | str:
        async with sem:
            try:
                return await _guardduty_members(aws, region)
            except _AWS_ERRORS as exc:
                return describe_error(exc)

    results = await asyncio.gather(*(one(r) for r in regions))
    members: set[str] = set()
    failures: dict[str, list[str]] = {}
    for region, result in zip(regions, results, strict=True):
        if isinstance(result, str):
            failures.setdefault(result, []).append(region)
        else:
            members |= result
    for problem, where in failures.items():
        warn(f"GuardDuty member accounts not read in {', '.join(where)}: {problem}")
    if not members and not failures:
        warn("no GuardDuty member accounts found (no administrator detector in the synced regions)")
    return members


def _addresses(values: Iterable[Any], version: int) -> set[str]:
    """The IP addresses of ``version`` among ``values``, in canonical spelling (anything else dropped)."""
    found = set()
    for value in values:
        try:
            address = ipaddress.ip_address(str(value).strip())
        except ValueError:
            continue
        if address.version == version:
            found.add(str(address))
    return found


def _interface_instance(eni: Mapping[str, Any], account_id: str) -> tuple[str, InstanceInventory] | None:
    """The instance ``eni`` is attached to and the addresses it gives that instance; None when detached.

    An interface attached to an instance of another account (a shared VPC's participant, seen by the VPC
    owner) is left to that account's own sync.
    """
    attachment = eni.get("Attachment") or {}
    instance_id = attachment.get("InstanceId") or ""
    owner = attachment.get("InstanceOwnerId") or ""
    if not INSTANCE_RE.match(instance_id) or (ACCOUNT_RE.match(owner) and owner != account_id):
        return None
    device = attachment.get("DeviceIndex")
    vpc = eni.get("VpcId") or ""
    instance = InstanceInventory(
        vpc=vpc if VPC_RE.match(vpc) else "",
        primary_device=device if isinstance(device, int) else None,
        egress=eni.get("SourceDestCheck") is False,
    )
    privates = [eni, *eni.get("PrivateIpAddresses", [])]  # the primary address is in both
    associations = [eni.get("Association") or {}, *(p.get("Association") or {} for p in privates)]
    instance.private = _addresses((p.get("PrivateIpAddress") for p in privates), 4)
    instance.public = _addresses((a.get("PublicIp") for a in associations), 4)
    instance.ipv6 = _addresses((a.get("Ipv6Address") for a in eni.get("Ipv6Addresses", [])), 6)
    return instance_id, instance


async def _region_inventory(ec2: Any, account_id: str) -> RegionInventory:
    found = RegionInventory()
    addresses = await ec2.describe_addresses()
    found.cidrs.update(f"{a['PublicIp']}/32" for a in addresses.get("Addresses", []) if a.get("PublicIp"))
    async for page in ec2.get_paginator("describe_nat_gateways").paginate():
        for nat in page.get("NatGateways", []):
            if str(nat.get("State", "")).lower() in ("failed", "deleted"):
                continue
            found.cidrs.update(f"{a['PublicIp']}/32" for a in nat.get("NatGatewayAddresses", []) if a.get("PublicIp"))
    async for page in ec2.get_paginator("describe_vpcs").paginate():
        for vpc in page.get("Vpcs", []):
            for assoc in vpc.get("Ipv6CidrBlockAssociationSet", []):
                if assoc.get("Ipv6CidrBlockState", {}).get("State") == "associated" and assoc.get("Ipv6CidrBlock"):
                    found.cidrs.add(canonical_cidr(assoc["Ipv6CidrBlock"]))
    async for page in ec2.get_paginator("describe_vpc_endpoints").paginate():
        for endpoint in page.get("VpcEndpoints", []):
            if VPCE_RE.match(endpoint.get("VpcEndpointId", "")):
                vpc = endpoint.get("VpcId") or ""
                found.vpc_endpoints[endpoint["VpcEndpointId"]] = vpc if VPC_RE.match(vpc) else ""
    async for page in ec2.get_paginator("describe_network_interfaces").paginate():
        for eni in page.get("NetworkInterfaces", []):
            attached = _interface_instance(eni, account_id)
            if attached is not None:
                found.instances.setdefault(attached[0], InstanceInventory()).absorb(attached[1])
    async for page in ec2.get_paginator("describe_instances").paginate():
        for reservation in page.get("Reservations", []):
            for described in reservation.get("Instances", []):
                instance_id = described.get("InstanceId", "")
                if (described.get("State") or {}).get("Name") == "terminated":  # its addresses go back to the pool
                    found.instances.pop(instance_id, None)
                elif instance_id in found.instances and described.get("SourceDestCheck") is False:
                    found.instances[instance_id].egress = True
    found.cidrs.update(f"{ip}/32" for instance in found.instances.values() for ip in instance.public)
    return found


async def _account_inventory(
    aws: _Aws,
    inv: AccountInventory,
    *,
    caller: str,
    partition: str,
    region: str,
    regions: Sequence[str],
    role_name: str,
    sem: asyncio.Semaphore,
) -> None:
    credentials: dict[str, str] | None = None
    if inv.account_id != caller:
        role_arn = f"arn:{partition}:iam::{inv.account_id}:role/{role_name}"
        async with sem:
            try:
                async with aws.client("sts", region) as sts:
                    answer = await sts.assume_role(RoleArn=role_arn, RoleSessionName=SESSION_NAME)
            except _AWS_ERRORS as exc:
                inv.error = f"cannot assume {role_arn}: {describe_error(exc)}"
                return
        creds = answer["Credentials"]
        credentials = {
            "aws_access_key_id": creds["AccessKeyId"],
            "aws_secret_access_key": creds["SecretAccessKey"],
            "aws_session_token": creds["SessionToken"],
        }

    async def one(where: str) -> None:
        async with sem:
            try:
                async with aws.client("ec2", where, credentials) as ec2:
                    found = await _region_inventory(ec2, inv.account_id)
            except _AWS_ERRORS as exc:
                inv.region_errors[where] = describe_error(exc)
                return
        inv.absorb(found)
        inv.regions_read.append(where)

    await asyncio.gather(*(one(r) for r in regions))
    inv.regions_read.sort()
    if not inv.regions_read:
        first = sorted(inv.region_errors.items())[0] if inv.region_errors else ("-", "no regions")
        inv.error = f"no region could be read ({first[0]}: {first[1]})"


def _progress_line(done: int, total: int, inv: AccountInventory) -> str:
    label = f"[{done}/{total}] {inv.account_id}" + (f" ({inv.name})" if inv.name else "")
    if not inv.ok:
        return f"{label}: ERROR, skipped: {inv.error}"
    line = (
        f"{label}: {len(inv.cidrs)} CIDRs, {len(inv.vpc_endpoints)} VPC endpoints, "
        f"{len(inv.instances)} instances from {len(inv.regions_read)} region(s)"
    )
    if inv.region_errors:
        failed = ", ".join(f"{r} ({e})" for r, e in sorted(inv.region_errors.items()))
        line += f"; WARNING: not read in {failed}"
    return line


async def collect_inventory(
    session: AioSession | None = None,
    options: SyncOptions = SyncOptions(),
    *,
    progress: Callable[[str], None] | None = None,
) -> SyncReport:
    """Read accounts and their network inventory from AWS; see the module docstring.

    ``progress`` receives one line per account as it completes, and ``WARNING: ...`` lines.
    Raises :class:`SyncError` when nothing usable was read.
    """
    session = session or get_session()
    say = progress or (lambda _line: None)
    home = options.region_name or session.get_config_variable("region") or "us-east-1"
    aws = _Aws(session, options.endpoint_url, options.concurrency, options.max_attempts)
    sem = asyncio.Semaphore(options.concurrency)
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        say(f"WARNING: {message}")

    caller, partition = await _caller(aws, home)
    org_accounts = await _organization_accounts(aws, home, caller, warn)
    wanted = list(options.regions) or await _regions(aws, home)
    inventories: dict[str, AccountInventory] = {
        account_id: AccountInventory(account_id, name=name, sources={"organizations"})
        for account_id, name in org_accounts.items()
    }
    inventories.setdefault(caller, AccountInventory(caller)).sources.add("caller")
    for member in await _all_guardduty_members(aws, wanted, sem, warn):
        inventories.setdefault(member, AccountInventory(member)).sources.add("guardduty")

    total = len(inventories)
    done = 0

    async def account(inv: AccountInventory) -> None:
        nonlocal done
        await _account_inventory(
            aws, inv, caller=caller, partition=partition, region=home, regions=wanted, role_name=options.role_name, sem=sem
        )
        done += 1
        say(_progress_line(done, total, inv))

    await asyncio.gather(*(account(inv) for inv in inventories.values()))
    report = SyncReport(caller, partition, wanted, inventories, warnings)
    if len(report.failed) == total:
        raise SyncError(f"nothing could be read: all {total} account(s) failed")
    return report


async def sync_registry(
    session: AioSession | None = None,
    options: SyncOptions = SyncOptions(),
    *,
    overlay: Mapping[str, Any] | Registry | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Sync from AWS and merge ``overlay``: the registry mapping to load or write (SPEC §7 format).

    Feed the result to :func:`detector.core.registry.registry_from_mapping` to swap it in, or to
    :func:`detector.aws.output.write_registry` to write it. Raises :class:`SyncError` as
    :func:`collect_inventory` does, and :class:`~detector.core.registry.RegistryError` for a bad overlay
    (before any AWS call).
    """
    if overlay is not None and not isinstance(overlay, Registry):
        overlay = normalise_registry(overlay, "<overlay>")[0]
    say = progress or (lambda _line: None)
    report = await collect_inventory(session, options, progress=progress)
    return merge_registry(report.to_mapping(), overlay, warn=lambda m: say(f"WARNING: {m}"))
