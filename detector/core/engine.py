"""The detection core: ``Engine.apply(state, record) -> [FindingChange]`` (SPEC §3-§5, §8).

Pure and synchronous: no I/O, no clock (time is the records' ``eventTime``), no logging. The replay
command, the Kafka service and state restoration all drive this same function.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .addresses import V4, AddressIndex, format_address, is_global, parse_address
from .registry import EMPTY_REGISTRY, Registry
from .state import MAX_EVENT_IDS, MAX_REMOTE_ADDRESSES, DetectorState, FindingGroup, Session

INSIDE_AWS = "UnauthorizedAccess:IAMUser/InstanceCredentialExfiltration.InsideAWS"
OUTSIDE_AWS = "UnauthorizedAccess:IAMUser/InstanceCredentialExfiltration.OutsideAWS"

HIGH = 8
MEDIUM = 5

# Origin kinds (SPEC §4), also the `originKind` evidence field.
ORIGIN_SERVICE = "AWS_SERVICE"
ORIGIN_ENDPOINT = "VPC_ENDPOINT"
ORIGIN_REGISTRY = "REGISTRY_ADDRESS"
ORIGIN_EXPECTED = "EXPECTED_NETWORK"
ORIGIN_AWS = "AWS_ADDRESS"
ORIGIN_PRIVATE = "PRIVATE_ADDRESS"
ORIGIN_OUTSIDE = "OUTSIDE_AWS"

_SESSION_ARN = re.compile(
    r"arn:([a-z][a-z0-9-]*):sts::([0-9]{12}):assumed-role/([\w+=,.@-]{1,128})/(i-(?:[0-9a-f]{17}|[0-9a-f]{8}))"
)
_ROLE_ARN = re.compile(r"arn:([a-z][a-z0-9-]*):iam::([0-9]{12}):role/(?:[\w+=,.@/-]*/)?([\w+=,.@-]{1,128})")
_INSTANCE_ID = re.compile(r"i-(?:[0-9a-f]{17}|[0-9a-f]{8})")
_ACCOUNT = re.compile(r"[0-9]{12}")


class MalformedRecord(ValueError):
    """An instance-credential record that lacks what the decision needs (goes to the dead letters)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(slots=True)
class FindingChange:
    group: FindingGroup
    new: bool


@dataclass(slots=True)
class Counters:
    records: int = 0
    instance_records: int = 0
    issuance_records: int = 0
    origin: dict[str, int] | None = None

    def __post_init__(self) -> None:
        self.origin = {}


def parse_event_time(value: Any) -> float:
    if not isinstance(value, str):
        raise MalformedRecord("bad_field", "eventTime missing or not a string")
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise MalformedRecord("bad_field", f"eventTime {value[:40]!r} is not ISO 8601") from None
    if dt.tzinfo is None:
        raise MalformedRecord("bad_field", f"eventTime {value[:40]!r} has no time zone")
    try:
        dt.astimezone(timezone.utc)  # e.g. 0001-01-01T00:00:00+01:00 is year 0 in UTC: not renderable
    except OverflowError:
        raise MalformedRecord("bad_field", f"eventTime {value[:40]!r} is outside the UTC calendar") from None
    return dt.timestamp()


def is_service_call(identity: dict[str, Any], source: Any) -> bool:
    """SPEC §4.1: an AWS service acting on the caller's behalf."""
    return bool(identity.get("invokedBy")) or (
        isinstance(source, str) and (source.endswith(".amazonaws.com") or source.startswith("AWS Internal"))
    )


def check_decidable(record: dict[str, Any]) -> None:
    """Raise :class:`MalformedRecord` for an instance-credential record ``Engine.apply`` would reject.

    Lets a stage that only routes records (the service's first stage) dead-letter the original input
    instead of passing an undecidable record on.
    """
    parse_event_time(record.get("eventTime"))
    source = record.get("sourceIPAddress")
    if is_service_call(record["userIdentity"], source):
        return
    vpce = record.get("vpcEndpointId")
    if isinstance(vpce, str) and vpce.startswith("vpce-"):
        return
    if not isinstance(source, str) or parse_address(source) is None:
        raise MalformedRecord("bad_field", f"sourceIPAddress {str(source)[:60]!r} is neither an address nor a service")


def session_parts(record: dict[str, Any]) -> tuple[str, str, str, str, str] | None:
    """``(session_key, partition, account, role, instance_id)`` if made with instance credentials."""
    identity = record.get("userIdentity")
    if not isinstance(identity, dict) or identity.get("type") != "AssumedRole":
        return None
    arn = identity.get("arn")
    if not isinstance(arn, str):
        return None
    m = _SESSION_ARN.fullmatch(arn)
    if m is None:
        return None
    return arn, m.group(1), m.group(2), m.group(3), m.group(4)


