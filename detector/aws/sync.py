"""Build the affiliation registry from AWS (SPEC §7, ``detector registry sync``).

Which accounts are ours: every ACTIVE account of the AWS Organization (the management account included)
and every member of the caller's GuardDuty detectors. What each one owns, per region: Elastic IPs and NAT
gateway public addresses (as /32), associated VPC IPv6 blocks, and VPC endpoint IDs — read through
``arn:<partition>:iam::<account>:role/<role-name>`` (the caller's own account with the ambient
credentials). Credentials come from the standard AWS chain of the aiobotocore session.

Failures are contained: GuardDuty being absent or denied is a warning; an account whose role cannot be
assumed, or whose regions all fail, is reported and keeps no inventory (it stays affiliated — it is still
in the organization). :class:`SyncError` is raised only when the caller cannot be identified, the accounts
cannot be listed, the regions cannot be found, or no account could be read at all.

:func:`sync_registry` is the one call the long-running service needs for an in-process periodic sync.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import BotoCoreError, ClientError

from ..core.registry import VPCE_RE, Registry, registry_from_mapping
from .merge import canonical_cidr, merge_registry

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
class AccountInventory:
    account_id: str
    name: str = ""
    sources: set[str] = field(default_factory=set)  # "organizations", "guardduty", "caller"
    cidrs: set[str] = field(default_factory=set)
    vpc_endpoints: set[str] = field(default_factory=set)
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
                    "vpc_endpoints": sorted(inv.vpc_endpoints),
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


async def _region_inventory(ec2: Any) -> tuple[set[str], set[str]]:
    cidrs: set[str] = set()
    endpoints: set[str] = set()
    addresses = await ec2.describe_addresses()
    cidrs.update(f"{a['PublicIp']}/32" for a in addresses.get("Addresses", []) if a.get("PublicIp"))
    async for page in ec2.get_paginator("describe_nat_gateways").paginate():
        for nat in page.get("NatGateways", []):
            if str(nat.get("State", "")).lower() in ("failed", "deleted"):
                continue
            cidrs.update(f"{a['PublicIp']}/32" for a in nat.get("NatGatewayAddresses", []) if a.get("PublicIp"))
    async for page in ec2.get_paginator("describe_vpcs").paginate():
        for vpc in page.get("Vpcs", []):
            for assoc in vpc.get("Ipv6CidrBlockAssociationSet", []):
                if assoc.get("Ipv6CidrBlockState", {}).get("State") == "associated" and assoc.get("Ipv6CidrBlock"):
                    cidrs.add(canonical_cidr(assoc["Ipv6CidrBlock"]))
    async for page in ec2.get_paginator("describe_vpc_endpoints").paginate():
        endpoints.update(e["VpcEndpointId"] for e in page.get("VpcEndpoints", []) if VPCE_RE.match(e.get("VpcEndpointId", "")))
    return cidrs, endpoints


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
                    cidrs, endpoints = await _region_inventory(ec2)
            except _AWS_ERRORS as exc:
                inv.region_errors[where] = describe_error(exc)
                return
        inv.cidrs |= cidrs
        inv.vpc_endpoints |= endpoints
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
        f"{label}: {len(inv.cidrs)} CIDRs, {len(inv.vpc_endpoints)} VPC endpoints "
        f"from {len(inv.regions_read)} region(s)"
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
        overlay = registry_from_mapping(overlay, "<overlay>")
    say = progress or (lambda _line: None)
    report = await collect_inventory(session, options, progress=progress)
    return merge_registry(report.to_mapping(), overlay, warn=lambda m: say(f"WARNING: {m}"))