def issuance_parts(record: dict[str, Any]) -> tuple[str, str, str, str, str, str | None] | None:
    """For EC2's own AssumeRole that issues instance credentials: key parts and the new access key."""
    if record.get("eventName") != "AssumeRole":
        return None
    identity = record.get("userIdentity")
    if not isinstance(identity, dict) or identity.get("invokedBy") != "ec2.amazonaws.com":
        return None
    params = record.get("requestParameters")
    if not isinstance(params, dict):
        return None
    instance_id = params.get("roleSessionName")
    role_arn = params.get("roleArn")
    if not isinstance(instance_id, str) or not _INSTANCE_ID.fullmatch(instance_id) or not isinstance(role_arn, str):
        return None
    m = _ROLE_ARN.fullmatch(role_arn)
    if m is None:
        return None
    partition, account, role = m.group(1), m.group(2), m.group(3)
    key = f"arn:{partition}:sts::{account}:assumed-role/{role}/{instance_id}"
    access_key = None
    response = record.get("responseElements")
    if isinstance(response, dict):
        creds = response.get("credentials")
        if isinstance(creds, dict) and isinstance(creds.get("accessKeyId"), str):
            access_key = creds["accessKeyId"]  # never the sessionToken
    return key, partition, account, role, instance_id, access_key


def finding_id(finding_type: str, session_key: str, remote_account: str | None) -> str:
    material = "\x1f".join((finding_type, session_key, remote_account or ""))
    return hashlib.sha256(material.encode()).hexdigest()[:32]


@dataclass(slots=True)
class Origin:
    kind: str
    owner: str | None = None  # account that owns the endpoint or address, when known
    address: str | None = None  # the source address, normalised, when it is one
    family: int = 0
    vpce: str | None = None


class Engine:
    """Context of the decision (registry, AWS ranges) plus the pure ``apply``."""

    def __init__(self, registry: Registry = EMPTY_REGISTRY, aws_ranges: AddressIndex[Any] | None = None) -> None:
        self.registry = registry
        self.aws_ranges: AddressIndex[Any] = aws_ranges if aws_ranges is not None else AddressIndex()
        self.counters = Counters()

    # --- SPEC §4 -----------------------------------------------------------------------------------

    def origin(self, record: dict[str, Any], identity: dict[str, Any], home: str) -> Origin:
        source = record.get("sourceIPAddress")
        if is_service_call(identity, source):
            return Origin(ORIGIN_SERVICE)
        parsed = parse_address(source) if isinstance(source, str) else None
        address = format_address(*parsed) if parsed is not None else None
        family = parsed[0] if parsed is not None else 0
        vpce = record.get("vpcEndpointId")
        if isinstance(vpce, str) and vpce.startswith("vpce-"):
            owner = record.get("vpcEndpointAccountId")
            if not (isinstance(owner, str) and _ACCOUNT.fullmatch(owner)):
                owner = self.registry.endpoint_owner.get(vpce)
            return Origin(ORIGIN_ENDPOINT, owner, address, family, vpce)
        if parsed is None:
            raise MalformedRecord("bad_field", f"sourceIPAddress {str(source)[:60]!r} is neither an address nor a service")
        value = parsed[1]
        owner = self.registry.owners.lookup(family, value)
        if owner is not None:
            return Origin(ORIGIN_REGISTRY, owner, address, family)
        if self.registry.is_expected(family, value, home):
            return Origin(ORIGIN_EXPECTED, None, address, family)
        if self.aws_ranges.lookup(family, value) is not None:
            return Origin(ORIGIN_AWS, None, address, family)
        if not is_global(family, value):
            return Origin(ORIGIN_PRIVATE, None, address, family)
        return Origin(ORIGIN_OUTSIDE, None, address, family)

    # --- SPEC §3, §5 -------------------------------------------------------------------------------

    def apply(self, state: DetectorState, record: dict[str, Any]) -> list[FindingChange]:
        """Apply one CloudTrail record to ``state``; return the finding groups it opened or changed.

        Raises :class:`MalformedRecord` for an instance-credential record that cannot be decided.
        """
        self.counters.records += 1
        parts = session_parts(record)
        if parts is None:
            issued = issuance_parts(record)
            if issued is not None:
                self._enrich(state, record, issued)
            return []
        key, partition, home, role, instance_id = parts
        identity = record["userIdentity"]
        event_ts = parse_event_time(record.get("eventTime"))
        origin = self.origin(record, identity, home)
        self.counters.instance_records += 1
        by_origin = self.counters.origin
        by_origin[origin.kind] = by_origin.get(origin.kind, 0) + 1

        state.advance(event_ts)
        session = state.session(key, instance_id, home, role, partition)
        access_key = identity.get("accessKeyId")
        if isinstance(access_key, str):
            session.add_access_key(access_key)
        delivery = None
        context = identity.get("sessionContext")
        if isinstance(context, dict):
            delivery = context.get("ec2RoleDelivery")
            if isinstance(delivery, str):
                session.add_delivery(delivery)
            else:
                delivery = None

        verdict = self.decide(session, origin, home)
        if verdict is None:
            return []
        finding_type, remote, severity = verdict
        change = self._record_finding(
            state, session, key, record, identity, event_ts, origin, delivery, finding_type, remote, severity
        )
        return [] if change is None else [change]

    def decide(self, session: Session, origin: Origin, home: str) -> tuple[str, str | None, int] | None:
        """The decision table of SPEC §5; updates the session's baseline. ``(type, remote, severity)``."""
        kind = origin.kind
        registry = self.registry
        if kind == ORIGIN_SERVICE or kind == ORIGIN_EXPECTED:
            return None
        if kind == ORIGIN_ENDPOINT or kind == ORIGIN_REGISTRY:
            owner = origin.owner
            if owner is None:  # VPC endpoint of unknown owner: remembered, never a finding
                session.add_endpoint(origin.vpce, None)  # type: ignore[arg-type]
                return None
            if owner == home or registry.is_trusted(owner):
                if origin.vpce is not None:
                    session.add_endpoint(origin.vpce, owner)
                elif origin.address is not None:
                    session.add_address(origin.address)
                return None
            return INSIDE_AWS, owner, MEDIUM if registry.is_affiliated(owner) else HIGH
        if kind == ORIGIN_AWS:
            if registry.has_inventory(home):
                return INSIDE_AWS, None, HIGH
            address = origin.address
            if origin.family == V4:
                if session.tofu_v4 is None:
                    session.tofu_v4 = address
                    return None
                if session.tofu_v4 == address:
                    return None
            else:
                if session.tofu_v6 is None:
                    session.tofu_v6 = address
                    return None
                if session.tofu_v6 == address:
                    return None
            return INSIDE_AWS, None, HIGH
        return OUTSIDE_AWS, None, HIGH  # private (no VPC endpoint) or outside AWS

    # --- helpers -----------------------------------------------------------------------------------

    def _enrich(self, state: DetectorState, record: dict[str, Any], issued: tuple[str, str, str, str, str, str | None]) -> None:
        key, partition, account, role, instance_id, access_key = issued
        try:
            event_ts = parse_event_time(record.get("eventTime"))
        except MalformedRecord:
            return  # enrichment is best effort; the record itself is never a finding
        self.counters.issuance_records += 1
        state.advance(event_ts)
        session = state.session(key, instance_id, account, role, partition)
        if access_key:
            session.add_access_key(access_key)

    def _record_finding(
        self,
        state: DetectorState,
        session: Session,
        key: str,
        record: dict[str, Any],
        identity: dict[str, Any],
        event_ts: float,
        origin: Origin,
        delivery: str | None,
        finding_type: str,
        remote: str | None,
        severity: int,
    ) -> FindingChange | None:
        gid = finding_id(finding_type, key, remote)
        group = state.groups.get(gid)
        event_id = record.get("eventID")
        new = group is None
        if group is None:
            group = FindingGroup(
                id=gid,
                type=finding_type,
                session_key=key,
                remote_account=remote,
                count=0,
                first_ts=event_ts,
                last_ts=event_ts,
                account=session.account,
                partition=session.partition,
                role=session.role,
                instance_id=session.instance_id,
                remote_addresses=[],
                baseline=session.baseline(),
                deliveries=[],
                created_at=state.stream_time,
                event_ids=[],
                version=0,
            )
            state.groups[gid] = group
            if gid not in session.groups:
                session.groups = session.groups + (gid,)
        elif isinstance(event_id, str) and event_id in group.event_ids:
            return None  # the same CloudTrail event delivered again: already counted
        group.count += 1
        group.version += 1
        if isinstance(event_id, str):
            group.event_ids.append(event_id)
            if len(group.event_ids) > MAX_EVENT_IDS:
                del group.event_ids[0]
        group.first_ts = min(group.first_ts, event_ts)
        group.last_ts = max(group.last_ts, event_ts)
        group.severity = severity
        group.affiliated = self.registry.is_affiliated(remote) if remote else False
        region = record.get("awsRegion")
        group.region = region if isinstance(region, str) else group.region
        access_key = identity.get("accessKeyId")
        group.access_key_id = access_key if isinstance(access_key, str) else (session.access_keys[-1:] or [None])[0]
        principal = identity.get("principalId")
        group.principal_id = principal if isinstance(principal, str) else group.principal_id
        api = record.get("eventName")
        group.api = api if isinstance(api, str) else group.api
        service_name = record.get("eventSource")
        group.service_name = service_name if isinstance(service_name, str) else group.service_name
        group.ip = origin.address
        group.origin = origin.kind
        group.vpce = origin.vpce
        if origin.address and origin.address not in group.remote_addresses and len(group.remote_addresses) < MAX_REMOTE_ADDRESSES:
            group.remote_addresses.append(origin.address)
        if delivery is not None and delivery not in group.deliveries:
            group.deliveries.append(delivery)
        group.updated_at = state.stream_time
        state.note_group(group)
        return FindingChange(group, new)
